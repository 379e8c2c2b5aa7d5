"""The VQ-Seq2Seq network (docs/method.md, "Model"): encoder E, quantizer, hyper-conv decoder G.

One network serves every source and target: E maps any sequence to a common
latent at 1/4 resolution, and G decodes it to the sequence picked by a code s
(one-hot of the target index in a code_dim-long vector). With
`cfg.quantize=False` (the Seq2Seq ablation) there is no quantizer and no 1x1
convs: the latent is the encoder output itself. With `cfg.source_code` (not the
paper's network) E is told which sequence it reads: its first conv is a
hyper-conv of the source's code, as in the authors' later nnSeq2Seq encoder.
Every encoding names its source; the paper's encoder does not read it.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..sequences import N_SEQ, seq_index
from .hyperconv import HyperConv2d
from .quantizer import VectorQuantizer

Code = int | str | Sequence[int | str] | torch.Tensor
"""A sequence as a code: one index/name for the batch, one per sample, or a (B, code_dim) float code."""


def conv_norm_act(in_ch: int, out_ch: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    # no conv bias: InstanceNorm (affine=False) subtracts it again
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, bias=False, padding_mode="reflect"),
        nn.InstanceNorm2d(out_ch),
        nn.LeakyReLU(0.2),
    )


class ResBlock(nn.Module):
    """x + norm(conv(lrelu(norm(conv(x)))))."""

    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(
            conv_norm_act(ch, ch, 3),
            nn.Conv2d(ch, ch, 3, padding=1, bias=False, padding_mode="reflect"),
            nn.InstanceNorm2d(ch),
        )

    def forward(self, x):
        return x + self.body(x)


class SourceConv(nn.Module):
    """The source-conditioned first layer (model.source_code): hyper-conv of the source code, norm, LeakyReLU.

    After the first InstanceNorm a T1 crop and the same crop of T2 are close to each other's negatives;
    a kernel per source sequence lets the encoder map both to one tissue latent."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, code_dim: int, n_kernels: int):
        super().__init__()
        self.conv = HyperConv2d(in_ch, out_ch, kernel_size, code_dim, n_kernels, bias=False)  # norm removes a bias
        self.norm = nn.InstanceNorm2d(out_ch)

    def forward(self, x, code):
        return F.leaky_relu(self.norm(self.conv(x, code)), 0.2)


class Encoder(nn.Module):
    """(B, 1, H, W) and, with a `code_dim`, a (1 or B, code_dim) source code -> (B, C * 2**n_down, H / 2**n_down,
    W / 2**n_down). Without a `code_dim` (the paper's encoder) the first layer is an ordinary conv and the code
    is not read."""

    def __init__(self, base_channels: int = 64, n_down: int = 2, n_res: int = 6,
                 code_dim: int | None = None, n_kernels: int = 16):
        super().__init__()
        first = conv_norm_act(1, base_channels, 7) if code_dim is None else \
            SourceConv(1, base_channels, 7, code_dim, n_kernels)
        layers = [first]
        ch = base_channels
        for _ in range(n_down):
            layers.append(conv_norm_act(ch, 2 * ch, 3, stride=2))
            ch *= 2
        layers += [ResBlock(ch) for _ in range(n_res)]
        self.net = nn.Sequential(*layers)
        self.out_channels = ch
        self.conditioned = code_dim is not None

    def forward(self, x, code=None):
        if not self.conditioned:
            return self.net(x)
        first, *rest = self.net
        x = first(x, code)
        for layer in rest:
            x = layer(x)
        return x


class HyperResBlock(nn.Module):
    """ResBlock with code-conditioned hyper-convs."""

    def __init__(self, ch: int, code_dim: int, n_kernels: int):
        super().__init__()
        self.conv1 = HyperConv2d(ch, ch, 3, code_dim, n_kernels, bias=False)
        self.conv2 = HyperConv2d(ch, ch, 3, code_dim, n_kernels, bias=False)
        self.norm = nn.InstanceNorm2d(ch)

    def forward(self, x, code):
        h = F.leaky_relu(self.norm(self.conv1(x, code)), 0.2)
        return x + self.norm(self.conv2(h, code))


class HyperUp(nn.Module):
    """Bilinear x2, hyper-conv 3x3 to half the channels, norm, LeakyReLU."""

    def __init__(self, in_ch: int, code_dim: int, n_kernels: int):
        super().__init__()
        self.conv = HyperConv2d(in_ch, in_ch // 2, 3, code_dim, n_kernels, bias=False)
        self.norm = nn.InstanceNorm2d(in_ch // 2)

    def forward(self, x, code):
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)  # (B, C, 2H, 2W)
        return F.leaky_relu(self.norm(self.conv(x, code)), 0.2)  # -> (B, C/2, 2H, 2W)


class Decoder(nn.Module):
    """(B, C * 2**n_down, h, w) latent features and a (1 or B, code_dim) code -> (B, 1, h * 2**n_down, w * 2**n_down)
    in [-1, 1]; one code row decodes the whole batch to one target."""

    def __init__(self, base_channels: int = 64, n_down: int = 2, n_res: int = 6,
                 code_dim: int = 64, n_kernels: int = 16, hyper_bias: str = "own"):
        super().__init__()
        ch = base_channels * 2**n_down
        self.embed = nn.Sequential(nn.Linear(code_dim, code_dim), nn.LeakyReLU(0.2))
        self.res = nn.ModuleList(HyperResBlock(ch, code_dim, n_kernels) for _ in range(n_res))
        self.up = nn.ModuleList(HyperUp(ch // 2**i, code_dim, n_kernels) for i in range(n_down))
        # the only hyper-conv with a bias: every other one is followed by InstanceNorm, which removes it
        self.out = HyperConv2d(base_channels, 1, 7, code_dim, n_kernels, bias_mix=hyper_bias)

    def forward(self, x, code):
        code = self.embed(code)  # (1 or B, code_dim)
        for block in [*self.res, *self.up]:
            x = block(x, code)
        return self.out(x, code).tanh()  # (B, 1, H, W)


class Encoded(NamedTuple):
    latent: torch.Tensor
    """(B, D, H/4, W/4) quantized latent z_q (encoder output when quantize=False)."""
    indices: torch.Tensor | None
    """(B, H/4, W/4) codebook indices, None without a quantizer."""
    loss_vq: torch.Tensor
    """Scalar VQ loss (0 without a quantizer)."""
    pre_quant: torch.Tensor
    """(B, D, H/4, W/4) z_e, the quantizer's input (= latent when quantize=False)."""


class VQSeq2Seq(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.code_dim < N_SEQ:
            raise ValueError(f"model.code_dim={cfg.code_dim} must be >= {N_SEQ} (one position per sequence)")
        self.cfg = cfg
        self.encoder = Encoder(cfg.base_channels, cfg.n_down, cfg.n_res,
                               cfg.code_dim if cfg.source_code else None, cfg.n_kernels)
        ch = self.encoder.out_channels
        if cfg.quantize:
            self.quant_conv = nn.Conv2d(ch, cfg.embed_dim, 1)  # (B, 4C, h, w) -> (B, D, h, w)
            self.quantizer = VectorQuantizer(cfg.n_embed, cfg.embed_dim, cfg.beta, cfg.legacy_beta,
                                             cfg.restart_after, cfg.codebook_init)
            self.post_quant_conv = nn.Conv2d(cfg.embed_dim, ch, 1)  # (B, D, h, w) -> (B, 4C, h, w)
        else:
            self.quant_conv = self.quantizer = self.post_quant_conv = None
        self.decoder = Decoder(cfg.base_channels, cfg.n_down, cfg.n_res, cfg.code_dim, cfg.n_kernels,
                               cfg.hyper_bias)
        self.bypass_quantizer = False
        """The latent skips the quantizer's lookup: z_e is decoded as it is (train.quantizer_warmup)."""
        self.reset_parameters(cfg.init)

    def reset_parameters(self, init: str = "reference") -> None:
        """"reference": as the reference code, every Conv2d weight Kaiming-normal (fan_in, a=0) and
        every Conv2d and Linear bias 0 (hyper-convs: see HyperConv2d); "pytorch": PyTorch's defaults.
        The codebook keeps its own init (the quantizer's)."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.reset_parameters()
                if init == "reference":
                    if isinstance(module, nn.Conv2d):
                        nn.init.kaiming_normal_(module.weight, a=0, mode="fan_in")
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
        for module in self.modules():  # second: a hyper-conv (re)sets its own mixing Linears
            if isinstance(module, HyperConv2d):
                module.reset_parameters(init)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def sequence_code(self, sequences: Code, batch_size: int | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
        """Sequence(s), a target's or a source's -> (B, code_dim) float codes.

        int or name: the same one-hot for all `batch_size` (default 1) samples;
        list or integer tensor of B indices: one one-hot per sample; float tensor
        (B, code_dim) or (code_dim,): used as is (broadcast to `batch_size`).
        """
        device = device or self.device
        code_dim = self.cfg.code_dim
        if isinstance(sequences, torch.Tensor) and sequences.is_floating_point():
            code = sequences.to(device).reshape(-1, code_dim)
        else:
            if isinstance(sequences, (int, str)):
                sequences = [sequences]
            if isinstance(sequences, torch.Tensor):
                index = sequences.to(device).flatten().long()
                # checked on the device: reading the check on the host would wait for the device
                torch._assert_async(((index >= 0) & (index < N_SEQ)).all(), f"sequence indices must be in 0..{N_SEQ - 1}")
            else:
                index = torch.tensor([seq_index(s) for s in sequences], device=device)
            # (B,) -> (B, code_dim) one-hot, ones in the first N_SEQ positions
            code = (index[:, None] == torch.arange(code_dim, device=device)).float()
        if batch_size is not None and len(code) != batch_size:
            if len(code) != 1:
                raise ValueError(f"{len(code)} sequence codes for a batch of {batch_size}")
            code = code.expand(batch_size, -1)
        return code

    def random_code(self, batch_size: int, generator: torch.Generator | None = None,
                    uniform_on: str = "reference") -> torch.Tensor:
        """Random target codes for domain augmentation (docs/method.md, step 4): (B, code_dim).

        Each sample gets, with p=0.5, a random one-hot of the N_SEQ sequences, otherwise a
        uniform U(0,1) vector: on all code_dim positions (`uniform_on="reference"`, as the
        reference draws it) or on the first N_SEQ positions only (`"sequences"`, zeros elsewhere:
        a random mixture of the trained sequence codes, since the other positions' embedding
        columns are never trained on a real target).
        """
        device = generator.device if generator is not None else self.device
        width = self.cfg.code_dim if uniform_on == "reference" else N_SEQ
        index = torch.randint(N_SEQ, (batch_size,), generator=generator, device=device)
        onehot = (index[:, None] == torch.arange(width, device=device)).float()  # (B, width)
        uniform = torch.rand(batch_size, width, generator=generator, device=device)
        use_onehot = torch.rand(batch_size, 1, generator=generator, device=device) < 0.5
        mix = torch.where(use_onehot, onehot, uniform)  # (B, width)
        return F.pad(mix, (0, self.cfg.code_dim - width)).to(self.device)  # -> (B, code_dim)

    def encode(self, x: torch.Tensor, source: Code) -> Encoded:
        """x: (B, 1, H, W) images of the `source` sequence(s) (read only with model.source_code)."""
        code = None
        if self.encoder.conditioned:
            code = self._code_for(source, x)  # (1 or B, code_dim)
        z = self.encoder(x, code)  # (B, 1, H, W) -> (B, 4C, H/4, W/4)
        if self.quantizer is None:
            return Encoded(z, None, z.new_zeros((), dtype=torch.float32), z)
        z_e = self.quant_conv(z)  # -> (B, D, H/4, W/4)
        if self.bypass_quantizer:  # the nearest codes only for the statistics; no VQ loss, no codebook update
            return Encoded(z_e, self.quantizer.nearest(z_e.detach()), z_e.new_zeros((), dtype=torch.float32), z_e)
        z_q, indices, loss = self.quantizer(z_e)
        return Encoded(z_q, indices, loss, z_e)

    def _code_for(self, sequences: Code, batch: torch.Tensor) -> torch.Tensor:
        """(1 or B, code_dim) codes for a batch: one row serves every sample."""
        code = self.sequence_code(sequences, device=batch.device)
        if len(code) not in (1, len(batch)):
            raise ValueError(f"{len(code)} sequence codes for a batch of {len(batch)}")
        return code

    def decode(self, latent: torch.Tensor, target: Code) -> torch.Tensor:
        code = self._code_for(target, latent)  # (1 or B, code_dim)
        if self.post_quant_conv is not None:
            latent = self.post_quant_conv(latent)  # (B, D, h, w) -> (B, 4C, h, w)
        return self.decoder(latent, code)  # -> (B, 1, H, W) in [-1, 1]

    def forward(self, x: torch.Tensor, source: Code, target: Code) -> torch.Tensor:
        """Translate images of `source` to `target`."""
        return self.decode(self.encode(x, source).latent, target)


def sample_latent(latents: list[torch.Tensor], mean: torch.Tensor | None = None) -> torch.Tensor:
    """VQC latent sampling (docs/method.md, step 3): a latent drawn around the sources' `mean` (default
    their plain mean), element-wise sigma = the sum over sources of (z - mean)^2 (the reference's spread:
    a sum of squares, not its root); 0 for a single source."""
    mean = sum(latents) / len(latents) if mean is None else mean
    spread = sum((z - mean) ** 2 for z in latents)
    return mean + torch.randn_like(mean) * spread


def build_model(cfg: ModelConfig) -> VQSeq2Seq:
    return VQSeq2Seq(cfg)
