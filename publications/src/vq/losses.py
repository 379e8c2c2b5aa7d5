"""Image and latent losses of the training step (docs/method.md, "Training step" 5-6).

- `ssim_loss`: 1 - SSIM, 7x7 uniform window.
- `PerceptualLoss`: VGG19 features (avg-pool), MSE at every ReLU of the first 30 layers.
- `consistency_loss`: foreground MSE between the two sequences' latents, plus the
  density-selected contrastive (InfoNCE) term after its warm-up.

The VQ loss belongs to the quantizer (`vq.models.quantizer`) and is not repeated here.
All images are (B, 1, H, W) in [-1, 1].
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import VGG19_Weights
from torchvision.models.vgg import cfgs, make_layers

from .weights import MissingWeightsError, load_pretrained_state

log = logging.getLogger(__name__)

BACKGROUND = -1.0
"""Intensity of the background after normalisation to [-1, 1]."""


# ----------------------------------------------------------------------------- SSIM
def ssim_loss(pred: Tensor, target: Tensor, win: int = 7, k1: float = 0.01, k2: float = 0.03,
              reduction: str = "mean") -> Tensor:
    """1 - SSIM; (B, C, H, W) -> scalar (mean over the batch) or (B,) with reduction="none".

    Uniform `win` x `win` window without padding (only windows fully inside the image,
    as scikit-image averages them) and sample covariance (N / (N - 1)), so that
    1 - ssim_loss equals skimage.metrics.structural_similarity of each 2D image.
    Data range L = max(2, target max) per image, C1 = (k1 L)^2, C2 = (k2 L)^2 (docs/method.md).
    Computed in fp32: the variance (E[x^2] - E[x]^2) cancels badly in bf16.
    """
    with torch.autocast(pred.device.type, enabled=False):
        pred, target = pred.float(), target.float()
        data_range = torch.clamp(target.detach().amax(dim=(1, 2, 3), keepdim=True), min=2.0)  # (B,1,1,1)
        c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
        pool = lambda t: F.avg_pool2d(t, win, stride=1)  # (B, C, H, W) -> (B, C, H-win+1, W-win+1)
        cov_norm = win * win / (win * win - 1)
        mu_p, mu_t = pool(pred), pool(target)
        var_p = cov_norm * (pool(pred * pred) - mu_p ** 2)
        var_t = cov_norm * (pool(target * target) - mu_t ** 2)
        cov = cov_norm * (pool(pred * target) - mu_p * mu_t)
        ssim_map = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)
                    / ((mu_p ** 2 + mu_t ** 2 + c1) * (var_p + var_t + c2)))
        per_image = 1 - ssim_map.flatten(1).mean(1)  # (B,)
        return per_image if reduction == "none" else per_image.mean()


# ----------------------------------------------------------------------------- perceptual
def perceptual_loss_for(cfg, device: torch.device, untrained_if_missing: bool = False) -> "PerceptualLoss | None":
    """The perceptual network a run trains with: None with train.lambda_per 0; a missing VGG19 file
    stops the run at start-up, naming the way round it. `untrained_if_missing` (benchmarks): without the file,
    an untrained VGG19 of the same shape, which costs the same time and FLOPs (logged)."""
    if cfg.train.lambda_per <= 0:
        return None
    try:
        return PerceptualLoss(weights_path=cfg.train.vgg_weights).to(device)
    except MissingWeightsError as err:
        if untrained_if_missing:
            log.warning("%s: timing an untrained VGG19 of the same shape", err)
            return PerceptualLoss(pretrained=False, allow_random=True).to(device)
        raise MissingWeightsError(f"{err}; or train without the perceptual loss: --set train.lambda_per=0") from None


class PerceptualLoss(nn.Module):
    """Sum over the ReLU outputs of VGG19 `features[:30]` of the feature MSE (docs/method.md, step 5).

    Max-pools are replaced by average pools (same kernel and stride). Each layer's
    MSE is a mean over its elements; the 13 layer values are summed, as the
    reference does. Inputs in [-1, 1] are mapped to [0, 1], the single channel is
    repeated to RGB and ImageNet-normalised. VGG is frozen (no grads, eval mode).

    The clean targets' features are computed once (`target_features`) and shared by
    the predictions compared with them; `forward` gives one loss per prediction.
    """

    n_layers = 30

    def __init__(self, weights_path: str | Path | None = None, pretrained: bool = True,
                 allow_random: bool = False):
        super().__init__()
        features = make_layers(cfgs["E"])[: self.n_layers]  # VGG19 `features` without the classifier
        self.pretrained = pretrained
        if pretrained:
            state = load_pretrained_state(VGG19_Weights.IMAGENET1K_V1, weights_path,
                                          purpose="VGG19 ImageNet weights for the perceptual loss",
                                          config_key="train.vgg_weights")
            prefix = "features."
            features.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)
                                      and int(k.split(".")[1]) < self.n_layers})
        elif allow_random:
            log.warning("PerceptualLoss with RANDOM VGG19 weights: for benchmarks and tests only")
        else:
            raise ValueError("PerceptualLoss(pretrained=False) needs allow_random=True (benchmarks/tests only)")
        layers = [nn.AvgPool2d(m.kernel_size, m.stride) if isinstance(m, nn.MaxPool2d) else m for m in features]
        starts = [0] + [k for k, m in enumerate(layers) if isinstance(m, nn.AvgPool2d)]  # a block starts at a pool
        self.blocks = nn.ModuleList(VGGBlock(layers[a:b]) for a, b in zip(starts, starts[1:] + [len(layers)]))
        self.blocks.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.blocks.eval()  # frozen feature extractor, whatever the caller's mode
        return self

    def _input(self, images: Tensor) -> Tensor:
        x = ((images + 1) / 2).expand(-1, 3, -1, -1)  # [-1, 1] -> [0, 1], grey -> RGB
        return (x - self.mean) / self.std

    def features(self, images: Tensor) -> list[Tensor]:
        """(B, 1, H, W) in [-1, 1] -> the 13 ReLU outputs, (B, C_l, H_l, W_l) each."""
        x = self._input(images)
        out = []
        for layer in (layer for block in self.blocks for layer in block.layers):
            x = layer(x)
            if isinstance(layer, nn.ReLU):
                out.append(x)  # the in-place ReLU's output is not modified by later layers
        return out

    @torch.no_grad()
    def target_features(self, target: Tensor) -> list[Tensor]:
        """Features of a clean target, to reuse across the predictions that share it."""
        return self.features(target)

    def forward(self, preds: Tensor, target_feats: list[Tensor], index: Tensor) -> Tensor:
        """(N, 1, H, W) predictions vs `target_features` of the clean targets -> (N,) losses.

        `index`: (N,) the target row of each prediction. Runs VGG block by block, each block
        returning its output and its layers' losses: the rows of the target features are
        gathered inside a block, so the N-row copies never all exist at once.
        """
        x, loss, feats = self._input(preds), 0.0, iter(target_feats)
        for block in self.blocks:
            x, part = block(x, index, *[next(feats) for _ in range(block.n_relu)])
            loss = loss + part
        return loss


class VGGBlock(nn.Module):
    """VGG layers from a pooling layer to the next and their part of the perceptual loss."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.Sequential(*layers)
        self.n_relu = sum(isinstance(layer, nn.ReLU) for layer in layers)

    def forward(self, x: Tensor, index: Tensor, *targets: Tensor) -> tuple[Tensor, Tensor]:
        """At each ReLU, the per-sample feature MSE against the next target's rows `index`: -> (x, (N,) loss)."""
        loss, targets = 0.0, iter(targets)
        for layer in self.layers:
            x = layer(x)
            if isinstance(layer, nn.ReLU):
                loss = loss + (x.float() - next(targets)[index].float()).pow(2).flatten(1).mean(1)
        return x, loss


# ----------------------------------------------------------------------------- consistency
def foreground_mask(img_i: Tensor, img_j: Tensor, size: tuple[int, int]) -> Tensor:
    """Pixels where neither image is background (<= -1), at latent size (nearest):
    2 x (B, 1, H, W) -> (B, 1, h, w) bool."""
    fg = ((img_i > BACKGROUND) & (img_j > BACKGROUND)).float()
    return F.interpolate(fg, size=size, mode="nearest") > 0.5


def _density(vectors: Tensor, temperature: float = 1.0) -> Tensor:
    """(..., N, D) vectors -> (..., N) density: softmax of the similarity matrix over the
    anchors' axis (each column sums to 1), summed over the row. Summing a row of a
    row-normalised softmax would give 1 for every position."""
    sim = vectors @ vectors.transpose(-1, -2) / temperature  # (..., N, N)
    return sim.softmax(dim=-2).sum(dim=-1)


def _info_nce(view_a: Tensor, view_b: Tensor, temperature: float) -> Tensor:
    """SupCon with two views and no labels (SimCLR's loss): (..., M, D) x 2, row k of both is the
    positive pair -> (...) mean over the 2M anchors.

    Each of the 2M vectors is an anchor; its only positive is the other view's vector at the
    same position, the negatives are the other 2M - 2 vectors of both views. With temperature
    equal to SupCon's base temperature, SupCon's factor T / T_base is 1.
    """
    m = view_a.shape[-2]
    feats = torch.cat([view_a, view_b], dim=-2)  # (..., 2M, D)
    logits = feats @ feats.transpose(-1, -2) / temperature  # (..., 2M, 2M)
    logits = logits.masked_fill(torch.eye(2 * m, dtype=torch.bool, device=feats.device), float("-inf"))
    positive = torch.arange(2 * m, device=feats.device).roll(m)  # k <-> k + M
    log_prob = logits.log_softmax(dim=-1).gather(-1, positive.expand(*logits.shape[:-2], -1)[..., None])
    return -log_prob.squeeze(-1).mean(-1)


def contrast_reference(lat_i: Tensor, lat_j: Tensor, mask: Tensor, temperature: float = 0.07,
                       keep: float = 0.125) -> Tensor:
    """The reference code's contrastive term: (B, D, h, w) x 2 latents, (B, 1, h, w) mask -> scalar.

    Latent vectors are L2-normalised; the density comes from the source latent alone, times the
    mask (background vectors become 0), over all h x w positions and without a temperature; the
    floor(keep x h x w) lowest-density positions of ALL positions (background included) are
    contrasted with SupCon both ways, (z_i, z_j) and (z_j, z_i), summed per sample; the batch sum
    is divided by the batch size twice.
    """
    batch = lat_i.shape[0]
    # (the reference divides by the norm as it is: the floor only changes a zero vector, 0/0 = NaN there)
    vec_i = (lat_i / lat_i.norm(dim=1, keepdim=True).clamp_min(1e-12)).flatten(2).transpose(1, 2)  # -> (B, N, D)
    vec_j = (lat_j / lat_j.norm(dim=1, keepdim=True).clamp_min(1e-12)).flatten(2).transpose(1, 2)
    n_keep = int(vec_i.shape[1] * keep)
    with torch.no_grad():  # the ranking only selects positions
        masked = vec_i * mask.flatten(2).transpose(1, 2)  # (B, N, D), background rows 0
        sparse = _density(masked).argsort(dim=1)[:, :n_keep]  # (B, n_keep)
    index = sparse[..., None].expand(-1, -1, vec_i.shape[2])  # (B, n_keep, D)
    sel_i, sel_j = vec_i.gather(1, index), vec_j.gather(1, index)
    # SupCon((z_i, z_j)) + SupCon((z_j, z_i)): the same anchors in the other order, the same value
    per_sample = _info_nce(sel_i, sel_j, temperature) + _info_nce(sel_j, sel_i, temperature)  # (B,)
    return per_sample.sum() / batch / batch


def _contrast_text(lat_i: Tensor, lat_j: Tensor, mask: Tensor, temperature: float, keep: float,
                   max_positions: int) -> Tensor:
    """The paper text's reading of the contrastive term, per sample over foreground positions only:
    a position's density is the sum of its two vectors' densities (at the temperature) within
    both latents' foreground vectors, the `keep` share of lowest density (at least 2) enters one
    symmetric InfoNCE; mean over the samples. At most `max_positions` random foreground positions
    per sample bound the (2N)^2 similarity matrix."""
    terms = []
    for b in range(lat_i.shape[0]):
        fg = mask[b, 0].flatten().nonzero().squeeze(1)  # (N,) foreground position indices
        if fg.numel() > max_positions:
            fg = fg[torch.randperm(fg.numel(), device=fg.device)[:max_positions]]
        n = fg.numel()
        if n < 2:  # no negatives to contrast with
            continue
        vec_i = F.normalize(lat_i[b].flatten(1)[:, fg].T, dim=1)  # (D, h*w) -> (N, D)
        vec_j = F.normalize(lat_j[b].flatten(1)[:, fg].T, dim=1)
        with torch.no_grad():
            density = _density(torch.cat([vec_i, vec_j]), temperature).view(2, n).sum(0)  # (N,)
            sparse = density.topk(min(n, max(2, math.ceil(keep * n))), largest=False).indices
        terms.append(_info_nce(vec_i[sparse], vec_j[sparse], temperature))
    return torch.stack(terms).mean() if terms else lat_i.new_zeros(())


def consistency_loss(latent_i: Tensor, latent_j: Tensor, img_i: Tensor, img_j: Tensor, contrast: bool,
                     temperature: float = 0.07, keep: float = 0.125, mse_over: str = "all",
                     variant: str = "reference", max_positions: int = 2048) -> tuple[Tensor, dict[str, Tensor]]:
    """Consistency of the two sequences' latents on the foreground (docs/method.md, step 6).

    latent_*: (B, D, h, w) quantized latents; img_*: (B, 1, H, W) clean images in [-1, 1].
    Returns (mse + contrast, {"mse", "contrast"} detached).

    mse: symmetric, each side against the detached other, of the latents times the foreground
    mask; averaged over all B x D x h x w elements (`mse_over="all"`, the reference: background
    counts as 0) or over the foreground elements only (`"foreground"`; 0 without foreground).
    contrast (when `contrast`): `variant="reference"` is `contrast_reference`, `"text"` the
    the paper text's reading (`_contrast_text`). Computed in fp32.
    """
    mask = foreground_mask(img_i, img_j, latent_i.shape[-2:])  # (B, 1, h, w)
    with torch.autocast(latent_i.device.type, enabled=False):
        lat_i, lat_j = latent_i.float(), latent_j.float()
        sq = (lat_i - lat_j.detach()).pow(2) + (lat_j - lat_i.detach()).pow(2)  # (B, D, h, w)
        if mse_over == "all":
            mse = (sq * mask).mean()
        else:  # clamp: an empty foreground gives 0, with no host sync
            mse = (sq * mask).sum() / (mask.sum().clamp(min=1) * lat_i.shape[1])
        nce = lat_i.new_zeros(())
        if contrast:
            nce = (contrast_reference(lat_i, lat_j, mask, temperature, keep) if variant == "reference"
                   else _contrast_text(lat_i, lat_j, mask, temperature, keep, max_positions))
    return mse + nce, {"mse": mse.detach(), "contrast": nce.detach()}
