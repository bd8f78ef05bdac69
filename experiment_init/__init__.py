"""The one place where experiment configuration is read.

`load(dataset, ...)` reads ``init_<dataset>.py`` (geometry, classes, hyper-parameters) and
``data_cfg_<dataset>.py`` (patient splits), applies path overrides and validates the result.
Nothing else in the project reads those files.

The datasets are the ``init_<name>.py`` files present here (`datasets()`); a new dataset needs
its two files and nothing else in this package. The settings of an init file are the fields of
`ExperimentConfig` not marked as coming from elsewhere: each one without a default must be set,
each value must have the field's type, and any other name in the file is an error naming the
file and the name. So every value a user edits takes effect; five of them are the defaults of
trainer flags, which override them when given (the resolved value is what ``config.yaml``
records under ``flags``):

    lr -> --lr_seg    n_iter -> --n_iter (baseline)    n_iter_per_round -> --n_iter_per_round
    n_rounds -> --n_rounds    batch_size_ft -> --bt_size

The folder of the configuration files: ``$LCL_CONFIG_DIR`` when set (e.g. the files
``scripts/new_dataset.py --config_dir`` wrote elsewhere), else this package's folder.

Path resolution (first match wins):
- data folder of a dataset: ``--data_root DIR`` > ``$LCL_DATA_ROOT/<dataset>`` >
  ``<repository>/data/<dataset>``. Raw volumes are read from ``<data folder>/<data_path_tr>``
  (default ``raw``), cropped ones from ``<data folder>/<data_path_tr_cropped>`` (``cropped``).
  An absolute ``data_path_tr`` in the init file is used as it is.
- outputs: ``--out_dir DIR`` > ``$LCL_RUNS_ROOT`` > ``<repository>/<srt_dir>`` (``runs``).
"""

from __future__ import annotations

import importlib.util
import os
import types
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from utils.errors import ConfigError
from utils.io import LAYOUTS, data_layout

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = Path(__file__).resolve().parent

# Names of the original's init files that have no effect here, with the reason given to a
# user who sets them.
_NOT_SETTINGS = {
    "dataset_name": "the dataset's name is the file's, init_<name>.py",
    "num_channels": "the network reads single-channel images (the readers keep one image "
                    "channel, T2 for prostate_md), so no other value could take effect",
    "interp_val": "the decoder always upsamples nearest-neighbour, the original's interp_val = 1 "
                  "(METHOD §4); preprocessing is bilinear for images, nearest for labels",
}

# Marks the fields that do not come from the init file.
_FROM_NAME = {"source": "the --dataset name"}
_FROM_SPLITS = {"source": "data_cfg_<dataset>.py"}


@dataclass(frozen=True)
class ExperimentConfig:
    """Resolved settings of one dataset: everything a trainer needs besides its flags."""

    dataset: str = field(metadata=_FROM_NAME)
    img_size_x: int
    img_size_y: int
    num_classes: int
    target_resolution: tuple[float, float]
    struct_name: tuple[str, ...]
    lr: float
    batch_size: int
    mtask_bs: int
    batch_size_ft: int
    val_step_update: int
    n_iter: int
    n_iter_per_round: int
    n_rounds: int
    min_labels_dice_slice: int
    crf_params: dict[str, int | float]
    data_layout: str
    data_path_tr: Path
    data_path_tr_cropped: Path
    srt_dir: Path
    labeled: dict[str, list[str]] = field(metadata=_FROM_SPLITS)
    validation: dict[str, list[str]] = field(metadata=_FROM_SPLITS)
    test: list[str] = field(metadata=_FROM_SPLITS)
    unlabeled_pool: str = field(metadata=_FROM_SPLITS)
    upper_bound: str = field(metadata=_FROM_SPLITS)
    # A synthetic dataset: generated (utils.demo_data) when missing, with this many patients
    # from this seed.
    demo_n_patients: int | None = None
    demo_seed: int | None = None
    # A second raw folder, of volumes without labels, in the dataset's layout (an nnU-Net
    # layout also reads a flat folder of <case>_<CCCC>.nii.gz): a subject whose image is not in
    # data_path_tr is read from here. Resolved as data_path_tr.
    data_path_unlabeled: Path | None = None

    @property
    def crop_size(self) -> tuple[int, int]:
        return (self.img_size_x, self.img_size_y)

    def split_key(self, no_of_tr_imgs: str, comb_tr_imgs: str | None) -> str:
        """The key of a labeled set: ``tr2`` + ``c1`` -> ``tr2_c1``; pool lists have no comb."""
        if no_of_tr_imgs in self.labeled and no_of_tr_imgs in self.validation:
            return no_of_tr_imgs
        key = f"{no_of_tr_imgs}_{comb_tr_imgs}"
        if key not in self.labeled or key not in self.validation:
            valid = sorted(k for k in self.labeled if k in self.validation)
            raise ConfigError(
                f"--no_of_tr_imgs={no_of_tr_imgs} --comb_tr_imgs={comb_tr_imgs} is not a labeled "
                f"set of dataset '{self.dataset}'. Valid sets: {', '.join(valid)} "
                f"(edit experiment_init/data_cfg_{self.dataset}.py to add one)."
            )
        return key

    def labeled_ids(self, no_of_tr_imgs: str, comb_tr_imgs: str | None) -> list[str]:
        return list(self.labeled[self.split_key(no_of_tr_imgs, comb_tr_imgs)])

    def val_ids(self, no_of_tr_imgs: str, comb_tr_imgs: str | None) -> list[str]:
        return list(self.validation[self.split_key(no_of_tr_imgs, comb_tr_imgs)])

    def raw_folders(self) -> tuple[Path, ...]:
        """The raw folders a subject is looked for in: ``data_path_tr``, then
        ``data_path_unlabeled`` when set (`utils.io.raw_paths`)."""
        extra = () if self.data_path_unlabeled is None else (self.data_path_unlabeled,)
        return (self.data_path_tr, *extra)

    def unlabeled_ids(self) -> list[str]:
        return list(self.labeled[self.unlabeled_pool])

    def label_uses(self, subject_id: str) -> list[str]:
        """The lists that need the label of ``subject_id``: every labeled set but the unlabeled
        pool's, every validation set and the test set, e.g. ``["labeled['tr8_c1']", "test"]``."""
        uses = [f"{part}['{key}']" for part, table in (("labeled", self.labeled),
                                                       ("validation", self.validation))
                for key, ids in table.items()
                if subject_id in ids and (part, key) != ("labeled", self.unlabeled_pool)]
        return uses + (["test"] if subject_id in self.test else [])

    def pool_only_ids(self) -> list[str]:
        """The pool volumes no other list needs the label of: they may come without a label
        file (as in the original, the pool is trained on with pseudo-labels only)."""
        return [sid for sid in self.unlabeled_ids() if not self.label_uses(sid)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ExperimentConfig:
        """The inverse of `to_dict`: a run's recorded configuration (its config.yaml), read as
        it was, whatever the init file says today. Names this version does not know are
        ignored; a missing one without a default raises ConfigError."""
        hints = get_type_hints(cls)
        kept: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in values:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise ConfigError(f"the recorded configuration lacks '{f.name}'")
                continue
            value, hint = values[f.name], hints[f.name]
            if hint is Path or (hint == Path | None and value is not None):
                value = Path(value)
            elif get_origin(hint) is tuple:
                value = tuple(value)
            kept[f.name] = value
        return cls(**kept)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, for the run's resolved-config YAML."""
        out: dict[str, Any] = {}
        for k, v in self.__dict__.items():
            if isinstance(v, Path):
                v = str(v)
            elif isinstance(v, tuple):
                v = list(v)
            out[k] = v
        return out


def init_settings() -> dict[str, Any]:
    """The settings of an init file: name -> type of the `ExperimentConfig` field."""
    hints = get_type_hints(ExperimentConfig)
    return {f.name: hints[f.name] for f in fields(ExperimentConfig) if not f.metadata}


def config_folder(config_dir: Path | None = None) -> Path:
    """The folder of the configuration files: ``config_dir`` > ``$LCL_CONFIG_DIR`` > this
    package's folder."""
    if config_dir is not None:
        return Path(config_dir)
    return Path(os.environ["LCL_CONFIG_DIR"]) if os.environ.get("LCL_CONFIG_DIR") else CONFIG_DIR


def datasets(config_dir: Path | None = None) -> tuple[str, ...]:
    """The configured datasets: ``<name>`` of every ``init_<name>.py``, sorted."""
    folder = config_folder(config_dir)
    return tuple(sorted(p.stem.removeprefix("init_") for p in folder.glob("init_*.py")))


def dataset_help() -> str:
    """The --dataset help of every script: the configured names and where they are read."""
    return (f"one of {', '.join(datasets())} (init_<name>.py in {_shown(config_folder())}; "
            "LCL_CONFIG_DIR=DIR reads another folder)")


def _shown(path: Path) -> str:
    """``path`` as error messages name it: relative to the repository when inside it."""
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def _read(path: Path) -> types.ModuleType:
    """Execute a configuration file afresh (never a cached import: edits take effect)."""
    if not path.is_file():
        raise ConfigError(f"{_shown(path)} not found; every dataset needs init_<name>.py and "
                          "data_cfg_<name>.py in experiment_init/")
    spec = importlib.util.spec_from_file_location(f"experiment_init.{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # the user's file: whatever fails in it is a configuration error
        raise ConfigError(f"{_shown(path)} cannot be read: {type(err).__name__}: {err}") from err
    return module


def _describe(hint: Any) -> str:
    if hint is Path:
        return "a path string"
    name = getattr(hint, "__name__", None)
    return name if name and get_origin(hint) is None else str(hint).replace("pathlib.", "")


def _typed(value: Any, hint: Any) -> Any:
    """``value`` converted to the field type ``hint``; raises TypeError when it does not fit."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is types.UnionType:
        for arg in args:
            if arg is type(None) and value is None:
                return None
            if arg is not type(None):
                try:
                    return _typed(value, arg)
                except TypeError:
                    pass
        raise TypeError
    if isinstance(value, bool):  # a bool is an int to Python, never to a setting
        raise TypeError
    if hint is float and isinstance(value, int | float):
        return float(value)
    if hint is Path and isinstance(value, str):
        return value  # resolved against the data folder or the repository by `load`
    if origin is tuple and isinstance(value, list | tuple):
        if args[-1] is Ellipsis:
            return tuple(_typed(v, args[0]) for v in value)
        if len(value) != len(args):
            raise TypeError
        return tuple(_typed(v, a) for v, a in zip(value, args))
    if origin is dict and isinstance(value, dict):
        return {_typed(k, args[0]): _typed(v, args[1]) for k, v in value.items()}
    if origin is None and isinstance(value, hint):
        return value
    raise TypeError


def _settings(init: types.ModuleType, shown: str) -> dict[str, Any]:
    """The validated settings of one init module (``shown``: its name in messages)."""
    expected = init_settings()
    given = {k: v for k, v in vars(init).items()
             if not k.startswith("_") and not isinstance(v, types.ModuleType)}
    for name in given:
        if name in _NOT_SETTINGS:
            raise ConfigError(f"{shown}: '{name}' is not a setting: {_NOT_SETTINGS[name]}; "
                              "delete the line")
        if name not in expected:
            raise ConfigError(f"{shown}: unknown setting '{name}'; rename or delete it (the "
                              f"settings are {', '.join(expected)})")
    values: dict[str, Any] = {}
    optional = {f.name for f in fields(ExperimentConfig)
                if f.default is not MISSING or f.default_factory is not MISSING}
    for name, hint in expected.items():
        if name not in given:
            if name in optional:
                continue
            raise ConfigError(f"{shown} lacks the setting '{name}'")
        try:
            values[name] = _typed(given[name], hint)
        except TypeError:
            raise ConfigError(f"{shown}: '{name}' = {given[name]!r} should be of type "
                              f"{_describe(hint)}") from None
    return values


def _check(values: dict[str, Any], shown: str) -> None:
    """Consistency of settings that are each of the right type."""
    for name in ("img_size_x", "img_size_y"):
        if values[name] % 32:
            raise ConfigError(f"{shown}: {name} = {values[name]} must be a multiple of 32 (the "
                              "U-Net pools five times)")
    if values["num_classes"] < 2:
        raise ConfigError(f"{shown}: num_classes = {values['num_classes']} must be at least 2 "
                          "(background and one structure)")
    if len(values["struct_name"]) != values["num_classes"] - 1:
        raise ConfigError(f"{shown}: struct_name has {len(values['struct_name'])} names but "
                          f"num_classes - 1 = {values['num_classes'] - 1}")
    try:
        data_layout(values["data_layout"])
    except ValueError:
        raise ConfigError(f"{shown}: data_layout '{values['data_layout']}' is not one of "
                          f"{', '.join(LAYOUTS)} (utils/io.py, LAYOUTS), nor nnunet_ch<k> "
                          "(channel k of an nnU-Net dataset)") from None
    if ("demo_seed" in values) != ("demo_n_patients" in values):
        raise ConfigError(f"{shown}: demo_n_patients and demo_seed describe a synthetic dataset "
                          "together; set both or neither")


def _check_ids(shown: str, splits: types.ModuleType) -> None:
    for part in ("labeled", "validation"):
        table = getattr(splits, part, None)
        if not isinstance(table, dict) or not table:
            raise ConfigError(f"{shown}: '{part}' must be a dict")
        for key, ids in table.items():
            if not ids or not all(isinstance(i, str) for i in ids):
                raise ConfigError(f"{shown}: {part}['{key}'] must be a non-empty list of id "
                                  f"strings, got {ids!r}")
    for name in ("test", "unlabeled_pool", "upper_bound"):
        if not hasattr(splits, name):
            raise ConfigError(f"{shown} lacks '{name}'")
    if not isinstance(splits.test, list) or not all(isinstance(i, str) for i in splits.test):
        raise ConfigError(f"{shown}: 'test' must be a list of id strings, got {splits.test!r}")
    if splits.unlabeled_pool not in splits.labeled:
        raise ConfigError(f"{shown}: unlabeled_pool '{splits.unlabeled_pool}' is not a key of "
                          "'labeled'")
    lists = {f"{part}['{key}']": ids for part in ("labeled", "validation")
             for key, ids in getattr(splits, part).items()}
    for name, ids in {**lists, "test": splits.test}.items():
        twice = sorted({i for i in ids if ids.count(i) > 1})
        if twice:
            raise ConfigError(f"{shown}: id '{twice[0]}' appears twice in {name}; delete one")
    # The unlabeled pool overlaps the labeled lists and the labeled sets overlap each other by
    # design (as in the original), and the published lists validate the all-labeled sets on
    # some of their own volumes (ACDC trall: 011, MMWHS tr10_c*, prostate tr22); a test id must
    # be in no other list.
    for name, ids in lists.items():
        leaked = [i for i in ids if i in splits.test]
        if leaked:
            raise ConfigError(f"{shown}: test id '{leaked[0]}' is also in {name}; test volumes "
                              "must be held out of training and validation: remove it from one "
                              "of the lists")


def load(
    dataset: str,
    data_root: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    config_dir: Path | None = None,
) -> ExperimentConfig:
    """Read, override and validate the settings of ``dataset``.

    Args:
        dataset: one of `datasets()`.
        data_root: the dataset's data folder (holds ``raw/`` and ``cropped/``); overrides
            ``$LCL_DATA_ROOT``.
        out_dir: output root for runs; overrides ``$LCL_RUNS_ROOT``.
        config_dir: the folder of the configuration files (default: `config_folder`).
    """
    folder = config_folder(config_dir)
    known = datasets(folder)
    if dataset not in known:
        raise ConfigError(f"--dataset={dataset!r} is unknown; choose one of {', '.join(known)} "
                          f"(each is an init_<name>.py in {_shown(folder)})")
    init_path = folder / f"init_{dataset}.py"
    splits_path = folder / f"data_cfg_{dataset}.py"
    values = _settings(_read(init_path), _shown(init_path))
    _check(values, _shown(init_path))
    splits = _read(splits_path)
    _check_ids(_shown(splits_path), splits)

    if data_root is not None:
        data_dir = Path(data_root)
    elif os.environ.get("LCL_DATA_ROOT"):
        data_dir = Path(os.environ["LCL_DATA_ROOT"]) / dataset
    else:
        data_dir = REPO_ROOT / "data" / dataset
    if out_dir is not None:
        runs = Path(out_dir)
    elif os.environ.get("LCL_RUNS_ROOT"):
        runs = Path(os.environ["LCL_RUNS_ROOT"])
    else:
        runs = REPO_ROOT / values["srt_dir"]
    values["data_path_tr"] = data_dir / values["data_path_tr"]
    if values.get("data_path_unlabeled") is not None:
        values["data_path_unlabeled"] = data_dir / values["data_path_unlabeled"]
    values["data_path_tr_cropped"] = data_dir / values["data_path_tr_cropped"]
    values["srt_dir"] = runs
    return ExperimentConfig(
        dataset=dataset,
        labeled={k: list(v) for k, v in splits.labeled.items()},
        validation={k: list(v) for k, v in splits.validation.items()},
        test=list(splits.test),
        unlabeled_pool=splits.unlabeled_pool,
        upper_bound=splits.upper_bound,
        **values,
    )
