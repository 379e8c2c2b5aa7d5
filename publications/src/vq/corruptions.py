"""Source-image corruptions for the anti-interference claim (docs/method.md, "Claims of the paper beyond Table 1").

Each corruption takes a stack (S, 1, H, W) in [-1, 1], works on the [0, 1]
intensity scale, and gives back a stack in [-1, 1] whose background (pixels at
-1, outside the skull-stripped brain) is still exactly -1: BraTS images are
masked, so an artefact outside the brain would only tell the model where the
brain ends. All randomness comes from the `torch.Generator` passed in, so a
(generator seed, stack) pair always gives the same corrupted stack.

Levels (`CORRUPTIONS[kind].levels`, mild / moderate / strong):
- noise:    Rician noise, sigma = 0.05 / 0.10 / 0.20 x the foreground mean.
- bias:     smooth multiplicative field 1 +- 0.25 / 0.5 / 0.8 (random degree-2 polynomial over the stack).
- ghosting: every 4th phase-encode line (k-space rows) with a phase error of 0.15 / 0.3 / 0.6 x pi,
            as periodic motion does: ghost copies at H/4 shifts along the phase-encode axis.
- spike:    two k-space spikes (herringbone stripes) of amplitude 0.05 / 0.1 / 0.2 x the foreground mean.
On the phantom's 192 x 192 stacks the corrupted source's PSNR against the clean one is about
37 / 31 / 25 dB at levels 1 / 2 / 3 for noise and spike, 39 / 33 / 29 for bias, and 30-41 / 25-31 / 21
for ghosting (the range comes from the random first line); robustness.md reports it per run.
Draws depend on the generator, not on the strength: with one seed for all levels (as the robustness
script does) a stack's corruption only grows from level to level.
"""
from __future__ import annotations

import cmath
import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

GHOST_PERIOD = 4
"""Every GHOST_PERIOD-th phase-encode line carries the phase error."""
N_SPIKES = 2


def _on_foreground(x: Tensor, corrupt: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Run `corrupt(intensity, foreground)` on the [0, 1] scale; clamp, map back, restore the -1 background."""
    foreground = x > -1  # (S, 1, H, W) bool
    out = corrupt((x.float() + 1) / 2, foreground).clamp(0, 1) * 2 - 1
    return torch.where(foreground, out, torch.full_like(out, -1.0))


def _foreground_mean(image: Tensor, foreground: Tensor) -> Tensor:
    return image[foreground].mean() if foreground.any() else image.new_zeros(())


def _randn(shape, gen: torch.Generator, like: Tensor) -> Tensor:
    """Normal draws from the generator's own device, moved to `like`'s device."""
    return torch.randn(shape, generator=gen, device=gen.device).to(like.device, like.dtype)


def rician(x: Tensor, level: float, gen: torch.Generator) -> Tensor:
    """Magnitude of the image plus complex Gaussian noise: |u + n_re + i n_im|, sigma = level x foreground mean."""
    def corrupt(u, foreground):
        sigma = level * _foreground_mean(u, foreground)
        noise = _randn((2, *u.shape), gen, u) * sigma  # real and imaginary parts
        return torch.sqrt((u + noise[0]) ** 2 + noise[1] ** 2)
    return _on_foreground(x, corrupt)


def bias_field(x: Tensor, strength: float, gen: torch.Generator) -> Tensor:
    """u x (1 + strength x f), f a random degree-2 polynomial in (slice, row, column), scaled to max |f| = 1."""
    def corrupt(u, foreground):
        s, _, h, w = u.shape
        z, r, c = torch.meshgrid(*(torch.linspace(-1, 1, n, device=u.device) for n in (s, h, w)), indexing="ij")
        terms = torch.stack([z, r, c, z * z, r * r, c * c, z * r, z * c, r * c])  # (9, S, H, W)
        field = torch.einsum("k,kshw->shw", _randn(len(terms), gen, u), terms)
        field = field - field.mean()
        field = field / field.abs().max().clamp_min(1e-8)
        return u * (1 + strength * field[:, None])  # (S, H, W) -> (S, 1, H, W)
    return _on_foreground(x, corrupt)


def ghosting(x: Tensor, strength: float, gen: torch.Generator) -> Tensor:
    """Motion ghosts: every GHOST_PERIOD-th k-space row (phase-encode axis = H), from a random first row,
    gets the phase exp(i pi strength); the magnitude image then holds ghosts shifted by H / GHOST_PERIOD.
    The first row is never the k-space centre (row 0), whose phase error would dim the whole image instead."""
    def corrupt(u, foreground):
        h = u.shape[-2]
        first = int(torch.randint(1, GHOST_PERIOD, (1,), generator=gen, device=gen.device))
        kspace = torch.fft.fft2(u)  # (S, 1, H, W) complex; row index = phase-encode line
        rows = torch.zeros(h, dtype=torch.bool, device=u.device)
        rows[first::GHOST_PERIOD] = True
        kspace[..., rows, :] *= cmath.exp(1j * math.pi * strength)
        return torch.fft.ifft2(kspace).abs()
    return _on_foreground(x, corrupt)


def spike(x: Tensor, strength: float, gen: torch.Generator) -> Tensor:
    """Herringbone: N_SPIKES bright k-space points at random non-central frequencies (the same for the stack,
    a random phase per slice). Each adds stripes of amplitude strength x foreground mean to the image."""
    def corrupt(u, foreground):
        s, _, h, w = u.shape
        kspace = torch.fft.fft2(u)  # (S, 1, H, W)
        amplitude = strength * _foreground_mean(u, foreground) * h * w  # a k-space point of A gives A/(HW) stripes
        for _ in range(N_SPIKES):
            # frequencies between 1/8 and 3/8 of the grid: clearly stripes, not a shading or aliasing
            ky, kx = (int(torch.randint(n // 8, 3 * n // 8 + 1, (1,), generator=gen, device=gen.device))
                      for n in (h, w))
            angle = torch.rand(s, generator=gen, device=gen.device).to(u.device) * 2 * torch.pi
            kspace[:, 0, ky, kx] += torch.polar(amplitude.expand(s), angle)
        return torch.fft.ifft2(kspace).abs()
    return _on_foreground(x, corrupt)


class Corruption(NamedTuple):
    fn: Callable[[Tensor, float, torch.Generator], Tensor]
    levels: tuple[float, float, float]
    """Strengths of levels 1, 2, 3 (mild, moderate, strong); level 0 is the clean image."""


CORRUPTIONS: dict[str, Corruption] = {
    "noise": Corruption(rician, (0.05, 0.10, 0.20)),
    "bias": Corruption(bias_field, (0.25, 0.5, 0.8)),
    "ghosting": Corruption(ghosting, (0.15, 0.3, 0.6)),
    "spike": Corruption(spike, (0.05, 0.1, 0.2)),
}


def corrupt(x: Tensor, kind: str, level: int, gen: torch.Generator) -> Tensor:
    """The stack at level 0 (clean, returned as is) .. 3 of corruption `kind`."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; expected one of {', '.join(CORRUPTIONS)}")
    fn, levels = CORRUPTIONS[kind]
    if not 0 <= level <= len(levels):
        raise ValueError(f"corruption level {level} out of range 0..{len(levels)}")
    return x if level == 0 else fn(x, levels[level - 1], gen)
