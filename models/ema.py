"""An exponential-moving-average teacher of a student network (mean teacher, Tarvainen &
Valpola 2017; BCP's teacher, Bai et al. 2023)."""

from __future__ import annotations

import torch
from torch import nn


def freeze(teacher: nn.Module) -> nn.Module:
    """``teacher`` with no parameter requiring a gradient (it is only ever an EMA); returns
    it."""
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float, step: int | None = None,
               buffers: bool = False) -> float:
    """teacher <- a * teacher + (1 - a) * student for every parameter, in place; returns a.

    Args:
        teacher, student: networks of the same architecture (parameters in the same order).
        decay: the EMA's decay (0.99 in both papers' code).
        step: the 0-based optimizer step just taken: with it, a = min(1 - 1 / (step + 1),
            decay) (SSL4MIS: the true average of the steps so far until the EMA is the better
            one; step 0 copies the student); None: a = decay (BCP).
        buffers: also average the floating-point buffers (batch-norm running statistics),
            integer ones (batches tracked) copied from the student, as BCP averages the whole
            state_dict; False: the teacher's buffers are its own (SSL4MIS: its own forwards
            move them).
    """
    a = decay if step is None else min(1.0 - 1.0 / (step + 1), decay)
    pairs = list(zip(teacher.parameters(), student.parameters(), strict=True))
    if buffers:
        pairs += list(zip(teacher.buffers(), student.buffers(), strict=True))
    for t, s in pairs:
        if t.is_floating_point():
            t.mul_(a).add_(s.detach(), alpha=1.0 - a)
        else:
            t.copy_(s)
    return a
