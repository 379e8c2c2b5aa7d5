"""Write train/valid/test data lists for a BraTS-layout folder, split in the paper's proportions.

    python -m vq.tools.make_data_list --root data/BraTS2021 -o data/lists [--seed 0] [--naming brasyn]

Every subfolder of the root is a subject and must hold its five files
(`<ID>_{t1,t1ce,t2,flair,seg}.nii.gz`, or with --naming brasyn `<ID>-{t1n,t1c,t2w,t2f,seg}.nii.gz`
as in BraTS-GLI 2023 / BraSyn); a missing one is an error naming it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from vq.dataloader.brats import BratsDataError, subject_files
from vq.dataloader.lists import DataListError, make_lists
from vq.sequences import NAMINGS


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, type=Path, help="BraTS-layout folder of subject folders")
    parser.add_argument("-o", "--out", required=True, type=Path, help="folder for train.csv, valid.csv, test.csv")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed of the split and the codes")
    parser.add_argument("--naming", choices=NAMINGS, default=NAMINGS[0],
                        help="file names in the subject folders (the config's data.naming)")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"--root {args.root}: folder not found")
    names = sorted(p.name for p in args.root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        parser.error(f"--root {args.root}: no subject folders")
    try:
        for name in names:
            subject_files(args.root, name, naming=args.naming)
        paths = make_lists(names, args.out, seed=args.seed)
    except (BratsDataError, DataListError) as err:
        raise SystemExit(f"make_data_list: {err}") from None
    for split, path in paths.items():
        print(f"{split:>5}: {len(path.read_text().splitlines()):5d} subjects -> {path}")
    return paths


def cli() -> int:
    """The `vq-make-lists` command: main() returns the list paths, a command its exit code."""
    main()
    return 0


if __name__ == "__main__":
    main()
