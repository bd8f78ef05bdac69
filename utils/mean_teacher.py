"""One iteration of the mean-teacher comparison method (train_model/mean_teacher.py; Tarvainen &
Valpola 2017, as SSL4MIS's train_mean_teacher_2D.py trains it).

Batch: ``labeled_bs`` labeled slices and ``unlabeled_bs`` slices of the unlabeled pool, drawn
uniformly with replacement and each augmented as the baseline's batch (its own draws; the pool
slices with blank labels that are never used). The student sees both halves in one forward;
the teacher, under ``torch.no_grad``, sees the augmented pool slices plus Gaussian noise
(std ``noise``, clipped at twice it). Loss = segmentation loss of the labeled half +
w(it) x mean squared difference of the two softmaxes on the pool half
(`losses.consistency`); one Adam step of the student unless the loss is not finite. The
teacher's EMA update (`models.ema.ema_update`) follows each step, in the trainer's loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from losses.consistency import consistency_weight, softmax_mse_loss
from utils.baseline_training import BaselineDraws, BaselineSettings, baseline_batch, draw_baseline
from utils.captured_step import NonFiniteGuard, stepper
from utils.device import host_to_device
from utils.mixed_precision import MixedPrecision


@dataclass(frozen=True)
class MeanTeacherSettings:
    """The flags one iteration needs: ``labeled`` and ``unlabeled`` augmentation settings
    (their batch_size: --labeled_bs, --unlabeled_bs), --teacher_noise, and the consistency
    weight's --consistency, --consistency_rampup, --consistency_start."""

    labeled: BaselineSettings
    unlabeled: BaselineSettings
    noise: float = 0.1
    consistency: float = 0.1
    rampup: int = 30000
    start: int = 1000

    def weight(self, iteration: int) -> float:
        """The consistency weight at ``iteration`` (`losses.consistency.consistency_weight`)."""
        return consistency_weight(iteration, self.consistency, self.rampup, self.start)


class MeanTeacherDraws(NamedTuple):
    """Every random choice of one iteration, in the order drawn: the ``labeled`` and the
    ``unlabeled`` halves' slices and augmentation, then the teacher's input ``noise``
    (unlabeled_bs, 1, H, W); and the iteration's consistency ``weight`` (0-d float32, the
    schedule's value, no draw)."""

    labeled: BaselineDraws
    unlabeled: BaselineDraws
    noise: torch.Tensor
    weight: torch.Tensor


def draw_mean_teacher(lab_index: torch.Tensor, unl_index: torch.Tensor,
                      s: MeanTeacherSettings, height: int, width: int,
                      generator: torch.Generator, iteration: int) -> MeanTeacherDraws:
    """The host half of iteration ``iteration`` (``lab_index``, ``unl_index``: CPU slice
    numbers of the labeled slices and of the pool)."""
    labeled = draw_baseline(lab_index, s.labeled, height, width, generator)
    unlabeled = draw_baseline(unl_index, s.unlabeled, height, width, generator)
    noise = torch.randn((s.unlabeled.batch_size, 1, height, width), generator=generator) * s.noise
    return MeanTeacherDraws(labeled, unlabeled, noise.clamp(-2 * s.noise, 2 * s.noise),
                            torch.tensor(s.weight(iteration), dtype=torch.float32))


def mean_teacher_losses(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    lab: tuple[torch.Tensor, torch.Tensor],
    unl: tuple[torch.Tensor, torch.Tensor],
    s: MeanTeacherSettings,
    draws: MeanTeacherDraws,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    precision: MixedPrecision,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, segmentation loss, consistency loss) of the batch of ``draws``, the consistency
    loss weighted by ``draws.weight``: ``lab`` are the labeled (images (N, 1, H, W), labels
    (N, H, W)), ``unl`` the pool's (images (M, 1, H, W), blank labels (M, H, W)), on the
    device."""
    x_l, y_l = baseline_batch(*lab, s.labeled, draws.labeled)
    x_u, _ = baseline_batch(*unl, s.unlabeled, draws.unlabeled)
    n_l = x_l.shape[0]
    with torch.no_grad(), precision.autocast():
        noisy = x_u + host_to_device(draws.noise, x_u.device)
        teacher_logits = teacher(noisy.contiguous(memory_format=torch.channels_last))
    with precision.autocast():
        logits = student(torch.cat([x_l, x_u]).contiguous(memory_format=torch.channels_last))
    loss_seg = loss_fn(logits[:n_l].float(), y_l)
    loss_cons = softmax_mse_loss(logits[n_l:], teacher_logits)
    weight = host_to_device(draws.weight, loss_cons.device)
    return loss_seg + weight * loss_cons, loss_seg, loss_cons


def mean_teacher_stepper(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lab: tuple[torch.Tensor, torch.Tensor],
    unl: tuple[torch.Tensor, torch.Tensor],
    s: MeanTeacherSettings,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    generator: torch.Generator,
    guard: NonFiniteGuard,
    precision: MixedPrecision,
) -> Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The student's update ``step(it) -> (loss, segmentation loss, consistency loss)``
    (``utils.captured_step.stepper``, eager, at the consistency weight of ``it``); the teacher
    is only read. Slices are drawn from all of ``lab`` and of ``unl``."""
    lab_index, unl_index = torch.arange(lab[0].shape[0]), torch.arange(unl[0].shape[0])
    h, w = lab[0].shape[-2:]
    return stepper(lambda g, it: draw_mean_teacher(lab_index, unl_index, s, h, w, g, it),
                   lambda d: mean_teacher_losses(student, teacher, lab, unl, s, d, loss_fn,
                                                 precision),
                   student, optimizer, generator, guard, precision)
