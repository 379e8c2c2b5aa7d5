"""The training recipe and script: learning happens, resume is exact, configs and errors behave."""
from __future__ import annotations

import csv

import pytest
import torch
import yaml

from conftest import CONFIGS, tiny_overrides
from vq.config import load_config
from vq.dataloader.brats import SliceCache
from vq.dataloader.datasets import load_eval_stack
from vq.dataloader.lists import read_list
from vq.models import build_model
from vq.sequences import train_pair
from vq.train.train_brats_vq_seq2seq_2d import main as train_main
from vq.training import Phase, Recipe, make_optimizer, poly_lr

ABLATIONS = ["seq2seq_brats_2d_missing_3", "vq_brats_2d_missing_3_256", "vqcon_brats_2d_missing_3_256",
             "vqseq2seq_brats_2d_missing_3_256", "vqseq2seq_noaug_brats_2d_missing_3_256"]


def read_log(run_dir) -> dict[int, dict]:
    with open(run_dir / "log.csv", newline="") as f:
        return {int(r["step"]): r for r in csv.DictReader(f) if r["loss"]}


def test_a_few_hundred_steps_reduce_the_reconstruction_loss(phantom_dir, tmp_path):
    cfg = load_config(CONFIGS / "demo_phantom_cpu.yaml", tiny_overrides(phantom_dir, tmp_path) + [
        "model.base_channels=8", "train.lr=2e-3", "data.augment=false"])
    name, code = read_list(phantom_dir / "train.csv")[0]
    cache = SliceCache(tmp_path / "cache", phantom_dir, cfg.data)
    i, j = train_pair(code)
    cache.ensure({name: [i, j]})
    mid = slice(7, 9)  # two central slices, centre crop 64
    src, tgt = load_eval_stack(cache, name, i)[mid], load_eval_stack(cache, name, j)[mid]
    torch.manual_seed(0)
    model = build_model(cfg.model)
    recipe, opt = Recipe(model, cfg, perceptual=None), make_optimizer(model, cfg)
    idx_i, idx_j = torch.full((2,), i), torch.full((2,), j)
    l1 = []
    for _ in range(200):
        loss, stats, _ = recipe(src, tgt, idx_i, idx_j, Phase.at(cfg, 0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        l1.append(stats["l1"].item())
    first, last = sum(l1[:10]) / 10, sum(l1[-10:]) / 10
    assert last < 0.5 * first, (first, last)


def test_phases_and_schedule_follow_the_config():
    cfg = load_config(CONFIGS / "vqseq2seq_brats_2d_missing_3_256.yaml")
    # the reference switches a phase on when the 0-based epoch is greater than its pretrain_epochs_*
    assert Phase.at(cfg, 100) == Phase(contrast=False, sampling=False, domain_aug=False)
    assert Phase.at(cfg, 101) == Phase(contrast=True, sampling=False, domain_aug=False)
    assert Phase.at(cfg, 200) == Phase(contrast=True, sampling=False, domain_aug=False)
    assert Phase.at(cfg, 201) == Phase(contrast=True, sampling=True, domain_aug=True)
    # 4 draws x 830 subjects = 3320 steps per epoch: the 1e6-step cap falls in epoch 301
    assert cfg.data.slices_per_subject * 830 == 3320 and cfg.train.max_steps // 3320 == 301
    assert poly_lr(cfg, 0) == pytest.approx(1e-4)
    assert poly_lr(cfg, 500) == pytest.approx(5.4053e-5, abs=1e-9)  # 1e-6 + 99e-6 x 0.5^0.9
    assert poly_lr(cfg, 301) == pytest.approx(7.2724e-5, abs=1e-9)  # where the reference's run stops
    seq2seq = load_config(CONFIGS / "seq2seq_brats_2d_missing_3.yaml")
    assert Phase.at(seq2seq, 500) == Phase(contrast=False, sampling=False, domain_aug=False)
    assert not seq2seq.model.quantize


def test_paper_config_builds_the_model_of_the_stated_size():
    cfg = load_config(CONFIGS / "vqseq2seq_brats_2d_missing_3_256.yaml")
    model = build_model(cfg.model)
    assert model.quantizer.embedding.weight.shape == (256, 3)
    assert sum(p.numel() for p in model.encoder.parameters()) == pytest.approx(7.45e6, rel=0.01)
    with torch.no_grad():
        enc = model.encode(torch.zeros(1, 1, 64, 64), 0)
    assert enc.latent.shape == (1, 3, 16, 16)


# the demo's learning-speed options: a weight average, lr warm-up and a quantizer bypass that ends
# after the resume point (step 4), so that the k-means start happens in the resumed process
SPEED_OPTIONS = ["train.ema_decay=0.9", "train.warmup_steps=6", "train.quantizer_warmup=5",
                 "model.codebook_init=kmeans"]


@pytest.mark.parametrize("options", [["train.ema_decay=0", "train.warmup_steps=0"], SPEED_OPTIONS],
                         ids=["recipe", "ema_warmup_bypass"])
def test_resume_gives_the_same_next_steps_as_not_stopping(options, phantom_dir, tmp_path):
    base = ["-d", "cpu", "-c", str(CONFIGS / "demo_phantom_cpu.yaml"), "--set",
            *tiny_overrides(phantom_dir, tmp_path), "train.pretrain_epochs_contrast=-1",
            "train.pretrain_epochs_rand=0", *options]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert train_main(base + [f"out_dir={whole}", "train.max_steps=7"]) == 0
    assert train_main(base + [f"out_dir={part}", "train.max_steps=4"]) == 0  # stops mid-epoch 1
    assert train_main(["-d", "cpu", "--resume", str(part), "--set", "train.max_steps=7"]) == 0
    ref, resumed = read_log(whole), read_log(part)
    assert sorted(resumed) == sorted(ref) == list(range(1, 8))
    for step in (5, 6, 7):
        assert float(resumed[step]["loss"]) == pytest.approx(float(ref[step]["loss"]), rel=1e-5), step
    whole_state, part_state = (torch.load(run / "ckpt_last.pth", weights_only=True) for run in (whole, part))
    averaged = options is SPEED_OPTIONS
    for key in ("model", "train_model") if averaged else ("model",):  # the average is resumed too
        for name, value in whole_state[key].items():
            torch.testing.assert_close(part_state[key][name], value, rtol=1e-4, atol=1e-6, msg=f"{key} {name}")
    assert ("train_model" in part_state) == averaged
    assert (part / "ckpt_best.pth").is_file() and (part / "progress.png").is_file()
    assert list((part / "samples").glob("*.png")) and list((part / "tensorboard").iterdir())


@pytest.mark.parametrize("older_checkpoint", [False, True])
def test_resume_with_another_batch_size_restarts_the_epoch(older_checkpoint, phantom_dir, tmp_path, caplog):
    run = tmp_path / "run"
    assert train_main(["-d", "cpu", "-c", str(CONFIGS / "demo_phantom_cpu.yaml"), "--set",
                       *tiny_overrides(phantom_dir, tmp_path), "train.max_steps=4"]) == 0  # 3 steps/epoch: mid-epoch 1
    state = torch.load(run / "ckpt_last.pth", weights_only=True)
    assert state["in_epoch"] == 1
    if older_checkpoint:  # written before the position in the epoch was saved
        del state["in_epoch"], state["steps_per_epoch"]
        torch.save(state, run / "ckpt_last.pth")
    # batch 1: 6 steps per epoch; the position "step 4 = 1 step into epoch 1" no longer exists
    assert train_main(["-d", "cpu", "--resume", str(run), "--set", "train.batch_size=1", "train.max_steps=10"]) == 0
    assert f"had {'other' if older_checkpoint else 3} steps per epoch and now has 6" in caplog.text
    state = torch.load(run / "ckpt_last.pth", weights_only=True)
    assert (state["step"], state["epoch"], state["in_epoch"]) == (10, 1, 6)  # epoch 1 ran all 6 steps from step 5
    assert sorted(read_log(run)) == list(range(1, 11))


def test_resume_names_the_settings_its_saved_config_predates(phantom_dir, tmp_path, caplog):
    run = tmp_path / "run"
    base = ["-d", "cpu", "-c", str(CONFIGS / "demo_phantom_cpu.yaml"), "--set", *tiny_overrides(phantom_dir, tmp_path)]
    assert train_main(base + ["train.max_steps=2"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())  # as a run started before these settings existed
    del saved["train"]["ema_decay"], saved["train"]["warmup_steps"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert train_main(["-d", "cpu", "--resume", str(run), "--set", "train.max_steps=3", "train.warmup_steps=0"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "predates" in r.getMessage()]
    assert len(warnings) == 1 and "train.ema_decay=0.0" in warnings[0]
    assert "warmup_steps" not in warnings[0]  # given with --set: not a silent default


def test_resume_after_a_hard_kill_logs_each_step_once(phantom_dir, tmp_path):
    run = tmp_path / "run"
    base = ["-d", "cpu", "-c", str(CONFIGS / "demo_phantom_cpu.yaml"), "--set", *tiny_overrides(phantom_dir, tmp_path)]
    assert train_main(base + ["train.max_steps=4"]) == 0
    with open(run / "log.csv", newline="") as f:  # a run killed with -9 after logging steps 5 and 6
        last = [r for r in csv.DictReader(f) if r["loss"]][-1]
    with open(run / "log.csv", "a", newline="") as f:
        writer = csv.DictWriter(f, list(last))
        for step in (5, 6):
            writer.writerow({**last, "step": step})
    assert train_main(["-d", "cpu", "--resume", str(run), "--set", "train.max_steps=7"]) == 0
    with open(run / "log.csv", newline="") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r["loss"]]
    assert steps == list(range(1, 8))


@pytest.mark.parametrize("name", ABLATIONS)
def test_each_table1_config_runs_a_few_steps(name, phantom_dir, tmp_path, vgg_weights_file):
    code = train_main(["-d", "cpu", "-c", str(CONFIGS / f"{name}.yaml"), "--set",
                       *tiny_overrides(phantom_dir, tmp_path), "train.lambda_per=0.1",
                       f"train.vgg_weights={vgg_weights_file}", "train.max_steps=2",
                       "train.pretrain_epochs_contrast=-1", "train.pretrain_epochs_rand=-1"])
    assert code == 0
    row = read_log(tmp_path / "run")[2]
    assert float(row["per"]) > 0
    assert (row["vq"] == "") == (name == "seq2seq_brats_2d_missing_3")


def test_an_existing_run_is_refused_without_resume(trained_run, caplog):
    overrides, run_dir = trained_run
    code = train_main(["-d", "cpu", "-c", str(CONFIGS / "demo_phantom_cpu.yaml"), "--set", *overrides])
    assert code == 2
    assert f"--resume {run_dir}" in caplog.text


def test_unknown_config_key_is_an_error_listing_valid_keys(caplog):
    code = train_main(["-d", "cpu", "-c", str(CONFIGS / "demo_phantom_cpu.yaml"), "--set", "train.epoch=3"])
    assert code == 2
    assert "unknown config key 'train.epoch'" in caplog.text and "train.epochs" in caplog.text


def test_missing_vgg_weights_stop_at_start_up(phantom_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise OSError("no internet")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    code = train_main(["-d", "cpu", "-c", str(CONFIGS / "demo_phantom_cpu.yaml"), "--set",
                       *tiny_overrides(phantom_dir, tmp_path), "train.lambda_per=0.1"])
    assert code == 2
    assert "vgg19-dcbb9e9d.pth" in caplog.text and "lambda_per" in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_unavailable_device_is_a_clear_error(caplog, tmp_path):
    # (out_dir in tmp_path: after `make demo` the demo config's own run folder holds a run)
    code = train_main(["-d", "cuda:0", "-c", str(CONFIGS / "demo_phantom_cpu.yaml"), "--set", f"out_dir={tmp_path}"])
    assert code == 2
    assert "CUDA is not available" in caplog.text


def test_a_killed_run_resumes_to_the_same_end(trained_run, phantom_dir, tmp_path):
    """SIGTERM mid-training saves ckpt_last.pth; --resume reaches the same step count and loss."""
    import signal
    import subprocess
    import sys
    import time

    from vq.config import REPO_ROOT

    script = str(REPO_ROOT / "publications/src/vq/train/train_brats_vq_seq2seq_2d.py")
    common = ["-d", "cpu", "-c", str(CONFIGS / "demo_phantom_cpu.yaml"), "--set",
              *tiny_overrides(phantom_dir, tmp_path), "train.pretrain_epochs_contrast=-1",
              "train.pretrain_epochs_rand=0", "train.max_steps=12"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert train_main(common + [f"out_dir={whole}"]) == 0
    proc = subprocess.Popen([sys.executable, script, *common, f"out_dir={killed}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "log.csv").exists() or len(read_log(killed)) < 4:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130, proc.stderr.read()[-2000:]
    stopped_at = torch.load(killed / "ckpt_last.pth", weights_only=True)["step"]
    assert 4 <= stopped_at < 12
    assert train_main(["-d", "cpu", "--resume", str(killed)]) == 0
    ref, resumed = read_log(whole), read_log(killed)
    assert max(resumed) == max(ref) == 12
    assert float(resumed[12]["loss"]) == pytest.approx(float(ref[12]["loss"]), rel=1e-4)


def _one_step(phantom_dir, tmp_path, override: str, batch_size: int = 2):
    """Loss and gradients of one full-recipe step of a tiny paper-config model (fixed seeds) under `override`;
    also the model and the VGG19 the Recipe was given."""
    from vq.bench import full_recipe, synthetic_batch
    from vq.speed import apply_speed_switches
    from vq.losses import PerceptualLoss

    cfg = load_config(CONFIGS / "vqseq2seq_brats_2d_missing_3_256.yaml", tiny_overrides(phantom_dir, tmp_path)
                      + ["model.base_channels=8", override])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    perceptual = PerceptualLoss(pretrained=False, allow_random=True)
    apply_speed_switches(cfg.train.checkpointing, cfg.train.channels_last, model, perceptual)
    recipe = Recipe(model, cfg, perceptual)
    batch = synthetic_batch(cfg, batch_size, torch.device("cpu"))
    layout = torch.channels_last if cfg.train.channels_last else torch.contiguous_format  # as the script feeds it
    src, tgt = (batch[k].contiguous(memory_format=layout) for k in ("src", "tgt"))
    torch.manual_seed(1)  # the same augmentation, sampling and domain-augmentation draws
    loss, _, _ = recipe(src, tgt, batch["src_idx"], batch["tgt_idx"], full_recipe(cfg))
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return loss.detach(), grads, model, perceptual


def test_activation_checkpointing_changes_memory_not_the_result(phantom_dir, tmp_path):
    """train.checkpointing recomputes encoder, decoder and VGG blocks in backward, each in chunks of 8 rows
    (batch 5: the encoder sees 10 rows, the decoder and VGG 30): same loss, same gradients."""
    loss_a, grads_a, _, _ = _one_step(phantom_dir, tmp_path, "train.checkpointing=false", batch_size=5)
    loss_b, grads_b, model, perceptual = _one_step(phantom_dir, tmp_path, "train.checkpointing=true", batch_size=5)
    assert torch.allclose(loss_a, loss_b, rtol=1e-5)
    _assert_same_gradients(grads_a, grads_b)
    # it did recompute: 10 rows run a first layer of the encoder, the decoder and VGG19 in 2 chunks,
    # and again in backward
    target_feats = perceptual.target_features(torch.rand(10, 1, 32, 32))
    calls, layers = [], (model.encoder.net[0][0], model.decoder.res[0].conv1, perceptual.blocks[0].layers[0])
    for layer in layers:
        layer.register_forward_hook(lambda module, args, out: calls.append((module, len(args[0]))))
    latent = model.encoder(torch.rand(10, 1, 32, 32, requires_grad=True))
    perceptual(model.decoder(latent, model.sequence_code(2, 10)), target_feats, torch.arange(10)).sum().backward()
    for module in layers:
        assert [rows for m, rows in calls if m is module] == [8, 2, 2, 8]  # chunks, then backward's recompute


def test_channels_last_keeps_the_result(phantom_dir, tmp_path):
    """train.channels_last: `apply_speed_switches` converts the model (5-D hyper-conv banks stay as they are) and VGG19;
    the loss and gradients are those of the default layout."""
    loss_a, grads_a, _, _ = _one_step(phantom_dir, tmp_path, "train.channels_last=false")
    loss_b, grads_b, model, perceptual = _one_step(phantom_dir, tmp_path, "train.channels_last=true")
    convs = [p for p in [*model.parameters(), *perceptual.parameters()]
             if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] > 1]  # (1x1 or 1-channel: both layouts agree)
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert torch.allclose(loss_a, loss_b, rtol=1e-4)
    _assert_same_gradients(grads_a, grads_b)


def _assert_same_gradients(grads_a, grads_b, rel: float = 1e-3):
    """Whole-gradient agreement: other conv algorithms and row groupings sum in another order, so entries
    that are ~1e-6 noise (biases before a norm) differ in relative terms while the gradient does not."""
    assert len(grads_a) == len(grads_b) > 20
    a, b = torch.cat([g.flatten() for g in grads_a]), torch.cat([g.flatten() for g in grads_b])
    assert (a - b).norm() <= rel * a.norm()


def test_a_degenerate_input_skips_the_step(phantom_dir, tmp_path):
    """The reference skips a step whose augmented input is empty (mean -1) or constant (std 0)."""
    cfg = load_config(CONFIGS / "vqseq2seq_brats_2d_missing_3_256.yaml",
                      tiny_overrides(phantom_dir, tmp_path) + ["data.augment=false"])
    recipe = Recipe(build_model(cfg.model), cfg, perceptual=None)
    image = torch.full((2, 1, 32, 32), -1.0)
    image[:, :, 8:24, 8:24] = torch.rand(2, 1, 16, 16)
    assert recipe.inputs(image, image)[2]
    empty, constant = image.clone(), image.clone()
    empty[1] = -1.0
    constant[0] = 0.3
    assert not recipe.inputs(image, empty)[2] and not recipe.inputs(constant, image)[2]
    off = load_config(CONFIGS / "vqseq2seq_brats_2d_missing_3_256.yaml",
                      tiny_overrides(phantom_dir, tmp_path) + ["data.augment=false", "train.skip_degenerate=false"])
    assert Recipe(build_model(off.model), off, perceptual=None).inputs(image, empty)[2]


def test_validation_includes_the_identity_pairs_like_the_reference():
    """Two available sequences give 4 pairs with t1 -> t1 and t2 -> t2 (2 without); an identity model
    (copy) scores infinite PSNR there, so only the identity pairs are perfect."""
    from types import SimpleNamespace

    from vq.evaluation import translation_psnr
    from vq.inference import Translator

    class Copy(torch.nn.Module):  # the decoder returns the latent: every translation copies its source
        def encode(self, x, code):
            return SimpleNamespace(latent=x)

        def sequence_code(self, sequences, device=None):
            return None

        def decode(self, latent, code):
            return latent

    copy = Translator(Copy(), "cpu", None, batch_size=4)
    stacks = {"S": {0: torch.rand(2, 1, 8, 8) * 2 - 1, 2: torch.rand(2, 1, 8, 8) * 2 - 1}}
    total, _, count = translation_psnr(copy, stacks, identity=True)
    assert count == 4 and total == float("inf")
    total, _, count = translation_psnr(copy, stacks, identity=False)
    assert count == 2 and total < 30


def test_evaluation_runs_in_fp32_unless_asked(trained_run, tmp_path, monkeypatch, alexnet_weights_file):
    """Metrics for a paper table are fp32 (test.amp: none), whatever train.amp says."""
    from vq import evaluation
    from vq.test.test_brats_vq_2d_metrics import main as evaluate_main

    seen = []
    original = evaluation.Translator.__init__
    monkeypatch.setattr(evaluation.Translator, "__init__",
                        lambda self, model, device, amp, *rest: seen.append(amp) or original(self, model, device, amp, *rest))
    overrides, run_dir = trained_run
    args = ["-d", "cpu", "-c", str(CONFIGS / "demo_phantom_cpu.yaml"), "-l", str(run_dir / "ckpt_best.pth"),
            "--lpips-weights", str(alexnet_weights_file), "--set", *overrides, "train.amp=bf16",
            "test.save_nifti=false"]
    assert evaluate_main([*args, "-o", str(tmp_path / "fp32")]) == 0
    assert evaluate_main([*args, "test.amp=bf16", "-o", str(tmp_path / "bf16")]) == 0
    assert seen == [None, torch.bfloat16]


def test_the_training_loop_skips_a_degenerate_step(phantom_dir, tmp_path, monkeypatch):
    """A degenerate batch draws no optimizer step and does not count as one (the reference's `continue`
    before its step counter), but it is consumed: the epoch moves on."""
    from vq import training

    drawn = []
    real = training.Recipe.inputs

    def second_is_degenerate(self, src, tgt):
        in_src, in_tgt, ok = real(self, src, tgt)
        drawn.append(1)
        return in_src, in_tgt, ok & (len(drawn) != 2)

    monkeypatch.setattr(training.Recipe, "inputs", second_is_degenerate)
    run = tmp_path / "run"
    assert train_main(["-d", "cpu", "-c", str(CONFIGS / "demo_phantom_cpu.yaml"), "--set",
                       *tiny_overrides(phantom_dir, tmp_path), "train.max_steps=3"]) == 0
    state = torch.load(run / "ckpt_last.pth", weights_only=True)
    assert len(drawn) == 4 and state["step"] == 3  # 4 batches drawn for 3 steps
    assert (state["epoch"], state["in_epoch"]) == (1, 1)  # 3 batches per epoch: the 4th opens epoch 1
    assert read_log(run)[3]["skipped"] == "1"


def test_the_step_is_the_same_with_the_decoder_grouped_by_code_on_the_host():
    """The two ways the decoder takes a batch of mixed target codes in a training step (per-sample
    kernels in one grouped convolution, and train.sync_free=false's grouping by code on the host, one
    convolution per code) give the same loss, statistics and gradient (tiny paper-config model, three
    pairs with all four codes, VQC sampling, the contrastive and perceptual terms on)."""
    from vq.bench import synthetic_batch
    from vq.losses import PerceptualLoss
    from vq.speed import grouped_by_code, wrap_forward

    cfg = load_config(CONFIGS / "vqseq2seq_brats_2d_missing_3_256.yaml",
                      ["model.base_channels=4", "model.n_res=1", "model.n_kernels=2", "model.n_embed=16",
                       "data.crop=32", "train.domain_aug=false", "train.lambda_per=0.1"])
    batch = synthetic_batch(cfg, 3, torch.device("cpu"))
    assert len({*batch["src_idx"].tolist(), *batch["tgt_idx"].tolist()}) == 4  # four codes in the decode
    results = []
    for group_by_code in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg.model)
        if group_by_code:
            wrap_forward(model.decoder, grouped_by_code)
        recipe = Recipe(model, cfg, PerceptualLoss(pretrained=False, allow_random=True))
        torch.manual_seed(1)
        loss, stats, _ = recipe(batch["src"], batch["tgt"], batch["src_idx"], batch["tgt_idx"], Phase.at(cfg, 201))
        loss.backward()
        results.append((loss, stats["vq"], torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    (loss, vq, grad), (host_loss, host_vq, host_grad) = results
    assert loss.item() > 0 and grad.abs().sum().item() > 0
    torch.testing.assert_close(host_loss, loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(host_vq, vq, rtol=1e-5, atol=0)
    torch.testing.assert_close(host_grad, grad, rtol=1e-4, atol=1e-3 * float(grad.abs().mean()))


def test_kept_snapshots_make_the_quality_curve(phantom_dir, tmp_path):
    """train.keep_every_epochs keeps the weights at those epochs' ends (the last is the final model);
    tools/demo_curve.py --snapshots makes a row of each at its step and minute, evaluated where not yet."""
    from vq.checkpoint import read_checkpoint
    from vq.evaluation import SUMMARY_COLUMNS, write_summary
    from vq.tools.demo_curve import main as curve_main

    overrides = tiny_overrides(phantom_dir, tmp_path) + ["train.epochs=3", "train.keep_every_epochs=2",
                                                         "train.val_every=3"]
    assert train_main(["-d", "cpu", "-c", str(CONFIGS / "demo_phantom_cpu.yaml"), "--set", *overrides]) == 0
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("ckpt_epoch_*.pth")) == ["ckpt_epoch_0002.pth"]
    kept, last = read_checkpoint(run / "ckpt_epoch_0002.pth"), read_checkpoint(run / "ckpt_last.pth")
    assert kept["epoch"] == 2 and 0 < kept["step"] < last["step"] and kept["model"].keys() == last["model"].keys()
    assert any(not torch.equal(kept["model"][k], last["model"][k]) for k in kept["model"])

    for name, psnr_brain in (("epoch_0002", 19.0), ("epoch_0004", 23.0)):
        rows = [{**{key: float("nan") for key in SUMMARY_COLUMNS}, "method": method, "steps": "single", "src": "t1",
                 "tgt": "t2", "n": 1, "psnr_brain": value, "psnr": value, "ssim_brain": 0.5, "contrast_error": 0.1,
                 "tissue_order": 1.0} for method, value in (("model", psnr_brain), ("copy_source", 20.0))]
        write_summary(rows, run / f"results_{name}" / "summary.csv", run / f"results_{name}" / "summary.md")
    torch.save({**last, "step": last["step"] + 1}, run / "ckpt_epoch_0004.pth")  # evaluated: nothing runs
    assert curve_main([str(run), "--snapshots", "-o", str(tmp_path / "curve")]) == 0
    with open(tmp_path / "curve" / "demo_curve.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    elapsed = {int(r["step"]): float(r["elapsed_s"]) for r in csv.DictReader(open(run / "log.csv"))}
    assert [(r["run"], int(r["steps"]), float(r["minutes"]), r["meets_goal"]) for r in rows] == [
        ("epoch_0002", kept["step"], pytest.approx(elapsed[kept["step"]] / 60, rel=1e-5), "0"),  # 6 digits in the CSV
        ("epoch_0004", last["step"] + 1, pytest.approx(max(elapsed.values()) / 60, rel=1e-5), "1")]
