"""The mean teacher's consistency loss and its weight's ramp-up (Tarvainen & Valpola 2017, as
SSL4MIS's train_mean_teacher_2D.py computes them)."""

from __future__ import annotations

import math

import torch


def sigmoid_rampup(current: float, rampup_length: float) -> float:
    """exp(-5 (1 - t)^2) with t = current / rampup_length clipped to [0, 1] (Laine & Aila
    2017): about 0.0067 at the start, 1 from ``rampup_length`` on; 1 when
    ``rampup_length`` is 0 (no ramp)."""
    if rampup_length <= 0:
        return 1.0
    t = min(max(current / rampup_length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def consistency_weight(iteration: int, weight: float, rampup: float, start: int = 0) -> float:
    """The consistency loss's weight at ``iteration`` (0-based): 0 before ``start`` (SSL4MIS:
    its first 1000 iterations), else ``weight`` x `sigmoid_rampup` (iteration, rampup)."""
    if iteration < start:
        return 0.0
    return weight * sigmoid_rampup(iteration, rampup)


def softmax_mse_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over every element of (softmax(student) - softmax(teacher))^2, softmax over the
    classes; the teacher's side carries no gradient.

    Args:
        student_logits: (N, C, H, W).
        teacher_logits: (N, C, H, W), e.g. computed under ``torch.no_grad``.

    Returns:
        A float32 scalar.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} and teacher "
                         f"{tuple(teacher_logits.shape)} logits differ")
    p = torch.softmax(student_logits.float(), dim=1)
    q = torch.softmax(teacher_logits.detach().float(), dim=1)
    return ((p - q) ** 2).mean()
