"""nnU-Net v2 raw datasets: reading and refusals, generated configuration files, a short run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import experiment_init
from utils.demo_data import make_demo_patient
from utils.errors import ConfigError, DataError
from utils.io import read_raw_volume
from utils.nnunet import read_dataset

REPO = Path(__file__).resolve().parents[1]
LABELS = {"background": 0, "rv": 1, "myo": 2, "lv": 3}


def save(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))


def write_dataset(root: Path, n_labeled: int = 8, n_unlabeled: int = 2, n_test: int = 1,
                  labels: dict | None = None, file_ending: str = ".nii.gz") -> Path:
    """Demo patients 1.. in nnU-Net's layout: channel 0 the ED image, channel 1 its negative;
    the first ``n_labeled`` with labels, then ``n_unlabeled`` in imagesTr/ without label and
    ``n_test`` in imagesTs/."""
    meta = {"channel_names": {"0": "cine", "1": "negative"}, "labels": labels or LABELS,
            "numTraining": n_labeled + n_unlabeled, "file_ending": file_ending}
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(meta))
    for i in range(1, n_labeled + n_unlabeled + n_test + 1):
        pat = make_demo_patient(i, 0)
        affine = np.diag([*pat["spacing"], 1.0])
        case = f"heart_{i:03d}"
        folder = root / ("imagesTs" if i > n_labeled + n_unlabeled else "imagesTr")
        image = pat["image_ed"].astype(np.float32)
        save(folder / f"{case}_0000.nii.gz", image, affine)
        save(folder / f"{case}_0001.nii.gz", -image, affine)
        if i <= n_labeled:
            save(root / "labelsTr" / f"{case}.nii.gz", pat["label_ed"].astype(np.uint8), affine)
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("nnunet") / "Dataset001_Heart")


def test_read_dataset_sorts_cases_into_labeled_and_unlabeled(dataset):
    data = read_dataset(dataset, channel=1)
    assert data.labeled == tuple(f"heart_{i:03d}" for i in range(1, 9))
    assert data.unlabeled == ("heart_009", "heart_010", "heart_011")
    assert data.structures == ("rv", "myo", "lv") and data.channel_name == "negative"


def test_layout_pairs_each_case_with_its_own_label_and_channel(dataset):
    for i in (1, 2, 5):
        pat = make_demo_patient(i, 0)
        vol = read_raw_volume("nnunet", dataset, f"heart_{i:03d}")
        np.testing.assert_array_equal(vol.label, pat["label_ed"])
        np.testing.assert_allclose(vol.image, pat["image_ed"])
        other = read_raw_volume("nnunet_ch1", dataset / "labelsTr", f"heart_{i:03d}")
        np.testing.assert_allclose(other.image, -pat["image_ed"])
    unlabeled = read_raw_volume("nnunet", dataset, "heart_011", with_label=False)
    assert unlabeled.image_path.parent.name == "imagesTs"


@pytest.mark.parametrize("labels, file_ending, reason", [
    ({"background": 0, "heart": [1, 2, 3]}, ".nii.gz", "region-based"),
    ({**LABELS, "ignore": 4}, ".nii.gz", "'ignore'"),
    ({"background": 0, "rv": 1, "lv": 3}, ".nii.gz", "not consecutive"),
    (LABELS, ".png", "file_ending '.png'"),
])
def test_what_the_method_cannot_use_is_refused(tmp_path, labels, file_ending, reason):
    root = write_dataset(tmp_path / "D", n_labeled=1, n_unlabeled=0, n_test=0, labels=labels,
                         file_ending=file_ending)
    with pytest.raises(DataError, match=reason) as err:
        read_dataset(root)
    assert "dataset.json" in str(err.value)


def test_a_label_off_the_image_grid_is_refused(tmp_path):
    root = write_dataset(tmp_path / "D", n_labeled=2, n_unlabeled=0, n_test=0)
    label = root / "labelsTr" / "heart_002.nii.gz"
    img = nib.load(str(label))
    save(label, np.asarray(img.dataobj)[:-1], img.affine)
    with pytest.raises(DataError, match="heart_002.nii.gz: label grid"):
        read_dataset(root)


def test_a_label_on_the_grid_but_with_another_spacing_is_refused(tmp_path):
    """Same shape, other voxel size: the label would be resampled onto other anatomy."""
    root = write_dataset(tmp_path / "D", n_labeled=2, n_unlabeled=0, n_test=0)
    label = root / "labelsTr" / "heart_002.nii.gz"
    img = nib.load(str(label))
    save(label, np.asarray(img.dataobj), img.affine @ np.diag([1.2, 1.0, 1.0, 1.0]))
    with pytest.raises(DataError, match="heart_002.nii.gz: label affine differs from the "
                       r"image's by up to .* \(heart_002_0000.nii.gz"):
        read_dataset(root)
    read_dataset(root, check_grids=False)  # the check, not the reading, refuses it


def new_dataset(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/new_dataset.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)


def test_generated_splits_are_disjoint_seeded_and_load(dataset, tmp_path):
    outs = []
    for folder, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        proc = new_dataset([str(dataset), "--name", "heart", "--labeled", "1", "2",
                            "--combinations", "3", "--test", "3", "--seed", seed,
                            "--config_dir", str(tmp_path / folder)])
        assert proc.returncode == 0, proc.stderr
        outs.append((tmp_path / folder / "data_cfg_heart.py").read_text())
    assert outs[0] == outs[1] and outs[0] != outs[2]
    cfg = experiment_init.load("heart", config_dir=tmp_path / "a")
    test, val = set(cfg.test), set(cfg.val_ids("tr1", "c1"))
    assert len(test) == 3 and len(val) == 2 and not test & val
    for k in (1, 2):
        for j in (1, 2, 3):
            ids = set(cfg.labeled_ids(f"tr{k}", f"c{j}"))
            assert len(ids) == k and not ids & (test | val)
    assert set(cfg.unlabeled_ids()) == {f"heart_{i:03d}" for i in range(1, 12)} - test - val
    assert cfg.data_layout == "nnunet" and cfg.struct_name == ("rv", "myo", "lv")
    # The median in-plane spacing of the eight labeled volumes, read independently.
    spacings = [make_demo_patient(i, 0)["spacing"][0] for i in range(1, 9)]
    assert cfg.target_resolution[0] == pytest.approx(np.median(spacings), rel=1e-5)
    assert cfg.crf_params["g_sxy"] == pytest.approx(10 * 1.36719 / np.median(spacings), abs=0.01)
    again = new_dataset([str(dataset), "--name", "heart", "--config_dir", str(tmp_path / "a")])
    assert again.returncode != 0 and "--overwrite" in again.stderr


def test_a_dataset_too_small_for_the_request_is_refused(dataset, tmp_path):
    proc = new_dataset([str(dataset), "--name", "heart", "--labeled", "8", "--test", "2",
                        "--config_dir", str(tmp_path)])
    assert proc.returncode != 0
    assert "8 labeled cases" in proc.stderr and "ask for fewer" in proc.stderr
    assert not list(tmp_path.glob("*.py"))


def test_dataset_to_test_results_with_the_readme_commands(dataset, tmp_path):
    """new_dataset, cropping, check, a short baseline and joint step, predict on imagesTs/,
    evaluate."""
    config = tmp_path / "config"
    env = dict(os.environ, LCL_CONFIG_DIR=str(config), LCL_DATA_ROOT=str(tmp_path / "data"),
               LCL_RUNS_ROOT=str(tmp_path / "runs"))

    def run(args: list[str]) -> str:
        proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"{args}\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    run(["scripts/new_dataset.py", str(dataset), "--name", "heart", "--labeled", "2",
         "--combinations", "1", "--test", "2", "--max_crop", "64"])
    run(["scripts/create_cropped_imgs.py", "--dataset", "heart"])
    assert "no problems found" in run(["scripts/check_dataset.py", "--dataset", "heart"])
    # A rate that leaves the baseline predicting structures after a few iterations, so that
    # the joint step's pseudo-labels have some.
    out = run(["train_model/tr_baseline.py", "--dataset", "heart", "--no_of_tr_imgs", "tr2",
               "--comb_tr_imgs", "c1", "--n_iter", "21", "--lr_seg", "0.01", "--no_progress"])
    run_dir = Path(out.strip().splitlines()[-1].removeprefix("run directory: "))
    summary = json.loads((run_dir / "test_results" / "summary.json").read_text())
    cfg = experiment_init.load("heart", config_dir=config)
    assert sorted(summary["per_subject"]) == sorted(cfg.test)
    out = run(["train_model/prop_method_joint_tr_rand_init.py", "--dataset", "heart",
               "--no_of_tr_imgs", "tr2", "--comb_tr_imgs", "c1", "--n_rounds", "1",
               "--n_iter_per_round", "3", "--no_progress"])
    assert f"pseudo-labels for {len(cfg.unlabeled_ids())} volumes" in out
    joint_dir = Path(out.strip().splitlines()[-1].removeprefix("run directory: "))
    joint = json.loads((joint_dir / "test_results" / "summary.json").read_text())
    assert sorted(joint["per_subject"]) == sorted(cfg.test)
    pred = tmp_path / "pred"
    run(["scripts/predict.py", "--run_dir", str(run_dir), "--input", str(dataset / "imagesTs"),
         "--output", str(pred)])
    written = nib.load(str(pred / "heart_011.nii.gz"))
    image = nib.load(str(dataset / "imagesTs" / "heart_011_0000.nii.gz"))
    assert written.shape == image.shape and np.allclose(written.affine, image.affine)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2, 3}
    scored = tmp_path / "scored"
    run(["scripts/predict.py", "--run_dir", str(run_dir), "--input",
         *[str(dataset / "imagesTr" / f"{c}_0000.nii.gz") for c in cfg.test],
         "--output", str(scored)])
    run(["scripts/evaluate.py", "--pred", str(scored), "--gt", str(dataset / "labelsTr"),
         "--dataset", "heart"])
    rescored = json.loads((scored / "summary.json").read_text())
    assert sorted(rescored["per_subject"]) == sorted(cfg.test)


def test_a_folder_of_unlabeled_images_joins_the_pool(tmp_path):
    """--unlabeled DIR: its cases join the pool, are read from DIR (each file's own image) and
    cropped without labels; a case the dataset holds too, and a folder without images of the
    channel, are refused."""
    root = write_dataset(tmp_path / "Dataset002_Heart", n_labeled=6, n_unlabeled=0, n_test=0)
    extra = tmp_path / "scans"
    for i, case in ((7, "scan_a"), (8, "scan_b")):
        image = make_demo_patient(i, 0)["image_ed"].astype(np.float32)
        save(extra / f"{case}_0000.nii.gz", image + 1000.0 * i, np.eye(4))  # readable origin
    config = tmp_path / "config"
    env = dict(os.environ, LCL_CONFIG_DIR=str(config), LCL_DATA_ROOT=str(tmp_path / "data"))
    common = [str(root), "--name", "heart2", "--labeled", "1", "--combinations", "1",
              "--test", "1", "--config_dir", str(config)]
    done = new_dataset([*common, "--unlabeled", str(extra)], env)
    assert done.returncode == 0, done.stderr
    assert "2 more unlabeled cases" in done.stdout
    cfg = experiment_init.load("heart2", tmp_path / "data" / "heart2", config_dir=config)
    assert cfg.data_path_unlabeled == extra.resolve()
    assert {"scan_a", "scan_b"} <= set(cfg.pool_only_ids())  # in the pool, labels never needed
    vol = read_raw_volume(cfg.data_layout, cfg.raw_folders(), "scan_b", with_label=False)
    assert vol.image_path == extra / "scan_b_0000.nii.gz" and vol.image.min() >= 8000.0
    labeled = read_raw_volume(cfg.data_layout, cfg.raw_folders(), cfg.test[0])
    assert labeled.image_path.parent == root / "imagesTr" and labeled.label is not None
    crop = subprocess.run([sys.executable, "scripts/create_cropped_imgs.py", "--dataset",
                           "heart2"], cwd=REPO, env=env, capture_output=True, text=True)
    assert crop.returncode == 0, crop.stderr
    assert (cfg.data_path_tr_cropped / "scan_a" / "img_cropped.nii.gz").is_file()

    save(extra / "heart_002_0000.nii.gz", np.zeros((8, 8, 2), np.float32), np.eye(4))
    clash = new_dataset([*common, "--unlabeled", str(extra), "--overwrite"], env)
    assert clash.returncode == 2 and "heart_002_0000.nii.gz: case heart_002 is in" in clash.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    none = new_dataset([*common, "--unlabeled", str(empty), "--overwrite"], env)
    assert none.returncode == 2 and "no image of channel 0" in none.stderr


def test_the_config_folder_is_the_flag_then_lcl_config_dir_then_the_package(tmp_path,
                                                                           monkeypatch):
    monkeypatch.delenv("LCL_CONFIG_DIR", raising=False)
    assert experiment_init.config_folder() == experiment_init.CONFIG_DIR
    monkeypatch.setenv("LCL_CONFIG_DIR", str(tmp_path / "env"))
    assert experiment_init.config_folder() == tmp_path / "env"
    assert experiment_init.config_folder(tmp_path / "flag") == tmp_path / "flag"
    with pytest.raises(ConfigError, match="env"):
        experiment_init.load("demo")
