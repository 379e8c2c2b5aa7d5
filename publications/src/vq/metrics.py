"""Image-quality metrics, one definition for training, testing and tools (docs/method.md, "Evaluation protocol").

All images are in [-1, 1], so the data range is 2.
- `psnr`: torch, per sample of a batch or over a whole 3D stack.
- `ssim3d`: scikit-image SSIM of the whole (128, 192, 192) stack as one 3D array.
- `LPIPSMetric` / `lpips_volume`: LPIPS (AlexNet, v0.1) per slice. The paper's
  table reports the SUM over the 128 slices of a stack (`lpips`), not a mean;
  `lpips_mean` is the per-slice mean.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchvision.models import AlexNet_Weights

from .weights import MissingWeightsError, load_pretrained_state

log = logging.getLogger(__name__)

DATA_RANGE = 2.0
"""Images live in [-1, 1]."""


def psnr(pred: Tensor, target: Tensor, data_range: float = DATA_RANGE) -> Tensor:
    """Peak signal-to-noise ratio in dB.

    (B, C, H, W) -> (B,) one value per sample; a 3D stack (S, H, W) (or any
    tensor of fewer than 4 dims) -> one value over all its voxels, as the test
    protocol computes it per volume. Identical inputs give inf.
    """
    err = (pred.float() - target.float()).pow(2)
    mse = err.flatten(1).mean(1) if err.dim() >= 4 else err.mean()
    return 10 * torch.log10(data_range ** 2 / mse)


def ssim3d(pred: np.ndarray, target: np.ndarray, data_range: float = DATA_RANGE) -> float:
    """SSIM of a whole stack, e.g. (128, 192, 192), as one 3D array, computed by scikit-image.

    `skimage.metrics.structural_similarity` with its defaults (7x7x7 uniform window,
    sample covariance, k1=0.01, k2=0.03) and data_range=2, as the paper's table.
    The stacks go in as float32, so scikit-image computes in float32 as it does
    for the model's float32 output: about 1 s per stack on 2 CPU cores, twice as
    fast as float64, whose value differs by under 1e-7 on phantom stacks.
    """
    from skimage.metrics import structural_similarity

    return float(structural_similarity(np.asarray(target, np.float32), np.asarray(pred, np.float32),
                                       data_range=data_range))


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
