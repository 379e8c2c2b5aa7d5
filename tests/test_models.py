"""The network: quantizer loss and gradients, hyper-conv batching, model API, mixed precision."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from vq.config import ModelConfig
from vq.models import HyperConv2d, VectorQuantizer, build_model

TINY = ModelConfig(base_channels=8, n_down=2, n_res=1, embed_dim=3, n_embed=16, n_kernels=4)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(TINY)


def images(batch=2, size=32):
    return torch.rand(batch, 1, size, size) * 2 - 1


def test_straight_through_gradient_reaches_encoder(model):
    out = model(images(), 1, [0, 2])
    out.mean().backward()  # decoder-side loss only, no VQ loss
    grad = model.encoder.net[0][0].weight.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("legacy", [True, False])
def test_vq_loss_and_gradients_match_formula(legacy):
    beta = 0.25
    vq = VectorQuantizer(n_embed=2, embed_dim=2, beta=beta, legacy=legacy)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    # two positions: (0.2, -0.1) -> code 0, (0.9, 1.3) -> code 1
    z_e = torch.tensor([[0.2, 0.9], [-0.1, 1.3]]).view(1, 2, 1, 2).requires_grad_()
    out = vq(z_e)
    z_q = torch.tensor([[0.0, 1.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    assert out.indices.flatten().tolist() == [0, 1]
    assert torch.equal(out.quantized, z_q)
    mse = ((z_e.detach() - z_q) ** 2).mean()
    torch.testing.assert_close(out.loss, (1 + beta) * mse)  # both forms have the same value ...
    out.loss.backward()  # ... and differ in where beta sits
    w_commit, w_codebook = (1.0, beta) if legacy else (beta, 1.0)
    n = z_e.numel()
    torch.testing.assert_close(z_e.grad, w_commit * 2 * (z_e.detach() - z_q) / n)
    # codebook gradient: sum over the positions assigned to each code
    diff = (z_q - z_e.detach()).view(2, 2).t()  # (positions, D)
    torch.testing.assert_close(vq.embedding.weight.grad, w_codebook * 2 * diff / n)


def test_hyperconv_one_hot_equals_conv_with_hand_mixed_kernel():
    torch.manual_seed(0)
    conv = HyperConv2d(3, 5, 3, code_dim=8, n_kernels=4)
    x, code = torch.randn(2, 3, 6, 6), F.one_hot(torch.tensor([2, 2]), 8).float()
    coeffs = conv.mix.weight[:, 2] + conv.mix.bias  # (n_kernels,)
    weight = (coeffs.view(4, 1, 1, 1, 1) * conv.weight).sum(0)
    bias = (coeffs.view(4, 1) * conv.bias).sum(0)
    expected = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), weight, bias)
    torch.testing.assert_close(conv(x, code), expected)


def test_hyperconv_mixed_codes_equal_each_sample_alone():
    torch.manual_seed(0)
    conv = HyperConv2d(3, 4, 3, code_dim=8, n_kernels=4)
    x = torch.randn(5, 3, 6, 6)
    code = torch.cat([F.one_hot(torch.tensor([1, 0, 1]), 8).float(), torch.rand(2, 8)])  # 4 distinct rows
    alone = torch.cat([conv(x[i:i + 1], code[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(conv(x, code), alone)


def test_model_mixed_targets_equal_each_sample_alone(model):
    x = images(4)
    targets = [0, 3, 0, 2]
    with torch.no_grad():
        batched = model(x, 1, targets)
        alone = torch.cat([model(x[i:i + 1], 1, t) for i, t in enumerate(targets)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)


def test_decode_shapes_and_target_codes(model):
    x = images(3)
    enc = model.encode(x, 0)
    assert enc.latent.shape == (3, TINY.embed_dim, 8, 8)
    assert enc.indices.shape == (3, 8, 8) and enc.loss_vq.ndim == 0
    with torch.no_grad():
        out = model.decode(enc.latent, "flair")
        one_hot = model.decode(enc.latent, F.one_hot(torch.tensor(3), TINY.code_dim).float())
        t1 = model.decode(enc.latent, "t1")
    assert out.shape == x.shape
    torch.testing.assert_close(one_hot, out)  # "flair" is code position 3, the sequence order
    assert (t1 - out).abs().mean() > 1e-3  # the code steers the decoder
    # codes: int, per-sample list, float codes all give (B, code_dim)
    assert model.sequence_code(1, 3).shape == (3, TINY.code_dim)
    assert torch.equal(model.sequence_code(torch.tensor([1, 1, 1])), model.sequence_code(1, 3))
    with pytest.raises(ValueError):
        model.sequence_code([0, 4])


@pytest.mark.parametrize("uniform_on, width", [("reference", TINY.code_dim), ("sequences", 4)])
def test_random_code_is_one_hot_or_uniform(model, uniform_on, width):
    codes = model.random_code(64, generator=torch.Generator().manual_seed(0), uniform_on=uniform_on)
    one_hot = ((codes == 1).sum(1) == 1) & ((codes != 0).sum(1) == 1)
    assert codes.shape == (64, TINY.code_dim) and (codes[one_hot][:, 4:] == 0).all()
    assert 10 < one_hot.sum() < 54  # about half are one-hot on the 4 sequences, the rest uniform
    mixed = codes[~one_hot]
    assert (mixed[:, :width] > 0).all() and (mixed[:, width:] == 0).all()  # the reference: all 64 positions
    assert model.decode(model.encode(images(64, 16), 0).latent, codes).shape == (64, 1, 16, 16)


def test_seq2seq_ablation_has_no_quantizer():
    model = build_model(dataclasses.replace(TINY, quantize=False))
    names = [n for n, _ in model.named_parameters()]
    assert not any("quant" in n for n in names)
    enc = model.encode(images(), 0)
    assert enc.indices is None and enc.loss_vq.item() == 0
    assert enc.latent.shape == (2, 4 * TINY.base_channels, 8, 8)
    assert model(images(), 0, 1).shape == (2, 1, 32, 32)


def test_codebook_usage_perplexity():
    vq = VectorQuantizer(n_embed=8, embed_dim=2)
    uniform = vq.codebook_usage(torch.arange(8).repeat(10))
    assert uniform["perplexity"].item() == pytest.approx(8) and uniform["usage"].item() == 1
    collapsed = vq.codebook_usage(torch.full((80,), 3))
    assert collapsed["perplexity"].item() == pytest.approx(1) and collapsed["usage"].item() == 1 / 8


def test_bf16_autocast_forward_keeps_quantizer_in_fp32(model):
    dtypes = []
    distances = model.quantizer.distances
    model.quantizer.distances = lambda z: dtypes.append((d := distances(z)).dtype) or d
    with torch.autocast("cpu", dtype=torch.bfloat16):
        enc = model.encode(images(), 0)
        out = model.decode(enc.latent, [1, 3])
    assert enc.pre_quant.dtype == torch.bfloat16  # autocast is really on upstream
    assert dtypes == [torch.float32] and enc.latent.dtype == torch.float32
    assert enc.loss_vq.dtype == torch.float32
    assert out.shape == (2, 1, 32, 32) and torch.isfinite(out).all()


def test_idle_codes_restart_onto_encoder_outputs_only_when_asked():
    """With the paper's +-1/K init, z_e far outside the codebook picks only hull codes; restarts spread them."""
    torch.manual_seed(0)
    z_e = torch.randn(4, 3, 8, 8)  # 256 positions, scale 1 against codes within 1/256
    paper = VectorQuantizer(256, 3).train()
    before = paper.embedding.weight.detach().clone()
    for _ in range(3):
        used = paper(z_e).indices.unique().numel()
    assert used < 30  # collapse: a few hull codes
    assert torch.equal(paper.embedding.weight, before)  # nothing moves without restarts (no optimizer here)

    restart = VectorQuantizer(256, 3, restart_after=2).train()
    before = restart.embedding.weight.detach().clone()
    for _ in range(4):
        out = restart(z_e)
    assert out.indices.unique().numel() > 3 * used
    points = z_e.permute(0, 2, 3, 1).reshape(-1, 3)
    moved = ~torch.isclose(restart.embedding.weight, before).all(1)
    assert moved.sum() > 200
    gaps = (restart.embedding.weight[moved, None] - points[None]).norm(dim=2).min(1).values
    assert gaps.max() < 1e-6  # onto real z_e
    paper.load_state_dict(restart.state_dict())  # restart_after is a training setting, not architecture

    frozen = restart.embedding.weight.detach().clone()
    restart.eval()
    for _ in range(4):
        restart(z_e * 3)
    assert torch.equal(restart.embedding.weight, frozen)  # evaluation never changes the codebook


def phantom_slice(size: int = 192) -> torch.Tensor:
    """The centre axial slice of a phantom T1 in [-1, 1], centre-cropped: (1, 1, size, size)."""
    from vq.dataloader.preprocess import normalize, pad_or_crop
    from vq.tools.make_phantom_brats import make_subject

    volume = make_subject(0, seed=0)["t1"]
    image = normalize(volume)[:, :, volume.shape[2] // 2]
    return torch.from_numpy(pad_or_crop(image[None], size))[:, None]


@pytest.mark.parametrize("init, ze_rms, out_std", [("reference", (2.5, 5.0), (0.0, 0.05)),
                                                    ("pytorch", (0.7, 2.2), (0.1, 0.4))])
def test_initial_statistics_follow_the_init(init, ze_rms, out_std):
    """The paper-size network on a phantom slice at initialisation: measured with the reference code,
    z_e rms 3.6 and output std 0.018; PyTorch's default inits give 1.4 and 0.21."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(init=init)).eval()
    with torch.no_grad():
        x = phantom_slice()
        z_e = model.encode(x, 0).pre_quant
        out = model(x, 0, 2)
    assert ze_rms[0] < z_e.pow(2).mean().sqrt() < ze_rms[1]
    assert out_std[0] < out.std() < out_std[1]


def test_reference_init_weights():
    torch.manual_seed(0)
    model = build_model(ModelConfig(init="reference"))
    conv = model.encoder.net[1][0]  # 3x3, 64 -> 128
    assert conv.weight.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.02)
    assert (model.quant_conv.bias == 0).all() and (model.decoder.embed[0].bias == 0).all()
    res = model.decoder.res[0].conv1  # bank (16, 256, 256, 3, 3): fan_in = 256 * 9 * 16
    assert res.weight.std().item() == pytest.approx((2 / (256 * 9 * 16)) ** 0.5, rel=0.01)
    out = model.decoder.out
    assert (out.bias == 0).all() and (out.mix.bias == 0).all() and (out.mix_bias.bias == 0).all()
    assert out.mix.weight.abs().max() <= 1 / 64 ** 0.5  # nn.Linear's default U(+-1/sqrt(fan_in))


def test_output_bias_moves_with_its_own_mixer():
    """The reference's bias(s) = B c(s), c its OWN Linear of the code; 'shared' uses the kernel's a(s).
    On a mixed (domain-augmentation) code the two give different outputs from the same weights."""
    torch.manual_seed(0)
    own = HyperConv2d(3, 1, 3, code_dim=8, n_kernels=4, bias_mix="own")
    shared = HyperConv2d(3, 1, 3, code_dim=8, n_kernels=4, bias_mix="shared")
    assert shared.mix_bias is None
    with torch.no_grad():
        own.bias.normal_()
        shared.load_state_dict({k: v for k, v in own.state_dict().items() if "mix_bias" not in k})
    x, code = torch.randn(1, 3, 6, 6), torch.rand(1, 8)  # a mixed code
    no_bias = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), own.kernels(code)[0][0])
    assert torch.allclose(own(x, code) - no_bias, (own.mix_bias(code) @ own.bias).view(1, 1, 1, 1), atol=1e-6)
    assert torch.allclose(shared(x, code) - no_bias, (own.mix(code) @ own.bias).view(1, 1, 1, 1), atol=1e-6)
    assert (own(x, code) - shared(x, code)).abs().min() > 1e-3
    before = own(x, code)
    with torch.no_grad():
        own.mix_bias.weight.add_(torch.randn_like(own.mix_bias.weight))
    delta = own(x, code) - before
    assert delta.abs().min() > 1e-4 and torch.allclose(delta, delta.flatten()[:1].expand_as(delta))  # a constant shift


def test_kmeans_codebook_init_spreads_codes_over_the_encoder_outputs():
    torch.manual_seed(0)
    z_e = torch.randn(4, 3, 16, 16) * 3  # 1024 positions far outside the +-1/K codebook
    uniform = VectorQuantizer(256, 3).train()
    kmeans = VectorQuantizer(256, 3, init="kmeans").train()
    assert not kmeans.initialised
    used_uniform = uniform(z_e).indices.unique().numel()
    out = kmeans(z_e)
    assert kmeans.initialised and out.indices.unique().numel() > 4 * used_uniform
    points = z_e.permute(0, 2, 3, 1).reshape(-1, 3)
    error = lambda codebook: torch.cdist(points, codebook).min(1).values.pow(2).mean()
    sampled = points[torch.randperm(len(points), generator=torch.Generator().manual_seed(1))[:256]]
    assert error(kmeans.embedding.weight) < 0.8 * error(sampled)  # Lloyd's steps beat their random start
    assert error(kmeans.embedding.weight) < 0.05 * error(uniform.embedding.weight)
    fitted = kmeans.embedding.weight.detach().clone()
    kmeans(z_e * 5)
    assert torch.equal(kmeans.embedding.weight, fitted)  # once only
    again = VectorQuantizer(256, 3, init="kmeans").train()
    again.load_state_dict(kmeans.state_dict())
    again(z_e * 5)
    assert torch.equal(again.embedding.weight, fitted)  # a loaded (or resumed) codebook is kept


def test_checkpoint_of_the_shared_bias_model_says_how_to_load_it(tmp_path):
    from vq.checkpoint import CheckpointError, load_model_weights

    old = build_model(dataclasses.replace(TINY, hyper_bias="shared"))
    with pytest.raises(CheckpointError, match="model.hyper_bias=shared"):
        load_model_weights(build_model(TINY), {"model": old.state_dict()}, "old.pth")
    load_model_weights(build_model(dataclasses.replace(TINY, hyper_bias="shared")), {"model": old.state_dict()})
    with pytest.raises(CheckpointError, match="model.hyper_bias=own"):
        load_model_weights(old, {"model": build_model(TINY).state_dict()}, "new.pth")
