"""Preprocessing (normalise, rescale, crop/pad) and its inverse back to the native grid."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import blob_volume
from scipy import ndimage

from utils.preprocess import Geometry, crop_or_pad, normalize_minmax, to_native, to_target


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
