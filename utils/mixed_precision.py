"""Mixed precision (``--amp off|bf16|fp16``): the network's forward under autocast, the losses,
the backward's gradients in the parameters and the optimizer in float32.

On the CPU only bf16 is offered, and only where the CPU computes bf16 natively (AMX or
AVX512-BF16): elsewhere autocast would emulate it and be slower than float32. On a GPU, fp16
runs with a gradient scaler (its state is part of the periodic checkpoint); bf16 needs none.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from utils.errors import ConfigError

AMP_CHOICES = ("off", "bf16", "fp16")

# /proc/cpuinfo flags of the CPUs that compute bf16 natively.
CPU_BF16_FEATURES = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The feature flags of the first CPU in ``cpuinfo`` (None where the file is missing)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


class MixedPrecision:
    """How one training step runs: ``autocast()`` around the forward, `step` for the update.

    ``dtype`` is None for float32 (``--amp off``); ``scaler`` is a GradScaler for fp16.
    """

    def __init__(self, device_type: str, dtype: torch.dtype | None,
                 scaler: torch.amp.GradScaler | None = None) -> None:
        self.device_type, self.dtype, self.scaler = device_type, dtype, scaler

    def autocast(self) -> AbstractContextManager:
        """The forward's context: autocast to ``dtype``, or nothing in float32."""
        if self.dtype is None:
            return nullcontext()
        # No cast cache: a CUDA graph must capture the weights' casts (each weight is cast once
        # per forward here anyway).
        return torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=False)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Zero the gradients, backpropagate ``loss`` (scaled for fp16) and step the optimizer
        (skipped by the scaler when a scaled gradient overflowed)."""
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return {} if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def mixed_precision(amp: str, device: torch.device,
                    cpu_features: set[str] | None = None) -> MixedPrecision:
    """The ``--amp`` choice on ``device``, or a ConfigError saying what is missing.

    ``cpu_features`` defaults to this machine's /proc/cpuinfo flags.
    """
    if amp not in AMP_CHOICES:
        raise ConfigError(f"--amp {amp!r}: choose one of {', '.join(AMP_CHOICES)}")
    if amp == "off":
        return MixedPrecision(device.type, None)
    if device.type == "cpu":
        if amp == "fp16":
            raise ConfigError("--amp fp16 is for GPUs; on the CPU use --amp bf16 (on a CPU "
                              "with AMX or AVX512-BF16) or --amp off")
        flags = cpu_flags() if cpu_features is None else cpu_features
        if flags is None:
            raise ConfigError("--amp bf16: cannot tell whether this CPU computes bf16 natively "
                              "(no /proc/cpuinfo); use --amp off")
        if not flags & set(CPU_BF16_FEATURES):
            raise ConfigError("--amp bf16: this CPU has neither AMX (amx_bf16) nor "
                              "AVX512-BF16 (avx512_bf16), so bf16 would be emulated and slower "
                              "than float32; use --amp off")
        return MixedPrecision("cpu", torch.bfloat16)
    if amp == "bf16":
        if not torch.cuda.is_bf16_supported():
            raise ConfigError(f"--amp bf16: {torch.cuda.get_device_name(device)} does not "
                              "support bf16; use --amp fp16")
        return MixedPrecision(device.type, torch.bfloat16)
    return MixedPrecision(device.type, torch.float16, torch.amp.GradScaler(device.type))
