"""Pictures: slice choice, outlines, panel geometry, the PNG written, and the HTML report."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import blob_volume, write_nifti
from PIL import Image

from utils.evaluation import structure_metrics, summarize, write_test_results
from utils.figures import (
    PALETTE,
    crop_box,
    even_picks,
    margins,
    montage_canvas,
    outline,
    slices_to_show,
    to_screen,
    write_subject_figure,
)
from utils.io import save_nifti

STRUCTS = ("rv", "myo", "lv")


def test_even_picks_take_the_centre_of_equal_parts():
    assert even_picks(range(2, 10), 4) == [3, 5, 7, 9]  # parts 2-3, 4-5, 6-7, 8-9
    assert even_picks(range(10), 4) == [1, 3, 6, 8]  # centres 1.25, 3.75, 6.25, 8.75
    assert even_picks([5, 7], 4) == [5, 7]


def test_slices_to_show_spans_the_first_map_with_foreground():
    first = np.zeros((4, 4, 12), np.uint8)
    second = np.zeros((4, 4, 12), np.uint8)
    second[1, 1, 2:10] = 2
    assert slices_to_show([first, second], 4) == [3, 5, 7, 9]
    first[0, 0, 0] = 1
    first[0, 0, 3] = 1
    assert slices_to_show([first, second], 4) == [0, 1, 2, 3]
    assert slices_to_show([None, np.zeros((2, 2, 6))], 3) == [1, 3, 5]


def test_outline_is_the_inner_boundary():
    mask = np.zeros((7, 7), bool)
    mask[1:6, 2:5] = True  # 5 x 3 block
    expected = mask.copy()
    expected[2:5, 3] = False  # the three pixels with all four neighbours inside
    np.testing.assert_array_equal(outline(mask), expected)
    ring = np.ones((3, 3), bool)  # the image border counts as outside
    ring[1, 1] = False
    np.testing.assert_array_equal(outline(np.ones((3, 3), bool)), ring)


def test_to_screen_puts_x_right_and_y_up():
    a = np.zeros((3, 2), int)  # X = 3, Y = 2
    a[2, 0] = 1  # largest x, smallest y: bottom right on screen
    a[0, 1] = 2  # smallest x, largest y: top left
    np.testing.assert_array_equal(to_screen(a, (4, 6)), np.kron([[2, 0, 0], [0, 0, 1]],
                                                                np.ones((2, 2), int)))


def test_crop_box_hand_worked():
    labels = np.zeros((24, 24, 3), np.uint8)
    labels[2:13, 8:12, 1] = 1
    # x: 2..13 (11 px) widened by round(0.3 * 11) = 3; y: 8..12 (4 px) widened to 8 px
    assert crop_box([None, labels]) == (slice(0, 16), slice(6, 14))
    assert crop_box([np.zeros((5, 6, 2))]) == (slice(0, 5), slice(0, 6))


def _moving_square_volume() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """24 x 24 x 12 volume: on slice z in 2..9 a 4 x 4 square of class 1 at x = z..z+3,
    y = 8..11; the prediction equals it and adds class 3 as one voxel at (2, 9) on every
    slice (outside the square on every slice shown)."""
    rng = np.random.default_rng(0)
    image = rng.normal(100, 10, (24, 24, 12)).astype(np.float32)
    gt = np.zeros((24, 24, 12), np.uint8)
    for z in range(2, 10):
        gt[z:z + 4, 8:12, z] = 1
    pred = gt.copy()
    pred[2, 9, :] = 3
    return image, gt, pred


def _colour_pixels(rgb: np.ndarray, cls: int) -> np.ndarray:
    return np.all(np.abs(rgb - PALETTE[cls - 1]) < 0.6 / 255, axis=-1)


def test_montage_draws_each_structure_on_the_right_slice():
    image, gt, pred = _moving_square_volume()
    slices = slices_to_show([gt, pred], 4)
    assert slices == [3, 5, 7, 9]
    canvas, rows, cols = montage_canvas(image, [("image", None), ("ground truth", gt),
                                                ("prediction", pred)], (1.0, 1.0), slices, 4)
    # crop (0:16, 6:14) -> 16 x 8 voxels shown 160 x 80 pixels: each voxel is 10 x 10; panels
    # 80 rows x 160 columns, 4 pixels apart.
    assert canvas.shape == (3 * 80 + 2 * 4, 4 * 160 + 3 * 4, 3)
    assert rows == [40, 124, 208] and cols == [80, 244, 408, 572]
    for k, z in enumerate(slices):
        expected = np.zeros((80, 160), bool)
        # x = z..z+3 -> columns 10z..10z+39; y = 8..11 is 2..5 in the crop, rows 20..59 (Y up)
        expected[20:60, 10 * z:10 * z + 40] = True
        expected[21:59, 10 * z + 1:10 * z + 39] = False
        # the class-3 voxel (2, 9) is (2, 3) in the crop: rows 40..49, columns 20..29
        voxel = np.zeros((80, 160), bool)
        voxel[40:50, 20:30] = True
        voxel[41:49, 21:29] = False
        for r in range(3):
            p = canvas[r * 84:r * 84 + 80, k * 164:k * 164 + 160]
            np.testing.assert_array_equal(_colour_pixels(p, 1), expected & (r > 0))
            np.testing.assert_array_equal(_colour_pixels(p, 3), voxel & (r == 2))
            assert not _colour_pixels(p, 2).any()


def test_subject_figure_png_shows_the_canvas_unresampled(tmp_path):
    image, gt, pred = _moving_square_volume()
    path = tmp_path / "figures" / "007.png"
    write_subject_figure(path, "007", image, gt, pred, (1.0, 1.0, 5.0), [1.0, 1.0, 0.0],
                         STRUCTS)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size < 300_000
    assert [p.name for p in path.parent.iterdir()] == ["007.png"]  # no temporary left
    png = np.asarray(Image.open(path).convert("RGB")) / 255.0
    canvas, _, _ = montage_canvas(image, [("image", None), ("ground truth", gt),
                                          ("prediction", pred)], (1.0, 1.0), [3, 5, 7, 9], 4)
    left, _, top, _ = margins("x\ny")  # the subject title has two lines
    shown = png[top:top + canvas.shape[0], left:left + canvas.shape[1]]
    assert shown.shape == canvas.shape
    for cls in (1, 3):
        np.testing.assert_array_equal(_colour_pixels(shown, cls), _colour_pixels(canvas, cls))
    # greys: 64 levels, mapped by PIL to a near one (not always the nearest)
    assert np.abs(shown - canvas).max() <= 8 / 255


# ---- the HTML report -----------------------------------------------------------------------


def _fake_runs(tmp_path: Path, n: int = 8) -> tuple[Path, Path, Path]:
    """Raw ACDC-layout data of ``n`` subjects and two finished 'runs' whose predictions are
    the ground truth shifted by subject-dependent amounts (different in each run)."""
    raw = tmp_path / "raw"
    runs = []
    for name in ("baseline/tr1_c1_v0", "joint/tr1_c1_v0/original"):
        run = tmp_path / "runs" / name
        (run / "test_results").mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump({"config": {
            "data_layout": "acdc", "data_path_tr": str(raw), "struct_name": list(STRUCTS)}}))
        runs.append(run)
    per_subject: list[dict] = [{}, {}]
    for i in range(1, n + 1):
        sid = f"{i:03d}"
        image, label = blob_volume(seed=i)
        pdir = raw / f"patient{sid}"
        img_path = write_nifti(pdir / f"patient{sid}_frame01.nii.gz", image)
        write_nifti(pdir / f"patient{sid}_frame01_gt.nii.gz", label.astype(np.uint8))
        affine = np.diag([1.5, 1.5, 8.0, 1.0])
        affine[:3, 3] = [-10.0, 5.0, 2.0]
        for r, run in enumerate(runs):
            shift = i % 4 + r * (1 + i % 3)  # never the same in both runs
            pred = np.roll(label, shift, axis=0).astype(np.uint8)
            save_nifti(run / "test_results" / sid / f"pred_seg_id_{sid}.nii.gz", pred, affine,
                       None)
            per_subject[r][sid] = structure_metrics(pred, label, (1.5, 1.5, 8.0), 4)
        assert img_path.is_file()
    for run, metrics in zip(runs, per_subject):
        write_test_results(run / "test_results", summarize(metrics, STRUCTS), STRUCTS)
    return raw, runs[0], runs[1]


def test_report_shows_the_largest_gains_and_losses(tmp_path, load_script):
    compare = load_script("compare_runs")
    _, baseline, joint = _fake_runs(tmp_path)
    out = tmp_path / "report.html"
    compare.main([str(baseline), str(joint), "--out", str(out)])
    text = out.read_text()
    # expected subjects, from the two summary.json files
    a = json.loads((baseline / "test_results" / "summary.json").read_text())
    b = json.loads((joint / "test_results" / "summary.json").read_text())
    diff = {s: b["per_subject_mean_dice"][s] - a["per_subject_mean_dice"][s]
            for s in a["per_subject_mean_dice"]}
    assert len(set(diff.values())) == len(diff)  # no ties in this data
    by_gain = sorted(diff, key=diff.get, reverse=True)
    gains_part, losses_part = text.split("<h2>Largest gains</h2>")[1].split(
        "<h2>Largest losses</h2>")
    assert re.findall(r"id='subject-(\d+)'", gains_part) == by_gain[:3]
    assert re.findall(r"id='subject-(\d+)'", losses_part) == by_gain[::-1][:3]
    for sid in by_gain[:3] + by_gain[-3:]:
        assert f"subject {sid}: {diff[sid]:+.4f}" in text
    # self-contained: every picture embedded, nothing fetched from elsewhere
    sources = re.findall(r'src="([^"]*)"', text)
    assert len(sources) == 7 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"(href|url)\s*[=(]", text) and "http" not in text
    for s in sources:
        png = base64.b64decode(s.split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 300_000
        Image.open(io.BytesIO(png)).verify()
    # per-structure table: both runs' Dice
    for name in STRUCTS:
        assert f"<td>{a['per_structure'][name]['dice']:.4f}</td><td>" \
               f"{b['per_structure'][name]['dice']:.4f}</td>" in text


def test_report_rows_are_ground_truth_baseline_joint(tmp_path, load_script):
    compare = load_script("compare_runs")
    raw, baseline, joint = _fake_runs(tmp_path, n=2)
    summaries = [compare.load_summary(d) for d in (baseline, joint)]
    config = yaml.safe_load((baseline / "config.yaml").read_text())["config"]
    png = compare.subject_png(baseline, joint, "002", config, *summaries, ("baseline", "joint"))
    shown = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) / 255.0
    from utils.io import read_raw_volume

    vol = read_raw_volume("acdc", raw, "002")
    preds = [compare.prediction(d, "002", "acdc") for d in (baseline, joint)]
    assert not np.array_equal(*preds)
    canvas, _, _ = montage_canvas(vol.image, [("ground truth", vol.label),
                                              ("baseline", preds[0]), ("joint", preds[1])],
                                  vol.spacing[:2], slices_to_show([vol.label], 4), 4)
    left, _, top, _ = margins("x\ny")
    region = shown[top:top + canvas.shape[0], left:left + canvas.shape[1]]
    for cls in (1, 2, 3):
        np.testing.assert_array_equal(_colour_pixels(region, cls), _colour_pixels(canvas, cls))


def test_report_needs_two_runs_and_table_keeps_many(tmp_path, load_script, capsys):
    compare = load_script("compare_runs")
    _, baseline, joint = _fake_runs(tmp_path, n=2)
    compare.main([str(baseline), str(joint), str(joint)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["test", "Dice", "baseline/tr1_c1_v0", "joint/original",
                                "joint/original"]
    assert lines[-1].startswith("mean") and len(lines) == 5
    with pytest.raises(SystemExit):
        compare.main([str(baseline), str(joint), str(joint), "--out", str(tmp_path / "r.html")])
    assert not (tmp_path / "r.html").exists()


def test_report_figures_are_the_pictures_of_the_report(tmp_path, load_script):
    compare = load_script("compare_runs")
    _, baseline, joint = _fake_runs(tmp_path, n=8)
    out, figures = tmp_path / "report.html", tmp_path / "figs"
    compare.main([str(baseline), str(joint), "--out", str(out), "--figures", str(figures)])
    text = out.read_text()
    embedded = [base64.b64decode(s) for s in re.findall(r'base64,([^"]*)"', text)]
    gains_part, losses_part = text.split("<h2>Largest gains</h2>")[1].split(
        "<h2>Largest losses</h2>")
    names = (["dice_differences.png"]
             + [f"gain_{s}.png" for s in re.findall(r"id='subject-(\d+)'", gains_part)]
             + [f"loss_{s}.png" for s in re.findall(r"id='subject-(\d+)'", losses_part)])
    assert sorted(p.name for p in figures.iterdir()) == sorted(names)
    # each file holds the picture shown at its place in the report
    assert [(figures / n).read_bytes() for n in names] == embedded
    with pytest.raises(SystemExit):
        compare.main([str(baseline), str(joint), "--figures", str(tmp_path / "other")])
    assert not (tmp_path / "other").exists()
