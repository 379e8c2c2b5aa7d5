"""The demo's learning-speed options (all off in the paper configs): weight average, lr warm-up,
quantizer bypass. Each test runs the real model or training script."""
from __future__ import annotations

import csv

import pytest
import torch

from conftest import CONFIGS, tiny_overrides
from vq.config import load_config
from vq.models import build_model
from vq.train.train_brats_vq_seq2seq_2d import main as train_main
from vq.training import WeightAverage

PAPER_CONFIGS = ["seq2seq_brats_2d_missing_3", "vq_brats_2d_missing_3_256", "vqcon_brats_2d_missing_3_256",
                 "vqseq2seq_brats_2d_missing_3_256", "vqseq2seq_noaug_brats_2d_missing_3_256"]


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_the_paper_configs_leave_every_option_off(name):
    t = load_config(CONFIGS / f"{name}.yaml").train
    assert (t.ema_decay, t.warmup_steps, t.quantizer_warmup, t.code_lr_scale) == (0.0, 0, 0, 1.0)


def tiny_model():
    cfg = load_config(None, ["model.base_channels=4", "model.n_res=1", "model.n_kernels=2", "model.n_embed=16",
                             "model.codebook_init=kmeans"])
    torch.manual_seed(0)
    return build_model(cfg.model).train()


def test_the_bypass_decodes_the_encoder_output_and_leaves_the_codebook_alone():
    model = tiny_model()
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    model.bypass_quantizer = True
    enc = model.encode(images, 0)
    assert torch.equal(enc.latent, enc.pre_quant) and float(enc.loss_vq) == 0.0
    codebook = model.quantizer.embedding.weight.detach().clone()
    assert model.quantizer.init_pending and torch.equal(model.quantizer.embedding.weight, codebook)
    assert enc.indices.shape == (2, 8, 8)  # the nearest codes, for the usage statistics
    model.bypass_quantizer = False  # the first quantized step starts the codebook (k-means) and snaps to it
    enc = model.encode(images, 0)
    assert not model.quantizer.init_pending and not torch.equal(model.quantizer.embedding.weight, codebook)
    snapped = model.quantizer.embedding.weight.detach()[enc.indices].permute(0, 3, 1, 2)  # (B, D, h, w)
    torch.testing.assert_close(enc.latent.detach(), snapped)


def test_the_average_lags_the_weights_and_copies_the_codebook():
    model = tiny_model()
    model.encode(torch.rand(2, 1, 32, 32), 0)  # k-means start
    ema = WeightAverage(model, decay=0.5)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.updates = 100  # past the decay's ramp: one update moves the average half way
    ema.update(model)
    for name, p in ema.model.named_parameters():
        if name.startswith("quantizer."):
            assert torch.equal(p, dict(model.named_parameters())[name]), name
        else:  # strictly between the old and the new weights: averaged, neither copied nor left
            moved = (p - start[name]).mean().item()
            assert moved == pytest.approx(0.5, abs=1e-5), name
    assert not any(p.requires_grad for p in ema.model.parameters())


def read_log(run_dir) -> list[dict]:
    with open(run_dir / "log.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["loss"]]


def test_warmup_slows_the_first_updates(phantom_dir, tmp_path):
    """train.warmup_steps: the first steps move the weights by a fraction of the scheduled lr."""
    moved = {}
    for warmup in (0, 1000):
        run = tmp_path / f"warmup{warmup}"
        assert train_main(["-d", "cpu", "-c", str(CONFIGS / "demo_phantom_cpu.yaml"), "--set",
                           *tiny_overrides(phantom_dir, tmp_path), f"out_dir={run}", "train.max_steps=2",
                           f"train.warmup_steps={warmup}", "model.codebook_init=uniform"]) == 0
        cfg = load_config(run / "config.yaml")
        torch.manual_seed(cfg.seed)
        start = build_model(cfg.model).state_dict()
        trained = torch.load(run / "ckpt_last.pth", weights_only=True)["model"]
        moved[warmup] = sum((trained[k].float() - v.float()).abs().sum().item() for k, v in start.items()
                            if "encoder" in k)
        assert float(read_log(run)[0]["lr"]) == pytest.approx(cfg.train.lr / max(warmup, 1))
    assert moved[1000] < 0.05 * moved[0], moved


def test_quantizer_warmup_steps_have_no_vq_loss_and_no_best_checkpoint(phantom_dir, tmp_path, caplog):
    run = tmp_path / "run"
    assert train_main(["-d", "cpu", "-c", str(CONFIGS / "demo_phantom_cpu.yaml"), "--set",
                       *tiny_overrides(phantom_dir, tmp_path), "train.max_steps=6", "train.quantizer_warmup=4",
                       "model.codebook_init=kmeans", "train.epochs=3"]) == 0  # 3 steps an epoch
    vq = [float(r["vq"]) for r in read_log(run)]
    assert vq[:4] == [0.0] * 4 and all(v > 0 for v in vq[4:]), vq
    state = torch.load(run / "ckpt_best.pth", weights_only=True)
    assert state["step"] == 6 and bool(state["model"]["quantizer.initialised"])  # epoch 1's model bypassed


def test_code_lr_scale_speeds_up_only_the_code_path():
    """train.code_lr_scale: one AdamW step moves the decoder's code embedding and mixing Linears by the
    scaled lr and everything else by the plain one; with 1 the optimizer is the paper's single group."""
    from vq.training import is_code_path, make_optimizer, set_lr

    model = tiny_model()
    cfg = load_config(None, ["train.code_lr_scale=10", "train.weight_decay=0"])
    optimizer = make_optimizer(model, cfg)
    set_lr(optimizer, 1e-3)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3, 1e-2])
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()  # Adam's first step moves every weight by its lr (a constant gradient)
    names = [k for k in before]
    code = [k for k in names if is_code_path(k)]
    assert "decoder.embed.0.weight" in code and "decoder.out.mix_bias.weight" in code
    assert not any(k.startswith("encoder.") for k in code)
    for k, p in model.named_parameters():
        moved = (before[k] - p.detach()).abs().max().item()
        assert moved == pytest.approx(1e-2 if k in code else 1e-3, rel=1e-3), k
    single = make_optimizer(model, load_config(None))
    assert len(single.param_groups) == 1 and single.param_groups[0]["params"] == list(model.parameters())


def test_latent_gap_is_zero_for_one_image_and_positive_for_two_contrasts():
    """vq.evaluation.latent_gap, logged at validation as val_latent_gap: the same image under two sequence
    names gives one latent (0); a second contrast of the same anatomy (inverted) does not, for an untrained model."""
    from vq.evaluation import latent_gap
    from vq.inference import Translator

    model = Translator(tiny_model(), "cpu", None, batch_size=2)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    slices = torch.stack([torch.sin(3 * xx + k) * torch.cos(2 * yy - k) for k in range(4)])[:, None]  # (4,1,32,32)
    head = torch.where(xx**2 + yy**2 < 0.8, 0.5 * slices, torch.tensor(-1.0))
    inverted = torch.where(head > -1, -head, head)
    same, n = latent_gap(model, {"s": {0: head, 1: head.clone()}})
    assert n == 1 and same == 0.0
    gap, _ = latent_gap(model, {"s": {0: head, 2: inverted}})
    assert gap > 0.1


def test_the_code_defaults_are_the_paper_config():
    """One source of truth: the paper YAML shows the defaults of vq/config.py, and loads to exactly them."""
    assert load_config(None) == load_config(CONFIGS / "vqseq2seq_brats_2d_missing_3_256.yaml")
