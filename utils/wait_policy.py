"""OpenMP's wait policy for this project's processes: passive unless the user chose one.

After a parallel region, libgomp's threads spin before they sleep (300,000 turns unless told
otherwise). Alone that saves a wake-up; beside other multi-threaded work, the spinning threads
hold the cores the other processes need, and every process slows far below its fair share. A
passive policy lets waiting threads sleep at once. OpenMP reads the policy once, when torch
loads libgomp, so each entry point (trainers, scripts, the tests' conftest) imports this module
before torch; the isort section "wait-policy" in pyproject.toml keeps it first. A user who sets
``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` keeps their choice. Child processes (the CRF pool, the
sweep's jobs) inherit it through the environment.
"""

from __future__ import annotations

import os

if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
