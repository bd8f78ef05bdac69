"""Wiring between well-tested numerical parts (issue 11): inputs whose origin can be read back.

Each test targets a plausible bug that the unit tests of the parts cannot see: the label not
following its image through augmentation, the test-set metrics computed with the wrong voxel
spacing or undefined distances averaged as 0, slices predicted in train mode, and the joint step
losing λ or the gradient of the local contrastive loss. (The overlap check's mapping back of
predictions is tested in test_pseudo_labels.py.)
"""

from __future__ import annotations

import copy

import nibabel as nib
import numpy as np
import pytest
import torch
from augment_composites import affine_augment, augment_batch
from conftest import nested_squares, write_nifti
from medpy.metric import binary

import utils.joint_training as joint_training
from losses.dice import soft_dice_loss
from losses.local_contrastive import local_contrastive_loss
from utils.augment import to_onehot
from utils.evaluation import EvalVolume, evaluate_test_set, predict_slices
from utils.io import read_raw_volume
from utils.mixed_precision import MixedPrecision
from utils.preprocess import to_target
from utils.training import NonFiniteGuard

CPU = torch.device("cpu")


# ------------------------------------------------------------- augmentation: label follows image


def _class_coded_batch(n: int, size: int, num_classes: int, seed: int):
    """Random 8x8 blocks of classes; the image encodes each pixel's class as (class + 1) / C,
    so the class can be read back from the warped image and compared with the warped label."""
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, num_classes, (n, size // 8, size // 8), generator=gen)
    labels = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)
    return (labels[:, None].float() + 1) / num_classes, labels


def _decode(images: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class read off a class-coded image (N, 1, H, W) -> (N, H, W); 0 (outside) -> background."""
    return (torch.round(images[:, 0] * num_classes) - 1).clamp(min=0).long()


@pytest.mark.parametrize("deform", [False, True])
def test_augmented_label_follows_its_image(deform):
    c = 4
    images, labels = _class_coded_batch(40, 48, c, seed=0)
    onehot = to_onehot(labels, c)
    gen = torch.Generator().manual_seed(1)
    if deform:
        img, lab = augment_batch(images, onehot, gen, rd_en=True, sigma=5.0, ri_en=False)
    else:
        img, lab = affine_augment(images, onehot, gen)
    agree = (_decode(img, c) == lab.argmax(1)).float().mean((1, 2))
    # Bilinear image against nearest (or soft) label differ only along block edges.
    assert agree.min() > (0.8 if deform else 0.85), agree
    # Most slices really moved: their original label no longer matches the warped image.
    stale = (_decode(img, c) == labels).float().mean((1, 2))
    assert (stale < 0.6).sum() >= 10


# ----------------------------------------------------------------------- test-set evaluation

SPACING = (0.7, 1.3, 5.0)  # mm, anisotropic in-plane and across slices


def _ground_truth(shape=(40, 36, 6)) -> np.ndarray:
    """Three off-centre structures of different extents in x, y and z."""
    gt = np.zeros(shape, np.int16)
    gt[6:22, 5:20, 1:5] = 1
    gt[10:18, 8:16, 2:4] = 2
    gt[26:34, 20:30, 1:6] = 3
    return gt


class _ReadPrediction(torch.nn.Module):
    """A "model" that reads its prediction off the image: the image holds the predicted class
    of each voxel, and the logits favour the nearest class code. Refuses train mode."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("codes", torch.arange(num_classes, dtype=torch.float32))

    def forward(self, x):
        assert not self.training, "prediction must run in eval mode"
        return -20.0 * (x - self.codes.view(1, -1, 1, 1)) ** 2


def _subject(root, sid: str, pred: np.ndarray, gt: np.ndarray) -> EvalVolume:
    pdir = root / f"patient{sid}"
    write_nifti(pdir / f"patient{sid}_frame01.nii.gz", pred.astype(np.float32), SPACING)
    write_nifti(pdir / f"patient{sid}_frame01_gt.nii.gz", gt.astype(np.uint8), SPACING)
    vol = read_raw_volume("acdc", root, sid)
    assert vol.spacing == pytest.approx(SPACING)
    # Target resolution = native spacing and no normalisation: the class codes reach the
    # "model" unchanged, so the saved prediction is exactly ``pred``.
    image_c, _, geom = to_target(vol.image, None, vol.spacing[:2], vol.spacing[:2], (48, 48),
                                 normalize=False)
    return EvalVolume(vol, image_c, geom)


def test_test_set_metrics_in_mm_and_undefined_distances_not_counted(tmp_path):
    gt = _ground_truth()
    # Subject 001: every structure found but displaced (1 and 2 by 2 voxels in x, 3 by one
    # slice); subject 002: structure 3 missed entirely, so its HD95 and ASSD are undefined.
    pred_a = np.roll(gt, 2, axis=0)
    pred_a[pred_a == 3] = 0
    pred_a[np.roll(gt == 3, 1, axis=2) & (np.arange(6) > 0)] = 3
    pred_b = gt.copy()
    pred_b[pred_b == 3] = 0
    names = ("s1", "s2", "s3")
    vols = [_subject(tmp_path / "raw", "001", pred_a, gt), _subject(tmp_path / "raw", "002",
                                                                     pred_b, gt)]
    out = tmp_path / "test_results"
    summary = evaluate_test_set(_ReadPrediction(4), vols, 4, names, out, CPU, progress=False)

    for sid, pred in (("001", pred_a), ("002", pred_b)):
        saved = np.asarray(nib.load(str(out / sid / f"pred_seg_id_{sid}.nii.gz")).dataobj)
        np.testing.assert_array_equal(saved, pred)
    # Distances in mm with the subject's own spacing, from medpy called independently.
    for c, name in enumerate(names, start=1):
        p, g = pred_a == c, gt == c
        got = summary["per_subject"]["001"][name]
        assert got["hd95"] == pytest.approx(binary.hd95(p, g, voxelspacing=SPACING))
        assert got["assd"] == pytest.approx(binary.assd(p, g, voxelspacing=SPACING))
    hd95_a = summary["per_subject"]["001"]["s3"]["hd95"]
    # One slice off: at least the slice spacing in mm (in voxels it would be about 1).
    assert hd95_a >= SPACING[2]
    missed = summary["per_subject"]["002"]["s3"]
    assert missed == {"dice": 0.0, "hd95": None, "assd": None}
    # Means over subjects skip the undefined value instead of counting it as 0 ...
    s3 = summary["per_structure"]["s3"]
    assert s3["hd95"] == pytest.approx(hd95_a)
    assert s3["assd"] == pytest.approx(summary["per_subject"]["001"]["s3"]["assd"])
    assert s3["hd95_undefined"] == 1 and s3["assd_undefined"] == 1
    # ... while the missed structure's Dice of 0 does count.
    assert s3["dice"] == pytest.approx(summary["per_subject"]["001"]["s3"]["dice"] / 2)


# ------------------------------------------------------------- slice prediction in eval mode


def _conv_bn(c_in: int, c_out: int) -> list[torch.nn.Module]:
    # No conv bias: batch norm removes it, so its gradient would be rounding noise only.
    return [torch.nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), torch.nn.BatchNorm2d(c_out),
            torch.nn.ReLU()]


def test_predict_slices_uses_running_statistics():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*_conv_bn(1, 8), *_conv_bn(8, 8), torch.nn.Conv2d(8, 3, 1))
    with torch.no_grad():  # running statistics unlike any batch's own statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
    x = torch.rand(6, 1, 32, 32, generator=gen)
    with torch.no_grad():
        train_mode = torch.softmax(copy.deepcopy(model).train()(x), 1)
        model.eval()
        ref = torch.softmax(model(x), 1)
        alone = torch.softmax(model(x[2:3]), 1)
    model.train()
    state = copy.deepcopy(model.state_dict())
    assert (train_mode - ref).abs().max() > 0.05  # the test can tell the two modes apart

    got = predict_slices(model, x, CPU, batch_size=4)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    # a slice's prediction does not depend on the other slices of its batch
    torch.testing.assert_close(predict_slices(model, x[2:3], CPU)[0], alone[0], atol=1e-5,
                               rtol=1e-4)
    assert model.training  # restored
    for k, v in model.state_dict().items():  # running statistics untouched
        assert torch.equal(v, state[k]), k


# ---------------------------------------------------------------------------- joint step


class _TinyJoint(torch.nn.Module):
    """JointUNet's interface at a fraction of its cost: all images through one shared trunk
    (batch norm), then the first n_seg to the segmentation head and the rest to the projection
    head. forward(x, n_seg) -> logits (n_seg, C, H, W), embeddings (N - n_seg, 4, H, W)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.trunk = torch.nn.Sequential(*_conv_bn(1, 8), *_conv_bn(8, 8))
        self.seg_head = torch.nn.Conv2d(8, num_classes, 3, padding=1)
        self.proj_head = torch.nn.Sequential(
            torch.nn.Conv2d(8, 8, 1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 4, 1))

    def forward(self, x, n_seg=None):
        f = self.trunk(x)
        if n_seg is None:
            return self.seg_head(f)
        f_seg, f_con = f.split([n_seg, x.shape[0] - n_seg])
        return self.seg_head(f_seg), self.proj_head(f_con)


def _joint_data() -> joint_training.JointData:
    lab_img, lab_lbl = nested_squares(6, 32, seed=0)
    unl_img, unl_lbl = nested_squares(6, 32, seed=1)
    every = torch.arange(6)
    return joint_training.JointData(lab_img, lab_lbl, every, every, unl_img, unl_lbl, every)


_JOINT_BATCH = joint_training.joint_batch_from


def _run_joint_step(model, settings, monkeypatch):
    """One joint_stepper step; returns (its losses, parameter gradients, batch, model call)."""
    recorded = {}

    def recording_batch(*args, **kwargs):
        recorded["batch"] = _JOINT_BATCH(*args, **kwargs)
        return recorded["batch"]

    def record_call(module, args, kwargs):
        recorded["call"] = (args, kwargs)

    monkeypatch.setattr(joint_training, "joint_batch_from", recording_batch)
    hook = model.register_forward_pre_hook(record_call, with_kwargs=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    step = joint_training.joint_stepper(model, optimizer, _joint_data(), settings,
                                        soft_dice_loss, torch.Generator().manual_seed(5),
                                        NonFiniteGuard(max_consecutive=3),
                                        MixedPrecision("cpu", None))
    losses = step(0)
    hook.remove()
    grads = {k: (torch.zeros_like(p) if p.grad is None else p.grad.clone())
             for k, p in model.named_parameters()}
    return losses, grads, recorded["batch"], recorded["call"]


@pytest.mark.parametrize("settings", [
    joint_training.JointSettings(num_classes=3, n_seg=4, bt_size=4, lamda_local=0.3),
    # Every setting of the local loss away from its default: one hard-wired would show.
    joint_training.JointSettings(num_classes=3, n_seg=4, bt_size=4, lamda_local=0.3,
                                 temp_fac=0.25, inter_image=False, loss_reduction="mean"),
], ids=["defaults", "other_local_loss_settings"])
def test_joint_step_gradient_is_dice_plus_lambda_local(monkeypatch, settings):
    torch.manual_seed(0)
    model = _TinyJoint(3)
    fresh = copy.deepcopy(model)
    (loss, loss_seg, loss_lcl), grads, batch, (args, kwargs) = _run_joint_step(
        model, settings, monkeypatch)
    _, y, yc, pos_idx = batch
    b = settings.bt_size
    # Intra-image pairs are each slice with itself (pixel-aligned labels); inter-image pairs
    # include different slices.
    assert torch.equal(yc[:b], yc[b:]) == (not settings.inter_image)

    # Independent computation on the same batch and the same call of a copy of the model.
    fresh.train()
    logits, emb = fresh(*args, **kwargs)
    dice = soft_dice_loss(logits, y)
    local = local_contrastive_loss(emb, yc, pos_idx, temperature=settings.temp_fac,
                                   inter_image=settings.inter_image,
                                   reduction=settings.loss_reduction)
    assert loss_seg.item() == pytest.approx(dice.item(), rel=1e-5)
    assert loss_lcl.item() == pytest.approx(local.item(), rel=1e-5)
    assert loss.item() == pytest.approx(dice.item() + 0.3 * local.item(), rel=1e-5)
    dice_only = torch.autograd.grad(dice, list(fresh.parameters()), retain_graph=True,
                                    allow_unused=True)
    expected = torch.autograd.grad(dice + 0.3 * local, list(fresh.parameters()),
                                   allow_unused=True)
    reached_by_local_only = 0
    for (name, p), g_dice, g in zip(fresh.named_parameters(), dice_only, expected):
        g = torch.zeros_like(p) if g is None else g
        torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-4, msg=name)
        if g_dice is None or not g_dice.any():  # the projection head
            assert g.abs().sum() > 0, name
            reached_by_local_only += 1
    assert reached_by_local_only > 0


def test_joint_step_local_gradient_scales_with_lambda(monkeypatch):
    # Without reproducing the loss: doubling λ doubles the gradient of the parameters that
    # only the local loss reaches (the projection head) and leaves the others' Dice part.
    torch.manual_seed(0)
    base = _TinyJoint(3)
    grads = {}
    for lam in (0.0, 0.2, 0.4):
        settings = joint_training.JointSettings(num_classes=3, n_seg=4, bt_size=4,
                                                lamda_local=lam)
        (loss, loss_seg, loss_lcl), grads[lam], _, _ = _run_joint_step(
            copy.deepcopy(base), settings, monkeypatch)
        assert loss.item() == pytest.approx(loss_seg.item() + lam * loss_lcl.item(), rel=1e-6)
    local_only = [k for k, g in grads[0.0].items() if not g.any()]
    assert local_only  # the projection head gets nothing from the Dice term
    for k in grads[0.0]:
        g0, g1, g2 = grads[0.0][k], grads[0.2][k], grads[0.4][k]
        # every gradient is g_dice + λ g_local, so g(0.4) - g(0) = 2 (g(0.2) - g(0))
        torch.testing.assert_close(g2 - g0, 2 * (g1 - g0), atol=1e-5, rtol=1e-3, msg=k)
    assert all(grads[0.2][k].abs().sum() > 0 for k in local_only)
    assert sum((grads[0.2][k] - grads[0.0][k]).abs().sum() for k in grads[0.0]
               if k not in local_only) > 0  # the local loss reaches the shared trunk too

