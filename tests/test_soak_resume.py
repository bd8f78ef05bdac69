"""scripts/soak_resume.py: a short joint training SIGKILLed at random moments ends with the
uninterrupted run's weights, summary.json and log.csv; the phase of each kill is inferred from
the trainer's output and open files; a changed tensor is reported as a mismatch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.soak
def test_a_joint_run_killed_at_random_moments_ends_as_the_uninterrupted_one(tmp_path, demo_env,
                                                                          load_script):
    out = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, "scripts/soak_resume.py", "--dataset", "demo", "--kills", "2",
         "--seed", "3", "--work_dir", str(tmp_path), "--out", str(out),
         "--n_iter_per_round", "4", "--ckpt_every", "2"],
        cwd=REPO, env=demo_env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert result["identical"] and len(result["kills"]) == 2
    assert sum(run["kills"] for run in result["runs"]) == 2
    phases = load_script("soak_resume").PHASES
    assert all(kill["phase"] in phases for kill in result["kills"])
    last = done.stdout.strip().splitlines()[-1]
    assert last == result["summary"]
    assert last.startswith("2 kills survived (phases: ")
    assert last.endswith("), final weights and summary.json identical")


def test_the_phase_of_a_kill(load_script):
    soak = load_script("soak_resume")
    sched = soak.Schedule(n_rounds=2, n_iter=4, ckpt_every=2, val_every=50)

    def bar(rnd: int, n: int, post: str = "") -> str:
        return f"joint round {rnd}:  {25 * n}%|██   | {n}/4 [00:01<00:03, 1.00s/it{post}]"

    def phase(pieces, now=10.0, files=()):
        return soak.phase(pieces, now, [Path(f) for f in files], sched, step_seconds=2.0)

    started = [(1.0, "joint demo tr1/c1: labeled ['001'], ...")]
    assert phase([]) == phase(started) == ("start-up", "")
    labelling = [*started, (3.0, "pseudo-labels:  10%|█    | 2/20 [00:01<00:05, 3.22it/s]")]
    assert phase(labelling) == ("pseudo-labelling", "volume 3/20")
    training = [*labelling, (6.0, bar(1, 0)), (8.0, bar(1, 0, ", val=0.1")), (9.0, bar(1, 1))]
    assert phase(training, now=10.0) == ("training step", "round 1, iteration 1")
    assert phase(training, now=10.0, files=["checkpoints/.last.pt.k2j.tmp.pt"]) == (
        "checkpoint writing", "checkpoints/last.pt")
    assert phase(training, files=["checkpoints/last.pt", "tensorboard/events.1"])[0] == \
        "training step"  # read, not written
    assert phase(training, files=[".curves.png.x.tmp.png"]) == ("log writing", "curves.png")
    # The round's last iteration validates: a step, then (past the longest step) validation.
    ending = [*training, (20.0, bar(1, 3))]
    assert phase(ending, now=21.0) == ("training step", "round 1, iteration 3")
    assert phase(ending, now=23.0) == ("validation", "round 1, iteration 3")
    assert phase([*ending, (24.0, bar(1, 3, ", val=0.2"))], now=24.5) == (
        "checkpoint writing", "round 1, iteration 3")  # iteration 3 ends with last.pt
    assert phase([*ending, (25.0, bar(1, 4))]) == ("pseudo-labelling", "before round 2")
    assert phase([*ending, (25.0, bar(2, 4))]) == ("log writing", "the run's last log")
    assert phase([*ending, (26.0, "best validation Dice 0.1 at iteration 3; 0 ...")]) == (
        "test evaluation", "")
    assert phase(training, files=["test_results/003.nii.gz"])[0] == "test evaluation"


def test_a_changed_tensor_or_summary_is_a_difference(tmp_path, load_script):
    soak = load_script("soak_resume")
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        (run / "checkpoints").mkdir(parents=True)
        (run / "test_results").mkdir()
        for name in ("best.pt", "last.pt"):
            torch.save({"model": {"w": torch.ones(3), "b": torch.zeros(2)}},
                       run / "checkpoints" / name)
        (run / "test_results" / "summary.json").write_text('{"mean_dice": 0.5}')
        (run / "log.csv").write_text("iteration,loss\n0,1.0\n")
    assert soak.differences(*runs) == []
    torch.save({"model": {"w": torch.ones(3), "b": torch.tensor([0.0, 1e-30])}},
               runs[1] / "checkpoints" / "last.pt")
    (runs[1] / "test_results" / "summary.json").write_text('{"mean_dice": 0.50001}')
    assert soak.differences(*runs) == ["checkpoints/last.pt: 1 of 2 model tensors differ (b)",
                                       "test_results/summary.json differs"]
