"""The README's performance table from `scripts/benchmark.py` JSON lines.

    python scripts/benchmark.py --device cpu > fp32.txt
    python scripts/benchmark.py --device cpu --amp bf16 > bf16.txt
    python scripts/performance_table.py fp32.txt bf16.txt [--goals]

Each file is one benchmark run (its table rows and other lines are skipped); each becomes a
column named after its settings. The header names the machine (model, CPU features, CPUs),
the batch and the commit of each run; a figure a run did not measure is left empty.
"""

from __future__ import annotations

import utils.wait_policy  # noqa: F401  (before torch: OpenMP reads it once)

import argparse
import json
import sys
from pathlib import Path

# Where each figure's goal is on each device (issue texts); shown with --goals.
GOALS = {
    "cpu": {
        "overhead_ratio": "≤ 1.10",
        "contrastive_loss_speedup": "≥ 50×",
        "contrastive_loss_share": "≤ 3 %",
        "peak_memory": "< 4 GB",
        "time_to_first_step": "< 5 s",
        "concurrent_efficiency": "≥ 0.95",
        "crf_scaling_w2": "≥ 0.8",
    },
    "cuda": {
        "joint_step": "≤ 15 ms (bf16)",
        "overhead_ratio": "≤ 1.25",
        "protocol_estimate": "< 15 min",
        "crf_scaling_w2": "≥ 0.8",
        "crf_scaling_w16": "≥ 0.8",
    },
}
# How each unit is printed (seconds under 0.1 s as milliseconds).
FORMATS = {"s": "{:.3f} s", "x": "{:.3f}", "GiB": "{:.2f} GiB", "1/s": "{:.3f} /s",
           "min": "{:.1f} min"}


def cell(value: float, unit: str) -> str:
    """One figure as printed in the table."""
    if unit == "s" and abs(value) < 0.1:
        return f"{value * 1000:.1f} ms"
    return FORMATS.get(unit, "{:.4g} " + unit).format(value)


def read_run(path: Path) -> list[dict]:
    """The JSON figure lines of one benchmark output file."""
    rows = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "name" in row and "value" in row:
                rows.append(row)
    if not rows:
        raise SystemExit(f"error: {path}: no benchmark JSON lines (the output of "
                         "scripts/benchmark.py)")
    return rows


def column_name(row: dict) -> str:
    """The settings that tell runs apart: device, amp, threads on CPU, compile and CUDA graphs
    where used."""
    parts = [row.get("device", "cpu"), f"amp {row.get('amp', 'off')}"]
    if row.get("device", "cpu") == "cpu":
        parts.append(f"{row.get('threads', '?')} threads")
    if row.get("compile", "off") != "off":
        parts.append(f"compile {row['compile']}")
    if row.get("cuda_graph"):
        parts.append("CUDA graph")
    return ", ".join(parts)


def grouped(descriptions: list[str]) -> str:
    """'all columns: A' or 'columns 1, 2: A; column 3: B' for the columns' descriptions."""
    if len(set(descriptions)) == 1:
        return f"all columns: {descriptions[0]}"
    parts = []
    for d in dict.fromkeys(descriptions):
        cols = [str(i + 1) for i, x in enumerate(descriptions) if x == d]
        parts.append(f"column{'s' if len(cols) > 1 else ''} {', '.join(cols)}: {d}")
    return "; ".join(parts)


def goal_cell(name: str, devices: list[str]) -> str:
    """The goal of figure ``name`` on the table's devices (each named when they differ)."""
    found = {d: GOALS.get(d, {}).get(name) for d in dict.fromkeys(devices)}
    found = {d: g for d, g in found.items() if g}
    if len(set(found.values())) <= 1 and (len(found) == len(set(devices)) or len(found) == 0):
        return next(iter(found.values()), "")  # the same goal on every device
    return "; ".join(f"{d} {g}" for d, g in found.items())


def table(runs: list[list[dict]], goals: bool = False) -> str:
    """A markdown table: a row per figure (first-seen order), a column per run."""
    names: list[str] = []
    for rows in runs:
        names += [r["name"] for r in rows if r["name"] not in names]
    first = [rows[0] for rows in runs]
    devices = [r.get("device", "cpu") for r in first]
    machines = [f"{r.get('machine', '?')} ({r.get('cpus', '?')} CPUs; features: "
                f"{r.get('cpu_features') or 'none of note'})" for r in first]
    where = grouped([f"{m}, `{r.get('batch', '?')}` batch, commit {r.get('commit', '?')}"
                     for m, r in zip(machines, first, strict=True)])
    header = [f"Machines: {where}.", ""]
    cols = [column_name(r) for r in first]
    lines = ["| figure | " + " | ".join(cols) + (" | goal |" if goals else " |"),
             "|---|" + "---|" * (len(cols) + goals)]
    for name in names:
        cells = []
        for rows in runs:
            found = [r for r in rows if r["name"] == name]
            cells.append(cell(found[0]["value"], found[0]["unit"]) if found else "")
        goal = [goal_cell(name, devices)] if goals else []
        lines.append("| " + " | ".join([name, *cells, *goal]) + " |")
    return "\n".join(header + lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outputs", nargs="+", type=Path, help="benchmark output files")
    parser.add_argument("--goals", action="store_true", help="add the goals column")
    args = parser.parse_args(argv)
    print(table([read_run(p) for p in args.outputs], args.goals))


if __name__ == "__main__":
    sys.exit(main())
