"""scripts/show_joint_batch.py: one joint batch as the trainer builds it, written for a person."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import experiment_init
from utils.dataset import load_slices
from utils.errors import ConfigError


@pytest.mark.parametrize("variant", [1, 0])
def test_show_joint_batch_writes_what_the_loss_sees(tmp_path, demo_env, load_script,
                                                    variant):
    data_root = str(Path(demo_env["LCL_DATA_ROOT"]) / "demo")
    out = tmp_path / "out"
    load_script("show_joint_batch").main([
        "--dataset", "demo", "--local_loss_exp_no", str(variant), "--seed", "3",
        "--data_root", data_root, "--out", str(out), "--bt_size", "6"])
    z = np.load(out / "joint_batch.npz")
    cfg = experiment_init.load("demo", data_root)
    n_seg, b, h, w = cfg.mtask_bs, 6, *cfg.crop_size
    assert z["images"].shape == (n_seg + 2 * b, 1, h, w) and z["images"].dtype == np.float32
    assert z["labels"].shape == (n_seg + 2 * b, h, w)
    assert z["pairs"].tolist() == [[i, b + i] for i in range(b)]
    assert str(z["variant"]) == ("inter" if variant else "intra")
    xc, yc = z["images"][n_seg:, 0], z["labels"][n_seg:]
    # every contrastive label map is a slice of the labeled pool or of the pool's ground truth
    lab = load_slices(cfg, cfg.labeled_ids("tr2", "c1"))[1].numpy()
    pool = np.concatenate([load_slices(cfg, [s])[1].numpy() for s in cfg.unlabeled_ids()])
    origin = []
    for k in range(2 * b):
        in_lab = any(np.array_equal(yc[k], s) for s in lab)
        in_pool = any(np.array_equal(yc[k], s) for s in pool)
        assert in_lab or in_pool
        origin.append("L" if in_lab and not in_pool else "U" if in_pool and not in_lab else "?")
    if variant == 0:  # intra: each pair is one slice under two intensity draws
        for i in range(b):
            assert np.array_equal(yc[i], yc[b + i])
            inside = (xc[i] > 0) & (xc[i] < 1.5) & (xc[b + i] > 0) & (xc[b + i] < 1.5)
            a, c = np.polyfit(xc[i][inside], xc[b + i][inside], 1)
            np.testing.assert_allclose(a * xc[i][inside] + c, xc[b + i][inside], atol=1e-4)
        assert origin[: b // 2].count("U") == 0 and origin[b // 2: b].count("L") == 0
    png = out / "joint_batch.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_ground_truth_in_place_of_pseudo_labels_needs_a_labeled_pool(load_script):
    import torch

    pool = {"001": (torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 4, dtype=torch.uint8)),
            "021": (torch.zeros(3, 1, 4, 4), None)}
    pool_labels = load_script("show_joint_batch").pool_labels
    with pytest.raises(ConfigError, match="pool volumes 021 have no ground truth"):
        pool_labels(None, pool, "gt", None)
    images, labels = pool_labels(None, {"001": pool["001"]}, "gt", None)
    assert images.shape == (2, 1, 4, 4) and labels.shape == (2, 4, 4)
