"""Vector quantizer: nearest codebook vector with a straight-through gradient (docs/method.md, "Quantizer").

VQ loss = ||sg[z_q] - z_e||^2 + beta * ||z_q - sg[z_e]||^2 in the "legacy" form the
reference uses (beta on the codebook term); `legacy=False` moves beta to the
commitment term, as in the VQ-VAE paper. Both forms have the same value, only
the gradients differ: legacy pulls the encoder with weight 1 and the codebook
with weight beta.

Codebook collapse: with the paper's init (uniform in +-1/K, far inside the
encoder's outputs) the nearest code of almost every z_e is one of the few
codebook vectors on the hull of that cloud, and the other codes never move.
`restart_after=N` (off by default, as in the paper) moves a code that no
position chose in N training steps onto a random z_e of the current batch,
the common dead-code restart of VQ training. `init="kmeans"` (also not in the
paper) instead places the whole codebook on the k-means centroids of the first
training batch's z_e, so that every code starts inside the encoder's cloud.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor
    """(B, D, H, W) fp32 codebook vectors, straight-through to z_e."""
    indices: torch.Tensor
    """(B, H, W) int64 codebook indices."""
    loss: torch.Tensor
    """Scalar VQ loss (commitment + codebook terms)."""


class VectorQuantizer(nn.Module):
    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, legacy: bool = True,
                 restart_after: int = 0, init: str = "uniform"):
        super().__init__()
        self.n_embed, self.embed_dim, self.beta, self.legacy = n_embed, embed_dim, beta, legacy
        self.restart_after = restart_after
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)
        self._init_pending = init == "kmeans"
        """Python-side flag, so that the buffer below is read (a host sync) only once per process."""
        if self._init_pending:  # saved with the weights: a resumed or loaded model is not re-initialised
            self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        # training steps since each code was last chosen (counted only when restarts are on); saved
        # always, so that a checkpoint loads whatever restart_after the loading config has
        self.register_buffer("idle_steps", torch.zeros(n_embed, dtype=torch.long))

    def distances(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Squared distances (N, D) -> (N, K) to every codebook vector, always fp32.

        fp32 even under autocast: |z|^2 - 2 z.e + |e|^2 subtracts numbers of
        similar size, and bf16's 8-bit mantissa would lose the small gaps that
        decide the nearest code (codes start within 1/K of each other).
        """
        with torch.autocast(z_flat.device.type, enabled=False):
            z, codebook = z_flat.float(), self.embedding.weight.float()
            return z.pow(2).sum(1, keepdim=True) - 2 * z @ codebook.t() + codebook.pow(2).sum(1)

    def nearest(self, z_e: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> (B, H, W) indices of the nearest codes; nothing is updated."""
        B, D, H, W = z_e.shape
        return self.distances(z_e.permute(0, 2, 3, 1).reshape(-1, D)).argmin(1).view(B, H, W)

    def forward(self, z_e: torch.Tensor) -> QuantizerOutput:
        B, D, H, W = z_e.shape
        with torch.autocast(z_e.device.type, enabled=False):  # fp32 lookup and loss, see distances()
            z = z_e.float()
            z_flat = z.permute(0, 2, 3, 1).reshape(-1, D)  # (B, D, H, W) -> (B*H*W, D)
            # restarts follow the one gradient-taking encoding of each training step (the
            # no-grad translations of domain augmentation run on some replicas only)
            if self._init_pending and self.training and torch.is_grad_enabled():
                self._kmeans_init(z_flat.detach())
            restarts = self.training and self.restart_after > 0 and torch.is_grad_enabled()
            if restarts:
                self._restart_idle_codes(z_flat.detach())
            indices = self.distances(z_flat).argmin(1)  # (B*H*W,)
            if restarts:
                self._count_use(indices)
            z_q = F.embedding(indices, self.embedding.weight.float())  # (B*H*W, D)
            z_q = z_q.view(B, H, W, D).permute(0, 3, 1, 2)  # -> (B, D, H, W)

            # mean squared errors written out: F.mse_loss's backward on these permuted tensors
            # gets strides in a compiled graph that eager does not (the same values either way)
            commitment = (z - z_q.detach()).pow(2).mean()  # pulls the encoder to its code
            codebook = (z_q - z.detach()).pow(2).mean()  # pulls the code to the encoder
            if self.legacy:
                loss = commitment + self.beta * codebook
            else:
                loss = self.beta * commitment + codebook

            z_q = z + (z_q - z).detach()  # straight-through: forward z_q, backward identity to z_e
        return QuantizerOutput(z_q, indices.view(B, H, W), loss)

    @property
    def init_pending(self) -> bool:
        """The k-means initialisation may still run, on the next training forward (a host flag: no sync)."""
        return self._init_pending

    @torch.no_grad()
    def _kmeans_init(self, z_flat: torch.Tensor, iters: int = 10) -> None:
        """Codebook := k-means centroids of (N, D) encoder outputs, once (the first training batch).

        Lloyd's iterations from K distinct random points (with repeats when N < K); a cluster that
        empties keeps its centroid. Rank 0's codebook is broadcast, so replicas start equal.
        """
        self._init_pending = False
        if bool(self.initialised):
            return
        gen = torch.Generator(device=z_flat.device).manual_seed(0)
        picks = (torch.randperm(len(z_flat), generator=gen, device=z_flat.device)[:self.n_embed]
                 if len(z_flat) >= self.n_embed else
                 torch.randint(len(z_flat), (self.n_embed,), generator=gen, device=z_flat.device))
        centroids = z_flat[picks].clone()  # (K, D)
        for _ in range(iters):
            nearest = torch.cdist(z_flat, centroids).argmin(1)  # (N,)
            sums = torch.zeros_like(centroids).index_add_(0, nearest, z_flat)
            counts = torch.bincount(nearest, minlength=self.n_embed).unsqueeze(1)  # (K, 1)
            centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(centroids, src=0)
        self.embedding.weight.copy_(centroids)
        self.initialised.fill_(True)

    @torch.no_grad()
    def _count_use(self, indices: torch.Tensor) -> None:
        used = _counts(indices, self.n_embed)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(used)  # every replica keeps the same counters
        self.idle_steps.copy_(torch.where(used > 0, 0, self.idle_steps + 1))

    @torch.no_grad()
    def _restart_idle_codes(self, z_flat: torch.Tensor) -> None:
        """Move codes idle for `restart_after` steps onto random z_e of this batch (before the lookup,
        so that autograd sees the codebook as it is used in this call).

        Every code draws a candidate and only the idle ones take it: the shapes do not depend on
        how many codes are idle, so the step never waits on the device to count them.
        """
        idle = self.idle_steps >= self.restart_after  # (K,)
        picks = torch.randint(len(z_flat), (self.n_embed,), device=z_flat.device)
        new = z_flat[picks].to(self.embedding.weight.dtype)  # (K, D)
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(new, src=0)  # the same codebook on every replica
        self.embedding.weight.copy_(torch.where(idle[:, None], new, self.embedding.weight))
        self.idle_steps.masked_fill_(idle, 0)

    @torch.no_grad()
    def codebook_usage(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """Codebook statistics of a batch of indices, to watch for collapse, as 0-d tensors on the device.

        perplexity = exp(entropy of code frequencies): K when all codes are used
        equally, 1 when everything maps to one code. usage = share of the K codes
        used at least once.
        """
        counts = _counts(indices.flatten(), self.n_embed).float()  # (K,)
        probs = counts / counts.sum()
        perplexity = torch.exp(torch.special.entr(probs).sum())
        return {"perplexity": perplexity, "usage": (counts > 0).float().mean()}


def _counts(indices: torch.Tensor, n: int) -> torch.Tensor:
    """How often each of 0..n-1 occurs in (N,) indices -> (n,); the size is n whatever the values
    (bincount's size depends on the largest value, which a compiled step cannot know)."""
    return torch.zeros(n, dtype=torch.long, device=indices.device).index_add_(0, indices, torch.ones_like(indices))
