"""Hyper-convolution: a conv whose kernel is mixed from a learned bank by a code (docs/method.md, "Decoder").

kernel(s) = sum_k a_k(s) W_k with a(s) = Linear(code_dim -> n_kernels)(s), and bias(s) = sum_k c_k(s) b_k,
where c(s) is the bias's own Linear of the code (the reference code; `bias_mix="shared"` uses a(s)).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class CodeGroups(NamedTuple):
    """A batch grouped by identical code rows: `order` puts each group's rows together."""

    order: torch.Tensor | None
    """(B,) batch positions sorted by group; None when the whole batch is one group."""
    counts: list[int]
    """Group sizes, in group order."""

    @property
    def first(self) -> list[int]:
        """Position of each group's first row in the batch sorted by `order`."""
        return [sum(self.counts[:g]) for g in range(len(self.counts))]


def code_groups(code: torch.Tensor) -> CodeGroups:
    """Group a batch by identical code rows: (B, code_dim) -> CodeGroups.

    One `torch.unique` and one host sync (the group sizes); the decoder calls it
    once per decode and shares the result with all its hyper-convs.
    """
    _, inverse, counts = torch.unique(code.detach(), dim=0, return_inverse=True, return_counts=True)
    if len(counts) == 1:
        return CodeGroups(None, [len(code)])
    return CodeGroups(inverse.argsort(stable=True), counts.tolist())


class HyperConv2d(nn.Module):
    """Conv2d (stride 1, "same" size) whose kernel and bias depend on a per-sample code.

    Batching: the batch is grouped by identical code rows (`code_groups`); each
    group gets one mixed kernel and one ordinary `F.conv2d` on its sub-batch.
    Training batches have 1-4 distinct codes (one-hot targets), so this runs at
    ordinary-conv speed; when all rows are identical there is no gather/scatter
    at all. A batch of all-distinct codes (random-code augmentation) is still
    exact, just one conv per sample.

    Called alone, the layer groups the batch itself and returns the input order.
    The decoder instead groups once per decode, puts its batch in group order
    once, and passes the groups to every hyper-conv (`groups=`): the rows of
    `x` and `code` are then already in group order.

    Init (`init`): "reference" as the reference code: the bank Kaiming-normal with
    fan_in = in x k x k x n_kernels, the bias bank 0, the mixing Linears' biases 0
    (their weights keep nn.Linear's default). "pytorch": each bank entry as
    nn.Conv2d's default, the kernel mixer so that a unit-norm code gives ||a|| ~ 1.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, code_dim: int = 64,
                 n_kernels: int = 16, padding_mode: str = "reflect", bias: bool = True,
                 bias_mix: str = "own", init: str = "reference"):
        super().__init__()
        self.in_ch, self.out_ch, self.kernel_size = in_ch, out_ch, kernel_size
        self.n_kernels, self.padding_mode = n_kernels, padding_mode
        self.weight = nn.Parameter(torch.empty(n_kernels, out_ch, in_ch, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(n_kernels, out_ch)) if bias else None
        self.mix = nn.Linear(code_dim, n_kernels)  # a(s)
        # c(s): the bias's own mixer (the reference), or None to reuse a(s)
        self.mix_bias = nn.Linear(code_dim, n_kernels) if bias and bias_mix == "own" else None
        self.reset_parameters(init)

    def reset_parameters(self, init: str = "reference") -> None:
        if init == "reference":
            fan_in = self.in_ch * self.kernel_size**2 * self.n_kernels
            nn.init.normal_(self.weight, std=math.sqrt(2 / fan_in))  # kaiming_normal_(a=0, fan_in)
            if self.bias is not None:
                nn.init.zeros_(self.bias)
            for mixer in (self.mix, self.mix_bias):
                if mixer is not None:
                    mixer.reset_parameters()
                    nn.init.zeros_(mixer.bias)
            return
        fan_in = self.in_ch * self.kernel_size**2
        for w in self.weight:  # each entry as nn.Conv2d's default init
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        # var(a_k) = |s|^2 / n_kernels, so E|a|^2 = |s|^2 and the mixed kernel keeps one entry's scale
        for mixer in (self.mix, self.mix_bias):
            if mixer is not None:
                nn.init.normal_(mixer.weight, std=1 / math.sqrt(self.n_kernels))
                nn.init.zeros_(mixer.bias)

    def kernels(self, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mixed kernels and biases for G codes: (G, code_dim) -> (G, out, in, k, k), (G, out)."""
        coeffs = self.mix(code)  # (G, n_kernels)
        weight = (coeffs @ self.weight.flatten(1)).view(-1, *self.weight.shape[1:])
        if self.bias is None:
            return weight, None
        bias_coeffs = coeffs if self.mix_bias is None else self.mix_bias(code)  # (G, n_kernels)
        return weight, bias_coeffs @ self.bias

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        pad = self.kernel_size // 2
        if pad and self.padding_mode != "zeros":
            x = F.pad(x, (pad, pad, pad, pad), mode=self.padding_mode)
            pad = 0
        return F.conv2d(x, weight, bias, padding=pad)

    def forward(self, x: torch.Tensor, code: torch.Tensor, groups: CodeGroups | None = None) -> torch.Tensor:
        """x: (B, in, H, W), code: (B, code_dim) -> (B, out, H, W).

        groups: `code_groups(code)` of a batch whose rows are already in group order
        (the decoder's call); None groups here and returns the input order.
        """
        if groups is None:  # standalone: group here, convolve in group order, restore the input order
            groups = code_groups(code)
            if groups.order is not None:
                out = self(x[groups.order], code[groups.order], groups)
                return out[groups.order.argsort()]
        # one representative row per group, taken from `code` itself so gradients reach the code
        # (rows of a group are equal, so d/dparams is the same as summing over the group)
        weight, bias = self.kernels(code[groups.first])  # (G, out, in, k, k), (G, out)
        if len(groups.counts) == 1:  # fast path: one kernel for the whole batch
            return self._conv(x, weight[0], None if bias is None else bias[0])
        return torch.cat([self._conv(xg, weight[g], None if bias is None else bias[g])
                          for g, xg in enumerate(x.split(groups.counts))])

    def extra_repr(self) -> str:
        return (f"{self.in_ch}, {self.out_ch}, kernel_size={self.kernel_size}, n_kernels={self.n_kernels}, "
                f"padding_mode={self.padding_mode}, bias={self.bias is not None}")
