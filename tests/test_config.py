"""Configuration loading: every dataset, path overrides, and clear errors for bad choices."""

from __future__ import annotations

import pytest

import experiment_init
from experiment_init import REPO_ROOT, ConfigError


@pytest.mark.parametrize("dataset", experiment_init.DATASETS)
def test_every_dataset_loads_and_is_consistent(dataset):
    cfg = experiment_init.load(dataset)
    assert len(cfg.struct_name) == cfg.num_classes - 1
    assert cfg.data_path_tr.is_relative_to(REPO_ROOT / "data" / dataset)
    assert cfg.srt_dir == REPO_ROOT / "runs"
    for key in cfg.labeled:
        if key in cfg.validation:
            tr, _, comb = key.partition("_")
            assert cfg.labeled_ids(tr, comb or None) == cfg.labeled[key]
    assert not set(cfg.test) & set(cfg.labeled_ids("tr2", "c1"))


def test_published_numbers():
    acdc = experiment_init.load("acdc")
    assert acdc.target_resolution == (1.36719, 1.36719) and acdc.crop_size == (192, 192)
    assert experiment_init.load("mmwhs").crop_size == (160, 160)
    assert experiment_init.load("prostate_md").labeled["trall"][:2] == ["000", "001"]
    assert len(acdc.labeled[acdc.unlabeled_pool]) == 52


def test_unknown_labeled_set_lists_the_valid_ones():
    cfg = experiment_init.load("acdc")
    with pytest.raises(ConfigError, match=r"--no_of_tr_imgs=tr3 --comb_tr_imgs=c1.*tr1_c1.*tr2_c1"):
        cfg.labeled_ids("tr3", "c1")
    with pytest.raises(ConfigError, match="comb_tr_imgs=c4 is not a labeled set"):
        cfg.val_ids("tr8", "c4")
    with pytest.raises(ConfigError, match="--dataset='brats'"):
        experiment_init.load("brats")


def test_path_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("LCL_DATA_ROOT", str(tmp_path / "all"))
    monkeypatch.setenv("LCL_RUNS_ROOT", str(tmp_path / "runs"))
    cfg = experiment_init.load("demo")
    assert cfg.data_path_tr == tmp_path / "all" / "demo" / "raw"
    assert cfg.data_path_tr_cropped == tmp_path / "all" / "demo" / "cropped"
    assert cfg.srt_dir == tmp_path / "runs"
    cfg = experiment_init.load("demo", data_root=tmp_path / "mine", out_dir=tmp_path / "o")
    assert cfg.data_path_tr == tmp_path / "mine" / "raw" and cfg.srt_dir == tmp_path / "o"
