"""Pictures a person would rather look at than read: training curves, sample grids, the robustness plot."""
from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless machines: no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from vq.corruptions import CORRUPTIONS  # noqa: E402
from vq.report import GOAL_CONTRAST_ERROR  # noqa: E402
from vq.sequences import DISPLAY_NAMES, SEQUENCES  # noqa: E402


def _floats(rows, key):
    xs, ys = [], []
    for row in rows:
        if row.get(key) not in (None, ""):
            xs.append(float(row["step"]))
            ys.append(float(row[key]))
    return xs, ys


def plot_progress(log_csv: str | Path, out_png: str | Path) -> None:
    """Loss terms and validation PSNR against the step, from the run's log.csv."""
    with open(log_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    fig, (ax_loss, ax_psnr) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "l1", "ssim", "per", "vq", "con"):
        xs, ys = _floats(rows, key)
        if xs and any(y > 0 for y in ys):
            ax_loss.plot(xs, ys, label=key, lw=1)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_title("training losses")
    ax_loss.legend(fontsize=8)
    xs, ys = _floats(rows, "val_psnr")
    ax_psnr.plot(xs, ys, "o-", color="C3")
    ax_psnr.set_xlabel("step")
    ax_psnr.set_ylabel("dB")
    ax_psnr.set_title("validation PSNR")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def plot_demo_curve(rows: list[dict], curves: dict[str, list[tuple[int, float, float]]], out_png: str | Path,
                    connect: bool = False) -> None:
    """Quality against training time (`vq.report`): validation brain PSNR along each run, and per run
    the test scores (brain PSNR of model and copy, contrast error, share of tissue orders kept). The
    x axis is wall minutes where every run logged them (`elapsed_s`), else training steps. `connect`: the
    rows are snapshots of one run, joined by a line, against its training steps."""
    timed = not connect and all(np.isfinite(r["minutes"]) for r in rows)
    at = lambda step, minutes: minutes if timed else step  # noqa: E731
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, row in enumerate(rows):
        color, x = f"C{i}", at(row["steps"], row["minutes"])
        points = [(at(s, m), p) for s, m, p in curves.get(row["run"], [])]
        if points:
            axes[0].plot(*zip(*points), "-", color=color, lw=1, alpha=0.6)
        axes[0].plot(x, row["psnr_brain"], "o", color=color, label=row["run"])
        axes[0].plot(x, row["copy_psnr_brain"], "x", color=color)
        axes[1].plot(x, row["contrast_error"], "o", color=color)
        axes[2].plot(x, row["tissue_order"], "o", color=color)
    if connect:
        xs = [at(r["steps"], r["minutes"]) for r in rows]
        for ax, key in zip(axes, ("psnr_brain", "contrast_error", "tissue_order")):
            ax.plot(xs, [r[key] for r in rows], "-", color="k", lw=1)
        axes[0].plot(xs, [r["copy_psnr_brain"] for r in rows], ":", color="k", lw=1)
        axes[1].plot(xs, [r["copy_contrast_error"] for r in rows], ":", color="k", lw=1, label="copy")
        axes[1].axhline(GOAL_CONTRAST_ERROR, color="g", lw=1, ls="--", label="goal")
        axes[1].set_ylim(0, max(1.0, max(r["copy_contrast_error"] for r in rows) * 1.05))
        axes[1].legend(fontsize=7)
        axes[2].set_ylim(0, 1.02)
    titles = ("brain PSNR, dB (o test, x copy, line validation)", "contrast error (test)",
              "tissue order kept (test, share)")
    for ax, title in zip(axes, titles):
        ax.set_xlabel("training minutes" if timed else "training steps")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def plot_study(curves: dict[str, list[tuple[int, float, float]]], out_png: str | Path) -> None:
    """Validation brain PSNR against training minutes, a line per run ("SETTING/seedN"), one colour per
    setting (tools/demo_study.py)."""
    settings = list(dict.fromkeys(run.split("/")[0] for run in curves))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for run, points in curves.items():
        setting = run.split("/")[0]
        first = run == next(r for r in curves if r.startswith(setting + "/"))
        if points:
            _, minutes, psnr_brain = zip(*points)
            ax.plot(minutes, psnr_brain, "-o", ms=3, lw=1, color=f"C{settings.index(setting)}",
                    label=setting if first else None)
    ax.set_xlabel("training minutes")
    ax.set_ylabel("validation brain PSNR, dB")
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def sample_grid(truth: dict[int, np.ndarray], translations: dict[int, dict[int, np.ndarray]],
                title: str = "") -> np.ndarray:
    """An RGB image: first row the available ground truth, then one row per source with its
    translations to all four sequences. Images are 2D arrays in [-1, 1].
    Returns (H, W, 3) uint8, for PNG files and TensorBoard alike."""
    rows = 1 + len(translations)
    fig, axes = plt.subplots(rows, len(SEQUENCES), figsize=(2.2 * len(SEQUENCES), 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for t, name in enumerate(SEQUENCES):
        if t in truth:
            axes[0, t].imshow(truth[t].T[::-1], cmap="gray", vmin=-1, vmax=1)
        axes[0, t].set_title(f"{DISPLAY_NAMES[name]} (real)" if t in truth else f"{DISPLAY_NAMES[name]} missing",
                             fontsize=8)
    for r, (s, outs) in enumerate(sorted(translations.items()), 1):
        for t, image in outs.items():
            axes[r, t].imshow(image.T[::-1], cmap="gray", vmin=-1, vmax=1)
            axes[r, t].set_title(f"{DISPLAY_NAMES[SEQUENCES[s]]} -> {DISPLAY_NAMES[SEQUENCES[t]]}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return _rgb(fig)


def _rgb(fig, top: float = 1.0) -> np.ndarray:
    """The figure as an image, laid out below `top` (a fraction of its height: room for a suptitle)."""
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


def translation_figure(panels: list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]], title: str = "") -> np.ndarray:
    """One column per translation (src, tgt, source, prediction, real target), 2D images in [-1, 1]:
    the source on top, the prediction in the middle, the real target below, so the prediction sits
    between what the model saw and what it should have made. -> (H, W, 3) uint8."""
    fig, axes = plt.subplots(3, len(panels), figsize=(2.0 * len(panels), 6.4), squeeze=False)
    for c, (src, tgt, source, pred, target) in enumerate(panels):
        names = DISPLAY_NAMES[SEQUENCES[src]], DISPLAY_NAMES[SEQUENCES[tgt]]
        titles = (f"{names[0]} (source)", f"{names[0]} -> {names[1]}", f"{names[1]} (real)")
        for r, (image, text) in enumerate(zip((source, pred, target), titles)):
            axes[r, c].imshow(image.T[::-1], cmap="gray", vmin=-1, vmax=1)
            axes[r, c].set_title(text, fontsize=8)
            axes[r, c].axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    return _rgb(fig)


def settings_figure(truth: dict[int, np.ndarray], rows: dict[str, dict[tuple[int, int], np.ndarray]],
                    title: str = "") -> np.ndarray:
    """One subject's translations under several settings: a column per (source, target), the real target
    on top, then a row per setting (its label on the left). 2D images in [-1, 1] -> (H, W, 3) uint8."""
    pairs = list(next(iter(rows.values())))
    fig, axes = plt.subplots(1 + len(rows), len(pairs), figsize=(1.9 * len(pairs), 1.9 * (1 + len(rows))),
                             squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    for c, (src, tgt) in enumerate(pairs):
        axes[0, c].imshow(truth[tgt].T[::-1], cmap="gray", vmin=-1, vmax=1)
        axes[0, c].set_title(f"{DISPLAY_NAMES[SEQUENCES[src]]} -> {DISPLAY_NAMES[SEQUENCES[tgt]]}", fontsize=8)
        for r, images in enumerate(rows.values(), 1):
            axes[r, c].imshow(images[src, tgt].T[::-1], cmap="gray", vmin=-1, vmax=1)
    axes[0, 0].set_ylabel("real target", fontsize=8)
    for r, label in enumerate(rows, 1):
        axes[r, 0].set_ylabel(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return _rgb(fig, top=1 - 0.3 / fig.get_figheight() if title else 1.0)


def save_png(image: np.ndarray, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, image)


def robustness_plot(psnrs: dict[tuple[str, str, int], float], inputs: dict[tuple[str, str, int], float],
                    path: str | Path) -> None:
    """PSNR of the translation against level, one panel per corruption, one line per model; dashed: the
    corrupted input's PSNR against the clean source. psnrs, inputs: means per (model, corruption, level)."""
    models = list(dict.fromkeys(model for model, _, _ in psnrs))
    fig, axes = plt.subplots(1, len(CORRUPTIONS), figsize=(3.6 * len(CORRUPTIONS), 3.4), sharey=True)
    for ax, (kind, c) in zip(axes, CORRUPTIONS.items()):
        levels = range(len(c.levels) + 1)
        for i, model in enumerate(models):
            ax.plot(levels, [psnrs[(model, kind, lv)] for lv in levels], "o-", color=f"C{i}", label=model)
        ax.plot(levels[1:], [inputs[(models[0], kind, lv)] for lv in levels[1:]], "--", color="grey",
                label="corrupted input vs clean source")
        ax.set_xticks(list(levels), ["clean"] + [f"{s:g}" for s in c.levels])
        ax.set_title(kind)
        ax.set_xlabel("strength")
    axes[0].set_ylabel("PSNR vs clean target (dB)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
