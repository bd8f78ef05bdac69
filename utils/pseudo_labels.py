"""Pseudo-labels of the unlabeled pool (METHOD §7.2): predict, refine with the dense CRF, select.

Quality is measured whenever the pool volumes carry ground truth (ACDC and the demo do): the
mean foreground Dice of the pseudo-labels against it, before and after the CRF, in the cropped
grid. The original never showed this; it tells whether self-training is being fed good labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from utils.augment import AFF_FLIP, AFF_ROTATE, AFF_SCALE, affine_matrices
from utils.crf import CRFParams, crf_refine_volume
from utils.evaluation import dice_per_class, predict_slices


@dataclass
class PseudoLabelRound:
    """Result of one pseudo-labelling pass.

    images: (N, 1, H, W) slices of the kept volumes; labels: (N, H, W) CRF-refined labels;
    kept: ids of the kept volumes; dice_before_crf / dice_after_crf: mean foreground Dice
    against ground truth over kept volumes (None when no ground truth exists).
    """

    images: torch.Tensor
    labels: torch.Tensor
    kept: list[str]
    dropped: list[str] = field(default_factory=list)
    dice_before_crf: float | None = None
    dice_after_crf: float | None = None
    overlap: dict[str, float] = field(default_factory=dict)


def _random_test_transform(n: int, h: int, w: int, generator: torch.Generator) -> torch.Tensor:
    """One (2, 3) affine per call, shared by all slices of a volume: rotation U(-30, 30) deg,
    scaling U(0.9, 1.1) or a left-right flip (METHOD §7.2, test-time augmentation)."""
    choice = [AFF_ROTATE, AFF_SCALE, AFF_FLIP][int(torch.randint(3, (1,), generator=generator))]
    rot = torch.empty(1, dtype=torch.float64).uniform_(-30, 30, generator=generator)
    scale = torch.empty(1, dtype=torch.float64).uniform_(0.9, 1.1, generator=generator)
    theta = affine_matrices(torch.tensor([choice]), rot, scale, torch.tensor([True]),
                            torch.zeros(1, dtype=torch.long), h, w)
    return theta.expand(n, 2, 3)


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _invert(theta: torch.Tensor) -> torch.Tensor:
    full = torch.cat([theta.double(), theta.new_tensor([0, 0, 1]).double().expand(
        theta.shape[0], 1, 3)], 1)
    return torch.linalg.inv(full)[:, :2].float()


def augmentation_overlap(
    model: torch.nn.Module,
    images: torch.Tensor,
    num_classes: int,
    device: torch.device,
    generator: torch.Generator,
) -> float:
    """Mean foreground Dice between the predictions of two random augmentations of a volume,
    each mapped back to the original frame. images: (Z, 1, H, W)."""
    preds = []
    for _ in range(2):
        theta = _random_test_transform(images.shape[0], *images.shape[2:], generator)
        probs = predict_slices(model, _warp(images.to(device), theta), device)
        back = _warp(probs, _invert(theta))
        back[:, 0] += (back.sum(1) < 0.5).float()  # outside the warped view: background
        preds.append(back.argmax(1))
    return float(dice_per_class(preds[0], preds[1], num_classes).mean())


def make_pseudo_labels(
    model: torch.nn.Module,
    volumes: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
    num_classes: int,
    crf_params: CRFParams,
    device: torch.device,
    generator: torch.Generator,
    test_aug_overlap: bool = False,
    overlap_threshold: float = 0.9,
    progress: bool = True,
) -> PseudoLabelRound:
    """Pseudo-label every pool volume.

    Args:
        volumes: id -> (images (Z, 1, H, W) cropped slices, ground truth (Z, H, W) or None).
    """
    from tqdm import tqdm

    kept_img, kept_lbl, kept, dropped, overlap = [], [], [], [], {}
    dice_raw, dice_crf = [], []
    for sid, (images, gt) in tqdm(volumes.items(), desc="pseudo-labels", disable=not progress,
                                  leave=False):
        if test_aug_overlap:
            overlap[sid] = augmentation_overlap(model, images, num_classes, device, generator)
            if overlap[sid] <= overlap_threshold:
                dropped.append(sid)
                continue
        probs = predict_slices(model, images, device)
        labels = torch.from_numpy(crf_refine_volume(images[:, 0].numpy(), probs.cpu().numpy(),
                                                    crf_params))
        kept_img.append(images)
        kept_lbl.append(labels)
        kept.append(sid)
        if gt is not None:
            dice_raw.append(float(dice_per_class(probs.argmax(1).cpu(), gt, num_classes).mean()))
            dice_crf.append(float(dice_per_class(labels, gt, num_classes).mean()))
    if not kept:
        raise ValueError(
            f"no unlabeled volume passed the augmentation-overlap test (threshold "
            f"{overlap_threshold}); lower --test_f1_threshold or use --test_aug_overlap 0"
        )
    return PseudoLabelRound(
        images=torch.cat(kept_img),
        labels=torch.cat(kept_lbl).to(torch.uint8),  # as the labeled pool (load_slices)
        kept=kept,
        dropped=dropped,
        dice_before_crf=float(np.mean(dice_raw)) if dice_raw else None,
        dice_after_crf=float(np.mean(dice_crf)) if dice_crf else None,
        overlap=overlap,
    )
