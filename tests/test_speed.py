"""Speed tooling: bf16 training agrees with fp32, and the benchmark runs end to end."""
from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys

import pytest
import torch

from conftest import CONFIGS, tiny_overrides
from vq import runtime
from vq.bench import train_then_validate
from vq.config import load_config
from vq.dataloader.brats import SliceCache
from vq.dataloader.datasets import load_eval_stack
from vq.dataloader.lists import read_list
from vq.models import build_model
from vq.sequences import N_SEQ, SEQUENCES, train_pair
from vq.tools.benchmark import main as benchmark_main
from vq.training import validate

JSON_KEYS = {"device", "cpu", "config", "peak_tflops", "flops_per_slice", "reference_mode", "train", "infer",
             "data_wait_share"}
SPEED_KEYS = {"slices_per_s", "peak_mem_mb", "utilisation"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared machine an oversubscribed
    OpenMP team slows their many small ops down by 10x or more (measured on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_bf16_training_agrees_with_fp32(phantom_dir, tmp_path):
    """Same seed, same batches: bf16-autocast and fp32 training reach the same validation PSNR.

    A tiny model, 150 steps on the central slices of the three training subjects
    (centre crop 64, the crop validation uses; the issue asks for 300 steps,
    which `benchmark.py --amp-check 300` runs on the training loader), validated
    on the other three subjects. The two runs of a seed drift apart as training
    goes on, so their gap is partly chance: over five seeds it had std ~0.11 dB
    (at most 0.15 dB) here, against a seed-to-seed spread of ~0.4 dB; the mean
    gap of two seeds must stay within 0.3 dB.
    """
    overrides = tiny_overrides(phantom_dir, tmp_path) + ["model.base_channels=8", "train.lr=5e-4",
                                                         "data.augment=false"]
    cfg = load_config(CONFIGS / "vqseq2seq_brats_2d_missing_3_256.yaml", overrides)
    cache = SliceCache(tmp_path / "cache", phantom_dir, cfg.data)
    train_rows = read_list(phantom_dir / "train.csv")
    other = read_list(phantom_dir / "valid.csv") + read_list(phantom_dir / "test.csv")
    cache.ensure({name: train_pair(code) for name, code in train_rows} | {name: SEQUENCES for name, _ in other})
    mid = slice(7, 9)  # two central slices of the 16 cached
    batches = []
    for name, code in train_rows:
        i, j = train_pair(code)
        batches.append({"src": load_eval_stack(cache, name, i)[mid], "tgt": load_eval_stack(cache, name, j)[mid],
                        "src_idx": torch.full((2,), i), "tgt_idx": torch.full((2,), j)})
    valid = {name: {s: load_eval_stack(cache, name, s, 8) for s in range(N_SEQ)} for name, _ in other}
    cpu = torch.device("cpu")
    total, _, count = validate(build_model(cfg.model), valid, cpu, cfg.test.batch_size)
    untrained = total / count

    def at_epoch_0():  # the first phase of the paper's schedule (no contrastive term, sampling, domain aug)
        return ((0, batch) for batch in itertools.cycle(batches))

    gaps = []
    for seed in range(2):
        run = dataclasses.replace(cfg, seed=seed)
        fp32 = train_then_validate(run, cpu, None, at_epoch_0(), 150, valid)
        bf16 = train_then_validate(run, cpu, torch.bfloat16, at_epoch_0(), 150, valid)
        assert min(fp32, bf16) > untrained + 3, (untrained, fp32, bf16)  # both really learned
        assert fp32 != bf16  # and really ran in different precisions
        gaps.append(bf16 - fp32)
    assert abs(sum(gaps) / len(gaps)) < 0.3, gaps


def test_benchmark_writes_the_documented_json(phantom_dir, tmp_path):
    out = tmp_path / "bench.json"
    # a missing VGG19 file: the perceptual loss is timed with an untrained VGG19 of the same shape
    overrides = tiny_overrides(phantom_dir, tmp_path) + ["train.lambda_per=0.1",
                                                         f"train.vgg_weights={tmp_path / 'absent.pth'}"]
    code = benchmark_main(["-d", "cpu", "-c", str(CONFIGS / "vqseq2seq_brats_2d_missing_3_256.yaml"),
                           "--json", str(out), "--steps", "2", "--warmup", "1", "--peak-size", "2048",
                           "--set", *overrides])
    assert code == 0
    result = json.loads(out.read_text())
    assert set(result) == JSON_KEYS
    assert set(result["peak_tflops"]) == {"fp32", "bf16"} and set(result["flops_per_slice"]) == {"train", "infer"}
    assert set(result["reference_mode"]) == {"slices_per_s"}
    for task in ("train", "infer"):
        assert set(result[task]) == {"fp32", "mixed"}
        for entry in result[task].values():
            assert set(entry) == SPEED_KEYS
            assert entry["slices_per_s"] > 0 and entry["peak_mem_mb"] > 0
            # A tiny model against a 2048^3 matmul peak: a sane ratio, not a target (a FLOP
            # count off by a factor of two or more would break it).
            assert 0 < entry["utilisation"] < 2.0
    numbers = [*result["peak_tflops"].values(), *result["flops_per_slice"].values(),
               result["reference_mode"]["slices_per_s"]]
    assert all(x > 0 for x in numbers)
    # a training step costs more than a translation (two encodings, six decodings, backward)
    assert result["flops_per_slice"]["train"] > 5 * result["flops_per_slice"]["infer"]
    assert 0 < result["data_wait_share"] < 1


@pytest.mark.parametrize("units, expected", [("avx512_bf16", torch.bfloat16), ("amx_bf16", torch.bfloat16),
                                             (None, None)])
def test_auto_precision_is_fp32_on_a_cpu_without_bf16_units(monkeypatch, units, expected):
    """Emulated bf16 ran 50x slower than fp32 on an AVX2-only EPYC: `auto` must not pick it there."""
    monkeypatch.setattr(runtime, "cpu_bf16_units", lambda: units)
    cpu = torch.device("cpu")
    assert runtime.amp_dtype(cpu, "auto") is expected
    assert runtime.amp_dtype(cpu, "bf16") is torch.bfloat16  # asked for explicitly: given, with a warning
    assert runtime.amp_dtype(cpu, "none") is None


_FRAGMENTATION = """
import sys, torch
from vq.runtime import return_freed_memory
def rss_mb():
    return [int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("VmRSS")][0]
if sys.argv[1] == "on":
    assert return_freed_memory()
freed = torch.ones(4 << 20); del freed  # a freed 16 MB block: glibc raises its mmap threshold to 16 MB
base = rss_mb()
kept, temporary = [], []
for _ in range(50):  # 4 MB blocks, as a chunked backward allocates them: every other one stays alive
    temporary.append(torch.ones(1 << 20))
    kept.append(torch.ones(1 << 20))
del temporary
print(rss_mb() - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_memory_mode_returns_freed_blocks_to_the_os():
    """train.checkpointing also fixes glibc's mmap threshold: 200 MB freed between 200 MB still in use must
    leave the resident set (by default glibc keeps them as heap holes; the process then looks 2x its size)."""
    def grown(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", _FRAGMENTATION, mode], capture_output=True, text=True,
                             check=True)
        return float(out.stdout.split()[-1])

    assert grown("off") > 350  # the default keeps the holes: the test can tell
    assert grown("on") < 250
