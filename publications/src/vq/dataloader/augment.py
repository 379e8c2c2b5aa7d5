"""Intensity augmentation of the model inputs (docs/method.md, training step 1), batched on the device.

Images in [-1, 1] are mapped to [0, 1]; each transform is applied to each
sample with probability p: brightness x(1+u/50), contrast around the mean
x(1+u/50), gamma 1+u/50 (u ~ U(0.1, 1.1)), an additive degree-2 polynomial
bias field normalised to [0, 1] and scaled by 0.2 U(0, 1), Gaussian noise of
std 0.05 U(0, 1); the whole augmentation is skipped per sample with p_skip.

Two modes (`data.augment_mode`):
- "reference" (the reference code, so the paper configs): the whole image,
  background included; contrast around the whole-image mean; no clamp, so
  inputs may leave [-1, 1]; the bias field is sum_{i,j<=2} c_ij x^i y^j over
  raw pixel coordinates (x = column, y = row, 0..W-1 and 0..H-1) with c_ij ~
  N(0, 1), min-max normalised (the highest powers dominate it).
- "foreground": background pixels (exactly -1, as normalisation and padding
  leave them) stay -1, contrast around the foreground mean, the result is
  clamped to [-1, 1], and the field has the 5 non-constant monomials of
  coordinates in [-1, 1] with U(-1, 1) coefficients. BraTS is skull-stripped
  with a zero background, so augmented inputs stay inside the distribution of
  real inputs.
The losses and the consistency foreground mask use the clean images either way.
"""
from __future__ import annotations

import torch


MODES = ("reference", "foreground")


class IntensityAugment:
    def __init__(self, p: float = 0.5, p_skip: float = 0.5, mode: str = "reference"):
        if mode not in MODES:
            raise ValueError(f"augmentation mode {mode!r}; valid: {', '.join(MODES)}")
        self.p, self.p_skip, self.mode = p, p_skip, mode

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> augmented (B, C, H, W) in [-1, 1]; a generator makes it reproducible."""
        batch, _, height, width = images.shape
        device = images.device
        rng_device = generator.device if generator is not None else device

        def rand(*shape):  # U(0, 1) drawn on the generator's device, used on the images'
            return torch.rand(shape, generator=generator, device=rng_device).to(device)

        def coin(p):  # (B, 1, 1, 1) per-sample yes/no
            return rand(batch, 1, 1, 1) < p

        def factor():  # 1 + u/50, u ~ U(0.1, 1.1)
            return 1 + (0.1 + rand(batch, 1, 1, 1)) / 50

        reference = self.mode == "reference"
        fg = torch.ones_like(images, dtype=torch.bool) if reference else images > -1
        clean = (images.float() + 1) / 2  # [-1, 1] -> [0, 1]
        out = torch.where(coin(self.p), clean * factor(), clean)  # brightness
        mean = (out * fg).sum((1, 2, 3), keepdim=True) / fg.sum((1, 2, 3), keepdim=True).clamp_min(1)
        out = torch.where(coin(self.p), (out - mean) * factor() + mean, out)  # contrast around the mean
        out = torch.where(coin(self.p), out.clamp_min(0) ** factor(), out)  # gamma
        if reference:
            field = _reference_field(torch.randn(batch, 9, generator=generator, device=rng_device).to(device),
                                     height, width)
        else:
            field = _unit_field(rand(batch, 5) * 2 - 1, height, width)
        out = torch.where(coin(self.p), out + 0.2 * rand(batch, 1, 1, 1) * field, out)  # bias field
        noise = torch.randn(images.shape, generator=generator, device=rng_device).to(device)
        out = torch.where(coin(self.p), out + 0.05 * rand(batch, 1, 1, 1) * noise, out)
        if not reference:
            out = out.clamp(0, 1)
        out = (out * 2 - 1).to(images.dtype)  # back to [-1, 1] (beyond it in reference mode)
        # skipped samples (and, in foreground mode, background) are returned bit-exact
        return torch.where(fg & ~coin(self.p_skip), out, images)


def _normalise(field: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) min-max normalised to [0, 1] per sample."""
    low = field.amin((2, 3), keepdim=True)
    high = field.amax((2, 3), keepdim=True)
    return (field - low) / (high - low).clamp_min(1e-12)


def _unit_field(coeffs: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Foreground mode's field: sum_k c_k m_k(x, y) over the degree-2 monomials of coordinates in
    [-1, 1], normalised to [0, 1]. coeffs: (B, 5) -> (B, 1, H, W); the constant monomial is left
    out, normalisation removes it."""
    ys = torch.linspace(-1, 1, height, device=coeffs.device)
    xs = torch.linspace(-1, 1, width, device=coeffs.device)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    monomials = torch.stack([xx, yy, xx * xx, xx * yy, yy * yy])  # (5, H, W)
    return _normalise(torch.einsum("bk,khw->bhw", coeffs, monomials)[:, None])


def _reference_field(coeffs: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The reference's field: sum_{i,j=0..2} c_ij x^i y^j over raw pixel coordinates (x = column
    0..W-1, y = row 0..H-1), normalised to [0, 1]. coeffs: (B, 9), c_ij at 3i + j -> (B, 1, H, W).
    Float64: x^2 y^2 reaches ~1e9 on a 192 crop, where float32 would round the smaller terms away."""
    ys = torch.arange(height, device=coeffs.device, dtype=torch.float64)
    xs = torch.arange(width, device=coeffs.device, dtype=torch.float64)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    monomials = torch.stack([xx**i * yy**j for i in range(3) for j in range(3)])  # (9, H, W)
    field = torch.einsum("bk,khw->bhw", coeffs.double(), monomials)[:, None]
    return _normalise(field).float()
