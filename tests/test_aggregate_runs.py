"""scripts/aggregate_runs.py: the paper's table from hand-made run folders (config.yaml +
test_results/summary.json), with numbers chosen so that each statistic can be checked by hand."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
import yaml
from scipy.stats import wilcoxon

STRUCTS = ("rv", "myo", "lv")


@pytest.fixture
def agg(load_script):
    return load_script("aggregate_runs")


def make_run(folder: Path, trainer: str, tr: str, comb: str, ver: int, mean_dice: float,
             seed: int | None = None, finished: bool = True, dataset: str = "acdc",
             **flags) -> Path:
    """A run folder whose name says nothing: everything is in config.yaml."""
    all_flags = {"dataset": dataset, "no_of_tr_imgs": tr, "comb_tr_imgs": comb, "ver": ver,
                 "seed": seed, "n_iter": 5001, **flags}
    if trainer != "tr_baseline":
        all_flags.setdefault("loss_reduction", "original")
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"trainer": trainer, "flags": all_flags}))
    if finished:
        # structure k has Dice mean_dice + (k - 1) / 10 and HD95 10 * (k + 1) mm
        per_structure = {name: {"dice": mean_dice + (k - 1) / 10, "hd95": 10.0 * (k + 1),
                                "assd": 1.0, "hd95_undefined": 0, "assd_undefined": 0}
                         for k, name in enumerate(STRUCTS)}
        (folder / "test_results").mkdir()
        (folder / "test_results" / "summary.json").write_text(json.dumps(
            {"mean_dice": mean_dice, "per_structure": per_structure, "n_subjects": 2}))
    return folder


BASE, JOINT = "tr_baseline", "prop_method_joint_tr_rand_init"
# baseline mean Dice per (comb, seed); the joint's differences from it (hand-chosen, no ties)
BASELINE_DICE = {("c1", 0): 0.60, ("c1", 1): 0.80, ("c2", 0): 0.50, ("c2", 1): 0.70,
                 ("c3", 0): 0.40}
DIFFS = {("c1", 0): 0.05, ("c1", 1): 0.02, ("c2", 0): -0.01, ("c2", 1): 0.08, ("c3", 0): 0.03}


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    i = 0
    for (comb, seed), dice in BASELINE_DICE.items():
        i += 1
        make_run(root / "a" / f"run{i}", BASE, "tr1", comb, ver=seed, mean_dice=dice)
        make_run(root / "b" / f"run{i}", JOINT, "tr1", comb, ver=seed,
                 mean_dice=dice + DIFFS[comb, seed])
    # a tagged joint run, a run of the paper's other reduction, and one without results
    make_run(root / "c" / "x", JOINT, "tr1", "c1", ver=0, mean_dice=0.9, tag="lam05")
    make_run(root / "c" / "y", JOINT, "tr1", "c1", ver=0, mean_dice=0.7, loss_reduction="mean")
    make_run(root / "c" / "z", JOINT, "tr2", "c1", ver=0, mean_dice=0.7, finished=False)
    return root


def test_cells_average_seeds_within_a_combination_then_over_combinations(runs_root, agg):
    runs, _ = agg.collect(runs_root)
    rows = {(r.method, r.tr): r for r in agg.build_rows(runs)}
    base = rows["baseline", "tr1"]
    # per combination: c1 (0.6 + 0.8) / 2 = 0.7, c2 0.6, c3 0.4 -> mean 0.5667, std (ddof 1)
    per_comb = [0.7, 0.6, 0.4]
    mean = sum(per_comb) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in per_comb) / 2)
    assert base.stats["mean_dice"] == pytest.approx((mean, std, 3))
    assert base.n_runs == 5
    # structure k = mean Dice + (k - 1) / 10, HD95 = mean over structures of 10 (k + 1) = 20
    assert base.stats["rv"][0] == pytest.approx(mean - 0.1)
    assert base.stats["lv"][0] == pytest.approx(mean + 0.1)
    assert base.stats["hd95"] == pytest.approx((20.0, 0.0, 3))
    # one run, one combination: no standard deviation
    assert math.isnan(rows["lam05 (joint original)", "tr1"].stats["mean_dice"][1])
    assert rows["joint mean", "tr1"].stats["mean_dice"][:1] == pytest.approx((0.7,))


def test_paired_comparison_is_wilcoxon_over_combination_seed_units(runs_root, agg):
    rows = {(r.method, r.tr): r for r in agg.build_rows(agg.collect(runs_root)[0])}
    joint = rows["joint original", "tr1"]
    diffs = list(DIFFS.values())
    assert joint.n_pairs == 5
    assert joint.diff == pytest.approx(sum(diffs) / 5)
    # ranks of |d|: 1 (the one negative), 2, 3, 4, 5 -> W- = 1; exact two-sided p = 2 * 2/32
    assert joint.p == pytest.approx(0.125)
    assert joint.p == pytest.approx(wilcoxon(diffs).pvalue)
    # the tagged run pairs with the baseline of its unit (c1, ver 0, seed 0) only
    tagged = rows["lam05 (joint original)", "tr1"]
    assert tagged.n_pairs == 1 and tagged.diff == pytest.approx(0.9 - 0.6)
    assert math.isnan(rows["baseline", "tr1"].p)


def test_unfinished_missing_and_unreadable_runs_are_listed(runs_root, agg):
    make_run(runs_root / "d" / "broken", BASE, "tr1", "c9", ver=0, mean_dice=0.5)
    (runs_root / "d" / "broken" / "test_results" / "summary.json").write_text("{not json")
    (runs_root / "d" / "bad").mkdir()
    (runs_root / "d" / "bad" / "config.yaml").write_text("trainer: tr_baseline\n")
    runs, problems = agg.collect(runs_root)
    text = "\n".join(f"{p.path}: {p.what}" for p in problems)
    assert f"{runs_root / 'c' / 'z'}: unfinished or failed" in text
    assert f"{runs_root / 'd' / 'broken'}: failed: unreadable summary.json" in text
    assert f"{runs_root / 'd' / 'bad'}: unreadable config.yaml" in text
    # units other methods have at tr1: the tagged and 'mean' methods lack four of five, and
    # the broken baseline's unit c9 is expected of the other tr1 methods (not of itself: it is
    # listed as failed already)
    missing = sorted(p.what for p in problems if p.what.startswith("missing"))
    assert "missing: joint mean tr1 c2 ver 1 seed 1 (other methods have it)" in missing
    assert "missing: joint original tr1 c9 ver 0 seed 0 (other methods have it)" in missing
    assert not any(m.startswith("missing: baseline") for m in missing)
    assert len(missing) == 5 + 5 + 1
    assert len(runs) == 12


def test_seed_defaults_to_ver_and_pairs_by_it(tmp_path, agg):
    make_run(tmp_path / "p", BASE, "tr2", "c1", ver=3, mean_dice=0.5)
    make_run(tmp_path / "q", JOINT, "tr2", "c1", ver=3, mean_dice=0.6, seed=3)
    make_run(tmp_path / "r", JOINT, "tr2", "c1", ver=3, mean_dice=0.9, seed=4)
    runs, problems = agg.collect(tmp_path)
    assert sorted(r.seed for r in runs) == [3, 3, 4]
    joint = next(r for r in agg.build_rows(runs) if r.method == "joint original")
    assert joint.n_pairs == 1 and joint.diff == pytest.approx(0.1)
    assert [p.what for p in problems] == [
        "missing: baseline tr2 c1 ver 3 seed 4 (other methods have it)"]


def test_cells_mixing_other_flags_are_flagged(tmp_path, agg):
    make_run(tmp_path / "p", BASE, "tr1", "c1", ver=0, mean_dice=0.5, device="cuda")
    make_run(tmp_path / "q", BASE, "tr1", "c2", ver=0, mean_dice=0.6, device="cpu", n_iter=20)
    text = agg.markdown(agg.build_rows(agg.collect(tmp_path)[0]), [])
    assert "acdc baseline tr1 mixes runs whose flags differ: n_iter (" in text


def test_outputs_md_csv_tex(runs_root, tmp_path, capsys, agg):
    agg.main([str(runs_root), "--out", str(tmp_path / "t.csv")])
    printed = capsys.readouterr().out
    # joint per combination 0.735, 0.635, 0.43: mean 0.6 (rv 0.1 lower), std 0.155
    assert "| joint original | tr1 | 0.500 ± 0.155 | 0.600 ± 0.155 | " in printed
    assert "| baseline | tr1 | " in printed and "| 3 (5) |" in printed
    assert "two-sided Wilcoxon signed-rank test" in printed and "Not in the table (" in printed
    rows = list(csv.DictReader(io.StringIO((tmp_path / "t.csv").read_text())))
    joint = next(r for r in rows if r["method"] == "joint original" and r["tr"] == "tr1")
    assert float(joint["wilcoxon_p"]) == pytest.approx(0.125)
    assert int(joint["n_combinations"]) == 3 and int(joint["n_pairs"]) == 5
    assert float(joint["hd95_mm_mean"]) == pytest.approx(20.0)
    agg.main([str(runs_root), "--out", str(tmp_path / "t.tex")])
    tex = (tmp_path / "t.tex").read_text()
    assert r"\begin{tabular}" in tex and "lam05 (joint original) & tr1" in tex
    with pytest.raises(SystemExit):
        agg.main([str(runs_root), "--out", str(tmp_path / "t.txt")])


def set_hd95(run_dir: Path, hd95: list[float | None]) -> None:
    """Rewrite a made run's per-structure HD95 (None: undefined on every test subject)."""
    path = run_dir / "test_results" / "summary.json"
    summary = json.loads(path.read_text())
    for entry, value in zip(summary["per_structure"].values(), hd95, strict=True):
        entry["hd95"] = value
    path.write_text(json.dumps(summary))


def test_undefined_hd95_is_left_out_at_each_level(tmp_path, agg):
    # a structure without HD95 leaves the run's mean over the others: (20 + 30) / 2 = 25
    set_hd95(make_run(tmp_path / "a", BASE, "tr1", "c1", ver=0, mean_dice=0.5), [None, 20, 30])
    # a run without any HD95 leaves its combination's mean over its other seeds: c1 stays 25
    set_hd95(make_run(tmp_path / "b", BASE, "tr1", "c1", ver=1, mean_dice=0.5),
             [None, None, None])
    # a combination without any HD95 leaves the cell's statistics: over c1 25 and c3 20 only
    set_hd95(make_run(tmp_path / "c", BASE, "tr1", "c2", ver=0, mean_dice=0.5),
             [None, None, None])
    set_hd95(make_run(tmp_path / "d", BASE, "tr1", "c3", ver=0, mean_dice=0.5), [10, 20, 30])
    runs, problems = agg.collect(tmp_path)
    assert len(runs) == 4 and not problems
    (row,) = agg.build_rows(runs)
    assert row.stats["hd95"] == pytest.approx((22.5, math.sqrt(2 * 2.5 ** 2), 2))
    assert row.stats["mean_dice"][2] == 3


def test_a_run_with_non_finite_mean_dice_is_listed_not_counted(tmp_path, agg):
    make_run(tmp_path / "ok", BASE, "tr1", "c1", ver=0, mean_dice=0.5)
    make_run(tmp_path / "nan", BASE, "tr1", "c2", ver=0, mean_dice=math.nan)
    runs, problems = agg.collect(tmp_path)
    assert [r.comb for r in runs] == ["c1"]
    assert [(p.path, p.what) for p in problems] == [(tmp_path / "nan", "failed: mean Dice nan")]


def test_rows_per_labeled_set_size_in_natural_order(tmp_path, agg):
    # the joint run of each size beats the baseline of its own size by 0.01 * (size / 8)
    for i, (tr, dice) in enumerate({"tr52": 0.8, "tr8": 0.6, "tr1": 0.3}.items()):
        make_run(tmp_path / f"b{i}", BASE, tr, "c1", ver=0, mean_dice=dice)
        make_run(tmp_path / f"j{i}", JOINT, tr, "c1", ver=0,
                 mean_dice=dice + 0.01 * int(tr[2:]) / 8)
    rows = agg.build_rows(agg.collect(tmp_path)[0])
    assert [(r.method, r.tr) for r in rows] == [
        (m, tr) for m in ("baseline", "joint original") for tr in ("tr1", "tr8", "tr52")]
    base = {r.tr: r.stats["mean_dice"][0] for r in rows if r.method == "baseline"}
    assert base == pytest.approx({"tr1": 0.3, "tr8": 0.6, "tr52": 0.8})
    joint = [r for r in rows if r.method != "baseline"]
    assert {r.tr: r.diff for r in joint} == pytest.approx({"tr1": 0.01 / 8, "tr8": 0.01,
                                                           "tr52": 0.065})
    assert [r.n_pairs for r in joint] == [1, 1, 1]


def test_wilcoxon_keeps_the_pairs_with_other_differences_when_one_is_zero(tmp_path, agg):
    diffs = [0.0, 0.05, -0.01, 0.08, 0.03, 0.02]
    for i, d in enumerate(diffs):
        make_run(tmp_path / f"b{i}", BASE, "tr1", f"c{i}", ver=0, mean_dice=0.5)
        make_run(tmp_path / f"j{i}", JOINT, "tr1", f"c{i}", ver=0, mean_dice=0.5 + d)
    rows = agg.build_rows(agg.collect(tmp_path)[0])
    joint = next(r for r in rows if r.method == "joint original")
    assert joint.n_pairs == 6
    # scipy's default drops the zero difference ("wilcox"): the p of the other five
    expected = wilcoxon([0.5 + d - 0.5 for d in diffs]).pvalue
    assert math.isfinite(expected) and joint.p == pytest.approx(expected)
    assert math.isnan(agg.wilcoxon_p([0.0, 0.0]))


def test_duplicate_runs_are_listed_and_left_out(runs_root, agg):
    # a copy of joint c1 seed 0 (another folder, another score): neither copy is counted, so
    # the joint row has one run less and its pairs one unit less; both are listed
    make_run(runs_root / "copy" / "run1", JOINT, "tr1", "c1", ver=0, mean_dice=0.99)
    runs, problems = agg.collect(runs_root)
    rows = {(r.method, r.tr): r for r in agg.build_rows(runs)}
    joint = rows["joint original", "tr1"]
    assert joint.n_runs == 4 and rows["baseline", "tr1"].n_runs == 5
    diffs = [d for key, d in DIFFS.items() if key != ("c1", 0)]
    assert (joint.diff, joint.p, joint.n_pairs) == pytest.approx(
        (sum(diffs) / 4, wilcoxon(diffs).pvalue, 4))
    listed = {p.path.relative_to(runs_root).as_posix(): p.what for p in problems}
    assert "copy/run1" in listed["b/run1"] and "b/run1" in listed["copy/run1"]
    assert all(w.startswith("duplicate") for k, w in listed.items() if k.endswith("run1"))
    assert not any("missing: joint original tr1" in w for w in listed.values())  # not missing


def test_each_comparison_method_is_a_row_of_its_own_paired_with_the_baseline(tmp_path, agg):
    for i, (comb, dice) in enumerate((("c1", 0.6), ("c2", 0.5))):
        make_run(tmp_path / f"b{i}", BASE, "tr1", comb, ver=0, mean_dice=dice)
        make_run(tmp_path / f"j{i}", JOINT, "tr1", comb, ver=0, mean_dice=dice + 0.2)
        for k, method in enumerate(("self_training", "mean_teacher", "bcp")):
            make_run(tmp_path / f"{method}{i}", method, "tr1", comb, ver=0,
                     mean_dice=dice + 0.01 * (k + 1))
    rows = agg.build_rows(agg.collect(tmp_path)[0])
    assert [r.method for r in rows] == ["baseline", "joint original", "self_training",
                                        "mean_teacher", "bcp"]
    by = {r.method: r for r in rows}
    assert by["mean_teacher"].diff == pytest.approx(0.02) and by["mean_teacher"].n_pairs == 2
