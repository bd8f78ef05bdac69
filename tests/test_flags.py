"""utils/flags.py: each step's parser, the init-file defaults, and the pipeline script's
routing of flags to the steps (checked through the script with a stand-in interpreter)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import experiment_init
from utils.errors import ConfigError
from utils.flags import BASELINE, FLAGS, JOINT, RESUME_FREE_FLAGS, parse_flags, parser, route

REPO = Path(__file__).resolve().parents[1]


def test_each_step_parses_its_own_flags_only():
    assert parser(JOINT).parse_args(["--lamda_local", "0.3"]).lamda_local == 0.3
    with pytest.raises(SystemExit):
        parser(BASELINE).parse_args(["--lamda_local", "0.3"])
    both = {f.name for f in FLAGS if {BASELINE, JOINT} <= set(f.steps)}
    assert {"max_bad_steps", "n_iter", "ckpt_every", "resume"} <= both
    assert vars(parser(BASELINE).parse_args([])).keys() == both


def test_crf_workers_is_a_joint_flag_free_on_resume():
    assert parser(JOINT).parse_args([]).crf_workers is None  # the trainer's CPUs
    assert parser(JOINT).parse_args(["--crf_workers", "2"]).crf_workers == 2
    with pytest.raises(SystemExit):
        parser(JOINT).parse_args(["--crf_workers", "0"])
    with pytest.raises(SystemExit):
        parser(BASELINE).parse_args(["--crf_workers", "2"])
    assert "crf_workers" in RESUME_FREE_FLAGS  # a resumed run may run on another machine


def test_init_file_defaults_and_the_joint_steps_n_iter():
    cfg = experiment_init.load("demo")
    args, _ = parse_flags(BASELINE, ["--dataset", "demo"])
    assert (args.n_iter, args.lr_seg) == (cfg.n_iter, cfg.lr)
    args, _ = parse_flags(JOINT, ["--dataset", "demo"])
    assert (args.n_iter_per_round, args.n_rounds, args.bt_size, args.n_iter) == (
        cfg.n_iter_per_round, cfg.n_rounds, cfg.batch_size_ft, None)
    # the released joint script's --n_iter counted the whole run: 15001 = 3 x 5000 + 1
    args, _ = parse_flags(JOINT, ["--dataset", "demo", "--n_iter", "15001", "--n_rounds", "3"])
    assert args.n_iter_per_round == 5000
    args, _ = parse_flags(JOINT, ["--dataset", "demo", "--n_iter", "7", "--n_rounds", "2"])
    assert args.n_iter_per_round == 3
    args, _ = parse_flags(JOINT, ["--dataset", "demo", "--n_iter", str(2 * cfg.n_rounds)])
    assert args.n_iter_per_round == 2  # the init file's rounds
    with pytest.raises(ConfigError, match="--n_iter=1: the joint step's whole run"):
        parse_flags(JOINT, ["--dataset", "demo", "--n_iter", "1", "--n_rounds", "2"])
    args, _ = parse_flags(JOINT, ["--dataset", "demo", "--n_iter", "7", "--n_iter_per_round", "5"])
    assert args.n_iter_per_round == 5


# The defaults of the released trainers' argparse (METHOD §9: keep names and defaults).
ORIGINAL_DEFAULTS = dict(
    dataset="acdc", no_of_tr_imgs="tr2", comb_tr_imgs="c1", ver=0, lr_seg=0.001, dsc_loss=2,
    rd_en=1, sigma=5.0, ri_en=1, en_1hot=1, rd_ni=1)
ORIGINAL_JOINT_DEFAULTS = dict(
    data_aug=0, temp_fac=0.1, bbox_dim=150, local_loss_exp_no=1, lamda_local=0.1,
    no_of_neg_eles=3, no_of_pos_eles=3, bt_size=10, test_aug_overlap=0, test_f1_threshold=0.9)


def test_the_original_flags_keep_the_original_defaults():
    base, _ = parse_flags(BASELINE, [])
    joint, _ = parse_flags(JOINT, [])
    for name, value in ORIGINAL_DEFAULTS.items():
        assert getattr(base, name) == value and getattr(joint, name) == value, name
    for name, value in ORIGINAL_JOINT_DEFAULTS.items():
        assert getattr(joint, name) == value, name


def test_route_gives_each_flag_to_the_steps_that_read_it():
    got = route(["--n_iter", "4", "--lamda_local=0.2", "--ver", "1", "--low_memory",
                 "--lr_seg", "-1", "--n_rounds", "2", "--unknown", "x", "--other"])
    assert got[BASELINE] == ["--n_iter", "4", "--ver", "1", "--low_memory", "--lr_seg", "-1",
                             "--unknown", "x", "--other"]
    assert got[JOINT] == ["--lamda_local=0.2", "--ver", "1", "--low_memory", "--lr_seg", "-1",
                          "--n_rounds", "2", "--unknown", "x", "--other"]


FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for python: the route question goes to the real one; a trainer run is recorded.
if [ "$1" = "-P" ]; then exec {python} "$@"; fi
printf '%s|' "$@" >> {record}; echo >> {record}
echo "run directory: /runs/$(basename "$1" .py)"
"""


def test_pipeline_script_asks_the_parser_which_step_reads_each_flag(tmp_path):
    record = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(python=shlex.quote(sys.executable),
                                       record=shlex.quote(str(record))))
    fake.chmod(0o755)
    (tmp_path / "utils").mkdir()  # a utils package in the working directory is not imported
    (tmp_path / "utils" / "__init__.py").touch()
    proc = subprocess.run(
        ["bash", str(REPO / "pseudo_lbl_rand_init.sh"), "tr2", "c1", "demo", "--n_iter", "4",
         "--lamda_local", "0.2", "--out_dir", "o d", "--crf=0", "--tag", "abl"],
        cwd=tmp_path, env={**os.environ, "PYTHON": str(fake)}, capture_output=True, text=True,
        timeout=120)
    assert proc.returncode == 0, proc.stderr
    base, joint, compare = record.read_text().splitlines()
    common = "--dataset=demo|--no_of_tr_imgs=tr2|--comb_tr_imgs=c1"
    assert base == f"{REPO}/train_model/tr_baseline.py|{common}|--n_iter|4|--out_dir|o d|--tag|abl|"
    assert joint == (f"{REPO}/train_model/prop_method_joint_tr_rand_init.py|{common}|"
                     "--pretr_dir=/runs/tr_baseline|--lamda_local|0.2|--out_dir|o d|--crf=0|--tag|"
                     "abl|")
    assert compare == (f"{REPO}/scripts/compare_runs.py|/runs/tr_baseline|"
                       "/runs/prop_method_joint_tr_rand_init|")


def test_each_augmentation_and_loss_flag_reaches_its_own_setting():
    """Every flag a training iteration reads, set away from its default, lands in the
    iteration's settings under its own name (a swapped pair would show)."""
    from utils.augment import DiceAugment
    from utils.baseline_training import BaselineSettings
    from utils.joint_training import JointSettings

    common = ["--dataset", "demo", "--rd_en", "0", "--ri_en", "1", "--en_1hot", "0",
              "--sigma", "3.5", "--intensity_draws", "independent"]
    args, cfg = parse_flags(BASELINE, common)
    assert BaselineSettings.from_flags(args, cfg.num_classes, 7) == BaselineSettings(
        num_classes=cfg.num_classes, batch_size=7, augment=DiceAugment(
            rd_en=False, sigma=3.5, ri_en=True, en_1hot=False, coupled_intensity=False))
    args, cfg = parse_flags(BASELINE, ["--dataset", "demo", "--rd_en", "1", "--ri_en", "0"])
    got = BaselineSettings.from_flags(args, cfg.num_classes, 7).augment
    assert (got.rd_en, got.ri_en, got.en_1hot, got.sigma, got.coupled_intensity) == (
        True, False, True, 5.0, True)

    args, cfg = parse_flags(JOINT, [*common, "--bt_size", "6", "--no_of_pos_eles", "4",
                                    "--temp_fac", "0.25", "--lamda_local", "0.7",
                                    "--local_loss_exp_no", "0", "--loss_reduction", "mean"])
    assert JointSettings.from_flags(args, cfg.num_classes, 9) == JointSettings(
        num_classes=cfg.num_classes, n_seg=9, bt_size=6, no_of_pos_eles=4, temp_fac=0.25,
        lamda_local=0.7, inter_image=False, loss_reduction="mean", augment=DiceAugment(
            rd_en=False, sigma=3.5, ri_en=True, en_1hot=False, coupled_intensity=False))
    args, cfg = parse_flags(JOINT, ["--dataset", "demo", "--rd_en", "1", "--ri_en", "0"])
    got = JointSettings.from_flags(args, cfg.num_classes, 9)
    assert (got.augment.rd_en, got.augment.ri_en, got.inter_image, got.loss_reduction,
            got.augment.coupled_intensity) == (True, False, True, "original", True)



def test_the_comparison_methods_parse_their_own_flags_and_paper_defaults():
    from utils.flags import BCP, MEAN_TEACHER, SELF_TRAINING

    assert parser(MEAN_TEACHER).parse_args(["--ema_decay", "0.5"]).ema_decay == 0.5
    assert parser(SELF_TRAINING).parse_args(["--crf", "0"]).crf == 0
    for step, flag in ((BASELINE, "--ema_decay"), (JOINT, "--u_weight"),
                       (MEAN_TEACHER, "--lamda_local"), (SELF_TRAINING, "--lamda_local"),
                       (SELF_TRAINING, "--ema_decay"), (BCP, "--dsc_loss"),
                       (BCP, "--consistency"), (MEAN_TEACHER, "--cuda_graph")):
        with pytest.raises(SystemExit):
            parser(step).parse_args([flag, "1"])
    cfg = experiment_init.load("demo")
    args, _ = parse_flags(MEAN_TEACHER, ["--dataset", "demo"])
    whole = cfg.n_iter + cfg.n_rounds * cfg.n_iter_per_round  # the baseline's + the joint's
    assert (args.n_iter, args.consistency_rampup, args.consistency_start) == (
        whole, whole, whole // 30)
    assert (args.labeled_bs, args.unlabeled_bs, args.ema_decay, args.consistency,
            args.teacher_noise) == (12, 12, 0.99, 0.1, 0.1)
    args, _ = parse_flags(MEAN_TEACHER, ["--dataset", "demo", "--n_iter", "300"])
    assert (args.consistency_rampup, args.consistency_start) == (300, 10)
    args, _ = parse_flags(BCP, ["--dataset", "demo"])
    assert (args.pre_iter, args.n_iter, args.u_weight, args.mask_ratio) == (
        cfg.n_iter, cfg.n_rounds * cfg.n_iter_per_round, 0.5, 2 / 3)
    args, _ = parse_flags(SELF_TRAINING, ["--dataset", "demo", "--n_iter", "7", "--n_rounds", "2"])
    assert args.n_iter_per_round == 3  # the whole run, as the joint step's
    with pytest.raises(ConfigError, match="--ema_decay=1.5"):
        parse_flags(MEAN_TEACHER, ["--dataset", "demo", "--ema_decay", "1.5"])
    # the pipeline script never gets a comparison method's own flags
    assert route(["--ema_decay", "0.5", "--crf", "0"]) == {BASELINE: [], JOINT: ["--crf", "0"]}


def test_every_flag_says_what_it_does():
    assert all(f.options.get("help") for f in FLAGS), [f.name for f in FLAGS
                                                       if not f.options.get("help")]
