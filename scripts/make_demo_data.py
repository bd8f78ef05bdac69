"""Generate the synthetic cardiac demo dataset in the ACDC raw layout.

    python scripts/make_demo_data.py [--out DIR] [--n_patients 32] [--seed 0] [--overwrite]

Writes DIR/patientNNN/{patientNNN_frameXX[_gt].nii.gz, Info.cfg} for patients 001..N and a
DIR/.complete marker last; an existing complete dataset with the same seed is left alone
unless --overwrite is given. Works from any working directory.
"""

from __future__ import annotations

import utils.wait_policy  # noqa: F401  (before torch: OpenMP reads it once)

import argparse
import sys
import time
from pathlib import Path

from utils.demo_data import demo_dataset_complete, make_demo_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "data" / "demo" / "raw"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--n_patients", type=int, default=32,
                        help="number of patients, ids 001..N (default: 32)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="regenerate even if a complete dataset is already there")
    args = parser.parse_args(argv)
    if not 1 <= args.n_patients <= 999:
        parser.error("--n_patients must be between 1 and 999 (ids are three digits)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ids = [f"{i:03d}" for i in range(1, args.n_patients + 1)]
    if not args.overwrite and demo_dataset_complete(args.out, seed=args.seed, patient_ids=ids):
        print(f"{args.out}: demo dataset already complete (use --overwrite to regenerate)")
        return 0
    start = time.perf_counter()
    make_demo_dataset(args.out, ids, seed=args.seed, overwrite=args.overwrite)
    print(f"{args.out}: wrote {len(ids)} patients (seed {args.seed}) "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
