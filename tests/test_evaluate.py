"""scripts/evaluate.py reproduces a run's summary.json from its predictions; the summary's
spread and labels (std over subjects, units, selection) against numpy on hand-made metrics."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from utils.evaluation import summarize
from utils.io import acdc_paths

REPO = Path(__file__).resolve().parents[1]


def evaluate(env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/evaluate.py", *map(str, args)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


def summary_of(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


@pytest.mark.parametrize("step", ["baseline", "joint"])
def test_run_dir_rescoring_reproduces_the_runs_summary(step, tiny_runs, demo_env, tmp_path):
    run_dir = tiny_runs[step]
    proc = evaluate(demo_env, "--run_dir", run_dir, "--out", tmp_path / "re")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    original = summary_of(run_dir / "test_results")
    assert summary_of(tmp_path / "re") == original
    for name in ("metrics_per_subject.csv", "dsc_per_subject.txt", "net_dsc_mean.txt"):
        assert (tmp_path / "re" / name).read_text() == \
            (run_dir / "test_results" / name).read_text()
    assert original["selected_on"]["set"] == "validation"
    assert ("round" in original["selected_on"]) == (step == "joint")


def test_prediction_folder_is_paired_by_subject_id(tiny_runs, demo_env, tmp_path):
    """Predictions named as predict.py and as a run name them, in one folder with a file that
    names no subject, a prediction on another grid and one with values beyond the classes."""
    run_dir = tiny_runs["baseline"]
    raw = Path(demo_env["LCL_DATA_ROOT"]) / "demo" / "raw"
    pred = tmp_path / "pred"
    pred.mkdir()
    results = run_dir / "test_results"
    stem = acdc_paths(raw, "011")[0].name.removesuffix(".nii.gz")
    shutil.copy(results / "011" / "pred_seg_id_011.nii.gz", pred / f"{stem}_seg.nii.gz")
    (pred / "sub").mkdir()
    shutil.copy(results / "012" / "pred_seg_id_012.nii.gz", pred / "sub")
    shutil.copy(results / "013" / "pred_seg_id_013.nii.gz", pred / "notes_seg.nii.gz")
    shutil.copy(results / "016" / "pred_seg_id_016.nii.gz", pred / "016_seg.nii.gz")
    small = nib.load(str(results / "014" / "pred_seg_id_014.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(small.dataobj)[:-1], small.affine),
             str(pred / "014.nii.gz"))
    high = nib.load(str(results / "015" / "pred_seg_id_015.nii.gz"))
    data = np.asarray(high.dataobj).copy()
    data[0, 0, 0] = 4
    nib.save(nib.Nifti1Image(data, high.affine), str(pred / "015.nii.gz"))
    proc = evaluate(demo_env, "--pred", pred, "--gt", raw, "--dataset", "demo")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("not scored: ")]
    assert len(lines) == 3
    assert "notes_seg.nii.gz: names no subject" in lines[0]
    assert any("014.nii.gz: label grid" in ln for ln in lines)
    assert any("015.nii.gz: label values outside 0..3" in ln for ln in lines)
    mine, theirs = summary_of(pred), summary_of(results)
    assert sorted(mine["test_ids"]) == ["011", "012", "016"] and mine["selected_on"] is None
    for sid in ("011", "012", "016"):
        assert mine["per_subject"][sid] == theirs["per_subject"][sid]


def test_mmwhs_predictions_must_hold_its_label_values(tiny_runs, demo_env, tmp_path,
                                                      edited_config, load_script, monkeypatch,
                                                      capsys):
    """Class indices where the MMWHS layout stores 205, ..., 850 are refused, not read as
    background. A demo subject copied into the MMWHS layout, scored with the demo's settings
    and the mmwhs layout."""
    import experiment_init
    from utils.io import MMWHS_LABEL_VALUES, DataError

    image_path, label_path = acdc_paths(Path(demo_env["LCL_DATA_ROOT"]) / "demo" / "raw", "011")
    raw = tmp_path / "mmwhs_raw"
    raw.mkdir()
    shutil.copy(image_path, raw / "mr_train_1011_image.nii.gz")
    values = np.asarray((0, *MMWHS_LABEL_VALUES), np.int16)
    lab = nib.load(str(label_path))
    nib.save(nib.Nifti1Image(values[np.asarray(lab.dataobj)], lab.affine),
             str(raw / "mr_train_1011_label.nii.gz"))
    pred = tmp_path / "pred"
    pred.mkdir()
    classes = nib.load(str(tiny_runs["baseline"] / "test_results" / "011" /
                           "pred_seg_id_011.nii.gz"))
    nib.save(classes, str(pred / "mr_train_1011_image_seg.nii.gz"))
    monkeypatch.setattr(experiment_init, "CONFIG_DIR",
                        edited_config(data_layout='data_layout = "mmwhs"'))
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--pred", str(pred), "--gt", str(raw),
                                      "--dataset", "demo"])
    script = load_script("evaluate")
    with pytest.raises(DataError, match="no prediction could be scored"):
        script.main()
    found = np.unique(np.asarray(classes.dataobj))
    listed = ", ".join(str(int(v)) for v in found[found > 0])
    assert f"label values [{listed}] are not among the layout's (0, 205" in \
        capsys.readouterr().out
    # the same map in MMWHS values scores as the class-index file does in the ACDC layout
    nib.save(nib.Nifti1Image(values[np.asarray(classes.dataobj)], classes.affine),
             str(pred / "mr_train_1011_image_seg.nii.gz"))
    with pytest.raises(SystemExit) as done:
        script.main()
    assert done.value.code == 0
    theirs = summary_of(tiny_runs["baseline"] / "test_results")["per_subject"]["011"]
    assert summary_of(pred)["per_subject"]["1011"] == theirs


def test_summary_std_and_labels_against_numpy():
    def m(dice, hd=None):
        return {"dice": dice, "hd95": hd, "assd": None if hd is None else hd / 2}

    per_subject = {"a": [m(0.8, 4.0), m(0.0)], "b": [m(0.6, 6.0), m(1.0)],
                   "c": [m(0.1, 11.0), m(0.5, 2.0)]}
    s = summarize(per_subject, ("s1", "s2"), {"set": "validation", "iteration": 7,
                                              "val_dice": 0.5})
    s1, s2 = s["per_structure"]["s1"], s["per_structure"]["s2"]
    assert s1["dice"] == pytest.approx(np.mean([0.8, 0.6, 0.1]))
    assert s1["dice_std"] == pytest.approx(np.std([0.8, 0.6, 0.1], ddof=1))
    assert s1["hd95_std"] == pytest.approx(np.std([4.0, 6.0, 11.0], ddof=1))
    assert s1["assd_std"] == pytest.approx(np.std([2.0, 3.0, 5.5], ddof=1))
    assert s2["dice_std"] == pytest.approx(np.std([0.0, 1.0, 0.5], ddof=1))
    # one defined value: a mean but no spread
    assert s2["hd95"] == 2.0 and s2["hd95_std"] is None and s2["hd95_undefined"] == 2
    subject_means = [0.4, 0.8, 0.3]
    assert s["mean_dice"] == pytest.approx(np.mean(subject_means))
    assert s["mean_dice_std"] == pytest.approx(np.std(subject_means, ddof=1))
    assert s["units"] == {"dice": "fraction", "hd95": "mm", "assd": "mm"}
    assert s["selected_on"]["iteration"] == 7 and s["test_ids"] == ["a", "b", "c"]
    # the keys older readers use are all still there
    assert {"mean_dice", "per_structure", "per_subject", "per_subject_mean_dice",
            "n_subjects"} <= set(s)
    assert summarize({"a": per_subject["a"]}, ("s1", "s2"))["mean_dice_std"] is None


# ------------------------------------------ in-process: pairing, the ground truth, the outputs
def _label(acdc_root: Path, sid: str) -> tuple[np.ndarray, np.ndarray]:
    """(label map, affine) of an ACDC fixture patient's ground truth."""
    gt = nib.load(str(acdc_paths(acdc_root, sid)[1]))
    return np.asarray(gt.dataobj), gt.affine


def test_predictions_pair_by_the_layouts_subject_id(tmp_path, load_script):
    """Each naming (predict.py's <name>_seg, a run's pred_seg_id_<id>, a bare id), in
    sub-folders too, in sorted order: the first file of a subject wins, a later one is named."""
    evaluate = load_script("evaluate")
    pred = tmp_path / "pred"
    for name in ("001.nii.gz", "patient001_frame01_seg.nii.gz", "sub/pred_seg_id_002.nii.gz",
                 "prostate_11_seg.nii.gz", "notes.nii.gz", "readme.txt"):
        (pred / name).parent.mkdir(parents=True, exist_ok=True)
        (pred / name).write_text("x")
    pairs, problems = evaluate.paired_predictions(pred, "acdc")
    assert pairs == {"001": pred / "001.nii.gz", "002": pred / "sub" / "pred_seg_id_002.nii.gz"}
    assert problems == [
        f"{pred / 'notes.nii.gz'}: names no subject of the acdc layout",
        f"{pred / 'patient001_frame01_seg.nii.gz'}: subject 001 has a prediction already, "
        f"{pred / '001.nii.gz'}",
        f"{pred / 'prostate_11_seg.nii.gz'}: names no subject of the acdc layout"]
    pairs, _ = evaluate.paired_predictions(pred, "decathlon")
    assert pairs["011"] == pred / "prostate_11_seg.nii.gz" and "001" in pairs


def test_scores_use_each_subjects_own_ground_truth_and_spacing(acdc_root, tmp_path,
                                                               load_script):
    """001's prediction is its ground truth moved one voxel in x (1.5 mm); 002's is exactly
    its own. A prediction holding class 4 of a 4-class dataset is refused, class 3 is not."""
    import experiment_init

    evaluate = load_script("evaluate")
    cfg = experiment_init.load("demo")
    pred = tmp_path / "pred"
    pred.mkdir()
    lab1, aff1 = _label(acdc_root, "001")
    lab2, aff2 = _label(acdc_root, "002")
    nib.save(nib.Nifti1Image(np.roll(lab1, 1, axis=0), aff1), str(pred / "001.nii.gz"))
    nib.save(nib.Nifti1Image(lab2, aff2), str(pred / "002.nii.gz"))
    per_subject, problems = evaluate.score(
        {"002": pred / "002.nii.gz", "001": pred / "001.nii.gz"}, cfg, acdc_root)
    assert problems == [] and list(per_subject) == ["002", "001"]
    assert [m["dice"] for m in per_subject["002"]] == [1.0, 1.0, 1.0]
    assert [m["hd95"] for m in per_subject["002"]] == [0.0, 0.0, 0.0]
    assert all(0.5 < m["dice"] < 1.0 for m in per_subject["001"])
    assert [m["hd95"] for m in per_subject["001"]] == pytest.approx([1.5, 1.5, 1.5])
    for value, refused in ((4, True), (3, False)):
        data = lab2.astype(np.int16)
        data[0, 0, 0] = value
        nib.save(nib.Nifti1Image(data, aff2), str(pred / "002.nii.gz"))
        per_subject, problems = evaluate.score({"002": pred / "002.nii.gz"}, cfg, acdc_root)
        assert (problems == [f"{pred / '002.nii.gz'}: label values outside 0..3 (num_classes "
                             "of demo)"]) == refused
        assert (per_subject == {}) == refused


def _scored_run(tmp_path: Path, acdc_root: Path) -> Path:
    """A run directory as evaluate.py --run_dir reads it: its record says it tested 002 only
    (its configuration lists 001 too) on data that has moved since; test_results/ holds
    predictions of 001 and 002 (both exact); best.pt is of iteration 7, last.pt of 9."""
    import dataclasses

    import yaml

    import experiment_init
    from utils.run import save_checkpoint

    cfg = dataclasses.replace(experiment_init.load("demo"), test=["001", "002"],
                              data_path_tr=tmp_path / "moved_away")
    run = tmp_path / "run"
    record = {"trainer": "tr_baseline", "config": cfg.to_dict(), "test_ids": ["002"]}
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(record))
    for sid in ("001", "002"):
        lab, aff = _label(acdc_root, sid)
        (run / "test_results" / sid).mkdir(parents=True)
        nib.save(nib.Nifti1Image(lab, aff),
                 str(run / "test_results" / sid / f"pred_seg_id_{sid}.nii.gz"))
    for name, iteration in (("best", 7), ("last", 9)):
        save_checkpoint(run / "checkpoints" / f"{name}.pt",
                        {"iteration": iteration, "val_dice": iteration / 10})
    return run


def test_run_dir_rescoring_reads_the_recorded_ids_the_moved_data_and_best_pt(
        acdc_root, tmp_path, monkeypatch, load_script):
    evaluate = load_script("evaluate")
    run = _scored_run(tmp_path, acdc_root)
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--run_dir", str(run), "--gt",
                                      str(acdc_root)])
    with pytest.raises(SystemExit) as done:
        evaluate.main()
    assert done.value.code == 0
    summary = summary_of(run / "rescored")
    assert summary["test_ids"] == ["002"] and summary["mean_dice"] == 1.0
    assert summary["selected_on"] == {"set": "validation", "iteration": 7, "val_dice": 0.7}
    assert not (run / "test_results" / "summary.json").exists()


def test_prediction_folder_results_go_beside_it_and_every_problem_counts(
        acdc_root, tmp_path, monkeypatch, load_script, capsys):
    evaluate = load_script("evaluate")
    pred = tmp_path / "pred"
    pred.mkdir()
    lab, aff = _label(acdc_root, "002")
    nib.save(nib.Nifti1Image(lab, aff), str(pred / "patient002_frame03_seg.nii.gz"))
    nib.save(nib.Nifti1Image(lab, aff), str(pred / "notes.nii.gz"))  # names no subject
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--pred", str(pred), "--gt",
                                      str(acdc_root), "--dataset", "demo"])
    with pytest.raises(SystemExit) as done:
        evaluate.main()
    assert done.value.code == 1
    assert "1 subjects: mean Dice 1.0000" in capsys.readouterr().out
    summary = summary_of(pred)
    assert summary["test_ids"] == ["002"] and summary["selected_on"] is None
    out = tmp_path / "elsewhere"
    monkeypatch.setattr(sys, "argv", [*sys.argv, "--out", str(out)])
    with pytest.raises(SystemExit):
        evaluate.main()
    assert summary_of(out) == summary
