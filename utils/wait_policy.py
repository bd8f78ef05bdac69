"""OpenMP's wait policy for this project's processes: passive when a process is given a share
of the CPUs, unless the user chose a policy.

After a parallel region, libgomp's threads spin before they sleep (300,000 turns unless told
otherwise). Alone that saves a wake-up on every operation; beside other multi-threaded work
the spinning threads hold the cores the other processes need, and every process slows far
below its fair share. A process told to use fewer threads than the CPUs it may run on
(``OMP_NUM_THREADS``, as the sweep's local workers and the tests' trainers are, or a SLURM
task's ``SLURM_CPUS_PER_TASK``) shares the machine, so its waiting threads sleep at once
(``OMP_WAIT_POLICY=PASSIVE``); a process with every CPU keeps libgomp's spinning. OpenMP reads
the policy once, when torch loads libgomp, so each entry point (trainers, scripts, the tests'
conftest) imports this module before torch; the isort section "wait-policy" in pyproject.toml
keeps it first. A user who sets ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` keeps their choice.
Child processes (the CRF pool, the sweep's jobs) inherit it through the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def shares_the_cpus(environ: Mapping[str, str], cpus: int) -> bool:
    """Whether ``environ`` gives the process fewer threads than its ``cpus`` CPUs."""
    for name in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        value = environ.get(name, "").strip()
        if value.isdigit() and 0 < int(value) < cpus:
            return True
    return False


_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
if ("OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ
        and shares_the_cpus(os.environ, _CPUS)):
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
