"""The VQ-Seq2Seq training recipe (docs/method.md, "Training step"): one loss for one batch of slice pairs.

All decodings of a step run as one decoder call and all encodings as one
encoder call: instance norm is per sample, so batching changes nothing but
speed. The perceptual features of the two clean targets are computed once and
shared by the six outputs that are compared with them.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vq.config import Config, TrainConfig
from vq.dataloader.augment import IntensityAugment
from vq.losses import PerceptualLoss, consistency_loss, ssim_loss
from vq.models import build_model, sample_latent
from vq.runtime import autocast, seed_everything
from vq.speed import GraphedStep, Undo, apply_speed_switches

log = logging.getLogger(__name__)


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


def warmup_factor(cfg: Config, step: int) -> float:
    """The linear warm-up's factor on the scheduled lr at a 0-based step (train.warmup_steps)."""
    return min(1.0, (step + 1) / cfg.train.warmup_steps) if cfg.train.warmup_steps else 1.0


class WeightAverage:
    """An exponential moving average of a model's weights (train.ema_decay), for validation and test.

    The decay ramps up as min(decay, (1 + n) / (10 + n)) over the n updates, so that the average
    does not remember the random initialisation. Buffers and the codebook are copied, not averaged:
    a codebook restart or the k-means start moves a code at once, and a lagging code would be
    chosen by no encoder output.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        own, new = dict(self.model.named_parameters()), dict(model.named_parameters())
        averaged = [k for k in own if not k.startswith("quantizer.")]
        # the pairs once: an optimizer updates the weights in place, so they stay the same tensors
        self._averaged = ([own[k] for k in averaged], [new[k] for k in averaged])
        self._copied = [(own[k], new[k]) for k in own if k not in averaged]
        self._copied += list(zip(self.model.buffers(), model.buffers()))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average towards `model`, the model it was made from."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(*self._averaged, 1 - decay)
        for mine, theirs in self._copied:
            mine.copy_(theirs)
        self.model.bypass_quantizer = getattr(model, "bypass_quantizer", False)


def make_optimizer(model: nn.Module, cfg: Config, capturable: bool = False) -> torch.optim.AdamW:
    """AdamW of the config. `capturable`: the step count and lr live on the device (CUDA), so that an
    update can be undone on the device (`train_step`) and captured in a CUDA graph."""
    t = cfg.train
    device = next(model.parameters()).device
    groups = [{"params": list(model.parameters()), "lr_scale": 1.0}]  # one group: the paper's
    if t.code_lr_scale != 1.0:
        named = list(model.named_parameters())
        groups = [{"params": [p for name, p in named if not is_code_path(name)], "lr_scale": 1.0},
                  {"params": [p for name, p in named if is_code_path(name)], "lr_scale": t.code_lr_scale}]
    for group in groups:
        lr = t.lr * group["lr_scale"]
        group["lr"] = torch.tensor(lr, device=device) if capturable else lr
    return torch.optim.AdamW(groups, betas=tuple(t.betas), weight_decay=t.weight_decay, capturable=capturable)


def is_code_path(name: str) -> bool:
    """The parameters through which the target code reaches the decoder: its embedding and each
    hyper-conv's mixing Linears (train.code_lr_scale)."""
    return name.startswith("decoder.embed.") or ".mix." in name or ".mix_bias." in name


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled lr on every parameter group, times the group's `lr_scale`."""
    for group in optimizer.param_groups:
        value = lr * group.get("lr_scale", 1.0)
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)  # in place: a captured step reads this tensor
        else:
            group["lr"] = value


def load_optimizer_state(optimizer: torch.optim.AdamW, state: dict) -> None:
    """Load a checkpoint's optimizer state, keeping this optimizer's own `capturable` and lr kind:
    a checkpoint written on another device type carries the other setting."""
    own = [(group["capturable"], group["lr"]) for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    saved_lr = float(optimizer.param_groups[0]["lr"])
    for group, (capturable, lr) in zip(optimizer.param_groups, own):
        group["capturable"], group["lr"] = capturable, lr
        for p in group["params"]:
            if "step" in optimizer.state.get(p, {}):
                step = optimizer.state[p]["step"]
                optimizer.state[p]["step"] = step.to(p.device if capturable else "cpu", torch.float32)
    set_lr(optimizer, saved_lr)


class Recipe(nn.Module):
    """Computes the full training loss of a batch; holds the frozen perceptual network.

    Shapes inside do not depend on the data (which codes a batch holds, which samples are
    augmented) and nothing reads a tensor on the host, so the whole forward compiles as one
    graph (`torch.compile(fullgraph=True)`) and a step can be captured as a CUDA graph.
    """

    def __init__(self, model: nn.Module, cfg: Config, perceptual: PerceptualLoss | None,
                 amp: torch.dtype | None = None):
        super().__init__()
        self.model, self.cfg, self.amp = model, cfg, amp
        self.perceptual = perceptual
        self.augment = IntensityAugment(mode=cfg.data.augment_mode) if cfg.data.augment else None

    def inputs(self, src: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The augmented inputs of a batch and whether the step may run: -> (in_src, in_tgt, ok).

        ok: a 0-d bool tensor, False when `train.skip_degenerate` and an augmented input of the
        batch is empty or constant (mean == -1 within 1e-8, or std < 1e-8), the reference's skip.
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
                phase: Phase) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """src/tgt: clean (B,1,H,W) in [-1,1]; src_idx/tgt_idx: (B,) sequence indices
        -> (loss, statistics as 0-d tensors, ok: whether the step may run, see `inputs`)."""
        cfg, model, amp = self.cfg.train, self.model, self.amp
        batch, device = src.shape[0], src.device
        in_src, in_tgt, ok = self.inputs(src, tgt)

        sources = torch.cat([src_idx, tgt_idx])  # (2B,) what each encoded image is (model.source_code)
        with autocast(device, amp):
            if phase.domain_aug:  # step 4: each source, with p = 0.5, becomes the model's own translation
                swap = torch.rand(batch, 1, 1, 1, device=device) < 0.5
                code = model.random_code(batch, uniform_on=cfg.random_code)  # (B, code_dim)
                with torch.no_grad():  # all B sources are translated, so that shapes do not depend on the draw
                    fake = model(in_src, src_idx, code)
                in_src = torch.where(swap, fake.to(in_src.dtype), in_src)
                # a translated source is read as what it was translated to: (2B, code_dim)
                sources = torch.cat([torch.where(swap.view(batch, 1), code, model.sequence_code(src_idx)),
                                     model.sequence_code(tgt_idx)])

            enc = model.encode(torch.cat([in_src, in_tgt]), sources)  # (2B,1,H,W) -> latent (2B,D,h,w)
            lat_src, lat_tgt = enc.latent.chunk(2)
            latents = [lat_src, lat_tgt, lat_src, lat_tgt]
            codes = [tgt_idx, src_idx, src_idx, tgt_idx]  # i->j, j->i, i->i, j->j
            if phase.sampling:  # step 3: VQC latent sampling around the pair's mean
                sample = sample_latent([lat_src, lat_tgt])
                latents += [sample, sample]
                codes += [src_idx, tgt_idx]
            out = model.decode(torch.cat(latents), torch.cat(codes))  # (4B or 6B, 1, H, W)

        # Losses in fp32. Targets of the outputs, in order: tgt, src, src, tgt (, src, tgt).
        out = out.float()
        n_out = out.shape[0] // batch
        targets = torch.cat([tgt, src, src, tgt, src, tgt][:n_out])
        # Without sampling the last two outputs ARE i->i and j->j (step 3): count those twice.
        weight = torch.ones(n_out, device=device)
        if not phase.sampling:
            weight = weight + (torch.arange(n_out, device=device) >= 2)  # 1, 1, 2, 2
        w = weight.repeat_interleave(batch)  # (n_out*B,)

        l1 = (w * (out - targets).abs().flatten(1).mean(1)).sum() / batch
        l_ssim = (w * ssim_loss(out, targets, reduction="none")).sum() / batch
        parts = {"l1": l1, "ssim": l_ssim}
        loss = cfg.lambda_l1 * l1 + cfg.lambda_ssim * l_ssim
        if self.perceptual is not None and cfg.lambda_per > 0:
            # each output's clean target: its row in cat([src, tgt]) (2B rows)
            index = torch.cat([torch.arange(batch, device=device) + batch * is_tgt
                               for is_tgt in (1, 0, 0, 1, 0, 1)[:n_out]])
            with autocast(device, amp):
                feats = self.perceptual.target_features(torch.cat([src, tgt]))  # clean targets, once
                per = (w * self.perceptual(out, feats, index)).sum() / batch
            parts["per"] = per
            loss = loss + cfg.lambda_per * per
        if enc.indices is not None:  # a quantizer (with train.quantizer_warmup: 0 while it is bypassed)
            parts["vq"] = 2 * enc.loss_vq.float()  # both encodings; the quantizer averages over 2B
            loss = loss + cfg.lambda_vq * parts["vq"]
        if cfg.consistency:
            con, con_parts = consistency_loss(lat_src.float(), lat_tgt.float(), src, tgt,
                                              contrast=phase.contrast, temperature=cfg.temperature,
                                              keep=cfg.contrast_keep, mse_over=cfg.con_mse,
                                              variant=cfg.contrast)
            parts["con"] = con
            loss = loss + cfg.lambda_con * con
        stats = {k: v.detach() for k, v in parts.items()}
        stats["loss"] = loss.detach()
        if enc.indices is not None:
            stats.update(model.quantizer.codebook_usage(enc.indices))
        return loss, stats, ok


@dataclass
class Training:
    """A run's model, recipe and optimizer, and its statistics on the device.

    `train_step` queues steps without waiting for the device; `read_stats` reads what they
    left (one transfer) and raises for a non-finite loss, naming its step.
    """

    cfg: Config
    model: nn.Module
    recipe: Recipe
    optimizer: torch.optim.AdamW
    loss_fn: Callable
    """The recipe, DDP-wrapped and compiled as the config says."""
    eager_fn: Callable
    """`loss_fn` uncompiled: the step that runs the k-means codebook initialisation, so that the
    compiled graph never holds it."""
    counts: torch.Tensor
    """(3,) int64 on the device: steps taken (from the start step), steps skipped, first step with a
    non-finite loss (-1: none)."""
    sync_free: bool = True
    """train.sync_free as resolved for this device: False checks a degenerate batch on the host and
    skips its backward and update (cheaper on a CPU than a step undone on the device)."""
    keys: list[str] = field(default_factory=list)
    """Names of the statistics, in the order of `values` (known after the first step)."""
    values: torch.Tensor | None = None
    """(len(keys),) the statistics of the last step taken."""
    bad_values: torch.Tensor | None = None
    """(len(keys),) the statistics of the first step with a non-finite loss."""
    graphed: GraphedStep | None = None
    """With train.cuda_graph: the step, captured once per phase and replayed."""


def build_training(cfg: Config, device: torch.device, model: nn.Module | None = None,
                   perceptual: PerceptualLoss | None = None, amp: torch.dtype | None = None,
                   start_step: int = 0, ddp: bool = False) -> Training:
    """Everything a run trains with, as the training script and the benchmark use it.

    model: None builds a fresh one from `cfg.seed`. The speed switches of the config
    (checkpointing, channels_last, sync_free) are applied here; `ddp` wraps the recipe in
    DistributedDataParallel (its forward is what backward averages); `train.compile`
    compiles it. start_step: the step count a resumed run starts from.
    """
    if model is None:
        seed_everything(cfg.seed)
        model = build_model(cfg.model)
    model = model.to(device).train()
    t = cfg.train
    sync_free = resolve_sync_free(t, device)
    apply_speed_switches(t.checkpointing, t.channels_last, model, perceptual, sync_free)
    recipe = eager_fn = loss_fn = Recipe(model, cfg, perceptual, amp)
    if ddp:
        device_ids = [device.index] if device.type == "cuda" else None
        eager_fn = loss_fn = DistributedDataParallel(recipe, device_ids=device_ids)
    if t.compile:
        breaks = graph_breaks(cfg, sync_free, ddp)
        if breaks:
            log.info("train.compile: the step compiles in pieces: %s", "; ".join(breaks))
        loss_fn = torch.compile(loss_fn, fullgraph=not breaks)
    if t.cuda_graph and (device.type != "cuda" or ddp or t.compile or t.checkpointing or not sync_free):
        raise ValueError("train.cuda_graph needs a CUDA device, one process, train.compile=false, "
                         "train.checkpointing=false and train.sync_free not false")
    optimizer = make_optimizer(model, cfg, capturable=device.type == "cuda")
    counts = torch.tensor([start_step, 0, -1], device=device)
    return Training(cfg, model, recipe, optimizer, loss_fn, eager_fn, counts, sync_free,
                    graphed=GraphedStep() if t.cuda_graph else None)


def resolve_sync_free(train: TrainConfig, device: torch.device) -> bool:
    """train.sync_free on `device`: null is on for CUDA, train.compile and train.cuda_graph, and off
    for an eager step on a CPU (docs/speed.md)."""
    if train.sync_free is not None:
        return train.sync_free
    return device.type != "cpu" or train.compile or train.cuda_graph


def graph_breaks(cfg: Config, sync_free: bool, ddp: bool) -> list[str]:
    """Why train.compile cannot take the step as one graph; empty: it compiles with fullgraph=True.
    (The k-means codebook initialisation is not one: its step runs eagerly, see `Training.eager_fn`.)"""
    reasons = []
    if ddp:
        reasons.append("DistributedDataParallel splits the graph at its gradient buckets")
    if not sync_free:
        reasons.append("train.sync_free false: the decoder groups each batch by code on the host")
    if cfg.train.contrast == "text":
        reasons.append("train.contrast text: the foreground positions (nonzero) have data-dependent shapes")
    return reasons


def to_device(batch: dict[str, torch.Tensor], device: torch.device, channels_last: bool = False) -> dict:
    """A loader batch as `train_step` takes it: src, tgt, src_idx and tgt_idx on the device, the images
    in channels_last memory format where train.channels_last says."""
    out = {key: batch[key].to(device, non_blocking=True) for key in ("src", "tgt", "src_idx", "tgt_idx")}
    if channels_last:
        out.update({key: out[key].contiguous(memory_format=torch.channels_last) for key in ("src", "tgt")})
    return out


def train_step(run: Training, batch: dict[str, torch.Tensor], phase: Phase) -> None:
    """One optimizer step on a batch (src, tgt, src_idx, tgt_idx on the device); nothing here waits
    for the device, so steps queue up until `read_stats`.

    A degenerate batch (`Recipe.inputs`, with train.skip_degenerate) is stepped and then undone on
    the device (with train.sync_free false: found on the host, and not stepped): weights, buffers
    and optimizer state get their values back and the step counts as skipped, as the reference's
    `continue` (the random draws of the step are consumed). A
    non-finite loss is recorded with its step, and `read_stats` raises it: the loop reads before
    every log row, checkpoint and validation, so no such weights are saved.
    With train.cuda_graph the step is captured once per phase and replayed.
    """
    skip = run.cfg.train.skip_degenerate
    if run.graphed is not None:  # the warm-up steps before the capture are undone: they change no weight
        run.graphed(phase, batch, lambda static: _step(run, static, phase, skip),
                    warmup=lambda static: _step(run, static, phase, undoable=True, force_skip=True))
        return
    _step(run, batch, phase, skip)


def _step(run: Training, batch: dict[str, torch.Tensor], phase: Phase, undoable: bool,
          force_skip: bool = False) -> None:
    on_host, undoable = undoable and not run.sync_free, undoable and run.sync_free
    undo = Undo(run.model, run.optimizer) if undoable else None
    quantizer = run.model.quantizer
    loss_fn = run.eager_fn if quantizer is not None and quantizer.init_pending else run.loss_fn
    loss, stats, ok = loss_fn(batch["src"], batch["tgt"], batch["src_idx"], batch["tgt_idx"], phase)
    if run.cfg.train.skip_degenerate and dist.is_available() and dist.is_initialized():  # all ranks step, or none
        flag = ok.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = flag.bool()
    if force_skip:
        ok = torch.zeros_like(ok)
    if on_host and not bool(ok):  # train.sync_free false: no backward, no update, nothing to undo
        _record(run, stats, loss, ok)
        return
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    if undo is not None:
        undo.unless(ok)
    _record(run, stats, loss, ok)


def _record(run: Training, stats: dict[str, torch.Tensor], loss: torch.Tensor, ok: torch.Tensor) -> None:
    values = torch.stack([v.float() for v in stats.values()])  # (K,)
    if run.values is None:
        run.keys, run.values, run.bad_values = list(stats), torch.zeros_like(values), torch.zeros_like(values)
    taken, skipped, first_bad = run.counts.unbind()
    taken = taken + ok.long()
    bad = ok & ~torch.isfinite(loss) & (first_bad < 0)
    run.values.copy_(torch.where(ok, values, run.values))  # in place: a CUDA graph writes the same memory
    run.bad_values.copy_(torch.where(bad, values, run.bad_values))
    run.counts.copy_(torch.stack([taken, skipped + (~ok).long(), torch.where(bad, taken, first_bad)]))


def read_stats(run: Training) -> tuple[int, int, dict[str, float]]:
    """Wait for the queued steps and read their results: -> (step count, steps skipped, statistics of
    the last step taken). Raises FloatingPointError when a step had a non-finite loss."""
    step, skipped, first_bad = run.counts.tolist()
    values = run.values.tolist() if run.values is not None else []
    if first_bad >= 0:
        bad = {k: round(v, 4) for k, v in zip(run.keys, run.bad_values.tolist())}
        raise FloatingPointError(f"non-finite loss at step {first_bad} ({bad})")
    return step, skipped, dict(zip(run.keys, values))
