"""utils/device.py: the CPUs this process may use."""

from __future__ import annotations

import os

from utils.device import available_cpus


def test_available_cpus_is_the_affinity_capped_by_slurm():
    affinity = len(os.sched_getaffinity(0))
    assert available_cpus({}) == affinity
    assert available_cpus({"SLURM_CPUS_PER_TASK": "1"}) == 1
    assert available_cpus({"SLURM_CPUS_PER_TASK": str(affinity + 5)}) == affinity
    assert available_cpus({"SLURM_CPUS_PER_TASK": ""}) == affinity  # unset by SLURM
    assert available_cpus({"SLURM_CPUS_PER_TASK": "0"}) == affinity
