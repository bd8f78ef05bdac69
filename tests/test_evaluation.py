"""Metrics against numpy, medpy and an independent distance computation; test-result files."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from medpy.metric import binary
from scipy import ndimage

from utils.evaluation import (
    EvalVolume,
    dice_per_class,
    evaluate_test_set,
    mean_foreground_dice,
    prepare_volume,
    structure_metrics,
    summarize,
    validation_score,
    write_test_results,
)
from utils.io import Volume, read_raw_volume
from utils.preprocess import to_target

# ---------------------------------------------------------------- hard Dice


def _dice_numpy_loop(pred: np.ndarray, true: np.ndarray, num_classes: int) -> np.ndarray:
    out = []
    for c in range(1, num_classes):
        p = pred == c
        t = true == c
        if p.sum() == 0 and t.sum() == 0:
            out.append(1.0)
        elif p.sum() == 0 or t.sum() == 0:
            out.append(0.0)
        else:
            out.append(2.0 * np.logical_and(p, t).sum() / (p.sum() + t.sum()))
    return np.array(out)


@pytest.mark.parametrize("shape", [(2, 16, 16), (8, 9, 5)])
def test_dice_per_class_matches_numpy(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    num_classes = 5
    pred = rng.integers(0, 4, size=shape)  # class 4 never predicted
    true = rng.integers(0, 4, size=shape)
    true[true == 3] = 4  # class 3 only in pred, class 4 only in true
    num_classes = 6  # class 5 absent from both
    got = dice_per_class(torch.from_numpy(pred), torch.from_numpy(true), num_classes)
    expected = _dice_numpy_loop(pred, true, num_classes)
    assert got.shape == (num_classes - 1,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    np.testing.assert_array_equal(got.numpy()[2:], [0.0, 0.0, 1.0])
    assert 0.0 < got[0] < 1.0


def test_dice_per_class_hand_worked() -> None:
    pred = torch.tensor([[1, 1, 0, 2]])
    true = torch.tensor([[1, 0, 0, 0]])
    got = dice_per_class(pred, true, 3)
    torch.testing.assert_close(got, torch.tensor([2 * 1 / 3, 0.0], dtype=torch.float64))


def _surface_distances(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
    """Distances (mm) from the surface voxels of a to the surface of b, by brute force."""
    def surface(m):
        # surface = voxels removed by a face-connected erosion (medpy's definition)
        return np.argwhere(m & ~ndimage.binary_erosion(m, ndimage.generate_binary_structure(3, 1)))
    sa, sb = surface(a) * spacing, surface(b) * spacing
    d = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))
    return d.min(1)


def test_mean_foreground_dice_leaves_out_structures_absent_from_both_maps() -> None:
    true = torch.zeros(10, 10, dtype=torch.long)
    true[:4, :5] = 1  # 20 px
    true[6:, :5] = 2  # 20 px
    pred = true.clone()
    pred[:4, :5][:, :1] = 0  # class 1: 16 of 20 found -> 32 / 36
    pred[6:, :5] = 0  # class 2 missed -> 0
    # class 3 absent from both: sklearn's f1_score(average=None) has no entry for it
    assert mean_foreground_dice(pred, true, 4) == pytest.approx((32 / 36 + 0.0) / 2)
    assert dice_per_class(pred, true, 4).mean() == pytest.approx((32 / 36 + 0 + 1) / 3)
    pred[0, 9] = 3  # predicted only: scored 0, and counted
    assert mean_foreground_dice(pred, true, 4) == pytest.approx((32 / 36 + 0 + 0) / 3)
    empty = torch.zeros_like(true)
    assert np.isnan(mean_foreground_dice(empty, empty, 4))


class _ForegroundIsClassOne(torch.nn.Module):
    """Logits (N, 4, H, W) of class 1 wherever the image is bright, background elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.full_like(x, 5.0), 10 * x, -10 + 0 * x, -10 + 0 * x], 1)


def test_validation_score_averages_the_structures_present_as_the_released_code() -> None:
    label = np.zeros((16, 16, 3), np.int16)
    label[2:6, 2:12] = 1  # 40 px per slice
    label[9:13, 2:12] = 2  # predicted as class 1 too
    image = (label > 0).astype(np.float32)
    vol = Volume("001", image, label, (1.0, 1.0, 5.0), np.eye(4), nib.Nifti1Header(),
                 None, None)
    ev = prepare_volume(vol, (1.0, 1.0), (16, 16))
    score = validation_score(_ForegroundIsClassOne(), [ev, ev], 4, torch.device("cpu"))
    # class 1: 40 of 80 predicted px right -> 80 / 120; class 2: 0; class 3 left out
    assert score == pytest.approx((80 / 120 + 0.0) / 2)


def test_metrics_match_medpy_and_brute_force():
    rng = np.random.default_rng(0)
    gt = np.zeros((20, 18, 6), np.int16)
    gt[4:14, 5:12, 1:5] = 1
    gt[7:10, 7:10, 2:4] = 2
    pred = gt.copy()
    pred[ndimage.binary_dilation(gt == 1) & (rng.random(gt.shape) < 0.3)] = 1
    pred[13:15, 4:6, 1] = 2
    spacing = (1.2, 0.9, 5.0)
    metrics = structure_metrics(pred, gt, spacing, 3)
    for c, m in enumerate(metrics, start=1):
        p, g = pred == c, gt == c
        assert m["dice"] == pytest.approx(binary.dc(p, g))
        assert m["hd95"] == pytest.approx(binary.hd95(p, g, voxelspacing=spacing))
        assert m["assd"] == pytest.approx(binary.assd(p, g, voxelspacing=spacing))
        # independent: symmetric surface distances by brute force
        d_pg, d_gp = _surface_distances(p, g, spacing), _surface_distances(g, p, spacing)
        assert m["hd95"] == pytest.approx(np.percentile(np.concatenate([d_pg, d_gp]), 95))
        assert m["assd"] == pytest.approx(np.concatenate([d_pg, d_gp]).mean())


def test_empty_structures_are_defined_and_counted():
    gt = np.zeros((8, 8, 2), np.int16)
    gt[2:5, 2:5] = 1
    pred = np.zeros_like(gt)
    m_missing = structure_metrics(pred, gt, (1, 1, 1), 3)
    assert m_missing[0] == {"dice": 0.0, "hd95": None, "assd": None}  # missed structure
    assert m_missing[1] == {"dice": 1.0, "hd95": None, "assd": None}  # absent in both
    m_hit = structure_metrics(gt, gt, (1, 1, 1), 3)
    summary = summarize({"a": m_missing, "b": m_hit}, ("s1", "s2"))
    assert summary["per_structure"]["s1"]["dice"] == pytest.approx(0.5)
    assert summary["per_structure"]["s1"]["hd95"] == 0.0  # only the defined value is averaged
    assert summary["per_structure"]["s1"]["hd95_undefined"] == 1
    assert summary["per_structure"]["s2"]["hd95_undefined"] == 2
    assert summary["mean_dice"] == pytest.approx(np.mean([0.5, 1.0]))


class _Oracle(torch.nn.Module):
    """Returns large logits for a fixed cropped label map: a perfect model of one subject."""

    def __init__(self, label_c: np.ndarray, num_classes: int) -> None:
        super().__init__()
        onehot = torch.nn.functional.one_hot(
            torch.from_numpy(label_c).permute(2, 0, 1), num_classes)
        self.register_buffer("logits", onehot.permute(0, 3, 1, 2).float() * 20)
        self.calls = 0

    def forward(self, x):
        out = self.logits[self.calls : self.calls + x.shape[0]]
        self.calls += x.shape[0]
        return out


def test_evaluate_test_set_writes_native_predictions(acdc_root, tmp_path):
    vol = read_raw_volume("acdc", acdc_root, "001")
    # target spacing equal to native: the oracle's prediction maps back exactly
    image_c, label_c, geom = to_target(vol.image, vol.label, vol.spacing[:2], (1.5, 1.5), (64, 64))
    ev = EvalVolume(vol, image_c, geom)
    out = tmp_path / "test_results"
    summary = evaluate_test_set(_Oracle(label_c, 4), [ev], 4, ("rv", "myo", "lv"), out,
                                torch.device("cpu"), progress=False)
    assert summary["mean_dice"] == pytest.approx(1.0)
    pred_img = nib.load(str(out / "001" / "pred_seg_id_001.nii.gz"))
    assert pred_img.shape == vol.image.shape
    np.testing.assert_allclose(pred_img.affine, vol.affine)
    np.testing.assert_array_equal(np.asarray(pred_img.dataobj), vol.label)
    on_disk = json.loads((out / "summary.json").read_text())
    assert set(on_disk["per_subject"]["001"]) == {"rv", "myo", "lv"}
    assert set(on_disk["per_structure"]["lv"]) >= {"dice", "hd95", "assd"}
    for name in ("dsc_per_subject.txt", "dsc_per_struct.txt", "net_dsc_mean.txt",
                 "metrics_per_subject.csv"):
        assert (out / name).is_file()
    assert float((out / "net_dsc_mean.txt").read_text()) == pytest.approx(1.0)


def test_validation_score_is_the_mean_over_volumes_of_the_foreground_dice(acdc_root):
    # Native spacing as target: an oracle's cropped prediction maps back exactly. Volume 001
    # is predicted perfectly (1); volume 002 loses class 1 (Dice 0, classes 2, 3: 1, mean 2/3).
    evs, logits = [], []
    for sid in ("001", "002"):
        vol = read_raw_volume("acdc", acdc_root, sid)
        shown = vol.label.copy()
        if sid == "002":
            shown[shown == 1] = 0
        image_c, label_c, geom = to_target(vol.image, shown, vol.spacing[:2], (1.5, 1.5),
                                           (64, 64))
        evs.append(EvalVolume(vol, image_c, geom))
        logits.append(_Oracle(label_c, 4).logits)
        want_002 = _dice_numpy_loop(shown, vol.label, 4)
    assert vol.label.shape[0] != vol.label.shape[1]  # non-square: a transposed map would fail
    np.testing.assert_array_equal(want_002, [0.0, 1.0, 1.0])
    oracle = _Oracle(np.zeros((1, 1, 1), np.int64), 4)
    oracle.logits = torch.cat(logits)  # the slices of 001, then those of 002
    score = validation_score(oracle, evs, 4, torch.device("cpu"))
    assert score == pytest.approx((1.0 + 2.0 / 3.0) / 2, abs=1e-12)


def test_result_files_hold_the_summary_values(tmp_path):
    def m(dice, hd, assd):
        return {"dice": dice, "hd95": hd, "assd": assd}

    per_subject = {"a": [m(0.8, 4.0, 1.5), m(0.2, None, None)],
                   "b": [m(0.6, 6.0, 2.5), m(1.0, 3.0, 0.5)]}
    names = ("s1", "s2")
    write_test_results(tmp_path, summarize(per_subject, names), names)
    np.testing.assert_allclose(np.loadtxt(tmp_path / "dsc_per_subject.txt"),
                               [[0.8, 0.2], [0.6, 1.0]])
    np.testing.assert_allclose(np.loadtxt(tmp_path / "dsc_per_struct.txt"), [0.7, 0.6])
    assert float(np.loadtxt(tmp_path / "net_dsc_mean.txt")) == pytest.approx(0.65)
    with open(tmp_path / "metrics_per_subject.csv", newline="") as f:
        rows = {r["subject"]: r for r in csv.DictReader(f)}
    assert rows["a"]["s1_hd95"] == "4.000000" and rows["a"]["s1_assd"] == "1.500000"
    assert rows["a"]["s2_hd95"] == rows["a"]["s2_assd"] == ""  # undefined: empty
    assert rows["b"]["s2_dice"] == "1.000000" and rows["b"]["s2_assd"] == "0.500000"
    assert rows["b"]["mean_dice"] == "0.800000"
