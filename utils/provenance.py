"""What produced a run, as config.yaml records it: the code's git commit (and whether its tree
had changes), the versions of Python and the libraries that shape the numbers, the device,
the host, and when the run started and ended.

Each value that cannot be known is None (null in YAML): git missing, the code not a git
checkout, a library not installed, no CUDA.
"""

from __future__ import annotations

import platform
import socket
import subprocess
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# Distributions recorded besides Python, torch and numpy (names as pip knows them).
DISTRIBUTIONS = ("medpy", "pydensecrf2")


def now() -> str:
    """The local time with its UTC offset, to the second (ISO 8601)."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _git(root: Path, *args: str) -> str | None:
    """stdout of ``git -C root args`` (stripped), or None when git is missing or fails."""
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(root: Path = REPO_ROOT) -> dict[str, Any]:
    """``git_commit`` (the checked-out commit's hash) and ``git_dirty`` (whether tracked or
    untracked, not ignored, files differ from it), both None outside a git checkout."""
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain") if commit else None
    return {"git_commit": commit, "git_dirty": None if status is None else status != ""}


def versions() -> dict[str, str | None]:
    """Python, torch, CUDA and cuDNN (as torch was built; None without them), numpy and
    `DISTRIBUTIONS`."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    found = {"python": platform.python_version(), "torch": str(torch.__version__),
             "cuda": torch.version.cuda, "cudnn": None if cudnn is None else str(cudnn),
             "numpy": str(np.__version__)}
    for name in DISTRIBUTIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model (the architecture where the model is unknown)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def session(device: torch.device) -> dict[str, Any]:
    """The provenance of one process working on a run, started now."""
    return {**git_state(), "versions": versions(), "device_name": device_name(device),
            "host": socket.gethostname(), "started": now()}
