"""One writer per run directory: the lock a run holds from before it touches its directory
until it exits.

The lock is the file ``run.lock`` in the run directory, created with O_CREAT|O_EXCL (so exactly
one of two processes creating it at once succeeds) and holding, as JSON, who holds it: host,
pid, the process's start time in clock ticks since boot (``process_start``, to tell a reused
pid), the time taken, the SLURM job (``<array job>_<task>`` or the job id) and a random token.
A second process refuses the directory with one line naming the holder, unless the holder is
gone: on the same host, its pid is dead (or now another process); on another host, only its
own SLURM job may say so (a requeued task whose previous run died on another node), or the
user with ``--force_unlock``.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from utils.errors import RunDirError
from utils.preemption import slurm_job_id
from utils.provenance import now

LOCK_NAME = "run.lock"


def process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (field 22 of
    /proc/<pid>/stat); None where /proc does not say (no such process, not Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or parentheses.
    return int(stat.rsplit(")", 1)[1].split()[19])


def holder_record(environ: Mapping[str, str]) -> dict[str, Any]:
    """What this process writes into the lock it takes."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "process_start": process_start(pid),
            "started": now(), "slurm_job": slurm_job_id(environ),
            "token": secrets.token_hex(8)}


def describe(holder: dict[str, Any]) -> str:
    """``pid 123 on host h since <time> (SLURM job 120_3)``, or what is known of it."""
    if "pid" not in holder:
        return "an unknown process (the lock file is unreadable)"
    job = f" (SLURM job {holder['slurm_job']})" if holder.get("slurm_job") else ""
    return f"pid {holder['pid']} on host {holder.get('host')} since {holder.get('started')}{job}"


def alive(holder: dict[str, Any]) -> bool:
    """Whether the holder (a process on this host) still runs: its pid exists and, where /proc
    shows it, started when the lock says."""
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    started = process_start(int(holder["pid"]))
    recorded = holder.get("process_start")
    return started is None or recorded is None or started == recorded


def takeover_reason(holder: dict[str, Any], mine: dict[str, Any],
                    force_unlock: bool) -> str | None:
    """Why this process (``mine``) may take a lock held by ``holder``, as the warning says it;
    None when it may not."""
    who = describe(holder)
    here = holder.get("host") == mine["host"]
    if here and "pid" in holder and not alive(holder):
        return f"the lock of {who} is stale (that process is gone)"
    if not here and holder.get("slurm_job") and holder["slurm_job"] == mine["slurm_job"]:
        return (f"the lock is held by {who}, of this same SLURM job: a requeued task whose "
                f"previous run ended on {holder.get('host')}")
    if force_unlock:
        still = "; it is still running on this host" if here and "pid" in holder else ""
        return f"--force_unlock: the lock of {who} is broken{still}"
    return None


def read_holder(path: Path) -> dict[str, Any] | None:
    """The lock's record; None if the file is gone; {} if it stays unreadable for a second
    (its creator may be writing it, or died in between)."""
    for _ in range(20):
        try:
            holder = json.loads(path.read_text())
            if isinstance(holder, dict):
                return holder
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return {}


def remove_if_held_by(path: Path, holder: dict[str, Any]) -> bool:
    """Remove the lock if it is still ``holder``'s; False if another process took it first.

    The file is renamed aside (atomic: of processes taking over at once, one gets it) and
    checked; a newer lock renamed by mistake goes back."""
    aside = path.with_name(f".{LOCK_NAME}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    if read_holder(aside) == holder:
        aside.unlink()
        return True
    try:
        os.link(aside, path)
    except FileExistsError:
        pass
    aside.unlink()
    return False


class RunLock:
    """The lock this process holds on a run directory; `release` removes it."""

    def __init__(self, path: Path, record: dict[str, Any]) -> None:
        self.path, self.record = path, record

    def release(self) -> None:
        """Remove the lock file if it is still this process's (idempotent)."""
        if self.record is None:
            return
        holder = read_holder(self.path) if self.path.exists() else None
        if holder is not None and holder.get("token") == self.record["token"]:
            self.path.unlink()
        else:
            print(f"warning: {self.path}: the lock was taken over by "
                  f"{describe(holder) if holder else 'another process'} while this run held it",
                  file=sys.stderr, flush=True)
        self.record = None


def lock_run_dir(run_dir: Path, force_unlock: bool = False,
                 environ: Mapping[str, str] | None = None) -> RunLock:
    """Create ``run_dir`` if needed and take its lock, or raise RunDirError naming the process
    that holds it. A lock whose holder is gone (`takeover_reason`) is taken over with a
    warning on stderr."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    mine = holder_record(os.environ if environ is None else environ)
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            holder = read_holder(path)
            if holder is None:
                continue  # released meanwhile
            reason = takeover_reason(holder, mine, force_unlock)
            if reason is None:
                gone = ", or pass --force_unlock if it is gone" \
                    if holder.get("host") != mine["host"] else ""
                raise RunDirError(f"{run_dir}: in use by {describe(holder)} ({LOCK_NAME}); wait "
                                  f"for it to end{gone}") from None
            if remove_if_held_by(path, holder):
                print(f"warning: {run_dir}: {reason}; taking it over", file=sys.stderr,
                      flush=True)
            continue
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(mine))
        except OSError as err:  # a full disk, a quota
            path.unlink()
            raise RunDirError(f"{path}: cannot write the lock ({err.strerror})") from None
        return RunLock(path, mine)
    raise RunDirError(f"{path}: could not take the lock: other processes keep taking it")
