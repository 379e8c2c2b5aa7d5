"""Does mixed-precision training agree with fp32? Train a config's model from one seed both ways, compare.

    python publications/src/vq/tools/amp_check.py -d cpu -c publications/config/vq/demo_phantom_cpu.yaml \
        --steps 300 [--set key=value ...]

Both runs see the same batches (the training loader, phases by its epochs) and the
same random draws, and validate on the valid subjects' central `train.val_slices`
slices; prints both validation PSNRs and their difference. An experiment, not a
timing: `tests/test_speed.py` runs a 150-step version on a tiny model.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Iterable

import torch

from vq.cli import add_set_arg, run_main
from vq.config import Config, load_config, resolve_path
from vq.dataloader.brats import SliceCache
from vq.dataloader.datasets import make_train_loader, validation_stacks
from vq.evaluation import translation_psnr
from vq.inference import Translator
from vq.dataloader.lists import read_list
from vq.losses import PerceptualLoss, perceptual_loss_for
from vq.runtime import amp_dtype, resolve_device
from vq.training import Phase, build_training, poly_lr, set_lr, train_step

log = logging.getLogger("amp_check")


def train_then_validate(cfg: Config, device: torch.device, amp: torch.dtype | None,
                        batches: Iterable[tuple[int, dict]], steps: int,
                        valid: dict[str, dict[int, torch.Tensor]], perceptual: PerceptualLoss | None = None) -> float:
    """Train a fresh model (seed `cfg.seed`) on `steps` (epoch, batch) items, then its mean validation PSNR.

    The lr follows the config's polynomial decay compressed to `steps` (so the
    run settles by its end); validation runs in the training precision.
    """
    run = build_training(cfg, device, perceptual=perceptual, amp=amp)
    schedule = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=steps))
    for step, (epoch, batch) in zip(range(steps), batches):
        set_lr(run.optimizer, poly_lr(schedule, step))
        train_step(run, {key: value.to(device) for key, value in batch.items()}, Phase.at(cfg, epoch))
    total, _, count = translation_psnr(Translator(run.model, device, amp, cfg.test.batch_size), valid)
    return total / count


def data_rows(cfg: Config, split: str) -> list[tuple[str, int]] | None:
    """Subjects of a split of the config's data; None (and a warning) when there is none."""
    root, path = resolve_path(cfg.data.root), cfg.lists_dir / f"{split}.csv"
    if not root.is_dir() or not path.is_file():
        log.warning("no %s list at %s for data.root=%s (make_data_list.py makes it)", split, path, cfg.data.root)
        return None
    return read_list(path)


def loader_batches(loader):
    """Batches of the training loader over consecutive epochs, as the training loop draws them."""
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def amp_check(cfg: Config, device: torch.device, amp: torch.dtype, steps: int) -> dict[str, float]:
    """Validation PSNR (dB) after `steps` training steps from the same seed in fp32 and in `amp`:
    -> {"fp32": psnr, "mixed": psnr}."""
    train_rows, valid_rows = data_rows(cfg, "train"), data_rows(cfg, "valid")
    if train_rows is None or valid_rows is None:
        raise FileNotFoundError(f"the mixed-precision check needs data: data.root={cfg.data.root} with lists")
    cache = SliceCache(resolve_path(cfg.data.cache_dir), resolve_path(cfg.data.root), cfg.data)
    cache.ensure([name for name, _ in valid_rows])
    loader = make_train_loader(cfg, cache, train_rows, seed=cfg.seed)
    valid = validation_stacks(cache, valid_rows, cfg.train.val_slices)
    perceptual = perceptual_loss_for(cfg, device, untrained_if_missing=True)
    per_epoch = loader.sampler.batches_per_epoch

    def batches():
        for step, batch in enumerate(loader_batches(loader)):
            yield step // per_epoch, {key: value for key, value in batch.items() if key != "name"}

    results = {}
    for label, precision in (("fp32", None), ("mixed", amp)):
        results[label] = train_then_validate(cfg, device, precision, batches(), steps, valid, perceptual)
        log.info("%s: validation PSNR %.3f dB after %d steps", label, results[label], steps)
    return results


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-d", "--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("-c", "--config", required=True, help="YAML config")
    p.add_argument("--steps", type=int, default=300, help="training steps of each run")
    add_set_arg(p)
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    return args


def run(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.set)
    device = resolve_device(args.device)
    mixed = amp_dtype(device, "auto")
    if mixed is None:
        log.warning("no bf16 units on this CPU: the check runs emulated bf16, much slower than fp32")
    psnr = amp_check(cfg, device, mixed or torch.bfloat16, args.steps)
    print(f"validation PSNR after {args.steps} steps: fp32 {psnr['fp32']:.3f} dB, "
          f"mixed ({mixed or torch.bfloat16}) {psnr['mixed']:.3f} dB, difference {psnr['mixed'] - psnr['fp32']:+.3f} dB")


def main(argv=None) -> int:
    return run_main(run, parse_args(argv), log)


if __name__ == "__main__":
    sys.exit(main())
