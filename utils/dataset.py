"""Datasets on disk as the trainers see them: demo bootstrap, cropped volumes, slice pools.

Training reads cropped volumes (METHOD §2.3); validation and test read raw volumes and
preprocess them on the fly (`utils.evaluation.prepare_eval_volume`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from experiment_init import ExperimentConfig
from utils.errors import DataError
from utils.evaluation import EvalVolume, prepare_eval_volume
from utils.integrity import lacks_label, missing_label, require_valid
from utils.io import cropped_paths, raw_paths, read_cropped, read_raw_volume, write_cropped
from utils.preprocess import to_target

log = logging.getLogger(__name__)


def ensure_demo_data(cfg: ExperimentConfig) -> None:
    """Generate a synthetic dataset (one whose init file sets ``demo_n_patients`` and
    ``demo_seed``, like ``demo``) when none, a partial one or one of other settings is found."""
    if cfg.demo_n_patients is None or cfg.demo_seed is None:
        return
    from utils.demo_data import demo_dataset_complete, make_demo_dataset

    n = cfg.demo_n_patients
    ids = [f"{i:03d}" for i in range(1, n + 1)]
    if demo_dataset_complete(cfg.data_path_tr, seed=cfg.demo_seed, patient_ids=ids):
        return
    print(f"demo data not found in {cfg.data_path_tr}: generating {n} patients", flush=True)
    make_demo_dataset(cfg.data_path_tr, ids, seed=cfg.demo_seed, overwrite=True)


def verify_inputs(
    cfg: ExperimentConfig, train_ids: list[str], eval_ids: list[str], pool_ids: Sequence[str] = ()
) -> None:
    """Check, before any training, every raw volume the run will read: the evaluation volumes
    and the training volumes (labeled ``train_ids``, unlabeled ``pool_ids``) that have no
    cropped copy yet. A pool volume that no list but the pool needs (and no labeled volume of
    this run) may lack its label. Stops at the first problem."""
    unlabeled_ok = set(cfg.pool_only_ids()) & (set(pool_ids) - set(train_ids))
    uncropped = []
    for sid in dict.fromkeys([*train_ids, *pool_ids]):
        img_path, mask_path = cropped_paths(cfg.data_path_tr_cropped, sid)
        if not (img_path.is_file() and (mask_path.is_file() or sid in unlabeled_ok)):
            uncropped.append(sid)
    require_valid(cfg, list(dict.fromkeys(uncropped + eval_ids)), unlabeled_ok)


def create_cropped(
    cfg: ExperimentConfig, subject_ids: list[str], overwrite: bool = False,
    labels_required: bool = False,
) -> int:
    """Preprocess raw subjects into ``cfg.data_path_tr_cropped``; returns how many were written.

    A subject without a raw label file is cropped image-only when only the unlabeled pool needs
    it (`ExperimentConfig.pool_only_ids`) and ``labels_required`` is False (the run does not
    train on it as a labeled volume); otherwise that is a DataError saying what to do.
    """
    pool_only = set() if labels_required else set(cfg.pool_only_ids())
    written = 0
    for sid in subject_ids:
        img_path, mask_path = cropped_paths(cfg.data_path_tr_cropped, sid)
        if not overwrite and img_path.is_file() and mask_path.is_file():
            continue
        unlabeled = lacks_label(cfg, sid)
        if unlabeled and sid not in pool_only:
            label_path = raw_paths(cfg.data_layout, cfg.raw_folders(), sid)[1]
            raise DataError(f"{label_path}: id {sid}: {missing_label(cfg, sid)}")
        if unlabeled and not overwrite and img_path.is_file():
            continue
        vol = read_raw_volume(cfg.data_layout, cfg.raw_folders(), sid, with_label=not unlabeled)
        image_c, label_c, _ = to_target(
            vol.image, vol.label, vol.spacing[:2], cfg.target_resolution, cfg.crop_size
        )
        write_cropped(cfg.data_path_tr_cropped, sid, image_c, label_c, cfg.target_resolution)
        written += 1
    return written


def read_slices(
    cfg: ExperimentConfig, subject_id: str, label_required: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One cropped subject's slices: images (Z, 1, CX, CY) float32, labels (Z, CX, CY) uint8,
    or None for a subject cropped without label when ``label_required`` is False."""
    img, lbl = read_cropped(cfg.data_path_tr_cropped, subject_id, label_required)
    if img.shape[:2] != cfg.crop_size:
        raise DataError(
            f"{cropped_paths(cfg.data_path_tr_cropped, subject_id)[0]}: in-plane size "
            f"{img.shape[:2]} differs from the configured crop {cfg.crop_size}; rerun "
            "scripts/create_cropped_imgs.py --overwrite"
        )
    img_t = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[:, None]
    if lbl is None:
        return img_t, None
    if int(lbl.max()) >= cfg.num_classes or int(lbl.min()) < 0:
        raise DataError(
            f"labels of {subject_id} hold values outside 0..{cfg.num_classes - 1}; check "
            f"num_classes in experiment_init/init_{cfg.dataset}.py"
        )
    return img_t, torch.from_numpy(np.ascontiguousarray(lbl.transpose(2, 0, 1))).to(torch.uint8)


def load_slices(
    cfg: ExperimentConfig, subject_ids: list[str], create_missing: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """All slices of the labeled cropped subjects: images (N, 1, CX, CY) float32, labels
    (N, CX, CY) uint8.

    Labels are kept as uint8 (at most 255 classes): the joint trainer keeps several copies of
    the pool's labels, and int64 would take eight times the memory.

    Missing cropped volumes are created from the raw data first (same code as
    scripts/create_cropped_imgs.py), so a fresh checkout trains without a separate step.
    """
    if create_missing:
        create_cropped(cfg, subject_ids, labels_required=True)
    slices = [read_slices(cfg, sid) for sid in subject_ids]
    return torch.cat([img for img, _ in slices]), torch.cat([lbl for _, lbl in slices])


def load_pool(
    cfg: ExperimentConfig, subject_ids: list[str], create_missing: bool = True
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """The unlabeled pool: id -> (images (Z, 1, CX, CY) float32, ground truth (Z, CX, CY) uint8,
    or None for a volume without label, allowed for `ExperimentConfig.pool_only_ids`).
    Ground truth, where there is some, only measures the pseudo-labels."""
    if create_missing:
        create_cropped(cfg, subject_ids)
    pool_only = set(cfg.pool_only_ids())
    return {sid: read_slices(cfg, sid, label_required=sid not in pool_only)
            for sid in subject_ids}


def load_eval_volumes(cfg: ExperimentConfig, subject_ids: list[str]) -> list[EvalVolume]:
    """Raw subjects with ground truth, preprocessed once for repeated validation or testing."""
    return [
        prepare_eval_volume(cfg.data_layout, cfg.data_path_tr, sid, cfg.target_resolution,
                            cfg.crop_size)
        for sid in subject_ids
    ]


def unlabeled_slices(
    pool: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every slice of a `load_pool` pool, in id order, as images (M, 1, CX, CY) float32 and
    blank labels (M, CX, CY) uint8 (all background): what a method that learns from unlabeled
    slices is given; the pool's ground truth is left out."""
    images = torch.cat([img for img, _ in pool.values()])
    return images, torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.uint8)
