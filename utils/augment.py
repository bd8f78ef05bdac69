"""Batched data augmentation for 2D slices (METHOD §6 and §7.3).

Everything here works on whole batches with one ``grid_sample`` call per warp, on the device of
the input tensors. Random numbers always come from an explicit CPU ``torch.Generator`` and are
moved to the data device afterwards, so a run is reproducible from its seed whatever the device.

Each augmentation is two halves: ``draw_*`` makes every random choice on the host, as tensors of
fixed shape (``AugmentDraws``), and ``apply_*`` / ``warp_*`` applies them with tensor operations
whose shapes do not depend on the draws, so a CUDA graph can capture them
(``utils.captured_step``). ``draw_augment`` and ``apply_augment`` are the labeled batch's
whole augmentation (METHOD §6): affine, then deformation, then intensity.

Layouts:
    images:         (N, 1, H, W) float32, normalised intensities (roughly [0, 1]).
    labels_onehot:  (N, C, H, W) float32, channel 0 = background.

Geometry conventions (shared by every warp in this module):
    * ``align_corners=True`` everywhere, so normalised -1 / +1 are the centres of the first and
      last pixels. Rotations and scalings are about the array centre ((W-1)/2, (H-1)/2), which
      makes flips and multiples of 90 degrees map pixel centres onto pixel centres; the label
      (nearest) then equals ``torch.flip`` / ``torch.rot90`` exactly.
    * A positive rotation angle turns the content counter-clockwise as displayed (row 0 at the
      top), i.e. a rotation by 90 degrees equals ``torch.rot90(x, 1, dims=(-2, -1))``.
    * Displacements are in pixels, channel 0 along W (x, columns), channel 1 along H (y, rows);
      the warped image at pixel p samples the input at p + displacement(p) (backward mapping).
"""

from __future__ import annotations

import argparse
import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from skimage.transform import resize

from utils.device import host_to_device

# Per-slice affine choices (drawn uniformly from these five).
AFF_ROTATE = 0  # rotation by U(-15, 15) degrees
AFF_SCALE = 1  # isotropic scaling by U(0.95, 1.05), rounded to 2 decimals
AFF_FLIP = 2  # left-right flip with probability 1/2
AFF_ROT45 = 3  # rotation by k * 45 degrees, k in {0..7}
AFF_NONE = 4  # identity
N_AFFINE_CHOICES = 5

# Slices whose maximum is at most this are treated as empty (padding) and left untouched.
EMPTY_SLICE_MAX = 1e-3

# Largest k of the random deformation (slices k.. are deformed), as in the original batch of 20.
DEFORM_MAX_K = 18


def to_onehot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Integer label maps to one-hot.

    Args:
        labels: (N, H, W) integer class indices in [0, num_classes).
        num_classes: C, number of classes including background.

    Returns:
        (N, C, H, W) float32 one-hot tensor on the device of ``labels``.
    """
    return F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).to(torch.float32)


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """(n,) float64 CPU samples of U(low, high) drawn from ``generator``."""
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def _two_uniforms(generator: torch.Generator, coupled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (1,) float64 U(0, 1) samples; ``coupled``: one sample twice (see `draw_intensity`)."""
    u = _uniform(1, 0.0, 1.0, generator)
    return u, (u if coupled else _uniform(1, 0.0, 1.0, generator))


def _pixel_to_norm_scale(height: int, width: int) -> tuple[float, float]:
    """Half-extent in pixels of the normalised [-1, 1] range for align_corners=True, (sx, sy)."""
    if height < 2 or width < 2:
        raise ValueError(f"slices must be at least 2x2 pixels, got {height}x{width}")
    return (width - 1) / 2.0, (height - 1) / 2.0


class AffineParams(NamedTuple):
    """Per-slice affine parameters, all (N,) CPU tensors (see :func:`affine_matrices`)."""

    choice: torch.Tensor  # long, one of the AFF_* constants
    rot_deg: torch.Tensor  # float64, degrees
    scale: torch.Tensor  # float64, zoom factor
    flip: torch.Tensor  # bool
    k45: torch.Tensor  # long in {0..7}


def sample_affine_params(n: int, generator: torch.Generator) -> AffineParams:
    """Draw the affine parameters of n slices (METHOD §6 step 1).

    All parameters are drawn for every slice, whatever its choice, so the generator advances by
    the same amount for any outcome.

    Args:
        n: number of slices N.
        generator: CPU generator.

    Returns:
        AffineParams of (N,) CPU tensors: choice uniform over the five AFF_* values, rot_deg
        U(-15, 15), scale U(0.95, 1.05) rounded to 2 decimals, flip with probability 1/2,
        k45 uniform in {0..7}.
    """
    choice = torch.randint(0, N_AFFINE_CHOICES, (n,), generator=generator)
    rot_deg = _uniform(n, -15.0, 15.0, generator)
    scale = torch.round(_uniform(n, 0.95, 1.05, generator) * 100.0) / 100.0
    flip = torch.rand(n, generator=generator) < 0.5
    k45 = torch.randint(0, 8, (n,), generator=generator)
    return AffineParams(choice, rot_deg, scale, flip, k45)


def affine_matrices(
    choice: torch.Tensor,
    rot_deg: torch.Tensor,
    scale: torch.Tensor,
    flip: torch.Tensor,
    k45: torch.Tensor,
    height: int,
    width: int,
) -> torch.Tensor:
    """Per-slice ``affine_grid`` matrices for the five affine choices.

    Only the parameter belonging to each slice's choice is used; the others are ignored, so
    callers can draw all parameters for all slices and keep the number of random draws fixed.

    Args:
        choice: (N,) long, one of AFF_ROTATE, AFF_SCALE, AFF_FLIP, AFF_ROT45, AFF_NONE.
        rot_deg: (N,) rotation angle in degrees for AFF_ROTATE (positive = counter-clockwise
            as displayed).
        scale: (N,) zoom factor for AFF_SCALE (> 1 enlarges the content; output size is kept,
            as a rescale followed by a centre crop/pad).
        flip: (N,) bool, whether AFF_FLIP actually flips left-right.
        k45: (N,) long in {0..7}, AFF_ROT45 rotates by k45 * 45 degrees.
        height: H in pixels.
        width: W in pixels.

    Returns:
        (N, 2, 3) float32 matrices in normalised coordinates for ``F.affine_grid`` with
        ``align_corners=True``; they map output coordinates to input coordinates.
    """
    dev = choice.device
    choice = choice.long()
    rot = torch.deg2rad(host_to_device(rot_deg, dev).to(torch.float64))
    # Exact table for multiples of 45 degrees: cos/sin of 90-degree multiples must be exactly
    # 0/±1 so that the label warp reproduces torch.rot90 bit for bit.
    r = math.sqrt(0.5)
    table = torch.tensor([[1.0, r, 0.0, -r, -1.0, -r, 0.0, r], [0.0, r, 1.0, r, 0.0, -r, -1.0, -r]],
                         dtype=torch.float64)
    cos45, sin45 = host_to_device(table, dev)
    k = host_to_device(k45, dev).long() % 8

    one = torch.ones(choice.shape, dtype=torch.float64, device=dev)
    zero = torch.zeros_like(one)
    inv_scale = 1.0 / host_to_device(scale, dev).to(torch.float64)
    flip_sign = torch.where(host_to_device(flip, dev).bool(), -one, one)

    # Matrix [[a, b], [c, d]] in centred pixel coordinates (x right, y down), output -> input.
    # For a content rotation by +t the sampling matrix is [[cos t, -sin t], [sin t, cos t]].
    is_rot = choice == AFF_ROTATE
    is_scale = choice == AFF_SCALE
    is_flip = choice == AFF_FLIP
    is_rot45 = choice == AFF_ROT45
    cos_t = torch.where(is_rot, torch.cos(rot), torch.where(is_rot45, cos45[k], one))
    sin_t = torch.where(is_rot, torch.sin(rot), torch.where(is_rot45, sin45[k], zero))
    a = torch.where(is_scale, inv_scale, torch.where(is_flip, flip_sign, cos_t))
    d = torch.where(is_scale, inv_scale, cos_t)
    b = -sin_t
    c = sin_t

    # Conjugate by the pixel<->normalised scaling so that rotations stay rigid on non-square
    # slices (normalised x and y have different pixel sizes there).
    sx, sy = _pixel_to_norm_scale(height, width)
    theta = torch.stack(
        [
            torch.stack([a, b * (sy / sx), zero], dim=-1),
            torch.stack([c * (sx / sy), d, zero], dim=-1),
        ],
        dim=-2,
    )
    return theta.to(torch.float32)


def apply_affine(
    images: torch.Tensor, labels_onehot: torch.Tensor, theta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp images (bilinear) and one-hot labels (nearest) with per-slice affine matrices.

    Outside the input the image is 0 and the label is background.

    Args:
        images: (N, 1, H, W) float.
        labels_onehot: (N, C, H, W) float one-hot, channel 0 = background.
        theta: (N, 2, 3) matrices as returned by :func:`affine_matrices`.

    Returns:
        (images, labels_onehot) with the input shapes; the labels stay exactly one-hot.
    """
    n, _, h, w = images.shape
    theta = theta.to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=True)
    img = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    lab = F.grid_sample(
        labels_onehot, grid, mode="nearest", padding_mode="zeros", align_corners=True
    )
    # Nearest sampling picks one source pixel for all channels, so a pixel is either a copy of a
    # one-hot vector or all zeros (outside the input); the latter becomes background.
    outside = (lab.sum(dim=1, keepdim=True) == 0).to(lab.dtype)
    lab = torch.cat([lab[:, :1] + outside, lab[:, 1:]], dim=1)
    return img, lab


def draw_affine(n: int, height: int, width: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The random per-slice affine augmentation (METHOD §6 step 1): (N, 2, 3) float32
    matrices (:func:`affine_matrices` of :func:`sample_affine_params`) and (N,) bool, the
    slices whose choice is an identity (kept bit for bit). CPU tensors.

    Each slice gets one of five choices uniformly: rotation U(-15, 15) degrees; scaling
    U(0.95, 1.05) rounded to 2 decimals about the centre (same output size); left-right flip
    with probability 1/2; rotation by k*45 degrees, k in {0..7}; nothing. A fixed number of
    draws per slice."""
    choice, rot_deg, scale, flip, k45 = sample_affine_params(n, generator)
    theta = affine_matrices(choice, rot_deg, scale, flip, k45, height, width)
    identity = ((choice == AFF_NONE) | ((choice == AFF_FLIP) & ~flip)
                | ((choice == AFF_ROT45) & (k45 == 0)) | ((choice == AFF_SCALE) & (scale == 1.0)))
    return theta, identity


def warp_affine(images: torch.Tensor, labels_onehot: torch.Tensor, theta: torch.Tensor,
                identity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply :func:`draw_affine`'s draws: :func:`apply_affine` with ``theta`` (N, 2, 3),
    except that identity slices (``identity`` (N,) bool) and empty slices (max <= 0.001) keep
    their input bit for bit. Same shapes and device as the input; labels stay one-hot."""
    n = images.shape[0]
    img, lab = apply_affine(images, labels_onehot, host_to_device(theta, images.device))
    # Identity outcomes keep the exact input (grid_sample at pixel centres is only exact up to
    # rounding), and empty slices are never touched.
    keep = (host_to_device(identity, images.device)
            | (images.amax(dim=(1, 2, 3)) <= EMPTY_SLICE_MAX)).view(n, 1, 1, 1)
    return torch.where(keep, images, img), torch.where(keep, labels_onehot, lab)


# A constant of the crop size, asked for at every draw: computed once per size.
@functools.lru_cache(maxsize=8)
def deformation_basis(size: int, grid: int = 3) -> torch.Tensor:
    """(size, grid) float32 weights that upsample ``grid`` control values to ``size`` pixels
    along one axis as the original did, with ``skimage.transform.resize(order=3,
    mode='reflect')``: the interpolating cubic spline through the values placed at the centres
    of ``grid`` equal cells (pixel-centre alignment), mirrored beyond the outer centres. Built
    by resizing unit vectors without resize's clipping, which is not linear
    (`upsample_displacements` clips)."""
    unit = np.eye(grid)
    columns = [resize(unit[j], (size,), order=3, mode="reflect", clip=False) for j in range(grid)]
    return torch.from_numpy(np.stack(columns, axis=1)).float()


def upsample_displacements(control: torch.Tensor, basis_h: torch.Tensor,
                           basis_w: torch.Tensor) -> torch.Tensor:
    """Upsample coarse control-point displacements to a dense field, exactly as the original's
    ``skimage.transform.resize(grid, (H, W), order=3, mode='reflect')`` of each grid: the
    separable spline ``basis_h @ grid @ basis_w.T``, clipped to the grid's own minimum and
    maximum (resize clips its output to the input's range by default).

    Args:
        control: (M, 2, gh, gw) displacements in pixels at the control points (channel 0 = x
            along W, channel 1 = y along H).
        basis_h: (H, gh) from `deformation_basis`; basis_w: (W, gw).

    Returns:
        (M, 2, H, W) dense displacement field in pixels.
    """
    field = torch.einsum("hi,mcij,wj->mchw", basis_h, control, basis_w)
    low = control.amin(dim=(-2, -1), keepdim=True)
    high = control.amax(dim=(-2, -1), keepdim=True)
    return torch.clamp(field, low, high)


def dense_warp(
    images: torch.Tensor, labels_onehot: torch.Tensor, displacement: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp images and one-hot labels by a dense displacement field, bilinear for both.

    Output pixel p samples the input at p + displacement(p). Samples beyond the border take the
    nearest border value ('border' padding, the clamping of TensorFlow's dense_image_warp used by
    the original). For the label this also keeps the bilinear weights a partition of unity, so
    the soft label still sums to 1 per pixel (zeros padding would leak probability mass).

    Args:
        images: (M, 1, H, W) float.
        labels_onehot: (M, C, H, W) float, summing to 1 over channels.
        displacement: (M, 2, H, W) in pixels, channel 0 along W (x), channel 1 along H (y).

    Returns:
        (images, labels) of the input shapes; labels are soft, in [0, 1], summing to 1.
    """
    m, c_img, h, w = images.shape
    sx, sy = _pixel_to_norm_scale(h, w)
    dev, dt = images.device, images.dtype
    ys = torch.arange(h, device=dev, dtype=dt).view(1, h, 1)
    xs = torch.arange(w, device=dev, dtype=dt).view(1, 1, w)
    disp = displacement.to(device=dev, dtype=dt)
    gx = (xs + disp[:, 0]) / sx - 1.0
    gy = (ys + disp[:, 1]) / sy - 1.0
    grid = torch.stack([gx, gy], dim=-1)
    both = torch.cat([images, labels_onehot.to(dt)], dim=1)
    out = F.grid_sample(both, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out[:, :c_img], out[:, c_img:]


def draw_deformation(n: int, sigma: float, generator: torch.Generator,
                     k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The random smooth deformation of the slices k.. of the batch (METHOD §6 step 2):
    (N, 2, 3, 3) float32 control-point displacements in pixels, N(0, sigma^2) (zero for the
    slices before k), and (N,) bool, the deformed slices k... CPU tensors.

    k (in [0, N]) is drawn uniformly from {1, ..., 18} and clamped to N-1 (with N == 1 nothing
    is deformed) unless given. :func:`warp_deformation` upsamples the two 3x3 grids to H x W;
    the label becomes soft but still sums to 1 per pixel."""
    if k is None:
        if n <= 1:
            k = n
        else:
            k = min(int(torch.randint(1, DEFORM_MAX_K + 1, (1,), generator=generator)), n - 1)
    elif not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    control = torch.zeros((n, 2, 3, 3), dtype=torch.float32)
    if k < n:
        control[k:] = torch.randn((n - k, 2, 3, 3), generator=generator,
                                  dtype=torch.float32) * sigma
    return control, torch.arange(n) >= k


def warp_deformation(images: torch.Tensor, labels_onehot: torch.Tensor, control: torch.Tensor,
                     deformed: torch.Tensor, basis_h: torch.Tensor, basis_w: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply :func:`draw_deformation`'s draws: warp every slice by its ``control``
    (N, 2, 3, 3) upsampled with ``basis_h`` (H, 3) and ``basis_w`` (W, 3)
    (`deformation_basis`) and keep the result where ``deformed`` (N,) bool, the input
    elsewhere (every slice is warped so that the shapes do not depend on the draw)."""
    dev = images.device
    disp = upsample_displacements(host_to_device(control, dev), host_to_device(basis_h, dev),
                                  host_to_device(basis_w, dev))
    img_d, lab_d = dense_warp(images, labels_onehot, disp)
    keep = ~host_to_device(deformed, images.device).view(-1, 1, 1, 1)
    # torch.where may lay the result out channels-last, and the loss's sums over a different
    # memory order round differently: keep the (N, C, H, W) layout of the input.
    return (torch.where(keep, images, img_d).contiguous(),
            torch.where(keep, labels_onehot, lab_d).contiguous())


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Contrast change about each image's own mean, as ``tf.image.adjust_contrast``.

    Args:
        images: (N, 1, H, W) float.
        factor: a scalar (a number or 0-d tensor) or (N,) contrast factors.

    Returns:
        (N, 1, H, W): (x - mean) * factor + mean, the mean over each image's pixels.
    """
    mean = images.mean(dim=(-2, -1), keepdim=True)
    if isinstance(factor, torch.Tensor) and factor.dim() > 0:
        factor = factor.to(device=images.device, dtype=images.dtype).view(-1, 1, 1, 1)
    return (images - mean) * factor + mean


def draw_intensity(generator: torch.Generator, coupled: bool = True) -> torch.Tensor:
    """The random contrast / brightness of the labeled batch (METHOD §6 step 3, the
    original's ``contrast_net``): (2,) float32, one contrast factor U(0.8, 1.2) for the whole
    batch and one brightness shift U(-0.1, 0.1) (normalised intensity units), in that order
    (two draws per call); :func:`apply_intensity` applies them. ``coupled`` (the
    original): both from one uniform u, 0.8 + 0.4u and -0.1 + 0.2u, as the released graph's
    two TF ops, seeded alike, drew the same u; else a draw each."""
    u, v = _two_uniforms(generator, coupled)
    return torch.cat([0.8 + 0.4 * u, -0.1 + 0.2 * v]).to(torch.float32)


def apply_intensity(images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) images with ``draws`` (2,) of :func:`draw_intensity`: the contrast
    factor applied about each image's mean to the first N // 2 slices, the shift added to the
    rest. No clipping."""
    half = images.shape[0] // 2
    contrast, shift = host_to_device(draws, images.device).to(images.dtype)
    return torch.cat([adjust_contrast(images[:half], contrast), images[half:] + shift])


class AugmentDraws(NamedTuple):
    """Every random choice of one labeled batch of N slices (CPU tensors, or
    their copies on the device): ``theta`` (N, 2, 3) and ``identity`` (N,) of
    :func:`draw_affine`, ``control`` (N, 2, 3, 3) and ``deformed`` (N,) of
    :func:`draw_deformation` (none deformed without deformation), ``intensity`` (2,) of
    :func:`draw_intensity` (unused without it), and the fixed spline weights ``basis_h``
    (H, 3) and ``basis_w`` (W, 3) of `deformation_basis` that upsample ``control``."""

    theta: torch.Tensor
    identity: torch.Tensor
    control: torch.Tensor
    deformed: torch.Tensor
    intensity: torch.Tensor
    basis_h: torch.Tensor
    basis_w: torch.Tensor


def draw_augment(n: int, height: int, width: int, generator: torch.Generator,
                 rd_en: bool = True, sigma: float = 5.0, ri_en: bool = True,
                 coupled_intensity: bool = True) -> AugmentDraws:
    """The draws of the labeled batch's augmentation for N slices of H x W: affine, then
    deformation (``rd_en``, control points of std ``sigma`` pixels), then intensity
    (``ri_en``; ``coupled_intensity``: see :func:`draw_intensity`), in that order."""
    theta, identity = draw_affine(n, height, width, generator)
    control, deformed = (draw_deformation(n, sigma, generator) if rd_en
                         else draw_deformation(n, sigma, generator, k=n))
    intensity = (draw_intensity(generator, coupled_intensity) if ri_en
                 else torch.tensor([1.0, 0.0]))
    return AugmentDraws(theta, identity, control, deformed, intensity,
                        deformation_basis(height), deformation_basis(width))


def apply_augment(images: torch.Tensor, labels_onehot: torch.Tensor, draws: AugmentDraws,
                  rd_en: bool = True, ri_en: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The labeled batch's augmentation (METHOD §6) with its random choices given
    (``draw_augment``): affine, then deformation if ``rd_en``, then intensity if ``ri_en``.
    (N, 1, H, W) images and (N, C, H, W) labels of the input shapes; soft labels if
    ``rd_en``."""
    images, labels_onehot = warp_affine(images, labels_onehot, draws.theta, draws.identity)
    if rd_en:
        images, labels_onehot = warp_deformation(images, labels_onehot, draws.control,
                                                 draws.deformed, draws.basis_h, draws.basis_w)
    if ri_en:
        images = apply_intensity(images, draws.intensity)
    return images, labels_onehot


def draw_set_intensity(generator: torch.Generator, coupled: bool = True) -> torch.Tensor:
    """The intensity augmentation of one contrastive set (METHOD §7.3, the original's
    ``brit_cont_net``), its random half: (2,) float32, the brightness shift
    U(-0.3, 0.3) and the contrast factor U(0.7, 1.3), in that order. ``coupled`` (the
    original): both from one uniform u, -0.3 + 0.6u and 0.7 + 0.6u (so the factor is 1 + the
    shift), as the released ``brit_cont_net``'s two TF ops drew the same u; else a draw each."""
    u, v = _two_uniforms(generator, coupled)
    return torch.cat([-0.3 + 0.6 * u, 0.7 + 0.6 * v]).to(torch.float32)


def apply_set_intensity(images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) images of one set with ``draws`` (2,) of :func:`draw_set_intensity`: the
    shift added to the whole set, then the contrast factor about each image's mean
    (``adjust_contrast``), then clipping to [0, 1.5]. No spatial change, so two sets built
    from one slice stay pixel-aligned."""
    shift, contrast = host_to_device(draws, images.device).to(images.dtype)
    return adjust_contrast(images + shift, contrast).clamp(0.0, 1.5)


@dataclass(frozen=True)
class DiceAugment:
    """How either step augments its labeled (Dice) batch, from the trainers' ``--rd_en``,
    ``--sigma`` (pixels), ``--ri_en`` with ``--intensity_with_deformation``, ``--en_1hot`` and
    ``--intensity_draws``."""

    rd_en: bool = True
    sigma: float = 5.0
    ri_en: bool = True
    en_1hot: bool = True
    coupled_intensity: bool = True  # --intensity_draws original

    @classmethod
    def from_flags(cls, args: argparse.Namespace) -> DiceAugment:
        """The settings of parsed flags (`utils.flags.parse_flags`). The released code's batch
        took the deformed slices and dropped their intensity-augmented copy, so by default the
        intensity step runs only when the deformation is off."""
        return cls(rd_en=bool(args.rd_en), sigma=args.sigma,
                   ri_en=bool(args.ri_en) and (not args.rd_en
                                               or bool(args.intensity_with_deformation)),
                   en_1hot=bool(args.en_1hot), coupled_intensity=args.intensity_draws == "original")

    def draw(self, n: int, height: int, width: int, generator: torch.Generator) -> AugmentDraws:
        """The random half for N slices of H x W (:func:`draw_augment`), on the host."""
        return draw_augment(n, height, width, generator, rd_en=self.rd_en, sigma=self.sigma,
                            ri_en=self.ri_en, coupled_intensity=self.coupled_intensity)

    def apply(self, images: torch.Tensor, labels_onehot: torch.Tensor, draws: AugmentDraws
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 1, H, W) images and (N, C, H, W) labels augmented by ``draws``
        (:func:`apply_augment`); the labels made one-hot again after the deformation's soft
        warp unless ``en_1hot``."""
        x, y = apply_augment(images, labels_onehot, draws, rd_en=self.rd_en, ri_en=self.ri_en)
        if not self.en_1hot:
            y = F.one_hot(y.argmax(1), y.shape[1]).permute(0, 3, 1, 2).to(y.dtype)
        return x, y
