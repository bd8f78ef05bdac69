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
from utils.crf import CRFParams, CRFPool, PendingLabels
from utils.errors import ConfigError
from utils.evaluation import dice_per_class, mean_foreground_dice, predict_slices


@dataclass
class PseudoLabelRound:
    """Result of one pseudo-labelling pass.

    images: (N, 1, H, W) slices of the kept volumes; labels: (N, H, W) CRF-refined labels;
    kept: ids of the kept volumes; dice_before_crf / dice_after_crf: mean foreground Dice
    against ground truth over kept volumes (None when no ground truth exists); unsure_foreground:
    share of the kept volumes' predicted foreground pixels (argmax before the CRF) whose max
    softmax is below ``SURE_SOFTMAX`` (the CRF erodes a thin structure unless the network is
    saturated up to its boundary); before_crf: (N, H, W) the network's argmax the CRF started
    from, for the round's figure (None without the CRF, where it is ``labels``; checkpoints
    leave it out).
    """

    images: torch.Tensor
    labels: torch.Tensor
    kept: list[str]
    dropped: list[str] = field(default_factory=list)
    dice_before_crf: float | None = None
    dice_after_crf: float | None = None
    overlap: dict[str, float] = field(default_factory=dict)
    unsure_foreground: float | None = None
    before_crf: torch.Tensor | None = None


# A foreground pixel counts as sure when its max softmax reaches this.
SURE_SOFTMAX = 0.99


@dataclass(frozen=True)
class OverlapTransform:
    """One test-time augmentation of the overlap check (METHOD §7.2), shared by all slices of
    a volume: ``choice`` is AFF_ROTATE, AFF_SCALE or AFF_FLIP (left-right, along W);
    ``rot_deg`` (degrees) and ``scale`` (zoom factor) are used only by their own choice."""

    choice: int
    rot_deg: float
    scale: float

    def matrix(self, n: int, h: int, w: int) -> torch.Tensor:
        """(n, 2, 3) ``affine_grid`` matrices of this transform for (n, 1, h, w) slices."""
        theta = affine_matrices(torch.tensor([self.choice]),
                                torch.tensor([self.rot_deg], dtype=torch.float64),
                                torch.tensor([self.scale], dtype=torch.float64),
                                torch.tensor([True]), torch.zeros(1, dtype=torch.long), h, w)
        return theta.expand(n, 2, 3)


def draw_overlap_transform(generator: torch.Generator) -> OverlapTransform:
    """Rotation U(-30, 30) deg, scaling U(0.9, 1.1) rounded to 2 decimals, or a left-right flip,
    one of the three uniformly, as the original's test-time augmentation. All three values are
    drawn every time, so the generator advances by the same amount whatever the choice."""
    choice = (AFF_ROTATE, AFF_SCALE, AFF_FLIP)[int(torch.randint(3, (1,), generator=generator))]
    rot = float(torch.empty(1, dtype=torch.float64).uniform_(-30, 30, generator=generator))
    scale = float(torch.empty(1, dtype=torch.float64).uniform_(0.9, 1.1, generator=generator))
    return OverlapTransform(choice, rot, round(scale, 2))


def draw_overlap_pair(generator: torch.Generator) -> tuple[OverlapTransform, OverlapTransform]:
    """The two transforms of one overlap check. The second is redrawn while both are flips:
    two flips see the same image, so their predictions would agree trivially."""
    first, second = draw_overlap_transform(generator), draw_overlap_transform(generator)
    while first.choice == AFF_FLIP and second.choice == AFF_FLIP:
        second = draw_overlap_transform(generator)
    return first, second


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
    each mapped back to the original frame (`mean_foreground_dice`: NaN when neither
    predicts a structure). images: (Z, 1, H, W)."""
    preds = []
    for transform in draw_overlap_pair(generator):
        theta = transform.matrix(images.shape[0], *images.shape[2:])
        probs = predict_slices(model, _warp(images.to(device), theta), device)
        back = _warp(probs, _invert(theta))
        back[:, 0] += (back.sum(1) < 0.5).float()  # outside the warped view: background
        preds.append(back.argmax(1))
    return mean_foreground_dice(preds[0], preds[1], num_classes)


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
    use_crf: bool = True,
    crf_workers: int = 1,
) -> PseudoLabelRound:
    """Pseudo-label every pool volume.

    Args:
        volumes: id -> (images (Z, 1, H, W) cropped slices, ground truth (Z, H, W) or None).
        use_crf: refine with the dense CRF (``--crf 1``, the original); else the argmax.
        crf_workers: processes refining slices with the CRF (`utils.crf.CRFPool`); 1 refines
            them in this process, one after another. The labels are the same either way. On
            a GPU the processes refine a volume while the network predicts the next one.
    """
    from tqdm import tqdm

    kept, dropped, overlap = [], [], {}
    # Per kept volume: images, ground truth, argmax before the CRF, and labels (the argmax, or
    # the CRF pool's pending result).
    rows: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor,
                     torch.Tensor | PendingLabels]] = []
    n_fg = n_unsure = 0
    with CRFPool(crf_params, crf_workers if use_crf else 1,
                 eager=device.type == "cuda") as pool:
        for sid, (images, gt) in tqdm(volumes.items(), desc="pseudo-labels",
                                      disable=not progress, leave=False):
            if test_aug_overlap:
                overlap[sid] = augmentation_overlap(model, images, num_classes, device,
                                                    generator)
                if not overlap[sid] > overlap_threshold:  # NaN fails too, as the original's
                    dropped.append(sid)
                    continue
            probs = predict_slices(model, images, device)
            top, argmax = probs.max(1)
            fg = argmax > 0
            n_fg += int(fg.sum())
            n_unsure += int((fg & (top < SURE_SOFTMAX)).sum())
            argmax = argmax.cpu()
            labels = pool.refine(images[:, 0].numpy(), probs.cpu().numpy()) if use_crf \
                else argmax
            rows.append((images, gt, argmax, labels))
            kept.append(sid)
        if not kept:
            raise ConfigError(
                f"no unlabeled volume passed the augmentation-overlap test (threshold "
                f"{overlap_threshold}); lower --test_f1_threshold or use --test_aug_overlap 0"
            )
        kept_lbl = [torch.from_numpy(lbl.result()) if isinstance(lbl, PendingLabels) else lbl
                    for *_, lbl in rows]
    dice_raw, dice_crf = [], []
    for (_, gt, argmax, _), labels in zip(rows, kept_lbl, strict=True):
        if gt is not None:
            dice_raw.append(float(dice_per_class(argmax, gt, num_classes).mean()))
            dice_crf.append(float(dice_per_class(labels, gt, num_classes).mean()))
    return PseudoLabelRound(
        images=torch.cat([images for images, _, _, _ in rows]),
        labels=torch.cat(kept_lbl).to(torch.uint8),  # as the labeled pool (load_slices)
        kept=kept,
        dropped=dropped,
        dice_before_crf=float(np.mean(dice_raw)) if dice_raw else None,
        dice_after_crf=float(np.mean(dice_crf)) if dice_crf else None,
        overlap=overlap,
        unsure_foreground=n_unsure / n_fg if n_fg else None,
        before_crf=torch.cat([argmax.to(torch.uint8) for _, _, argmax, _ in rows])
        if use_crf else None,
    )
