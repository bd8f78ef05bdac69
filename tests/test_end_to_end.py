"""Short real runs of both trainers on generated demo data, and their command-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def env(demo_env) -> dict[str, str]:
    return demo_env


@pytest.fixture(scope="module")
def baseline_dir(env) -> Path:
    proc = run(["train_model/tr_baseline.py", "--dataset", "demo", "--no_of_tr_imgs", "tr2",
                "--comb_tr_imgs", "c1", "--n_iter", "201", "--no_progress"], env)
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("run directory: ")
    return Path(last.removeprefix("run directory: "))


def test_baseline_run_writes_the_output_contract(baseline_dir, env):
    summary = json.loads((baseline_dir / "test_results" / "summary.json").read_text())
    assert set(summary["per_structure"]) == {"rv", "myo", "lv"}
    assert len(summary["per_subject"]) == 10
    # an all-background predictor scores 0 on every structure; 200 iterations do far better
    assert summary["mean_dice"] > 0.3, summary["mean_dice"]
    for name in ("config.yaml", "log.csv", "curves.png", "checkpoints/best.pt"):
        assert (baseline_dir / name).is_file(), name
    raw = Path(env["LCL_DATA_ROOT"]) / "demo" / "raw" / "patient011"
    ed = int((raw / "Info.cfg").read_text().split("ED:")[1].split()[0])
    img = nib.load(str(raw / f"patient011_frame{ed:02d}.nii.gz"))
    pred = nib.load(str(baseline_dir / "test_results" / "011" / "pred_seg_id_011.nii.gz"))
    assert pred.shape == img.shape
    np.testing.assert_allclose(pred.affine, img.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 3}
    figures = baseline_dir / "test_results" / "figures"
    assert sorted(p.name for p in figures.iterdir()) == [f"{s}.png" for s in
                                                         sorted(summary["per_subject"])]
    for png in figures.iterdir():
        assert_small_png(png)


def assert_small_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 300_000, (path, len(data))


def test_joint_run_after_baseline(baseline_dir, env):
    proc = run(["train_model/prop_method_joint_tr_rand_init.py", "--dataset", "demo",
                "--no_of_tr_imgs", "tr2", "--comb_tr_imgs", "c1", "--n_rounds", "2",
                "--n_iter_per_round", "6", "--loss_reduction", "mean", "--no_progress"], env)
    run_dir = Path(proc.stdout.strip().splitlines()[-1].removeprefix("run directory: "))
    assert run_dir == baseline_dir.parent.parent / "joint" / baseline_dir.name / "mean"
    summary = json.loads((run_dir / "test_results" / "summary.json").read_text())
    assert 0.0 <= summary["mean_dice"] <= 1.0
    assert "pseudo-label Dice vs ground truth" in proc.stdout
    log = (run_dir / "log.csv").read_text()
    assert "pseudo_dice_after_crf" in log and "loss_local" in log
    rounds = run_dir / "pseudo_labels"
    assert sorted(p.name for p in rounds.iterdir()) == ["round1.png", "round2.png"]
    for png in rounds.iterdir():
        assert_small_png(png)
    report = run_dir.parent / "report.html"
    run(["scripts/compare_runs.py", str(baseline_dir), str(run_dir), "--out", str(report)], env)
    text = report.read_text()
    assert text.count("src=\"data:image/png;base64,") == 7 and "<h2>Largest losses</h2>" in text


def test_joint_without_baseline_names_the_expected_checkpoint(env, tmp_path):
    # An output root of its own: other tests of the session may have run tr1/c2 already.
    proc = run(["train_model/prop_method_joint_tr_rand_init.py", "--dataset", "demo",
                "--no_of_tr_imgs", "tr1", "--comb_tr_imgs", "c2", "--no_progress",
                "--out_dir", str(tmp_path)], env, check=False)
    assert proc.returncode == 2
    assert "baseline/tr1_c2_v0/checkpoints/best.pt: baseline checkpoint not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_inputs_give_one_line_errors(tmp_path, env):
    common = ["train_model/tr_baseline.py", "--dataset", "demo", "--no_progress", "--n_iter", "1",
              "--no_of_tr_imgs", "tr2", "--comb_tr_imgs", "c1", "--out_dir", str(tmp_path / "o")]
    # unknown labeled set
    proc = run([*common[:-6], "--no_of_tr_imgs", "tr3", "--comb_tr_imgs", "c1"], env, check=False)
    assert proc.returncode == 2 and "Valid sets: tr1_c1" in proc.stderr
    # missing data folder (a non-demo dataset is never generated)
    proc = run(["train_model/tr_baseline.py", "--dataset", "acdc", "--no_of_tr_imgs", "tr1",
                "--comb_tr_imgs", "c1", "--data_root", str(tmp_path / "none"), "--no_progress",
                "--out_dir", str(tmp_path / "o")], env, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(tmp_path / "none" / "raw") in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    # corrupt NIfTI in a copy of the demo data: the error names the file
    src = Path(env["LCL_DATA_ROOT"]) / "demo" / "raw"
    data = tmp_path / "demo"
    (data / "raw").mkdir(parents=True)
    for p in src.iterdir():
        (data / "raw" / p.name).symlink_to(p)
    bad = data / "raw" / "patient001"
    (data / "raw" / "patient001").unlink()
    bad.mkdir()
    for f in (src / "patient001").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    ed = int((bad / "Info.cfg").read_text().split("ED:")[1].split()[0])
    ed_file = bad / f"patient001_frame{ed:02d}.nii.gz"
    ed_file.write_bytes(ed_file.read_bytes()[:200])
    proc = run([*common, "--data_root", str(data)], env, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "patient001" in proc.stderr and "cannot read NIfTI" in proc.stderr


def test_pipeline_script_runs_both_steps_from_anywhere(tmp_path, env):
    script = REPO / "pseudo_lbl_rand_init.sh"
    e = {**env, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(script), "tr1", "c1", "demo", "--n_iter", "4", "--n_rounds", "1",
         "--n_iter_per_round", "2", "--loss_reduction=mean", "--out_dir", str(tmp_path / "o"),
         "--no_progress"], cwd=tmp_path, env=e, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "1 rounds x 2 iterations, reduction 'mean'" in proc.stdout
    table = proc.stdout.strip().splitlines()[-5:]
    assert table[0].split()[:2] == ["test", "Dice"] and table[-1].startswith("mean")
    assert (tmp_path / "o" / "demo" / "joint" / "tr1_c1_v0" / "mean" / "test_results"
            / "summary.json").is_file()
    failed = subprocess.run(["bash", str(script), "tr9", "c1", "demo"], cwd=tmp_path, env=e,
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0 and "step 2" not in failed.stdout
    assert "Valid sets" in failed.stderr
