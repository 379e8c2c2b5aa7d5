"""Evaluate a trained model on the test list as the paper does (docs/method.md, "Evaluation protocol").

    python publications/src/vq/test/test_brats_vq_2d_metrics.py -d cuda:0 \
        -c publications/config/vq/vqseq2seq_brats_2d_missing_3_256.yaml \
        -l outputs/ckpt/vqseq2seq/brats/2d/ckpt_best.pth -o outputs/results/vq_seq2seq/brats/2d/

Writes OUT_DIR/result_metrics.csv (model), baseline_metrics.csv (copy the source),
tissue_contrast.csv (per tissue, where a label map exists), summary.csv and summary.md
(Table-1 layout, then inside the brain), figures/<ID>.png (source, prediction and real
target of every translation) and nifti/<ID>/ predictions in the source files' own geometry.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from vq.cli import add_model_args, load_trained_model, run_main
from vq.config import load_config, resolve_path
from vq.dataloader.brats import SliceCache, subject_files
from vq.dataloader.datasets import load_eval_stack
from vq.dataloader.lists import read_list
from vq.dataloader.preprocess import central_slices, pad_or_crop
from vq.evaluation import CONTRAST_COLUMNS, SubjectLabels, Translator, contrast_rows, score, summarize, \
    summary_markdown, translations_for, write_metrics, write_summary
from vq.labels import label_stack, load_labels, subject_labels
from vq.metrics import LPIPSMetric
from vq.nifti import ras_shape, save_like, to_intensity
from vq.runtime import amp_dtype, resolve_device
from vq.sequences import N_SEQ, SEG, SEQUENCES, subject_file
from vq.viz import save_png, translation_figure

log = logging.getLogger("test")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--list", default="test.csv", help="data list in data.lists (default test.csv)")
    p.add_argument("--lpips-weights", help="AlexNet ImageNet weights file for LPIPS (else test.lpips_weights)")
    p.add_argument("--overwrite", action="store_true", help="replace results already in OUT_DIR")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return run_main(run, parse_args(argv), log)


def run(args) -> None:
    cfg = load_config(args.config, args.set)
    out = Path(args.out)
    if (out / "result_metrics.csv").exists() and not args.overwrite:
        raise FileExistsError(f"{out} already holds results; pass --overwrite or choose another -o")
    device = resolve_device(args.device)
    amp = amp_dtype(device, cfg.test.amp)
    model = load_trained_model(cfg, args.load, device)
    translator = Translator(model, device, amp, cfg.test.batch_size)
    lpips = LPIPSMetric.try_create(args.lpips_weights or cfg.test.lpips_weights, device=device)

    root = resolve_path(cfg.data.root)
    subjects = read_list(cfg.lists_dir / args.list)
    cache = SliceCache(resolve_path(cfg.data.cache_dir), root, cfg.data)
    cache.ensure([name for name, _ in subjects])  # test: a bad subject is an error, not a skip
    out.mkdir(parents=True, exist_ok=True)

    rows, baseline, contrast = [], [], []
    for name, code in tqdm(subjects, desc="subjects", dynamic_ncols=True):
        stacks = {s: load_eval_stack(cache, name, s) for s in range(N_SEQ)}  # (S,1,crop,crop) each
        labels = eval_labels(root, name, cfg)
        memo = {}  # latents and intermediate stacks shared by this subject's translations
        copy_scores = {}  # (src, tgt) -> the copy baseline's scores, shared by single and multi-step rows
        panels = []  # (source, prediction, target) centre slices of the single steps, for the figure
        for tr in translations_for(code, cfg.test.multi_step):
            pred = translator.translate(stacks[tr.src], tr.path, memo)
            target = stacks[tr.tgt].to(device)
            names = {"name": name, "src": SEQUENCES[tr.src], "tgt": SEQUENCES[tr.tgt], "steps": tr.steps}
            rows.append({**names, "method": "model", **score(pred, target, lpips, labels)})
            if (tr.src, tr.tgt) not in copy_scores:
                copy_scores[tr.src, tr.tgt] = score(stacks[tr.src].to(device), target, lpips, labels)
            baseline.append({**names, "method": "copy_source", **copy_scores[tr.src, tr.tgt]})
            if labels is not None:
                contrast += contrast_rows(rows[-1], labels.spec.reference_name)
                contrast += contrast_rows(baseline[-1], labels.spec.reference_name)
            if not tr.multi:
                mid = len(pred) // 2
                panels.append((tr.src, tr.tgt, stacks[tr.src][mid, 0].numpy(), pred[mid, 0].cpu().numpy(),
                               stacks[tr.tgt][mid, 0].numpy()))
            if cfg.test.save_nifti:
                save_prediction(pred, root, name, tr, cfg, out)
        if panels:
            save_png(translation_figure(panels, f"{name}: centre slice, source / prediction / real target"),
                     out / "figures" / f"{name}.png")
    write_metrics(rows, out / "result_metrics.csv")
    write_metrics(baseline, out / "baseline_metrics.csv")
    if contrast:
        write_metrics(contrast, out / "tissue_contrast.csv", CONTRAST_COLUMNS)
    summary = summarize(rows + baseline)
    write_summary(summary, out / "summary.csv", out / "summary.md")
    log.info("wrote %s", out)
    print(summary_markdown(summary))


def eval_labels(root: Path, name: str, cfg) -> SubjectLabels | None:
    """The subject's label stacks, cut like the image stacks: the contrast metric's map (the tissue map
    on the phantom, else the BraTS segmentation) and the tumour mask (segmentation > 0); None when the
    subject has neither (test subjects need no segmentation)."""
    cut = lambda labels: label_stack(labels, cfg.data.n_slices, cfg.data.n_slices, cfg.data.crop)
    seg_path = root / name / subject_file(name, SEG, cfg.data.naming)
    seg = cut(load_labels(seg_path)) if seg_path.is_file() else None
    found = subject_labels(root, name, cfg.data.naming)
    if found is None:
        return None
    path, spec = found
    stack = seg if path == seg_path else cut(load_labels(path, allowed=(0, *spec.classes.values(), spec.reference_label)))
    return SubjectLabels(stack, spec, None if seg is None else seg > 0)


def save_prediction(pred: torch.Tensor, root: Path, name: str, tr, cfg, out: Path) -> Path:
    """Paste the (S,1,crop,crop) prediction into the source file's full grid and geometry."""
    source = nib.load(str(subject_files(root, name, [tr.src], cfg.data.naming)[SEQUENCES[tr.src]]))  # the seg file is optional here
    full = np.zeros(ras_shape(source), dtype=np.float32)  # (X, Y, Z) in RAS, background 0
    x, y, z = full.shape
    # centred fitting undoes the centre crop (or pad), background -1 -> 0: (S,1,crop,crop) -> (S,X,Y)
    volume = to_intensity(pad_or_crop(pred[:, 0].cpu().numpy(), (x, y)))
    full[:, :, central_slices(z, len(volume))] = volume.transpose(1, 2, 0)  # (S,X,Y) -> (X,Y,S)
    via = "" if not tr.multi else "_via_" + "_".join(SEQUENCES[i] for i in tr.path[1:-1])
    path = out / "nifti" / name / f"{name}_{SEQUENCES[tr.tgt]}_from_{SEQUENCES[tr.src]}{via}.nii.gz"
    return save_like(full, source, path)


if __name__ == "__main__":
    sys.exit(main())
