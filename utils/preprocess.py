"""Preprocessing of METHOD §2 and its exact inverse for evaluation in native resolution (§8).

Forward: percentile min-max normalisation, in-plane rescale of every slice by
``native_spacing / target_resolution`` (bilinear image, nearest label), centre crop or zero pad to
the crop size. `Geometry` records what was done so that `to_native` can put per-slice class
probabilities back into the native grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from skimage.transform import resize


def normalize_minmax(image: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Min-max normalise a whole volume with its 1st/99th percentiles; no clipping (METHOD §2)."""
    lo, hi = np.percentile(image, [low, high])
    scale = hi - lo if hi > lo else 1.0
    return ((image - lo) / scale).astype(np.float32)


@dataclass(frozen=True)
class Geometry:
    """How one volume maps between its native grid and the cropped target grid.

    native_shape: (X, Y) in voxels; rescaled_shape: (RX, RY) after rescaling to the target
    spacing; crop: (CX, CY). Offsets are where the crop window starts in the rescaled frame
    (positive: cropped) and where the rescaled frame starts in the crop (positive: padded).
    """

    native_shape: tuple[int, int]
    rescaled_shape: tuple[int, int]
    crop: tuple[int, int]

    def windows(self) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
        """(rescaled-frame window, crop window) in-plane: the region both grids share.

        Centring as in the original: a larger frame is cropped from ``(r - c) // 2``, a
        smaller one is padded by ``(c - r) // 2`` before it.
        """
        frame, crop = [], []
        for r, c in zip(self.rescaled_shape, self.crop):
            n = min(r, c)
            start_r, start_c = ((r - c) // 2, 0) if r >= c else (0, (c - r) // 2)
            frame.append(slice(start_r, start_r + n))
            crop.append(slice(start_c, start_c + n))
        return (frame[0], frame[1]), (crop[0], crop[1])


def rescaled_shape(
    native_shape: tuple[int, int],
    spacing_xy: tuple[float, float],
    target_resolution: tuple[float, float],
) -> tuple[int, int]:
    """In-plane size after rescaling by spacing / target_resolution (rounded like skimage)."""
    return tuple(
        max(1, int(round(n * s / t)))
        for n, s, t in zip(native_shape, spacing_xy, target_resolution)
    )  # type: ignore[return-value]


def crop_or_pad(vol: np.ndarray, geometry: Geometry, fill: float = 0.0) -> np.ndarray:
    """Centre-crop or pad the first two axes of (RX, RY, ...) to the crop size."""
    out = np.full((*geometry.crop, *vol.shape[2:]), fill, dtype=vol.dtype)
    frame, crop = geometry.windows()
    out[crop] = vol[frame]
    return out


def to_target(
    image: np.ndarray,
    label: np.ndarray | None,
    spacing_xy: tuple[float, float],
    target_resolution: tuple[float, float],
    crop: tuple[int, int],
    normalize: bool = True,
) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
    """Preprocess a native (X, Y, Z) volume into the (CX, CY, Z) training grid.

    Returns the normalised, rescaled and cropped image (float32), the label treated the same
    way with nearest-neighbour interpolation (int64, or None), and the Geometry to undo it.
    """
    if image.ndim != 3:
        raise ValueError(f"expected an (X, Y, Z) volume, got shape {image.shape}")
    img = normalize_minmax(image) if normalize else image.astype(np.float32)
    native = (int(image.shape[0]), int(image.shape[1]))
    rshape = rescaled_shape(native, spacing_xy, target_resolution)
    geometry = Geometry(native, rshape, (int(crop[0]), int(crop[1])))
    # Slices are the trailing "channel" axis, so one resize call handles the whole volume.
    img_r = resize(img, (*rshape, img.shape[2]), order=1, preserve_range=True, mode="constant",
                   anti_aliasing=False).astype(np.float32)
    img_c = crop_or_pad(img_r, geometry)
    lbl_c = None
    if label is not None:
        lbl_r = resize(label.astype(np.float32), (*rshape, label.shape[2]), order=0,
                       preserve_range=True, mode="constant", anti_aliasing=False)
        lbl_c = crop_or_pad(np.rint(lbl_r).astype(np.int64), geometry)
    return img_c, lbl_c, geometry


def to_native(probs: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Map per-slice class probabilities from the crop back to the native in-plane grid.

    Args:
        probs: (Z, C, CX, CY) softmax probabilities in the cropped target grid.
    Returns:
        (Z, C, X, Y) probabilities in the native grid: the crop is put back into the rescaled
        frame and resized bilinearly, each native pixel averaging only the crop-window pixels
        it overlaps (pixels the window never reaches are background). Its argmax is that of
        the released code, which resized the crop in a frame of zeros.
    """
    z, c = probs.shape[:2]
    # Channel c marks the crop window: resized with the probabilities, it is the weight each
    # native pixel took from inside the window, by which the probabilities are renormalised.
    frame = probs.new_zeros((z, c + 1, *geometry.rescaled_shape))
    in_frame, in_crop = geometry.windows()
    frame[:, :c][(..., *in_frame)] = probs[(..., *in_crop)]
    frame[:, c][(..., *in_frame)] = 1.0
    out = F.interpolate(frame, size=geometry.native_shape, mode="bilinear", align_corners=False)
    weight = out[:, c:]
    native = out[:, :c] / weight.clamp_min(torch.finfo(out.dtype).tiny)
    native[:, :1] = torch.where(weight > 0, native[:, :1], torch.ones_like(weight))
    return native


N4_MASKS = ("none", "otsu")


def n4_bias_correction(
    image: np.ndarray,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    convergence_threshold: float = 0.001,
    levels: int = 4,
    iterations: int = 50,
    mask: str = "none",
) -> np.ndarray:
    """N4 bias-field correction of an (X, Y, Z) volume with SimpleITK (METHOD §2.1).

    ``mask="none"``: the field is fitted over every voxel of the volume as given, as the
    released script did (intensities must be positive; zeros are allowed). ``"otsu"``: fitted
    on Otsu's foreground, after shifting the volume to a minimum of 1 (shift removed after).
    """
    import SimpleITK as sitk

    if mask not in N4_MASKS:
        raise ValueError(f"mask must be one of {N4_MASKS}, got {mask!r}")
    if mask == "none" and float(image.min()) < 0:
        raise ValueError(f"N4 without a mask needs intensities >= 0, the minimum is "
                         f"{float(image.min()):g}: use mask 'otsu', which shifts them")
    shift = 1.0 - float(image.min()) if mask == "otsu" else 0.0
    # SimpleITK orders axes (z, y, x); transposing keeps the physical spacing consistent.
    itk = sitk.GetImageFromArray(np.ascontiguousarray((image + shift).transpose(2, 1, 0)))
    itk = sitk.Cast(itk, sitk.sitkFloat32)
    itk.SetSpacing(tuple(float(s) for s in spacing))
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetConvergenceThreshold(convergence_threshold)
    corrector.SetMaximumNumberOfIterations([iterations] * levels)
    if mask == "otsu":
        out = corrector.Execute(itk, sitk.OtsuThreshold(itk, 0, 1, 200))
    else:
        out = corrector.Execute(itk)
    return (sitk.GetArrayFromImage(out).transpose(2, 1, 0) - shift).astype(np.float32)
