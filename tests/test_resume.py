"""Kill a training run with SIGKILL after a periodic checkpoint, resume it, and compare."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--dataset", "demo", "--no_of_tr_imgs", "tr1", "--comb_tr_imgs", "c1", "--ver", "7",
         "--n_iter", "36", "--ckpt_every", "8", "--no_progress"]


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "train_model/tr_baseline.py", *FLAGS, "--out_dir", str(out), *extra]


def _run(cmd, env):
    return subprocess.run(cmd, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=900)


def test_killed_baseline_resumes_to_the_same_weights(tmp_path, demo_env):
    whole = _run(_cmd(tmp_path / "whole"), demo_env)
    assert whole.returncode == 0, whole.stderr
    run_dir = Path(whole.stdout.strip().splitlines()[-1].removeprefix("run directory: "))

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(out), cwd=REPO, env={**demo_env, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = out / run_dir.relative_to(tmp_path / "whole") / "checkpoints" / "last.pt"
    deadline = time.time() + 600
    while not last.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last.is_file()
    killed_at = torch.load(last, weights_only=False)["iteration"]
    assert killed_at < 35  # killed mid-run, after the first periodic checkpoint

    again = _run(_cmd(out, "--resume"), demo_env)
    assert again.returncode == 0, again.stderr
    assert f"resuming {last.parents[1]} at iteration {killed_at + 1}" in again.stdout
    summary = json.loads((last.parents[1] / "test_results" / "summary.json").read_text())
    assert set(summary["per_structure"]) == {"rv", "myo", "lv"}
    rows = (last.parents[1] / "log.csv").read_text().strip().splitlines()
    assert rows[-1].startswith("35,")  # the full iteration count

    # With every random state restored, CPU training continues exactly as it would have.
    a = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(last, weights_only=False)
    assert a["iteration"] == b["iteration"] == 35
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["best_score"] == b["best_score"]

    done = _run(_cmd(out, "--resume"), demo_env)
    assert done.returncode == 0 and "finished already" in done.stdout
    changed = _run(_cmd(out, "--resume", "--lr_seg", "0.01"), demo_env)
    assert changed.returncode == 0  # a finished run is never touched, whatever the flags


def test_resume_with_other_flags_is_an_error(tmp_path, demo_env):
    out = tmp_path / "o"
    proc = subprocess.Popen(_cmd(out), cwd=REPO, env={**demo_env, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 600
    while not list(out.rglob("last.pt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    bad = _run(_cmd(out, "--resume", "--lr_seg", "0.01"), demo_env)
    assert bad.returncode == 2
    assert "--lr_seg 0.001 -> 0.01" in bad.stderr and "Traceback" not in bad.stderr


def test_killed_joint_run_resumes_within_its_round(tmp_path, demo_env):
    """Joint training killed inside round 2 resumes with that round's pseudo-labels."""
    env = {**demo_env, "OMP_NUM_THREADS": "1"}
    base = _run(_cmd(tmp_path / "base"), demo_env)
    assert base.returncode == 0, base.stderr
    base_dir = base.stdout.strip().splitlines()[-1].removeprefix("run directory: ")
    joint = [sys.executable, "train_model/prop_method_joint_tr_rand_init.py", "--dataset", "demo",
             "--no_of_tr_imgs", "tr1", "--comb_tr_imgs", "c1", "--ver", "7", "--n_rounds", "2",
             "--n_iter_per_round", "8", "--ckpt_every", "3", "--pretr_dir", base_dir,
             "--no_progress"]
    whole = subprocess.run([*joint, "--out_dir", str(tmp_path / "jw")], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=900)
    assert whole.returncode == 0, whole.stderr
    whole_dir = Path(whole.stdout.strip().splitlines()[-1].removeprefix("run directory: "))

    out = tmp_path / "jk"
    proc = subprocess.Popen([*joint, "--out_dir", str(out)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = out / whole_dir.relative_to(tmp_path / "jw") / "checkpoints" / "last.pt"
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:  # wait for a checkpoint in round 2
        if last.is_file():
            try:
                if torch.load(last, weights_only=False)["round"] == 1:
                    break
            except (EOFError, RuntimeError):  # never torn (atomic), but be safe
                pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(last, weights_only=False)
    assert state["round"] == 1 and state["iteration"] < 15
    again = subprocess.run([*joint, "--out_dir", str(out), "--resume"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr
    assert "round 1/2" not in again.stdout  # round 1 is not redone
    assert (last.parents[1] / "test_results" / "summary.json").is_file()
    a = torch.load(whole_dir / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(last, weights_only=False)
    assert torch.equal(a["pseudo"].labels, b["pseudo"].labels)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
