"""Pseudo-labelling: CRF-refined labels from a model, quality against ground truth, selection."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

import experiment_init
from utils.augment import AFF_FLIP, AFF_ROTATE, AFF_SCALE
from utils.crf import CRFParams
from utils.errors import ConfigError
from utils.evaluation import dice_per_class
from utils.pseudo_labels import (
    _warp,
    augmentation_overlap,
    draw_overlap_pair,
    draw_overlap_transform,
    make_pseudo_labels,
)


class NoisyOracle(torch.nn.Module):
    """Logits that favour the true class of a fixed label map, with speckle noise."""

    def __init__(self, labels: torch.Tensor, num_classes: int, flip: float, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        noisy = labels.clone()
        mask = torch.rand(labels.shape, generator=gen) < flip
        noisy[mask] = torch.randint(0, num_classes, (int(mask.sum()),), generator=gen)
        onehot = torch.nn.functional.one_hot(noisy, num_classes).permute(0, 3, 1, 2).float()
        self.register_buffer("logits", onehot * 2.0)
        self.offset = 0

    def forward(self, x):
        out = self.logits[self.offset : self.offset + x.shape[0]]
        self.offset = (self.offset + x.shape[0]) % self.logits.shape[0]
        return out


def _volume(z=4, size=96):
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    r = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2).sqrt()
    lab = torch.zeros(z, size, size, dtype=torch.long)
    lab[:, r < 30] = 1
    lab[:, r < 18] = 2
    return lab[:, None].float() / 2, lab


def test_pseudo_labels_are_refined_and_scored():
    images, gt = _volume()
    model = NoisyOracle(gt, 3, flip=0.15)
    out = make_pseudo_labels(model, {"001": (images, gt)}, 3, crf_params_for("prostate_md"),
                             torch.device("cpu"), torch.Generator().manual_seed(0),
                             progress=False)
    assert out.kept == ["001"] and out.labels.shape == gt.shape
    assert out.images.shape == images.shape
    # the raw argmax carries the speckles; the CRF removes most of them
    assert out.dice_before_crf < 0.9
    assert out.dice_after_crf > out.dice_before_crf + 0.03
    agree = (out.labels == gt).float().mean()
    assert agree > 0.97


def test_augmentation_overlap_selects_consistent_volumes():
    images, gt = _volume(z=2, size=64)

    class Threshold(torch.nn.Module):  # a rotation-equivariant "segmenter" of the phantom
        def forward(self, x):
            return torch.cat([(0.25 - x) * 40, -((x - 0.5).abs()) * 40, (x - 0.75) * 40], 1)

    gen = torch.Generator().manual_seed(0)
    score = augmentation_overlap(Threshold(), images, 3, torch.device("cpu"), gen)
    assert score > 0.9

    class Noise(torch.nn.Module):
        def forward(self, x):
            return torch.randn(x.shape[0], 3, *x.shape[2:])

    assert augmentation_overlap(Noise(), images, 3, torch.device("cpu"), gen) < 0.6
    with pytest.raises(ConfigError, match="test_f1_threshold"):
        make_pseudo_labels(Noise(), {"001": (images, gt)}, 3, crf_params_for("acdc"),
                           torch.device("cpu"), gen, test_aug_overlap=True, progress=False)


def test_overlap_scores_only_structures_predicted_as_the_released_code():
    images, gt = _volume(z=2, size=64)

    class Threshold(torch.nn.Module):  # the phantom's 3 classes, and a 4th never predicted
        def __init__(self, num_classes: int):
            super().__init__()
            self.num_classes = num_classes

        def forward(self, x):
            logits = [(0.25 - x) * 40, -((x - 0.5).abs()) * 40, (x - 0.75) * 40, x - 100]
            return torch.cat(logits[: self.num_classes], 1)

    def overlap(num_classes: int) -> float:
        return augmentation_overlap(Threshold(num_classes), images, num_classes,
                                    torch.device("cpu"), torch.Generator().manual_seed(3))

    assert 0.5 < overlap(3) < 1.0
    # sklearn's f1_score(average=None) has no entry for a class neither prediction holds
    assert overlap(4) == pytest.approx(overlap(3), abs=1e-12)

    class Background(torch.nn.Module):
        def forward(self, x):
            return torch.cat([x + 1, x - 1, x - 1], 1)

    # no structure in either prediction: NaN, which fails any threshold (the original's
    # np.mean of an empty list), so the volume is dropped
    with pytest.raises(ConfigError, match="test_f1_threshold"):
        make_pseudo_labels(Background(), {"001": (images, gt)}, 3, crf_params_for("acdc"),
                           torch.device("cpu"), torch.Generator().manual_seed(0),
                           test_aug_overlap=True, overlap_threshold=0.0, progress=False)


def crf_params_for(dataset: str) -> CRFParams:
    return CRFParams(**experiment_init.load(dataset).crf_params)


class FixedLogits(torch.nn.Module):
    """Returns the same logits for every call (one slice's worth, repeated over the batch)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1, -1, -1)


def test_crf_off_gives_the_argmax_and_unsure_share_is_counted():
    # 3 classes on 8 x 8: background sure, a class-1 block half sure (softmax 0.999) and half
    # unsure (0.6), one class-2 pixel unsure
    logits = torch.zeros(1, 3, 8, 8)
    logits[0, 0] = 10.0
    sure = torch.log(torch.tensor([0.0005, 0.999, 0.0005]))
    unsure = torch.log(torch.tensor([0.2, 0.6, 0.2]))
    for r in range(2, 6):
        for c in range(2, 6):
            logits[0, :, r, c] = sure if c < 4 else unsure
    logits[0, :, 0, 0] = torch.log(torch.tensor([0.1, 0.3, 0.6]))
    images = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    gt = logits.argmax(1).expand(2, -1, -1).clone()
    out = make_pseudo_labels(FixedLogits(logits), {"001": (images, gt)}, 3,
                             crf_params_for("acdc"), torch.device("cpu"),
                             torch.Generator().manual_seed(0), progress=False, use_crf=False)
    assert torch.equal(out.labels.long(), gt)  # no CRF: exactly the argmax
    assert out.dice_after_crf == out.dice_before_crf == 1.0
    # foreground pixels: 16 + 1 per slice; unsure: 8 + 1 per slice
    assert out.unsure_foreground == pytest.approx(9 / 17)
    with_crf = make_pseudo_labels(FixedLogits(logits), {"001": (images, gt)}, 3,
                                  crf_params_for("acdc"), torch.device("cpu"),
                                  torch.Generator().manual_seed(0), progress=False)
    assert not torch.equal(with_crf.labels.long(), gt)  # the CRF changes the unsure pixels


def _demo_pool() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Six volumes of 3, 5, 2, 4, 1 and 6 slices at the demo's 64 x 64, 4 classes: nested
    discs at random places over random 8 px blocks, each slice its own."""
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    pool = {}
    for k, z in enumerate((3, 5, 2, 4, 1, 6)):
        centre = torch.rand(z, 2, generator=gen) * 20 + 22
        r = ((yy - centre[:, :1, None]) ** 2 + (xx - centre[:, 1:, None]) ** 2).sqrt()
        lab = (r < 20).long() + (r < 13).long() + (r < 6).long()
        blocks = torch.rand(z, 8, 8, generator=gen).repeat_interleave(8, 1).repeat_interleave(8, 2)
        pool[f"{k:03d}"] = ((lab.float() / 3 + 0.5 * blocks)[:, None], lab)
    return pool


class _TinyNetwork(torch.nn.Module):
    """A segmenter of `_demo_pool`'s intensity levels plus a 3 x 3 convolution of fixed random
    weights: right on about 3 pixels in 4, with blotchy errors the CRF partly removes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.register_buffer("levels", torch.arange(4.0).view(1, 4, 1, 1) / 3 + 0.25)

    def forward(self, x):
        return -12 * (x - self.levels).abs() + self.conv(x)


@pytest.mark.parametrize("image_aware", [False, True])
def test_crf_workers_give_the_serial_pseudo_labels_bit_for_bit(image_aware: bool):
    pool, model = _demo_pool(), _TinyNetwork()
    params = crf_params_for("demo")
    if image_aware:  # a bilateral term that reads the image (a_sxy > 0.1 px)
        params = dataclasses.replace(params, a_sxy=3.0, a_srgb=0.1)

    def label(workers: int):
        return make_pseudo_labels(model, pool, 4, params, torch.device("cpu"),
                                  torch.Generator().manual_seed(0), progress=False,
                                  crf_workers=workers)

    serial, parallel = label(1), label(2)
    assert serial.kept == parallel.kept == list(pool)
    assert torch.equal(parallel.images, serial.images)
    assert parallel.labels.dtype == serial.labels.dtype == torch.uint8
    assert torch.equal(parallel.labels, serial.labels)
    assert parallel.dice_after_crf == serial.dice_after_crf
    assert parallel.dice_before_crf == serial.dice_before_crf
    # not vacuous: the CRF changed the network's argmax
    assert serial.dice_after_crf != serial.dice_before_crf
    argmax = torch.cat([model(images).argmax(1) for images, _ in pool.values()])
    assert (serial.labels.long() != argmax).float().mean() > 0.05


def test_one_crf_worker_refines_in_this_process(monkeypatch):
    def no_processes(*args, **kwargs):
        raise AssertionError("crf_workers=1 must not start processes")

    monkeypatch.setattr("utils.crf.ProcessPoolExecutor", no_processes)
    images, gt = _volume(z=2, size=48)
    out = make_pseudo_labels(NoisyOracle(gt, 3, flip=0.15), {"001": (images, gt)}, 3,
                             crf_params_for("acdc"), torch.device("cpu"),
                             torch.Generator().manual_seed(0), progress=False, crf_workers=1)
    assert out.labels.shape == gt.shape


# ------------------------------------------------------- test-time augmentation of the overlap


def test_overlap_transform_draws_match_the_original():
    # augment_3d_vol: one of rotation U(-30, 30), scaling round(U(0.9, 1.1), 2), left-right flip.
    draws = [draw_overlap_transform(torch.Generator().manual_seed(s)) for s in range(600)]
    counts = {c: sum(d.choice == c for d in draws) for c in (AFF_ROTATE, AFF_SCALE, AFF_FLIP)}
    assert sum(counts.values()) == len(draws)
    assert all(150 < n < 250 for n in counts.values())  # uniform over three: 200 +- 4 sigma
    rots = torch.tensor([d.rot_deg for d in draws])
    assert -30 <= rots.min() < -27 and 27 < rots.max() <= 30
    scales = torch.tensor([d.scale for d in draws], dtype=torch.float64)
    assert torch.equal(scales, torch.round(scales * 100) / 100)  # 2 decimals
    assert scales.min() == pytest.approx(0.9) and scales.max() == pytest.approx(1.1)
    # The flip is left-right (along W, numpy's fliplr of an (X, Y) slice) and always applied.
    x = torch.rand(2, 1, 6, 7, generator=torch.Generator().manual_seed(0))
    flip = next(d for d in draws if d.choice == AFF_FLIP)
    torch.testing.assert_close(_warp(x, flip.matrix(2, 6, 7)), torch.flip(x, dims=[-1]))


def test_overlap_pair_is_never_two_flips():
    pairs = [draw_overlap_pair(torch.Generator().manual_seed(s)) for s in range(400)]
    assert not any(a.choice == AFF_FLIP and b.choice == AFF_FLIP for a, b in pairs)
    # Flips still occur in either position (1/3 of first draws; 2/9 of second ones).
    assert sum(a.choice == AFF_FLIP for a, _ in pairs) > 100
    assert sum(b.choice == AFF_FLIP for _, b in pairs) > 60


class _Recorder(torch.nn.Module):
    """A two-class "segmenter" that keeps a copy of every input it is given."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.clone())
        return torch.cat([x, 1 - x], 1)


def test_overlap_check_never_predicts_two_flipped_copies():
    # Behaviour seen by the model: over many draws, never are both of its inputs the
    # left-right flip of the volume (that pair agrees trivially, ~1 volume in 9 before).
    images = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    flipped = torch.flip(images, dims=[-1])

    n_one_flip = 0
    for seed in range(60):
        model = _Recorder()
        augmentation_overlap(model, images, 2, torch.device("cpu"),
                             torch.Generator().manual_seed(seed))
        assert len(model.inputs) == 2
        is_flip = [torch.allclose(x, flipped, atol=1e-6) for x in model.inputs]
        assert not all(is_flip), f"seed {seed}: both augmentations are the same flip"
        n_one_flip += any(is_flip)
    assert n_one_flip >= 10  # flips do happen, so the check above is not vacuous


def _off_centre_phantom(z: int = 2, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """An asymmetric phantom about 12 pixels off the centre: an ellipse (class 1) holding a
    small off-axis disk (class 2); flips and rotations move it visibly. Kept within 25 pixels
    of the centre, so rotations up to 30 degrees and zooms up to 1.1 keep it in view."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    cy, cx = 24.0, 40.0
    lab = torch.zeros(z, size, size, dtype=torch.long)
    lab[:, ((yy - cy) / 8) ** 2 + ((xx - cx) / 12) ** 2 < 1] = 1
    lab[:, (yy - cy - 1) ** 2 + (xx - cx - 5) ** 2 < 20] = 2
    return lab[:, None].float() / 2, lab


class _Threshold(torch.nn.Module):
    """A pixel-wise segmenter of the phantom's intensities: equivariant to any warp."""

    def forward(self, x):
        return torch.cat([(0.25 - x) * 40, -((x - 0.5).abs()) * 40, (x - 0.75) * 40], 1)


def test_overlap_maps_predictions_back_before_comparing():
    # An equivariant segmenter agrees with itself under any pair of transforms once both
    # predictions are mapped back; compared in the warped frames (or mapped back the wrong
    # way) the off-centre phantom would not overlap for most pairs.
    images, gt = _off_centre_phantom()
    scores = [augmentation_overlap(_Threshold(), images, 3, torch.device("cpu"),
                                   torch.Generator().manual_seed(s)) for s in range(12)]
    assert min(scores) > 0.9, scores
    # Reference: the same pairs compared without mapping back really disagree.
    unmapped = []
    for s in range(12):
        preds = []
        for t in draw_overlap_pair(torch.Generator().manual_seed(s)):
            warped = _warp(images, t.matrix(images.shape[0], *images.shape[2:]))
            preds.append(_Threshold()(warped).argmax(1))
        unmapped.append(float(dice_per_class(preds[0], preds[1], 3).mean()))
    assert sum(u < 0.8 for u in unmapped) >= 6, unmapped


def test_pseudo_labels_keep_the_argmax_the_crf_started_from():
    images, gt = _volume(z=2, size=48)
    model = NoisyOracle(gt, 3, flip=0.15)
    args = ({"001": (images, gt)}, 3, crf_params_for("prostate_md"), torch.device("cpu"),
            torch.Generator().manual_seed(0))
    out = make_pseudo_labels(model, *args, progress=False)
    # the oracle's noisy map is its argmax; the round's figure shows exactly what was scored
    assert torch.equal(out.before_crf.long(), model.logits.argmax(1))
    assert out.before_crf.dtype == torch.uint8 and not torch.equal(out.before_crf, out.labels)
    assert float(dice_per_class(out.before_crf, gt, 3).mean()) == pytest.approx(
        out.dice_before_crf)
    assert make_pseudo_labels(model, *args, progress=False, use_crf=False).before_crf is None


def test_overlap_rotation_is_rigid_on_non_square_slices():
    # The model sees the volume rotated about its centre, as scipy rotates it, also on a
    # 48 x 80 slice (a height/width mix-up turns the rotation into a shear there).
    first, _ = draw_overlap_pair(torch.Generator().manual_seed(2))
    assert first.choice == AFF_ROTATE and abs(first.rot_deg) > 20
    x = np.zeros((48, 80))
    x[10:22, 30:70] = 1.0
    images = torch.from_numpy(x).float()[None, None].repeat(2, 1, 1, 1)

    model = _Recorder()
    augmentation_overlap(model, images, 2, torch.device("cpu"), torch.Generator().manual_seed(2))
    seen = model.inputs[0][0, 0].numpy() > 0.5
    ref = ndi.rotate(x, first.rot_deg, reshape=False, order=1) > 0.5
    assert 2 * (seen & ref).sum() / (seen.sum() + ref.sum()) > 0.97


def test_overlap_pixels_mostly_outside_the_view_are_background():
    # A model sure of class 1 everywhere; the pair is a flip (full view) and a zoom s > 1,
    # whose mapped-back prediction at column p reads the warped frame at c + s (p - c):
    # bilinear with zero padding covers 1 inside [0, W-1], W - u on (W-1, W), 1 + u on (-1, 0)
    # and 0 beyond (per axis; the product in 2D). Only pixels covered >= 1/2 stay class 1.
    flip, zoom = draw_overlap_pair(torch.Generator().manual_seed(25))
    assert flip.choice == AFF_FLIP and zoom.choice == AFF_SCALE and zoom.scale > 1.05
    h, w = 48, 64

    def coverage(n: int) -> np.ndarray:
        u = (n - 1) / 2 + zoom.scale * (np.arange(n) - (n - 1) / 2)
        return np.clip(np.minimum(1 + u, n - u), 0, 1)

    cov = coverage(h)[:, None] * coverage(w)[None, :]
    kept, kept_if_any = int((cov >= 0.5).sum()), int((cov > 0).sum())
    assert kept < kept_if_any < h * w  # a partly covered band exists
    logits = torch.zeros(1, 2, h, w)
    logits[:, 1] = 20.0
    score = augmentation_overlap(FixedLogits(logits), torch.rand(2, 1, h, w), 2,
                                 torch.device("cpu"), torch.Generator().manual_seed(25))
    assert score == pytest.approx(2 * kept / (h * w + kept), abs=1e-12)


def test_overlap_must_exceed_the_threshold():
    # METHOD §7.2 keeps a volume only if its overlap exceeds the threshold: a score equal to
    # the threshold drops it. The first volume draws from a fresh generator, so its score is
    # the one augmentation_overlap gives for that seed.
    images, gt = _off_centre_phantom()
    score = augmentation_overlap(_Threshold(), images, 3, torch.device("cpu"),
                                 torch.Generator().manual_seed(3))
    args = (_Threshold(), {"001": (images, gt)}, 3, crf_params_for("acdc"), torch.device("cpu"))
    kw = {"test_aug_overlap": True, "progress": False, "use_crf": False}
    out = make_pseudo_labels(*args, torch.Generator().manual_seed(3),
                             overlap_threshold=float(np.nextafter(score, 0.0)), **kw)
    assert out.kept == ["001"] and out.overlap["001"] == score
    with pytest.raises(ConfigError, match="test_f1_threshold"):
        make_pseudo_labels(*args, torch.Generator().manual_seed(3), overlap_threshold=score, **kw)
