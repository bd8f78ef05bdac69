"""scripts/predict.py on tiny demo runs: it reproduces the trainers' own test predictions voxel
for voxel, in the input's space and the dataset's label values, and skips unusable inputs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from utils.io import MMWHS_LABEL_VALUES, acdc_paths

REPO = Path(__file__).resolve().parents[1]


def predict(env: dict[str, str], run_dir: Path, out: Path, *inputs: Path, extra=()) -> \
        subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/predict.py", "--run_dir", str(run_dir),
                           "--output", str(out), "--input", *map(str, inputs), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def raw_image(env: dict[str, str], sid: str) -> Path:
    return acdc_paths(Path(env["LCL_DATA_ROOT"]) / "demo" / "raw", sid)[0]


def trainer_prediction(run_dir: Path, sid: str) -> nib.Nifti1Image:
    return nib.load(str(run_dir / "test_results" / sid / f"pred_seg_id_{sid}.nii.gz"))


def as_layout(run_dir: Path, tmp_path: Path, layout: str) -> Path:
    """A copy of a run (config.yaml and best.pt) whose recorded data layout is ``layout``."""
    copy = tmp_path / f"run_{layout}"
    (copy / "checkpoints").mkdir(parents=True)
    shutil.copy(run_dir / "checkpoints" / "best.pt", copy / "checkpoints" / "best.pt")
    record = yaml.safe_load((run_dir / "config.yaml").read_text())
    record["config"]["data_layout"] = layout
    (copy / "config.yaml").write_text(yaml.safe_dump(record))
    return copy


@pytest.mark.parametrize("step", ["baseline", "joint"])
def test_predict_reproduces_the_trainers_test_prediction(step, tiny_runs, demo_env, tmp_path):
    run_dir = tiny_runs[step]
    # a folder input: every NIfTI file in it, other files ignored
    folder = tmp_path / "in"
    folder.mkdir()
    for sid in ("011", "014"):
        (folder / raw_image(demo_env, sid).name).symlink_to(raw_image(demo_env, sid))
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    proc = predict(demo_env, run_dir, out, folder, extra=["--save_probabilities"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 segmented, 0 skipped" in proc.stdout
    for sid in ("011", "014"):
        image = nib.load(str(raw_image(demo_env, sid)))
        mine = nib.load(str(out / raw_image(demo_env, sid).name.replace(".nii.gz", "_seg.nii.gz")))
        theirs = trainer_prediction(run_dir, sid)
        labels = np.asarray(theirs.dataobj)
        assert len(np.unique(labels)) > 1  # a prediction with structures, not all background
        np.testing.assert_array_equal(np.asarray(mine.dataobj), labels)
        assert np.asarray(mine.dataobj).dtype == np.uint8
        np.testing.assert_array_equal(mine.affine, image.affine)
        assert mine.header.get_zooms() == image.header.get_zooms()
        np.testing.assert_array_equal(mine.header.get_qform(), image.header.get_qform())
        np.testing.assert_array_equal(mine.header.get_sform(), image.header.get_sform())
        probs = np.load(out / raw_image(demo_env, sid).name.replace(".nii.gz", "_probs.npz"))
        p = probs["probabilities"]
        assert p.shape == (4, *image.shape)
        np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-5)
        np.testing.assert_array_equal(p.argmax(0), labels)
        assert probs["label_values"].tolist() == [0, 1, 2, 3]
        assert probs["structures"].tolist() == ["background", "rv", "myo", "lv"]


def test_predict_writes_mmwhs_label_values(tiny_runs, demo_env, tmp_path):
    """A run of the MMWHS layout writes the raw values 205, 420, ... of its classes."""
    run_dir = as_layout(tiny_runs["baseline"], tmp_path, "mmwhs")
    proc = predict(demo_env, run_dir, tmp_path / "out", raw_image(demo_env, "012"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    name = raw_image(demo_env, "012").name.replace(".nii.gz", "_seg.nii.gz")
    mine = np.asarray(nib.load(str(tmp_path / "out" / name)).dataobj)
    classes = np.asarray(trainer_prediction(tiny_runs["baseline"], "012").dataobj)
    np.testing.assert_array_equal(mine, np.asarray((0, *MMWHS_LABEL_VALUES))[classes])
    assert len(set(np.unique(mine).tolist()) - {0}) >= 2  # not vacuous: several structures


def test_predict_reads_the_datasets_channel_of_4d_images(tiny_runs, demo_env, tmp_path):
    """Decathlon: channel 0 of a 4D image is the one segmented (channel 1 here is noise)."""
    run_dir = as_layout(tiny_runs["baseline"], tmp_path, "decathlon")
    src = nib.load(str(raw_image(demo_env, "013")))
    image = np.asarray(src.dataobj, np.float32)
    noise = np.random.default_rng(0).normal(0, 100, image.shape).astype(np.float32)
    four_d = tmp_path / "prostate_13.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([image, noise], -1), src.affine), str(four_d))
    proc = predict(demo_env, run_dir, tmp_path / "out", four_d)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    mine = np.asarray(nib.load(str(tmp_path / "out" / "prostate_13_seg.nii.gz")).dataobj)
    assert mine.shape == image.shape
    np.testing.assert_array_equal(
        mine, np.asarray(trainer_prediction(tiny_runs["baseline"], "013").dataobj))


def test_unusable_inputs_are_skipped_with_a_reason(tiny_runs, demo_env, tmp_path):
    src = nib.load(str(raw_image(demo_env, "015")))
    image = np.asarray(src.dataobj, np.float32)
    bad = tmp_path / "bad"
    bad.mkdir()
    nib.save(nib.Nifti1Image(image[..., 0], src.affine), str(bad / "flat.nii.gz"))
    nib.save(nib.Nifti1Image(np.stack([image, image], -1), src.affine),
             str(bad / "two_channels.nii.gz"))
    nan = image.copy()
    nan[3, 4, 1] = np.nan
    nib.save(nib.Nifti1Image(nan, src.affine), str(bad / "nan.nii.gz"))
    hdr = src.header.copy()
    hdr.set_sform(np.diag([1.5, 0.0, 8.0, 1.0]), code=1)  # a broken header: zero y spacing
    hdr.set_qform(None, code=0)
    hdr["pixdim"][2] = 0.0
    nib.save(nib.Nifti1Image(image, None, header=hdr), str(bad / "zero_spacing.nii.gz"))
    (bad / "broken.nii.gz").write_bytes(raw_image(demo_env, "015").read_bytes()[:100])
    good = raw_image(demo_env, "015")
    proc = predict(demo_env, tiny_runs["baseline"], tmp_path / "out", bad, good)
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    skipped = {line.split(":")[0].removeprefix("skipped "): line
               for line in proc.stdout.splitlines() if line.startswith("skipped ")}
    assert set(skipped) == {str(bad / f"{n}.nii.gz") for n in
                            ("flat", "two_channels", "nan", "zero_spacing", "broken")}
    assert "got shape (" in skipped[str(bad / "flat.nii.gz")]
    assert "expected a 3D volume" in skipped[str(bad / "two_channels.nii.gz")]
    assert "NaN" in skipped[str(bad / "nan.nii.gz")]
    assert "spacing" in skipped[str(bad / "zero_spacing.nii.gz")]
    assert "cannot read NIfTI" in skipped[str(bad / "broken.nii.gz")]
    # the usable input is still segmented, and only it
    assert [p.name for p in (tmp_path / "out").iterdir()] == \
        [good.name.replace(".nii.gz", "_seg.nii.gz")]


def test_a_run_without_its_record_is_one_line_error(tmp_path, demo_env):
    proc = predict(demo_env, tmp_path / "nothing", tmp_path / "out", tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "config.yaml: not found" in proc.stderr


def test_a_folders_label_files_are_not_inputs(tmp_path, capsys, load_script):
    """A patient folder of the ACDC or MMWHS layout holds each image's label file beside it;
    segmenting those as images would be wrong. Files named explicitly are always inputs."""
    predict = load_script("predict")
    names = ["p1_frame01.nii.gz", "p1_frame01_gt.nii.gz", "mr_train_1001_image.nii.gz",
             "mr_train_1001_label.nii.gz", "notes.txt", "b.nii"]
    for name in names:
        (tmp_path / name).write_text("x")
    explicit = tmp_path / "p1_frame01_gt.nii.gz"
    found = predict.input_files([tmp_path, explicit])
    assert found == [tmp_path / "b.nii", tmp_path / "mr_train_1001_image.nii.gz",
                     tmp_path / "p1_frame01.nii.gz", explicit]
    out = capsys.readouterr().out
    assert f"ignoring {tmp_path / 'p1_frame01_gt.nii.gz'}: a label file" in out
    assert f"ignoring {tmp_path / 'mr_train_1001_label.nii.gz'}: a label file" in out
