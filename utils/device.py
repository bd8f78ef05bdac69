"""Where tensors live: choosing the device, tuning the backend, and host-to-device copies."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

import torch

from utils.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA GPU is visible; "
                         "use --device auto")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"--device={name!r}: choose auto, cpu or cuda")
    return torch.device(name)


def affinity_cpus() -> set[int]:
    """The CPUs this process may run on (every CPU where the OS has no affinity, e.g. macOS)."""
    if hasattr(os, "sched_getaffinity"):
        return os.sched_getaffinity(0)
    return set(range(os.cpu_count() or 1))


def cpu_threads(requested: int | None, environ: Mapping[str, str],
                affinity: set[int]) -> tuple[int, str]:
    """The CPU threads to compute with and where the number comes from: ``requested``
    (--threads), else $OMP_NUM_THREADS, else $SLURM_CPUS_PER_TASK (SLURM may not pin the
    task to its CPUs), else the CPUs in this process's ``affinity`` mask; never more than
    those CPUs, as extra threads only wait for each other on a shared machine."""
    cpus = max(1, len(affinity))
    for value, source in ((requested, "--threads"),
                          (environ.get("OMP_NUM_THREADS"), "OMP_NUM_THREADS"),
                          (environ.get("SLURM_CPUS_PER_TASK"), "SLURM_CPUS_PER_TASK")):
        if value is None or value == "":
            continue
        try:
            n = int(value)
        except ValueError:
            raise ConfigError(f"{source}={value!r}: expected a number of threads") from None
        if n < 1:
            raise ConfigError(f"{source}={value!r}: expected a number of threads >= 1")
        return min(n, cpus), source
    return cpus, "CPUs this process may run on"


def set_cpu_threads(requested: int | None) -> tuple[int, str]:
    """Apply `cpu_threads` for this process (torch's intra-op threads); returns it."""
    n, source = cpu_threads(requested, os.environ, affinity_cpus())
    torch.set_num_threads(n)
    return n, source


def available_cpus(environ: Mapping[str, str] | None = None) -> int:
    """How many CPUs this process may use (at least 1): its CPU affinity
    (``os.sched_getaffinity``; ``os.cpu_count()`` where the OS has none), capped by
    ``SLURM_CPUS_PER_TASK`` when ``environ`` (default ``os.environ``) sets it, since a SLURM
    task confined by cgroups alone still sees every CPU of the node in its affinity."""
    environ = os.environ if environ is None else environ
    cpus = len(affinity_cpus())
    slurm = environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        cpus = min(cpus, int(slurm))
    return max(cpus, 1)


def _glibc_function(name: str):
    """The C library's function ``name``, or None where the C library is not glibc (macOS,
    musl): the allocator settings below are glibc's and are then left alone."""
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def configure_backend(device: torch.device, low_memory: bool = False) -> None:
    """Process-wide settings that make training fast on ``device``; call once, before training.

    CPU (Linux, glibc): keep freed memory in the process. By default glibc serves every large
    tensor with a fresh ``mmap`` and returns it on free, so each step re-faults and re-zeroes
    gigabytes of memory. One malloc arena limits the fragmentation of the reused heap, which
    still costs resident memory; ``low_memory`` keeps glibc's default (lower peak, slower).
    CUDA: cuDNN's algorithm autotuning stays off: its search makes the first step far slower
    for a negligible gain per step (figures in the git log).
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        return
    mallopt = _glibc_function("mallopt")
    if low_memory or mallopt is None:
        return
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, 1 << 30)
    mallopt(m_arena_max, 1)


def release_freed_memory() -> None:
    """Hand the free pages of the process heap back to the OS (glibc's ``malloc_trim``).

    ``configure_backend`` keeps freed memory in the process, so after a phase that allocated
    differently (pseudo-labelling, validation) its freed blocks stay resident, and the next
    phase, which cannot use them all, grows the heap on top. Trimming at the phase boundaries
    (after pseudo-labelling, and in ``utils.training.BestKeeper.update`` after validation)
    lowers the peak; the next training step re-faults the pages it reuses, once per phase.
    No-op without glibc.
    """
    trim = _glibc_function("malloc_trim")
    if trim is not None:
        trim(0)


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a (small) CPU tensor, e.g. random draws of the CPU generator, to ``device``.

    A copy from ordinary (pageable) host memory to a GPU waits until the GPU has finished all
    queued work, so each one in a training step stalls the pipeline. From pinned memory the
    copy is asynchronous (PyTorch keeps the pinned block until the copy has completed).
    """
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
