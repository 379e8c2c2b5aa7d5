"""One axial slice of a BraTS-layout subject: the four sequences and the labels.

    python publications/src/vq/tools/plot_phantom.py data/phantom -o asset/phantom.png

Reads the files through `vq.nifti.load_volume`, so the picture also checks the
orientation a training run will see.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from vq.labels import load_labels  # noqa: E402
from vq.nifti import NiftiError, load_volume  # noqa: E402
from vq.sequences import DISPLAY_NAMES, SEG, SEQUENCES, subject_file  # noqa: E402

log = logging.getLogger(__name__)
# label 0 transparent, 1 necrosis red, 2 oedema green, 4 enhancing yellow (BraTS viewers' colours)
LABEL_COLOURS = ListedColormap([(0, 0, 0, 0), (1, 0.1, 0.1, 1), (0.1, 0.9, 0.1, 1), (0, 0, 0, 0), (1, 0.9, 0, 1)])


def plot_subject(folder: str | Path, out: str | Path, slice_index: int | None = None) -> Path:
    """Save sequences + labels of the subject in `folder` at one axial slice (default: most tumour)."""
    folder = Path(folder)
    name = folder.name
    volumes = {s: load_volume(folder / subject_file(name, s)).data for s in SEQUENCES}
    try:
        seg = load_labels(folder / subject_file(name, SEG))
    except NiftiError:  # missing or unreadable: no labels to show
        seg = None
    if slice_index is None:
        per_slice = (seg > 0).sum((0, 1)) if seg is not None else np.zeros(1)
        slice_index = int(per_slice.argmax()) if per_slice.any() else volumes[SEQUENCES[0]].shape[2] // 2

    fig, axes = plt.subplots(1, len(SEQUENCES) + 1, figsize=(3 * (len(SEQUENCES) + 1), 3.4))
    for ax, seq in zip(axes, SEQUENCES):
        image = volumes[seq][:, :, slice_index]
        ax.imshow(image.T, cmap="gray", origin="lower", vmin=0, vmax=np.percentile(image[image > 0], 99.5))
        ax.set_title(DISPLAY_NAMES[seq])
    axes[-1].imshow(volumes[SEQUENCES[0]][:, :, slice_index].T, cmap="gray", origin="lower")
    if seg is not None:
        axes[-1].imshow(seg[:, :, slice_index].T, cmap=LABEL_COLOURS, vmin=0, vmax=4,
                        origin="lower", interpolation="nearest", alpha=0.6)
    axes[-1].set_title("labels: 1 red, 2 green, 4 yellow", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"{name}, axial slice {slice_index}")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="BraTS-layout dataset folder")
    parser.add_argument("--subject", default=None, help="subject ID (default: the first)")
    parser.add_argument("--slice", type=int, default=None, help="axial slice (default: most tumour)")
    parser.add_argument("-o", "--out", type=Path, default=Path("asset/phantom.png"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    subjects = sorted(p for p in args.root.iterdir() if p.is_dir()) if args.root.is_dir() else []
    if args.subject:
        subjects = [args.root / args.subject]
    if not subjects or not subjects[0].is_dir():
        parser.error(f"no subject folder found under {args.root}")
    log.info("wrote %s", plot_subject(subjects[0], args.out, args.slice))


if __name__ == "__main__":
    main()
