"""Tests of the synthetic cardiac demo dataset (utils/demo_data.py, scripts/make_demo_data.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from utils.demo_data import (
    COMPLETE_MARKER,
    demo_dataset_complete,
    make_demo_dataset,
    make_demo_patient,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SEED = 0
PATIENTS = list(range(1, 13))


@pytest.fixture(scope="module")
def patients() -> dict[int, dict]:
    """Patients 1..12 of seed 0 (generated once for the module)."""
    return {n: make_demo_patient(n, SEED) for n in PATIENTS}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small dataset on disk: patients 001-004 (003 has ED != 1 for seed 0)."""
    out = tmp_path_factory.mktemp("demo") / "raw"
    return make_demo_dataset(out, ["001", "002", "003", "004"], seed=SEED)


def _phases(pat: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(pat["image_ed"], pat["label_ed"]), (pat["image_es"], pat["label_es"])]


def test_deterministic_per_seed_and_patient(patients: dict[int, dict]) -> None:
    again = make_demo_patient(5, SEED)
    for key in ("image_ed", "label_ed", "image_es", "label_es"):
        np.testing.assert_array_equal(again[key], patients[5][key])
    assert again["spacing"] == patients[5]["spacing"]
    assert (again["ed_frame"], again["es_frame"]) == (patients[5]["ed_frame"],
                                                      patients[5]["es_frame"])
    # Another seed, or another patient of the same seed, gives a different volume.
    for other in (make_demo_patient(5, SEED + 1), patients[6]):
        assert other["image_ed"].shape != again["image_ed"].shape or not np.array_equal(
            other["image_ed"], again["image_ed"]
        )


def test_shapes_types_and_ranges(patients: dict[int, dict]) -> None:
    for pat in patients.values():
        sx, sy, sz = pat["spacing"]
        assert 1.1 <= sx <= 1.8 and sx == sy
        assert 8.0 <= sz <= 10.0
        for image, label in _phases(pat):
            nx, ny, nz = image.shape
            assert 128 <= nx <= 176 and 128 <= ny <= 176 and 6 <= nz <= 12
            assert label.shape == image.shape
            assert image.dtype == np.float32 and label.dtype == np.uint8
            assert set(np.unique(label)) <= {0, 1, 2, 3}
            assert image.min() >= 0 and 200 < np.percentile(image, 99.5) < 2500
            np.testing.assert_array_equal(image, np.rint(image))  # int16-representable
        assert 1 <= pat["ed_frame"] < pat["es_frame"] <= 30


def test_anatomy(patients: dict[int, dict]) -> None:
    cross = ndimage.generate_binary_structure(2, 1)
    for n, pat in patients.items():
        for phase, (_, label) in zip(("ed", "es"), _phases(pat), strict=True):
            nz = label.shape[2]
            mid = label[:, :, nz // 2]
            assert set(np.unique(mid)) == {0, 1, 2, 3}, (n, phase)
            lv_area = (label == 3).sum(axis=(0, 1))
            assert lv_area[0] > lv_area[-1], (n, phase)
            assert lv_area[: nz // 2].mean() > lv_area[nz // 2:].mean(), (n, phase)
            # The myocardium encloses the blood pool in the central slices.
            for k in range(nz // 4, nz - nz // 4):
                lv = label[:, :, k] == 3
                ring = ndimage.binary_dilation(lv, cross) & ~lv
                assert np.isin(label[:, :, k][ring], (2, 3)).all(), (n, phase, k)
        # ES: smaller blood pool, same or more myocardium per slice on average.
        ed_lv, es_lv = (pat["label_ed"] == 3).sum(), (pat["label_es"] == 3).sum()
        assert es_lv < 0.8 * ed_lv
        assert (pat["label_es"] == 1).sum() < (pat["label_ed"] == 1).sum()


def test_intensities_contrast(patients: dict[int, dict]) -> None:
    ratios = []
    for pat in patients.values():
        image, label = pat["image_ed"], pat["label_ed"]
        k = image.shape[2] // 2
        lv = np.median(image[:, :, k][label[:, :, k] == 3])
        myo = np.median(image[:, :, k][label[:, :, k] == 2])
        ratios.append(lv / myo)
    ratios = np.array(ratios)
    assert (ratios > 1.2).all()  # blood pool is brighter than myocardium
    assert ratios.max() - ratios.min() > 0.6  # contrast varies between patients


def test_alternative_ed_frames(patients: dict[int, dict]) -> None:
    eds = [pat["ed_frame"] for pat in patients.values()]
    assert sum(ed != 1 for ed in eds) == 2  # one patient in six
    assert all(2 <= ed <= 4 for ed in eds if ed != 1)


def test_written_files(written: Path, patients: dict[int, dict]) -> None:
    assert demo_dataset_complete(written)
    for pid in ("001", "002", "003", "004"):
        pat = patients[int(pid)]
        pdir = written / f"patient{pid}"
        cfg = dict(line.split(": ") for line in (pdir / "Info.cfg").read_text().splitlines())
        assert set(cfg) == {"ED", "ES", "Group", "Height", "NbFrame", "Weight"}
        assert int(cfg["ED"]) == pat["ed_frame"] and int(cfg["ES"]) == pat["es_frame"]
        assert cfg["NbFrame"] == "30"
        for phase, frame in (("ed", int(cfg["ED"])), ("es", int(cfg["ES"]))):
            img = nib.load(pdir / f"patient{pid}_frame{frame:02d}.nii.gz")
            gt = nib.load(pdir / f"patient{pid}_frame{frame:02d}_gt.nii.gz")
            for nii in (img, gt):
                np.testing.assert_allclose(nii.header.get_zooms(), pat["spacing"], rtol=1e-6)
                np.testing.assert_allclose(np.diag(nii.affine)[:3], pat["spacing"], rtol=1e-6)
                np.testing.assert_allclose(nii.affine[:3, 3], pat["origin"], atol=1e-3)
            np.testing.assert_array_equal(img.get_fdata(), pat[f"image_{phase}"])
            np.testing.assert_array_equal(np.asarray(gt.dataobj), pat[f"label_{phase}"])
        # Only the ED and ES frames exist: readers must take ED from Info.cfg.
        assert len(list(pdir.glob("*.nii.gz"))) == 4
        assert (pdir / f"patient{pid}_frame01.nii.gz").exists() == (pat["ed_frame"] == 1)
    assert patients[3]["ed_frame"] != 1
    assert not list(written.rglob(".*.tmp*"))  # no temporary files left behind


def test_complete_marker(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    assert not demo_dataset_complete(out)
    make_demo_dataset(out, ["007"], seed=3)
    assert demo_dataset_complete(out)
    assert demo_dataset_complete(out, seed=3, patient_ids=["007"])
    assert not demo_dataset_complete(out, seed=4)
    assert not demo_dataset_complete(out, patient_ids=["007", "008"])
    assert json.loads((out / COMPLETE_MARKER).read_text())["patient_ids"] == ["007"]

    # Complete and unchanged: a second call writes nothing.
    files = sorted((out / "patient007").iterdir())
    mtimes = [f.stat().st_mtime_ns for f in files]
    make_demo_dataset(out, ["007"], seed=3)
    assert [f.stat().st_mtime_ns for f in files] == mtimes

    # A missing file or marker means incomplete, and the next call regenerates.
    files[-1].unlink()
    assert not demo_dataset_complete(out)
    make_demo_dataset(out, ["007"], seed=3)
    assert demo_dataset_complete(out) and files[-1].exists()
    (out / COMPLETE_MARKER).unlink()
    assert not demo_dataset_complete(out)
    make_demo_dataset(out, ["007"], seed=3)
    assert demo_dataset_complete(out)
    (out / COMPLETE_MARKER).write_text("{not json")
    assert not demo_dataset_complete(out)

    with pytest.raises(ValueError):
        make_demo_dataset(out, ["7"])


def test_cli_from_other_cwd(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "make_demo_data.py"),
           "--out", str(out), "--n_patients", "2", "--seed", "1"]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert demo_dataset_complete(out, seed=1, patient_ids=["001", "002"])
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "already complete" in res.stdout
