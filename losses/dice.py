"""Dice loss for training and hard Dice score for validation (METHOD §5)."""

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


def dice_per_class(
    pred_labels: torch.Tensor, true_labels: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Hard Dice of each foreground class over the whole label map.

    Args:
        pred_labels: integer label map of any shape, e.g. (N, H, W) or (X, Y, Z).
        true_labels: integer label map of the same shape.
        num_classes: C, including background 0.

    Returns:
        float64 tensor (C - 1,): Dice of classes 1..C-1, pooled over all voxels. A class absent
        from both maps scores 1.0; present in exactly one, 0.0.
    """
    if pred_labels.shape != true_labels.shape:
        raise ValueError(
            f"pred {tuple(pred_labels.shape)} and true {tuple(true_labels.shape)} differ"
        )
    classes = torch.arange(1, num_classes, device=pred_labels.device)
    # (C-1, V) boolean masks; counts in int64 so large volumes cannot overflow.
    pred = pred_labels.reshape(1, -1) == classes[:, None]
    true = true_labels.reshape(1, -1).to(pred_labels.device) == classes[:, None]
    inter = (pred & true).sum(dim=1).double()
    total = pred.sum(dim=1).double() + true.sum(dim=1).double()
    both_empty = total == 0
    dice = 2.0 * inter / torch.where(both_empty, torch.ones_like(total), total)
    return torch.where(both_empty, torch.ones_like(dice), dice)
