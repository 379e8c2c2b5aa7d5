"""Training pairs, the training loader and the validation/test stacks (docs/method.md, "Data protocol").

Training items are clean images: the intensity augmentation runs batched on the
device in the training step (`vq.dataloader.augment`), and the losses need the
clean images anyway.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from vq.config import Config, DataConfig
from vq.dataloader.brats import SliceCache, available_cpus
from vq.dataloader.preprocess import brain_range, central_slices, pad_or_crop
from vq.dataloader.sampler import EpochSampler
from vq.sequences import N_SEQ, SEQUENCES, available, train_pair

log = logging.getLogger(__name__)


def train_sequences(code: int, missing_setting: bool) -> tuple[int, ...]:
    """Sequences a training subject contributes: its n mod 3 neighbouring pair ("missing"), else all four."""
    return train_pair(code) if missing_setting else tuple(range(N_SEQ))


class PairDataset(Dataset):
    """(source, target) slices of one training subject, cropped and flipped alike.

    Items are indexed by the keys of `EpochSampler` (epoch * len + item): all
    randomness of an item (which pair order, slice, crop, flip) comes from
    (seed, key) alone, so a run sees the same data whatever the worker count,
    and after a resume. An epoch is `slices_per_subject` items per subject; with
    `group_by_subject` the flip is drawn once per (epoch, subject), shared by the
    subject's items, as the reference flips a loaded subject.
    """

    def __init__(self, cache: SliceCache, subjects: list[tuple[str, int]], cfg: DataConfig, seed: int = 0):
        if not subjects:
            raise ValueError("no training subjects")
        self.cache, self.subjects, self.cfg, self.seed = cache, list(subjects), cfg, seed

    def __len__(self) -> int:
        return self.cfg.slices_per_subject * len(self.subjects)

    def offset(self, rng: np.random.Generator, n: int, size: int) -> int:
        """A random start of a `size` window in `n`: 0..n-size-1 with data.offsets "reference" (its
        randint never draws the last start), 0..n-size with "full"; 0 when n <= size."""
        last = n - size - (1 if self.cfg.offsets == "reference" else 0)
        return int(rng.integers(max(last, 0) + 1))

    def __getitem__(self, key: int) -> dict:
        rng = np.random.default_rng((self.seed, key))
        subject = key % len(self.subjects)
        name, code = self.subjects[subject]
        # either sequence of the pair may be the source
        src, tgt = (int(i) for i in rng.choice(train_sequences(code, self.cfg.missing), size=2, replace=False))
        src_vol, tgt_vol = self.cache.volume(name, src), self.cache.volume(name, tgt)  # (S, X, Y) float16
        index = self.offset(rng, src_vol.shape[0], 1)
        size = self.cfg.training_crop
        if size == self.cfg.crop:
            start = tuple(self.offset(rng, n, size) for n in src_vol.shape[1:])
        else:  # inside the centred `crop` window
            start = tuple(max(n - self.cfg.crop, 0) // 2 + self.offset(rng, min(n, self.cfg.crop), size)
                          for n in src_vol.shape[1:])
        flip_rng = rng
        if self.cfg.group_by_subject:
            flip_rng = np.random.default_rng((self.seed, key // len(self), subject, 1))  # (epoch, subject)
        flip = self.cfg.flip and flip_rng.random() < 0.5

        def view(volume: np.ndarray) -> torch.Tensor:  # (S, X, Y) -> (1, size, size) float32
            image = pad_or_crop(np.asarray(volume[index], dtype=np.float32), size, start)
            if flip:
                image = image[::-1]  # axis 0 is X, left-right in RAS+: a mirrored brain is still a brain
            return torch.from_numpy(np.ascontiguousarray(image))[None]

        return {"src": view(src_vol), "tgt": view(tgt_vol), "src_idx": src, "tgt_idx": tgt, "name": name}


def default_workers() -> int:
    """DataLoader workers when `data.num_workers` is -1: min(2, CPUs - 1).

    An item is two contiguous page reads from the slice cache and a crop (~0.1 ms),
    so one worker keeps a GPU fed; a second hides disk latency while the page cache
    is cold. More only cost memory and start-up time.
    """
    return max(0, min(2, available_cpus() - 1))


def make_train_loader(cfg: Config, cache: SliceCache, subjects: list[tuple[str, int]], seed: int = 0,
                      distributed: bool = False) -> DataLoader:
    """Loader of training pairs; call `loader.sampler.set_epoch(epoch)` before each epoch.

    Ensures the cache of the sequences the subjects contribute (a bad subject raises
    BratsDataError; training checks them all first, `vq.dataloader.check`).
    `distributed`: each rank of the process group gets a disjoint, equally long share
    of every epoch.
    """
    cache.ensure({name: train_sequences(code, cfg.data.missing) for name, code in subjects})
    dataset = PairDataset(cache, subjects, cfg.data, seed)
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    group = cfg.data.slices_per_subject if cfg.data.group_by_subject else 1
    sampler = EpochSampler(len(dataset), cfg.train.batch_size, seed, rank, world, group)
    workers = cfg.data.num_workers if cfg.data.num_workers >= 0 else default_workers()
    log.info("training pairs: %d subjects, %d items per epoch, %d loader workers",
             len(dataset.subjects), len(dataset), workers)
    # Own generator: creating an iterator must not draw from the global RNG (resume reproducibility).
    return DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=workers,
                      generator=torch.Generator().manual_seed(seed),
                      pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0, drop_last=True)


def intensity_reference(cache: SliceCache, subjects: list[tuple[str, int]], missing_setting: bool) -> dict[str, list[float]]:
    """The brain's robust range (`preprocess.brain_range`) of each sequence, the mean over the training
    volumes in the cache: the model's intensity convention, saved with its checkpoints so that synthesis
    can map z-scored inputs onto it (`preprocess.prepare`)."""
    ranges: dict[int, list[tuple[float, float]]] = {}
    for name, code in subjects:
        for seq in train_sequences(code, missing_setting):
            ranges.setdefault(seq, []).append(brain_range(cache.volume(name, seq)))
    return {SEQUENCES[seq]: [float(np.nanmean([r[i] for r in found])) for i in (0, 1)]
            for seq, found in sorted(ranges.items())}


def load_eval_stack(cache: SliceCache, name: str, seq: str | int, n: int | None = None) -> torch.Tensor:
    """Centre-cropped central slices of a cached volume -> (S, 1, crop, crop) float32 in [-1, 1].

    n = None: all `n_slices` (test); validation uses the central 16 (`train.val_slices`).
    """
    volume = cache.volume(name, seq)  # (n_slices, X, Y) float16
    picked = np.asarray(volume[central_slices(volume.shape[0], n or volume.shape[0])], dtype=np.float32)
    return torch.from_numpy(pad_or_crop(picked, cache.prep.crop))[:, None]  # centre crop


def validation_stacks(cache: SliceCache, subjects: list[tuple[str, int]], n: int) -> dict[str, dict[int, torch.Tensor]]:
    """Subject -> {available sequence index: its central `n` slices (S,1,H,W)}: what validation translates.
    Where no subject has two available sequences there is nothing to translate, so all four are used
    (the validation subjects are checked for all four)."""
    seqs = {name: available(code) for name, code in subjects}
    if all(len(names) < 2 for names in seqs.values()):
        log.warning("no valid subject has two available sequences; validating on all four sequences instead")
        seqs = {name: list(range(N_SEQ)) for name in seqs}
    return {name: {s: load_eval_stack(cache, name, s, n) for s in names} for name, names in seqs.items()}
