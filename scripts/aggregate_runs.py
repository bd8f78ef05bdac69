"""The paper's tables from finished runs: test Dice per structure, mean Dice and HD95 per dataset,
method and labeled-set size, and a paired comparison of each method with the baseline.

    python scripts/aggregate_runs.py RUNS_ROOT [--out FILE.md|.csv|.tex]

Every ``config.yaml`` under RUNS_ROOT with its ``test_results/summary.json`` is one run; what a
run is (dataset, trainer, tr, comb, ver, seed, loss reduction, tag) is read from config.yaml,
never from directory names. Methods: ``baseline``, ``joint original``, ``joint mean``, and
``TAG (…)`` for runs with a tag. The table is printed (Markdown) and written to --out in the
format its suffix names. Runs without results, unreadable files, and (combination, seed) units
that other methods have but a method lacks are listed below the table.
"""

from __future__ import annotations

import utils.wait_policy  # noqa: F401  (before torch: OpenMP reads it once)

import argparse
import csv
import io
import json
import math
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from utils.flags import RESUME_FREE_FLAGS

BASELINE = "baseline"
# Flags that tell runs of one table cell apart, or do not change results.
UNIT_FLAGS = ("comb_tr_imgs", "ver", "seed", "pretr_dir", "baseline_checkpoint", "data_root",
              "out_dir", *RESUME_FREE_FLAGS)
NOTE = ("Each cell: mean ± sample standard deviation (ddof 1) over combinations, the seeds of a "
        "combination averaged first; n = combinations (runs). Dice: mean over test subjects; "
        "mean Dice: mean over test subjects of their mean foreground Dice; HD95: mean over "
        "structures of the test-set mean HD95 where defined, in mm. Paired comparison: mean "
        "Dice of the method minus the baseline's over the (combination, seed) units both "
        "finished; p: two-sided Wilcoxon signed-rank test (scipy.stats.wilcoxon, which leaves "
        "out the units with a zero difference; pairs counts them).")


@dataclass(frozen=True)
class Run:
    """One finished run: its identity and its test metrics."""

    path: Path
    dataset: str
    method: str
    tr: str
    comb: str
    ver: int
    seed: int
    dice: dict[str, float]  # structure name -> test-set mean Dice
    mean_dice: float
    hd95: float  # mm, mean over structures with a defined HD95; nan when none is
    flags: dict

    @property
    def unit(self) -> tuple[str, int, int]:
        return (self.comb, self.ver, self.seed)


@dataclass(frozen=True)
class Problem:
    """A run (or an expected run) that is not in the table, and why.

    ``where``: (dataset, method, tr, unit) when its config.yaml says so.
    """

    path: Path
    what: str
    where: tuple[str, str, str, tuple[str, int, int]] | None = None


def natural_key(text: str) -> list:
    """'tr8' < 'tr52'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


# The comparison methods' trainers (train_model/<name>.py), each a method of its own name.
COMPARISONS = ("self_training", "mean_teacher", "bcp")


def method_of(trainer: str, flags: dict) -> str:
    """'baseline', 'joint <loss_reduction>', a comparison method's name (`COMPARISONS`), or
    'TAG (<that>)' for a tagged run."""
    base = (BASELINE if trainer == "tr_baseline" else trainer if trainer in COMPARISONS
            else f"joint {flags.get('loss_reduction')}")
    tag = flags.get("tag")
    return f"{tag} ({base})" if tag else base


def read_run(config_path: Path) -> Run | Problem:
    """The run whose config.yaml this is, or why it cannot be counted."""
    run_dir = config_path.parent
    try:
        config = yaml.safe_load(config_path.read_text())
        flags = config["flags"]
        trainer = config["trainer"]
        ident = dict(dataset=flags["dataset"], tr=flags["no_of_tr_imgs"],
                     comb=flags["comb_tr_imgs"], ver=int(flags["ver"]))
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as err:
        return Problem(run_dir, f"unreadable config.yaml ({type(err).__name__}: {err})")
    seed = flags.get("seed")
    seed = ident["ver"] if seed is None else int(seed)
    method = method_of(trainer, flags)
    where = (ident["dataset"], method, ident["tr"], (ident["comb"], ident["ver"], seed))
    summary_path = run_dir / "test_results" / "summary.json"
    if not summary_path.is_file():
        resumable = any((run_dir / "checkpoints" / name).is_file()
                        for name in ("last.pt", "previous.pt"))
        return Problem(run_dir, "unfinished or failed: no test_results/summary.json"
                       + ("; rerun with --resume to continue it" if resumable else ""), where)
    try:
        summary = json.loads(summary_path.read_text())
        per_structure = summary["per_structure"]
        dice = {name: float(m["dice"]) for name, m in per_structure.items()}
        hd = [float(m["hd95"]) for m in per_structure.values() if m.get("hd95") is not None]
        mean_dice = float(summary["mean_dice"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return Problem(run_dir, f"failed: unreadable summary.json ({type(err).__name__}: {err})",
                       where)
    if not math.isfinite(mean_dice):
        return Problem(run_dir, f"failed: mean Dice {mean_dice}", where)
    return Run(run_dir, method=method, seed=seed, dice=dice,
               mean_dice=mean_dice, hd95=float(np.mean(hd)) if hd else math.nan, flags=flags,
               **ident)


def collect(root: Path) -> tuple[list[Run], list[Problem]]:
    """Every run under ``root``, and the problems: unreadable or unfinished runs, finished runs
    of the same (dataset, method, tr, combination, ver, seed) (a copied folder would count
    twice; all are left out until one remains), and units a method lacks that another method
    of the same dataset and tr has."""
    runs, problems = [], []
    seen: dict[tuple[str, str], set] = defaultdict(set)  # (dataset, tr) -> units
    # (dataset, method, tr) -> units with a run folder, finished or listed as a problem
    cells: dict[tuple[str, str, str], set] = defaultdict(set)
    for path in sorted(root.rglob("config.yaml")):
        item = read_run(path)
        if isinstance(item, Run):
            runs.append(item)
            where = (item.dataset, item.method, item.tr, item.unit)
        else:
            problems.append(item)
            where = item.where
        # a listed problem's unit is expected of the other methods, not missing for its own
        if where is not None:
            dataset, method, tr, unit = where
            cells[dataset, method, tr].add(unit)
            seen[dataset, tr].add(unit)
    by_key: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        by_key[run.dataset, run.method, run.tr, run.unit].append(run)
    runs = [same[0] for same in by_key.values() if len(same) == 1]
    for key, same in by_key.items():
        if len(same) > 1:
            for run in same:
                others = ", ".join(str(o.path) for o in same if o is not run)
                problems.append(Problem(run.path, f"duplicate: the same run as {others}; "
                                        "keep one folder", key))
    for (dataset, method, tr), units in sorted(cells.items()):
        for comb, ver, seed in sorted(seen[dataset, tr] - units):
            problems.append(Problem(root / dataset, f"missing: {method} {tr} {comb} ver {ver} "
                                    f"seed {seed} (other methods have it)"))
    return runs, problems


def method_order(method: str) -> tuple:
    fixed = [BASELINE, "joint original", "joint mean", *COMPARISONS]
    return (0, fixed.index(method), "") if method in fixed else (1, 0, method)


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample std (ddof 1; nan for one value) and count of the finite values."""
    v = np.array([x for x in values if math.isfinite(x)], dtype=float)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan, int(v.size)


def cell_table(runs: Sequence[Run]) -> dict[str, tuple[float, float, int]]:
    """{metric: (mean, std, n combinations)} of one cell's runs; seeds averaged per comb first.

    Metrics: each structure's Dice, ``mean_dice`` and ``hd95``.
    """
    by_comb: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        by_comb[r.comb].append(r)
    metrics: dict[str, list[float]] = defaultdict(list)
    for comb_runs in by_comb.values():
        for name in comb_runs[0].dice:
            metrics[name].append(float(np.mean([r.dice[name] for r in comb_runs])))
        metrics["mean_dice"].append(float(np.mean([r.mean_dice for r in comb_runs])))
        hd = [r.hd95 for r in comb_runs if math.isfinite(r.hd95)]
        metrics["hd95"].append(float(np.mean(hd)) if hd else math.nan)
    return {name: mean_std(values) for name, values in metrics.items()}


def wilcoxon_p(differences: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences (nan if all are zero)."""
    from scipy.stats import wilcoxon

    d = np.asarray(differences, dtype=float)
    if d.size == 0 or not np.any(d != 0):
        return math.nan
    return float(wilcoxon(d).pvalue)


def paired(method_runs: Sequence[Run], baseline_runs: Sequence[Run]) -> tuple[float, float, int]:
    """(mean difference of mean Dice, Wilcoxon p, pairs) over the units both have."""
    base = {r.unit: r.mean_dice for r in baseline_runs}
    diffs = [r.mean_dice - base[r.unit] for r in method_runs if r.unit in base]
    if not diffs:
        return math.nan, math.nan, 0
    return float(np.mean(diffs)), wilcoxon_p(diffs), len(diffs)


def mixed_flags(runs: Sequence[Run]) -> list[str]:
    """Flags (other than the unit's and resume-free ones) that differ between a cell's runs."""
    keys = sorted({k for r in runs for k in r.flags if k not in UNIT_FLAGS})
    return [k for k in keys if len({repr(r.flags.get(k)) for r in runs}) > 1]


@dataclass
class Row:
    dataset: str
    method: str
    tr: str
    stats: dict[str, tuple[float, float, int]]
    n_runs: int
    diff: float
    p: float
    n_pairs: int
    mixed: list[str]


def build_rows(runs: Sequence[Run]) -> list[Row]:
    groups: dict[tuple[str, str, str], list[Run]] = defaultdict(list)
    for r in runs:
        groups[r.dataset, r.method, r.tr].append(r)
    rows = []
    for (dataset, method, tr), cell in sorted(
            groups.items(), key=lambda kv: (kv[0][0], method_order(kv[0][1]),
                                            natural_key(kv[0][2]))):
        diff, p, n_pairs = math.nan, math.nan, 0
        if method != BASELINE:
            diff, p, n_pairs = paired(cell, groups.get((dataset, BASELINE, tr), []))
        rows.append(Row(dataset, method, tr, cell_table(cell), len(cell), diff, p, n_pairs,
                        mixed_flags(cell)))
    return rows


def structures(rows: Sequence[Row], dataset: str) -> list[str]:
    names: list[str] = []
    for row in rows:
        if row.dataset == dataset:
            names += [k for k in row.stats if k not in ("mean_dice", "hd95", *names)]
    return names


def fmt(stat: tuple[float, float, int], digits: int, pm: str = " ± ") -> str:
    mean, std, n = stat
    if n == 0:
        return "–"
    return f"{mean:.{digits}f}" + (f"{pm}{std:.{digits}f}" if n > 1 else "")


def fmt_num(value: float, spec: str) -> str:
    return "–" if not math.isfinite(value) else format(value, spec)


def csv_num(value: float, spec: str) -> str:
    return "" if not math.isfinite(value) else format(value, spec)


def markdown(rows: Sequence[Row], problems: Sequence[Problem]) -> str:
    out = []
    for dataset in dict.fromkeys(r.dataset for r in rows):
        names = structures(rows, dataset)
        out += [f"## {dataset}", "",
                "| method | tr | " + " | ".join(f"Dice {n}" for n in names)
                + " | mean Dice | HD95 (mm) | n |",
                "|---|---|" + "---|" * (len(names) + 3)]
        for r in (r for r in rows if r.dataset == dataset):
            cells = [fmt(r.stats.get(n, (math.nan, math.nan, 0)), 3) for n in names]
            out.append(f"| {r.method} | {r.tr} | " + " | ".join(cells)
                       + f" | {fmt(r.stats['mean_dice'], 3)} | {fmt(r.stats['hd95'], 2)} | "
                       f"{r.stats['mean_dice'][2]} ({r.n_runs}) |")
        out += ["", "| method | tr | Δ mean Dice vs baseline | Wilcoxon p | pairs |",
                "|---|---|---|---|---|"]
        for r in (r for r in rows if r.dataset == dataset and r.method != BASELINE):
            out.append(f"| {r.method} | {r.tr} | {fmt_num(r.diff, '+.4f')} | "
                       f"{fmt_num(r.p, '.4g')} | {r.n_pairs} |")
        out.append("")
    out.append(NOTE)
    out += footnotes(rows, problems)
    return "\n".join(out) + "\n"


def footnotes(rows: Sequence[Row], problems: Sequence[Problem]) -> list[str]:
    lines = []
    for r in rows:
        if r.mixed:
            lines.append(f"Warning: {r.dataset} {r.method} {r.tr} mixes runs whose flags differ: "
                         f"{', '.join(r.mixed)} (give such runs a --tag).")
    if problems:
        lines += ["", f"Not in the table ({len(problems)}):"]
        lines += [f"- {p.path}: {p.what}" for p in problems]
    else:
        lines += ["", "Not in the table: none (every run found is finished and counted)."]
    return lines


def csv_text(rows: Sequence[Row]) -> str:
    metrics = []
    for dataset in dict.fromkeys(r.dataset for r in rows):
        metrics += [f"dice_{n}" for n in structures(rows, dataset) if f"dice_{n}" not in metrics]
    metrics += ["mean_dice", "hd95_mm"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["dataset", "method", "tr", "n_combinations", "n_runs",
                     *(f"{m}_{s}" for m in metrics for s in ("mean", "std")),
                     "diff_mean_dice_vs_baseline", "wilcoxon_p", "n_pairs"])
    for r in rows:
        values = []
        for m in metrics:
            key = {"hd95_mm": "hd95"}.get(m, m.removeprefix("dice_") if m != "mean_dice" else m)
            mean, std, _ = r.stats.get(key, (math.nan, math.nan, 0))
            values += [csv_num(mean, ".6f"), csv_num(std, ".6f")]
        writer.writerow([r.dataset, r.method, r.tr, r.stats["mean_dice"][2], r.n_runs, *values,
                         csv_num(r.diff, ".6g"), csv_num(r.p, ".6g"), r.n_pairs])
    return buf.getvalue()


def latex(rows: Sequence[Row], problems: Sequence[Problem]) -> str:
    def esc(text: str) -> str:
        return re.sub(r"([_%&#$])", r"\\\1", text)

    pm = r" $\pm$ "
    out = []
    for dataset in dict.fromkeys(r.dataset for r in rows):
        names = structures(rows, dataset)
        out += [f"% {dataset}", r"\begin{tabular}{ll" + "c" * (len(names) + 3) + "}",
                r"\hline", "method & tr & " + " & ".join(esc(n) for n in names)
                + r" & mean Dice & HD95 (mm) & $\Delta$ vs baseline (p) \\", r"\hline"]
        for r in (r for r in rows if r.dataset == dataset):
            cells = [fmt(r.stats.get(n, (math.nan, math.nan, 0)), 3, pm) for n in names]
            vs = ("--" if r.method == BASELINE
                  else f"{fmt_num(r.diff, '+.3f')} ({fmt_num(r.p, '.2g')})")
            out.append(f"{esc(r.method)} & {r.tr} & " + " & ".join(cells)
                       + f" & {fmt(r.stats['mean_dice'], 3, pm)}"
                       + f" & {fmt(r.stats['hd95'], 2, pm)} & {vs} " + "\\\\")
        out += [r"\hline", r"\end{tabular}", ""]
    out.append("% " + NOTE)
    out += ["% " + line for line in footnotes(rows, problems) if line]
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_root", type=Path, help="folder searched for runs (e.g. runs/)")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the table here: .md, .csv or .tex")
    args = parser.parse_args(argv)
    if args.out is not None and args.out.suffix not in (".md", ".csv", ".tex"):
        parser.error(f"--out {args.out}: the name must end in .md, .csv or .tex")
    if not args.runs_root.is_dir():
        parser.error(f"{args.runs_root}: not a folder")
    runs, problems = collect(args.runs_root)
    rows = build_rows(runs)
    print(markdown(rows, problems), end="")
    if not runs:
        print(f"error: no finished run under {args.runs_root}", file=sys.stderr)
        sys.exit(1)
    if args.out is not None:
        text = {".md": lambda: markdown(rows, problems), ".csv": lambda: csv_text(rows),
                ".tex": lambda: latex(rows, problems)}[args.out.suffix]()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"written: {args.out}")


if __name__ == "__main__":
    main()
