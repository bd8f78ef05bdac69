"""Batch construction for joint training (METHOD §7.3): slice indexes, the slices of one
batch and the contrastive pair layout.

The indexes are computed once per pseudo-label round on the whole slice pool (one vectorised
pass), so picking a batch's slices is a few vectorised look-ups, never a Python loop.
"""

from __future__ import annotations

import torch

from utils.augment import apply_set_intensity, to_onehot
from utils.device import host_to_device
from utils.errors import DataError


def labels_present(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, C) bool: which classes occur in each slice of (N, H, W) integer labels."""
    n = labels.shape[0]
    flat = labels.reshape(n, -1).long()  # scatter_add_ indexes with int64
    counts = torch.zeros(n, num_classes, dtype=torch.long, device=labels.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat))
    return counts > 0


def slices_with_min_labels(labels: torch.Tensor, num_classes: int, min_labels: int) -> torch.Tensor:
    """Indices of slices holding at least ``min_labels`` distinct labels (background counts)."""
    return torch.nonzero(labels_present(labels, num_classes).sum(1) >= min_labels).flatten()


def slices_with_all_classes(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Indices of slices that contain every class, background included."""
    return slices_with_min_labels(labels, num_classes, num_classes)


def contrastive_index(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, bool]:
    """Slices for the contrastive term: those containing every class (METHOD §7.3).

    When no slice has every class (pseudo-labels of a weak model can lose a structure
    everywhere), falls back to the slices with the largest number of distinct labels (at least
    two), which the loss supports (absent classes contribute nothing); the flag says whether
    the fallback was used, so the caller can report it.
    """
    full = slices_with_all_classes(labels, num_classes)
    if full.numel():
        return full, True
    n_present = labels_present(labels, num_classes).sum(1)
    best = int(n_present.max()) if n_present.numel() else 0
    if best < 2:
        return full, False
    return torch.nonzero(n_present == best).flatten(), False


def pseudo_dice_index(labels: torch.Tensor, num_classes: int,
                      min_labels: int) -> tuple[torch.Tensor, bool]:
    """Pseudo-labeled slices for a segmentation loss: those with at least ``min_labels``
    distinct labels (the rule of the labeled Dice batch), else, as `contrastive_index` falls
    back, those with the most (at least two); the flag says whether the rule was met."""
    index = slices_with_min_labels(labels, num_classes, min_labels)
    if index.numel():
        return index, True
    n_present = labels_present(labels, num_classes).sum(1)
    best = int(n_present.max()) if n_present.numel() else 0
    if best < 2:
        return index, False
    return torch.nonzero(n_present == best).flatten(), False


# The original draws 15 x mtask_bs labeled slices per iteration (``shuffle_minibatch``) and
# takes the Dice and the contrastive slices from that one draw.
LABELED_DRAW_FACTOR = 15


def pair_layout(batch_pairs: int, inter_image: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of the picked slices form set 1 and set 2 of the contrastive batch.

    The picked slices are ``[L_0 .. L_{h-1}, U_0 .. U_{h-1}]`` (h = B/2 labeled, h unlabeled);
    the function returns index tensors ``first`` and ``second`` (B,) into that list, so pair i is
    (first[i], second[i]) and the network sees ``cat(picked[first], picked[second])``.

    Inter-image variant (``--local_loss_exp_no 1``); for B = 10 this is the published layout
    (METHOD §7.3)::

        (L0,L0) (L1,U1) (L2,L2) (L3,U3) (L4,U4) (U0,U0) (U0,U1) (U2,U2) (U2,U3) (U3,U4)

    Generalisation to any even B, read off that layout: in the first half, pair j is the
    same labeled slice twice when j is even and not the last, otherwise (L_j, U_j); in the
    second half, pair j is (U_{j - j mod 2}, U_j), except the last, which is (U_{h-2}, U_{h-1})
    (or (U_0, U_0) when h = 1).

    Intra-image variant (``--local_loss_exp_no 0``): both sets hold the B picked slices in
    order, so every pair is (slice, itself), as in the original.
    """
    if batch_pairs < 2 or batch_pairs % 2:
        raise ValueError(f"--bt_size={batch_pairs} must be an even number >= 2")
    if not inter_image:
        return torch.arange(batch_pairs), torch.arange(batch_pairs)
    h = batch_pairs // 2
    first, second = [], []
    for j in range(h):
        first.append(j)
        second.append(j if (j % 2 == 0 and j < h - 1) else h + j)
    for j in range(h):
        first.append(h + (j - j % 2 if j < h - 1 else max(h - 2, 0)))
        second.append(h + j)
    return torch.tensor(first), torch.tensor(second)


def draw(index: torch.Tensor, n: int, generator: torch.Generator, what: str) -> torch.Tensor:
    """``n`` entries of ``index`` drawn uniformly with replacement."""
    if index.numel() == 0:
        raise DataError(f"no {what} is available to build a joint-training batch; check the "
                        "labels of the labeled volumes and num_classes of the init file")
    pick = torch.randint(index.numel(), (n,), generator=generator)
    return index[host_to_device(pick, index.device)]


def first_eligible(
    sequence: torch.Tensor, eligible: torch.Tensor, k: int, generator: torch.Generator, what: str
) -> torch.Tensor:
    """The first ``k`` entries of ``sequence`` that are in ``eligible``, in order.

    When fewer than ``k`` occur, the rest are drawn uniformly from ``eligible``: the eligible
    entries of a longer uniform sequence would be exactly such draws. Where the original skipped
    the iteration instead, this keeps every iteration.

    Args:
        sequence: (M,) slice numbers drawn uniformly with replacement.
        eligible: (E,) slice numbers that qualify.
    Returns:
        (k,) slice numbers on ``eligible``'s device.
    """
    seq = sequence.to(eligible.device)
    found = seq[torch.isin(seq, eligible)][:k]
    if found.numel() < k:
        found = torch.cat([found, draw(eligible, k - found.numel(), generator, what)])
    return found


def pick_joint_slices(
    n_labeled: int,
    dice_index: torch.Tensor,
    lab_index: torch.Tensor,
    unl_index: torch.Tensor,
    n_seg: int,
    batch_pairs: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The slices of one joint batch (METHOD §7.3), as the original picks them.

    One draw of ``LABELED_DRAW_FACTOR * n_seg`` labeled slices, uniformly with replacement,
    gives both the ``n_seg`` Dice slices (its first slices in ``dice_index``) and the B/2
    labeled contrastive slices (its first slices in ``lab_index``); the B/2 pseudo-labeled
    contrastive slices are drawn uniformly from ``unl_index``.

    Args:
        n_labeled: number of slices in the labeled pool.
        dice_index, lab_index: labeled slices eligible for the Dice / contrastive term.
        unl_index: pseudo-labeled slices eligible for the contrastive term.
    Returns:
        dice (n_seg,), labeled (B/2,) and unlabeled (B/2,) slice numbers into their pools.
    """
    if n_labeled == 0:
        raise DataError("no labeled slice is available to build a joint-training batch")
    h = batch_pairs // 2
    sequence = torch.randint(n_labeled, (LABELED_DRAW_FACTOR * n_seg,), generator=generator)
    dice = first_eligible(sequence, dice_index, n_seg, generator,
                          "labeled slice with enough labels")
    lab = first_eligible(sequence, lab_index, h, generator, "labeled slice containing every class")
    unl = draw(unl_index, h, generator, "pseudo-labeled slice containing every class")
    return dice, lab, unl


def contrastive_sets(
    images: torch.Tensor,
    labels: torch.Tensor,
    first: torch.Tensor,
    second: torch.Tensor,
    num_classes: int,
    set_draws: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 2B images of the contrastive term and their one-hot (pseudo-)labels.

    Args:
        images: (B, 1, H, W) the picked slices ``[L_0 .. L_{h-1}, U_0 .. U_{h-1}]``: B/2
            labeled, then B/2 pseudo-labeled; labels: (B, H, W) their ground truth / pseudo-labels.
        first, second: (B,) the pair layout of :func:`pair_layout`.
        num_classes: C.
        set_draws: (2, 2) one ``utils.augment.draw_set_intensity`` per set.
    Returns:
        images (2B, 1, H, W) and labels_onehot (2B, C, H, W): set 1 then set 2, so images i and
        B + i form pair i. No spatial augmentation: each set gets its own brightness and
        contrast draw and clipping to [0, 1.5], so a same-slice pair is pixel-aligned with
        identical labels.
    """
    first, second = (host_to_device(t, images.device) for t in (first, second))
    onehot = to_onehot(labels, num_classes)
    x1 = apply_set_intensity(images[first], set_draws[0])
    x2 = apply_set_intensity(images[second], set_draws[1])
    return torch.cat([x1, x2]), torch.cat([onehot[first], onehot[second]])
