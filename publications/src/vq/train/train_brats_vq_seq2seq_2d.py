"""Train VQ-Seq2Seq (or an ablation) on a BraTS-layout dataset, 2D slices.

    python publications/src/vq/train/train_brats_vq_seq2seq_2d.py -d cuda:0 \
        -c publications/config/vq/vqseq2seq_brats_2d_missing_3_256.yaml [-l WEIGHTS] \
        [--resume RUN_DIR] [--set train.batch_size=8 ...]

Config -> data -> model -> optimizer -> loop -> checkpoint, in that order.
Everything goes to the run folder `out_dir`: config.yaml, log.csv, TensorBoard
events, progress.png, samples/, ckpt_last.pth and ckpt_best.pth.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import time

import torch
from tqdm import tqdm

from vq.checkpoint import (Position, load_model_weights, open_run, read_checkpoint, restore_run, run_checkpoint,
                           save_checkpoint)
from vq.cli import add_set_arg, run_main
from vq.dataloader.check import check_training_data
from vq.dataloader.datasets import intensity_reference, make_train_loader, validation_stacks
from vq.distributed import cleanup, init_distributed, launch_rank, replicas_in_sync, sum_across
from vq.evaluation import validate, validation_grid, validation_row
from vq.inference import Translator
from vq.losses import perceptual_loss_for
from vq.models import build_model
from vq.runlog import DataWait, RunLog
from vq.runtime import amp_dtype, device_name, resolve_device, seed_everything
from vq.training import (Phase, WeightAverage, build_training, poly_lr, read_stats, set_lr, to_device, train_step,
                         warmup_factor)

log = logging.getLogger("train")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-d", "--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("-c", "--config", help="YAML config (with --resume, defaults to the run's config.yaml)")
    p.add_argument("-l", "--load", help="initial model weights (a checkpoint file)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in this folder")
    add_set_arg(p)
    args = p.parse_args(argv)
    if not args.config and not args.resume:
        p.error("give a config with -c (or --resume RUN_DIR)")
    return args


class Stop(Exception):
    """SIGINT/SIGTERM arrived: the loop saves a last checkpoint after the current step and exits."""


def main(argv=None) -> int:
    return run_main(train, parse_args(argv), log)


def train(args) -> int:
    device = resolve_device(args.device)  # first: a missing GPU is the more basic problem
    cfg, run_dir = open_run(args.config, args.set, args.resume)
    # every subject checked (and cached) before the process group: no collective waits on a cache build
    data = check_training_data(cfg, run_dir, write_report=launch_rank() == 0)
    ddp, device = init_distributed(device, cfg.train.dist_timeout_s)
    try:
        return train_loop(args, cfg, run_dir, ddp, device, *data)
    finally:
        cleanup(ddp)


def train_loop(args, cfg, run_dir, ddp, device, cache, train_rows, valid_rows) -> int:
    if not ddp.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one voice in the console
    t, amp = cfg.train, amp_dtype(device, cfg.train.amp)
    seed_everything(cfg.seed)
    log.info("run folder %s | device %s (%s) | autocast %s | %d process(es)", run_dir, device, device_name(device),
             amp, ddp.world_size)
    loader = make_train_loader(cfg, cache, train_rows, seed=cfg.seed, distributed=ddp.enabled)
    batches = DataWait(loader)  # the loader, timing the loop's wait for data (log.csv data_wait_share)
    reference = intensity_reference(cache, train_rows, cfg.data.missing)  # saved with every checkpoint
    valid = validation_stacks(cache, valid_rows, t.val_slices)
    my_valid = dict(list(valid.items())[ddp.rank::ddp.world_size])  # each rank validates its share

    model = build_model(cfg.model)
    if args.load:
        load_model_weights(model, read_checkpoint(args.load), args.load)
        log.info("initial weights from %s", args.load)
    state = read_checkpoint(run_dir / "ckpt_last.pth") if args.resume else None
    if state:  # the trained weights (with train.ema_decay "model" holds the average)
        load_model_weights(model, {"model": state.get("train_model", state["model"])}, run_dir / "ckpt_last.pth")
    run = build_training(cfg, device, model, perceptual_loss_for(cfg, device), amp,
                         start_step=state["step"] if state else 0, ddp=ddp.enabled)
    model, optimizer, steps_per_epoch = run.model, run.optimizer, loader.sampler.batches_per_epoch
    ema = WeightAverage(model, t.ema_decay) if t.ema_decay else None
    eval_model = ema.model if ema else model  # what validation, the sample grids and ckpt_best see
    log.info("model %s: %.2f M parameters; %d train / %d valid subjects", type(model).__name__,
             sum(p.numel() for p in model.parameters()) / 1e6, len(train_rows), len(valid_rows))
    pos = restore_run(state, run_dir / "ckpt_last.pth", ema, optimizer, steps_per_epoch) if state else Position()
    if ddp.enabled:
        torch.manual_seed(cfg.seed + 1000 * ddp.rank + pos.step)  # each rank its own augmentation draws

    def checkpoint(name: str, finished: bool = False) -> None:
        if ddp.is_main:
            save_checkpoint(run_checkpoint(model, ema, optimizer, cfg, pos, steps_per_epoch, reference, finished),
                            run_dir / name)

    if pos.step >= t.max_steps or pos.epoch >= t.epochs:
        log.info("run already finished (epoch %d, step %d); nothing to do", pos.epoch, pos.step)
        return 0
    out = RunLog(run_dir, cfg, pos.step if args.resume else None, active=ddp.is_main)
    stop: list[str] = []  # SIGINT/SIGTERM: finish the current step, then save and stop (never a half update)
    old_handlers = {s: signal.signal(s, lambda signum, _: stop.append(signal.Signals(signum).name))
                    for s in (signal.SIGINT, signal.SIGTERM)}

    def next_due(step: int) -> int:
        """The next step count at which the loop needs the exact count: a log row, a checkpoint, the end."""
        due = [t.max_steps, 1 if step == 0 else (step // t.log_every + 1) * t.log_every]
        return min(due + ([(step // t.ckpt_every_steps + 1) * t.ckpt_every_steps] if t.ckpt_every_steps else []))

    try:
        while pos.epoch < t.epochs and pos.step < t.max_steps:
            lr, phase = poly_lr(cfg, pos.epoch), Phase.at(cfg, pos.epoch)
            set_lr(optimizer, lr)
            loader.sampler.set_epoch(pos.epoch, start=pos.in_epoch)  # > 0 only when resumed mid-epoch
            bar = tqdm(batches, desc=f"epoch {pos.epoch}", leave=False, dynamic_ncols=True, disable=not ddp.is_main)
            # Steps are queued without waiting for the device; the count is read (one sync) only where the
            # loop needs it. `queued` steps since the last read: the count is at most step + queued (a
            # degenerate batch is not counted), so a read at `due` never overshoots an event.
            due, queued, tic, tic_step, _ = next_due(pos.step), 0, time.perf_counter(), pos.step, batches.take()
            for batch in bar:
                if t.warmup_steps and pos.step + queued <= t.warmup_steps:
                    set_lr(optimizer, lr * warmup_factor(cfg, pos.step + queued))
                model.bypass_quantizer = pos.step + queued < t.quantizer_warmup
                train_step(run, to_device(batch, device, t.channels_last), phase)
                if ema:
                    ema.update(model)
                pos.in_epoch, queued = pos.in_epoch + 1, queued + 1
                if pos.step + queued < due and not stop:
                    continue
                pos.step, skipped, stats = read_stats(run)
                queued = 0
                if pos.step == due:
                    toc = time.perf_counter()
                    seconds = max(toc - tic, 1e-9)
                    stats.update(skipped=skipped, data_wait_share=batches.take() / seconds,
                                 slices_per_s=(pos.step - tic_step) * t.batch_size * ddp.world_size / seconds)
                    tic, tic_step = toc, pos.step
                    bar.set_postfix(step=pos.step, loss=f"{stats['loss']:.3f}", l1=f"{stats['l1']:.3f}",
                                    sps=f"{stats['slices_per_s']:.1f}")
                    if pos.step % t.log_every == 0 or pos.step == 1:
                        out.record(pos.step, {"epoch": pos.epoch, "lr": lr * warmup_factor(cfg, pos.step - 1), **stats},
                                   {f"train/{k}": v for k, v in stats.items()})
                    if t.ckpt_every_steps and pos.step % t.ckpt_every_steps == 0:
                        checkpoint("ckpt_last.pth")
                    due = next_due(pos.step)
                if stop:
                    raise Stop(stop[0])
                if pos.step >= t.max_steps:
                    break
            else:
                pos.epoch, pos.in_epoch = pos.epoch + 1, 0
            pos.step = read_stats(run)[0]
            finished, epoch_done = pos.epoch >= t.epochs or pos.step >= t.max_steps, pos.in_epoch == 0
            if (epoch_done and (pos.epoch % t.val_every == 0 or finished)) or (finished and t.val_at_end):
                translator = Translator(eval_model, device, amp_dtype(device, cfg.test.amp), cfg.test.batch_size)
                row, count = validation_row(*sum_across(ddp, *validate(translator, my_valid, t.val_identity)))
                out.record(pos.step, {"epoch": pos.epoch, "lr": lr, **row},
                           {f"valid/{k.removeprefix('val_')}": v for k, v in row.items()})
                log.info("epoch %d step %d: valid PSNR %.2f dB (brain %.2f dB) over %d pairs; latent gap %.3f",
                         pos.epoch, pos.step, row["val_psnr"], row["val_psnr_brain"], count, row["val_latent_gap"])
                if row["val_psnr"] > pos.best and not model.bypass_quantizer:  # a bypassing model is not the method
                    pos.best = row["val_psnr"]
                    checkpoint("ckpt_best.pth")
                if ddp.is_main:
                    out.samples(validation_grid(translator, valid, cache, f"epoch {pos.epoch}, step {pos.step}"),
                                pos.epoch, pos.step)
                model.train()
            checkpoint("ckpt_last.pth", finished=finished)
            if epoch_done and t.keep_every_epochs and pos.epoch % t.keep_every_epochs == 0:
                checkpoint(f"ckpt_epoch_{pos.epoch:04d}.pth", finished=finished)
            out.flush()
    except Stop as reason:
        log.warning("%s received: saving ckpt_last.pth at step %d and stopping", reason, pos.step)
        checkpoint("ckpt_last.pth")
        return 130
    finally:
        for s, handler in old_handlers.items():
            signal.signal(s, handler)
        out.close()
    replicas_in_sync(ddp, model)
    if ddp.is_main and not (run_dir / "ckpt_best.pth").exists():
        checkpoint("ckpt_best.pth")
    log.info("done: %d steps, best valid PSNR %.2f dB; checkpoints in %s", pos.step, pos.best, run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
