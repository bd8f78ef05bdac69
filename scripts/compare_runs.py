"""Print the test results of two or more runs side by side (Dice per structure and mean).

    python scripts/compare_runs.py RUN_DIR_A RUN_DIR_B [...]

Each RUN_DIR holds test_results/summary.json (written by the trainers).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load_summary(run_dir: Path) -> dict:
    path = run_dir / "test_results" / "summary.json"
    if not path.is_file():
        raise SystemExit(f"error: {path}: not found; did the run finish?")
    return json.loads(path.read_text())


def table(run_dirs: list[Path]) -> str:
    summaries = [load_summary(d) for d in run_dirs]
    names = [d.parent.parent.name if d.name in ("original", "mean") else d.parent.name
             for d in run_dirs]
    names = [f"{n}/{d.name}" for n, d in zip(names, run_dirs)]
    structs = list(summaries[0]["per_structure"])
    width = max(12, *(len(n) for n in names))
    lines = ["test Dice".ljust(10) + "".join(n.rjust(width + 2) for n in names)]
    for s in structs:
        lines.append(s.ljust(10) + "".join(
            f"{x['per_structure'][s]['dice']:.4f}".rjust(width + 2) for x in summaries))
    lines.append("mean".ljust(10) + "".join(
        f"{x['mean_dice']:.4f}".rjust(width + 2) for x in summaries))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    print(table(parser.parse_args().run_dirs))


if __name__ == "__main__":
    sys.exit(main())
