"""The VQ-Seq2Seq training recipe (docs/method.md, "Training step"): one loss for one batch of slice pairs.

All decodings of a step run as one decoder call and all encodings as one
encoder call: instance norm is per sample, so batching changes nothing but
speed. The perceptual features of the two clean targets are computed once and
shared by the six outputs that are compared with them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vq.config import Config
from vq.dataloader.augment import IntensityAugment
from vq.losses import PerceptualLoss, consistency_loss, ssim_loss
from vq.metrics import psnr, region_psnr
from vq.runtime import autocast, return_freed_memory, to_channels_last


@dataclass(frozen=True)
class Phase:
    """What is switched on at an epoch (docs/method.md step 3, 4, 6 and the ablation flags)."""

    contrast: bool
    sampling: bool
    domain_aug: bool

    @classmethod
    def at(cls, cfg: Config, epoch: int) -> "Phase":
        """Phases switch on once the 0-based epoch is GREATER than their pretrain_epochs_*, as in
        the reference: 100 / 200 start them at epochs 101 / 201."""
        t = cfg.train
        rand = epoch > t.pretrain_epochs_rand
        return cls(contrast=t.consistency and epoch > t.pretrain_epochs_contrast,
                   sampling=t.sampling and rand, domain_aug=t.domain_aug and rand)


def poly_lr(cfg: Config, epoch: int) -> float:
    """lr = min_lr + (lr0 - min_lr) (1 - epoch/epochs)^power (docs/method.md step 7)."""
    t = cfg.train
    frac = min(epoch / max(t.epochs, 1), 1.0)
    return t.min_lr + (t.lr - t.min_lr) * (1 - frac) ** t.lr_power


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.AdamW:
    t = cfg.train
    return torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)


class Recipe(nn.Module):
    """Computes the full training loss of a batch; holds the frozen perceptual network."""

    def __init__(self, model: nn.Module, cfg: Config, perceptual: PerceptualLoss | None):
        super().__init__()
        self.model, self.cfg = model, cfg
        self.perceptual = perceptual
        if cfg.train.checkpointing:  # trade compute for memory (large batches, big crops)
            model.set_checkpointing(True)
            if next(model.parameters()).device.type == "cpu":
                return_freed_memory()
            if perceptual is not None:
                perceptual.recompute = True
        if cfg.train.channels_last:  # the scripts put the model in channels_last; VGG19 follows
            to_channels_last(model)
            if perceptual is not None:
                to_channels_last(perceptual)
        self.augment = IntensityAugment(mode=cfg.data.augment_mode) if cfg.data.augment else None

    def inputs(self, src: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The augmented inputs of a batch and whether the step may run: -> (in_src, in_tgt, ok).

        ok: a 0-d bool tensor, False when `train.skip_degenerate` and an augmented input of the
        batch is empty or constant (mean == -1 within 1e-8, or std < 1e-8), the reference's skip.
        It stays on the device: the caller decides when to read it.
        """
        in_src = self.augment(src) if self.augment is not None else src
        in_tgt = self.augment(tgt) if self.augment is not None else tgt
        ok = torch.ones((), dtype=torch.bool, device=src.device)
        if self.cfg.train.skip_degenerate:
            both = torch.cat([in_src, in_tgt]).flatten(1).float()  # (2B, H*W)
            degenerate = ((both.mean(1) + 1).abs() < 1e-8) | (both.std(1) < 1e-8)
            ok = ~degenerate.any()
        return in_src, in_tgt, ok

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_idx: torch.Tensor, tgt_idx: torch.Tensor,
                epoch: int, amp: torch.dtype | None = None,
                inputs: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """src/tgt: clean (B,1,H,W) in [-1,1]; src_idx/tgt_idx: (B,) sequence indices.

        inputs: the augmented (in_src, in_tgt) from `inputs()`; None augments here.
        """
        cfg, model, phase = self.cfg.train, self.model, Phase.at(self.cfg, epoch)
        batch = src.shape[0]
        device = src.device
        in_src, in_tgt = inputs if inputs is not None else self.inputs(src, tgt)[:2]

        with autocast(device, amp):
            if phase.domain_aug:  # step 4: feed the model its own translation to a random code
                swap = torch.rand(batch, device=device) < 0.5
                if swap.any():
                    with torch.no_grad():
                        codes = model.random_code(int(swap.sum()), uniform_on=cfg.random_code)
                        fake = model(in_src[swap], codes.to(device))
                    in_src = in_src.clone()
                    in_src[swap] = fake.to(in_src.dtype)

            enc = model.encode(torch.cat([in_src, in_tgt]))  # (2B,1,H,W) -> latent (2B,D,h,w)
            lat_src, lat_tgt = enc.latent.chunk(2)
            latents = [lat_src, lat_tgt, lat_src, lat_tgt]
            codes = [tgt_idx, src_idx, src_idx, tgt_idx]  # i->j, j->i, i->i, j->j
            if phase.sampling:  # step 3: VQC latent sampling around the pair's mean
                mean = (lat_src + lat_tgt) / 2
                spread = (lat_src - mean) ** 2 + (lat_tgt - mean) ** 2
                sample = mean + torch.randn_like(mean) * spread
                latents += [sample, sample]
                codes += [src_idx, tgt_idx]
            out = model.decode(torch.cat(latents), torch.cat(codes))  # (4B or 6B, 1, H, W)

        # Losses in fp32. Targets of the outputs, in order: tgt, src, src, tgt (, src, tgt).
        out = out.float()
        n_out = out.shape[0] // batch
        targets = torch.cat([tgt, src, src, tgt, src, tgt][:n_out])
        # Without sampling the last two outputs ARE i->i and j->j (step 3): count those twice.
        weight = torch.ones(n_out, device=device) if phase.sampling else torch.tensor([1., 1., 2., 2.], device=device)
        w = weight.repeat_interleave(batch)  # (n_out*B,)

        l1 = (w * (out - targets).abs().flatten(1).mean(1)).sum() / batch
        l_ssim = (w * ssim_loss(out, targets, reduction="none")).sum() / batch
        parts = {"l1": l1, "ssim": l_ssim}
        loss = cfg.lambda_l1 * l1 + cfg.lambda_ssim * l_ssim
        if self.perceptual is not None and cfg.lambda_per > 0:
            index = _target_index(n_out, batch, device)
            with autocast(device, amp):
                feats = self.perceptual.target_features(torch.cat([src, tgt]))  # clean targets, once
                per = (w * self.perceptual.per_sample(out, feats, index)).sum() / batch
            parts["per"] = per
            loss = loss + cfg.lambda_per * per
        if enc.loss_vq is not None and enc.indices is not None:
            parts["vq"] = 2 * enc.loss_vq.float()  # both encodings; the quantizer averages over 2B
            loss = loss + cfg.lambda_vq * parts["vq"]
        if cfg.consistency:
            con, con_parts = consistency_loss(lat_src.float(), lat_tgt.float(), src, tgt,
                                              contrast=phase.contrast, temperature=cfg.temperature,
                                              keep=cfg.contrast_keep, mse_over=cfg.con_mse,
                                              variant=cfg.contrast)
            parts["con"] = con
            loss = loss + cfg.lambda_con * con
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss ({ {k: float(v) for k, v in parts.items()} })")
        stats = {k: float(v.detach()) for k, v in parts.items()}
        stats["loss"] = float(loss.detach())
        if enc.indices is not None:
            stats.update(model.quantizer.codebook_usage(enc.indices))
        return loss, stats


def _target_index(n_out: int, batch: int, device) -> torch.Tensor:
    """For each output row, its clean target's row in cat([src, tgt]) (2B rows)."""
    which = torch.tensor([1, 0, 0, 1, 0, 1][:n_out], device=device)  # 0 = src, 1 = tgt
    return (which[:, None] * batch + torch.arange(batch, device=device)[None]).flatten()


@torch.no_grad()
def translate(model: nn.Module, stack: torch.Tensor, target: int, batch_size: int,
              amp: torch.dtype | None = None) -> torch.Tensor:
    """Translate a stack of slices (S,1,H,W) to one target sequence, in batches; fp32 result."""
    out = []
    for start in range(0, stack.shape[0], batch_size):
        chunk = stack[start:start + batch_size]
        with autocast(chunk.device, amp):
            out.append(model(chunk, target).float())
    return torch.cat(out)


@torch.no_grad()
def validate(model: nn.Module, stacks: dict[str, dict[int, torch.Tensor]], device: torch.device,
             batch_size: int, amp: torch.dtype | None = None, identity: bool = True) -> tuple[float, float, int]:
    """Sums of PSNR (data range 2) on the whole stack and inside the brain (the target's non-background
    voxels) over every (available source, available target) pair, source == target included when
    `identity` (the reference's validation, train.val_identity); -> (sum, brain sum, count).

    stacks: subject -> {sequence index: (S,1,H,W) centre-cropped central slices}.
    Returns sums so that ranks can add theirs before dividing.
    """
    was_training = model.training
    model.eval()
    total, total_brain, count = 0.0, 0.0, 0
    for seqs in stacks.values():
        for s, src in seqs.items():
            src = src.to(device)
            for t, tgt in seqs.items():
                if identity or s != t:
                    pred = translate(model, src, t, batch_size, amp)
                    tgt = tgt.to(device)
                    total += float(psnr(pred[:, 0], tgt[:, 0]))  # one value per stack
                    total_brain += region_psnr(pred, tgt, tgt > -1)
                    count += 1
    model.train(was_training)
    return total, total_brain, count
