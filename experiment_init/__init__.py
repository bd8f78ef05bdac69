"""The one place where experiment configuration is read.

`load(dataset, ...)` imports ``init_<dataset>.py`` (geometry, classes, hyper-parameters) and
``data_cfg_<dataset>.py`` (patient splits), applies path overrides and validates the result.
Nothing else in the project imports those modules directly.

Path resolution (first match wins):
- data folder of a dataset: ``--data_root DIR`` > ``$LCL_DATA_ROOT/<dataset>`` >
  ``<repository>/data/<dataset>``. Raw volumes are read from ``<data folder>/<data_path_tr>``
  (default ``raw``), cropped ones from ``<data folder>/<data_path_tr_cropped>`` (``cropped``).
  An absolute ``data_path_tr`` in the init file is used as it is.
- outputs: ``--out_dir DIR`` > ``$LCL_RUNS_ROOT`` > ``<repository>/<srt_dir>`` (``runs``).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("acdc", "prostate_md", "mmwhs", "demo")
DATA_LAYOUTS = ("acdc", "decathlon", "mmwhs")

_REQUIRED = {
    "img_size_x": int,
    "img_size_y": int,
    "num_classes": int,
    "target_resolution": (tuple, list),
    "struct_name": (list, tuple),
    "lr": float,
    "batch_size": int,
    "mtask_bs": int,
    "val_step_update": int,
    "n_iter": int,
    "n_iter_per_round": int,
    "n_rounds": int,
    "min_labels_dice_slice": int,
    "crf_params": dict,
    "data_layout": str,
    "data_path_tr": str,
    "data_path_tr_cropped": str,
    "srt_dir": str,
}


class ConfigError(ValueError):
    """A configuration value or command-line choice that cannot be used."""


@dataclass(frozen=True)
class ExperimentConfig:
    """Resolved settings of one dataset: everything a trainer needs besides its flags."""

    dataset: str
    img_size_x: int
    img_size_y: int
    num_classes: int
    target_resolution: tuple[float, float]
    struct_name: tuple[str, ...]
    lr: float
    batch_size: int
    mtask_bs: int
    val_step_update: int
    n_iter: int
    n_iter_per_round: int
    n_rounds: int
    min_labels_dice_slice: int
    crf_params: dict[str, float]
    data_layout: str
    data_path_tr: Path
    data_path_tr_cropped: Path
    srt_dir: Path
    labeled: dict[str, list[str]]
    validation: dict[str, list[str]]
    test: list[str]
    unlabeled_pool: str
    upper_bound: str
    extra: dict[str, Any] = field(default_factory=dict)

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

    def unlabeled_ids(self) -> list[str]:
        return list(self.labeled[self.unlabeled_pool])

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


def _import(name: str) -> ModuleType:
    return importlib.import_module(f"experiment_init.{name}")


def _check_ids(dataset: str, splits: ModuleType) -> None:
    for part in ("labeled", "validation"):
        table = getattr(splits, part, None)
        if not isinstance(table, dict) or not table:
            raise ConfigError(f"experiment_init/data_cfg_{dataset}.py: '{part}' must be a dict")
        for key, ids in table.items():
            if not ids or not all(isinstance(i, str) for i in ids):
                raise ConfigError(
                    f"experiment_init/data_cfg_{dataset}.py: {part}['{key}'] must be a non-empty "
                    f"list of id strings, got {ids!r}"
                )
    if splits.unlabeled_pool not in splits.labeled:
        raise ConfigError(
            f"experiment_init/data_cfg_{dataset}.py: unlabeled_pool '{splits.unlabeled_pool}' "
            "is not a key of 'labeled'"
        )


def load(
    dataset: str,
    data_root: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
) -> ExperimentConfig:
    """Read, override and validate the settings of ``dataset``.

    Args:
        dataset: one of DATASETS.
        data_root: the dataset's data folder (holds ``raw/`` and ``cropped/``); overrides
            ``$LCL_DATA_ROOT``.
        out_dir: output root for runs; overrides ``$LCL_RUNS_ROOT``.
    """
    if dataset not in DATASETS:
        raise ConfigError(f"--dataset={dataset!r} is unknown; choose one of {', '.join(DATASETS)}")
    init = _import(f"init_{dataset}")
    splits = _import(f"data_cfg_{dataset}")
    values: dict[str, Any] = {}
    for name, typ in _REQUIRED.items():
        if not hasattr(init, name):
            raise ConfigError(f"experiment_init/init_{dataset}.py lacks the setting '{name}'")
        value = getattr(init, name)
        if typ is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, typ):
            raise ConfigError(
                f"experiment_init/init_{dataset}.py: '{name}' = {value!r} should be of type {typ}"
            )
        values[name] = value
    for name in ("img_size_x", "img_size_y"):
        if values[name] % 32:
            raise ConfigError(
                f"experiment_init/init_{dataset}.py: {name} = {values[name]} must be a multiple "
                "of 32 (the U-Net pools five times)"
            )
    if len(values["struct_name"]) != values["num_classes"] - 1:
        raise ConfigError(
            f"experiment_init/init_{dataset}.py: struct_name has {len(values['struct_name'])} "
            f"names but num_classes - 1 = {values['num_classes'] - 1}"
        )
    if values["data_layout"] not in DATA_LAYOUTS:
        raise ConfigError(
            f"experiment_init/init_{dataset}.py: data_layout '{values['data_layout']}' is not one "
            f"of {', '.join(DATA_LAYOUTS)}"
        )
    _check_ids(dataset, splits)

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
    values["data_path_tr_cropped"] = data_dir / values["data_path_tr_cropped"]
    values["srt_dir"] = runs
    values["target_resolution"] = tuple(float(v) for v in values["target_resolution"])
    values["struct_name"] = tuple(values["struct_name"])
    extra = {
        k: getattr(init, k)
        for k in dir(init)
        if not k.startswith("_") and k not in values and k != "dataset_name"
        and isinstance(getattr(init, k), int | float | str | list | tuple)
    }
    return ExperimentConfig(
        dataset=dataset,
        labeled={k: list(v) for k, v in splits.labeled.items()},
        validation={k: list(v) for k, v in splits.validation.items()},
        test=list(splits.test),
        unlabeled_pool=splits.unlabeled_pool,
        upper_bound=splits.upper_bound,
        extra=extra,
        **values,
    )
