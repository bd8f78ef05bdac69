"""Every entry point sets OpenMP's wait policy before torch loads libgomp: passive for a
process given a share of the CPUs, unless the user chose a policy or a spin count; libgomp
itself reports what it read (OMP_DISPLAY_ENV)."""

from __future__ import annotations

import utils.wait_policy  # noqa: F401  (before torch: OpenMP reads it once)

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINTS = [*sorted((REPO / "train_model").glob("*.py")),
                *sorted((REPO / "scripts").glob("*.py")), REPO / "tests" / "conftest.py"]


def _first_import(path: Path) -> str:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            return node.names[0].name
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            return str(node.module)
    return ""


@pytest.mark.parametrize("path", ENTRY_POINTS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_each_entry_point_imports_the_policy_first(path: Path) -> None:
    assert _first_import(path) == "utils.wait_policy"


def _spin_count(**env: str) -> int:
    """libgomp's spin count as it read it when a trainer (``--help``) loaded torch."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS",
                          "SLURM_CPUS_PER_TASK")}
    out = subprocess.run([sys.executable, "train_model/tr_baseline.py", "--help"], cwd=REPO,
                         env={**clean, **env, "OMP_DISPLAY_ENV": "VERBOSE"}, capture_output=True,
                         text=True, check=True)
    return int(re.search(r"GOMP_SPINCOUNT = '(\d+)'", out.stderr).group(1))


def test_a_trainer_with_a_share_of_the_cpus_waits_passively_unless_the_user_chose() -> None:
    assert _spin_count() == 300000  # every CPU: libgomp's own spinning, fastest alone
    assert _spin_count(OMP_WAIT_POLICY="ACTIVE") > 10**9  # the user's policy is kept
    assert _spin_count(GOMP_SPINCOUNT="1234") == 1234  # and so is the user's spin count
    if len(os.sched_getaffinity(0)) >= 2:
        assert _spin_count(OMP_NUM_THREADS="1") == 0  # a share: waiting threads sleep at once
        assert _spin_count(SLURM_CPUS_PER_TASK="1") == 0
        assert _spin_count(OMP_NUM_THREADS="1", GOMP_SPINCOUNT="77") == 77


def test_a_share_is_fewer_threads_than_cpus() -> None:
    from utils.wait_policy import shares_the_cpus

    assert shares_the_cpus({"OMP_NUM_THREADS": "2"}, 4)
    assert shares_the_cpus({"SLURM_CPUS_PER_TASK": "3"}, 8)
    assert not shares_the_cpus({"OMP_NUM_THREADS": "4"}, 4)
    assert not shares_the_cpus({"OMP_NUM_THREADS": "8"}, 4)
    assert not shares_the_cpus({"OMP_NUM_THREADS": "0"}, 4)
    assert not shares_the_cpus({"OMP_NUM_THREADS": "x"}, 4)
    assert not shares_the_cpus({}, 4)
