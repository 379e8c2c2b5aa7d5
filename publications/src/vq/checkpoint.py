"""Checkpoints: written atomically, loaded without pickle code execution, checked against the config."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vq.config import Config, get_key, load_config, missing_keys, resolve_path
from vq.models import build_model
from vq.runtime import rng_state, set_rng_state
from vq.training import load_optimizer_state

from vq.files import write_atomic


SOURCE_CONV = "encoder.net.0.conv."
"""The weights of the source-conditioned first encoder layer (model.source_code)."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the model of the config."""


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write to a temporary file in the same folder, fsync, then rename: a kill never leaves a truncated file."""
    return write_atomic(path, lambda f: torch.save(state, f), durable=True)


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint with weights_only=True: a checkpoint file cannot run code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt/unsafe files
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    if isinstance(state, dict) and "model" not in state and all(isinstance(v, torch.Tensor) for v in state.values()):
        state = {"model": state}  # a bare state_dict
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path} holds no model weights")
    return state


def load_model_weights(model: nn.Module, state: dict, path: str | Path = "checkpoint") -> None:
    """Load weights strictly; on mismatch name the first differing keys/shapes."""
    weights = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state["model"].items()}
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}"
              for k, v in own.items() if k in weights and weights[k].shape != v.shape]
    told = [any(k.startswith(SOURCE_CONV) for k in keys) for keys in (weights, own)]
    if told[0] != told[1]:  # the first encoder layer is another module: its keys and shapes differ
        value = str(told[0]).lower()
        raise CheckpointError(f"checkpoint {path} was trained with model.source_code={value}; "
                              f"load it with --set model.source_code={value} (or the config it was trained with)")
    switches = {"mix_bias.": "model.hyper_bias=shared", "quantizer.initialised": "model.codebook_init=uniform"}
    for part, setting in switches.items():  # keys that exist under one value of a model switch only
        if missing and all(part in k for k in missing) and not unexpected and not shapes:
            raise CheckpointError(f"checkpoint {path} was trained with {setting} (it has no {missing[0]}); "
                                  f"load it with --set {setting}")
        if unexpected and all(part in k for k in unexpected) and not missing and not shapes:
            key, value = setting.split("=")
            other = {"model.hyper_bias": "own", "model.codebook_init": "kmeans"}[key]
            raise CheckpointError(f"checkpoint {path} was trained with {key}={other} (it has {unexpected[0]}); "
                                  f"load it with --set {key}={other}")
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}")
        if shapes:
            parts.append(f"shape {'; '.join(shapes[:3])}")
        raise CheckpointError(f"checkpoint {path} does not match the model of this config ({'; '.join(parts)}); "
                              "use the config the checkpoint was trained with")
    model.load_state_dict(weights)


def load_trained_model(cfg: Config, checkpoint: str, device: torch.device, state: dict | None = None) -> torch.nn.Module:
    """The config's model with the checkpoint's weights (`state`: the checkpoint already read), in eval
    mode on `device`.

    Warns when the config normalises intensities differently from the run that wrote the
    checkpoint (its config is saved in it): the model would then see inputs it was not trained on.
    """
    state = read_checkpoint(checkpoint) if state is None else state
    model = build_model(cfg.model).to(device)
    load_model_weights(model, state, checkpoint)
    trained = (state.get("config") or {}).get("data", {}).get("percentile")
    if trained is not None and trained != cfg.data.percentile:
        logging.getLogger(__name__).warning(
            "checkpoint %s was trained with data.percentile=%s but this config normalises with %s; "
            "pass the training config or --set data.percentile=%s", checkpoint, trained, cfg.data.percentile, trained)
    return model.eval()


@dataclass
class Position:
    """Where a training run stands (saved in its checkpoints)."""

    epoch: int = 0
    step: int = 0
    in_epoch: int = 0
    """Batches already drawn in this epoch."""
    best: float = float("-inf")
    """The best validation PSNR so far (ckpt_best's)."""


def run_checkpoint(model: nn.Module, ema, optimizer, cfg: Config, pos: Position, steps_per_epoch: int,
                   intensity_reference: dict, finished: bool = False) -> dict:
    """A training checkpoint. With a weight average (`ema`, train.ema_decay) `model` holds the average,
    which validation and test use, and `train_model` the trained weights, which a resume continues."""
    weights = {"model": (ema.model if ema else model).state_dict()}
    if ema:
        weights.update(train_model=model.state_dict(), ema_updates=ema.updates)
    return {**weights, "intensity_reference": intensity_reference, "optimizer": optimizer.state_dict(),
            "epoch": pos.epoch, "step": pos.step, "in_epoch": pos.in_epoch, "steps_per_epoch": steps_per_epoch,
            "best_psnr": pos.best, "rng": rng_state(), "finished": finished, "config": cfg.to_dict()}


def restore_run(state: dict, path: Path, ema, optimizer, steps_per_epoch: int) -> Position:
    """A resumed run's average, optimizer and random state from its checkpoint (the trained weights are
    loaded before the model is wrapped for training); -> its position. A checkpoint written with another
    number of steps per epoch (batch size, processes or usable subjects changed) restarts its epoch."""
    pos = Position(state["epoch"], state["step"], best=state["best_psnr"])
    if ema and "train_model" in state:
        load_model_weights(ema.model, state, path)
        ema.updates = state.get("ema_updates", pos.step)
    load_optimizer_state(optimizer, state["optimizer"])
    pos.in_epoch = state.get("in_epoch", pos.step - pos.epoch * steps_per_epoch)  # older: constant epochs
    before = state.get("steps_per_epoch")  # None in older checkpoints
    if pos.in_epoch and (before not in (None, steps_per_epoch) or not 0 < pos.in_epoch <= steps_per_epoch):
        logging.getLogger("train").warning(
            "the run had %s steps per epoch and now has %d (batch size, processes or usable subjects changed): "
            "epoch %d restarts from its first batch", before or "other", steps_per_epoch, pos.epoch)
        pos.in_epoch = 0
    set_rng_state(state["rng"])
    logging.getLogger("train").info("resumed at epoch %d, step %d (best PSNR %.2f)", pos.epoch, pos.step, pos.best)
    return pos


def open_run(config: str | None, sets: list[str], resume: str | None) -> tuple[Config, Path]:
    """The config and run folder of a training: a new run from `config` into its `out_dir` (a folder that
    already holds a run is refused), or the run in `resume` with its saved config.yaml (or `config`).
    Resuming names the settings added to the code since the run started: they take their defaults."""
    if not resume:
        cfg = load_config(config, sets)
        run_dir = resolve_path(cfg.out_dir)
        if (run_dir / "ckpt_last.pth").exists() or (run_dir / "config.yaml").exists():
            raise FileExistsError(f"run folder {run_dir} already holds a run; continue it with --resume {run_dir} "
                                  "or choose another folder with --set out_dir=...")
        return cfg, run_dir
    run_dir = resolve_path(resume)
    config_path = config or run_dir / "config.yaml"
    cfg = load_config(config_path, sets + [f"out_dir={run_dir}"])
    if not (run_dir / "ckpt_last.pth").is_file():
        raise CheckpointError(f"--resume {run_dir}: no ckpt_last.pth there to resume from")
    given = {item.split("=", 1)[0].strip() for item in sets}
    newer = [key for key in missing_keys(config_path) if key not in given]
    if newer:
        logging.getLogger("train").warning(
            "%s predates %d setting(s); resuming with their defaults: %s (set others with --set)", config_path,
            len(newer), ", ".join(f"{k}={get_key(cfg, k)!r}" for k in newer))
    return cfg, run_dir
