"""Semantic latent (docs/method.md, "Claims of the paper beyond Table 1"): one-shot tumour segmentation
through the common latent space.

ONE labelled subject (the support) is encoded from one sequence; its labels, by majority vote over each
latent cell, label its latent vectors. A k-nearest-neighbour classifier on those vectors (`KNN`) then
labels every latent position of every other subject, encoded from its own sequence. Class probabilities
are upsampled bilinearly to full resolution, masked to the brain (pixels > -1), and scored by Dice
(`vq.metrics.region_dice`). The same classifier on raw-intensity features (`intensity_features`) is the
baseline that shows what the latent adds.
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from vq.dataloader.brats import BratsDataError, subject_files
from vq.dataloader.datasets import load_eval_stack
from vq.dataloader.lists import DataListError
from vq.evaluation import TestRun
from vq.files import write_atomic, write_csv
from vq.labels import BRATS_LABELS, TUMOUR_REGIONS, label_stack, load_labels
from vq.metrics import region_dice
from vq.sequences import SEG, SEQUENCES, available

log = logging.getLogger(__name__)

LABELS = (0, *BRATS_LABELS.values())
"""BraTS labels (0 no tumour, 1 necrosis, 2 oedema, 4 enhancing); class index = position here."""
FEATURES = ("latent", "intensity")


def intensity_features(stack: Tensor, factor: int) -> Tensor:
    """Raw-intensity baseline: (S,1,H,W) -> (S,4,H/f,W/f): mean and std of each f x f cell, and mean and std
    of the cell means over its 3 x 3 neighbourhood (some context, as the latent has)."""
    mean = F.avg_pool2d(stack, factor)
    std = (F.avg_pool2d(stack ** 2, factor) - mean ** 2).clamp_min(0).sqrt()
    context = F.avg_pool2d(mean, 3, stride=1, padding=1, count_include_pad=False)
    context_std = (F.avg_pool2d(mean ** 2, 3, stride=1, padding=1, count_include_pad=False)
                   - context ** 2).clamp_min(0).sqrt()
    return torch.cat([mean, std, context, context_std], 1)


class KNN:
    """k nearest neighbours (euclidean, on features z-scored with the support's statistics).

    At most `per_class` support vectors per class are kept, drawn at random; each
    neighbour's vote is weighted by (vectors of its class) / (kept of its class), so
    the subsampling does not change the class frequencies the classifier has seen.
    """

    def __init__(self, vectors: Tensor, classes: Tensor, k: int = 15, per_class: int = 2000, seed: int = 0):
        """vectors (N, F), classes (N,) class indices."""
        gen = torch.Generator().manual_seed(seed)
        keep, weight = [], torch.zeros(len(LABELS))
        for c in classes.unique().tolist():
            members = torch.nonzero(classes == c).flatten()
            picked = members[torch.randperm(len(members), generator=gen)[:per_class].to(members.device)]
            keep.append(picked)
            weight[c] = len(members) / len(picked)
        keep = torch.cat(keep)
        self.mean, self.std = vectors.mean(0), vectors.std(0).clamp_min(1e-6)
        self.vectors, self.classes = (vectors[keep] - self.mean) / self.std, classes[keep]
        self.vote = weight.to(vectors.device)[self.classes]  # (M,) weight of each kept vector
        self.k = min(k, len(keep))

    def predict_proba(self, vectors: Tensor, chunk: int = 4096) -> Tensor:
        """(N, F) -> (N, n_classes) weighted share of the k neighbours' votes."""
        out = []
        for part in ((vectors - self.mean) / self.std).split(chunk):
            nearest = torch.cdist(part, self.vectors).topk(self.k, largest=False).indices  # (n, k)
            votes = torch.zeros(len(part), len(LABELS), device=part.device)
            out.append(votes.scatter_add_(1, self.classes[nearest], self.vote[nearest]))
        proba = torch.cat(out)
        return proba / proba.sum(1, keepdim=True)


def positions(features: Tensor) -> Tensor:
    """(S, F, h, w) -> (S*h*w, F): one vector per latent position."""
    return features.permute(0, 2, 3, 1).flatten(0, 2)


def cell_majority(labels: Tensor, factor: int) -> Tensor:
    """(S, H, W) BraTS labels -> (S, H/f, W/f) class indices: the most frequent class of each f x f cell."""
    classes = torch.bucketize(labels, torch.tensor(LABELS, device=labels.device))  # 0,1,2,4 -> 0,1,2,3
    onehot = F.one_hot(classes, len(LABELS)).permute(0, 3, 1, 2).float()  # (S, C, H, W)
    return F.avg_pool2d(onehot, factor).argmax(1)


def segment(knn: KNN, features: Tensor, image: Tensor) -> Tensor:
    """Features (S,F,h,w) of an image (S,1,H,W) -> BraTS labels (S,H,W), 0 outside the brain."""
    s, _, h, w = features.shape
    proba = knn.predict_proba(positions(features)).reshape(s, h, w, -1).permute(0, 3, 1, 2)  # (S, C, h, w)
    proba = F.interpolate(proba, size=image.shape[-2:], mode="bilinear", align_corners=False)
    labels = torch.tensor(LABELS, device=proba.device)[proba.argmax(1)]  # (S, H, W)
    return torch.where(image[:, 0].to(labels.device) > -1, labels, 0)


def run(test: TestRun, seq: int, support: str | None = None, query_seq: int | None = None, seed: int = 0) -> str:
    """Segment every subject of the list but the support -> the markdown table; writes
    oneshot_seg.csv (name, seq, feature, wt, tc, et) and oneshot_seg.md (mean +- std) into `test.out`.

    seq: the support's sequence; support: its ID (default: the first subject of the list with tumour
    labels in its central slices); query_seq: every query's sequence (default: its first available one);
    seed: of the support-vector subset.
    """
    cfg, device = test.cfg, test.translator.device

    def truth(name: str) -> Tensor:  # (S, crop, crop) BraTS labels
        labels = load_labels(subject_files(test.root, name, [SEG], cfg.data.naming)[SEG])
        return label_stack(labels, cfg.data.n_slices, cfg.data.n_slices, cfg.data.crop)

    for name, _ in tqdm(test.subjects, desc="checking segmentations", dynamic_ncols=True, leave=False):
        truth(name)  # a missing or broken one stops the run here, before any prediction
    support = pick_support(support, [name for name, _ in test.subjects], truth)
    factor = 2 ** cfg.model.n_down  # the latent's downsampling
    extract = {"latent": lambda stack, seq: test.translator.encode(stack, seq),  # (S,1,H,W) -> (S,D,H/f,W/f)
               "intensity": lambda stack, seq: intensity_features(stack, factor).to(device)}
    image = load_eval_stack(test.cache, support, seq)  # (S, 1, crop, crop)
    cells = cell_majority(truth(support), factor).to(device)  # (S, h, w)
    brain = F.avg_pool2d((image > -1).float(), factor)[:, 0].to(device) >= 0.5  # (S, h, w) mostly brain
    classifiers = {feature: KNN(positions(fn(image, seq))[brain.flatten()], cells[brain], seed=seed)
                   for feature, fn in extract.items()}
    log.info("support %s (%s): %d brain cells, classes %s", support, SEQUENCES[seq], int(brain.sum()),
             {LABELS[c]: int((cells[brain] == c).sum()) for c in range(len(LABELS))})

    queries = [(name, code) for name, code in test.subjects if name != support]
    if not queries:
        raise DataListError(f"{test.data_list}: no subject besides the support {support} to segment")
    rows = []
    for name, code in tqdm(queries, desc="subjects", dynamic_ncols=True):
        query = query_seq if query_seq is not None else available(code)[0]
        stack, labels = load_eval_stack(test.cache, name, query), truth(name)
        for feature, fn in extract.items():
            pred = segment(classifiers[feature], fn(stack, query), stack)
            rows.append({"name": name, "seq": SEQUENCES[query], "feature": feature, **region_dice(pred, labels)})
    write_csv(test.out / "oneshot_seg.csv", rows, ["name", "seq", "feature", *TUMOUR_REGIONS], digits=4)
    table = markdown(rows, support, SEQUENCES[seq])
    write_atomic(test.out / "oneshot_seg.md", lambda f: f.write(table.encode()))
    return table


def pick_support(wanted: str | None, names: list[str], truth: Callable[[str], Tensor]) -> str:
    """The support subject: `wanted`, checked to hold tumour labels in its slices, or the first that does."""
    if wanted is not None:
        if wanted not in names:
            raise DataListError(f"support subject {wanted} is not in the data list")
        if not truth(wanted).any():
            raise BratsDataError(f"subject {wanted}: no tumour labels in its central slices; choose another --support")
        return wanted
    for name in names:
        if truth(name).any():
            return name
    raise BratsDataError("no subject of the data list has tumour labels in its central slices")


def markdown(rows: list[dict], support: str, seq: str) -> str:
    """Mean +- std Dice per feature over the query subjects, and how they were made."""
    head = ["feature", "n", *(f"Dice {r.upper()}" for r in TUMOUR_REGIONS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for feature in FEATURES:
        members = [row for row in rows if row["feature"] == feature]
        cells = [f"{np.mean([m[r] for m in members]):.3f} +- {np.std([m[r] for m in members]):.3f}"
                 for r in TUMOUR_REGIONS]
        lines.append(f"| {feature} | {len(members)} | " + " | ".join(cells) + " |")
    queried = ", ".join(sorted({row["seq"] for row in rows}))
    note = (f"\nOne-shot segmentation from the labels of ONE subject, {support} ({seq}); query subjects from "
            f"{queried}. A 15-nearest-neighbour classifier (euclidean, z-scored features, up to 2000 support "
            "vectors per class, votes reweighted to the support's class frequencies) labels each latent position "
            "(1/4 resolution); probabilities are upsampled bilinearly and masked to the brain. `latent`: the "
            "model's quantized latent z_q; `intensity`: mean and std of the normalised intensity per 4x4 cell and "
            "over its 3x3-cell neighbourhood. WT = labels 1, 2, 4; TC = 1, 4; ET = 4. Dice of an empty "
            "prediction against an empty truth is 1; subjects without tumour are included.\n")
    return "\n".join(lines) + "\n" + note
