"""Inference: one home for turning slices or volumes of one sequence into another.

`Translator` runs the model in batches on one device (evaluation, validation figures, the
claim scripts, synthesis and BraSyn completion all use it); `load_translator` makes one from a
config and a checkpoint. `synthesize` is the public entry for whole volumes: any number of
available sequences in, the fused latent (the mean of the sources' quantized latents) decoded
to each target, returned under the names asked for.

    from vq.inference import load_translator, synthesize
    translator = load_translator("publications/config/vq/demo_phantom_cpu.yaml",
                                 "outputs/ckpt/demo/phantom/2d/ckpt_best.pth", device="cpu")
    out = synthesize(translator, {"t1": t1_array, "t2": t2_array}, ["flair"])  # {"flair": array}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vq.checkpoint import load_trained_model, read_checkpoint
from vq.config import AMP_MODES, Config, ConfigError, load_config
from vq.dataloader.preprocess import prepare
from vq.models import sample_latent
from vq.runtime import amp_dtype, autocast, resolve_device
from vq.sequences import SEQUENCES, seq_index


class Translator:
    """Batched inference over stacks of slices (S,1,H,W) in [-1,1], on one device.

    compile: torch.compile encode and decode (one graph each, fullgraph); the last chunk of a
    stack is padded to `batch_size` so that every call has one shape and each compiles once.
    """

    def __init__(self, model: nn.Module, device: torch.device | str, amp: torch.dtype | None, batch_size: int,
                 compile: bool = False, intensity_reference: dict[str, list[float]] | None = None):
        self.model, self.device, self.amp, self.batch_size = model.eval(), torch.device(device), amp, batch_size
        self.intensity_reference = intensity_reference or {}
        """Sequence name -> the brain's robust range in the training data (the checkpoint's; see
        `vq.dataloader.preprocess.prepare`)."""
        self.compiled = compile
        self._encode, self._decode = model.encode, model.decode
        if compile:
            self._encode = torch.compile(model.encode, fullgraph=True)
            self._decode = torch.compile(model.decode, fullgraph=True)

    def _batches(self, stack: torch.Tensor):
        """(chunk on the device, its number of real rows) per batch_size rows of `stack`."""
        for chunk in stack.split(self.batch_size):
            n = len(chunk)
            chunk = chunk.to(self.device)
            if self.compiled and n < self.batch_size:  # rows decode independently: padding changes no real row
                chunk = torch.cat([chunk, chunk[-1:].expand(self.batch_size - n, *chunk.shape[1:])])
            yield chunk, n

    @torch.no_grad()
    def encode(self, stack: torch.Tensor, source) -> torch.Tensor:
        """(S,1,H,W) images of `source` (a sequence index or name) -> latent (S,D,H/4,W/4), fp32, on the device."""
        code = self.model.sequence_code(source, device=self.device)  # (1, code_dim): one code row for every chunk
        out = []
        for chunk, n in self._batches(stack):
            with autocast(self.device, self.amp):
                out.append(self._encode(chunk, code).latent[:n].float())
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, target) -> torch.Tensor:
        """latent (S,D,h,w) -> (S,1,H,W) fp32; target: a sequence index or a (code_dim,) code vector."""
        code = self.model.sequence_code(target, device=self.device)  # (1, code_dim): one code row for every chunk
        out = []
        for chunk, n in self._batches(latent):
            with autocast(self.device, self.amp):
                out.append(self._decode(chunk, code)[:n].float())
        return torch.cat(out)

    def translate(self, stack: torch.Tensor, path: list[int], memo: dict | None = None) -> torch.Tensor:
        """Translate along a path of sequence indices: [s, t] single step, [s, m, ..., t] multi-step.

        `memo`: a dict shared by the translations of one subject, so that the latent of
        each stack and the stacks along shared path prefixes are computed once (the
        source is encoded once for all its targets; T1 -> T1Gd -> T2 reuses T1 -> T1Gd). Each stack
        is encoded as the sequence it is, an intermediate translation as the sequence it was made into.
        """
        memo = {} if memo is None else memo
        current = stack
        for k in range(1, len(path)):
            step = tuple(path[:k + 1])
            if step not in memo:
                source = ("latent", *path[:k])
                if source not in memo:
                    memo[source] = self.encode(current, path[k - 1])
                memo[step] = self.decode(memo[source], path[k])
            current = memo[step]
        return current


def load_translator(config: str | Path | Config, checkpoint: str | Path, *, device: str | torch.device = "cpu",
                    batch_size: int | None = None, precision: str | None = None,
                    compile: bool | None = None) -> Translator:
    """A trained model ready for inference: the config's model (a YAML path or a loaded `Config`) with
    the checkpoint's weights on `device`.

    batch_size: slices per forward pass; precision: "none" (fp32), "auto", "bf16" or "fp16" (CUDA);
    compile: torch.compile encode and decode. Each defaults to the config's `test.*` setting.
    """
    cfg = config if isinstance(config, Config) else load_config(config)
    device = resolve_device(str(device))
    state = read_checkpoint(checkpoint)
    model = load_trained_model(cfg, str(checkpoint), device, state)
    precision = cfg.test.amp if precision is None else precision
    if precision not in AMP_MODES:
        raise ConfigError(f"precision {precision!r}: use one of {', '.join(AMP_MODES)} (none = fp32)")
    return Translator(model, device, amp_dtype(device, precision), batch_size or cfg.test.batch_size,
                      cfg.test.compile if compile is None else compile, state.get("intensity_reference"))


def to_slices(volume: np.ndarray, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(X, Y, Z) in [-1,1] -> (Z, 1, X', Y') axial slices padded with background to a multiple of
    `multiple` (the model's downsampling), and the original (X, Y)."""
    stack = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32)).permute(2, 0, 1)[:, None]
    x, y = stack.shape[-2:]
    pad_x, pad_y = -x % multiple, -y % multiple
    return F.pad(stack, (0, pad_y, 0, pad_x), value=-1.0), (x, y)


def from_slices(stack: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(Z, 1, X', Y') -> (X, Y, Z) numpy, padding removed."""
    return stack[:, 0, : size[0], : size[1]].permute(1, 2, 0).cpu().numpy()


def fuse(latents: list[torch.Tensor], weights: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The fused latent: the mean of the sources' latents, [(S, D, h, w)] -> (S, D, h, w).

    `weights` [(S, 1, h, w)] in [0, 1]: the share of each latent position a source's field of view
    covers, so a source counts only where it was imaged; where none covers a position, the plain mean.
    """
    stacked = torch.stack(latents)  # (n_src, S, D, h, w)
    if weights is None:
        return stacked.mean(0)
    weight = torch.stack(weights).to(stacked)  # (n_src, S, 1, h, w)
    total = weight.sum(0)
    return torch.where(total > 0, (stacked * weight).sum(0) / total.clamp_min(1e-6), stacked.mean(0))


@dataclass
class Synthesis:
    """What `synthesize_all` makes of one subject: (X, Y, Z) float32 arrays in [-1, 1]."""

    fused: dict = field(default_factory=dict)
    """target -> the fused latent decoded (with one source: that source's translation)."""
    per_source: dict = field(default_factory=dict)
    """(target, source) -> one source's translation, with `per_source`."""
    draws: dict = field(default_factory=dict)
    """target -> (N, X, Y, Z): N decodings of latents drawn around the fused one (VQC sampling), with `samples`."""


def synthesize_all(translator: Translator, volumes: dict, targets, *, percentile: float = 99.0,
                   normalized: bool = False, brain: np.ndarray | None = None, seen: dict | None = None,
                   names: dict | None = None, per_source: bool = False, samples: int = 0) -> Synthesis:
    """The synthesis pipeline: missing sequences of one subject from its available ones, all on one grid
    (sources on different grids: `vq.grid.on_working_grid` brings them onto one, as tools/synthesize.py does).

    volumes: {sequence name or index: (X, Y, Z) array}, raw or z-scored intensities (`prepare`, inside
    `brain` where given) or already in [-1, 1] with `normalized`. Each source is encoded slice by slice;
    the fused latent is the mean of theirs, each position weighted by the share of it a source imaged
    where `seen` ({source: (X, Y, Z) bool field of view}) says. `names`: a source's file, for messages.
    Keys of the result are the targets (and sources) as given.
    """
    multiple = 2 ** translator.model.cfg.n_down
    latents, weights, size = {}, [], None
    for seq, volume in volumes.items():
        name = SEQUENCES[seq_index(seq)]
        data = volume if normalized else prepare(volume, percentile, brain=brain, name=(names or {}).get(seq, name),
                                                 reference=translator.intensity_reference.get(name))
        stack, size = to_slices(data, multiple)
        latents[seq] = translator.encode(stack, name)  # (Z, D, X'/4, Y'/4)
        if seen is not None:  # the share of each latent position the source imaged
            imaged, _ = to_slices(seen[seq] * 2.0 - 1, multiple)  # (Z, 1, X', Y'), padding -1: not imaged
            weights.append(F.avg_pool2d((imaged + 1) / 2, multiple))
    fused = fuse(list(latents.values()), weights or None)
    result = Synthesis()
    for t in targets:
        target = seq_index(t)
        if per_source:
            result.per_source.update({(t, s): from_slices(translator.decode(z, target), size) for s, z in latents.items()})
        result.fused[t] = from_slices(translator.decode(fused, target), size)
        if samples:
            result.draws[t] = np.stack([from_slices(translator.decode(sample_latent(list(latents.values()), fused),
                                                                      target), size) for _ in range(samples)])
    return result


def synthesize(translator: Translator, volumes: dict, targets, percentile: float = 99.0,
               normalized: bool = False) -> dict:
    """Missing sequences of one subject from its available ones, all on one grid: `synthesize_all`'s
    fused translations. -> {target as given (name or index): (X, Y, Z) float32 in [-1, 1]}."""
    return synthesize_all(translator, volumes, targets, percentile=percentile, normalized=normalized).fused
