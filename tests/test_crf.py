"""Tests for the dense-CRF refinement used for pseudo-labels (utils/crf.py)."""

from __future__ import annotations

import dataclasses
import os
import signal

import numpy as np
import pytest
import torch
from scipy import ndimage

import experiment_init
from utils.crf import (
    CRFParams,
    CRFPool,
    crf_refine_slice,
    crf_refine_volume,
)

N_CLASSES = 3


def _disk_ring_labels(size: int) -> np.ndarray:
    """Smooth ground truth (size, size) int64: background 0, a central disk 1, a ring 2.

    Radii scale with ``size`` (disk r < 0.1875 size, ring 0.28-0.42 size), so that a 64 px
    map has a disk of radius 12 px and a ring 9 px thick.
    """
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2 + 0.5, xx - size / 2 + 0.5) / size
    labels = np.zeros((size, size), dtype=np.int64)
    labels[r < 0.1875] = 1
    labels[(r >= 0.28125) & (r < 0.421875)] = 2
    return labels


def _noisy_probs(
    labels: np.ndarray, seed: int, noise_frac: float = 0.08, wrong_prob: float = 0.6
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Make a network-like softmax of ``labels`` with salt-and-pepper errors.

    Returns:
        image (H, W) float32, clean softmax (C, H, W) float64, noisy softmax (C, H, W)
        float64. The clean softmax is softmax(8 * blurred one-hot) (max prob ~0.9993 inside
        regions, soft at the boundaries); in a random ``noise_frac`` of the pixels the
        probabilities are replaced by ``wrong_prob`` on a random wrong class and the rest
        shared equally by the other classes, so the argmax has isolated speckles.
    """
    rng = np.random.default_rng(seed)
    one_hot = np.stack([(labels == c).astype(np.float64) for c in range(N_CLASSES)])
    logits = 8.0 * np.stack([ndimage.gaussian_filter(o, 1.0) for o in one_hot])
    clean = np.exp(logits - logits.max(axis=0))
    clean /= clean.sum(axis=0)
    noisy = clean.copy()
    mask = rng.random(labels.shape) < noise_frac
    wrong = (labels + rng.integers(1, N_CLASSES, labels.shape)) % N_CLASSES
    for c in range(N_CLASSES):
        noisy[c][mask] = (1.0 - wrong_prob) / (N_CLASSES - 1)
        noisy[c][mask & (wrong == c)] = wrong_prob
    image = (0.4 * labels + rng.normal(0.0, 0.05, labels.shape)).astype(np.float32)
    return image, clean, noisy


def _n_components(labels: np.ndarray) -> list[int]:
    """Number of 4-connected components of each class."""
    return [int(ndimage.label(labels == c)[1]) for c in range(N_CLASSES)]


def _dice(pred: np.ndarray, gt: np.ndarray, c: int) -> float:
    """Dice of class ``c`` between two label maps."""
    p, g = pred == c, gt == c
    return float(2.0 * (p & g).sum() / (p.sum() + g.sum()))


# (dataset, map size): ACDC/MMWHS smooth with a 10 px std, so their map is twice as large to
# keep the structures several stds wide (as the cardiac structures are at 192 px).
@pytest.mark.parametrize(
    ("dataset", "size", "seed"),
    [("prostate_md", 64, 0), ("prostate_md", 64, 3), ("acdc", 128, 0), ("mmwhs", 128, 1)],
)
def test_crf_removes_speckles(dataset: str, size: int, seed: int) -> None:
    gt = _disk_ring_labels(size)
    image, _, noisy = _noisy_probs(gt, seed=seed)
    noisy_labels = noisy.argmax(axis=0)
    refined = crf_refine_slice(image, noisy, crf_params_for(dataset))
    refined_labels = refined.argmax(axis=0)

    acc_before = (noisy_labels == gt).mean()
    acc_after = (refined_labels == gt).mean()
    assert acc_before < 0.93  # the noise really corrupts ~8 % of the pixels
    assert acc_after > acc_before + 0.04, (acc_before, acc_after)
    for c in (1, 2):
        assert _dice(refined_labels, gt, c) > _dice(noisy_labels, gt, c) + 0.03
    comps_before, comps_after = _n_components(noisy_labels), _n_components(refined_labels)
    for c in range(N_CLASSES):
        assert comps_after[c] < 0.5 * comps_before[c], (comps_before, comps_after)


@pytest.mark.parametrize("dataset", ["acdc", "mmwhs", "prostate_md", "demo"])
def test_confident_clean_map_is_unchanged(dataset: str) -> None:
    # Non-square map with an off-centre disk and a rectangle: a transposed or mis-flattened
    # pixel layout would move the structures and fail the agreement check.
    height, width = 48, 80
    yy, xx = np.mgrid[:height, :width]
    gt = np.zeros((height, width), dtype=np.int64)
    gt[(yy - 20) ** 2 + (xx - 25) ** 2 < 12**2] = 1
    gt[8:40, 50:72] = 2
    eps = 1e-4  # max prob 0.9997, typical of a trained network inside structures
    probs = np.stack([gt == c for c in range(N_CLASSES)]).astype(np.float32) * (1 - 3 * eps)
    probs += eps
    refined = crf_refine_slice(0.5 * gt.astype(np.float32), probs, crf_params_for(dataset))
    assert (refined.argmax(axis=0) == gt).mean() >= 0.999


def test_moderately_confident_small_structure_is_erased_by_acdc_params() -> None:
    # Documents a property of the published parameters: with g_w2 = 30 and g_sxy = 10 px the
    # smoothness term outweighs a 0.97-confident unary for a disk of radius ~g_sxy.
    height, width = 48, 80
    yy, xx = np.mgrid[:height, :width]
    gt = np.zeros((height, width), dtype=np.int64)
    gt[(yy - 20) ** 2 + (xx - 25) ** 2 < 12**2] = 1
    probs = np.stack([gt == c for c in range(2)]).astype(np.float32) * 0.96 + 0.02
    refined = crf_refine_slice(np.zeros_like(gt, dtype=np.float32), probs, crf_params_for("acdc"))
    assert (refined.argmax(axis=0) == 1).sum() < 0.1 * (gt == 1).sum()


@pytest.mark.parametrize("exact_bilateral", [False, True])
def test_zero_pairwise_weights_return_input_softmax(exact_bilateral: bool) -> None:
    # With both Potts weights 0 mean field reduces to softmax(-unary) = softmax(log p) = p,
    # whatever the number of iterations: checks the unary and the (C, H*W) layout.
    rng = np.random.default_rng(1)
    logits = rng.normal(0.0, 2.0, (4, 24, 40))
    probs = np.exp(logits) / np.exp(logits).sum(axis=0)
    image = rng.random((24, 40)).astype(np.float32)
    params = dataclasses.replace(crf_params_for("acdc"), a_w1=0.0, g_w2=0.0)
    refined = crf_refine_slice(image, probs, params, exact_bilateral=exact_bilateral)
    np.testing.assert_allclose(refined, probs, atol=1e-3)


def test_self_term_shortcut_matches_library_bilateral() -> None:
    # a_sxy = 0.01 makes the bilateral kernel the identity; the default path applies it as a
    # self term instead of building the lattice. Both must agree.
    rng = np.random.default_rng(2)
    logits = np.stack(
        [ndimage.gaussian_filter(rng.normal(size=(40, 56)), 3.0) * 30 for _ in range(4)]
    )
    probs = np.exp(logits - logits.max(axis=0))
    probs /= probs.sum(axis=0)
    image = 2.0 * rng.random((40, 56)).astype(np.float32)
    for dataset in ("acdc", "prostate_md"):
        params = crf_params_for(dataset)
        fast = crf_refine_slice(image, probs, params)
        exact = crf_refine_slice(image, probs, params, exact_bilateral=True)
        np.testing.assert_allclose(fast, exact, atol=1e-3)
        assert (fast.argmax(axis=0) == exact.argmax(axis=0)).mean() >= 0.999


def _dense_mean_field(probs: np.ndarray, params: CRFParams, normalisation: str) -> np.ndarray:
    """Brute-force mean field of the CRF in utils/crf.py, for a small slice.

    The exact (N, N) Gaussian kernel of the pixel positions (N = H * W, self term included),
    normalised ``"symmetric"`` (D^-1/2 K D^-1/2, pydensecrf's NORMALIZE_SYMMETRIC) or
    ``"after"`` (D^-1 K, NORMALIZE_AFTER), D = diag(K 1); the bilateral term with a_sxy <= 0.1
    px is the identity. Q <- softmax(log p + g_w2 K~ Q + a_w1 Q), ``n_iter`` times, from
    Q = p (clipped at 1e-5). probs (C, H, W) -> (C, H, W) float64.
    """
    n_classes, height, width = probs.shape
    yy, xx = np.mgrid[:height, :width]
    pos = np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.float64)
    kernel = np.exp(-((pos[:, None] - pos[None]) ** 2).sum(-1) / (2 * params.g_sxy**2))
    degree = kernel.sum(axis=1)
    if normalisation == "symmetric":
        kernel = kernel / np.sqrt(degree[:, None] * degree[None])
    else:
        kernel = kernel / degree[:, None]
    log_p = np.log(np.clip(probs, 1e-5, None)).reshape(n_classes, -1)
    q = np.exp(log_p) / np.exp(log_p).sum(axis=0)
    for _ in range(params.n_iter):
        score = log_p + params.g_w2 * q @ kernel.T + params.a_w1 * q
        q = np.exp(score - score.max(axis=0))
        q /= q.sum(axis=0)
    return q.reshape(n_classes, height, width)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refinement_matches_brute_force_mean_field(seed: int) -> None:
    # pydensecrf's lattice approximates the Gaussian; over a few iterations (before mean field
    # settles into one of several fixed points) it stays within a mean ~0.003 of the exact
    # kernel.
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, (3, 20, 24))
    probs = (np.exp(logits) / np.exp(logits).sum(axis=0)).astype(np.float32)
    image = rng.normal(size=(20, 24)).astype(np.float32)
    for params in (CRFParams(a_sxy=0.01, a_srgb=0.5, a_w1=10.0, g_sxy=5.0, g_w2=30.0, n_iter=1),
                   CRFParams(a_sxy=0.01, a_srgb=0.5, a_w1=1.0, g_sxy=5.0, g_w2=3.0, n_iter=3)):
        refined = crf_refine_slice(image, probs, params)
        assert np.abs(refined - _dense_mean_field(probs, params, "symmetric")).mean() < 0.005


@pytest.mark.parametrize(
    ("g_sxy", "a_w1", "n_iter"), [(3.0, 0.0, 1), (5.0, 1.0, 3), (10.0, 0.0, 1)]
)
def test_gaussian_term_is_symmetrically_normalised(g_sxy: float, a_w1: float, n_iter: int) -> None:
    # A spatially constant map tells the normalisations apart: the row-normalised kernel
    # (NORMALIZE_AFTER) leaves it constant, the released code's symmetric one passes less
    # mass near the borders than in the middle. The library's pattern must be the exact
    # symmetric kernel's.
    probs = np.stack([np.full((20, 24), v) for v in (0.5, 0.3, 0.2)]).astype(np.float32)
    params = CRFParams(a_sxy=0.01, a_srgb=0.5, a_w1=a_w1, g_sxy=g_sxy, g_w2=3.0, n_iter=n_iter)
    refined = crf_refine_slice(np.zeros((20, 24), dtype=np.float32), probs, params)[0]
    expected = _dense_mean_field(probs, params, "symmetric")[0]
    pattern, expected_pattern = refined - refined.mean(), expected - expected.mean()
    assert np.corrcoef(pattern.ravel(), expected_pattern.ravel())[0, 1] > 0.95
    assert 0.8 < pattern.std() / expected_pattern.std() < 1.25
    assert np.ptp(_dense_mean_field(probs, params, "after")[0]) < 1e-9  # the alternative


def test_bilateral_self_term_sharpens_uniform_map() -> None:
    # With no Gaussian term and a_sxy = 0.01, the bilateral term still acts through the pixel
    # itself (pydensecrf includes k(i, i)): a uniform 0.6/0.4 map is pushed towards 1/0.
    probs = np.stack([np.full((16, 16), 0.6), np.full((16, 16), 0.4)])
    image = np.random.default_rng(3).random((16, 16)).astype(np.float32)
    params = CRFParams(a_sxy=0.01, a_srgb=0.5, a_w1=10.0, g_sxy=10.0, g_w2=0.0, n_iter=30)
    for exact in (False, True):
        refined = crf_refine_slice(image, probs, params, exact_bilateral=exact)
        assert refined[0].min() > 0.99


def test_probabilities_below_the_floor_count_as_the_floor() -> None:
    # Unary -log(max(p, 1e-5)) as pydensecrf's unary_from_softmax: exact zeros of a one-hot
    # map (which would give an infinite unary) refine exactly like probabilities of 1e-5.
    gt = np.zeros((24, 32), dtype=np.int64)
    gt[6:18, 8:24] = 1
    probs = np.stack([gt == 0, gt == 1]).astype(np.float32)
    probs[:, 12, 16] = [1.0, 0.0]  # an isolated certain pixel inside the square
    image = np.zeros((24, 32), dtype=np.float32)
    params = crf_params_for("prostate_md")
    np.testing.assert_array_equal(crf_refine_slice(image, probs, params),
                                  crf_refine_slice(image, np.maximum(probs, 1e-5), params))


def test_bilateral_intensity_std_keeps_a_stripe_of_its_own_intensity() -> None:
    # Bilateral term only (g_w2 = 0) on the lattice path (a_sxy = 3 px): a 3-px stripe of
    # intensity 1 in a background of 0, weakly labelled class 1 (0.6) among confident
    # class 0 (0.9). With a_srgb = 0.05 the stripe's pixels only talk to each other and it
    # survives; with a_srgb = 1000 the intensity no longer separates it and it is erased.
    image = np.zeros((24, 32), dtype=np.float32)
    image[:, 15:18] = 1.0
    stripe = image > 0.5
    probs = np.where(stripe, np.array([0.4, 0.6])[:, None, None],
                     np.array([0.9, 0.1])[:, None, None]).astype(np.float32)
    kept = []
    for a_srgb in (0.05, 1000.0):
        params = CRFParams(a_sxy=3.0, a_srgb=a_srgb, a_w1=10, g_sxy=5, g_w2=0, n_iter=10)
        kept.append((crf_refine_slice(image, probs, params).argmax(axis=0)[stripe] == 1).mean())
    assert kept[0] == 1.0 and kept[1] == 0.0


def test_slice_output_shape_dtype_and_normalisation() -> None:
    gt = _disk_ring_labels(32)
    image, clean, _ = _noisy_probs(gt, seed=0)
    refined = crf_refine_slice(image, clean, crf_params_for("acdc"))
    assert refined.shape == (N_CLASSES, 32, 32)
    assert refined.dtype == np.float32
    assert np.all(refined >= 0)
    np.testing.assert_allclose(refined.sum(axis=0), 1.0, atol=1e-4)


def test_volume_labels_match_slices_and_accept_torch() -> None:
    size = 64
    gt = _disk_ring_labels(size)
    slices = [_noisy_probs(gt, seed=s) for s in range(3)]
    images = np.stack([s[0] for s in slices])  # (N, H, W)
    probs = np.stack([s[2] for s in slices])  # (N, C, H, W)
    params = crf_params_for("prostate_md")

    labels = crf_refine_volume(images, probs, params)
    assert labels.shape == (3, size, size)
    assert labels.dtype == np.int64
    for i in range(3):
        expected = crf_refine_slice(images[i], probs[i], params).argmax(axis=0)
        np.testing.assert_array_equal(labels[i], expected)

    labels_torch = crf_refine_volume(torch.from_numpy(images), torch.from_numpy(probs), params)
    np.testing.assert_array_equal(labels_torch, labels)


def test_dataset_parameters() -> None:
    """The published values (METHOD §7.2) in the dataset configs; the demo's are scaled."""
    acdc = crf_params_for("acdc")
    assert acdc == CRFParams(a_sxy=0.01, a_srgb=0.5, a_w1=10, g_sxy=10, g_w2=30, n_iter=30)
    assert crf_params_for("mmwhs") == acdc
    assert crf_params_for("demo") == dataclasses.replace(acdc, g_sxy=6.0)
    assert crf_params_for("prostate_md") == CRFParams(
        a_sxy=0.01, a_srgb=0.5, a_w1=10, g_sxy=5, g_w2=30, n_iter=30
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        acdc.n_iter = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [{"g_sxy": 0.0}, {"a_srgb": -1.0}, {"g_w2": -1.0}, {"n_iter": -1}, {"n_iter": 2.5}],
)
def test_invalid_parameters_raise(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(crf_params_for("acdc"), **kwargs)


def test_shape_mismatch_errors_name_the_shapes() -> None:
    params = crf_params_for("acdc")
    image = np.zeros((32, 31), dtype=np.float32)
    probs = np.full((3, 32, 32), 1 / 3, dtype=np.float32)
    with pytest.raises(ValueError, match=r"\(3, 32, 32\).*\(32, 31\)"):
        crf_refine_slice(image, probs, params)
    with pytest.raises(ValueError, match=r"\(H, W\).*\(1, 32, 32\)"):
        crf_refine_slice(np.zeros((1, 32, 32)), probs, params)
    with pytest.raises(ValueError, match=r"\(2, 3, 32, 32\).*\(3, 32, 32\)"):
        crf_refine_volume(np.zeros((3, 32, 32)), np.full((2, 3, 32, 32), 1 / 3), params)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\).*\(3, 32, 32\)"):
        crf_refine_volume(np.zeros((3, 32, 32)), probs, params)
    bad = probs.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        crf_refine_slice(np.zeros((32, 32)), bad, params)


def crf_params_for(dataset: str) -> CRFParams:
    return CRFParams(**experiment_init.load(dataset).crf_params)


# ------------------------------------------------------------------- the pool of processes


def _pool_volumes() -> list[tuple[np.ndarray, np.ndarray]]:
    """Volumes of 3, 1, 4, 2 and 0 noisy 48 px slices, each slice's speckles and image its own
    (random 8 px blocks over the structures), so that slices swapped within or between volumes
    change the labels."""
    gt = _disk_ring_labels(48)
    volumes, seed = [], 0
    for n in (3, 1, 4, 2, 0):
        slices = [_noisy_probs(gt, seed=seed + i) for i in range(n)]
        blocks = np.random.default_rng(seed).random((n, 6, 6)).repeat(8, 1).repeat(8, 2)
        seed += n
        images = (np.stack([s[0] for s in slices]) + blocks if n else
                  np.zeros((0, 48, 48))).astype(np.float32)
        probs = np.stack([s[2] for s in slices]) if n else np.zeros((0, 3, 48, 48))
        volumes.append((images, probs))
    return volumes


# A bilateral term that reads the image (a_sxy > 0.1 px), unlike the published a_sxy = 0.01.
IMAGE_AWARE = CRFParams(a_sxy=3.0, a_srgb=0.1, a_w1=10.0, g_sxy=5.0, g_w2=30.0, n_iter=10)


@pytest.mark.parametrize("eager", [False, True])
def test_pool_gives_the_serial_labels_bit_for_bit(eager: bool) -> None:
    volumes = _pool_volumes()
    serial = [crf_refine_volume(images, probs, IMAGE_AWARE) for images, probs in volumes]
    # The images matter: each volume's labels change with another volume's image.
    for (_, probs), other, labels in zip(volumes[:3], (1, 2, 0), serial, strict=False):
        swapped = crf_refine_volume(volumes[other][0][:1], probs[:1], IMAGE_AWARE)
        assert not np.array_equal(swapped, labels[:1])
    with CRFPool(IMAGE_AWARE, 2, eager=eager, backlog=3) as pool:
        pending = []
        for images, probs in volumes:
            pending.append(pool.refine(images, torch.from_numpy(probs)))
            # at most `backlog` slices held in flight, or one volume when it has more
            assert pool._slices_in_flight() <= max(3, images.shape[0])
        parallel = [p.result() for p in pending]
    for got, want in zip(parallel, serial, strict=True):
        assert got.dtype == want.dtype == np.int64
        np.testing.assert_array_equal(got, want)


def _worker_settings() -> dict[str, object]:
    import torch

    return {"pid": os.getpid(), "parent": os.getppid(), "omp": os.environ.get("OMP_NUM_THREADS"),
            "torch_threads": torch.get_num_threads(),
            "ignored": [signal.getsignal(s) == signal.SIG_IGN
                        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)]}


def test_pool_workers_are_single_threaded_and_leave_stop_signals_to_the_parent() -> None:
    with CRFPool(IMAGE_AWARE, 2) as pool:
        got = pool._executor.submit(_worker_settings).result()
    assert got["pid"] != os.getpid()
    # forked from the fork server, never from this process (whose OpenMP threads have run)
    assert got["parent"] != os.getpid()
    assert got["omp"] == "1" and got["torch_threads"] == 1
    assert got["ignored"] == [True, True, True]


def test_one_worker_is_the_serial_path_in_this_process(monkeypatch) -> None:
    def no_processes(*args, **kwargs):
        raise AssertionError("workers=1 must not start processes")

    monkeypatch.setattr("utils.crf.ProcessPoolExecutor", no_processes)
    images, probs = _pool_volumes()[0]
    with CRFPool(IMAGE_AWARE, 1, eager=True) as pool:
        labels = pool.refine(images, probs).result()
    np.testing.assert_array_equal(labels, crf_refine_volume(images, probs, IMAGE_AWARE))
    with pytest.raises(ValueError, match="workers"):
        CRFPool(IMAGE_AWARE, 0)
