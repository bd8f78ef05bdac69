"""One iteration of the self-training comparison method (train_model/self_training.py): the
joint step without its contrastive term.

Batch: ``s.batch_size`` (the joint step's ``mtask_bs``) labeled slices and as many
pseudo-labeled pool slices, each drawn uniformly with replacement from the slices with enough
labels (``min_labels_dice_slice``, the rule of the joint step's Dice batch), each half augmented
as the baseline's and the joint step's labeled batch (`utils.baseline_training.baseline_batch`,
its own draws); one forward of both halves together, one Adam step on the segmentation loss of
the whole batch unless it is not finite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from utils.baseline_training import BaselineDraws, BaselineSettings, baseline_batch, draw_baseline
from utils.captured_step import NonFiniteGuard, stepper
from utils.mixed_precision import MixedPrecision


class PseudoLabelDraws(NamedTuple):
    """Every random choice of one iteration: the ``labeled`` half's slices and augmentation,
    then the ``pseudo`` half's (`utils.baseline_training.BaselineDraws`)."""

    labeled: BaselineDraws
    pseudo: BaselineDraws


def draw_pseudo_label_batch(lab_index: torch.Tensor, unl_index: torch.Tensor,
                            s: BaselineSettings, height: int, width: int,
                            generator: torch.Generator) -> PseudoLabelDraws:
    """The random half of an iteration, on the host: ``s.batch_size`` of ``lab_index`` and
    ``s.batch_size`` of ``unl_index`` (CPU indexes into the labeled and pseudo-labeled
    slices), each with its own augmentation draws."""
    return PseudoLabelDraws(draw_baseline(lab_index, s, height, width, generator),
                            draw_baseline(unl_index, s, height, width, generator))


def pseudo_label_losses(
    model: torch.nn.Module,
    lab: tuple[torch.Tensor, torch.Tensor],
    pseudo: tuple[torch.Tensor, torch.Tensor],
    s: BaselineSettings,
    draws: PseudoLabelDraws,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    precision: MixedPrecision,
) -> tuple[torch.Tensor]:
    """(segmentation loss,) of the batch of ``draws``: ``lab`` and ``pseudo`` are (images
    (N, 1, H, W), labels (N, H, W)) of the labeled slices and of the pseudo-labeled pool, on
    the training device. The batch holds both halves (2 x batch_size images, the labeled
    first), the network under ``precision``'s autocast, the loss in float32 over all of it."""
    x_l, y_l = baseline_batch(*lab, s, draws.labeled)
    x_u, y_u = baseline_batch(*pseudo, s, draws.pseudo)
    with precision.autocast():
        logits = model(torch.cat([x_l, x_u]).contiguous(memory_format=torch.channels_last))
    return (loss_fn(logits.float(), torch.cat([y_l, y_u])),)


def pseudo_label_stepper(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lab: tuple[torch.Tensor, torch.Tensor],
    pseudo: tuple[torch.Tensor, torch.Tensor],
    lab_index: torch.Tensor,
    unl_index: torch.Tensor,
    s: BaselineSettings,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    generator: torch.Generator,
    guard: NonFiniteGuard,
    precision: MixedPrecision,
) -> Callable[[int], torch.Tensor]:
    """The trainer's iteration ``step(it) -> loss`` of one round (``utils.captured_step.stepper``,
    eager): draw, augment, one step unless the loss is not finite."""
    h, w = lab[0].shape[-2:]
    step = stepper(lambda g, it: draw_pseudo_label_batch(lab_index, unl_index, s, h, w, g),
                   lambda d: pseudo_label_losses(model, lab, pseudo, s, d, loss_fn, precision),
                   model, optimizer, generator, guard, precision)
    return lambda it: step(it)[0]
