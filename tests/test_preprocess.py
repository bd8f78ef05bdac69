"""Preprocessing (normalise, rescale, crop/pad) and its inverse back to the native grid."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import blob_volume
from scipy import ndimage

from utils.errors import DataError
from utils.preprocess import (
    Geometry,
    crop_or_pad,
    normalize_minmax,
    rescaled_shape,
    to_native,
    to_target,
)


def test_normalize_uses_percentiles_without_clipping():
    x = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    out = normalize_minmax(x)
    lo, hi = np.percentile(x, 1), np.percentile(x, 99)
    np.testing.assert_allclose(out, (x - lo) / (hi - lo), rtol=1e-5, atol=1e-7)
    assert out.min() < 0 and out.max() > 1  # kept, not clipped


def test_crop_and_pad_offsets_match_explicit_slicing():
    vol = np.arange(9 * 7).reshape(9, 7, 1)
    g = Geometry((9, 7), (9, 7), (4, 10))  # crop x, pad y
    out = crop_or_pad(vol, g)
    np.testing.assert_array_equal(out[:, 1:8, 0], vol[2:6, :, 0])  # (9-4)//2=2 ; (10-7)//2=1
    assert np.all(out[:, 0] == 0) and np.all(out[:, 8:] == 0)


def _round_trip(label, spacing, target, crop):
    image = label.astype(np.float32) * 10 + 1
    _, lbl_c, geom = to_target(image, label, spacing, target, crop)
    onehot = F.one_hot(torch.from_numpy(lbl_c).permute(2, 0, 1), 4).permute(0, 3, 1, 2).float()
    back = to_native(onehot, geom).argmax(1).permute(1, 2, 0).numpy()
    return lbl_c, back


@pytest.mark.parametrize("crop", [(64, 64), (32, 32)])
def test_identity_spacing_round_trip_is_exact_inside_the_crop(crop):
    _, label = blob_volume(shape=(48, 44, 4))
    lbl_c, back = _round_trip(label, (2.0, 2.0), (2.0, 2.0), crop)
    assert lbl_c.shape == (*crop, 4)
    np.testing.assert_array_equal(back, label)  # all structures lie inside both crops


@pytest.mark.parametrize("spacing", [(1.4, 1.4), (1.8, 1.2)])
def test_resampled_round_trip_differs_only_at_edges(spacing):
    _, label = blob_volume(shape=(60, 56, 4))
    target = (2.0, 2.0)
    lbl_c, back = _round_trip(label, spacing, target, (64, 64))
    assert back.shape == label.shape
    # A mismatch may only sit within one target voxel (in native voxels) of a label edge.
    reach = max(math.ceil(t / s) for t, s in zip(target, spacing))
    edge = np.zeros(label.shape, bool)
    for z in range(label.shape[2]):
        sl = label[..., z]
        edge[..., z] = ndimage.maximum_filter(sl, 3) != ndimage.minimum_filter(sl, 3)
        edge[..., z] = ndimage.binary_dilation(edge[..., z], iterations=reach)
    wrong = back != label
    assert wrong.any()  # resampling does lose something
    assert not (wrong & ~edge).any()
    # and the per-structure volume is preserved to a few percent
    for c in (1, 2, 3):
        assert abs((back == c).sum() / (label == c).sum() - 1) < 0.1


def test_rescaled_geometry_and_label_values():
    image, label = blob_volume(shape=(50, 40, 3))
    img_c, lbl_c, geom = to_target(image, label, (1.0, 1.5), (2.0, 2.0), (32, 32))
    assert geom.rescaled_shape == (25, 30)
    assert img_c.dtype == np.float32 and lbl_c.dtype == np.int64
    assert set(np.unique(lbl_c)) <= {0, 1, 2, 3}
    assert img_c.shape == (32, 32, 3)


@pytest.mark.parametrize("rescaled", [(47, 59), (69, 61), (57, 50)])
def test_to_native_labels_at_the_crop_edge_match_a_zero_filled_resize(rescaled):
    """Where the crop window cuts the rescaled frame, the native labels are those of the
    released evaluation: the crop put into a zero frame, resized bilinearly with zeros
    outside (skimage, constant mode), argmax; pixels the window never reaches are background."""
    from skimage.transform import resize

    crop, c = (52, 54), 4
    native = (rescaled[0] * 3 // 4 + 1, rescaled[1] * 5 // 4)  # one axis finer, one coarser
    geom = Geometry(native, rescaled, crop)
    gen = torch.Generator().manual_seed(0)
    # Smooth random probabilities, so that foreground reaches every edge of the crop window.
    logits = F.interpolate(torch.randn(2, c, crop[0] // 4, crop[1] // 4, generator=gen) * 4,
                           size=crop, mode="bilinear", align_corners=False)
    probs = torch.softmax(logits, 1)
    out = to_native(probs, geom)
    frame = np.zeros((2, c, *rescaled))
    (fx, fy), (cx, cy) = geom.windows()
    frame[:, :, fx, fy] = probs[:, :, cx, cy].numpy()
    expected = np.stack([resize(f.transpose(1, 2, 0), (*native, c), order=1, mode="constant",
                                anti_aliasing=False).argmax(-1) for f in frame])
    np.testing.assert_array_equal(out.argmax(1).numpy(), expected)
    torch.testing.assert_close(out.sum(1), torch.ones(2, *native))  # still probabilities


# ------------------------------------------------------------- N4 bias-field correction


def _biased_volume(shape=(40, 32, 5), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(X, Y, Z) float32 image of a bright disc on a darker body under a smooth multiplicative
    field along x and y, and the disc's mask."""
    x, y, _ = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    cx, cy = shape[0] / 2, shape[1] / 2
    disc = (x - cx) ** 2 + (y - cy) ** 2 < (0.3 * shape[1]) ** 2
    body = (x - cx) ** 2 / (0.45 * shape[0]) ** 2 + (y - cy) ** 2 / (0.45 * shape[1]) ** 2 < 1
    tissue = np.where(disc, 100.0, np.where(body, 40.0, 0.0))
    field = np.exp(0.5 * (x - cx) / cx - 0.25 * (y - cy) / cy)
    noise = np.random.default_rng(seed).normal(0, 1.0, shape) * body
    return (tissue * field + noise).clip(0).astype(np.float32), disc


def _cv(values: np.ndarray) -> float:
    return float(values.std() / values.mean())


@pytest.mark.parametrize("mask", ["none", "otsu"])
def test_n4_flattens_a_known_bias_field(mask: str) -> None:
    from utils.preprocess import n4_bias_correction

    image, disc = _biased_volume((32, 26, 3))
    out = n4_bias_correction(image, (1.5, 1.2, 5.0), mask=mask)
    assert out.shape == image.shape and out.dtype == np.float32
    assert _cv(image[disc]) > 0.12
    assert _cv(out[disc]) < 0.4 * _cv(image[disc])  # the disc is flat again


def test_n4_script_does_what_the_released_script_did(load_script, tmp_path: Path) -> None:
    """The released script: sitk.ReadImage, Cast to float32, N4 (threshold 0.001, 4 x 50
    iterations) with no mask, WriteImage. Run here on the same file, it is the reference."""
    import SimpleITK as sitk

    n4 = load_script("N4_bias_correction")
    image, _ = _biased_volume((36, 28, 3))
    affine = np.diag([1.5, 1.2, 5.0, 1.0])
    src, dst = tmp_path / "img.nii.gz", tmp_path / "out" / "img.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), src)
    n4.correct_file(src, dst)

    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetConvergenceThreshold(0.001)
    corrector.SetMaximumNumberOfIterations([50] * 4)
    ref = corrector.Execute(sitk.Cast(sitk.ReadImage(str(src)), sitk.sitkFloat32))
    want = sitk.GetArrayFromImage(ref).transpose(2, 1, 0)  # (z, y, x) -> (x, y, z)
    got = nib.load(dst)
    np.testing.assert_allclose(got.get_fdata(), want, rtol=1e-3, atol=1e-2)
    np.testing.assert_allclose(got.affine, affine, atol=1e-6)
    assert not np.allclose(want, image, rtol=0.02)  # the correction did something


def test_n4_script_mirrors_a_raw_folder_and_refuses_negative_images(load_script,
                                                                   tmp_path: Path) -> None:
    n4 = load_script("N4_bias_correction")
    raw, out = tmp_path / "raw" / "patient001", tmp_path / "n4"
    raw.mkdir(parents=True)
    image, disc = _biased_volume((24, 20, 2))
    nib.save(nib.Nifti1Image(image, np.eye(4)), raw / "patient001_frame01.nii.gz")
    nib.save(nib.Nifti1Image(disc.astype(np.int16), np.eye(4)),
             raw / "patient001_frame01_gt.nii.gz")
    (raw / "Info.cfg").write_text("ED: 1\n")
    script = Path(__file__).resolve().parents[1] / "scripts" / "N4_bias_correction.py"
    subprocess.run([sys.executable, str(script), str(tmp_path / "raw"), str(out)], check=True,
                   capture_output=True)
    copied = out / "patient001"
    for name in ("patient001_frame01_gt.nii.gz", "Info.cfg"):  # labels and others: unchanged
        assert (copied / name).read_bytes() == (raw / name).read_bytes()
    corrected = nib.load(copied / "patient001_frame01.nii.gz").get_fdata()
    assert _cv(corrected[disc]) < 0.5 * _cv(image[disc])

    nib.save(nib.Nifti1Image(image - 50, np.eye(4)), tmp_path / "neg.nii.gz")
    with pytest.raises(DataError, match=r"neg\.nii\.gz.*--mask otsu"):
        n4.correct_file(tmp_path / "neg.nii.gz", tmp_path / "neg_out.nii.gz")
    assert not (tmp_path / "neg_out.nii.gz").exists()


def test_constant_volume_normalises_to_zeros():
    # 1st and 99th percentiles coincide: the scale falls back to 1, never 0/0.
    out = normalize_minmax(np.full((4, 5, 2), 7.0, dtype=np.float32))
    np.testing.assert_array_equal(out, np.zeros((4, 5, 2), np.float32))


def test_volume_is_normalised_with_its_own_percentiles_not_per_slice():
    # Slices at different intensity scales: one min-max of the whole volume keeps their ratio.
    image, _ = blob_volume(shape=(20, 18, 3))
    image[..., 2] *= 3.0
    img_c, _, _ = to_target(image, None, (1.0, 1.0), (1.0, 1.0), (20, 18))
    np.testing.assert_allclose(img_c, normalize_minmax(image), rtol=0, atol=1e-6)


def test_rescaled_shape_rounds_to_nearest():
    # 56 * 1.2 / 2 = 33.6 -> 34 and 57 * 1.3 / 2 = 37.05 -> 37, as skimage's rescale rounds.
    assert rescaled_shape((56, 57), (1.2, 1.3), (2.0, 2.0)) == (34, 37)
    _, _, geom = to_target(np.random.default_rng(0).random((56, 57, 1)), None, (1.2, 1.3),
                           (2.0, 2.0), (40, 40))
    assert geom.rescaled_shape == (34, 37)


def test_image_is_resampled_bilinearly_label_by_nearest():
    # Upsampling 2x: output pixel i reads the input at (i + 0.5) / 2 - 0.5, so an x-ramp
    # becomes that coordinate exactly (inside, away from the zero-filled border).
    x = np.arange(10, dtype=np.float32)[:, None, None] * np.ones((1, 8, 1), np.float32)
    label = np.zeros((10, 8, 1), np.int64)
    label[3:7, 2:6] = 3  # class 3 next to background: interpolating would make 1s and 2s
    img_c, lbl_c, _ = to_target(x, label, (1.0, 1.0), (0.5, 0.5), (20, 16), normalize=False)
    want = (np.arange(20) + 0.5) / 2 - 0.5
    np.testing.assert_allclose(img_c[2:18, 8, 0], want[2:18], atol=1e-6)
    assert set(np.unique(lbl_c)) == {0, 3}
    assert (lbl_c == 3).sum() == 4 * (label == 3).sum()


def test_to_native_gives_probabilities_outside_the_crop_too():
    # The rescaled frame (42, 39) is larger than the crop (32, 32): around the crop window
    # there is only background, and after the bilinear resize every pixel still sums to 1.
    geom = Geometry((60, 56), (42, 39), (32, 32))
    probs = torch.zeros(2, 3, 32, 32)
    probs[:, 1] = 1.0
    out = to_native(probs, geom)
    assert out.shape == (2, 3, 60, 56)
    torch.testing.assert_close(out.sum(1), torch.ones(2, 60, 56))
    assert float(out[:, 0, 0, 0].min()) == 1.0 and float(out[:, 1, 30, 28].min()) == 1.0
