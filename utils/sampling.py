"""Batch construction for joint training (METHOD §7.3): slice indexes and the pair layout.

The indexes are computed once per pseudo-label round on the whole slice pool (one vectorised
pass), so drawing a batch is a single ``torch.randint`` into them, never rejection sampling.
"""

from __future__ import annotations

import torch

from utils.augment import affine_augment, set_intensity_augment, to_onehot
from utils.device import host_to_device


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


def pair_layout(batch_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of the picked slices form set 1 and set 2 of the contrastive batch.

    The picked slices are ``[L_0 .. L_{h-1}, U_0 .. U_{h-1}]`` (h = B/2 labeled, h unlabeled);
    the function returns index tensors ``first`` and ``second`` (B,) into that list, so pair i is
    (first[i], second[i]) and the network sees ``cat(picked[first], picked[second])``.

    For B = 10 this is the published layout (METHOD §7.3)::

        (L0,L0) (L1,U1) (L2,L2) (L3,U3) (L4,U4) (U0,U0) (U0,U1) (U2,U2) (U2,U3) (U3,U4)

    Generalisation to any even B, read off that layout: in the first half, pair j is the
    same labeled slice twice when j is even and not the last, otherwise (L_j, U_j); in the
    second half, pair j is (U_{j - j mod 2}, U_j), except the last, which is (U_{h-2}, U_{h-1})
    (or (U_0, U_0) when h = 1).
    """
    if batch_pairs < 2 or batch_pairs % 2:
        raise ValueError(f"--bt_size={batch_pairs} must be an even number >= 2")
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
        raise ValueError(f"no {what} is available to build a joint-training batch")
    pick = torch.randint(index.numel(), (n,), generator=generator)
    return index[host_to_device(pick, index.device)]


def contrastive_batch(
    lab_images: torch.Tensor,
    lab_labels: torch.Tensor,
    lab_index: torch.Tensor,
    unl_images: torch.Tensor,
    unl_labels: torch.Tensor,
    unl_index: torch.Tensor,
    batch_pairs: int,
    num_classes: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 2B images of the contrastive term and their one-hot (pseudo-)labels.

    Args:
        lab_images, unl_images: (N, 1, H, W) slice pools; lab_labels, unl_labels: (N, H, W).
        lab_index, unl_index: slices that contain every class (`slices_with_all_classes`).
    Returns:
        images (2B, 1, H, W) and labels_onehot (2B, C, H, W): set 1 then set 2, so images i and
        B + i form pair i. Each set is augmented on its own: a per-slice affine choice of
        METHOD §6 (so same-slice pairs differ by augmentation), then one brightness/contrast
        draw for the whole set and clipping to [0, 1.5] (METHOD §7.3).
    """
    h = batch_pairs // 2
    li = draw(lab_index, h, generator, "labeled slice containing every class")
    ui = draw(unl_index, h, generator, "pseudo-labeled slice containing every class")
    images = torch.cat([lab_images[li], unl_images[ui]])
    onehot = to_onehot(torch.cat([lab_labels[li], unl_labels[ui]]), num_classes)
    first, second = pair_layout(batch_pairs)
    sets_img, sets_lbl = [], []
    for idx in (first, second):
        img, lbl = affine_augment(images[idx], onehot[idx], generator)
        sets_img.append(set_intensity_augment(img, generator))
        sets_lbl.append(lbl)
    return torch.cat(sets_img), torch.cat(sets_lbl)
