"""Tests for utils.augment: geometry checked against torch.rot90/flip, scipy.ndimage and
hand-worked cases; randomness checked for ranges and reproducibility."""

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from augment_composites import (
    affine_augment,
    augment_batch,
    intensity_augment,
    random_deformation,
    set_intensity_augment,
)
from skimage.transform import resize

from utils.augment import (
    AFF_FLIP,
    AFF_NONE,
    AFF_ROT45,
    AFF_ROTATE,
    AFF_SCALE,
    N_AFFINE_CHOICES,
    DiceAugment,
    affine_matrices,
    apply_affine,
    deformation_basis,
    dense_warp,
    draw_deformation,
    sample_affine_params,
    to_onehot,
    upsample_displacements,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _theta(choice: int, n: int, h: int, w: int, **kw) -> torch.Tensor:
    """Matrices for n slices that all take the given choice."""
    params = {
        "rot_deg": torch.zeros(n),
        "scale": torch.ones(n),
        "flip": torch.ones(n, dtype=torch.bool),
        "k45": torch.zeros(n, dtype=torch.long),
    }
    params.update({k: torch.as_tensor(v).expand(n).clone() for k, v in kw.items()})
    return affine_matrices(torch.full((n,), choice), height=h, width=w, **params)


def _disk(h: int, w: int, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return ((yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2 <= radius**2).astype(np.int64)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _random_batch(n: int, h: int, w: int, c: int, seed: int = 0):
    g = _gen(seed)
    images = torch.rand(n, 1, h, w, generator=g) + 0.1
    labels = torch.randint(0, c, (n, h, w), generator=g)
    return images, to_onehot(labels, c)


def _assert_onehot(lab: torch.Tensor) -> None:
    assert torch.all((lab == 0) | (lab == 1))
    assert torch.all(lab.sum(dim=1) == 1)


# ---------------------------------------------------------------------------- to_onehot


def test_to_onehot_matches_loop():
    labels = torch.randint(0, 5, (3, 7, 9), generator=_gen(1))
    oh = to_onehot(labels, 5)
    assert oh.shape == (3, 5, 7, 9) and oh.dtype == torch.float32
    ref = torch.zeros(3, 5, 7, 9)
    for n in range(3):
        for y in range(7):
            for x in range(9):
                ref[n, labels[n, y, x], y, x] = 1.0
    assert torch.equal(oh, ref)


# ---------------------------------------------------------------------------- affine


@pytest.mark.parametrize("k", [0, 2, 4, 6])
def test_rot45_multiples_of_90_equal_rot90(k):
    images, labels = _random_batch(3, 32, 32, 4)
    img, lab = apply_affine(images, labels, _theta(AFF_ROT45, 3, 32, 32, k45=k))
    assert torch.equal(lab, torch.rot90(labels, k // 2, dims=(-2, -1)))
    torch.testing.assert_close(img, torch.rot90(images, k // 2, dims=(-2, -1)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("hw", [(32, 32), (20, 31)])
def test_flip_equals_torch_flip(hw):
    h, w = hw
    images, labels = _random_batch(3, h, w, 3)
    img, lab = apply_affine(images, labels, _theta(AFF_FLIP, 3, h, w, flip=True))
    assert torch.equal(lab, torch.flip(labels, dims=(-1,)))
    torch.testing.assert_close(img, torch.flip(images, dims=(-1,)), atol=1e-5, rtol=0)
    # flip=False is the identity
    img, lab = apply_affine(images, labels, _theta(AFF_FLIP, 3, h, w, flip=False))
    assert torch.equal(lab, labels)


def test_rotation_is_rigid_on_non_square_slices():
    # Rotating a 40x60 slice by 90 degrees about its centre maps the central 40x40 square onto
    # itself; that only holds if the normalised-coordinate aspect ratio is compensated.
    images, labels = _random_batch(2, 40, 60, 3)
    _, lab = apply_affine(images, labels, _theta(AFF_ROT45, 2, 40, 60, k45=2))
    ref = torch.rot90(labels[..., 10:50], 1, dims=(-2, -1))
    assert torch.equal(lab[..., 10:50], ref)


def test_small_rotation_of_disk_keeps_valid_onehot_and_area():
    disk = _disk(96, 96, 30.0)
    labels = to_onehot(torch.from_numpy(disk)[None], 2)
    images = labels[:, 1:].clone()
    img, lab = apply_affine(images, labels, _theta(AFF_ROTATE, 1, 96, 96, rot_deg=13.0))
    _assert_onehot(lab)
    area0, area1 = disk.sum(), lab[0, 1].sum().item()
    assert abs(area1 - area0) / area0 < 0.03
    assert _dice(lab[0, 1].numpy(), disk) > 0.98
    assert img.min() >= 0 and img.max() <= 1 + 1e-6


def test_rotation_direction_matches_scipy_rotate():
    # An off-centre rectangle: a wrong sign would put it far from scipy's result.
    x = np.zeros((96, 96), dtype=np.int64)
    x[20:40, 30:80] = 1
    labels = to_onehot(torch.from_numpy(x)[None], 2)
    _, lab = apply_affine(labels[:, 1:], labels, _theta(AFF_ROTATE, 1, 96, 96, rot_deg=12.0))
    ref = ndi.rotate(x, 12.0, reshape=False, order=0)
    assert _dice(lab[0, 1].numpy(), ref) > 0.97
    ref_wrong = ndi.rotate(x, -12.0, reshape=False, order=0)
    assert _dice(lab[0, 1].numpy(), ref_wrong) < 0.9


@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_rot45_odd_multiples_match_scipy_rotate(k):
    # The exact cos/sin table of the odd multiples of 45 degrees, against scipy on the
    # off-centre rectangle (each wrong entry turns it by a different angle).
    x = np.zeros((96, 96), dtype=np.int64)
    x[20:40, 30:80] = 1
    labels = to_onehot(torch.from_numpy(x)[None], 2)
    _, lab = apply_affine(labels[:, 1:], labels, _theta(AFF_ROT45, 1, 96, 96, k45=k))
    assert _dice(lab[0, 1].numpy(), ndi.rotate(x, 45.0 * k, reshape=False, order=0)) > 0.95


def test_outside_area_is_background_and_zero():
    labels = torch.zeros(1, 3, 64, 64)
    labels[:, 2] = 1.0  # all foreground
    images = torch.ones(1, 1, 64, 64)
    img, lab = apply_affine(images, labels, _theta(AFF_ROT45, 1, 64, 64, k45=1))
    _assert_onehot(lab)
    # Corners of a 45-degree rotated square come from outside the input.
    assert lab[0, 0, 0, 0] == 1 and lab[0, 0, -1, -1] == 1
    assert img[0, 0, 0, 0] == 0 and img[0, 0, -1, -1] == 0
    # The centre stays foreground.
    assert lab[0, 2, 32, 32] == 1 and img[0, 0, 32, 32] == pytest.approx(1.0)


def _zoom_crop(x: np.ndarray, s: float, order: int) -> np.ndarray:
    """Independent reference: rescale with scipy, then centre crop / zero pad back."""
    h, w = x.shape
    z = ndi.zoom(x, s, order=order, grid_mode=True, mode="grid-constant")
    zh, zw = z.shape
    out = np.zeros_like(x, dtype=z.dtype)
    if zh >= h:
        oy, ox = (zh - h) // 2, (zw - w) // 2
        out[:] = z[oy : oy + h, ox : ox + w]
    else:
        oy, ox = (h - zh) // 2, (w - zw) // 2
        out[oy : oy + zh, ox : ox + zw] = z
    return out


@pytest.mark.parametrize("s", [0.95, 1.05])
def test_scaling_matches_zoom_and_centre_crop(s):
    x = np.zeros((128, 128), dtype=np.int64)
    x[24:104, 30:100] = 1
    labels = to_onehot(torch.from_numpy(x)[None], 2)
    img, lab = apply_affine(labels[:, 1:], labels, _theta(AFF_SCALE, 1, 128, 128, scale=s))
    _assert_onehot(lab)
    ref = _zoom_crop(x, s, order=0)
    assert _dice(lab[0, 1].numpy(), ref) > 0.95
    # The foreground area scales with s^2 (the square stays inside the slice).
    assert lab[0, 1].sum().item() / x.sum() == pytest.approx(s * s, rel=0.03)
    ref_img = _zoom_crop(x.astype(np.float64), s, order=1)
    assert np.abs(img[0, 0].numpy() - ref_img).mean() < 0.02


def test_affine_augment_valid_reproducible_and_skips_empty_slices():
    images, labels = _random_batch(30, 48, 48, 4, seed=3)
    images[5] = 0.0005  # "empty" slice: max <= 0.001
    out1 = affine_augment(images, labels, _gen(7))
    out2 = affine_augment(images, labels, _gen(7))
    assert torch.equal(out1[0], out2[0]) and torch.equal(out1[1], out2[1])
    img, lab = out1
    assert img.shape == images.shape and lab.shape == labels.shape
    _assert_onehot(lab)
    assert torch.equal(img[5], images[5]) and torch.equal(lab[5], labels[5])
    changed = (img != images).flatten(1).any(dim=1)
    unchanged_exact = (img == images).flatten(1).all(dim=1)
    # Five choices uniformly, several of which are identities: with 30 slices (seeded) some are
    # changed and some are returned bit for bit.
    assert changed.sum() >= 10 and unchanged_exact.sum() >= 3
    assert not torch.equal(affine_augment(images, labels, _gen(8))[0], img)


def test_affine_augment_does_what_each_slice_drew():
    # Read the draws back from a copy of the generator; check each choice's outcome exactly.
    n = 200
    images, labels = _random_batch(n, 24, 24, 3, seed=4)
    img, lab = affine_augment(images, labels, _gen(11))
    choice, _, scale, flip, k45 = sample_affine_params(n, _gen(11))
    # Every identity outcome occurs among the 200 slices of this seed.
    assert ((choice == AFF_ROT45) & (k45 == 0)).any() and ((choice == AFF_FLIP) & ~flip).any()
    assert ((choice == AFF_SCALE) & (scale == 1.0)).any()
    for i in range(n):
        c, expect = int(choice[i]), None
        if c == AFF_NONE or (c == AFF_FLIP and not flip[i]) or (c == AFF_ROT45 and k45[i] == 0) \
                or (c == AFF_SCALE and scale[i] == 1.0):
            assert torch.equal(img[i], images[i]) and torch.equal(lab[i], labels[i]), i
            continue
        if c == AFF_FLIP:
            expect = images[i].flip(-1), labels[i].flip(-1)
        elif c == AFF_ROT45 and k45[i] % 2 == 0:
            k = int(k45[i]) // 2
            expect = images[i].rot90(k, (-2, -1)), labels[i].rot90(k, (-2, -1))
        if expect is not None:
            assert torch.equal(lab[i], expect[1]), i
            torch.testing.assert_close(img[i], expect[0], rtol=0, atol=1e-5, msg=str(i))
        else:  # a rotation or a scaling: the image is resampled
            assert not torch.equal(img[i], images[i]), i
    assert {int(c) for c in choice} == set(range(N_AFFINE_CHOICES))


def test_affine_none_choice_is_identity_matrix():
    theta = _theta(AFF_NONE, 2, 30, 50, rot_deg=10.0, scale=1.05, k45=3)
    expected = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(2, 2, 3)
    assert torch.equal(theta, expected)


# ---------------------------------------------------------------------------- deformation


def test_deformation_sigma_zero_is_identity():
    images, labels = _random_batch(4, 40, 36, 3)
    img, lab = random_deformation(images, labels, 0.0, _gen(), k=0)
    torch.testing.assert_close(img, images, atol=1e-5, rtol=0)
    torch.testing.assert_close(lab, labels, atol=1e-5, rtol=0)


def test_deformation_soft_labels_and_untouched_prefix():
    images, labels = _random_batch(6, 48, 48, 4, seed=2)
    img, lab = random_deformation(images, labels, 5.0, _gen(4), k=2)
    assert torch.equal(img[:2], images[:2]) and torch.equal(lab[:2], labels[:2])
    assert not torch.allclose(img[2:], images[2:], atol=1e-3)
    assert lab.min() >= 0 and lab.max() <= 1 + 1e-6
    torch.testing.assert_close(lab.sum(dim=1), torch.ones(6, 48, 48), atol=1e-5, rtol=0)
    # labels actually became soft somewhere
    assert ((lab > 0.01) & (lab < 0.99)).any()


def test_deformation_random_k_clamped_and_single_slice():
    images, labels = _random_batch(3, 24, 24, 2)
    for seed in range(10):
        img, lab = random_deformation(images, labels, 5.0, _gen(seed))
        # k in {1..18} clamped to N-1 = 2: slice 0 untouched, slice 2 always deformed
        assert torch.equal(img[0], images[0]) and torch.equal(lab[0], labels[0])
        assert not torch.equal(img[2], images[2])
    one_img, one_lab = random_deformation(images[:1], labels[:1], 5.0, _gen())
    assert torch.equal(one_img, images[:1]) and torch.equal(one_lab, labels[:1])


def test_deformation_random_k_is_uniform_over_1_to_18():
    # With N = 30 no clamping: the first deformed slice k is one of 1..18, each about 1/18 of
    # 720 draws (40 expected; 10 is 5 sd below).
    ks = []
    for seed in range(720):
        _, deformed = draw_deformation(30, 1.0, _gen(seed))
        ks.append(int(deformed.long().argmax()))
        assert deformed[ks[-1]:].all() and not deformed[:ks[-1]].any()
    counts = np.bincount(ks, minlength=19)
    assert counts[0] == 0 and counts.sum() == counts[1:19].sum()
    assert counts[1:19].min() > 10


def test_dense_warp_constant_shift_hand_worked():
    images = torch.arange(5 * 7, dtype=torch.float32).view(1, 1, 5, 7)
    labels = to_onehot(torch.randint(0, 3, (1, 5, 7), generator=_gen(5)), 3)
    disp = torch.zeros(1, 2, 5, 7)
    disp[:, 0] = 2.0  # sample two columns to the right
    disp[:, 1] = -1.0  # and one row up
    img, lab = dense_warp(images, labels, disp)
    torch.testing.assert_close(img[0, 0, 1:, :5], images[0, 0, :4, 2:], atol=1e-4, rtol=0)
    torch.testing.assert_close(lab[0, :, 1:, :5], labels[0, :, :4, 2:], atol=1e-5, rtol=0)
    # border padding: row 0 samples the clamped row 0, last columns the clamped last column
    torch.testing.assert_close(img[0, 0, 0, :5], images[0, 0, 0, 2:], atol=1e-4, rtol=0)
    torch.testing.assert_close(img[0, 0, 2, 5:], images[0, 0, 1, 6].expand(2), atol=1e-4, rtol=0)
    # half-pixel shift: bilinear average of horizontal neighbours
    disp = torch.zeros(1, 2, 5, 7)
    disp[:, 0] = 0.5
    img, _ = dense_warp(images, labels, disp)
    ref = 0.5 * (images[..., :-1] + images[..., 1:])
    torch.testing.assert_close(img[..., :-1], ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("hw", [(192, 192), (65, 49)])
def test_deformation_field_is_the_originals_skimage_resize(hw):
    """The dense field of each 3x3 grid equals skimage.transform.resize(order=3,
    mode='reflect') of it, as the original computed it (clipping to the grid's range
    included)."""
    h, w = hw
    control = torch.randn(6, 2, 3, 3, generator=_gen(9)) * 5.0
    field = upsample_displacements(control, deformation_basis(h), deformation_basis(w))
    assert field.shape == (6, 2, h, w)
    for m in range(6):
        for c in range(2):
            ref = resize(control[m, c].double().numpy(), (h, w), order=3, mode="reflect")
            np.testing.assert_allclose(field[m, c].numpy(), ref, atol=2e-5, rtol=0)
    # pixel-centre alignment: with cells of an odd number of pixels (9 = 3 x 3, 15 = 3 x 5)
    # the control values are the field's values at the cells' centre pixels
    field = upsample_displacements(control, deformation_basis(9), deformation_basis(15))
    torch.testing.assert_close(field[:, :, 1::3][..., 2::5], control, atol=1e-5, rtol=0)
    # a constant grid gives a constant field (the spline weights sum to one)
    const = upsample_displacements(torch.full((1, 2, 3, 3), 2.5), deformation_basis(h),
                                   deformation_basis(w))
    torch.testing.assert_close(const, torch.full_like(const, 2.5), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- intensity


def _contrast_loop(img: np.ndarray, f: float) -> np.ndarray:
    """tf.image.adjust_contrast of one single-channel image, written out."""
    m = img.sum() / img.size
    return (img - m) * f + m


@pytest.mark.parametrize("n", [10, 7])
def test_intensity_one_draw_per_batch_contrast_about_each_mean(n):
    images = torch.rand(n, 1, 16, 16, generator=_gen(11), dtype=torch.float64) + 0.5
    images += torch.arange(n, dtype=torch.float64).view(n, 1, 1, 1)  # distinct means
    out = intensity_augment(images, _gen(12))
    half = n // 2
    # first half: one factor for the batch, about each image's own mean
    dev = images[:half] - images[:half].mean(dim=(-2, -1), keepdim=True)
    ratio = (out[:half] - images[:half].mean(dim=(-2, -1), keepdim=True)) / dev
    f = ratio.flatten()[0]
    torch.testing.assert_close(ratio, torch.full_like(ratio, f.item()), atol=1e-4, rtol=0)
    assert 0.8 <= f.item() <= 1.2
    for i in range(half):
        np.testing.assert_allclose(out[i, 0].numpy(), _contrast_loop(images[i, 0].numpy(),
                                                                     f.item()), atol=1e-5)
    # the means are kept (a multiplication about 0 would scale them)
    torch.testing.assert_close(out[:half].mean(dim=(-2, -1)), images[:half].mean(dim=(-2, -1)))
    # second half: one brightness shift for the batch
    diff = out[half:] - images[half:]
    b = diff.flatten()[0].item()
    torch.testing.assert_close(diff, torch.full_like(diff, b), atol=1e-5, rtol=0)
    assert abs(b) <= 0.1


def test_set_intensity_single_map_per_set_about_each_mean_and_clipping():
    images = 0.4 + 0.2 * torch.rand(5, 1, 16, 16, generator=_gen(13), dtype=torch.float64)
    images[2] += 0.1  # another mean; no clipping possible
    out = set_intensity_augment(images, _gen(14))
    mean_in = images.mean(dim=(-2, -1), keepdim=True)
    mean_out = out.mean(dim=(-2, -1), keepdim=True)
    # brightness b then contrast c about the (shifted) mean: out - mean_out = c (x - mean_in)
    # and mean_out = mean_in + b, with one c and one b for the whole set
    c = ((out - mean_out) / (images - mean_in)).flatten()
    torch.testing.assert_close(c, torch.full_like(c, c[0].item()), atol=1e-3, rtol=0)
    b = (mean_out - mean_in).flatten()
    torch.testing.assert_close(b, torch.full_like(b, b[0].item()), atol=1e-5, rtol=0)
    assert 0.7 <= c[0].item() <= 1.3 and -0.3 <= b[0].item() <= 0.3
    for i in range(5):
        want = _contrast_loop(images[i, 0].numpy() + b[0].item(), c[0].item())
        np.testing.assert_allclose(out[i, 0].numpy(), want, atol=1e-4)
    wide = torch.linspace(-1.0, 3.0, 5 * 16 * 16).view(5, 1, 16, 16)
    clipped = set_intensity_augment(wide, _gen(14))
    assert clipped.min() == 0.0 and clipped.max() == 1.5


# ---------------------------------------------------------------------------- pipeline


def test_augment_batch_order_and_reproducibility():
    images, labels = _random_batch(8, 32, 32, 3, seed=5)
    a = augment_batch(images, labels, _gen(21))
    b = augment_batch(images, labels, _gen(21))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # The input's layout: the loss's sums round by memory order, so a channels-last label
    # would change training in the last bits.
    assert a[0].is_contiguous() and a[1].is_contiguous()
    c = augment_batch(images, labels, _gen(22))
    assert not torch.equal(a[0], c[0])
    # with deformation off: intensity(affine(x)) from the same random stream
    g = _gen(23)
    ref_img, ref_lab = affine_augment(images, labels, g)
    ref_img = intensity_augment(ref_img, g)
    out_img, out_lab = augment_batch(images, labels, _gen(23), rd_en=False, ri_en=True)
    assert torch.equal(out_img, ref_img) and torch.equal(out_lab, ref_lab)
    # all steps off except affine
    only_aff = augment_batch(images, labels, _gen(23), rd_en=False, ri_en=False)
    assert torch.equal(only_aff[1], ref_lab)


def test_augment_batch_full_size():
    images, labels = _random_batch(40, 192, 192, 4, seed=6)
    img, lab = augment_batch(images, labels, _gen(31), rd_en=True, sigma=5.0, ri_en=True)
    assert img.shape == (40, 1, 192, 192) and lab.shape == (40, 4, 192, 192)
    assert img.dtype == torch.float32 and lab.dtype == torch.float32
    assert torch.isfinite(img).all()
    assert lab.min() >= 0 and lab.max() <= 1 + 1e-6
    torch.testing.assert_close(lab.sum(dim=1), torch.ones(40, 192, 192), atol=1e-5, rtol=0)


def test_sample_affine_params_ranges():
    p = sample_affine_params(5000, _gen(41))
    counts = torch.bincount(p.choice, minlength=5)
    assert counts.numel() == 5 and counts.min() > 850  # ~1000 each
    assert p.rot_deg.min() >= -15 and p.rot_deg.max() <= 15 and p.rot_deg.std() > 7
    assert p.scale.min() >= 0.95 and p.scale.max() <= 1.05
    # rounded to 2 decimals: exactly the 11 values 0.95, 0.96, ..., 1.05
    assert torch.allclose(p.scale * 100, torch.round(p.scale * 100), atol=1e-9)
    assert p.scale.unique().numel() == 11
    assert 0.45 < p.flip.float().mean() < 0.55
    assert set(p.k45.tolist()) == set(range(8))
    again = sample_affine_params(5000, _gen(41))
    assert all(torch.equal(a, b) for a, b in zip(p, again, strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares CPU with a CUDA GPU")
def test_augment_batch_same_on_gpu_as_on_cpu():
    """The same generator stream gives the same batch on the GPU (random draws stay on the CPU
    and are copied asynchronously from pinned memory)."""
    images, labels = _random_batch(12, 64, 64, 4, seed=7)
    cpu = augment_batch(images, labels, _gen(41), rd_en=True, sigma=5.0, ri_en=True)
    gpu = augment_batch(images.cuda(), labels.cuda(), _gen(41), rd_en=True, sigma=5.0,
                        ri_en=True)
    torch.cuda.synchronize()
    for a, b in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("coupled", [True, False])
def test_intensity_draws_are_coupled_as_the_released_graph(coupled: bool) -> None:
    """The released graph's brightness and contrast ops, both seed 1 with no graph seed,
    drew the same uniform u: brit_cont_net's factor 0.7 + 0.6u is 1 + its shift -0.3 + 0.6u,
    contrast_net's factor 0.8 + 0.4u is 1 + 2 x its shift -0.1 + 0.2u."""
    from utils.augment import draw_intensity, draw_set_intensity

    gen = torch.Generator().manual_seed(0)
    sets = torch.stack([draw_set_intensity(gen, coupled) for _ in range(400)])
    shift, factor = sets[:, 0].double(), sets[:, 1].double()
    labeled = torch.stack([draw_intensity(gen, coupled) for _ in range(400)])
    factor2, shift2 = labeled[:, 0].double(), labeled[:, 1].double()
    for x, low, high in ((shift, -0.3, 0.3), (factor, 0.7, 1.3), (shift2, -0.1, 0.1),
                         (factor2, 0.8, 1.2)):
        assert low <= x.min() < low + 0.02 and high - 0.02 < x.max() <= high
    if coupled:
        torch.testing.assert_close(factor, 1 + shift, atol=1e-6, rtol=0)
        torch.testing.assert_close(factor2, 1 + 2 * shift2, atol=1e-6, rtol=0)
    else:
        assert abs(np.corrcoef(shift, factor)[0, 1]) < 0.15
        assert abs(np.corrcoef(shift2, factor2)[0, 1]) < 0.15


@pytest.mark.parametrize("coupled", [True, False])
def test_both_steps_draw_their_intensities_as_set(coupled: bool) -> None:
    from utils.baseline_training import BaselineSettings, draw_baseline
    from utils.joint_training import JointData, JointSettings, draw_joint

    gen = torch.Generator().manual_seed(1)
    s = BaselineSettings(num_classes=3, batch_size=4,
                         augment=DiceAugment(coupled_intensity=coupled))
    base = [draw_baseline(torch.arange(5), s, 32, 32, gen).augment.intensity for _ in range(50)]
    j = JointSettings(num_classes=3, n_seg=4, bt_size=2,
                      augment=DiceAugment(coupled_intensity=coupled))
    index = torch.arange(4)
    data = JointData(torch.zeros(4, 1, 32, 32), torch.zeros(4, 32, 32, dtype=torch.long),
                     index, index, torch.zeros(4, 1, 32, 32),
                     torch.zeros(4, 32, 32, dtype=torch.long), index)
    joint = [draw_joint(data, j, gen) for _ in range(50)]
    pairs = [(d[0], 1 + 2 * d[1]) for d in base] + \
        [(d.augment.intensity[0], 1 + 2 * d.augment.intensity[1]) for d in joint] + \
        [(d.sets[k, 1], 1 + d.sets[k, 0]) for d in joint for k in (0, 1)]
    equal = [abs(float(a) - float(b)) < 1e-6 for a, b in pairs]
    assert all(equal) if coupled else not any(equal)


@pytest.mark.parametrize("step", ["baseline", "joint"])
def test_dice_batch_intensity_as_the_released_code_by_default(step) -> None:
    """The released batch kept the deformed slices and dropped their intensity-augmented copy:
    with --rd_en 1 no intensity augmentation reaches the Dice batch unless
    --intensity_with_deformation 1; with --rd_en 0 it does (when --ri_en 1)."""
    from utils.baseline_training import BaselineSettings
    from utils.flags import parse_flags
    from utils.joint_training import JointSettings

    def ri_en(*flags: str) -> bool:
        args, cfg = parse_flags(step, ["--dataset", "demo", *flags])
        if step == "baseline":
            return BaselineSettings.from_flags(args, cfg.num_classes, cfg.batch_size).augment.ri_en
        return JointSettings.from_flags(args, cfg.num_classes, cfg.mtask_bs).augment.ri_en

    assert ri_en() is False
    assert ri_en("--rd_en", "0") is True
    assert ri_en("--intensity_with_deformation", "1") is True
    assert ri_en("--rd_en", "0", "--ri_en", "0") is False
    assert ri_en("--intensity_with_deformation", "1", "--ri_en", "0") is False
