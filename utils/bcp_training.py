"""One iteration of each stage of the BCP comparison method (train_model/bcp.py; Bai et al.,
CVPR 2023, as DeepMed-Lab-ECNU/BCP code/ACDC_BCP_train.py trains ACDC).

Each iteration draws ``labeled_bs`` labeled slices (halves a and b) and, in stage 2,
``unlabeled_bs`` pool slices (halves a and b), each augmented as the baseline's batch (its own
draws), and one rectangle (`utils.copy_paste.draw_box`, ``mask`` 1 outside it) for the whole
batch.

- Stage 1, copy-paste pre-training: mix(img_a, img_b) (b's rectangle pasted into a), labels
  mixed alike, both regions weight 1.
- Stage 2, bidirectional copy-paste with the EMA teacher's pseudo-labels of the unlabeled
  halves (argmax, largest component per class; `utils.copy_paste.teacher_pseudo_labels`):
  mix(img_a, unl_a) (a labeled slice around an unlabeled rectangle) and mix(unl_b, img_b) (an
  unlabeled slice around a labeled rectangle), each its own forward; pseudo-labeled regions
  weigh ``u_weight`` (0.5), labeled ones 1.

Loss (`losses.copy_paste.mix_loss`) = (Dice + cross-entropy) / 2; one Adam step unless it is
not finite. The teacher's EMA update follows each stage-2 step, in the trainer's loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from losses.copy_paste import mix_loss
from utils.augment import to_onehot
from utils.baseline_training import BaselineDraws, BaselineSettings, baseline_batch, draw_baseline
from utils.captured_step import NonFiniteGuard, stepper
from utils.copy_paste import box_mask, draw_box, mix, teacher_pseudo_labels
from utils.mixed_precision import MixedPrecision


@dataclass(frozen=True)
class BCPSettings:
    """The flags one iteration needs: ``labeled`` and ``unlabeled`` augmentation settings
    (their batch_size: --labeled_bs, --unlabeled_bs, each even), --u_weight, --mask_ratio."""

    labeled: BaselineSettings
    unlabeled: BaselineSettings
    u_weight: float = 0.5
    mask_ratio: float = 2 / 3


class BCPDraws(NamedTuple):
    """Every random choice of one iteration, in the order drawn: the ``labeled`` slices and
    augmentation, the ``unlabeled`` ones (stage 2; None in stage 1) and the ``box`` (4,)."""

    labeled: BaselineDraws
    unlabeled: BaselineDraws | None
    box: torch.Tensor


def draw_bcp(lab_index: torch.Tensor, unl_index: torch.Tensor | None, s: BCPSettings,
             height: int, width: int, generator: torch.Generator) -> BCPDraws:
    """The random half of an iteration, on the host; ``unl_index`` None: stage 1's."""
    labeled = draw_baseline(lab_index, s.labeled, height, width, generator)
    unlabeled = None if unl_index is None else \
        draw_baseline(unl_index, s.unlabeled, height, width, generator)
    return BCPDraws(labeled, unlabeled, draw_box(height, width, s.mask_ratio, generator))


def halves(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first and the second half of a batch (a, b)."""
    k = t.shape[0] // 2
    return t[:k], t[k:]


def pretrain_losses(
    model: torch.nn.Module,
    lab: tuple[torch.Tensor, torch.Tensor],
    s: BCPSettings,
    draws: BCPDraws,
    precision: MixedPrecision,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 1: (loss, Dice, cross-entropy) of mix(img_a, img_b) against mix(lab_a, lab_b);
    ``lab``: labeled (images (N, 1, H, W), labels (N, H, W)) on the device."""
    x, y = baseline_batch(*lab, s.labeled, draws.labeled)
    (img_a, img_b), (lab_a, lab_b) = halves(x), halves(y)
    mask = box_mask(draws.box, *x.shape[-2:], device=x.device)
    with precision.autocast():
        logits = model(mix(img_a, img_b, mask).contiguous(memory_format=torch.channels_last))
    dice, ce = mix_loss(logits.float(), lab_a, lab_b, mask, 1.0, 1.0)
    return (dice + ce) / 2, dice, ce


def bcp_losses(
    model: torch.nn.Module,
    teacher: torch.nn.Module,
    lab: tuple[torch.Tensor, torch.Tensor],
    unl: tuple[torch.Tensor, torch.Tensor],
    s: BCPSettings,
    draws: BCPDraws,
    precision: MixedPrecision,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 2: (loss, Dice, cross-entropy) of the two bidirectional mixes, labeled regions
    against their labels (weight 1), unlabeled ones against the teacher's pseudo-labels of the
    unmixed unlabeled slices (weight ``s.u_weight``); ``unl``: the pool's (images (M, 1, H,
    W), blank labels (M, H, W)) on the device."""
    c = s.labeled.num_classes
    x, y = baseline_batch(*lab, s.labeled, draws.labeled)
    xu, _ = baseline_batch(*unl, s.unlabeled, draws.unlabeled)
    (img_a, img_b), (lab_a, lab_b), (unl_a, unl_b) = halves(x), halves(y), halves(xu)
    with precision.autocast():
        plab_a, plab_b = (to_onehot(teacher_pseudo_labels(teacher, u, c), c)
                          for u in (unl_a, unl_b))
    mask = box_mask(draws.box, *x.shape[-2:], device=x.device)
    w = s.u_weight
    parts = []
    for img, labels_out, labels_in, w_out, w_in in (
            (mix(img_a, unl_a, mask), lab_a, plab_a, 1.0, w),
            (mix(unl_b, img_b, mask), plab_b, lab_b, w, 1.0)):
        with precision.autocast():
            logits = model(img.contiguous(memory_format=torch.channels_last))
        parts.append(mix_loss(logits.float(), labels_out, labels_in, mask, w_out, w_in))
    dice, ce = parts[0][0] + parts[1][0], parts[0][1] + parts[1][1]
    return (dice + ce) / 2, dice, ce


def bcp_stepper(
    model: torch.nn.Module,
    teacher: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    lab: tuple[torch.Tensor, torch.Tensor],
    unl: tuple[torch.Tensor, torch.Tensor] | None,
    s: BCPSettings,
    generator: torch.Generator,
    guard: NonFiniteGuard,
    precision: MixedPrecision,
) -> Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The student's update ``step(it) -> (loss, Dice, cross-entropy)``
    (``utils.captured_step.stepper``, eager) of stage 1 (``teacher`` and ``unl`` None) or
    stage 2; slices are drawn from all of ``lab`` and ``unl``."""
    lab_index = torch.arange(lab[0].shape[0])
    unl_index = None if unl is None else torch.arange(unl[0].shape[0])
    h, w = lab[0].shape[-2:]
    if unl is None:
        def losses(d: BCPDraws) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return pretrain_losses(model, lab, s, d, precision)
    else:
        def losses(d: BCPDraws) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return bcp_losses(model, teacher, lab, unl, s, d, precision)
    return stepper(lambda g, it: draw_bcp(lab_index, unl_index, s, h, w, g), losses, model,
                   optimizer, generator, guard, precision)
