"""Configuration loading: every dataset, path overrides, and clear errors for bad choices."""

from __future__ import annotations

import pytest

import experiment_init
from experiment_init import REPO_ROOT
from utils.errors import ConfigError


@pytest.mark.parametrize("dataset", experiment_init.datasets())
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
    for name in experiment_init.datasets():  # the original's B, its --bt_size default
        assert experiment_init.load(name).batch_size_ft == 10


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


def test_datasets_are_the_init_files_present(edited_config):
    assert experiment_init.datasets() == ("acdc", "demo", "mmwhs", "prostate_md")
    folder = edited_config("tiny", img_size_x="img_size_x = 32")
    assert experiment_init.datasets(folder) == ("tiny",)
    cfg = experiment_init.load("tiny", config_dir=folder)
    assert cfg.dataset == "tiny" and cfg.crop_size == (32, 64)
    with pytest.raises(ConfigError, match=r"--dataset='demo' is unknown; choose one of tiny"):
        experiment_init.load("demo", config_dir=folder)


def test_an_edited_value_takes_effect(edited_config):
    folder = edited_config(lr="lr = 5e-4", batch_size_ft="batch_size_ft = 4",
                           crf_params="crf_params = dict(g_sxy=3, n_iter=5)",
                           target_resolution="target_resolution = [2, 2.5]")
    cfg = experiment_init.load("demo", config_dir=folder)
    assert cfg.lr == 5e-4 and cfg.batch_size_ft == 4
    assert cfg.crf_params == {"g_sxy": 3, "n_iter": 5}
    assert cfg.target_resolution == (2.0, 2.5) and isinstance(cfg.target_resolution[0], float)
    # the file is read again at every load: an edit between two loads is seen
    edited_config(lr="lr = 0.25")
    assert experiment_init.load("demo", config_dir=folder).lr == 0.25


@pytest.mark.parametrize(("edit", "message"), [
    ({"lr_sed": "lr_sed = 0.1"}, r"init_demo.py: unknown setting 'lr_sed'; rename or delete it "
     r"\(the settings are img_size_x, .*batch_size_ft"),
    ({"interp_val": "interp_val = 1"}, r"init_demo.py: 'interp_val' is not a setting: the "
     r"decoder always upsamples nearest-neighbour.*delete the line"),
    ({"num_channels": "num_channels = 3"}, r"'num_channels' is not a setting: .*single-channel"),
    ({"lr": ""}, r"init_demo.py lacks the setting 'lr'"),
    ({"batch_size_ft": "batch_size_ft = '10'"}, r"'batch_size_ft' = '10' should be of type int"),
    ({"n_rounds": "n_rounds = True"}, r"'n_rounds' = True should be of type int"),
    ({"target_resolution": "target_resolution = (1, 2, 3)"},
     r"'target_resolution' = \(1, 2, 3\) should be of type tuple\[float, float\]"),
    ({"crf_params": "crf_params = dict(g_sxy='5')"}, r"'crf_params' = .* should be of type dict"),
    ({"demo_seed": ""}, r"set both or neither"),
    ({"num_classes": "num_classes = 1", "struct_name": "struct_name = []"},
     r"num_classes = 1 must be at least 2"),
    ({"lr": "lr = 1 / 0"}, r"init_demo.py cannot be read: ZeroDivisionError"),
])
def test_bad_init_files_are_errors_naming_file_and_setting(edited_config, edit, message):
    folder = edited_config(**edit)
    with pytest.raises(ConfigError, match=message) as err:
        experiment_init.load("demo", config_dir=folder)
    assert str(folder / "init_demo.py") in str(err.value)



@pytest.mark.parametrize(("old", "new", "message"), [
    ('"tr1_c1": ["001"]', '"tr1_c1": ["001", "001"]',
     r"id '001' appears twice in labeled\['tr1_c1'\]; delete one"),
    ('"tr2_c1": ["009", "010"]', '"tr2_c1": ["010", "009", "010"]',
     r"id '010' appears twice in validation\['tr2_c1'\]"),
    ('test = ["011"', 'test = ["012", "011"', r"id '012' appears twice in test"),
    ('"tr1_c3": ["009", "010"]', '"tr1_c3": ["009", "015"]',
     r"test id '015' is also in validation\['tr1_c3'\]; test volumes must be held out"),
    ('"tr2_c3": ["005", "006"]', '"tr2_c3": ["005", "019"]',
     r"test id '019' is also in labeled\['tr2_c3'\]"),
    ('        "032",\n    ],', '        "032",\n        "020",\n    ],',  # into the unlabeled pool
     r"test id '020' is also in labeled\['tr20'\]"),
    ("test = [", "test = 5 or [", r"'test' must be a list of id strings, got 5"),
])
def test_bad_splits_are_errors_naming_the_file(edited_config, old, new, message):
    folder = edited_config()
    splits = folder / "data_cfg_demo.py"
    text = splits.read_text()
    assert text.count(old) == 1
    splits.write_text(text.replace(old, new))
    with pytest.raises(ConfigError, match=message) as err:
        experiment_init.load("demo", config_dir=folder)
    assert str(err.value).startswith(f"{splits}: ") and "\n" not in str(err.value)


def test_overlaps_of_the_published_kind_are_allowed():
    """The pool overlaps the labeled sets, the labeled sets overlap each other, and an
    all-labeled set may be validated on its own volumes (ACDC trall)."""
    cfg = experiment_init.load("demo")
    assert set(cfg.labeled["tr1_c1"]) <= set(cfg.labeled["tr2_c1"]) <= set(cfg.unlabeled_ids())
    acdc = experiment_init.load("acdc")
    assert set(acdc.val_ids("trall", None)) & set(acdc.labeled_ids("trall", None))


# ------------------------------------ every value of the files, read back where it is used
def test_the_init_files_folders_and_output_root_take_effect(edited_config, monkeypatch,
                                                           tmp_path):
    monkeypatch.delenv("LCL_DATA_ROOT", raising=False)
    monkeypatch.delenv("LCL_RUNS_ROOT", raising=False)
    folder = edited_config(data_path_tr='data_path_tr = "raw_n4"',
                           data_path_tr_cropped='data_path_tr_cropped = "cropped_v2"',
                           srt_dir='srt_dir = "runs_elsewhere"')
    cfg = experiment_init.load("demo", config_dir=folder)
    assert cfg.data_path_tr == REPO_ROOT / "data" / "demo" / "raw_n4"
    assert cfg.data_path_tr_cropped == REPO_ROOT / "data" / "demo" / "cropped_v2"
    assert cfg.srt_dir == REPO_ROOT / "runs_elsewhere"
    edited_config(data_path_tr=f'data_path_tr = "{tmp_path / "abs"}"')
    cfg = experiment_init.load("demo", data_root=tmp_path / "d", config_dir=folder)
    assert cfg.data_path_tr == tmp_path / "abs"  # an absolute path is used as it is
    assert cfg.data_path_tr_cropped == tmp_path / "d" / "cropped_v2"


def test_a_recorded_configuration_reads_back_as_it_was(edited_config, tmp_path):
    """What config.yaml records (to_dict, YAML) reads back equal, with its paths and tuples; a
    name this version does not know is ignored, a missing one with a default takes it."""
    import yaml

    folder = edited_config(img_size_x="img_size_x = 32", target_resolution="target_resolution "
                           "= (3.0, 1.5)", data_path_tr=f'data_path_tr = "{tmp_path / "x"}"')
    cfg = experiment_init.load("demo", config_dir=folder)
    values = yaml.safe_load(yaml.safe_dump(cfg.to_dict()))
    back = experiment_init.ExperimentConfig.from_dict({**values, "from_the_future": 1})
    assert back == cfg
    assert back.data_path_tr == tmp_path / "x" and back.data_path_tr.is_absolute()
    assert back.target_resolution == (3.0, 1.5) and back.struct_name == ("rv", "myo", "lv")
    del values["demo_seed"], values["demo_n_patients"]
    older = experiment_init.ExperimentConfig.from_dict(values)
    assert older.demo_seed is None and older.demo_n_patients is None
    del values["lr"]
    with pytest.raises(ConfigError, match="the recorded configuration lacks 'lr'"):
        experiment_init.ExperimentConfig.from_dict(values)


def test_each_split_list_plays_its_own_role(edited_config):
    """A labeled set trains on its labeled list and validates on its validation list; the pool
    and the upper bound are the keys named; a key without validation list is no labeled set;
    the label of a pool-only id is needed by nothing, a test id's by the test."""
    folder = edited_config()
    (folder / "data_cfg_demo.py").write_text(
        'labeled = {"tr1_c1": ["001"], "tr1_c2": ["002"], "pool": ["001", "003", "004"], '
        '"all": ["001", "002"], "trx": ["005"]}\n'
        'validation = {"tr1_c1": ["006"], "tr1_c2": ["007"], "all": ["008"]}\n'
        'test = ["009"]\nunlabeled_pool = "pool"\nupper_bound = "all"\n')
    cfg = experiment_init.load("demo", config_dir=folder)
    assert cfg.labeled_ids("tr1_c2", "cX") == ["002"] and cfg.val_ids("tr1_c2", "c1") == ["007"]
    assert cfg.labeled_ids("all", None) == ["001", "002"] and cfg.val_ids("all", None) == ["008"]
    with pytest.raises(ConfigError, match="--no_of_tr_imgs=trx"):
        cfg.labeled_ids("trx", None)
    assert cfg.unlabeled_ids() == ["001", "003", "004"] and cfg.upper_bound == "all"
    assert cfg.label_uses("001") == ["labeled['tr1_c1']", "labeled['all']"]
    assert cfg.label_uses("003") == [] and cfg.label_uses("009") == ["test"]
    assert cfg.label_uses("008") == ["validation['all']"]
    assert cfg.pool_only_ids() == ["003", "004"]


def test_an_init_file_may_import_and_leave_optional_settings_unset(edited_config):
    folder = edited_config(lr="import math\nlr = math.exp(-7)",
                           demo_n_patients="demo_n_patients = None",
                           demo_seed="demo_seed = None")
    cfg = experiment_init.load("demo", config_dir=folder)
    assert cfg.lr == pytest.approx(0.000911882) and isinstance(cfg.lr, float)
    assert cfg.demo_n_patients is None and cfg.demo_seed is None
    folder = edited_config(demo_n_patients="", demo_seed="")
    cfg = experiment_init.load("demo", config_dir=folder)
    assert cfg.demo_n_patients is None and cfg.demo_seed is None
    edited_config(demo_seed="demo_seed = 3")  # the one without the other
    with pytest.raises(ConfigError, match="set both or neither"):
        experiment_init.load("demo", config_dir=folder)


def test_lcl_config_dir_names_the_folder_unless_one_is_given(edited_config, monkeypatch):
    folder = edited_config("tiny", img_size_y="img_size_y = 96")
    monkeypatch.setenv("LCL_CONFIG_DIR", str(folder))
    assert experiment_init.datasets() == ("tiny",)
    assert experiment_init.load("tiny").crop_size == (64, 96)
    assert "demo" in experiment_init.datasets(experiment_init.CONFIG_DIR)
