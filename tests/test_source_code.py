"""model.source_code: the encoder told which sequence it reads, threaded through every encoding; off, the
paper's network and training step as they were."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CONFIGS
from vq.bench import synthetic_batch
from vq.checkpoint import CheckpointError, load_model_weights
from vq.config import load_config
from vq.evaluation import latent_gap
from vq.inference import Translator, synthesize_all
from vq.models import build_model
from vq.training import Phase, Recipe

PAPER = CONFIGS / "vqseq2seq_brats_2d_missing_3_256.yaml"
TINY = ["model.base_channels=8", "model.n_res=2", "model.n_kernels=4", "model.n_embed=32", "model.code_dim=8",
        "train.lambda_per=0", "train.batch_size=4"]
GOLDEN = Path(__file__).parent / "data" / "paper_path_11cc71b.json"


def tiny(*overrides: str, config: Path = PAPER):
    cfg = load_config(config, TINY + list(overrides))
    torch.manual_seed(0)
    return cfg, build_model(cfg.model)


def project(tensor: torch.Tensor, seed: int) -> float:
    """A fixed random projection of a tensor: any change of any value changes it."""
    weights = torch.randn(tensor.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return float((tensor.detach().double().flatten() * weights).sum())


def paper_path_values() -> dict:
    """The paper config's network and full training step (every phase on) on a fixed batch: the values that
    tests/data/paper_path_11cc71b.json holds as computed before the option existed."""
    cfg, model = tiny()
    batch = synthetic_batch(cfg, 4, torch.device("cpu"), seed=3, crop=32)
    model.eval()
    with torch.no_grad():
        latent = model.encode(batch["src"], batch["src_idx"]).latent
        out = model(batch["src"], batch["src_idx"], batch["tgt_idx"])
    model.train()
    torch.manual_seed(1)
    loss, stats, ok = Recipe(model, cfg, perceptual=None)(batch["src"], batch["tgt"], batch["src_idx"],
                                                           batch["tgt_idx"], Phase(True, True, True))
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return {"latent": project(latent, 5), "output": project(out, 6), "loss": float(loss.detach()),
            "stats": {k: float(v) for k, v in stats.items()}, "grad_norm": float(grads.norm()),
            "grad": project(grads, 7), "ok": bool(ok), "after": float(torch.rand(()))}


def test_off_the_paper_network_and_step_are_as_before():
    """Off (the paper configs): the same weights give the values recorded before the option existed: the
    encoding, the translation, the full training loss, its statistics and gradients, and the random draws
    the step consumes (`after`: the next draw). fp32 on one thread; tolerances cover another CPU's rounding."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = paper_path_values()
    finally:
        torch.set_num_threads(threads)
    want = json.loads(GOLDEN.read_text())
    assert got["ok"] and want["ok"]
    assert got["after"] == want["after"]
    for key in ("latent", "output", "loss", "grad_norm", "grad"):
        assert got[key] == pytest.approx(want[key], rel=1e-4), key
    assert got["stats"] == pytest.approx(want["stats"], rel=1e-4)


def test_off_the_encoder_does_not_read_the_source():
    cfg, model = tiny()
    assert not model.encoder.conditioned
    assert "encoder.net.0.0.weight" in model.state_dict()
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    model.eval()
    assert torch.equal(model.encode(x, 0).latent, model.encode(x, [3, 2, 1]).latent)
    assert torch.equal(model.encoder(x), model.encoder.net(x))


def test_on_the_source_changes_the_latent_per_sample():
    cfg, model = tiny("model.source_code=true")
    model.eval()
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        as_t1, as_t2 = model.encode(x, "t1").pre_quant, model.encode(x, "t2").pre_quant
        mixed = model.encode(x, [0, 2, 2, 0]).pre_quant  # one grouped convolution of per-sample kernels
    assert (as_t1 - as_t2).abs().mean() > 1e-3 * as_t1.abs().mean()
    torch.testing.assert_close(mixed, torch.cat([as_t1[:1], as_t2[1:3], as_t1[3:]]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="3 sequence codes for a batch of 4"):
        model.encode(x, [0, 1, 2])


def test_on_the_first_conv_is_a_kernel_bank_mixed_by_the_source():
    """The source's kernel is its mixture of the bank: the mixing Linear's column of that sequence."""
    cfg, model = tiny("model.source_code=true")
    conv = model.encoder.net[0].conv
    kernel, _ = conv.kernels(model.sequence_code(2))  # (1, out, in, k, k)
    by_hand = torch.einsum("k,koihw->oihw", conv.mix.weight[:, 2] + conv.mix.bias, conv.weight)
    torch.testing.assert_close(kernel[0], by_hand)
    assert not torch.allclose(kernel, conv.kernels(model.sequence_code(0))[0])


def test_a_translated_source_is_encoded_with_the_code_it_was_translated_to():
    """Domain augmentation: rows swapped for the model's own translation are encoded with that translation's
    random code (one-hot or uniform), the others with their source's one-hot, the targets with theirs."""
    cfg, model = tiny("model.source_code=true", "train.batch_size=16")
    calls, drawn = [], []
    model.encoder.net[0].register_forward_hook(lambda module, args, out: calls.append(args))
    random_code = model.random_code

    def recorded(*args, **kwargs):
        drawn.append(random_code(*args, **kwargs))
        return drawn[-1]

    model.random_code = recorded
    batch = synthetic_batch(cfg, 16, torch.device("cpu"), seed=1, crop=32)
    torch.manual_seed(2)
    Recipe(model, cfg, perceptual=None)(batch["src"], batch["tgt"], batch["src_idx"], batch["tgt_idx"],
                                        Phase(True, True, True))
    (translated_from, code_in), (encoded, codes) = calls  # the no-grad translation, then the step's encoding
    assert torch.equal(code_in, model.sequence_code(batch["src_idx"]))
    swapped = (encoded[:16] != translated_from).flatten(1).any(1)
    assert 0 < swapped.sum() < 16
    assert torch.equal(codes[:16][swapped], drawn[0][swapped])
    assert torch.equal(codes[:16][~swapped], model.sequence_code(batch["src_idx"])[~swapped])
    assert torch.equal(codes[16:], model.sequence_code(batch["tgt_idx"]))
    uniform = swapped & ((drawn[0] > 0) & (drawn[0] < 1)).any(1)
    assert uniform.any()  # some of the swapped rows were read with a uniform code


def test_translator_encodes_each_stack_as_its_sequence():
    """Multi-step: the intermediate is encoded as the sequence it was translated to; synthesis and fusion
    encode each source with its own code."""
    cfg, model = tiny("model.source_code=true")
    translator = Translator(model, "cpu", None, batch_size=3)
    stack = torch.rand(5, 1, 32, 32) * 2 - 1
    got = translator.translate(stack, [0, 1, 2])
    with torch.no_grad():
        model.eval()
        step = model.decode(model.encode(stack, 0).latent, 1)
        by_hand = model.decode(model.encode(step, 1).latent, 2)
        misread = model.decode(model.encode(step, 0).latent, 2)
    torch.testing.assert_close(got, by_hand)
    assert not torch.allclose(got, misread, atol=1e-4)

    volume = stack[:, 0].permute(1, 2, 0).numpy()  # (X, Y, Z) in [-1, 1]
    out = synthesize_all(translator, {"t1": volume, "t2": volume}, ["flair"], normalized=True, per_source=True)
    from_t1 = translator.translate(stack, [0, 3])[:, 0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(out.per_source["flair", "t1"], from_t1, rtol=1e-5, atol=1e-5)
    assert not np.allclose(out.per_source["flair", "t1"], out.per_source["flair", "t2"], atol=1e-4)
    fused = translator.decode((translator.encode(stack, 0) + translator.encode(stack, 2)) / 2, 3)
    np.testing.assert_allclose(out.fused["flair"], fused[:, 0].permute(1, 2, 0).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("trained_with", [True, False])
def test_a_checkpoint_with_the_other_setting_is_a_one_line_error(trained_with):
    _, trained = tiny(f"model.source_code={str(trained_with).lower()}")
    _, other = tiny(f"model.source_code={str(not trained_with).lower()}")
    with pytest.raises(CheckpointError, match=f"trained with model.source_code={str(trained_with).lower()}; "
                                              f"load it with --set model.source_code={str(trained_with).lower()}"):
        load_model_weights(other, {"model": trained.state_dict()}, "run/ckpt_best.pth")
    try:
        load_model_weights(other, {"model": trained.state_dict()}, "run/ckpt_best.pth")
    except CheckpointError as error:
        assert "\n" not in str(error) and "run/ckpt_best.pth" in str(error)


def test_the_paper_configs_keep_the_reference_encoder_and_the_demo_tells_it():
    for path in CONFIGS.glob("*brats_2d*.yaml"):
        assert not load_config(path).model.source_code, path.name
    assert load_config(CONFIGS / "demo_phantom_cpu.yaml").model.source_code


@pytest.mark.parametrize("source_code", [False, True])
def test_the_latent_gap_encodes_each_sequence_with_its_code(source_code):
    """One image given as two sequences: the paper's encoder sees one image (gap 0); told the sources, the
    encoder reads it two ways, so the latents differ (a gap that encoded both with one code would be 0)."""
    _, model = tiny(f"model.source_code={str(source_code).lower()}")
    translator = Translator(model, "cpu", None, batch_size=3)
    stack = torch.full((6, 1, 32, 32), -1.0)
    stack[:, :, 4:28, 4:28] = torch.rand(6, 1, 24, 24) * 1.8 - 0.9  # a brain inside a background of -1
    total, count = latent_gap(translator, {"subject": {0: stack, 2: stack.clone()}})
    assert count == 1
    assert (total > 0.05) if source_code else (total == 0)
