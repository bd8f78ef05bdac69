"""Class-weighted cross-entropy (``--dsc_loss 0``, METHOD §5)."""

from __future__ import annotations

import torch

# Weights used by the original code for the class counts of its datasets.
_KNOWN_WEIGHTS: dict[int, tuple[float, ...]] = {
    2: (0.1, 0.9),
    3: (0.1, 0.45, 0.45),
    4: (0.1, 0.3, 0.3, 0.3),
    8: (0.09,) + (0.13,) * 7,
}


def class_weights(num_classes: int) -> torch.Tensor:
    """Per-class cross-entropy weights, float32 tensor (num_classes,).

    2, 3, 4 and 8 classes use the original values (METHOD §5). Any other count >= 2 is an
    extension not in the original: 0.1 for background and 0.9 / (C - 1) for every foreground
    class, which reproduces the 2/3/4-class pattern (weights sum to 1).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if num_classes in _KNOWN_WEIGHTS:
        w = _KNOWN_WEIGHTS[num_classes]
    else:
        w = (0.1,) + (0.9 / (num_classes - 1),) * (num_classes - 1)
    return torch.tensor(w, dtype=torch.float32)


def weighted_cross_entropy_loss(
    logits: torch.Tensor,
    labels_onehot: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted cross-entropy in the form of the original TF code.

        loss = mean_{n,h,w} ( (sum_c w_c * y[n,c,h,w]) * (-sum_c y[n,c,h,w] * log p[n,c,h,w]) )

    with p = softmax over classes: each pixel's unweighted cross-entropy times a pixel weight
    read off its label. This is a plain mean over pixels (not normalised by the sum of the
    weights, unlike ``torch.nn.functional.cross_entropy(weight=...)``). For one-hot labels it
    equals ``-w_k log p_k`` of the true class k; for soft (deformed) labels the weight and the
    cross-entropy are two separate sums over classes, as in the original, not one sum of
    ``w_c * y_c * log p_c``.

    Args:
        logits: (N, C, H, W) unnormalised scores.
        labels_onehot: (N, C, H, W) one-hot or soft labels.
        weights: (C,) class weights; defaults to ``class_weights(C)``.

    Returns:
        Scalar float32 loss (nats).
    """
    if logits.shape != labels_onehot.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels_onehot.shape)} differ"
        )
    num_classes = logits.shape[1]
    if weights is None:
        weights = class_weights(num_classes)
    if weights.shape != (num_classes,):
        raise ValueError(f"weights shape {tuple(weights.shape)} != ({num_classes},)")
    # float32 log-softmax for stability under autocast.
    log_p = torch.log_softmax(logits.float(), dim=1)
    y = labels_onehot.float()
    w = weights.to(device=logits.device, dtype=torch.float32)
    w = w.view(1, -1, *([1] * (logits.dim() - 2)))
    pixel_weight = (w * y).sum(dim=1)
    pixel_ce = -(y * log_p).sum(dim=1)
    return (pixel_weight * pixel_ce).mean()
