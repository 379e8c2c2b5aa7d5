"""Intensity augmentation of the model inputs (METHOD.md, training step 1), batched on the device.

Images in [-1, 1] are mapped to [0, 1]; each transform is applied to each
sample with probability p: brightness x(1+u/50), contrast around the mean
x(1+u/50), gamma 1+u/50 (u ~ U(0.1, 1.1)), an additive degree-2 polynomial
bias field normalised to [0, 1] and scaled by 0.2 U(0, 1), Gaussian noise of
std 0.05 U(0, 1); the whole augmentation is skipped per sample with p_skip.

Foreground only (default): background pixels (exactly -1, as normalisation and
padding leave them) stay -1. BraTS is skull-stripped with a zero background,
so this keeps augmented inputs inside the distribution of real inputs; the
losses and the consistency foreground mask use the clean images either way.
`foreground_only=False` augments the whole image.
"""
from __future__ import annotations

import torch


class IntensityAugment:
    def __init__(self, p: float = 0.5, p_skip: float = 0.5, foreground_only: bool = True):
        self.p, self.p_skip, self.foreground_only = p, p_skip, foreground_only

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

        fg = images > -1 if self.foreground_only else torch.ones_like(images, dtype=torch.bool)
        clean = (images.float() + 1) / 2  # [-1, 1] -> [0, 1]
        out = torch.where(coin(self.p), clean * factor(), clean)  # brightness
        mean = (out * fg).sum((1, 2, 3), keepdim=True) / fg.sum((1, 2, 3), keepdim=True).clamp_min(1)
        out = torch.where(coin(self.p), (out - mean) * factor() + mean, out)  # contrast around the mean
        out = torch.where(coin(self.p), out.clamp_min(0) ** factor(), out)  # gamma
        bias = 0.2 * rand(batch, 1, 1, 1) * self._bias_field(rand(batch, 5) * 2 - 1, height, width)
        out = torch.where(coin(self.p), out + bias, out)
        noise = torch.randn(images.shape, generator=generator, device=rng_device).to(device)
        out = torch.where(coin(self.p), out + 0.05 * rand(batch, 1, 1, 1) * noise, out)
        out = (out.clamp(0, 1) * 2 - 1).to(images.dtype)  # back to [-1, 1]
        # skipped samples and background are returned bit-exact
        return torch.where(fg & ~coin(self.p_skip), out, images)

    @staticmethod
    def _bias_field(coeffs: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Smooth field sum_k c_k m_k(x, y) over the degree-2 monomials, min-max normalised to [0, 1].

        coeffs: (B, 5) -> (B, 1, H, W). The constant monomial is left out: normalisation removes it.
        """
        ys = torch.linspace(-1, 1, height, device=coeffs.device)
        xs = torch.linspace(-1, 1, width, device=coeffs.device)
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        monomials = torch.stack([xx, yy, xx * xx, xx * yy, yy * yy])  # (5, H, W)
        field = torch.einsum("bk,khw->bhw", coeffs, monomials)[:, None]  # (B, 1, H, W)
        low = field.amin((2, 3), keepdim=True)
        high = field.amax((2, 3), keepdim=True)
        return (field - low) / (high - low).clamp_min(1e-6)
