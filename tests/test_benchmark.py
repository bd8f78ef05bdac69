"""The benchmark's protocol estimate: its count of validations and its sum, worked by hand."""

from __future__ import annotations

import pytest

import experiment_init


@pytest.mark.parametrize("n, every", [(5001, 50), (5000, 50), (601, 50), (200, 50), (1, 50),
                                      (7, 3)])
def test_validations_counts_what_the_training_loop_runs(load_script, n, every):
    bench = load_script("benchmark")
    # Run.train validates when (it - start) % every == 0 or at the last iteration.
    by_loop = sum(1 for it in range(n) if it % every == 0 or it == n - 1)
    assert bench.validations(n, every) == by_loop


def test_protocol_estimate_of_acdc_by_hand(load_script):
    bench = load_script("benchmark")
    cfg = experiment_init.load("acdc")
    assert (cfg.n_iter, cfg.n_rounds, cfg.n_iter_per_round, cfg.val_step_update) == (
        5001, 3, 5000, 50)
    assert len(cfg.unlabeled_ids()) == 52
    # 5001 x 0.02 s + 15000 x 0.03 s + (101 + 3 x 101) validations x 0.01 s + 3 x 52 x 0.1 s
    seconds = bench.protocol_seconds(cfg, 0.02, 0.03, 0.01, 0.1)
    assert seconds == pytest.approx(100.02 + 450.0 + 4.04 + 15.6)


def test_the_commit_says_when_the_tree_differs_from_it(load_script):
    bench = load_script("benchmark")
    assert bench.commit_name({"git_commit": "0123456789ab", "git_dirty": False}) == "0123456"
    assert bench.commit_name({"git_commit": "0123456789ab", "git_dirty": True}) == "0123456+"
    assert bench.commit_name({"git_commit": None, "git_dirty": None}) == "?"
