"""Hyper-convolution: a conv whose kernel is mixed from a learned bank by a code (docs/method.md, "Decoder").

kernel(s) = sum_k a_k(s) W_k with a(s) = Linear(code_dim -> n_kernels)(s), and bias(s) = sum_k c_k(s) b_k,
where c(s) is the bias's own Linear of the code (the reference code; `bias_mix="shared"` uses a(s)).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class HyperConv2d(nn.Module):
    """Conv2d (stride 1, "same" size) whose kernel and bias depend on a per-sample code.

    Batching: one code for the whole batch, (1, code_dim), is one ordinary
    `F.conv2d` with one mixed kernel. Per-sample codes, (B, code_dim), give each
    sample its own mixed kernel, and the batch runs as one grouped convolution
    (groups = B, one group per sample): shapes do not depend on which codes the
    batch holds, so nothing waits on the device to group it and the step can be
    compiled or captured as a whole.

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

    def forward(self, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """x: (B, in, H, W), code: (1 or B, code_dim) -> (B, out, H, W)."""
        weight, bias = self.kernels(code)  # (G, out, in, k, k), (G, out) with G = 1 or B
        pad = self.kernel_size // 2
        if pad and self.padding_mode != "zeros":
            x = F.pad(x, (pad, pad, pad, pad), mode=self.padding_mode)
            pad = 0
        if len(code) == 1:
            return F.conv2d(x, weight[0], None if bias is None else bias[0], padding=pad)
        batch, _, height, width = x.shape
        # (B, in, H, W) -> (1, B*in, H, W): sample b is group b, convolved with its own kernel
        out = F.conv2d(x.reshape(1, -1, height, width), weight.flatten(0, 1),
                       None if bias is None else bias.flatten(), padding=pad, groups=batch)
        return out.view(batch, self.out_ch, *out.shape[-2:])

    def extra_repr(self) -> str:
        return (f"{self.in_ch}, {self.out_ch}, kernel_size={self.kernel_size}, n_kernels={self.n_kernels}, "
                f"padding_mode={self.padding_mode}, bias={self.bias is not None}")
