"""Speed of the training step and of inference, against the device's own peak (`tools/benchmark.py`).

One timed loop (`timed`) serves every measurement: the training script's own step (`build_training`,
`train_step`, `read_stats`), a mode being a set of train.* overrides (`TRAIN_MODES`), and `Translator`,
what evaluation and synthesis run. Batches are synthetic, so nothing waits for data: the training loop
logs its own wait (log.csv `data_wait_share`). FLOPs from `FlopCounterMode`, the peak from matmuls.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import resource
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from vq.config import Config
from vq.evaluation import Translator
from vq.losses import PerceptualLoss, perceptual_loss_for
from vq.models import build_model
from vq.runtime import cpu_name, seed_everything
from vq.sequences import TRAIN_PAIRS
from vq.speed import to_channels_last
from vq.training import Phase, build_training, read_stats, resolve_sync_free, to_device, train_step

log = logging.getLogger(__name__)

TRAIN_MODES = {"eager": {}, "eager_sync_free": {"sync_free": True},
               "compiled": {"compile": True, "sync_free": True},
               "compiled_host_grouped": {"compile": True, "sync_free": False},
               "graphed": {"cuda_graph": True, "sync_free": True}}
"""The training step's modes as train.* overrides: eager as the config runs (sync_free auto: off on a CPU),
sync-free, compiled, compiled grouping by code on the host, from a CUDA graph. Inference: eager, compiled."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def full_recipe(cfg: Config) -> Phase:
    """The phase of the first epoch at which every term of the recipe the config switches on is active."""
    return Phase.at(cfg, max(cfg.train.pretrain_epochs_contrast, cfg.train.pretrain_epochs_rand) + 1)


def synthetic_batch(cfg: Config, batch: int, device: torch.device, seed: int = 0, crop: int | None = None) -> dict:
    """A training batch without data: (B,1,crop,crop) images in [-1, 1] and neighbouring pairs (either
    way round); crop defaults to data.crop. Each image is a smoothly textured ellipse (about 60 % of the
    crop, like a brain slice) on the -1 background, so the foreground-dependent terms do their work."""
    gen = torch.Generator().manual_seed(seed)
    crop = crop or cfg.data.crop
    axis = torch.linspace(-1, 1, crop)
    inside = (axis[:, None] / 0.75) ** 2 + (axis[None, :] / 0.9) ** 2 < 1  # (crop, crop)
    texture = F.interpolate(torch.rand(2 * batch, 1, 12, 12, generator=gen), size=(crop, crop),
                            mode="bilinear", align_corners=False)  # (2B, 1, crop, crop) in [0, 1]
    images = torch.where(inside, texture * 1.6 - 0.8, torch.tensor(-1.0))
    pairs = torch.tensor(TRAIN_PAIRS)[torch.randint(len(TRAIN_PAIRS), (batch,), generator=gen)]  # (B, 2)
    pairs = torch.where((torch.rand(batch, generator=gen) < 0.5)[:, None], pairs.flip(1), pairs)
    src, tgt = images.to(device).chunk(2)
    return {"src": src, "tgt": tgt, "src_idx": pairs[:, 0].to(device), "tgt_idx": pairs[:, 1].to(device)}


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """Yields a dict whose "mb" is, after the block, its peak memory in MB. CUDA: `max_memory_allocated`
    (tensors and weights). CPU: the process's peak resident set, runtime included (VmHWM, reset through
    /proc/self/clear_refs), or where there is no /proc the lifetime `ru_maxrss`."""
    sync(device)
    result = {"mb": float("nan")}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: the peak resident set restarts from the current one
    yield result
    sync(device)
    if device.type == "cuda":
        result["mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        return
    try:
        with open("/proc/self/status") as f:
            result["mb"] = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except OSError:
        result["mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def timed(call, batch: int, steps: int, warmup: int, wait, device: torch.device) -> dict[str, float]:
    """Time `call()`: the first call alone (compilation or capture included), `warmup` more (a compiled step
    may compile again there, after the k-means codebook initialisation of its first call), then `steps`
    calls, whose peak memory is taken; `wait()` waits for the device. setup_s is the wall time beyond what
    all calls would take at the steady rate."""
    tic = time.perf_counter()
    call()
    wait()
    first = time.perf_counter() - tic
    for _ in range(warmup):
        call()
    wait()
    warm = time.perf_counter() - tic - first
    with peak_memory(device) as memory:
        tic = time.perf_counter()
        for _ in range(steps):
            call()
        wait()
        seconds = time.perf_counter() - tic
    calls, total = 1 + warmup + steps, first + warm + seconds
    return {"slices_per_s": steps * batch / seconds, "slices_per_s_incl_setup": calls * batch / total,
            "first_call_s": first, "setup_s": max(total - calls * seconds / steps, 0.0), "peak_mem_mb": memory["mb"]}


def train_call(cfg: Config, device: torch.device, amp: torch.dtype | None, mode: str, batch: int,
               perceptual: PerceptualLoss | None):
    """The full-recipe training step of `mode` on a synthetic batch (`batch` slices at data.training_crop)
    as a call, and the call that waits for it (reads the statistics, synchronises the device)."""
    switches = {"compile": False, "cuda_graph": False, "batch_size": batch, **TRAIN_MODES[mode]}
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **switches))
    torch._dynamo.reset()  # compile from scratch: the setup time is part of the result
    run = build_training(cfg, device, perceptual=perceptual, amp=amp)
    data, phase = synthetic_batch(cfg, batch, device, crop=cfg.data.training_crop), full_recipe(cfg)
    data = to_device(data, device, cfg.train.channels_last)
    return (lambda: train_step(run, data, phase)), (lambda: (read_stats(run), sync(device)))


def infer_call(cfg: Config, device: torch.device, amp: torch.dtype | None, mode: str, batch: int, perceptual=None):
    """Inference through `Translator` (encode + decode to one target) of a synthetic batch at data.crop, as
    a call, and the call that waits for the device; `perceptual` is not used (`train_call`'s signature)."""
    seed_everything(cfg.seed)
    torch._dynamo.reset()  # compiles from scratch, as in `train_call`
    model = build_model(cfg.model).to(device).eval()
    images = synthetic_batch(cfg, batch, device)["src"]
    if cfg.train.channels_last:  # as the training step (`build_training`, `to_device`)
        model, images = to_channels_last(model), images.contiguous(memory_format=torch.channels_last)
    translator = Translator(model, device, amp, batch, compile=mode == "compiled")
    return functools.partial(translator.translate, images, [0, 2]), functools.partial(sync, device)


def count_flops(cfg: Config, device: torch.device, perceptual: PerceptualLoss | None) -> dict[str, float]:
    """Model FLOPs per slice: {"infer": encode + decode at data.crop, "train": forward + backward of the full
    recipe at data.training_crop}. The step's domain augmentation (a no-grad translation of each source with
    p = 0.5) is counted at its expected rate: the sources a hook saw translated are replaced by B/2
    translations. The optimizer step is elementwise: FlopCounterMode counts matmuls and convolutions."""
    run = build_training(cfg, device, perceptual=perceptual)
    model, batch_size, crop = run.model, cfg.train.batch_size, cfg.data.training_crop

    def translation_flops(size: int) -> int:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(synthetic_batch(cfg, 1, device, crop=size)["src"], 0, 2)
        return counter.get_total_flops()

    batch, phase, augmented = synthetic_batch(cfg, batch_size, device, crop=crop), full_recipe(cfg), []
    hook = model.register_forward_hook(lambda module, args, out: augmented.append(len(args[0])))
    with FlopCounterMode(display=False) as counter:
        loss, _, _ = run.recipe(batch["src"], batch["tgt"], batch["src_idx"], batch["tgt_idx"], phase)
        loss.backward()
    hook.remove()
    expected = batch_size / 2 if phase.domain_aug else 0
    train = counter.get_total_flops() + (expected - sum(augmented)) * translation_flops(crop)
    return {"train": train / batch_size, "infer": float(translation_flops(cfg.data.crop))}


def peak_tflops(device: torch.device, dtype: torch.dtype, n: int = 4096, repeats: int = 3) -> float:
    """The device's matmul peak in TFLOP/s: the fastest of `repeats` n x n x n matmuls after one warm-up."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    fastest = float("inf")
    for i in range(repeats + 1):
        sync(device)
        tic = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        fastest = min(fastest, time.perf_counter() - tic) if i else fastest
    return 2 * n**3 / fastest / 1e12


def machine(device: torch.device) -> dict[str, str | int]:
    """What a record ran on: device (with its GPU's name), CPU, torch, threads."""
    name = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)
    return {"device": name, "cpu": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def measure(cfg: Config, name: str, device: torch.device, precisions: dict[str, torch.dtype | None],
            modes: list[str], batches: list[int] | None, steps: int, warmup: int, peak_size: int) -> dict:
    """A config's record: FLOPs per slice, the peak of each precision, and a row per task, precision, batch
    (None: train.batch_size and test.batch_size) and mode; utilisation against the precision's peak.
    Modes that cannot run here, or would repeat eager and compiled, are left out with a note."""
    perceptual = perceptual_loss_for(cfg, device, untrained_if_missing=True)
    notes = [] if perceptual is None or perceptual.pretrained else ["untrained VGG19: no ImageNet weights file"]
    skipped = {"graphed": f"CUDA graphs need CUDA (this is {device})"} if device.type != "cuda" else {}
    if resolve_sync_free(cfg.train, device):
        skipped |= {m: "timed only where eager groups by code on the host (train.sync_free off)"
                    for m in ("eager_sync_free", "compiled_host_grouped")}
    notes += [f"{m}: skipped, {why}" for m, why in skipped.items() if m in modes]
    train_modes = [m for m in modes if m not in skipped]
    infer_modes = [m for m in train_modes if m in ("eager", "compiled")]
    flops = count_flops(cfg, device, perceptual)
    peaks = {label: peak_tflops(device, dtype or torch.float32, peak_size) for label, dtype in precisions.items()}
    rows = []
    for label, amp in precisions.items():
        for task, make, modes_of, default in (("train", train_call, train_modes, cfg.train.batch_size),
                                              ("infer", infer_call, infer_modes, cfg.test.batch_size)):
            for batch in batches or [default]:
                for mode in modes_of:
                    log.info("%s, %s, batch %d, %s", task, label, batch, mode)
                    call, wait = make(cfg, device, amp, mode, batch, perceptual)
                    row = timed(call, batch, steps, warmup, wait, device)
                    row["utilisation"] = row["slices_per_s"] * flops[task] / (peaks[label] * 1e12)
                    rows.append({"task": task, "precision": label, "batch": batch, "mode": mode, **row})
    return {"config": name, **machine(device), "steps": steps, "warmup": warmup, "peak_tflops": peaks,
            "flops_per_slice": flops, "notes": notes, "rows": rows}


def profile(cfg: Config, device: torch.device, amp: torch.dtype | None, mode: str, steps: int, warmup: int,
            rows: int = 30) -> str:
    """Where the training step of `mode` spends its time: `torch.profiler` over `steps` steps after the first
    call and `warmup` more (compilation, capture), the `rows` operators with the most self time (host time
    on a CPU, device time on CUDA). A compiled graph is one row; the convolutions it calls have their own."""
    call, wait = train_call(cfg, device, amp, mode, cfg.train.batch_size,
                            perceptual_loss_for(cfg, device, untrained_if_missing=True))
    for _ in range(1 + warmup):
        call()
    wait()
    with torch.profiler.profile() as prof:  # host activity, and the GPU's where there is one
        for _ in range(steps):
            call()
        wait()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)


def table(records: list[dict]) -> str:
    """Records of `measure` as markdown: a line on the machine, a row per measurement, the notes."""
    m = records[0]
    lines = [f"{m['device']} | {m['cpu']} | torch {m['torch']}, {m['threads']} threads | --steps {m['steps']} "
             f"--warmup {m['warmup']}", ""]
    for r in records:
        peaks = ", ".join(f"{k} {v:.3f}" for k, v in r["peak_tflops"].items())
        flops = r["flops_per_slice"]
        lines.append(f"{r['config']}: peak (matmul) {peaks} TFLOP/s; model FLOPs per slice train "
                     f"{flops['train'] / 1e9:.2f} G, infer {flops['infer'] / 1e9:.2f} G")
    lines += ["", "| config | task | precision | batch | mode | slices/s | incl. setup | first call (s) | "
              "setup (s) | peak MB | util. |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        for x in r["rows"]:
            lines.append(f"| {r['config']} | {x['task']} | {x['precision']} | {x['batch']} | {x['mode']} | "
                         f"{x['slices_per_s']:.3f} | {x['slices_per_s_incl_setup']:.3f} | {x['first_call_s']:.1f} | "
                         f"{x['setup_s']:.1f} | {x['peak_mem_mb']:.0f} | {100 * x['utilisation']:.1f} % |")
    return "\n".join(lines + [""] + [f"note ({r['config']}): {n}" for r in records for n in r["notes"]])
