"""Kill a training run with SIGKILL after a periodic checkpoint, resume it, and compare;
--resume falls back to the previous periodic checkpoint when the newest is torn, damaged or
from another run; checkpoints are data: every random state survives a weights-only round trip,
and a checkpoint that would run code when unpickled is refused before it can."""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from utils.errors import RunDirError
from utils.flags import BASELINE, add_flags
from utils.flags import parser as flag_parser
from utils.run import (
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
    save_periodic_checkpoint,
    seed_everything,
)
from utils.run_dir import open_run_dir, resume_flags

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--dataset", "demo", "--no_of_tr_imgs", "tr1", "--comb_tr_imgs", "c1", "--ver", "7",
         "--n_iter", "36", "--ckpt_every", "8", "--no_progress"]


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "train_model/tr_baseline.py", *FLAGS, "--out_dir", str(out), *extra]


def _run(cmd, env):
    return subprocess.run(cmd, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=900)


def _no_slurm(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if not k.startswith("SLURM_")}


@pytest.fixture(scope="module")
def whole(tmp_path_factory, demo_env) -> tuple[Path, Path]:
    """(output root, run directory) of the uninterrupted baseline run."""
    root = tmp_path_factory.mktemp("whole")
    done = _run(_cmd(root), _no_slurm(demo_env))
    assert done.returncode == 0, done.stderr
    return root, Path(done.stdout.strip().splitlines()[-1].removeprefix("run directory: "))


def test_killed_baseline_resumes_to_the_same_weights(tmp_path, demo_env, whole):
    root, run_dir = whole
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(out), cwd=REPO, env={**demo_env, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = out / run_dir.relative_to(root) / "checkpoints" / "last.pt"
    previous = last.with_name("previous.pt")
    deadline = time.time() + 600
    while not previous.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert previous.is_file()
    resumed_from = torch.load(previous, weights_only=True)["iteration"]
    assert resumed_from < 35  # killed mid-run, after the second periodic checkpoint
    # The newest checkpoint torn (as by a full disk or a crash without atomic renames).
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2] if last.is_file() else b"")

    again = _run(_cmd(out, "--resume"), demo_env)
    assert again.returncode == 0, again.stderr
    assert f"skipping {last} (not a readable PyTorch checkpoint" in again.stdout
    assert f"resuming from {previous} (iteration {resumed_from})" in again.stdout
    assert f"resuming {last.parents[1]} at iteration {resumed_from + 1}" in again.stdout
    assert f"the lock of pid {proc.pid} on host" in again.stderr  # left by the killed run
    assert "is stale (that process is gone); taking it over" in again.stderr
    assert not (last.parents[1] / "run.lock").exists()
    summary = json.loads((last.parents[1] / "test_results" / "summary.json").read_text())
    assert set(summary["per_structure"]) == {"rv", "myo", "lv"}
    rows = (last.parents[1] / "log.csv").read_text().strip().splitlines()
    assert rows[-1].startswith("35,")  # the full iteration count

    # With every random state restored, CPU training continues exactly as it would have.
    a = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["iteration"] == b["iteration"] == 35
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["best_score"] == b["best_score"]

    done = _run(_cmd(out, "--resume"), demo_env)
    assert done.returncode == 0 and "finished already" in done.stdout
    changed = _run(_cmd(out, "--resume", "--lr_seg", "0.01"), demo_env)
    assert changed.returncode == 0  # a finished run is never touched, whatever the flags


def test_resume_puts_back_the_best_checkpoint_of_its_iteration(tmp_path, demo_env, whole):
    """A run killed after a validation improved best.pt but before its next periodic
    checkpoint leaves a best.pt from after last.pt; the resumed run must not use it (the
    joint trainer relabels from best.pt at each round). Here: the finished run's last.pt
    with a later, different best.pt beside it, resumed with nothing left to train."""
    import shutil

    root, run_dir = whole
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "test_results")
    best = torch.load(copy / "checkpoints" / "best.pt", weights_only=True)
    best.pop("checksum")
    later = {**best, "iteration": 99, "val_dice": 1.0,
             "model": {k: torch.zeros_like(v) if v.is_floating_point() else v
                       for k, v in best["model"].items()}}
    save_checkpoint(copy / "checkpoints" / "best.pt", later)
    out_root = tmp_path / "out"
    last = torch.load(copy / "checkpoints" / "last.pt", weights_only=True)
    last.pop("checksum")
    last["args"]["out_dir"] = str(out_root)  # as if the run had been started there
    save_checkpoint(copy / "checkpoints" / "last.pt", last)
    (copy / "checkpoints" / "previous.pt").unlink()
    target = out_root / run_dir.relative_to(root)
    target.parent.mkdir(parents=True)
    shutil.move(copy, target)
    again = _run(_cmd(out_root, "--resume"), _no_slurm(demo_env))
    assert again.returncode == 0, again.stderr
    restored = torch.load(target / "checkpoints" / "best.pt", weights_only=True)
    assert restored["iteration"] == best["iteration"]
    a = json.loads((run_dir / "test_results" / "summary.json").read_text())
    b = json.loads((target / "test_results" / "summary.json").read_text())
    assert a["per_subject"] == b["per_subject"]


SCONTROL = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> {record}
"""


def test_baseline_stopped_by_sigusr1_checkpoints_requeues_and_resumes(tmp_path, demo_env,
                                                                      whole):
    """SIGUSR1 mid-run: last.pt is written at once (no periodic checkpoint falls in the run),
    the SLURM array task is requeued, the exit status is 75, and --resume ends with the
    weights of the uninterrupted run."""
    root, run_dir = whole
    record = tmp_path / "scontrol_calls"
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "scontrol").write_text(SCONTROL.format(record=record))
    (tmp_path / "bin" / "scontrol").chmod(0o755)
    env = {**_no_slurm(demo_env), "OMP_NUM_THREADS": "1", "SLURM_JOB_ID": "123",
           "SLURM_ARRAY_JOB_ID": "120", "SLURM_ARRAY_TASK_ID": "3",
           "PATH": f"{tmp_path / 'bin'}{os.pathsep}{demo_env['PATH']}"}
    out = tmp_path / "stopped"
    cmd = [*_cmd(out), "--ckpt_every", "1000"]  # the last of two equal flags wins
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    stopped_dir = out / run_dir.relative_to(root)
    deadline = time.time() + 600
    while not (stopped_dir / "log.csv").is_file() and proc.poll() is None \
            and time.time() < deadline:  # written after the validation of iteration 0
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 75, stderr
    last = torch.load(stopped_dir / "checkpoints" / "last.pt", weights_only=True)
    assert 0 <= last["iteration"] < 35
    assert f"stopped by SIGUSR1 after iteration {last['iteration']}" in stderr
    assert "requeued: scontrol requeue 120_3" in stderr
    assert record.read_text() == "requeue 120_3\n"
    assert not (stopped_dir / "test_results").exists()
    assert not (stopped_dir / "run.lock").exists()

    again = _run([*cmd, "--resume"], _no_slurm(demo_env))
    assert again.returncode == 0, again.stderr
    assert f"at iteration {last['iteration'] + 1}" in again.stdout
    a = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(stopped_dir / "checkpoints" / "last.pt", weights_only=True)
    assert a["iteration"] == b["iteration"] == 35
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert (stopped_dir / "log.csv").read_text() == (run_dir / "log.csv").read_text()


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
    # At the default rate 36 iterations leave the network at its start, whose near-uniform
    # softmax makes the pseudo-labels' foreground a matter of rounding on this CPU; at 0.01 the
    # baseline predicts the LV, so round 2 has structure to contrast.
    base = _run(_cmd(tmp_path / "base", "--lr_seg", "0.01"), demo_env)
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
                if torch.load(last, weights_only=True)["round"] == 1:
                    break
            except (EOFError, RuntimeError):  # never torn (atomic), but be safe
                pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(last, weights_only=True)
    assert state["round"] == 1 and state["iteration"] < 15
    again = subprocess.run([*joint, "--out_dir", str(out), "--resume"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr
    assert "round 1/2" not in again.stdout  # round 1 is not redone
    assert (last.parents[1] / "test_results" / "summary.json").is_file()
    a = torch.load(whole_dir / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert torch.equal(a["pseudo"]["labels"], b["pseudo"]["labels"])
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def _draws(generator: torch.Generator) -> list[float]:
    return [random.random(), float(np.random.rand()), float(torch.rand(1)),
            float(torch.rand(1, generator=generator)), float(np.random.normal())]


def test_random_states_survive_a_weights_only_checkpoint(tmp_path):
    generator = seed_everything(3)
    _draws(generator)  # its last draw leaves numpy a cached gaussian, part of numpy's state
    save_checkpoint(tmp_path / "c.pt", {"rng": rng_state(generator)})
    want = _draws(generator)
    other = seed_everything(4)
    restore_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"], other)
    assert _draws(other) == want


class _Payload:
    """Unpickling this calls open(path, "w"): a checkpoint that creates a file when loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _malicious(path: Path, target: Path) -> Path:
    save_checkpoint(path, {"model": {"w": torch.zeros(1)}, "iteration": 3,
                           "payload": _Payload(target)})
    return path


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    target = tmp_path / "created_by_unpickling"
    bad = _malicious(tmp_path / "best.pt", target)
    with pytest.raises(RunDirError, match=r"best.pt: refused, .*could run arbitrary code "
                       r"\(.*io.open"):
        load_checkpoint(bad)
    assert not target.exists()
    # --resume reads last.pt the same way
    run = tmp_path / "run"
    _malicious(run / "checkpoints" / "last.pt", target)
    parser = argparse.ArgumentParser()
    add_flags(parser)
    with pytest.raises(RunDirError, match="last.pt: refused"):
        open_run_dir(run, parser.parse_args(["--resume"]))
    assert not target.exists()
    # the payload is real: a full unpickling creates the file
    torch.load(bad, weights_only=False)
    assert target.exists()


def test_joint_trainer_refuses_a_pretr_dir_checkpoint_that_would_run_code(tmp_path):
    target = tmp_path / "created_by_unpickling"
    _malicious(tmp_path / "base" / "checkpoints" / "best.pt", target)
    proc = subprocess.run(
        [sys.executable, "train_model/prop_method_joint_tr_rand_init.py", "--dataset", "demo",
         "--pretr_dir", str(tmp_path / "base"), "--out_dir", str(tmp_path / "o"),
         "--no_progress"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "best.pt: refused" in proc.stderr
    assert not target.exists() and not (tmp_path / "o").exists()  # refused before any run dir


def _resume_args(*extra: str) -> argparse.Namespace:
    return flag_parser(BASELINE).parse_args(["--dataset", "demo", "--resume", *extra])


def _periodic(run: Path, iteration: int, args: argparse.Namespace) -> None:
    save_periodic_checkpoint(run / "checkpoints", {
        "args": resume_flags(args), "iteration": iteration, "model": {"w": torch.rand(50)},
        "optimizer": {"state": {}}, "log_rows": [{"iteration": float(iteration)}]})


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "zeros":
        path.write_bytes(bytes(len(data)))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "flipped_bit":  # loads without complaint from torch: only the checksum sees it
        at = data.index(torch.ones(50).numpy().tobytes()[:8]) + 17
        path.write_bytes(data[:at] + bytes([data[at] ^ 1]) + data[at + 1:])

def test_periodic_checkpoints_rotate(tmp_path):
    run, args = tmp_path / "run", _resume_args()
    for it in (7, 15, 23):
        _periodic(run, it, args)
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["iteration"] == 23
    assert torch.load(run / "checkpoints" / "previous.pt", weights_only=True)["iteration"] == 15
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt", "previous.pt"]


@pytest.mark.parametrize("how", ["truncated", "zeros", "empty", "flipped_bit", "other_run"])
def test_resume_falls_back_to_the_previous_checkpoint(tmp_path, capsys, how):
    run, args = tmp_path / "run", _resume_args()
    _periodic(run, 7, args)
    if how == "other_run":  # last.pt copied from a run of other flags
        other = tmp_path / "other"
        _periodic(other, 40, _resume_args("--ver", "3"))
        os.replace(run / "checkpoints" / "last.pt", run / "checkpoints" / "previous.pt")
        os.replace(other / "checkpoints" / "last.pt", run / "checkpoints" / "last.pt")
    else:
        save_periodic_checkpoint(run / "checkpoints", {
            "args": resume_flags(args), "iteration": 15, "model": {"w": torch.ones(50)},
            "optimizer": {"state": {}}, "log_rows": []})
        _damage(run / "checkpoints" / "last.pt", how)
    state = open_run_dir(run, args)
    assert state is not None and state["iteration"] == 7
    out = capsys.readouterr().out
    reason = {"truncated": "not a readable PyTorch checkpoint", "zeros": "not a readable",
              "empty": "not a readable", "flipped_bit": "do not match the checksum",
              "other_run": "other flags (--ver 3 -> 0)"}[how]
    assert f"skipping {run / 'checkpoints' / 'last.pt'} (" in out and reason in out
    assert f"resuming from {run / 'checkpoints' / 'previous.pt'} (iteration 7)" in out
    assert len(out.strip().splitlines()) == 2
    # the skipped file is kept aside, so the next rotation keeps the good one
    assert (run / "checkpoints" / "last.pt.unusable").is_file()
    assert not (run / "checkpoints" / "last.pt").exists()


def test_resume_after_a_crash_between_the_two_renames(tmp_path, capsys):
    run, args = tmp_path / "run", _resume_args()
    _periodic(run, 7, args)
    _periodic(run, 15, args)
    (run / "checkpoints" / "last.pt").unlink()  # moved to previous.pt, new one not yet renamed
    assert open_run_dir(run, args)["iteration"] == 7
    assert "resuming from" in capsys.readouterr().out


def test_no_usable_checkpoint_is_one_error_naming_the_files(tmp_path):
    run, args = tmp_path / "run", _resume_args()
    _periodic(run, 7, args)
    _periodic(run, 15, args)
    _damage(run / "checkpoints" / "last.pt", "zeros")
    _damage(run / "checkpoints" / "previous.pt", "truncated")
    with pytest.raises(RunDirError) as err:
        open_run_dir(run, args)
    msg = str(err.value)
    assert "\n" not in msg and "no usable checkpoint" in msg
    assert f"{run / 'checkpoints' / 'last.pt'}: not a readable" in msg
    assert f"{run / 'checkpoints' / 'previous.pt'}: not a readable" in msg
    assert (run / "checkpoints" / "last.pt").is_file()  # nothing moved or deleted
