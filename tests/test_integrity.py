"""Dataset integrity check: every planted problem is found and named, one line each."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import blob_volume, write_nifti

import experiment_init
from utils.errors import DataError
from utils.integrity import check_subject, configured_ids, require_valid

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cfg(acdc_root):
    """An ACDC-layout config over the two patients of the acdc_root fixture."""
    base = experiment_init.load("demo")
    return replace(base, data_path_tr=acdc_root, labeled={"tr2_c1": ["001", "002"]},
                   validation={"tr2_c1": ["001"]}, test=["002"], unlabeled_pool="tr2_c1")


def _frame(root: Path, pid: str, gt: bool = False) -> Path:
    ed = 1 if pid == "001" else 3
    return root / f"patient{pid}" / f"patient{pid}_frame{ed:02d}{'_gt' if gt else ''}.nii.gz"


def test_clean_data_has_no_problem(cfg):
    assert configured_ids(cfg) == ["001", "002"]
    assert check_subject(cfg, "001") == [] and check_subject(cfg, "002") == []
    require_valid(cfg, ["001", "002"])


@pytest.mark.parametrize("plant, expected", [
    ("missing_file", "file not found"),
    ("corrupt_gzip", "cannot read NIfTI"),
    ("two_d", "expected a 3D volume"),
    ("five_d", "expected a 3D volume"),
    ("label_range", "label values [7] outside 0..3"),
    ("grid_mismatch", "label grid"),
    ("zero_spacing", "spacing"),
    ("nan_image", "NaN"),
    ("other_orientation", "label orientation LPS differs from the image's RAS"),
    ("shifted_label", "label affine differs from the image's by up to 3 mm"),
    ("float_label", "label values are not whole numbers (e.g. 1.00000012, stored as float32)"),
    ("constant_image", "image intensity is 100 everywhere"),
    ("one_slice", "volume of one slice (shape (40, 36, 1))"),
])
def test_each_planted_problem_is_named(cfg, acdc_root, plant, expected):
    img, gt = _frame(acdc_root, "002"), _frame(acdc_root, "002", gt=True)
    image, label = blob_volume(seed=2)
    if plant == "missing_file":
        gt.unlink()
    elif plant == "corrupt_gzip":
        img.write_bytes(img.read_bytes()[:150])
    elif plant == "two_d":
        write_nifti(img, image[..., 0])
    elif plant == "five_d":
        write_nifti(img, image[..., None, None])
    elif plant == "label_range":
        label[0, 0, 0] = 7
        write_nifti(gt, label.astype(np.uint8))
    elif plant == "grid_mismatch":
        write_nifti(gt, label[:, :-1].astype(np.uint8))
    elif plant == "zero_spacing":
        hdr = nib.load(str(img)).header.copy()
        hdr.set_sform(np.diag([1.5, 0.0, 8.0, 1.0]), code=1)  # a broken header: zero y spacing
        hdr.set_qform(None, code=0)
        hdr["pixdim"][2] = 0.0
        nib.save(nib.Nifti1Image(image, None, header=hdr), str(img))
    elif plant == "nan_image":
        image[1, 1, 1] = np.nan
        write_nifti(img, image)
    elif plant in ("other_orientation", "shifted_label"):  # same grid, other voxel-to-world
        affine = nib.load(str(img)).affine.copy()
        if plant == "other_orientation":
            affine[:2] *= -1  # x and y flipped, as between RAS and LPS tools
        else:
            affine[0, 3] += 3.0
        nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), str(gt))
    elif plant == "float_label":
        values = label.astype(np.float32)
        values[values == 1] = np.float32(1.0000001)
        write_nifti(gt, values)
    elif plant == "constant_image":
        write_nifti(img, np.full_like(image, 100.0))
    elif plant == "one_slice":
        write_nifti(img, image[..., :1])
        write_nifti(gt, label[..., :1].astype(np.uint8))
    assert check_subject(cfg, "001") == []
    problems = check_subject(cfg, "002")
    assert len(problems) == 1
    assert expected in problems[0].what and "patient002" in problems[0].path
    with pytest.raises(DataError, match="id 002") as err:
        require_valid(cfg, ["001", "002"])
    assert "\n" not in str(err.value)


def test_pool_only_volume_may_lack_its_label(cfg, acdc_root):
    cfg = replace(cfg, labeled={"tr1_c1": ["001"], "pool": ["001", "002"]},
                  validation={"tr1_c1": ["001"]}, test=[], unlabeled_pool="pool")
    assert cfg.pool_only_ids() == ["002"]
    assert cfg.label_uses("001") == ["labeled['tr1_c1']", "validation['tr1_c1']"]
    _frame(acdc_root, "002", gt=True).unlink()
    assert check_subject(cfg, "002", label_optional=True) == []
    require_valid(cfg, ["001", "002"], unlabeled_ok={"002"})
    # asked for as a labeled volume, it needs its label
    (problem,) = check_subject(cfg, "002")
    assert problem.path == str(_frame(acdc_root, "002", gt=True))
    assert "label file not found; the labeled set being trained on needs it" in problem.what
    with pytest.raises(DataError, match="id 002: label file not found"):
        require_valid(cfg, ["002"])
    # its image is checked all the same
    image, _ = blob_volume(seed=2)
    image[1, 1, 1] = np.nan
    write_nifti(_frame(acdc_root, "002"), image)
    (problem,) = check_subject(cfg, "002", label_optional=True)
    assert "NaN" in problem.what
    # a volume other lists need names them
    _frame(acdc_root, "001", gt=True).unlink()
    (problem,) = check_subject(cfg, "001", label_optional=False)
    assert ("label file not found; the lists labeled['tr1_c1'], validation['tr1_c1'] need it: "
            "add it, or keep the id only in the unlabeled pool labeled['pool']") in problem.what


def test_check_dataset_script_reports_and_fails(tmp_path):
    env_root = tmp_path / "data"
    raw = env_root / "demo" / "raw"
    from utils.demo_data import make_demo_dataset

    ids = experiment_init.load("demo").labeled["tr20"] + ["009", "010"] + [
        f"{i:03d}" for i in range(11, 21)]
    make_demo_dataset(raw, sorted(set(ids)), seed=0)
    cmd = [sys.executable, "scripts/check_dataset.py", "--dataset", "demo",
           "--data_root", str(env_root / "demo")]
    ed = int((raw / "patient021" / "Info.cfg").read_text().split("ED:")[1].split()[0])
    (raw / "patient021" / f"patient021_frame{ed:02d}_gt.nii.gz").unlink()  # only in the pool
    ok = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0 and "no problems found" in ok.stdout
    assert "1 unlabeled pool subject(s), fine without label file" in ok.stdout
    assert ok.stdout.rstrip().splitlines()[0].endswith(": 021")
    ed = int((raw / "patient005" / "Info.cfg").read_text().split("ED:")[1].split()[0])
    (raw / "patient005" / f"patient005_frame{ed:02d}_gt.nii.gz").write_bytes(b"\x1f\x8b junk")
    (raw / "patient012" / "Info.cfg").unlink()  # falls back to frame01, absent when ED != 1
    ed = int((raw / "patient013" / "Info.cfg").read_text().split("ED:")[1].split()[0])
    image = raw / "patient013" / f"patient013_frame{ed:02d}.nii.gz"
    blank = nib.load(str(image))
    nib.save(nib.Nifti1Image(np.zeros(blank.shape, np.int16), blank.affine), str(image))
    ed = int((raw / "patient003" / "Info.cfg").read_text().split("ED:")[1].split()[0])
    gt3 = raw / "patient003" / f"patient003_frame{ed:02d}_gt.nii.gz"
    gt3.unlink()  # in labeled sets: needed
    bad = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 1
    assert f"003  {gt3}  label file not found; the lists labeled['tr1_c3'], " in bad.stdout
    assert "005" in bad.stdout and "cannot read NIfTI" in bad.stdout
    assert f"013  {image}  image intensity is 0 everywhere" in bad.stdout
    assert "Traceback" not in bad.stderr


# ------------------------------------------------ each check refuses at its own boundary
def _volume(image: np.ndarray, spacing=(1.5, 1.5, 8.0)):
    from utils.io import Volume

    return Volume("x", image, None, spacing, np.eye(4), nib.Nifti1Header(), Path("x.nii.gz"),
                  None)


def test_image_problems_at_each_boundary():
    from utils.integrity import image_problems

    image, _ = blob_volume()
    assert image_problems(_volume(image)) == []
    assert image_problems(_volume(image, (0.05, 1.5, 30.0))) == []
    for spacing in ((1.5, 1.5, 45.0), (0.01, 1.5, 8.0)):
        assert image_problems(_volume(image, spacing)) == [
            f"implausible voxel spacing {spacing} mm; fix the header"]
    inf = image.copy()
    inf[2, 3, 1] = np.inf
    assert image_problems(_volume(inf)) == ["image holds NaN or infinite values; re-convert it"]
    flat = np.full((40, 36, 1), 7.0, np.float32)
    assert [p.split(" ")[:3] for p in image_problems(_volume(flat))] == [
        ["image", "intensity", "is"], ["volume", "of", "one"]]


def test_a_label_value_equal_to_num_classes_is_outside(cfg, acdc_root):
    _, label = blob_volume(seed=2)
    label[0, 0, 0] = 4
    write_nifti(_frame(acdc_root, "002", gt=True), label.astype(np.uint8))
    (problem,) = check_subject(cfg, "002")
    assert "label values [4] outside 0..3" in problem.what


def test_configured_ids_include_test_only_ids_and_unlabeled_ok_is_per_id(cfg, acdc_root):
    assert configured_ids(replace(cfg, test=["007"])) == ["001", "002", "007"]
    _frame(acdc_root, "001", gt=True).unlink()
    _frame(acdc_root, "002", gt=True).unlink()
    with pytest.raises(DataError, match="id 001: label file not found"):
        require_valid(cfg, ["002", "001"], unlabeled_ok={"002"})
