"""Speed: bf16 training agrees with fp32, the training step never waits for the device between log
rows, compiles as one graph and agrees with eager, and the benchmarks run end to end."""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import CONFIGS, tiny_overrides
from vq import bench, runtime
from vq.bench import count_flops, full_recipe, synthetic_batch
from vq.config import load_config
from vq.dataloader.brats import SliceCache
from vq.dataloader.datasets import load_eval_stack
from vq.dataloader.lists import read_list
from vq.evaluation import translation_psnr
from vq.inference import Translator
from vq.models import build_model
from vq.sequences import N_SEQ, SEQUENCES, train_pair
from vq.tools.amp_check import train_then_validate
from vq.tools.benchmark import main as benchmark_main
from vq.tools.benchmark import parse_args as parse_benchmark_args
from vq.training import build_training, graph_breaks, read_stats, train_step

ROW_KEYS = {"task", "precision", "batch", "mode", "slices_per_s", "slices_per_s_incl_setup", "first_call_s",
            "setup_s", "peak_mem_mb", "utilisation"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared machine an oversubscribed
    OpenMP team slows their many small ops down by 10x or more (measured on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.long
def test_bf16_training_agrees_with_fp32(phantom_dir, tmp_path):
    """Same seed, same batches: bf16-autocast and fp32 training reach the same validation PSNR.

    A tiny model, 150 steps on the central slices of the three training subjects
    (centre crop 64, the crop validation uses; `tools/amp_check.py --steps 300`
    runs 300 steps on a config's training loader), validated
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
    total, _, count = translation_psnr(Translator(build_model(cfg.model), cpu, None, cfg.test.batch_size), valid)
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


@pytest.mark.long
def test_benchmark_writes_the_documented_json(phantom_dir, tmp_path, monkeypatch):
    """The default benchmark: the eager training step and inference in fp32 and in bf16 (asked for here
    on any CPU), FLOPs, peaks and utilisation, as JSON and as the markdown table beside it."""
    monkeypatch.setattr(runtime, "cpu_bf16_units", lambda: "avx512_bf16")  # "mixed" is timed on any CPU
    out = tmp_path / "bench.json"
    # a missing VGG19 file: the perceptual loss is timed with an untrained VGG19 of the same shape
    overrides = tiny_overrides(phantom_dir, tmp_path) + ["train.lambda_per=0.1",
                                                         f"train.vgg_weights={tmp_path / 'absent.pth'}"]
    code = benchmark_main(["-d", "cpu", "-c", str(CONFIGS / "vqseq2seq_brats_2d_missing_3_256.yaml"),
                           "--json", str(out), "--steps", "2", "--warmup", "1", "--peak-size", "512",
                           "--set", *overrides])
    assert code == 0
    (record,) = json.loads(out.read_text())["records"]
    assert record["notes"] == ["untrained VGG19: no ImageNet weights file"]
    assert set(record["peak_tflops"]) == {"fp32", "mixed"} and all(v > 0 for v in record["peak_tflops"].values())
    assert [(r["task"], r["precision"], r["mode"]) for r in record["rows"]] == [
        ("train", "fp32", "eager"), ("infer", "fp32", "eager"), ("train", "mixed", "eager"), ("infer", "mixed", "eager")]
    for row in record["rows"]:
        assert set(row) == ROW_KEYS and row["slices_per_s"] > 0 and row["peak_mem_mb"] > 0
        flops = record["flops_per_slice"][row["task"]]
        peak = record["peak_tflops"][row["precision"]] * 1e12
        assert row["utilisation"] == pytest.approx(row["slices_per_s"] * flops / peak)
        # a tiny model against a 512^3 matmul peak: a sane ratio, not a target (a FLOP count off by a
        # factor of two or more would break it)
        assert 0 < row["utilisation"] < 2.0
    # a training step costs more than a translation (two encodings, six decodings, backward)
    assert record["flops_per_slice"]["train"] > 5 * record["flops_per_slice"]["infer"]
    assert "| vqseq2seq_brats_2d_missing_3_256.yaml | train | mixed | " in out.with_suffix(".md").read_text()


def test_the_benchmark_counts_training_at_the_training_crop():
    """The demo trains on data.train_crop crops and is evaluated on data.crop: a training step on
    half the side costs a quarter (convolutions and the codebook scale with the area), inference not."""
    cpu = torch.device("cpu")
    small = count_flops(tiny_demo("data.crop=64", "data.train_crop=32")[0], cpu, None)
    full = count_flops(tiny_demo("data.crop=64", "data.train_crop=null")[0], cpu, None)
    assert small["infer"] == full["infer"]
    assert small["train"] == pytest.approx(full["train"] / 4, rel=0.01)


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
from vq.speed import return_freed_memory
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


# ----------------------------------------------------------------------------- no host sync, one graph
TINY = ["model.base_channels=4", "model.n_res=1", "model.n_kernels=2", "model.n_embed=16", "data.crop=32",
        "train.batch_size=2", "train.pretrain_epochs_contrast=-1", "train.pretrain_epochs_rand=-1", "train.domain_aug=true",
        "train.sync_free=true"]
"""The demo config's recipe with every term on from epoch 0 (contrast, sampling, domain augmentation,
codebook restarts, the degenerate-input skip), on a tiny model."""


def tiny_demo(*overrides: str):
    cfg = load_config(CONFIGS / "demo_phantom_cpu.yaml", TINY + list(overrides))
    return cfg, synthetic_batch(cfg, cfg.train.batch_size, torch.device("cpu")), full_recipe(cfg)


class HostReads(TorchDispatchMode):
    """Records every op that makes the host wait for a tensor's value (on CUDA: a sync): reading a
    value (.item(), bool(), float()) and ops whose output size depends on the values. `allowed`
    returns the tensors that may be read: AdamW on CPU reads its step count, a CPU tensor
    (on CUDA the optimizer is capturable and reads nothing)."""

    SYNCING = {"aten::_local_scalar_dense", "aten::nonzero", "aten::_unique2", "aten::unique_dim",
               "aten::unique_consecutive", "aten::masked_select", "aten::bincount"}
    INDEXING = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}

    def __init__(self, allowed):
        super().__init__()
        self.allowed, self.reads = allowed, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        indices = args[1] if name in self.INDEXING else []  # x[mask], x[mask] = y: nonzero inside
        masked = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
        if (name in self.SYNCING or masked) and not any(args[0] is t for t in self.allowed()):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def test_the_training_step_never_waits_for_the_device(monkeypatch):
    """Between two reads of the statistics (`read_stats`, every train.log_every steps) a training
    step reads no tensor on the host: not its losses, not the non-finite guard, not the skip check,
    not the codebook statistics or restarts, not the target codes."""
    cfg, batch, phase = tiny_demo()
    assert cfg.train.skip_degenerate and cfg.model.restart_after > 0 and phase.domain_aug and phase.contrast
    run = build_training(cfg, torch.device("cpu"))
    listed = []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self, real=torch.Tensor.tolist: listed.append(1) or real(self))

    def adam_steps():
        return [state["step"] for state in run.optimizer.state.values()]

    assert cfg.model.codebook_init == "kmeans"
    train_step(run, batch, phase)  # the demo's k-means codebook init reads its data once, on the first step
    with HostReads(adam_steps) as mode:
        for _ in range(3):
            train_step(run, batch, phase)
    assert mode.reads == [] and listed == []
    step, skipped, stats = read_stats(run)
    assert (step, skipped) == (4, 0) and len(listed) == 2  # one read: counts and statistics
    assert {"loss", "l1", "ssim", "vq", "con", "perplexity", "usage"} <= set(stats)


def test_a_degenerate_batch_is_undone_on_the_device():
    """With train.skip_degenerate, an empty input's step runs (no host check) and is then undone:
    weights, codebook counters and AdamW's state are bit-identical, the step counts as skipped."""
    cfg, batch, phase = tiny_demo()
    run = build_training(cfg, torch.device("cpu"))
    train_step(run, batch, phase)
    before = [t.clone() for t in [*run.model.state_dict().values(), *_adam_state(run)]]
    empty = {**batch, "src": torch.full_like(batch["src"], -1.0)}
    train_step(run, empty, phase)
    after = [*run.model.state_dict().values(), *_adam_state(run)]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert read_stats(run)[:2] == (1, 1)


def _adam_state(run):
    return [v for state in run.optimizer.state.values() for v in state.values()]


def test_a_non_finite_loss_is_reported_with_its_step(monkeypatch):
    """The non-finite guard is checked where the statistics are read and names the step."""
    from vq.training import Recipe

    cfg, batch, phase = tiny_demo("train.skip_degenerate=false")
    run = build_training(cfg, torch.device("cpu"))
    calls = []
    real = Recipe.forward

    def third_is_nan(self, *args):
        loss, stats, ok = real(self, *args)
        calls.append(1)
        return (loss * float("nan"), stats, ok) if len(calls) == 3 else (loss, stats, ok)

    monkeypatch.setattr(Recipe, "forward", third_is_nan)
    for _ in range(4):
        train_step(run, batch, phase)
    with pytest.raises(FloatingPointError, match="non-finite loss at step 3"):
        read_stats(run)


@pytest.mark.long
def test_training_step_and_inference_compile_as_one_graph():
    """torch._dynamo.explain of the full-recipe forward (backward follows through AOTAutograd) and of
    inference: one graph each, no graph break."""
    cfg, batch, phase = tiny_demo("train.lambda_per=0")
    run = build_training(cfg, torch.device("cpu"))
    train_step(run, batch, phase)  # the demo's k-means codebook init: once, on the first step, outside the graph
    explained = torch._dynamo.explain(run.recipe)(batch["src"], batch["tgt"], batch["src_idx"],
                                                  batch["tgt_idx"], phase)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    model = run.model.eval()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(batch["src"], model.sequence_code(0), model.sequence_code(2))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_compiled_inference_compiles_once_and_matches_eager(monkeypatch):
    """test.compile: encode and decode compile once each (the last, short chunk is padded to the batch
    size; a target index becomes a code row outside the graph), and translate as eager does."""
    from torch._dynamo.testing import CompileCounter
    counter = CompileCounter()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
    cfg = tiny_demo()[0]
    model = build_model(cfg.model)
    stack = synthetic_batch(cfg, 5, torch.device("cpu"))["src"]  # chunks of 3 + 2
    torch._dynamo.reset()
    compiled = Translator(model, "cpu", None, batch_size=3, compile=True)
    got = [compiled.translate(stack, path) for path in ([0, 2], [0, 3], [1, 2, 3])]
    assert counter.frame_count == 2
    eager = Translator(model, "cpu", None, batch_size=3)
    for path, out in zip(([0, 2], [0, 3], [1, 2, 3]), got):
        torch.testing.assert_close(out, eager.translate(stack, path), rtol=1e-5, atol=1e-5)


def aot_eager(monkeypatch):
    """torch.compile through dynamo and AOTAutograd (the graph capture, functionalisation and the
    compiled backward of train.compile) without inductor's C++ code generation, which took 15 min
    for the tiny model on the project's busy 2-core machine; the benchmark measures inductor."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))


@pytest.mark.long
def test_compiled_and_eager_steps_agree(monkeypatch):
    """train.compile against eager on the same draws, on the step after the first (which runs the demo's
    k-means codebook initialisation eagerly in both): the loss within 1e-5 relative, the whole gradient
    within 1e-5 relative (measured 9.8e-7: the compiled graph sums in another order). The compiled step
    is one graph (fullgraph=True would raise at a break)."""
    aot_eager(monkeypatch)
    compiled_with = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled_with.append(kw) or real_compile(fn, **kw))

    def loss_and_grads(compile: bool):
        cfg, batch, phase = tiny_demo(f"train.compile={compile}")
        run = build_training(cfg, torch.device("cpu"))
        train_step(run, batch, phase)
        assert not run.model.quantizer.init_pending
        torch.manual_seed(1)
        loss, _, _ = run.loss_fn(batch["src"], batch["tgt"], batch["src_idx"], batch["tgt_idx"], phase)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in run.model.parameters() if p.grad is not None])

    torch._dynamo.reset()
    (eager_loss, eager_grad), (loss, grad) = loss_and_grads(False), loss_and_grads(True)
    assert [kw.get("fullgraph") for kw in compiled_with] == [True]
    assert torch.allclose(loss, eager_loss, rtol=1e-5)
    assert (grad - eager_grad).norm() <= 1e-5 * eager_grad.norm()


@pytest.mark.long
def test_a_step_that_cannot_be_one_graph_compiles_in_pieces_and_says_why(monkeypatch, caplog):
    """train.contrast text selects foreground positions with nonzero: train.compile compiles that step in
    pieces and logs the reason, instead of failing at the break (fullgraph) when the term first runs."""
    aot_eager(monkeypatch)
    cfg, batch, phase = tiny_demo("train.contrast=text", "train.compile=true")
    assert phase.contrast
    torch._dynamo.reset()
    with caplog.at_level("INFO", logger="vq.training"):
        run = build_training(cfg, torch.device("cpu"))
    for _ in range(2):
        train_step(run, batch, phase)
    assert read_stats(run)[0] == 2
    (reason,) = graph_breaks(cfg, sync_free=True, ddp=False)
    assert reason.startswith("train.contrast text") and f"compiles in pieces: {reason}" in caplog.text


@pytest.mark.long
def test_mode_benchmark_writes_its_json_on_cpu(tmp_path, monkeypatch):
    """The eager / compiled / CUDA-graph benchmark runs end to end with -d cpu; the CUDA-graph rows are
    skipped there with a note, and with train.sync_free auto (host-grouped eager on a CPU) the training
    step is also timed sync-free eager and host-grouped compiled."""
    aot_eager(monkeypatch)
    out = tmp_path / "modes.json"
    code = benchmark_main(["-d", "cpu", "-c", str(CONFIGS / "demo_phantom_cpu.yaml"), "--modes", "all",
                           "--precision", "fp32", "--batches", "1", "2", "--steps", "1", "--warmup", "0",
                           "--peak-size", "512", "--json", str(out),
                           "--set", *TINY, "train.sync_free=null"])
    assert code == 0
    (record,) = json.loads(out.read_text())["records"]
    assert any("graphed: skipped" in note for note in record["notes"])
    timed = {(r["task"], r["batch"], r["mode"]) for r in record["rows"]}
    train_modes = {"eager", "eager_sync_free", "compiled", "compiled_host_grouped"}
    assert timed == {("train", b, m) for b in (1, 2) for m in train_modes} | {
        ("infer", b, m) for b in (1, 2) for m in ("eager", "compiled")}
    assert all(r["slices_per_s"] > 0 and r["first_call_s"] > 0 for r in record["rows"])
    assert "| demo_phantom_cpu.yaml | train | fp32 | 2 | compiled |" in out.with_suffix(".md").read_text()


@pytest.mark.long
def test_the_profile_shows_where_each_mode_spends_its_time(tmp_path, monkeypatch):
    """--profile writes the step's operators by self time, in the mode asked: the compiled step runs
    through AOTAutograd's compiled function, the eager one does not; both show the convolutions. The
    profiled step is a steady one: the compilation (on the second call, after the eager k-means step)
    fell in the warm-up."""
    aot_eager(monkeypatch)
    tables = {}
    for mode in ("eager", "compiled"):
        code = benchmark_main(["-d", "cpu", "-c", str(CONFIGS / "demo_phantom_cpu.yaml"), "--profile", mode,
                               "--steps", "1", "--warmup", "1", "--rows", "1000", "-o", str(tmp_path),
                               "--set", *TINY])
        assert code == 0
        tables[mode] = (tmp_path / f"profile-demo_phantom_cpu-{mode}-cpu.txt").read_text()
        head = tables[mode].splitlines()[0]
        assert f"training step, {mode}, batch 2" in head and head.endswith(" ".join(TINY))
        assert "aten::convolution_backward" in tables[mode] and "dynamo_timed" not in tables[mode]
    assert "CompiledFunction" in tables["compiled"] and "CompiledFunction" not in tables["eager"]


@pytest.mark.parametrize("flags, says", [
    (["-o", "out"], "-o/--out-dir and --rows go with --profile"),
    (["--rows", "5"], "-o/--out-dir and --rows go with --profile"),
    (["--profile", "eager", "--json", "x.json"], "--profile runs alone"),
    (["--profile", "eager", "--batches", "2"], "--profile runs alone"),
    (["--profile", "eager", "--modes", "all"], "--profile runs alone"),
    (["--profile", "eager", "--rows", "0"], "--steps, --peak-size, --rows and --batches must be >= 1"),
    (["--batches", "0"], "--steps, --peak-size, --rows and --batches must be >= 1")])
def test_profile_flags_that_would_be_ignored_stop_the_run(flags, says, capsys):
    with pytest.raises(SystemExit):
        parse_benchmark_args(["-c", str(CONFIGS / "demo_phantom_cpu.yaml"), *flags])
    assert f"error: {says}" in capsys.readouterr().err


def test_a_cuda_device_is_named_with_its_gpu(monkeypatch):
    """The benchmark's records and tables name the GPU they ran on (this code path runs only on CUDA)."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert bench.machine(torch.device("cuda:0"))["device"] == "cuda:0 (NVIDIA H200)"


def test_setup_time_counts_a_compile_in_the_warm_up(monkeypatch):
    """A compiled step may compile again on its second call (after the k-means initialisation of the
    first): the setup is the wall time beyond the steady rate, whichever call spent it."""
    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    costs = iter([50.0, 30.0, 1.0, 1.0, 1.0])  # first call, one warm-up call that compiles, 3 steady

    def call():
        clock[0] += next(costs)

    timed = bench.timed(call, batch=4, steps=3, warmup=1, wait=lambda: None, device=torch.device("cpu"))
    assert timed["slices_per_s"] == pytest.approx(4.0)
    assert timed["first_call_s"] == pytest.approx(50.0)
    assert timed["setup_s"] == pytest.approx(83.0 - 5.0)
    assert timed["slices_per_s_incl_setup"] == pytest.approx(20 / 83.0)


def test_the_loop_counts_the_time_it_waits_for_data_and_not_its_own():
    """`DataWait` (log.csv data_wait_share): the seconds spent getting batches, not those spent on them."""
    import time

    from vq.runlog import DataWait

    def slow_loader():
        for item in range(3):
            time.sleep(0.05)
            yield item

    class Loader:
        def __len__(self):
            return 3

        def __iter__(self):
            return slow_loader()

    batches = DataWait(Loader())
    assert len(batches) == 3
    for _ in batches:
        time.sleep(0.2)  # the step: not waiting for data
    assert 0.15 <= batches.take() < 0.45  # the steps took 0.6 s
    assert batches.take() == 0.0  # taken: counting starts again


def test_mixed_precision_alone_on_a_cpu_without_bf16_units_is_refused(monkeypatch, caplog):
    """Nothing to time: the CPU trains in fp32, so the benchmark says so instead of writing an empty table."""
    monkeypatch.setattr(runtime, "cpu_bf16_units", lambda: None)
    code = benchmark_main(["-d", "cpu", "-c", str(CONFIGS / "demo_phantom_cpu.yaml"), "--precision", "mixed"])
    assert code == 2 and "no bf16 units" in caplog.text


def test_speed_strategies_keep_the_weights_and_apply_once():
    """`apply_speed_switches` from outside: state_dict keys and values as before (checkpoints load either
    way), a deep copy (the weight average) keeps the strategy, and switching twice (a VGG19 shared by the
    benchmark's runs) wraps once."""
    import copy

    from vq.losses import PerceptualLoss
    from vq.speed import apply_speed_switches

    cfg = tiny_demo()[0]
    plain, model = build_model(cfg.model), build_model(cfg.model)
    model.load_state_dict(plain.state_dict())
    perceptual = PerceptualLoss(pretrained=False, allow_random=True)
    for _ in range(2):
        apply_speed_switches(True, False, model, perceptual, sync_free=False)
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
    assert type(model.decoder).__name__ == "Decoder_chunked_grouped_by_code"
    assert type(perceptual.blocks[0]).__name__ == "VGGBlock_recomputed"
    assert type(copy.deepcopy(model).decoder) is type(model.decoder)
    images, codes = synthetic_batch(cfg, 10, torch.device("cpu"))["src"], [0, 1, 2, 3] * 2 + [2, 2]
    model.eval(), plain.eval()  # (no codebook initialisation); with autograd on: chunks of 8 in 4 code groups
    torch.testing.assert_close(model(images, codes[::-1], codes), plain(images, codes[::-1], codes), rtol=1e-5, atol=1e-6)

