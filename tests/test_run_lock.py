"""utils/run_lock.py: one process per run directory. A live holder (a real second process) is
refused with one line naming it, before anything in the directory changes; a holder that is
gone (dead pid on this host, a reused pid, its own SLURM job on another node) is taken over
with a warning; another host's lock only with --force_unlock."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from utils.errors import RunDirError
from utils.flags import BASELINE, JOINT, route
from utils.run_lock import LOCK_NAME, lock_run_dir, process_start

REPO = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()

HOLDER = """
import sys
from pathlib import Path
from utils.run_lock import lock_run_dir
lock = lock_run_dir(Path(sys.argv[1]))
print("held", flush=True)
sys.stdin.readline()
lock.release()
"""


def _write_lock(run_dir: Path, **record) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps({"host": HOST, "pid": 1, "process_start": None,
                                "started": "2024-01-01T00:00:00+00:00", "slurm_job": None,
                                "token": "t", **record}))
    return path


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_a_second_process_is_refused_while_the_first_holds_the_lock(tmp_path, demo_env):
    run_dir = tmp_path / "runs" / "demo" / "baseline" / "tr1_c1_v0"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "best.pt").write_text("the first run's")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=REPO,
                              env={**demo_env, "PYTHONPATH": str(REPO)}, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        record = json.loads((run_dir / LOCK_NAME).read_text())
        assert (record["host"], record["pid"]) == (HOST, holder.pid)
        assert record["process_start"] == process_start(holder.pid) and record["started"]
        with pytest.raises(RunDirError, match=f"^{run_dir}: in use by pid {holder.pid} on host "
                           f"{HOST} since .*; wait for it to end$"):
            lock_run_dir(run_dir, force_unlock=False)
        # A trainer is refused in one line before it touches the directory, even --overwrite.
        cmd = [sys.executable, "train_model/tr_baseline.py", "--dataset", "demo", "--n_iter", "1",
               "--no_of_tr_imgs", "tr1", "--comb_tr_imgs", "c1", "--out_dir",
               str(tmp_path / "runs"), "--device", "cpu", "--no_progress", "--overwrite"]
        refused = subprocess.run(cmd, cwd=REPO, env=demo_env, capture_output=True, text=True,
                                 timeout=600)
        assert refused.returncode == 2
        assert refused.stderr.startswith(f"error: {run_dir}: in use by pid {holder.pid}")
        assert len(refused.stderr.splitlines()) == 1
        assert (run_dir / "checkpoints" / "best.pt").read_text() == "the first run's"
        assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", LOCK_NAME]
    finally:
        holder.communicate("\n", timeout=60)
    assert holder.returncode == 0 and not (run_dir / LOCK_NAME).exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    pid = _dead_pid()
    path = _write_lock(tmp_path, pid=pid)
    lock = lock_run_dir(tmp_path)
    err = capsys.readouterr().err
    assert f"warning: {tmp_path}: the lock of pid {pid} on host {HOST} since " in err
    assert "is stale (that process is gone); taking it over" in err
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not path.exists()


def test_a_reused_pid_does_not_hold_the_lock(tmp_path, capsys):
    """The pid is alive (this process) but started at another time than the lock says."""
    _write_lock(tmp_path, pid=os.getpid(), process_start=process_start(os.getpid()) - 1)
    lock_run_dir(tmp_path).release()
    assert "is stale" in capsys.readouterr().err
    _write_lock(tmp_path, pid=os.getpid(), process_start=process_start(os.getpid()))
    with pytest.raises(RunDirError, match=f"in use by pid {os.getpid()}"):
        lock_run_dir(tmp_path)


def test_another_hosts_lock_needs_force_unlock(tmp_path, capsys):
    path = _write_lock(tmp_path, host="node07", pid=_dead_pid(), slurm_job="120_3")
    with pytest.raises(RunDirError, match=f"^{tmp_path}: in use by pid .* on host node07 since "
                       r".* \(SLURM job 120_3\) \(run.lock\); wait for it to end, or pass "
                       "--force_unlock if it is gone$"):
        lock_run_dir(tmp_path, environ={"SLURM_JOB_ID": "121"})
    assert json.loads(path.read_text())["host"] == "node07"
    lock = lock_run_dir(tmp_path, force_unlock=True, environ={})
    assert "--force_unlock: the lock of pid" in capsys.readouterr().err
    assert json.loads(path.read_text())["host"] == HOST
    lock.release()


def test_a_requeued_array_task_takes_over_its_predecessors_lock(tmp_path, capsys):
    path = _write_lock(tmp_path, host="node07", slurm_job="120_3")
    environ = {"SLURM_JOB_ID": "130", "SLURM_ARRAY_JOB_ID": "120", "SLURM_ARRAY_TASK_ID": "3"}
    lock = lock_run_dir(tmp_path, environ=environ)
    err = capsys.readouterr().err
    assert "of this same SLURM job: a requeued task whose previous run ended on node07" in err
    record = json.loads(path.read_text())
    assert (record["host"], record["slurm_job"]) == (HOST, "120_3")
    lock.release()
    _write_lock(tmp_path, host="node07", slurm_job="120_4")  # another task of the array
    with pytest.raises(RunDirError, match="in use by"):
        lock_run_dir(tmp_path, environ=environ)


def test_an_unreadable_lock_names_no_holder_and_needs_force_unlock(tmp_path):
    (tmp_path / LOCK_NAME).write_text("")
    with pytest.raises(RunDirError, match="in use by an unknown process .the lock file is "
                       "unreadable.*--force_unlock"):
        lock_run_dir(tmp_path)
    lock_run_dir(tmp_path, force_unlock=True).release()


def test_force_unlock_reaches_both_steps():
    assert route(["--force_unlock"]) == {BASELINE: ["--force_unlock"], JOINT: ["--force_unlock"]}


# ------------------------------------------------------ when a lock counts as stale, and whose
def test_process_start_is_the_start_time_even_for_a_name_with_parentheses(tmp_path):
    """Field 22 of /proc/<pid>/stat: a child started now started after this process, whatever
    its name holds, and that does not move as the child grows."""
    odd = tmp_path / "x) 1 2 (3"
    odd.symlink_to(sys.executable)
    child = subprocess.Popen([str(odd), "-c", "import sys; b = bytearray(80_000_000); "
                              "print(flush=True); sys.stdin.readline()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        before = process_start(child.pid)
        assert before > process_start(os.getpid()) > 0
        child.stdout.readline()  # now 80 MB bigger
        assert process_start(child.pid) == before
        assert Path(f"/proc/{child.pid}/comm").read_text().startswith("x) 1 2 (3")
    finally:
        child.communicate("\n", timeout=30)
    assert process_start(child.pid) is None  # gone


def test_a_live_holder_without_a_recorded_start_holds_the_lock(tmp_path, monkeypatch):
    """A lock from where /proc did not say (process_start null) is stale only if its pid is
    dead; a pid of another user (kill: permission denied) is alive."""
    from utils import run_lock

    _write_lock(tmp_path, pid=os.getpid(), process_start=None)
    with pytest.raises(RunDirError, match=f"in use by pid {os.getpid()}"):
        lock_run_dir(tmp_path)

    def denied(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(run_lock.os, "kill", denied)
    _write_lock(tmp_path, pid=_dead_pid(), process_start=None)
    with pytest.raises(RunDirError, match="in use by pid"):
        lock_run_dir(tmp_path)


def test_another_hosts_lock_without_slurm_job_is_not_taken_over(tmp_path):
    _write_lock(tmp_path, host="node07", slurm_job=None)
    with pytest.raises(RunDirError, match="on host node07 .*--force_unlock if it is gone"):
        lock_run_dir(tmp_path, environ={})


def test_a_lock_is_removed_only_if_still_its_holders(tmp_path):
    from utils.run_lock import remove_if_held_by

    path = _write_lock(tmp_path, pid=5, token="new")
    assert not remove_if_held_by(path, {**json.loads(path.read_text()), "token": "old"})
    assert json.loads(path.read_text())["token"] == "new"
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]  # nothing left aside
    assert remove_if_held_by(path, json.loads(path.read_text())) and not path.exists()


def test_release_leaves_a_lock_taken_over_by_the_same_pid(tmp_path, capsys):
    lock = lock_run_dir(tmp_path)
    record = json.loads((tmp_path / LOCK_NAME).read_text())
    _write_lock(tmp_path, **{**record, "token": "another"})
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == "another"
    assert "the lock was taken over by pid" in capsys.readouterr().err


def test_a_lock_being_written_is_read_once_it_is_complete(tmp_path):
    import threading

    from utils.run_lock import read_holder

    path = tmp_path / LOCK_NAME
    path.write_text("")
    timer = threading.Timer(0.2, lambda: path.write_text(json.dumps({"pid": 3, "host": "h"})))
    timer.start()
    try:
        assert read_holder(path) == {"pid": 3, "host": "h"}
    finally:
        timer.join()


def test_a_stale_lock_another_process_took_first_is_not_announced_as_taken(tmp_path,
                                                                          monkeypatch, capsys):
    """Two processes find the same stale lock: the one that loses the rename says nothing of a
    takeover and is refused by the winner's lock."""
    from utils import run_lock

    path = _write_lock(tmp_path, pid=_dead_pid())

    def lost(lock_path, holder):  # the other process renamed it first and wrote its own
        _write_lock(tmp_path, pid=os.getpid(), process_start=process_start(os.getpid()),
                    token="winner")
        return False

    monkeypatch.setattr(run_lock, "remove_if_held_by", lost)
    with pytest.raises(RunDirError, match=f"in use by pid {os.getpid()}"):
        lock_run_dir(tmp_path)
    assert "taking it over" not in capsys.readouterr().err
    assert json.loads(path.read_text())["token"] == "winner"
