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
import csv
import io
import logging
import os
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from vq.checkpoint import CheckpointError, load_model_weights, read_checkpoint, save_checkpoint
from vq.cli import add_set_arg, run_main
from vq.config import get_key, load_config, missing_keys, resolve_path, save_config
from vq.dataloader.brats import BratsDataError, SliceCache
from vq.dataloader.check import check_lists
from vq.dataloader.datasets import intensity_reference, load_eval_stack, make_train_loader
from vq.dataloader.lists import read_list
from vq.distributed import Dist, cleanup, init_distributed, replicas_in_sync, sum_across
from vq.files import write_atomic
from vq.losses import PerceptualLoss
from vq.models import build_model
from vq.runtime import amp_dtype, cpu_name, resolve_device, rng_state, seed_everything, set_rng_state
from vq.sequences import N_SEQ, available
from vq.training import (Phase, WeightAverage, build_training, latent_gap, load_optimizer_state, poly_lr, read_stats, set_lr,
                         train_step, translate, validate, warmup_factor)
from vq.viz import plot_progress, sample_grid, save_png
from vq.weights import MissingWeightsError

log = logging.getLogger("train")
LOG_COLUMNS = ["step", "epoch", "lr", "loss", "l1", "ssim", "per", "vq", "con", "perplexity", "usage",
               "slices_per_s", "val_psnr", "val_psnr_brain", "val_latent_gap", "skipped", "elapsed_s"]


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
    # --- device, config, process group ---
    device = resolve_device(args.device)  # first: a missing GPU is the more basic problem
    if args.resume:
        run_dir = resolve_path(args.resume)
        config_path = args.config or run_dir / "config.yaml"
        cfg = load_config(config_path, args.set + [f"out_dir={run_dir}"])
        if not (run_dir / "ckpt_last.pth").is_file():
            raise CheckpointError(f"--resume {run_dir}: no ckpt_last.pth there to resume from")
        given = {item.split("=", 1)[0].strip() for item in args.set}
        newer = [key for key in missing_keys(config_path) if key not in given]
        if newer:  # settings added to the code since the run started: the run continues with their defaults
            log.warning("%s predates %d setting(s); resuming with their defaults: %s (set others with --set)",
                        config_path, len(newer), ", ".join(f"{k}={get_key(cfg, k)!r}" for k in newer))
    else:
        cfg = load_config(args.config, args.set)
        run_dir = resolve_path(cfg.out_dir)
        if (run_dir / "ckpt_last.pth").exists() or (run_dir / "config.yaml").exists():
            raise FileExistsError(f"run folder {run_dir} already holds a run; continue it with --resume {run_dir} "
                                  "or choose another folder with --set out_dir=...")
    data = check_data(cfg, run_dir)  # before the process group: no collective waits on a cache build
    ddp, device = init_distributed(device, cfg.train.dist_timeout_s)
    try:
        return train_loop(args, cfg, run_dir, ddp, device, data)
    finally:
        cleanup(ddp)


def check_data(cfg, run_dir: Path) -> tuple[SliceCache, list, list]:
    """Check every training and validation subject (and build their slice cache) before the run
    starts; -> (cache, usable train rows, usable valid rows).

    Bad subjects stop the run with one line (how many, the first few, the report file in the run
    folder), unless data.skip_bad leaves them out. Under torchrun the processes take turns on the
    cache's lock: the first builds, the others find the cache ready.
    """
    rank0 = int(os.environ.get("RANK", "0")) == 0
    lists = cfg.lists_dir
    rows = {"train": read_list(lists / "train.csv"), "valid": read_list(lists / "valid.csv")}
    cache = SliceCache(resolve_path(cfg.data.cache_dir), resolve_path(cfg.data.root), cfg.data)
    with cache.locked():
        result = check_lists(cache, rows, cfg.data.missing)
    if result.bad:
        report = run_dir / "bad_subjects.csv"
        if rank0:
            result.write(report)
        if not cfg.data.skip_bad:
            raise BratsDataError(f"{result.summary(report)}; fix them, or train without them with "
                                 "--set data.skip_bad=true")
        log.warning("data.skip_bad: training without them: %s", result.summary(report))
    train_rows, valid_rows = result.used("train"), result.used("valid")
    if not train_rows or not valid_rows:
        raise BratsDataError(f"no usable {'training' if not train_rows else 'validation'} subjects "
                             f"in {lists}; see {run_dir / 'bad_subjects.csv'}")
    return cache, train_rows, valid_rows


def train_loop(args, cfg, run_dir: Path, ddp: Dist, device: torch.device, data) -> int:
    main_rank = ddp.is_main
    if not main_rank:
        logging.getLogger().setLevel(logging.WARNING)  # one voice in the console
    amp = amp_dtype(device, cfg.train.amp)
    seed_everything(cfg.seed)
    log.info("run folder %s | device %s (%s) | autocast %s | %d process(es)", run_dir, device,
             torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(), amp, ddp.world_size)

    # --- data: checked and cached by check_data ---
    cache, train_rows, valid_rows = data
    loader = make_train_loader(cfg, cache, train_rows, seed=cfg.seed, distributed=ddp.enabled)
    reference = intensity_reference(cache, train_rows, cfg.data.missing)  # saved with every checkpoint
    valid_seqs = {name: available(code) for name, code in valid_rows}
    if all(len(seqs) < 2 for seqs in valid_seqs.values()):
        log.warning("no valid subject has two available sequences; validating on all four sequences instead")
        valid_seqs = {name: list(range(N_SEQ)) for name in valid_seqs}
    valid = {name: {s: load_eval_stack(cache, name, s, cfg.train.val_slices) for s in seqs}
             for name, seqs in valid_seqs.items()}
    my_valid = dict(list(valid.items())[ddp.rank::ddp.world_size])  # each rank validates its share

    # --- model, loss, optimizer ---
    model = build_model(cfg.model)
    if args.load:
        load_model_weights(model, read_checkpoint(args.load), args.load)
        log.info("initial weights from %s", args.load)
    perceptual = None
    if cfg.train.lambda_per > 0:
        try:
            perceptual = PerceptualLoss(weights_path=cfg.train.vgg_weights).to(device)
        except MissingWeightsError as err:
            raise MissingWeightsError(f"{err}; or train without the perceptual loss: --set train.lambda_per=0") from None
    steps_per_epoch = loader.sampler.batches_per_epoch
    epoch, step, in_epoch, best = 0, 0, 0, float("-inf")  # in_epoch: batches already drawn in this epoch
    state = read_checkpoint(run_dir / "ckpt_last.pth") if args.resume else None
    if state:  # with train.ema_decay, "model" holds the average and "train_model" the trained weights
        load_model_weights(model, {"model": state.get("train_model", state["model"])}, run_dir / "ckpt_last.pth")
        epoch, step, best = state["epoch"], state["step"], state["best_psnr"]
    run = build_training(cfg, device, model, perceptual, amp, start_step=step, ddp=ddp.enabled)
    model, optimizer = run.model, run.optimizer
    ema = WeightAverage(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
    if ema and state and "train_model" in state:
        load_model_weights(ema.model, state, run_dir / "ckpt_last.pth")
        ema.updates = state.get("ema_updates", step)
    eval_model = ema.model if ema else model  # what validation, the sample grids and ckpt_best see
    eval_amp = amp_dtype(device, cfg.test.amp)  # validation as the evaluation: fp32 unless test.amp says
    log.info("model %s: %.2f M parameters; %d train / %d valid subjects",
             type(model).__name__, sum(p.numel() for p in model.parameters()) / 1e6, len(train_rows),
             len(valid_rows))
    if state:
        load_optimizer_state(optimizer, state["optimizer"])
        in_epoch = state.get("in_epoch", step - epoch * steps_per_epoch)  # older checkpoints: constant epochs
        before = state.get("steps_per_epoch")  # None in older checkpoints
        if in_epoch and (before not in (None, steps_per_epoch) or not 0 < in_epoch <= steps_per_epoch):
            log.warning("the run had %s steps per epoch and now has %d (batch size, processes or usable "
                        "subjects changed): epoch %d restarts from its first batch", before or "other",
                        steps_per_epoch, epoch)
            in_epoch = 0
        set_rng_state(state["rng"])
        log.info("resumed at epoch %d, step %d (best PSNR %.2f)", epoch, step, best)
    if ddp.enabled:
        torch.manual_seed(cfg.seed + 1000 * ddp.rank + step)  # each rank its own augmentation draws

    def checkpoint(name: str, finished: bool = False) -> None:
        if main_rank:
            weights = {"model": eval_model.state_dict()}
            if ema:
                weights.update(train_model=model.state_dict(), ema_updates=ema.updates)
            save_checkpoint({**weights, "intensity_reference": reference, "optimizer": optimizer.state_dict(), "epoch": epoch,
                             "step": step, "in_epoch": in_epoch, "steps_per_epoch": steps_per_epoch,
                             "best_psnr": best, "rng": rng_state(), "finished": finished,
                             "config": cfg.to_dict()}, run_dir / name)

    if step >= cfg.train.max_steps or epoch >= cfg.train.epochs:
        log.info("run already finished (epoch %d, step %d); nothing to do", epoch, step)
        return 0

    # --- outputs: rank 0 only ---
    writer = log_file = log_csv = None
    log_path = run_dir / "log.csv"
    if main_rank:
        from torch.utils.tensorboard import SummaryWriter  # imported late: slow import
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        # resumed after a hard kill: drop what was logged past the checkpoint, it is logged again
        writer = SummaryWriter(run_dir / "tensorboard", purge_step=step + 1 if args.resume else None)
        if args.resume and log_path.exists():
            drop_rows_after(log_path, step)
        new_log = not log_path.exists()
        columns = LOG_COLUMNS
        if not new_log:  # a resumed run keeps its columns
            with log_path.open() as f:
                columns = f.readline().strip().split(",")
        log_file = log_path.open("a", newline="")
        log_csv = csv.DictWriter(log_file, columns, extrasaction="ignore")
        if new_log:
            log_csv.writeheader()

    started = time.perf_counter()

    def record(row: dict, scalars: dict[str, float] | None = None) -> None:
        if main_rank:  # elapsed_s: wall seconds of this process's training (since the resume, if resumed)
            log_csv.writerow({**row, "elapsed_s": round(time.perf_counter() - started, 1)})
            for key, value in (scalars or {}).items():
                writer.add_scalar(key, value, step)

    stop_requested: list[str] = []

    def on_signal(signum, frame):  # finish the current step, then save and stop: never a half-applied update
        stop_requested.append(signal.Signals(signum).name)

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    t = cfg.train

    def next_due(step: int) -> int:
        """The next step count at which the loop needs the exact count: a log row, a checkpoint, the end."""
        due = [t.max_steps, 1 if step == 0 else (step // t.log_every + 1) * t.log_every]
        if t.ckpt_every_steps:
            due.append((step // t.ckpt_every_steps + 1) * t.ckpt_every_steps)
        return min(due)

    model.train()
    try:
        while epoch < t.epochs and step < t.max_steps:
            lr = poly_lr(cfg, epoch)
            set_lr(optimizer, lr)
            phase = Phase.at(cfg, epoch)
            loader.sampler.set_epoch(epoch, start=in_epoch)  # > 0 only when resumed mid-epoch
            bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True, disable=not main_rank)
            # Steps are queued without waiting for the device; the count is read (one sync) only where
            # the loop needs it. `queued` steps since the last read: the count is at most step + queued
            # (a degenerate batch is not counted), so a read at `due` never overshoots an event.
            due, queued, tic, tic_step = next_due(step), 0, time.perf_counter(), step
            for batch in bar:
                batch = {key: batch[key].to(device, non_blocking=True) for key in ("src", "tgt", "src_idx", "tgt_idx")}
                if t.channels_last:
                    batch.update({key: batch[key].contiguous(memory_format=torch.channels_last)
                                  for key in ("src", "tgt")})
                if t.warmup_steps and step + queued <= t.warmup_steps:
                    set_lr(optimizer, lr * warmup_factor(cfg, step + queued))
                model.bypass_quantizer = step + queued < t.quantizer_warmup
                train_step(run, batch, phase)
                if ema:
                    ema.update(model)
                in_epoch, queued = in_epoch + 1, queued + 1
                if step + queued < due and not stop_requested:
                    continue
                step, skipped, stats = read_stats(run)
                queued = 0
                if step == due:
                    toc = time.perf_counter()
                    stats["slices_per_s"] = (step - tic_step) * t.batch_size * ddp.world_size / max(toc - tic, 1e-9)
                    stats["skipped"] = skipped
                    tic, tic_step = toc, step
                    bar.set_postfix(step=step, loss=f"{stats['loss']:.3f}", l1=f"{stats['l1']:.3f}",
                                    sps=f"{stats['slices_per_s']:.1f}")
                    if step % t.log_every == 0 or step == 1:
                        record({"step": step, "epoch": epoch, "lr": lr * warmup_factor(cfg, step - 1), **stats},
                               {f"train/{k}": v for k, v in stats.items()})
                    if t.ckpt_every_steps and step % t.ckpt_every_steps == 0:
                        checkpoint("ckpt_last.pth")
                    due = next_due(step)
                if stop_requested:
                    raise Stop(stop_requested[0])
                if step >= t.max_steps:
                    break
            else:
                epoch, in_epoch = epoch + 1, 0
            step = read_stats(run)[0]
            finished = epoch >= cfg.train.epochs or step >= cfg.train.max_steps
            epoch_done = in_epoch == 0
            if (epoch_done and (epoch % cfg.train.val_every == 0 or finished)) or (finished and cfg.train.val_at_end):
                total, brain, count = sum_across(ddp, *validate(eval_model, my_valid, device, cfg.test.batch_size,
                                                                eval_amp, identity=cfg.train.val_identity))
                psnr, psnr_brain = total / max(count, 1), brain / max(count, 1)
                gap_sum, gap_count = sum_across(ddp, *latent_gap(eval_model, my_valid, device, cfg.test.batch_size))
                gap = gap_sum / gap_count if gap_count else float("nan")
                record({"step": step, "epoch": epoch, "lr": lr, "val_psnr": psnr, "val_psnr_brain": psnr_brain,
                        "val_latent_gap": gap},
                       {"valid/psnr": psnr, "valid/psnr_brain": psnr_brain, "valid/latent_gap": gap})
                log.info("epoch %d step %d: valid PSNR %.2f dB (brain %.2f dB) over %d pairs; latent gap %.3f", epoch,
                         step, psnr, psnr_brain, count, gap)
                if psnr > best and not model.bypass_quantizer:  # a bypassing model is not the method
                    best = psnr
                    checkpoint("ckpt_best.pth")
                if main_rank:
                    grid = sample_grid_for(eval_model, valid, cache, device, eval_amp, f"epoch {epoch}, step {step}")
                    save_png(grid, run_dir / "samples" / f"epoch_{epoch:04d}.png")
                    writer.add_image("valid/samples", grid, step, dataformats="HWC")
            checkpoint("ckpt_last.pth", finished=finished)
            if epoch_done and t.keep_every_epochs and epoch % t.keep_every_epochs == 0:
                checkpoint(f"ckpt_epoch_{epoch:04d}.pth", finished=finished)
            if main_rank:
                log_file.flush()
                plot_progress(log_path, run_dir / "progress.png")
    except Stop as reason:
        log.warning("%s received: saving ckpt_last.pth at step %d and stopping", reason, step)
        checkpoint("ckpt_last.pth")
        return 130
    finally:
        for s, handler in old_handlers.items():
            signal.signal(s, handler)
        if main_rank:
            log_file.close()
            writer.close()
    if ddp.enabled:
        in_sync = replicas_in_sync(ddp, model)
        log.log(logging.INFO if in_sync else logging.ERROR, "model weights identical on all %d ranks: %s",
                ddp.world_size, in_sync)
    if main_rank and not (run_dir / "ckpt_best.pth").exists():
        checkpoint("ckpt_best.pth")
    log.info("done: %d steps, best valid PSNR %.2f dB; checkpoints in %s", step, best, run_dir)
    return 0


def drop_rows_after(log_path: Path, step: int) -> None:
    """Keep the log.csv rows up to `step` (rewritten atomically)."""
    with log_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    kept = [row for row in rows if int(row["step"]) <= step]
    if len(kept) < len(rows):
        text = io.StringIO()
        out = csv.DictWriter(text, LOG_COLUMNS, extrasaction="ignore")
        out.writeheader()
        out.writerows(kept)
        write_atomic(log_path, lambda f: f.write(text.getvalue().encode()))
        log.info("log.csv: dropped %d rows logged after step %d, the checkpoint's", len(rows) - len(kept), step)


@torch.no_grad()
def sample_grid_for(model, valid, cache, device, amp, title):
    """Centre slice of the first valid subject: the real images of all four sequences (valid
    subjects are checked for all four, whatever their availability code) and the translations
    of every available source to all four."""
    name, seqs = next(iter(valid.items()))
    n = next(iter(seqs.values())).shape[0]
    mid = n // 2
    truth = {s: load_eval_stack(cache, name, s, n)[mid, 0].numpy() for s in range(N_SEQ)}
    translations = {}
    for s, stack in seqs.items():
        src = stack[mid:mid + 1].to(device)
        translations[s] = {t: translate(model, src, t, 1, amp)[0, 0].cpu().numpy() for t in range(N_SEQ)}
    return sample_grid(truth, translations, f"{name}: {title}")


if __name__ == "__main__":
    sys.exit(main())
