"""Pre-emption: a trainer sent SIGTERM or SIGUSR1 stops at the next iteration boundary, writes
its periodic checkpoint and exits with `PREEMPTED_EXIT`; the same command with --resume
continues it. After SIGUSR1 (SLURM's warning before the time limit, ``--signal=USR1@N``) it
also requeues its SLURM job. After SIGTERM it does not: under SLURM that signal means the job
is ending by ``scancel`` (requeueing would undo the user's cancel) or by SLURM itself
(a requeue or pre-emption SLURM carries out, where a second requeue is refused).

The signal handler only records the signal (`StopRequests`); the run's periodic step
(`utils.training.Run`) looks at it between iterations, where the state is whole.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

# Exit status of a pre-empted run (EX_TEMPFAIL of sysexits.h: try again later).
PREEMPTED_EXIT = 75

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequests:
    """While installed, SIGTERM and SIGUSR1 set ``received`` (the signal's name) instead of
    ending the process."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python lets only the main thread set handlers
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)

    def restore(self) -> None:
        """Put back the handlers found by `install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name


class Preempted(Exception):
    """A run stopped by a signal after writing checkpoints/last.pt at ``iteration``."""

    def __init__(self, run_dir: Path, iteration: int, signal_name: str) -> None:
        super().__init__(f"stopped by {signal_name} after iteration {iteration}; "
                         f"{run_dir / 'checkpoints' / 'last.pt'} holds the run so far")
        self.run_dir, self.iteration, self.signal_name = run_dir, iteration, signal_name


def slurm_job_id(environ: Mapping[str, str]) -> str | None:
    """The id ``scontrol`` knows this job by: ``<array job>_<task>`` for an array task, else
    SLURM_JOB_ID; None outside SLURM."""
    array, task = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return environ.get("SLURM_JOB_ID") or None


def requeue_command(environ: Mapping[str, str]) -> list[str] | None:
    job = slurm_job_id(environ)
    return None if job is None else ["scontrol", "requeue", job]


def requeue(environ: Mapping[str, str] | None = None, signal_name: str = "SIGUSR1") -> str:
    """After ``signal_name``, requeue the SLURM job this process runs in (only after SIGUSR1;
    nothing outside SLURM); returns a line saying what was done."""
    command = requeue_command(os.environ if environ is None else environ)
    if command is None:
        return "not a SLURM job: rerun the same command with --resume to continue"
    if signal_name != "SIGUSR1":
        return (f"not requeued after {signal_name} (SLURM cancels or requeues the job itself); "
                "resubmit the same command with --resume to continue")
    shown = " ".join(command)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        return f"could not requeue the job ({shown}: {err}); rerun it with --resume"
    if done.returncode != 0:
        return (f"could not requeue the job ({shown} exited {done.returncode}: "
                f"{done.stderr.strip()}); rerun it with --resume")
    return f"requeued: {shown}"
