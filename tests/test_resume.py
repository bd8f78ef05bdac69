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
