"""Checkpoints: written atomically, loaded without pickle code execution, checked against the config."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from vq.config import Config
from vq.models import build_model

from vq.files import write_atomic


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
