"""Compare the test results of runs: a text table of two or more, or an HTML report of two.

    python scripts/compare_runs.py RUN_DIR_A RUN_DIR_B [...]
    python scripts/compare_runs.py BASELINE_RUN JOINT_RUN --out report.html

Each RUN_DIR holds test_results/summary.json (written by the trainers). Without --out the
Dice per structure and mean of every run are printed side by side. With --out, one
self-contained HTML file (pictures embedded as PNG) holds the two runs' per-structure table,
each test subject's mean-Dice difference (second run minus first) as a plot, and for the
subjects with the largest gains and losses the ground truth and both runs' predictions side by
side; the predictions are read from test_results/<id>/pred_seg_id_<id>.nii.gz and the images
and labels from the raw data named in the first run's config.yaml. ``--figures DIR`` also
writes the report's pictures as PNG files there (dice_differences.png, gain_<id>.png,
loss_<id>.png), e.g. for a paper or a README.
"""

from __future__ import annotations

import utils.wait_policy  # noqa: F401  (before torch: OpenMP reads it once)

import argparse
import base64
import html
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

from utils.errors import DataError
from utils.evaluation import prediction_path
from utils.figures import (
    difference_plot,
    slices_to_show,
    volume_montage,
    write_png,
)
from utils.io import data_layout, labels_to_classes, read_raw_volume, write_text_atomic

N_EXTREMES = 3  # subjects shown for the largest gains and for the largest losses


def load_summary(run_dir: Path) -> dict:
    path = run_dir / "test_results" / "summary.json"
    if not path.is_file():
        raise SystemExit(f"error: {path}: not found; did the run finish?")
    return json.loads(path.read_text())


def short_name(run_dir: Path) -> str:
    """``baseline/<run>`` or ``joint/<reduction>``: the step and what tells the runs apart."""
    step = run_dir.parent.parent.name if run_dir.name in ("original", "mean") \
        else run_dir.parent.name
    return f"{step}/{run_dir.name}"


def table(run_dirs: list[Path]) -> str:
    summaries = [load_summary(d) for d in run_dirs]
    names = [short_name(d) for d in run_dirs]
    structs = list(summaries[0]["per_structure"])
    width = max(12, *(len(n) for n in names))
    lines = ["test Dice".ljust(10) + "".join(n.rjust(width + 2) for n in names)]
    for s in structs:
        lines.append(s.ljust(10) + "".join(
            f"{x['per_structure'][s]['dice']:.4f}".rjust(width + 2) for x in summaries))
    lines.append("mean".ljust(10) + "".join(
        f"{x['mean_dice']:.4f}".rjust(width + 2) for x in summaries))
    return "\n".join(lines)


def dice_differences(first: dict, second: dict) -> dict[str, float]:
    """Per test subject of both summaries (in the first's order): the second run's mean Dice
    minus the first's."""
    a, b = first["per_subject_mean_dice"], second["per_subject_mean_dice"]
    return {sid: b[sid] - a[sid] for sid in a if sid in b}


def extremes(differences: dict[str, float], n: int = N_EXTREMES) -> tuple[list[str], list[str]]:
    """The ``n`` subjects with the largest gain (largest first) and the ``n`` others with the
    largest loss (most negative first); ties in subject order."""
    gains = sorted(differences, key=lambda s: -differences[s])[:n]
    losses = [s for s in sorted(differences, key=lambda s: differences[s]) if s not in gains]
    return gains, losses[:n]


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def structure_table(first: dict, second: dict, names: tuple[str, str]) -> str:
    """HTML table: per structure Dice, HD95 and ASSD of both runs and the Dice difference."""
    head = "".join(f"<th>{m} {html.escape(n)}</th>" for m in ("Dice", "HD95 mm", "ASSD mm")
                   for n in names)
    rows = [f"<tr><th>structure</th>{head}<th>Δ Dice</th></tr>"]
    for s in first["per_structure"]:
        a, b = first["per_structure"][s], second["per_structure"].get(s, {})
        cells = "".join(f"<td>{_fmt(x.get(m), 4 if m == 'dice' else 2)}</td>"
                        for m in ("dice", "hd95", "assd") for x in (a, b))
        delta = None if b.get("dice") is None else b["dice"] - a["dice"]
        rows.append(f"<tr><th>{html.escape(s)}</th>{cells}<td>{_fmt(delta, 4)}</td></tr>")
    mean_cells = f"<td>{first['mean_dice']:.4f}</td><td>{second['mean_dice']:.4f}</td>"
    rows.append(f"<tr><th>mean</th>{mean_cells}<td></td><td></td><td></td><td></td>"
                f"<td>{second['mean_dice'] - first['mean_dice']:.4f}</td></tr>")
    return "<table>" + "\n".join(rows) + "</table>"


def prediction(run_dir: Path, sid: str, layout: str) -> np.ndarray:
    """A run's saved test prediction of ``sid`` as class indices (files hold the layout's
    label values, e.g. MMWHS 205..850)."""
    path = prediction_path(run_dir / "test_results", sid)
    if not path.is_file():
        raise SystemExit(f"error: {path}: not found")
    raw = np.asarray(nib.load(str(path)).dataobj)
    return labels_to_classes(raw, data_layout(layout).label_values)


def subject_png(first_dir: Path, second_dir: Path, sid: str, config: dict, first: dict,
                second: dict, names: tuple[str, str]) -> bytes:
    """Ground truth and both runs' predictions of one subject: rows, on the same slices."""
    try:
        vol = read_raw_volume(config["data_layout"], config["data_path_tr"], sid)
    except DataError as err:
        raise SystemExit(f"error: {err} (data named in {first_dir / 'config.yaml'})") from None
    structs = tuple(config["struct_name"])
    preds = [prediction(d, sid, config["data_layout"]) for d in (first_dir, second_dir)]
    rows = [("ground truth", vol.label), *zip(names, preds)]
    dice = [[summary["per_subject"][sid][s]["dice"] for s in structs]
            for summary in (first, second)]
    title = "\n".join(f"{name}: mean Dice {np.mean(d):.3f} ("
                      + ", ".join(f"{s} {x:.3f}" for s, x in zip(structs, d)) + ")"
                      for name, d in zip(names, dice))
    return volume_montage(vol.image, rows, vol.spacing[:2], structs, title,
                          slices_to_show([vol.label, *preds], 4))


def _img(png: bytes, alt: str) -> str:
    return (f'<img alt="{html.escape(alt)}" '
            f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">')


def html_report(first_dir: Path, second_dir: Path,
                pictures: dict[str, bytes] | None = None) -> str:
    """The self-contained HTML comparison of two runs (second minus first); its PNG pictures
    are also put in ``pictures`` by file name when given."""
    pictures = {} if pictures is None else pictures
    first, second = load_summary(first_dir), load_summary(second_dir)
    names = ("baseline", "joint")
    config = yaml.safe_load((first_dir / "config.yaml").read_text())["config"]
    diffs = dice_differences(first, second)
    order = sorted(diffs, key=lambda s: diffs[s])
    plot = difference_plot(order, [diffs[s] for s in order],
                           f"mean Dice, {names[1]} − {names[0]}")
    gains, losses = extremes(diffs)
    pictures["dice_differences.png"] = plot
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{names[1]} vs {names[0]}: {html.escape(short_name(second_dir))}</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:2px 6px;"
        "text-align:right}img{display:block;margin:6px 0}</style></head><body>",
        f"<h1>{names[1]} vs {names[0]}</h1>",
        f"<p>{names[0]}: <code>{html.escape(str(first_dir))}</code><br>"
        f"{names[1]}: <code>{html.escape(str(second_dir))}</code><br>"
        f"{len(diffs)} test subjects; means over subjects, in native resolution.</p>",
        "<h2>Per structure</h2>", structure_table(first, second, names),
        "<h2>Per subject: difference in mean foreground Dice</h2>",
        _img(plot, "per-subject Dice differences"),
    ]
    for heading, kind, ids in (("Largest gains", "gain", gains),
                               ("Largest losses", "loss", losses)):
        parts.append(f"<h2>{heading}</h2>")
        for sid in ids:
            parts.append(f"<h3 id='subject-{html.escape(sid)}'>subject {html.escape(sid)}: "
                         f"{diffs[sid]:+.4f}</h3>")
            png = subject_png(first_dir, second_dir, sid, config, first, second, names)
            pictures[f"{kind}_{sid}.png"] = png
            parts.append(_img(png, f"subject {sid}"))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path,
                        help="write an HTML report of exactly two runs (baseline, joint) here")
    parser.add_argument("--figures", type=Path, metavar="DIR",
                        help="with --out: also write the report's pictures as PNG files here")
    args = parser.parse_args(argv)
    if args.figures is not None and args.out is None:
        parser.error("--figures writes the pictures of a report: give --out REPORT.html too")
    if args.out is None:
        print(table(args.run_dirs))
        return
    if len(args.run_dirs) != 2:
        parser.error("--out compares exactly two runs: BASELINE JOINT")
    pictures: dict[str, bytes] = {}
    write_text_atomic(args.out, html_report(*args.run_dirs, pictures))
    print(f"wrote {args.out}")
    if args.figures is not None:
        args.figures.mkdir(parents=True, exist_ok=True)
        for name, png in pictures.items():
            write_png(args.figures / name, png)
        print(f"wrote {len(pictures)} pictures to {args.figures}")


if __name__ == "__main__":
    sys.exit(main())
