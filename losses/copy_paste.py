"""BCP's loss of a copy-paste mixed slice (Bai et al., CVPR 2023; ``mix_loss`` of
DeepMed-Lab-ECNU/BCP code/ACDC_BCP_train.py with its ``losses.DiceLoss``): a Dice and a
cross-entropy term per region of the mix, each region against its own labels and weighted.

``mask`` is BCP's: (H, W), 1 outside the pasted rectangle, 0 inside (`utils.copy_paste`).
"""

from __future__ import annotations

import torch


def masked_dice_loss(logits: torch.Tensor, labels_onehot: torch.Tensor, mask: torch.Tensor,
                     smooth: float = 1e-10) -> torch.Tensor:
    """Mean over classes c (background included) of 1 - (2 sum(p y m) + s) / (sum(p^2 m) +
    sum(y^2 m) + s), the sums over the batch and the pixels, p = softmax(logits), m the
    region's weights, s = ``smooth`` (BCP's DiceLoss with a mask).

    Args:
        logits: (N, C, H, W); labels_onehot: (N, C, H, W), one-hot or soft;
        mask: (H, W) or (N, 1, H, W) pixel weights of the region (0 or 1).
    """
    p = torch.softmax(logits.float(), dim=1)
    y = labels_onehot.float()
    m = mask.float()
    dims = (0, 2, 3)
    inter = (p * y * m).sum(dims)
    denom = (p * p * m).sum(dims) + (y * y * m).sum(dims)
    return (1.0 - (2.0 * inter + smooth) / (denom + smooth)).mean()


def masked_cross_entropy(logits: torch.Tensor, labels_onehot: torch.Tensor,
                         mask: torch.Tensor) -> torch.Tensor:
    """Pixel cross-entropy -sum_c y_c log softmax(logits)_c summed over the region's pixels of
    every slice and divided by their number (+1e-16), as BCP's masked ``CrossEntropyLoss``.
    Shapes as `masked_dice_loss`."""
    n, _, h, w = logits.shape
    m = mask.float().expand(n, 1, h, w)
    ce = -(labels_onehot.float() * torch.log_softmax(logits.float(), dim=1)).sum(1, keepdim=True)
    return (ce * m).sum() / (m.sum() + 1e-16)


def mix_loss(logits: torch.Tensor, outside: torch.Tensor, inside: torch.Tensor,
             mask: torch.Tensor, w_outside: float, w_inside: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Dice, cross-entropy) of a mixed batch: ``outside`` (N, C, H, W) are the labels of the
    region around the rectangle (``mask`` 1), ``inside`` those of the pasted rectangle; each
    region's two terms weighted by its weight (BCP: 1 for labeled, ``--u_weight`` 0.5 for
    pseudo-labeled regions). BCP's loss is (Dice + cross-entropy) / 2 of the sums."""
    rest = 1.0 - mask
    dice = (w_outside * masked_dice_loss(logits, outside, mask)
            + w_inside * masked_dice_loss(logits, inside, rest))
    ce = (w_outside * masked_cross_entropy(logits, outside, mask)
          + w_inside * masked_cross_entropy(logits, inside, rest))
    return dice, ce
