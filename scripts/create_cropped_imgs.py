"""Preprocess raw volumes into the cropped volumes the trainers read (METHOD §2.3).

    python scripts/create_cropped_imgs.py --dataset acdc [--data_root DIR] [--ids 001 002]

By default every id of the dataset's splits (labeled sets and unlabeled pool) is processed;
validation and test volumes are read raw by the trainers and need no cropped copy. Writes
``<data folder>/cropped/<id>/img_cropped.nii.gz`` and ``mask_cropped.nii.gz`` atomically; a
volume only the unlabeled pool needs may lack its label file and gets the image alone.
"""

from __future__ import annotations

import utils.wait_policy  # noqa: F401  (before torch: OpenMP reads it once)

import argparse

from tqdm import tqdm

import experiment_init
from utils.dataset import create_cropped, ensure_demo_data
from utils.errors import run_main
from utils.io import cropped_paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True,
                        help=f"one of {', '.join(experiment_init.datasets())}")
    parser.add_argument("--data_root", default=None, help="dataset folder holding raw/")
    parser.add_argument("--ids", nargs="*", default=None,
                        help="subject ids (default: all training ids)")
    parser.add_argument("--overwrite", action="store_true", help="rewrite existing cropped files")
    args = parser.parse_args()
    cfg = experiment_init.load(args.dataset, args.data_root)
    ensure_demo_data(cfg)
    ids = args.ids or sorted({i for ids in cfg.labeled.values() for i in ids})
    written = 0
    for sid in tqdm(ids, desc="cropping"):
        written += create_cropped(cfg, [sid], overwrite=args.overwrite)
    print(f"{written} of {len(ids)} subjects written to {cfg.data_path_tr_cropped}")
    root = cfg.data_path_tr_cropped
    unlabeled = [sid for sid in ids if not cropped_paths(root, sid)[1].is_file()]
    if unlabeled:
        print(f"without label (unlabeled pool, image only): {', '.join(unlabeled)}")


if __name__ == "__main__":
    run_main(main)
