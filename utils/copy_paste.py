"""Bidirectional copy-paste of BCP (Bai et al., CVPR 2023; DeepMed-Lab-ECNU/BCP
code/ACDC_BCP_train.py): a rectangle of one slice pasted into another, its mask, the mixing of
images and labels, and the teacher's pseudo-labels (argmax, largest connected component).

Mask convention (BCP's): ``mask`` (H, W) float is 1 outside the rectangle and 0 inside it;
``mix(a, b, mask)`` = a * mask + b * (1 - mask) keeps ``a`` around the rectangle and pastes
``b``'s rectangle into it.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.measure import label as connected_components


def draw_box(height: int, width: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """The rectangle of one iteration (one for the whole batch, as BCP's ``generate_mask``):
    (4,) long CPU tensor (top, left, box height, box width), the box int(ratio * side) pixels
    per side, its corner uniform in [0, side - box) (numpy's randint, exclusive, as BCP's)."""
    bh, bw = int(height * ratio), int(width * ratio)
    if not (0 < bh < height and 0 < bw < width):
        raise ValueError(f"a box of ratio {ratio} does not fit a {height}x{width} slice")
    top = torch.randint(0, height - bh, (1,), generator=generator)
    left = torch.randint(0, width - bw, (1,), generator=generator)
    return torch.cat([top, left, torch.tensor([bh, bw])])


def box_mask(box: torch.Tensor, height: int, width: int,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """(H, W) float32 mask of ``box`` (`draw_box`): 0 inside the rectangle, 1 outside."""
    top, left, bh, bw = (int(v) for v in box)
    mask = torch.ones(height, width, device=device)
    mask[top:top + bh, left:left + bw] = 0.0
    return mask


def mix(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """a * mask + b * (1 - mask): ``a`` outside the rectangle, ``b`` inside.

    Args:
        a, b: (N, K, H, W), images (K = 1) or one-hot labels (K = C).
        mask: (H, W) of `box_mask`, the same for every slice.
    """
    if a.shape != b.shape:
        raise ValueError(f"mixed tensors differ: {tuple(a.shape)} and {tuple(b.shape)}")
    return a * mask + b * (1.0 - mask)


def largest_component_per_class(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Each foreground class of each slice cut to its largest connected component (8-connected,
    skimage's default in 2D; the first in raster order among equals), the rest background, as
    BCP's ``get_ACDC_2DLargestCC``.

    Args:
        labels: (N, H, W) integer class maps (any device).

    Returns:
        (N, H, W) long, on ``labels``' device.
    """
    maps = labels.detach().cpu().numpy()
    out = np.zeros(maps.shape, dtype=np.int64)
    for n, seg in enumerate(maps):
        for c in range(1, num_classes):
            comp = connected_components(seg == c)
            if comp.max() == 0:
                continue
            largest = np.argmax(np.bincount(comp.ravel())[1:]) + 1
            out[n][comp == largest] = c
    return torch.from_numpy(out).to(labels.device)


@torch.no_grad()
def teacher_pseudo_labels(teacher: torch.nn.Module, images: torch.Tensor,
                          num_classes: int) -> torch.Tensor:
    """BCP's pseudo-labels of ``images`` (N, 1, H, W): the teacher's argmax (it runs as it is,
    in training mode as in BCP), each class cut to its largest component; (N, H, W) long."""
    logits = teacher(images.contiguous(memory_format=torch.channels_last))
    return largest_component_per_class(logits.argmax(1), num_classes)
