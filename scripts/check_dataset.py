"""Check every volume named in a dataset's splits; print a table of problems, exit 1 if any.

    python scripts/check_dataset.py --dataset acdc [--data_root DIR]

Checks per id: image and label exist and load (gzip and NIfTI intact), 3D (or 4D with the
expected channel) with more than one slice, image and label share one grid and one
voxel-to-world matrix (orientation), voxel spacing positive and plausible, finite and not
constant intensities, whole-number label values within the dataset's classes (after the MMWHS
mapping). A volume only the unlabeled pool needs may lack its label file: it is listed as
unlabeled, not as a problem. The splits themselves (an id twice in a list, a test id in a
training or validation list) are checked when the configuration is loaded.
"""

from __future__ import annotations

import utils.wait_policy  # noqa: F401  (before torch: OpenMP reads it once)

import argparse
import sys

from tqdm import tqdm

import experiment_init
from utils.errors import run_main
from utils.integrity import check_subject, configured_ids, lacks_label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True,
                        help=f"one of {', '.join(experiment_init.datasets())}")
    parser.add_argument("--data_root", default=None, help="dataset folder holding raw/")
    args = parser.parse_args()
    cfg = experiment_init.load(args.dataset, args.data_root)
    ids = configured_ids(cfg)
    pool_only = set(cfg.pool_only_ids())
    problems = []
    for sid in tqdm(ids, desc="checking", leave=False):
        problems += check_subject(cfg, sid, label_optional=sid in pool_only)
    unlabeled = [sid for sid in ids if sid in pool_only and lacks_label(cfg, sid)]
    if unlabeled:
        print(f"{len(unlabeled)} unlabeled pool subject(s), fine without label file (trained on "
              f"with pseudo-labels only): {', '.join(unlabeled)}")
    if not problems:
        print(f"{len(ids)} subjects in {cfg.data_path_tr}: no problems found")
        return
    width = max(len(p.subject_id) for p in problems)
    print(f"{'id'.ljust(width)}  file  problem")
    for p in problems:
        print(f"{p.subject_id.ljust(width)}  {p.path}  {p.what}")
    print(f"{len(problems)} problem(s) in {len({p.subject_id for p in problems})} of "
          f"{len(ids)} subjects")
    sys.exit(1)


if __name__ == "__main__":
    run_main(main)
