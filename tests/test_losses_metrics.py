"""Losses, metrics and offline pretrained weights, on tiny tensors and self-made weight files."""
import logging
import math
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torchvision.models.vgg import cfgs, make_layers

from vq import metrics
from vq.losses import PerceptualLoss, consistency_loss, ssim_loss
from vq.metrics import LPIPSMetric, lpips_volume, psnr, ssim3d_regions
from vq.speed import recomputed, wrap_forward
from vq.weights import MissingWeightsError


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch hub cache and no network: torchvision's download fails at once."""
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    yield tmp_path / "hub"
    torch.hub.set_dir(old)


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A random VGG19 `features` state dict saved like torchvision's file (keys `features.*`)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "vgg19-random.pth"
    torch.save({f"features.{k}": v for k, v in make_layers(cfgs["E"]).state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "alexnet-random.pth"
    torch.save(torchvision.models.alexnet().state_dict(), path)
    return path


def images(n=2, size=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=gen) * 2 - 1


def ssim3d(pred, target) -> float:
    """The whole stack's SSIM, as the evaluation reports it."""
    return ssim3d_regions(pred, target)["ssim"]


# ----------------------------------------------------------------------------- SSIM / PSNR
def test_ssim_loss_zero_for_identical_and_grows_with_noise():
    img = images()
    noisy = [ssim_loss((img + s * torch.randn_like(img)).clamp(-1, 1), img) for s in (0.05, 0.2, 0.5)]
    assert ssim_loss(img, img).abs() < 1e-5
    assert 0 < noisy[0] < noisy[1] < noisy[2]


def test_ssim_loss_matches_skimage_per_image():
    img = images(1, 48)
    pred = (img + 0.2 * torch.randn_like(img)).clamp(-1, 1)
    ref = structural_similarity(img[0, 0].numpy().astype(np.float64), pred[0, 0].numpy().astype(np.float64),
                                data_range=2.0)
    assert float(1 - ssim_loss(pred, img)) == pytest.approx(ref, abs=1e-4)


def test_psnr_matches_skimage_per_sample_and_on_a_stack():
    target, pred = images(3, 16, seed=1), images(3, 16, seed=2)
    per_sample = psnr(pred, target)
    assert per_sample.shape == (3,)
    for k in range(3):
        ref = peak_signal_noise_ratio(target[k].numpy(), pred[k].numpy(), data_range=2)
        assert float(per_sample[k]) == pytest.approx(ref, abs=1e-3)
    stack_ref = peak_signal_noise_ratio(target[:, 0].numpy(), pred[:, 0].numpy(), data_range=2)
    assert float(psnr(pred[:, 0], target[:, 0])) == pytest.approx(stack_ref, abs=1e-3)


def test_ssim3d_on_one_window_is_the_formula_written_out():
    """A 7x7x7 array holds one whole 7x7x7 window after scikit-image drops its 3-voxel border, so ssim3d is
    the SSIM formula on the whole array: means, sample (co)variances, C1 = (0.01 x 2)^2, C2 = (0.03 x 2)^2."""
    rng = np.random.default_rng(0)
    target = rng.uniform(-1, 1, (7, 7, 7))
    pred = 0.5 * target + 0.2 + rng.normal(0, 0.1, target.shape)
    mx, my = target.mean(), pred.mean()
    vx, vy = target.var(ddof=1), pred.var(ddof=1)
    cov = ((target - mx) * (pred - my)).sum() / (target.size - 1)
    c1, c2 = 0.02 ** 2, 0.06 ** 2
    expected = (2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))  # 0.43884
    assert ssim3d(pred, target) == pytest.approx(expected, abs=1e-6)  # population covariance: 3e-6 off
    # constant images: only the luminance term, (2 x 0.25 x 0.5 + C1) / (0.25^2 + 0.5^2 + C1)
    assert ssim3d(np.full((7, 7, 7), 0.25), np.full((7, 7, 7), 0.5)) == pytest.approx(0.2504 / 0.3129, rel=1e-6)


def test_ssim3d_in_float32_is_the_float64_value_and_sees_noise():
    rng = np.random.default_rng(0)
    target = rng.uniform(-1, 1, (9, 20, 20)).astype(np.float32)
    pred = np.clip(target + rng.normal(0, 0.2, target.shape), -1, 1).astype(np.float32)
    ref64 = structural_similarity(target.astype(np.float64), pred.astype(np.float64), data_range=2.0)
    assert ssim3d(pred, target) == pytest.approx(ref64, abs=1e-6)  # float32 arithmetic moves it by < 1e-6
    assert ssim3d(target, target) == pytest.approx(1.0)
    assert ssim3d(pred, target) < 0.9  # noise of std 0.2 is seen


# ----------------------------------------------------------------------------- perceptual
def perceptual(loss_fn, pred, target):
    """Each prediction against its own target row: (B,) losses."""
    return loss_fn(pred, loss_fn.target_features(target), torch.arange(len(pred)))


def test_perceptual_loss_from_a_weights_file(vgg_file):
    loss_fn = PerceptualLoss(weights_path=vgg_file)
    target = images(2, 32)
    pred = images(2, 32, seed=3).requires_grad_(True)
    assert perceptual(loss_fn, target.clone(), target).abs().max() < 1e-8
    loss = perceptual(loss_fn, pred, target)
    assert (loss > 0).all()
    loss.sum().backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in loss_fn.parameters())
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in loss_fn.modules())


def test_perceptual_loss_is_torchvision_vgg19s_feature_mse_per_row(vgg_file):
    """The perceptual loss as training uses it: for each prediction, the sum over VGG19's 13 ReLU outputs
    (features[:30], max-pools as average pools) of the feature MSE against its target row (`index`),
    computed here on torchvision's own VGG19 with the same weights; activation checkpointing
    (`recompute`) changes nothing."""
    from torchvision.models import vgg19

    reference = vgg19()
    reference.load_state_dict(torch.load(vgg_file, weights_only=True), strict=False)  # features.* only
    layers = [torch.nn.AvgPool2d(2, 2) if isinstance(m, torch.nn.MaxPool2d) else m for m in reference.features[:30]]
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def relu_outputs(x):  # (B, 1, H, W) in [-1, 1] -> the 13 ReLU outputs
        x, out = ((x + 1) / 2).repeat(1, 3, 1, 1).sub(mean).div(std), []
        for layer in layers:
            x = layer(x)
            if isinstance(layer, torch.nn.ReLU):
                out.append(x.clone())
        return out

    target, preds, index = images(2, 32), images(3, 32, seed=7), torch.tensor([1, 0, 1])
    with torch.no_grad():
        want = sum(((p - t[index]) ** 2).flatten(1).mean(1) for p, t in zip(relu_outputs(preds), relu_outputs(target)))
    loss_fn = PerceptualLoss(weights_path=vgg_file)
    for recompute in (False, True):
        if recompute:
            for block in loss_fn.blocks:
                wrap_forward(block, recomputed)
        got = loss_fn(preds.requires_grad_(recompute), loss_fn.target_features(target), index)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert len(relu_outputs(target)) == 13 and float(want.min()) > 0


def test_perceptual_loss_random_weights_only_when_asked():
    with pytest.raises(ValueError, match="allow_random"):
        PerceptualLoss(pretrained=False)
    assert (perceptual(PerceptualLoss(pretrained=False, allow_random=True), images(), images(seed=1)) > 0).all()


def test_missing_weights_name_the_file_and_the_fix(offline_hub, tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        PerceptualLoss()
    message = str(err.value)
    assert "vgg19-dcbb9e9d.pth" in message and "https://download.pytorch.org/models/" in message
    assert str(offline_hub / "checkpoints") in message and "train.vgg_weights" in message
    assert "\n" not in message
    with pytest.raises(MissingWeightsError, match="nope.pth"):
        PerceptualLoss(weights_path=tmp_path / "nope.pth")


# ----------------------------------------------------------------------------- LPIPS
def test_lpips_from_a_weights_file(alexnet_file):
    metric = LPIPSMetric.try_create(alexnet_file)
    assert metric is not None
    target, pred = images(3, 64), images(3, 64, seed=6)
    same, diff = metric(target, target), metric(pred, target)
    assert same.shape == diff.shape == (3,)
    assert torch.allclose(same, torch.zeros(3), atol=1e-6) and (diff > 0).all()
    total, mean = lpips_volume(metric, pred[:, 0].numpy(), target[:, 0].numpy(), batch=2)
    assert total == pytest.approx(float(diff.sum()), rel=1e-5) and mean == pytest.approx(total / 3)


def test_lpips_without_weights_is_none_with_one_warning(offline_hub, monkeypatch, caplog):
    monkeypatch.setattr(metrics, "_lpips_warned", False)
    with caplog.at_level(logging.WARNING, logger="vq.metrics"):
        assert LPIPSMetric.try_create() is None
        assert LPIPSMetric.try_create() is None
    warned = [r for r in caplog.records if r.name == "vq.metrics"]
    assert len(warned) == 1 and "alexnet-owt-7be5be79.pth" in warned[0].getMessage()


# ----------------------------------------------------------------------------- consistency
def test_consistency_mse_zero_for_equal_latents_and_foreground_only():
    torch.manual_seed(0)
    latent = torch.randn(2, 3, 8, 8, requires_grad=True)
    img = torch.full((2, 1, 32, 32), -1.0)
    img[:, :, 8:24, 8:24] = 0.5  # foreground = latent rows/cols 2..5
    loss, parts = consistency_loss(latent, latent, img, img, contrast=False)
    assert loss.item() == 0.0 and parts["contrast"].item() == 0.0

    other = latent.detach() + 0.1 * torch.randn_like(latent)
    base, _ = consistency_loss(latent, other, img, img, contrast=False)
    other_bg = other.clone()
    other_bg[:, :, :2] += 5.0  # background latent rows only
    moved, _ = consistency_loss(latent, other_bg, img, img, contrast=False)
    assert base.item() > 0 and moved.item() == pytest.approx(base.item())

    empty = torch.full_like(img, -1.0)
    assert consistency_loss(latent, other, empty, empty, contrast=False, mse_over="foreground")[0].item() == 0.0


@pytest.mark.parametrize("mse_over, expected", [("all", 0.5), ("foreground", 2.0)])
def test_consistency_mse_averages_over_all_positions_like_the_reference(mse_over, expected):
    """Latents 0 and 1 on 16 of 64 foreground positions: each side's squared difference is 1, so the
    symmetric sum is 2 per foreground element; the reference divides by all 64 positions."""
    img = torch.full((1, 1, 32, 32), -1.0)
    img[:, :, 8:24, 8:24] = 0.5  # 4 x 4 of the 8 x 8 latent positions
    zeros, ones = torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8)
    loss, _ = consistency_loss(zeros, ones, img, img, contrast=False, mse_over=mse_over)
    assert loss.item() == pytest.approx(expected)


@pytest.mark.parametrize("batch", [1, 2])
def test_contrastive_values_on_identical_vectors(batch):
    """Every latent vector equal: each anchor's 2M - 1 candidates are equally similar, so SupCon is
    log(2M - 1) per sample. 64 positions keep M = 8. The reference applies it both ways (2 log 15 per
    sample) and divides the batch sum by the batch size twice; the paper text's reading averages one."""
    latent = torch.ones(batch, 3, 8, 8)
    img = torch.zeros(batch, 1, 32, 32)
    _, ref = consistency_loss(latent, latent.clone(), img, img, contrast=True, variant="reference")
    _, text = consistency_loss(latent, latent.clone(), img, img, contrast=True, variant="text")
    assert ref["contrast"].item() == pytest.approx(2 * math.log(15) / batch, rel=1e-5)
    assert text["contrast"].item() == pytest.approx(math.log(15), rel=1e-5)


def test_density_is_lowest_for_the_odd_vector_out():
    """Two equal unit vectors and one orthogonal to them: the odd one is least dense. (Summing a row of
    a row-normalised softmax, the classic slip, would give every position the same density, 1.)"""
    from vq.losses import _density

    vectors = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    density = _density(vectors)
    assert density[2] < density[0] == density[1]
    e = math.e
    # column j of softmax(S) over the anchors: exp(s_ij) / sum_k exp(s_kj); row sums written out
    assert density[2].item() == pytest.approx(2 / (2 * e + 1) + e / (2 + e), rel=1e-6)


def test_reference_contrast_ranks_the_source_latent_over_all_positions():
    """Only the source latent's density picks positions, background included: a target latent that
    differs at background positions changes the reference's value (those positions can be chosen),
    while its density plays no part (permuting target rows outside the chosen set changes nothing)."""
    torch.manual_seed(0)
    lat_i = torch.randn(1, 3, 8, 8)
    img = torch.full((1, 1, 32, 32), -1.0)
    img[:, :, :16] = 0.5  # foreground: the first 4 latent rows
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    mask[:, :, :4] = True
    from vq.losses import contrast_reference, _density
    vec = F.normalize(lat_i, dim=1).flatten(2).transpose(1, 2) * mask.flatten(2).transpose(1, 2)
    chosen = _density(vec).argsort(dim=1)[0, :8]
    assert (chosen >= 32).any()  # background positions (density of a zero vector) are among the chosen
    lat_j = lat_i + 0.05 * torch.randn_like(lat_i)
    base = contrast_reference(lat_i, lat_j, mask)
    moved = lat_j.clone().flatten(2)
    outside = torch.tensor([k for k in range(64) if k not in chosen.tolist()])
    moved[:, :, outside] = moved[:, :, outside.roll(1)]
    assert contrast_reference(lat_i, moved.view_as(lat_j), mask).item() == pytest.approx(base.item(), rel=1e-6)
    bg = [k for k in chosen.tolist() if k >= 32][0]
    flipped = lat_j.clone().flatten(2)
    flipped[:, :, bg] *= -1
    assert contrast_reference(lat_i, flipped.view_as(lat_j), mask).item() > base.item() + 0.1


def test_contrastive_term_prefers_aligned_latents():
    torch.manual_seed(0)
    latent_i = torch.randn(2, 3, 16, 16)
    img = torch.zeros(2, 1, 64, 64)  # all foreground
    aligned = latent_i + 0.01 * torch.randn_like(latent_i)
    perm = torch.randperm(16 * 16)
    shuffled = latent_i.flatten(2)[:, :, perm].view_as(latent_i)
    _, parts_aligned = consistency_loss(latent_i, aligned, img, img, contrast=True)
    _, parts_shuffled = consistency_loss(latent_i, shuffled, img, img, contrast=True)
    assert 0 < parts_aligned["contrast"] < parts_shuffled["contrast"]


def test_contrastive_gradient_reaches_both_latents():
    torch.manual_seed(0)
    latent_i = torch.randn(1, 3, 8, 8, requires_grad=True)
    latent_j = torch.randn(1, 3, 8, 8, requires_grad=True)
    img = torch.zeros(1, 1, 32, 32)
    loss, _ = consistency_loss(latent_i, latent_j, img, img, contrast=True, max_positions=32)
    loss.backward()
    assert latent_i.grad.abs().sum() > 0 and latent_j.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- brain-region and contrast metrics
def test_region_psnr_and_ssim_known_values():
    from vq.metrics import region_psnr

    target = torch.full((8, 16, 16), -1.0)
    target[:, 4:12, 4:12] = 0.5
    pred = target.clone()
    pred[:, 4:12, 4:12] += 0.1  # error 0.1 on the 512 brain voxels only
    brain = target > -1
    assert region_psnr(pred, target, brain) == pytest.approx(10 * math.log10(4 / 0.01), rel=1e-5)  # 26.02 dB
    assert float(psnr(pred, target)) == pytest.approx(10 * math.log10(4 / (0.01 * 512 / 2048)), rel=1e-5)
    same = ssim3d_regions(target.numpy(), target.numpy(), {"brain": brain.numpy()})
    assert same["ssim"] == pytest.approx(1.0) and same["ssim_brain"] == pytest.approx(1.0)
    assert np.isnan(ssim3d_regions(pred.numpy(), target.numpy(), {"none": np.zeros((8, 16, 16), bool)})["ssim_none"])


def _labelled_slices():
    """A (8, 64, 64) stack with three tissues in [-1, 1] (background -1) and its label map:
    label 3 (reference, 0.6), 2 (0.2), 1 (-0.4), textured."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.zeros(8, 64, 64, dtype=torch.long)
    labels[:, 8:56, 8:56] = 1
    labels[:, 16:48, 16:48] = 2
    labels[:, 24:40, 24:40] = 3
    level = torch.tensor([-1.0, -0.4, 0.2, 0.6])
    image = level[labels] + 0.05 * torch.randn(8, 64, 64, generator=gen) * (labels > 0)
    return image, labels


def test_contrast_scores_known_ratios_and_order():
    from vq.metrics import contrast_scores

    image, labels = _labelled_slices()
    classes, reference = {"a": 1, "b": 2}, labels == 3
    scores, ratios = contrast_scores(image, image, labels, classes, reference, "ref")
    assert scores == {"contrast_error": 0.0, "tissue_order": 1.0}
    # intensities mapped to [0, 1]: a 0.3, b 0.6, reference 0.8
    assert ratios["a"][1] == pytest.approx(0.3 / 0.8, abs=0.01) and ratios["b"][1] == pytest.approx(0.6 / 0.8, abs=0.01)
    swapped = image.clone()
    swapped[labels == 1], swapped[labels == 2] = image[labels == 2].mean(), image[labels == 1].mean()
    scores, _ = contrast_scores(swapped, image, labels, classes, reference, "ref")
    assert scores["tissue_order"] == 0.0 and scores["contrast_error"] == pytest.approx(0.375, abs=0.01)


def test_blurred_and_constant_predictions_score_worse_inside_the_brain():
    """A smooth brain-shaped blur keeps the background exact, which the whole-image numbers reward; the
    brain-region numbers and the contrast see that the tissues are gone."""
    from scipy.ndimage import gaussian_filter

    from vq.metrics import contrast_scores, region_psnr

    target, labels = _labelled_slices()
    brain = target > -1
    blurred = torch.where(brain, torch.from_numpy(gaussian_filter(target.numpy(), (0, 6, 6))).float(), target)
    constant = torch.where(brain, target[brain].mean(), target)
    classes, reference = {"a": 1, "b": 2}, labels == 3
    truth, _ = contrast_scores(target, target, labels, classes, reference)
    for pred, least_error in ((blurred, 0.005), (constant, 0.2)):  # a blur keeps a large region's mean, roughly
        whole = ssim3d_regions(pred.numpy(), target.numpy(), {"brain": brain.numpy()})
        assert whole["ssim_brain"] < whole["ssim"] < 1.0
        assert region_psnr(pred, target, brain) < float(psnr(pred, target))
        scores, _ = contrast_scores(pred, target, labels, classes, reference)
        assert scores["contrast_error"] > truth["contrast_error"] + least_error
    assert contrast_scores(constant, target, labels, classes, reference)[0]["tissue_order"] == 0.0


def test_the_reference_contrastive_term_has_finite_gradients_at_a_zero_latent_vector():
    """A quantized latent can be exactly 0 at a position (a code at the origin); dividing by its norm as
    the reference does gives 0/0 and NaN weights after one step (seen with the demo's contrastive term
    from the first step). The floor on the norm changes no other value."""
    from vq.losses import contrast_reference

    torch.manual_seed(0)
    lat_i, lat_j = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    mask = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    reference = contrast_reference(lat_i, lat_j, mask)
    lat_i[0, :, 2, 3] = 0.0
    lat_i.requires_grad_(True)
    loss = contrast_reference(lat_i, lat_j, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lat_i.grad).all()
    assert torch.isfinite(reference)
