"""Pseudo-labelling: CRF-refined labels from a model, quality against ground truth, selection."""

from __future__ import annotations

import pytest
import torch

import experiment_init
from utils.crf import CRFParams
from utils.pseudo_labels import augmentation_overlap, make_pseudo_labels


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
    with pytest.raises(ValueError, match="test_f1_threshold"):
        make_pseudo_labels(Noise(), {"001": (images, gt)}, 3, crf_params_for("acdc"),
                           torch.device("cpu"), gen, test_aug_overlap=True, progress=False)


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
