"""The segmentation loss a run trains with (``--dsc_loss``): Dice with or without the
background, or weighted cross-entropy."""

from __future__ import annotations

from collections.abc import Callable

import torch

from losses.cross_entropy import class_weights, weighted_cross_entropy_loss
from losses.dice import soft_dice_loss


def segmentation_loss(
    dsc_loss: int, num_classes: int
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The ``--dsc_loss`` choice as a function (logits, labels_onehot) -> scalar."""
    if dsc_loss == 2:
        return lambda logits, y: soft_dice_loss(logits, y, include_background=True)
    if dsc_loss == 1:
        return lambda logits, y: soft_dice_loss(logits, y, include_background=False)
    weights = {torch.device("cpu"): class_weights(num_classes)}

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # One copy per device, made before any CUDA graph capture (the first, warm-up step).
        if logits.device not in weights:
            weights[logits.device] = weights[torch.device("cpu")].to(logits.device)
        return weighted_cross_entropy_loss(logits, y, weights[logits.device])

    return loss
