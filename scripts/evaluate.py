"""Score segmentations against the raw ground truth with the trainers' own metric code.

    python scripts/evaluate.py --pred DIR --gt RAW_DIR --dataset D [--out OUT_DIR]
    python scripts/evaluate.py --run_dir RUN [--gt RAW_DIR] [--out OUT_DIR]

--pred: every NIfTI file under DIR named ``<name>_seg`` (scripts/predict.py), ``pred_seg_id_<id>``
(a run's test_results/) or ``<name>`` is paired with the subject that <name> names in the
dataset's raw layout (``patient011_frame01`` or ``011`` for ACDC, ``prostate_11`` or ``011`` for
Decathlon, ``mr_train_1011_image`` or ``1011`` for MMWHS) in RAW_DIR. A prediction must lie on
its image's grid and hold the dataset's label values (MMWHS: 205, ..., 850). Writes
summary.json, metrics_per_subject.csv and the dsc_*.txt files as a run's test_results/ has
them, into OUT_DIR (default: DIR).

--run_dir: re-scores the run's test_results/ predictions of its test ids against the raw
ground truth it was trained with (config.yaml; --gt for data that moved), with the checkpoint
selection of its best.pt; OUT_DIR defaults to RUN/rescored.

A prediction that cannot be scored is named in one line with the reason; the exit status is
their number (at most 100).
"""

from __future__ import annotations

import utils.wait_policy  # noqa: F401  (before torch: OpenMP reads it once)

import argparse
import sys
from pathlib import Path

import experiment_init
from utils.errors import DataError, RunDirError, exit_status, run_main
from utils.evaluation import (
    prediction_path,
    structure_metrics,
    summarize,
    write_test_results,
)
from utils.io import nifti_stem, read_raw_volume, read_volume, subject_id_in_name
from utils.run import load_checkpoint, read_run, selected_on

PRED_PREFIX, PRED_SUFFIX = "pred_seg_id_", "_seg"


def paired_predictions(pred_dir: Path, layout: str) -> tuple[dict[str, Path], list[str]]:
    """{subject id: prediction file} of the NIfTI files under ``pred_dir``, and one line per
    file that names no subject or a subject named by another file too."""
    pairs: dict[str, Path] = {}
    problems = []
    for path in sorted(pred_dir.rglob("*")):
        name = nifti_stem(path) if path.is_file() else None
        if name is None:
            continue
        name = name.removeprefix(PRED_PREFIX).removesuffix(PRED_SUFFIX)
        sid = subject_id_in_name(layout, name)
        if sid is None:
            problems.append(f"{path}: names no subject of the {layout} layout")
        elif sid in pairs:
            problems.append(f"{path}: subject {sid} has a prediction already, {pairs[sid]}")
        else:
            pairs[sid] = path
    return pairs, problems


def score(
    pairs: dict[str, Path], cfg: experiment_init.ExperimentConfig, gt_root: Path
) -> tuple[dict[str, list[dict]], list[str]]:
    """Metrics of each prediction against subject's raw ground truth (`structure_metrics`, in
    the order of ``pairs``), and one line per prediction that could not be scored."""
    per_subject, problems = {}, []
    for sid, path in pairs.items():
        try:
            gt = read_raw_volume(cfg.data_layout, gt_root, sid)
            pred = read_volume(sid, gt.image_path, path, cfg.data_layout,
                               known_labels_only=True).label
            if pred.min() < 0 or pred.max() >= cfg.num_classes:
                raise DataError(f"{path}: label values outside 0..{cfg.num_classes - 1} "
                                f"(num_classes of {cfg.dataset})")
        except DataError as err:
            problems.append(str(err))
            continue
        per_subject[sid] = structure_metrics(pred, gt.label, gt.spacing, cfg.num_classes)
    return per_subject, problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pred", type=Path, help="folder of predictions (searched recursively)")
    parser.add_argument("--gt", type=Path, help="the dataset's raw folder (its layout)")
    parser.add_argument("--dataset", help=f"one of {', '.join(experiment_init.datasets())}")
    parser.add_argument("--run_dir", type=Path, help="re-score this run's test_results/")
    parser.add_argument("--out", type=Path, help="folder for summary.json and the other files")
    args = parser.parse_args()
    selection = None
    if args.run_dir is not None:
        if args.pred is not None or args.dataset is not None:
            parser.error("--run_dir takes its predictions and dataset from the run; drop --pred "
                         "and --dataset")
        record, cfg = read_run(args.run_dir)
        results = args.run_dir / "test_results"
        pairs = {sid: prediction_path(results, sid) for sid in record["test_ids"]}
        problems: list[str] = []
        try:
            selection = selected_on(load_checkpoint(args.run_dir / "checkpoints" / "best.pt"))
        except RunDirError as err:
            print(f"selected_on unknown: {err}", flush=True)
        out = args.out or args.run_dir / "rescored"
        gt_root = args.gt or cfg.data_path_tr
    else:
        if args.pred is None or args.gt is None or args.dataset is None:
            parser.error("give --pred, --gt and --dataset, or --run_dir")
        cfg = experiment_init.load(args.dataset)
        if not args.pred.is_dir():
            raise DataError(f"{args.pred}: prediction folder not found")
        pairs, problems = paired_predictions(args.pred, cfg.data_layout)
        out, gt_root = args.out or args.pred, args.gt
    per_subject, failed = score(pairs, cfg, gt_root)
    problems += failed
    for line in problems:
        print(f"not scored: {line}", flush=True)
    if not per_subject:
        raise DataError(f"{args.run_dir or args.pred}: no prediction could be scored")
    summary = summarize(per_subject, cfg.struct_name, selection)
    write_test_results(out, summary, cfg.struct_name)
    parts = [f"{k} {v['dice']:.3f}" for k, v in summary["per_structure"].items()]
    print(f"{len(per_subject)} subjects: mean Dice {summary['mean_dice']:.4f} ({', '.join(parts)})"
          f"; {len(problems)} not scored; written to {out / 'summary.json'}", flush=True)
    sys.exit(exit_status(len(problems)))


if __name__ == "__main__":
    run_main(main)
