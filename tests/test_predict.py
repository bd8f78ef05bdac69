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


# ------------------------------------------------ in-process: what the prediction is made with
def fake_run(tmp_path: Path, trainer: str = "tr_baseline", **config) -> tuple[Path, dict]:
    """A run directory as predict.py reads it: config.yaml recording the demo's configuration
    with ``config`` edits (values today's init file does not have), and best.pt / last.pt of two
    different networks (iterations 7 and 9). Returns it and the checkpoints' weights."""
    import dataclasses

    import torch

    import experiment_init
    from models.unet import JointUNet, UNet
    from utils.run import save_checkpoint

    cfg = dataclasses.replace(experiment_init.load("demo"), **config)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    record = {"trainer": trainer, "config": cfg.to_dict(), "test_ids": list(cfg.test)}
    (run / "config.yaml").write_text(yaml.safe_dump(record))
    weights = {}
    for name, iteration in (("best", 7), ("last", 9)):
        torch.manual_seed(iteration)
        net = (JointUNet if trainer == "prop_method_joint_tr_rand_init" else UNet)(cfg.num_classes)
        weights[name] = net.state_dict()
        save_checkpoint(run / "checkpoints" / f"{name}.pt",
                        {"model": weights[name], "iteration": iteration,
                         "val_dice": iteration / 10, "optimizer": {}})
    return run, weights


def position_probs(shape: tuple[int, int, int], num_classes: int):
    """(Z, C, X, Y) probabilities whose argmax at voxel (x, y, z) is (x + 2y + 3z) % C."""
    import torch

    x, y, z = np.meshgrid(*map(np.arange, shape), indexing="ij")
    labels = torch.from_numpy((x + 2 * y + 3 * z) % num_classes).permute(2, 0, 1)
    onehot = torch.nn.functional.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()
    return 0.1 / num_classes + 0.9 * onehot, ((x + 2 * y + 3 * z) % num_classes)


def run_predict(predict, monkeypatch, run_dir: Path, out: Path, *inputs: Path, extra=()):
    """predict.main in-process with the network's forward replaced by `position_probs`: what
    it was called with (model, prepared volume) per input, and the exit status."""
    calls = []

    def native_probs(model, ev, device):
        calls.append((model, ev))
        import torch

        convs = [m for m in model.seg_head.modules() if isinstance(m, torch.nn.Conv2d)]
        return position_probs(ev.volume.image.shape, convs[-1].out_channels)[0]

    monkeypatch.setattr(predict, "native_probs", native_probs)
    monkeypatch.setattr(sys, "argv", ["predict.py", "--run_dir", str(run_dir), "--output",
                                      str(out), "--device", "cpu", "--input", *map(str, inputs),
                                      *extra])
    with pytest.raises(SystemExit) as done:
        predict.main()
    return calls, done.value.code


def _tensors_equal(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("trainer, checkpoint, n4", [
    ("tr_baseline", "best", False), ("prop_method_joint_tr_rand_init", "last", True)])
def test_prediction_uses_the_recorded_geometry_and_the_chosen_weights(
        trainer, checkpoint, n4, tmp_path, monkeypatch, load_script):
    """The run's recorded crop (64 x 32), target resolution (3.0 x 1.5 mm) and classes (3), not
    today's demo init file's (64 x 64, 2.25 mm, 4); the weights of --checkpoint; the image's own
    grid, affine and spacing; each output voxel the argmax of its own probabilities."""
    from models.unet import JointUNet
    from tests.conftest import blob_volume, write_nifti
    from utils.preprocess import Geometry

    predict = load_script("predict")
    run_dir, weights = fake_run(tmp_path, trainer, img_size_x=64, img_size_y=32,
                                target_resolution=(3.0, 1.5), num_classes=3,
                                struct_name=("a", "b"))
    image = blob_volume((40, 36, 5), seed=3)[0]
    given = write_nifti(tmp_path / "explicit" / "case7.nii.gz", image, spacing=(1.5, 1.5, 8.0))
    folder = tmp_path / "folder"
    write_nifti(folder / "case8.nii.gz", image[:, :30], spacing=(1.5, 1.5, 8.0))
    corrected = []
    monkeypatch.setattr(predict, "n4_bias_correction",
                        lambda img, spacing: corrected.append(spacing) or img + 1000)
    out = tmp_path / "out"
    extra = ["--checkpoint", checkpoint, "--save_probabilities"] + (["--n4"] if n4 else [])
    calls, status = run_predict(predict, monkeypatch, run_dir, out, given, folder, extra=extra)
    assert status == 0
    assert [ev.volume.image_path for _, ev in calls] == [given, folder / "case8.nii.gz"]
    assert corrected == ([(1.5, 1.5, 8.0)] * 2 if n4 else [])
    for (model, ev), y in zip(calls, (36, 30)):
        # rescaled by 1.5 / 3.0 in x and 1.5 / 1.5 in y, into the 64 x 32 crop
        assert ev.geometry == Geometry((40, y), (20, y), (64, 32))
        assert ev.image_c.shape == (64, 32, 5)
        np.testing.assert_allclose(ev.volume.image, image[:, :y] + (1000 if n4 else 0))
        assert isinstance(model, JointUNet) == (trainer == "prop_method_joint_tr_rand_init")
        assert _tensors_equal(model.state_dict(), weights[checkpoint])
        assert not _tensors_equal(model.state_dict(), weights[{"best": "last",
                                                                "last": "best"}[checkpoint]])
        assert any("forward" in vars(m) for m in model.modules())  # the CPU forwards
    for name, y in (("case7", 36), ("case8", 30)):
        written = nib.load(str(out / f"{name}_seg.nii.gz"))
        probs, labels = position_probs((40, y, 5), 3)
        np.testing.assert_array_equal(np.asarray(written.dataobj), labels)
        np.testing.assert_array_equal(written.affine, nib.load(str(given)).affine)
        assert written.header.get_zooms() == (1.5, 1.5, 8.0)
        saved = np.load(out / f"{name}_probs.npz")
        np.testing.assert_allclose(saved["probabilities"], probs.permute(1, 2, 3, 0).numpy())
        assert saved["label_values"].tolist() == [0, 1, 2]
        assert saved["structures"].tolist() == ["background", "a", "b"]


def test_prediction_writes_the_recorded_layouts_label_values(tmp_path, monkeypatch,
                                                             load_script):
    """A run recorded with the MMWHS layout writes 205, 420, ... and lists them in the npz."""
    from tests.conftest import blob_volume, write_nifti

    predict = load_script("predict")
    run_dir, _ = fake_run(tmp_path, data_layout="mmwhs", num_classes=8,
                          struct_name=("myo", "la", "lv", "ra", "rv", "aa", "pa"))
    given = write_nifti(tmp_path / "mr_train_1001_image.nii.gz", blob_volume((32, 30, 4))[0])
    _, status = run_predict(predict, monkeypatch, run_dir, tmp_path / "out", given,
                            extra=["--save_probabilities"])
    assert status == 0
    labels = position_probs((32, 30, 4), 8)[1]
    written = np.asarray(nib.load(str(tmp_path / "out" / "mr_train_1001_image_seg.nii.gz"))
                         .dataobj)
    np.testing.assert_array_equal(written, np.asarray((0, *MMWHS_LABEL_VALUES))[labels])
    saved = np.load(tmp_path / "out" / "mr_train_1001_image_probs.npz")
    assert saved["label_values"].tolist() == [0, *MMWHS_LABEL_VALUES]
    assert saved["probabilities"].shape == (8, 32, 30, 4)


def test_two_inputs_of_one_name_the_second_is_skipped_and_counted(tmp_path, monkeypatch,
                                                                  load_script, capsys):
    from tests.conftest import blob_volume, write_nifti

    predict = load_script("predict")
    run_dir, _ = fake_run(tmp_path)
    first = write_nifti(tmp_path / "a" / "p.nii.gz", blob_volume((32, 32, 3))[0])
    second = write_nifti(tmp_path / "b" / "p.nii.gz", blob_volume((32, 32, 3), seed=4)[0] + 7)
    calls, status = run_predict(predict, monkeypatch, run_dir, tmp_path / "out", first, second)
    assert status == 1
    assert [ev.volume.image_path for _, ev in calls] == [first]
    out = capsys.readouterr().out
    assert f"skipped {second}: an earlier input has the same name, p" in out
    assert "1 segmented, 1 skipped" in out


def test_nnunet_runs_read_their_channel_and_write_case_names(tmp_path, monkeypatch,
                                                             load_script, capsys):
    """A run of channel 1 of an nnU-Net dataset: <case>_0001 is segmented into <case>.nii.gz;
    the case's channel-0 image is not an input."""
    from tests.conftest import blob_volume, write_nifti

    predict = load_script("predict")
    run_dir, _ = fake_run(tmp_path, data_layout="nnunet_ch1")
    folder = tmp_path / "imagesTs"
    for c in (0, 1):
        write_nifti(folder / f"heart_007_000{c}.nii.gz", blob_volume((32, 32, 3), seed=c)[0])
    calls, status = run_predict(predict, monkeypatch, run_dir, tmp_path / "out", folder)
    assert status == 0
    assert [ev.volume.image_path.name for _, ev in calls] == ["heart_007_0001.nii.gz"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["heart_007.nii.gz"]
    assert f"ignoring {folder / 'heart_007_0000.nii.gz'}: not channel 1" in capsys.readouterr().out
