"""The project's own errors and how a script reports them (`run_main`); imports no torch.

Each error is a user-facing stop that `run_main` reports in one line on stderr with exit
status 2: `ConfigError` (settings and flags), `DataError` (data files), `DiskFullError` (a
write that found no space), `RunDirError` (run directories and checkpoints) and
`TrainingStopped` (a run that cannot go on). Any other exception is a programming error and
keeps its traceback. A run stopped by SIGTERM or SIGUSR1 (`utils.preemption`) exits with
status 75 after writing its periodic checkpoint.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from utils.preemption import PREEMPTED_EXIT, Preempted, requeue


class ConfigError(ValueError):
    """A configuration value or command-line choice that cannot be used."""


class DataError(RuntimeError):
    """A data file or folder that is missing, unreadable or inconsistent."""


class DiskFullError(RuntimeError):
    """A file that could not be written for lack of space (ENOSPC) or quota (EDQUOT)."""


class RunDirError(RuntimeError):
    """A run directory or checkpoint that cannot be used as asked."""


class TrainingStopped(RuntimeError):
    """A run that cannot go on: too many non-finite losses in a row, nothing to train on."""


class RunFinished(Exception):
    """--resume of a run whose test results are already written."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(f"{run_dir}: this run has finished already; nothing to resume")
        self.run_dir = run_dir


def exit_status(failures: int) -> int:
    """The exit status of a script that counts what it could not do: that number, at most 100
    (higher statuses mean other things to shells and schedulers)."""
    return min(failures, 100)


def run_main(main: Callable[[], None]) -> None:
    """Run a script's main: the project's own errors end with one line on stderr and exit
    status 2; any other exception (a programming error) propagates with its traceback."""
    try:
        main()
    except RunFinished as done:
        print(str(done), flush=True)
        print(f"run directory: {done.run_dir}", flush=True)
        sys.exit(0)
    except (ConfigError, DataError, DiskFullError, RunDirError, TrainingStopped) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Preempted as stopped:
        print(f"{stopped}; {requeue(signal_name=stopped.signal_name)}", file=sys.stderr, flush=True)
        sys.exit(PREEMPTED_EXIT)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
