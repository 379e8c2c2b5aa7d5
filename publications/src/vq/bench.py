"""Speed of the training step and of inference, measured against the device's own peak.

The pieces of `vq/tools/benchmark.py`, importable so that tests run them:

- `time_train` / `time_infer`: slices/s and peak memory of the full training step
  (the `Recipe` at a phase with contrast, sampling and domain augmentation on,
  plus the optimizer step) and of inference (encode + decode a batch), in fp32
  or under mixed-precision autocast.
- `count_flops`: model FLOPs per slice of both, with `FlopCounterMode`.
- `peak_tflops`: the device's measured peak, best of a few n x n x n matmuls.
- `reference_step_rate`: the reference's way to train, fp32 and batch 1, each
  step reading the subject's gzipped NIfTI volumes and normalising them.
- `data_wait_share`: share of a real training loop spent waiting for the DataLoader.

Timed steps run on a synthetic brain-like batch (a textured ellipse on the -1
background) so that they need no data; only the reference mode and the data loop
read the data of the config. The training step is the training script's own
(`vq.training.build_training` and `train_step`).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import resource
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from vq.config import Config, resolve_path
from vq.dataloader.brats import SliceCache, load_subject
from vq.dataloader.datasets import make_train_loader, train_sequences
from vq.dataloader.lists import read_list
from vq.dataloader.preprocess import pad_or_crop
from vq.evaluation import Translator
from vq.losses import PerceptualLoss
from vq.models import build_model
from vq.runtime import autocast, capture_cuda_graph, cpu_name, seed_everything, to_channels_last
from vq.sequences import TRAIN_PAIRS
from vq.training import Phase, build_training, read_stats, resolve_sync_free, to_device, train_step
from vq.weights import MissingWeightsError

log = logging.getLogger(__name__)


@dataclass
class Speed:
    slices_per_s: float
    peak_mem_mb: float


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def full_recipe(cfg: Config) -> Phase:
    """The phase of the first epoch at which every term of the recipe the config switches on is active."""
    return Phase.at(cfg, max(cfg.train.pretrain_epochs_contrast, cfg.train.pretrain_epochs_rand) + 1)


def perceptual_for(cfg: Config, device: torch.device) -> tuple[PerceptualLoss | None, str]:
    """The perceptual network of the config and a note on its weights.

    Without the VGG19 ImageNet file, an untrained VGG19 of the same shape: it costs
    the same time and FLOPs, which is all a benchmark needs.
    """
    if cfg.train.lambda_per <= 0:
        return None, "perceptual loss off (train.lambda_per=0)"
    try:
        return PerceptualLoss(weights_path=cfg.train.vgg_weights).to(device), "VGG19 ImageNet weights"
    except MissingWeightsError as err:
        log.warning("%s", err)
        return (PerceptualLoss(pretrained=False, allow_random=True).to(device),
                "VGG19 ImageNet weights not found: perceptual loss timed with an untrained VGG19 of the same shape")


def synthetic_batch(cfg: Config, batch: int, device: torch.device, seed: int = 0, crop: int | None = None) -> dict:
    """A training batch without data: (B,1,crop,crop) images in [-1, 1] and neighbouring pairs.
    `crop` defaults to data.crop (evaluation's size); training passes `data.training_crop`.

    Each image is a smoothly textured ellipse (about 60% of the crop, like a brain
    slice) on the -1 background, so the foreground-dependent terms (consistency,
    contrastive, augmentation) do their usual work.
    """
    gen = torch.Generator().manual_seed(seed)
    crop = crop or cfg.data.crop
    axis = torch.linspace(-1, 1, crop)
    inside = (axis[:, None] / 0.75) ** 2 + (axis[None, :] / 0.9) ** 2 < 1  # (crop, crop)
    texture = F.interpolate(torch.rand(2 * batch, 1, 12, 12, generator=gen), size=(crop, crop),
                            mode="bilinear", align_corners=False)  # (2B, 1, crop, crop) in [0, 1]
    images = torch.where(inside, texture * 1.6 - 0.8, torch.tensor(-1.0))
    pairs = torch.tensor(TRAIN_PAIRS)[torch.randint(len(TRAIN_PAIRS), (batch,), generator=gen)]  # (B, 2)
    swap = torch.rand(batch, generator=gen) < 0.5  # either sequence of a pair may be the source
    pairs = torch.where(swap[:, None], pairs.flip(1), pairs)
    src, tgt = images.to(device).chunk(2)
    return {"src": src, "tgt": tgt, "src_idx": pairs[:, 0].to(device), "tgt_idx": pairs[:, 1].to(device)}


def _memory_format(cfg: Config) -> torch.memory_format:
    return torch.channels_last if cfg.train.channels_last else torch.contiguous_format


def training_batch(cfg: Config, device: torch.device) -> dict:
    """`synthetic_batch` as the training step gets it: train.batch_size at data.training_crop, in the
    configured memory format."""
    return to_device(synthetic_batch(cfg, cfg.train.batch_size, device, crop=cfg.data.training_crop), device,
                     cfg.train.channels_last)


# ----------------------------------------------------------------------------- memory
def _vm_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak memory while a block runs, in MB.

    CUDA: `torch.cuda.max_memory_allocated` (tensors on the device, weights
    included). CPU: the process's peak resident set (VmHWM, reset through
    /proc/self/clear_refs when the block starts), so it includes the Python and
    torch runtime (a few hundred MB); where VmHWM cannot be reset, the
    process-lifetime `ru_maxrss`.
    """

    def __init__(self, device: torch.device):
        self.device, self.mb = device, float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
            self.resettable = True
        except OSError:
            self.resettable = False
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.resettable:
            peak = _vm_kb("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KB on Linux
        self.mb = peak / 2**20
        return False


# ----------------------------------------------------------------------------- timing
def time_train(cfg: Config, device: torch.device, amp: torch.dtype | None, perceptual: PerceptualLoss | None,
               steps: int, warmup: int) -> Speed:
    """Full training steps (`vq.training.train_step`: recipe, backward, AdamW) at the config's training
    crop and train.batch_size, set up by `build_training` as the training script does (train.compile included)."""
    run = build_training(cfg, device, perceptual=perceptual, amp=amp)
    batch, phase = training_batch(cfg, device), full_recipe(cfg)
    for _ in range(warmup):
        train_step(run, batch, phase)
    read_stats(run)
    with PeakMemory(device) as mem:
        sync(device)
        tic = time.perf_counter()
        for _ in range(steps):
            train_step(run, batch, phase)
        read_stats(run)
        sync(device)
        seconds = time.perf_counter() - tic
    return Speed(steps * cfg.train.batch_size / seconds, mem.mb)


def time_infer(cfg: Config, device: torch.device, amp: torch.dtype | None, steps: int, warmup: int) -> Speed:
    """Encode + decode of one test.batch_size batch (one target for the batch, as in evaluation)."""
    seed_everything(cfg.seed)
    model = build_model(cfg.model).to(device)
    if cfg.train.channels_last:
        to_channels_last(model)
    translator = Translator(model, device, amp, cfg.test.batch_size)
    stack = synthetic_batch(cfg, cfg.test.batch_size, device)["src"].contiguous(memory_format=_memory_format(cfg))
    for _ in range(warmup):
        translator.translate(stack, [0, 2])
    with PeakMemory(device) as mem:
        sync(device)
        tic = time.perf_counter()
        for _ in range(steps):
            translator.translate(stack, [0, 2])
        sync(device)
        seconds = time.perf_counter() - tic
    return Speed(steps * len(stack) / seconds, mem.mb)


def count_flops(cfg: Config, device: torch.device, perceptual: PerceptualLoss | None) -> dict[str, float]:
    """Model FLOPs per slice: {"infer": encode + decode, "train": forward + backward of the full recipe}.

    The training step is counted once; its domain augmentation (a no-grad
    translation of each source with p = 0.5, docs/method.md step 4) is counted at its
    expected rate: the counted step's actual number of augmented sources (seen
    by a hook on the model's own forward, which only the augmentation calls) is
    replaced by B/2 translations at the inference cost (at the training crop). The optimizer
    step is elementwise and not counted, as FlopCounterMode counts matmuls and convs.
    """
    run = build_training(cfg, device, perceptual=perceptual)
    model = run.model

    def translation_flops(crop: int) -> int:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(synthetic_batch(cfg, 1, device, crop=crop)["src"], 0)
        return counter.get_total_flops()

    batch_size, crop = cfg.train.batch_size, cfg.data.training_crop
    batch = synthetic_batch(cfg, batch_size, device, crop=crop)
    augmented: list[int] = []
    hook = model.register_forward_hook(lambda module, args, out: augmented.append(len(args[0])))
    phase = full_recipe(cfg)
    with FlopCounterMode(display=False) as counter:
        loss, _, _ = run.recipe(batch["src"], batch["tgt"], batch["src_idx"], batch["tgt_idx"], phase)
        loss.backward()
    hook.remove()
    expected = batch_size / 2 if phase.domain_aug else 0
    train = counter.get_total_flops() + (expected - sum(augmented)) * translation_flops(crop)
    return {"train": train / batch_size, "infer": float(translation_flops(cfg.data.crop))}


def peak_tflops(device: torch.device, dtype: torch.dtype, n: int = 4096, repeats: int = 3,
                budget_s: float = 2.0) -> float:
    """The device's matmul peak in TFLOP/s (2 n^3 FLOPs per n x n x n matmul).

    Best of `repeats` timed matmuls (after one warm-up) at the largest size up to `n`,
    growing from 1024 by doubling while one matmul stays under `budget_s`: on
    hardware without native support for `dtype` (bf16 on an AVX2 CPU runs about
    100x slower than fp32) a 4096^3 matmul would take minutes and measure nothing new.
    """
    size, best = min(n, 1024), 0.0
    while True:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        fastest = float("inf")
        for i in range(repeats + 1):
            sync(device)
            tic = time.perf_counter()
            torch.mm(a, b)
            sync(device)
            if i:  # the first one warms up
                fastest = min(fastest, time.perf_counter() - tic)
            elif time.perf_counter() - tic > budget_s:
                repeats = 1  # slow hardware path: one timed run is enough
        best = max(best, 2 * size**3 / fastest / 1e12)
        if size >= n or 8 * fastest > budget_s:
            return best
        size = min(2 * size, n)


# ----------------------------------------------------------------------------- data
def data_rows(cfg: Config, split: str) -> list[tuple[str, int]] | None:
    """Subjects of a split of the config's BraTS-layout data; None (and a warning) when there is none."""
    root, path = resolve_path(cfg.data.root), cfg.lists_dir / f"{split}.csv"
    if not root.is_dir():
        log.warning("data root %s not found (data.root=%s); set --set data.root=... to a BraTS-layout folder",
                    root, cfg.data.root)
        return None
    if not path.is_file():
        log.warning("data list %s not found; make it with make_data_list.py or set data.lists=...", path)
        return None
    return read_list(path)


def reference_step_rate(cfg: Config, device: torch.device, perceptual: PerceptualLoss | None,
                        steps: int, warmup: int) -> float | None:
    """Slices/s of the reference's way to train: fp32, batch 1, every step reading NIfTI.

    Each step, in turn and without loader workers, loads the subject's two
    training volumes (gzipped NIfTI, nibabel), normalises them, takes one random
    slice pair and crop, and runs the full training step. None when the config
    has no data (warned).
    """
    rows = data_rows(cfg, "train")
    if rows is None:
        return None
    root, data = resolve_path(cfg.data.root), cfg.data
    run = build_training(cfg, device, perceptual=perceptual)
    rng = np.random.default_rng(cfg.seed)
    phase = full_recipe(cfg)

    def step(k: int) -> None:
        name, code = rows[k % len(rows)]
        pair = [int(i) for i in rng.choice(train_sequences(code, data.missing), size=2, replace=False)]
        volumes = load_subject(root, name, pair, data.percentile, data.n_slices)  # (2, X, Y, n_slices)
        index = int(rng.integers(volumes.shape[-1]))
        start = tuple(int(rng.integers(max(n - data.crop, 0) + 1)) for n in volumes.shape[1:3])
        images = pad_or_crop(volumes[..., index], data.crop, start)  # (2, crop, crop)
        src, tgt = torch.from_numpy(np.ascontiguousarray(images)).to(device)[:, None].chunk(2)  # (1,1,crop,crop)
        batch = {"src": src, "tgt": tgt, "src_idx": torch.tensor(pair[:1], device=device),
                 "tgt_idx": torch.tensor(pair[1:], device=device)}
        train_step(run, batch, phase)
        read_stats(run)  # the reference reads its losses every step

    for k in range(warmup):
        step(k)
    sync(device)
    tic = time.perf_counter()
    for k in range(warmup, warmup + steps):
        step(k)
    sync(device)
    return steps / (time.perf_counter() - tic)


def loader_batches(loader):
    """Batches of the training loader over consecutive epochs, as the training loop draws them."""
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def data_wait_share(cfg: Config, device: torch.device, amp: torch.dtype | None,
                    perceptual: PerceptualLoss | None, steps: int, warmup: int) -> float | None:
    """Share of a real training loop's time spent in `next()` on the DataLoader (slice cache).

    A few training subjects only (enough for the loop), so that the slice cache
    builds quickly; the loader itself is the training script's, with its workers.
    Each epoch is made at least 8 batches long (more slice pairs per subject), as
    a full training list's epochs are: a few subjects' one-batch epochs would time
    the workers' restart at every epoch boundary instead of the steady state.
    None when the config has no data (warned).
    """
    rows = data_rows(cfg, "train")
    if rows is None:
        return None
    rows = rows[:max(4, cfg.train.batch_size)]
    per_subject = max(cfg.data.slices_per_subject, math.ceil(8 * cfg.train.batch_size / len(rows)))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, slices_per_subject=per_subject))
    cache = SliceCache(resolve_path(cfg.data.cache_dir), resolve_path(cfg.data.root), cfg.data)
    loader = make_train_loader(cfg, cache, rows, seed=cfg.seed)
    run = build_training(cfg, device, perceptual=perceptual, amp=amp)
    phase, batches = full_recipe(cfg), loader_batches(loader)
    waited = total = 0.0
    for k in range(warmup + steps):
        tic = time.perf_counter()
        batch = next(batches)
        batch = {key: value.to(device, non_blocking=True) for key, value in batch.items() if key != "name"}
        batch.update({k: batch[k].contiguous(memory_format=_memory_format(cfg)) for k in ("src", "tgt")})
        got = time.perf_counter()
        train_step(run, batch, phase)
        read_stats(run)
        if k >= warmup:  # the first batches include starting the workers
            waited += got - tic
            total += time.perf_counter() - tic
    return waited / total


# ----------------------------------------------------------------------------- eager, compiled, CUDA graph
MODES = ("eager", "compiled", "graphed")
"""How inference runs: as written, through torch.compile (fullgraph), replayed from a CUDA graph."""


def _timed(call, batch: int, steps: int, warmup: int, wait) -> dict[str, float]:
    """Time `call()`: the first call alone (compilation or capture included), `warmup` more (a compiled
    step may compile again there, e.g. after the k-means codebook initialisation of its first call),
    then `steps` calls; `wait()` waits for the device. Slices/s in steady state and over all calls;
    setup_s is the wall time beyond what all calls would take at the steady rate."""
    tic = time.perf_counter()
    call()
    wait()
    first = time.perf_counter() - tic
    tic = time.perf_counter()
    for _ in range(warmup):
        call()
    wait()
    warm = time.perf_counter() - tic
    tic = time.perf_counter()
    for _ in range(steps):
        call()
    wait()
    seconds = time.perf_counter() - tic
    calls, total = 1 + warmup + steps, first + warm + seconds
    return {"slices_per_s": steps * batch / seconds, "slices_per_s_incl_setup": calls * batch / total,
            "first_call_s": first, "setup_s": max(total - calls * seconds / steps, 0.0)}


TRAIN_MODES = {"eager": {}, "eager_sync_free": {"sync_free": True},
               "compiled": {"compile": True, "sync_free": True},
               "compiled_host_grouped": {"compile": True, "sync_free": False},
               "graphed": {"cuda_graph": True, "sync_free": True}}
"""The training step's variants (train.* switches over the config's): as the config runs eagerly
(train.sync_free auto: off on a CPU, on elsewhere), sync-free, compiled (sync-free), compiled with
the host's grouping by code (graph breaks at each decode), replayed from a CUDA graph. The
sync-free and host-grouped variants are timed where the eager step is host-grouped (a CPU)."""


def train_modes(cfg: Config, device: torch.device) -> list[str]:
    """The `TRAIN_MODES` worth timing on this device: CUDA graphs need CUDA; "eager_sync_free" and
    "compiled_host_grouped" differ from "eager" and "compiled" only where eager is host-grouped."""
    modes = ["eager", "compiled"]
    if not resolve_sync_free(cfg.train, device):
        modes[1:1] = ["eager_sync_free"]
        modes.append("compiled_host_grouped")
    return modes + (["graphed"] if device.type == "cuda" else [])


def time_train_mode(cfg: Config, device: torch.device, amp: torch.dtype | None, perceptual: PerceptualLoss | None,
                    mode: str, steps: int, warmup: int) -> dict[str, float]:
    """The training step (`train_step`, full recipe) in one of `TRAIN_MODES`, at train.batch_size and
    data.training_crop."""
    step, wait = _mode_step(cfg, device, amp, perceptual, mode)
    return _timed(step, cfg.train.batch_size, steps, warmup, wait)


def _mode_step(cfg: Config, device: torch.device, amp: torch.dtype | None, perceptual: PerceptualLoss | None,
               mode: str):
    """The training step of `mode` on the benchmark's batch, as a call, and the call that waits for it
    (reads the statistics, synchronises the device)."""
    switches = {"compile": False, "cuda_graph": False, **TRAIN_MODES[mode]}
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **switches))
    torch._dynamo.reset()  # compile from scratch: the setup time is part of the result
    run = build_training(cfg, device, perceptual=perceptual, amp=amp)
    batch, phase = training_batch(cfg, device), full_recipe(cfg)
    return (lambda: train_step(run, batch, phase)), (lambda: (read_stats(run), sync(device)))


def profile_train_mode(cfg: Config, device: torch.device, amp: torch.dtype | None,
                       perceptual: PerceptualLoss | None, mode: str, steps: int, warmup: int,
                       rows: int = 30) -> str:
    """Where the training step of `mode` spends its time: `torch.profiler` over `steps` steps after the
    first call and `warmup` more (compilation, capture; a compiled step whose first call runs the
    k-means codebook initialisation compiles on its second), the `rows` operators with the most self
    time: host time on a CPU, device time on CUDA. A compiled graph is one row per graph
    ("CompiledFxGraph": its generated kernels and their wrapper); the operators it calls out to
    (convolutions, matmuls) have rows of their own."""
    if warmup < 1 and mode not in ("eager", "eager_sync_free"):
        log.warning("--warmup %d: the profiled steps of %s may include its compilation or capture", warmup, mode)
    step, wait = _mode_step(cfg, device, amp, perceptual, mode)
    for _ in range(1 + warmup):
        step()
    wait()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        wait()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)


@torch.no_grad()
def time_infer_mode(cfg: Config, device: torch.device, amp: torch.dtype | None, mode: str, batch: int,
                    steps: int, warmup: int) -> dict[str, float]:
    """Inference (encode + decode to one target) of a batch: eager and compiled through `Translator`
    (what evaluation and synthesis run; compiled is test.compile), or the model's forward replayed
    from a CUDA graph."""
    seed_everything(cfg.seed)
    torch._dynamo.reset()
    model = build_model(cfg.model).to(device).eval()
    images = synthetic_batch(cfg, batch, device)["src"]
    if mode == "graphed":
        code = model.target_code(2)  # (1, code_dim) on the device: nothing to copy inside a CUDA graph

        def translate():
            with autocast(device, amp):
                return model(images, code)

        call = capture_cuda_graph(translate).replay
    else:
        translator = Translator(model, device, amp, batch, compile=mode == "compiled")
        call = functools.partial(translator.translate, images, [0, 2])
    return _timed(call, batch, steps, warmup, lambda: sync(device))


def compare_modes(cfg: Config, config_name: str, device: torch.device, amp: torch.dtype | None,
                  batches: list[int] | None, steps: int, warmup: int) -> dict:
    """Training slices/s in each of `train_modes` and inference slices/s in each of `MODES`, at each
    of `batches` (None: train.batch_size for training, test.batch_size for inference, as the config
    runs). CUDA-graph rows need CUDA: skipped elsewhere, with a note in record["notes"], which also
    says what was substituted (e.g. an untrained VGG19)."""
    perceptual, note = perceptual_for(cfg, device)
    notes = [note]
    modes = MODES
    if device.type != "cuda":
        modes = MODES[:2]
        notes.append(f"graphed: skipped, CUDA graphs need a CUDA device (this is {device})")
    record = {"device": device_name(device), "cpu": cpu_name(), "config": config_name,
              "amp": amp_name(amp), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "steps": steps, "warmup": warmup, "notes": notes,
              "train": {}, "infer": {}}
    for batch in batches or [cfg.train.batch_size]:
        sized = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=batch))
        entry = record["train"][str(batch)] = {}
        for mode in train_modes(cfg, device):
            log.info("training step, batch %d, %s", batch, mode)
            entry[mode] = time_train_mode(sized, device, amp, perceptual, mode, steps, warmup)
    for batch in batches or [cfg.test.batch_size]:
        entry = record["infer"][str(batch)] = {}
        for mode in modes:
            log.info("inference, batch %d, %s", batch, mode)
            entry[mode] = time_infer_mode(cfg, device, amp, mode, batch, steps, warmup)
    return record


def modes_table(records: list[dict]) -> str:
    """The records of `compare_modes` as one markdown table."""
    lines = ["| config | task | batch | mode | slices/s | slices/s incl. setup | first call (s) | setup (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for record in records:
        for task in ("train", "infer"):
            for batch, modes in record[task].items():
                for mode, m in modes.items():
                    lines.append(f"| {record['config']} | {task} | {batch} | {mode} | {m['slices_per_s']:.3f} | "
                                 f"{m['slices_per_s_incl_setup']:.3f} | {m['first_call_s']:.1f} | {m['setup_s']:.1f} |")
    return "\n".join(lines)


def amp_name(amp: torch.dtype | None) -> str:
    """The precision a run trains in, as the tables print it: fp32, bfloat16 or float16."""
    return str(amp).replace("torch.", "") if amp else "fp32"


def device_name(device: torch.device) -> str:
    """The device as the records name it: "cpu", or "cuda:0 (NVIDIA H200)"."""
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def machine_line(device: torch.device, amp: torch.dtype | None) -> str:
    """The first line of a benchmark table: device, CPU, torch, threads and precision."""
    return (f"{device_name(device)} | {cpu_name()} | torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{amp_name(amp)}")


# ----------------------------------------------------------------------------- the whole benchmark
@dataclass
class Options:
    steps: int = 5
    warmup: int = 2
    skip_fp32: bool = False
    peak_size: int = 4096


def run(cfg: Config, config_name: str, device: torch.device, mixed: torch.dtype | None,
        options: Options) -> tuple[dict, list[str]]:
    """All measurements; returns the JSON record and notes (what was substituted or skipped).

    `mixed` is what train.amp=auto picks; None on a CPU without bf16 units, where the
    "mixed" entries are the fp32 ones (that is how such a CPU trains) and only the
    bf16 matmul peak is measured, to show why.
    """
    notes = []
    perceptual, note = perceptual_for(cfg, device)
    notes.append(note)
    if mixed is None:
        notes.append("no bf16 units on this CPU: train.amp=auto runs fp32, so the 'mixed' rows repeat fp32 "
                     "(peak_tflops.bf16 shows emulated bf16)")
        precisions = {"fp32": None}
    else:
        precisions = {"mixed": mixed} if options.skip_fp32 else {"fp32": None, "mixed": mixed}
    steps, warmup = options.steps, options.warmup

    log.info("counting FLOPs")
    flops = count_flops(cfg, device, perceptual)
    log.info("peak matmul throughput (up to %d^3)", options.peak_size)
    peak = {"fp32": peak_tflops(device, torch.float32, options.peak_size),
            "bf16": peak_tflops(device, mixed or torch.bfloat16, options.peak_size)}
    if mixed not in (None, torch.bfloat16):
        notes.append(f"mixed precision is {mixed} on this device; peak_tflops.bf16 is its {mixed} peak")

    record: dict = {"train": {}, "infer": {}}
    for label, precision in precisions.items():
        peak_of = peak["fp32" if precision is None else "bf16"] * 1e12
        log.info("timing the training step, %s", label)
        speed = time_train(cfg, device, precision, perceptual, steps, warmup)
        record["train"][label] = _entry(speed, flops["train"], peak_of)
        log.info("timing inference, %s", label)
        speed = time_infer(cfg, device, precision, steps, warmup)
        record["infer"][label] = _entry(speed, flops["infer"], peak_of)
    if mixed is None:
        record["train"]["mixed"], record["infer"]["mixed"] = record["train"]["fp32"], record["infer"]["fp32"]

    log.info("reference mode (fp32, batch 1, NIfTI read every step)")
    reference = reference_step_rate(cfg, device, perceptual, steps, warmup)
    if reference is None:
        notes.append(f"reference mode skipped: no BraTS-layout data at data.root={cfg.data.root}")
    log.info("data loader wait in a real loop")
    wait = data_wait_share(cfg, device, mixed, perceptual, steps, warmup)
    if wait is None:
        notes.append(f"data wait skipped: no BraTS-layout data at data.root={cfg.data.root}")
    return {"device": device_name(device), "cpu": cpu_name(), "config": config_name,
            "peak_tflops": peak, "flops_per_slice": flops, "reference_mode": {"slices_per_s": reference},
            **record, "data_wait_share": wait}, notes


def _entry(speed: Speed, flops_per_slice: float, peak_flops: float) -> dict[str, float]:
    return {"slices_per_s": speed.slices_per_s, "peak_mem_mb": speed.peak_mem_mb,
            "utilisation": speed.slices_per_s * flops_per_slice / peak_flops}


def format_table(result: dict, notes: list[str] = ()) -> str:
    """The benchmark record as a readable table."""
    reference = result["reference_mode"]["slices_per_s"]
    lines = [f"device: {result['device']} | {result['cpu']}", f"config: {result['config']}",
             f"peak (matmul): fp32 {result['peak_tflops']['fp32']:.3f} TFLOP/s, "
             f"bf16 {result['peak_tflops']['bf16']:.3f} TFLOP/s",
             f"model FLOPs per slice: train {result['flops_per_slice']['train'] / 1e9:.2f} G, "
             f"infer {result['flops_per_slice']['infer'] / 1e9:.2f} G", "",
             f"{'':14}{'slices/s':>10}{'peak MB':>10}{'util.':>8}{'x ref.':>8}"]
    for task in ("train", "infer"):
        for label, entry in result[task].items():
            speedup = f"{entry['slices_per_s'] / reference:.1f}" if task == "train" and reference else "-"
            lines.append(f"{task + ' ' + label:14}{entry['slices_per_s']:10.3f}{entry['peak_mem_mb']:10.0f}"
                         f"{100 * entry['utilisation']:7.1f}%{speedup:>8}")
    lines.append(f"{'reference':14}{reference:10.3f}" if reference else f"{'reference':14}{'skipped':>10}")
    wait = result["data_wait_share"]
    lines.append(f"data loader wait: {100 * wait:.1f}% of step time" if wait is not None
                 else "data loader wait: skipped")
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)
