"""utils/preemption.py: stop signals are recorded, not fatal, while installed; the SLURM requeue
command is built from the job's environment and run through a recording stand-in `scontrol`
(the real subprocess test is in tests/test_resume.py)."""

from __future__ import annotations

import os
import signal

import pytest

from utils.preemption import StopRequests, requeue, requeue_command


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_is_recorded_while_installed(sig):
    before = signal.getsignal(sig)
    stop = StopRequests()
    stop.install()
    try:
        os.kill(os.getpid(), sig)  # would end the test process without the handler
        assert stop.received == sig.name
    finally:
        stop.restore()
    assert signal.getsignal(sig) == before


ARRAY = {"SLURM_JOB_ID": "123", "SLURM_ARRAY_JOB_ID": "120", "SLURM_ARRAY_TASK_ID": "3"}


def test_requeue_command_names_the_array_task_or_the_job():
    assert requeue_command(ARRAY) == ["scontrol", "requeue", "120_3"]
    assert requeue_command({"SLURM_JOB_ID": "123"}) == ["scontrol", "requeue", "123"]
    assert requeue_command({"PATH": "/bin"}) is None


@pytest.fixture
def scontrol(tmp_path, monkeypatch):
    """A stand-in scontrol first on the PATH, recording its arguments; exits with the status
    in the file ``status`` (0 when absent)."""
    record = tmp_path / "calls"
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "scontrol"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> {record}\n'
                    f'echo "no such job" >&2\n'
                    f'exit $(cat {tmp_path}/status 2>/dev/null || echo 0)\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    return record


def test_requeue_runs_scontrol_only_under_slurm(scontrol, tmp_path):
    assert "rerun the same command with --resume" in requeue({"PATH": os.environ["PATH"]})
    assert not scontrol.exists()  # outside SLURM nothing is called
    assert requeue(ARRAY) == "requeued: scontrol requeue 120_3"
    assert scontrol.read_text() == "requeue 120_3\n"
    # SIGTERM under SLURM is scancel or SLURM's own requeue: a requeue would undo a cancel
    assert "not requeued after SIGTERM" in requeue(ARRAY, "SIGTERM")
    assert scontrol.read_text() == "requeue 120_3\n"
    (tmp_path / "status").write_text("1")
    assert "could not requeue the job (scontrol requeue 120_3 exited 1: no such job)" in \
        requeue(ARRAY)
