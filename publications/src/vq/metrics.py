"""Image-quality metrics, one definition for training, testing and tools (docs/method.md, "Evaluation protocol").

All images are in [-1, 1], so the data range is 2.
- `psnr`: torch, per sample of a batch or over a whole 3D stack.
- `ssim3d_regions`: scikit-image SSIM of the whole (128, 192, 192) stack as one 3D array.
- `LPIPSMetric` / `lpips_volume`: LPIPS (AlexNet, v0.1) per slice. The paper's
  table reports the SUM over the 128 slices of a stack (`lpips`), not a mean;
  `lpips_mean` is the per-slice mean.
- `region_psnr`, and the regions of `ssim3d_regions`: the same inside a region (the brain: a stack
  that is three quarters background rewards a smooth brain-shaped mean on the
  whole image, not inside the brain).
- `contrast_scores`: the mean intensity of each tissue relative to a reference
  tissue, in the prediction and in the real image, and how far apart they are.
- `dice` / `region_dice`: overlap of segmentations, per BraTS tumour region.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchvision.models import AlexNet_Weights

from .labels import TUMOUR_REGIONS
from .weights import MissingWeightsError, load_pretrained_state

log = logging.getLogger(__name__)

DATA_RANGE = 2.0
"""Images live in [-1, 1]."""


def mean_and_std(rows: list[dict], keys) -> dict[str, float]:
    """Per key, the mean and the population std of the rows' finite values (`KEY`, `KEY_std`; NaN where
    none): the summaries of the evaluation and of BraSyn."""
    out = {}
    for key in keys:
        values = np.array([row.get(key, np.nan) for row in rows], dtype=float)
        values = values[np.isfinite(values)]
        out[key], out[f"{key}_std"] = (float(values.mean()), float(values.std())) if values.size else (np.nan, np.nan)
    return out


def brain_mask(image: Tensor) -> Tensor:
    """The brain of an image in [-1, 1]: every voxel above the background value -1."""
    return image > -1


def psnr(pred: Tensor, target: Tensor, data_range: float = DATA_RANGE) -> Tensor:
    """Peak signal-to-noise ratio in dB.

    (B, C, H, W) -> (B,) one value per sample; a 3D stack (S, H, W) (or any
    tensor of fewer than 4 dims) -> one value over all its voxels, as the test
    protocol computes it per volume. Identical inputs give inf.
    """
    err = (pred.float() - target.float()).pow(2)
    mse = err.flatten(1).mean(1) if err.dim() >= 4 else err.mean()
    return 10 * torch.log10(data_range ** 2 / mse)


def region_psnr(pred: Tensor, target: Tensor, mask: Tensor, data_range: float = DATA_RANGE) -> float:
    """PSNR over the voxels of a boolean `mask` (same shape as the images); NaN for an empty mask."""
    if not bool(mask.any()):
        return float("nan")
    mse = (pred.float() - target.float())[mask].pow(2).mean()
    return float(10 * torch.log10(data_range ** 2 / mse))


def ssim3d_regions(pred: np.ndarray, target: np.ndarray, regions: dict[str, np.ndarray] | None = None,
                   data_range: float = DATA_RANGE) -> dict[str, float]:
    """SSIM of a whole stack, e.g. (128, 192, 192), as one 3D array, and its map's mean over each boolean region.

    -> {"ssim": the whole stack's value, "ssim_<name>": map mean over region <name>} (NaN for an empty
    region). `skimage.metrics.structural_similarity` with its defaults (7x7x7 uniform window, sample
    covariance, k1=0.01, k2=0.03) and data_range=2, as the paper's table. The whole-stack value averages
    the map without its 3-voxel border, as scikit-image does; a region's mean uses all of its voxels.
    The stacks go in as float32, so scikit-image computes in float32 as it does for the model's float32
    output: about 1 s per stack on 2 CPU cores, twice as fast as float64, whose value differs by under
    1e-7 on phantom stacks.
    """
    from skimage.metrics import structural_similarity

    whole, ssim_map = structural_similarity(np.asarray(target, np.float32), np.asarray(pred, np.float32),
                                            data_range=data_range, full=True)
    out = {"ssim": float(whole)}
    for name, mask in (regions or {}).items():
        out[f"ssim_{name}"] = float(ssim_map[mask].mean()) if mask.any() else float("nan")
    return out


MIN_VOXELS = 50
"""A tissue enters the contrast scores only with at least this many voxels."""


def tissue_ratios(image: Tensor, labels: Tensor, classes: dict[str, int], reference: Tensor) -> dict[str, float]:
    """Mean intensity of each labelled class over the mean of the `reference` mask, both measured on
    the image mapped from [-1, 1] to [0, 1] (background 0); classes with too few voxels are left out."""
    values = (image.float() + 1) / 2
    base = values[reference].mean()
    return {name: float(values[labels == label].mean() / base) for name, label in classes.items()
            if int((labels == label).sum()) >= MIN_VOXELS}


def contrast_scores(pred: Tensor, target: Tensor, labels: Tensor, classes: dict[str, int], reference: Tensor,
                    reference_name: str = "reference") -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """How well a prediction keeps the real image's tissue contrast.

    -> ({"contrast_error": mean |predicted ratio - real ratio| over the classes,
         "tissue_order": 1.0 if the classes and the reference (ratio 1) sorted by ratio come in the
         same order in both images, else 0.0},
        {class: (predicted ratio, real ratio)}); ratios from `tissue_ratios`. Without a usable
    reference or class both scores are NaN.
    """
    nan = {"contrast_error": float("nan"), "tissue_order": float("nan")}
    if int(reference.sum()) < MIN_VOXELS:
        return nan, {}
    real = tissue_ratios(target, labels, classes, reference)
    fake = tissue_ratios(pred, labels, classes, reference)
    if not real:
        return nan, {}
    error = float(np.mean([abs(fake[n] - real[n]) for n in real]))
    real_order = sorted([*real, reference_name], key=lambda n: real.get(n, 1.0))
    fake_order = sorted([*real, reference_name], key=lambda n: fake.get(n, 1.0))
    return {"contrast_error": error, "tissue_order": float(real_order == fake_order)}, \
        {n: (fake[n], real[n]) for n in real}


def dice(pred: Tensor, truth: Tensor) -> float:
    """2|A n B| / (|A| + |B|) of two boolean masks; 1 when both are empty (nothing to find, nothing found)."""
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2 * int((pred & truth).sum()) / total


def region_dice(pred: Tensor, truth: Tensor) -> dict[str, float]:
    """BraTS label maps (S, H, W) -> Dice of each region of `vq.labels.TUMOUR_REGIONS` (wt, tc, et)."""
    def mask(labels, region):
        return torch.isin(labels, torch.tensor(region, device=labels.device))
    truth = truth.to(pred.device)
    return {name: dice(mask(pred, region), mask(truth, region)) for name, region in TUMOUR_REGIONS.items()}


_lpips_warned = False


class LPIPSMetric:
    """LPIPS (AlexNet, v0.1) per slice, built offline.

    The lpips package's linear layers ship inside its wheel; its AlexNet backbone is
    built random (no download) and then given torchvision's ImageNet AlexNet weights
    from `vq.weights` (cache or `weights_path`, config key test.lpips_weights).
    """

    def __init__(self, weights_path: str | Path | None = None, device: str | torch.device = "cpu"):
        import lpips

        state = load_pretrained_state(AlexNet_Weights.IMAGENET1K_V1, weights_path,
                                      purpose="AlexNet ImageNet weights for LPIPS",
                                      config_key="test.lpips_weights")
        with warnings.catch_warnings():  # lpips calls torchvision's deprecated `pretrained=` argument
            warnings.simplefilter("ignore", UserWarning)
            model = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
        # lpips puts torchvision's `features[k]` into `slice{s}.{k}` (slice1 = 0-1, ..., slice5 = 10-11).
        backbone = {name: state["features." + name.split(".", 1)[1]] for name in model.net.state_dict()}
        model.net.load_state_dict(backbone)
        self.model = model.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)

    @classmethod
    def try_create(cls, weights_path: str | Path | None = None,
                   device: str | torch.device = "cpu") -> LPIPSMetric | None:
        """The metric, or None (with one warning per process) when the AlexNet weights are missing."""
        global _lpips_warned
        try:
            return cls(weights_path, device)
        except MissingWeightsError as err:
            if not _lpips_warned:
                log.warning("LPIPS skipped: %s", err)
                _lpips_warned = True
            return None

    @torch.no_grad()
    def __call__(self, pred: Tensor, target: Tensor) -> Tensor:
        """(N, 1, H, W) in [-1, 1] x 2 -> (N,) LPIPS per slice."""
        pred, target = (t.to(self.device, torch.float32).expand(-1, 3, -1, -1) for t in (pred, target))
        return self.model(pred, target).flatten()  # (N, 1, 1, 1) -> (N,)


def lpips_volume(metric: LPIPSMetric, pred_stack, target_stack, batch: int = 32) -> tuple[float, float]:
    """LPIPS of a stack of slices, (S, H, W) or (S, 1, H, W), numpy or torch -> (sum, mean) over slices.

    The sum over the 128 slices is the number the paper's table reports (`lpips`).
    """
    pred, target = torch.as_tensor(pred_stack), torch.as_tensor(target_stack)
    if pred.dim() == 3:  # (S, H, W) -> (S, 1, H, W)
        pred, target = pred.unsqueeze(1), target.unsqueeze(1)
    values = torch.cat([metric(pred[k:k + batch], target[k:k + batch]) for k in range(0, len(pred), batch)])
    return float(values.sum()), float(values.mean())
