"""Soft Dice loss for training (METHOD §5); the hard Dice of evaluation is
`utils.evaluation.dice_per_class`."""

from __future__ import annotations

import torch


def soft_dice_loss(
    logits: torch.Tensor,
    labels_onehot: torch.Tensor,
    include_background: bool = True,
    eps: float = 1e-10,
) -> torch.Tensor:
    """Soft Dice loss, 1 - mean over images and classes of the per-image, per-class Dice.

    With p = softmax(logits) over classes, for image n and class c:
        dice[n, c] = 2 * sum_xy(p * y) / (sum_xy(p) + sum_xy(y) + eps)

    Args:
        logits: (N, C, H, W) unnormalised scores.
        labels_onehot: (N, C, H, W) one-hot or soft labels in [0, 1].
        include_background: if False, class 0 is dropped before averaging (``--dsc_loss 1``).
        eps: added to the denominator to avoid 0/0 for classes absent in image and prediction.

    Returns:
        Scalar float32 loss in [0, 1].
    """
    if logits.shape != labels_onehot.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels_onehot.shape)} differ"
        )
    # float32 so that the softmax and pixel sums stay accurate under autocast (fp16 sums of
    # ~37k pixels lose precision and eps=1e-10 underflows in half precision).
    p = torch.softmax(logits.float(), dim=1)
    y = labels_onehot.float()
    dims = tuple(range(2, p.dim()))
    intersection = (p * y).sum(dim=dims)
    denom = p.sum(dim=dims) + y.sum(dim=dims) + eps
    dice = 2.0 * intersection / denom  # (N, C)
    if not include_background:
        dice = dice[:, 1:]
    return 1.0 - dice.mean()

