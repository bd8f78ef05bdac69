"""Each augmentation of ``utils.augment`` drawn and applied in one call, as the tests use them
(the trainers draw on the host and apply on the device separately)."""

from __future__ import annotations

import torch

from utils.augment import (
    apply_augment,
    apply_intensity,
    apply_set_intensity,
    deformation_basis,
    draw_affine,
    draw_augment,
    draw_deformation,
    draw_intensity,
    draw_set_intensity,
    warp_affine,
    warp_deformation,
)


def affine_augment(images: torch.Tensor, labels_onehot: torch.Tensor,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, H, W), (N, C, H, W) -> the same, each slice given its drawn affine choice."""
    n, _, h, w = images.shape
    return warp_affine(images, labels_onehot, *draw_affine(n, h, w, generator))


def random_deformation(images: torch.Tensor, labels_onehot: torch.Tensor, sigma: float,
                       generator: torch.Generator, k: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The slices k.. deformed by control points of std ``sigma`` pixels."""
    n, _, h, w = images.shape
    control, deformed = draw_deformation(n, sigma, generator, k)
    return warp_deformation(images, labels_onehot, control, deformed, deformation_basis(h),
                            deformation_basis(w))


def intensity_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The labeled batch's contrast (first half) and brightness (second half)."""
    return apply_intensity(images, draw_intensity(generator))


def set_intensity_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One contrastive set's brightness, contrast and clipping."""
    return apply_set_intensity(images, draw_set_intensity(generator))


def augment_batch(images: torch.Tensor, labels_onehot: torch.Tensor, generator: torch.Generator,
                  rd_en: bool = True, sigma: float = 5.0, ri_en: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine, then deformation (``rd_en``), then intensity (``ri_en``)."""
    n, _, h, w = images.shape
    return apply_augment(images, labels_onehot, draw_augment(n, h, w, generator, rd_en, sigma,
                                                             ri_en), rd_en, ri_en)
