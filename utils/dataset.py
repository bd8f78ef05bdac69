"""Datasets on disk as the trainers see them: demo bootstrap, cropped volumes, slice pools.

Training reads cropped volumes (METHOD §2.3); validation and test read raw volumes and
preprocess them on the fly (`utils.evaluation.prepare_eval_volume`).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from experiment_init import ExperimentConfig
from utils.evaluation import EvalVolume, prepare_eval_volume
from utils.integrity import require_valid
from utils.io import DataError, cropped_paths, read_cropped, read_raw_volume, write_cropped
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


def verify_inputs(cfg: ExperimentConfig, train_ids: list[str], eval_ids: list[str]) -> None:
    """Check, before any training, every raw volume the run will read: the evaluation volumes
    and the training volumes that have no cropped copy yet. Stops at the first problem."""
    uncropped = [sid for sid in train_ids
                 if not all(p.is_file() for p in cropped_paths(cfg.data_path_tr_cropped, sid))]
    require_valid(cfg, list(dict.fromkeys(uncropped + eval_ids)))


def create_cropped(cfg: ExperimentConfig, subject_ids: list[str], overwrite: bool = False) -> int:
    """Preprocess raw subjects into ``cfg.data_path_tr_cropped``; returns how many were written."""
    written = 0
    for sid in subject_ids:
        img_path, mask_path = cropped_paths(cfg.data_path_tr_cropped, sid)
        if not overwrite and img_path.is_file() and mask_path.is_file():
            continue
        vol = read_raw_volume(cfg.data_layout, cfg.data_path_tr, sid)
        image_c, label_c, _ = to_target(
            vol.image, vol.label, vol.spacing[:2], cfg.target_resolution, cfg.crop_size
        )
        write_cropped(cfg.data_path_tr_cropped, sid, image_c, label_c, cfg.target_resolution)
        written += 1
    return written


def load_slices(
    cfg: ExperimentConfig, subject_ids: list[str], create_missing: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """All slices of the cropped subjects: images (N, 1, CX, CY) float32, labels (N, CX, CY) uint8.

    Labels are kept as uint8 (at most 255 classes): the joint trainer keeps several copies of
    the pool's labels, and int64 would take eight times the memory.

    Missing cropped volumes are created from the raw data first (same code as
    scripts/create_cropped_imgs.py), so a fresh checkout trains without a separate step.
    """
    if create_missing:
        create_cropped(cfg, subject_ids)
    images, labels = [], []
    for sid in subject_ids:
        img, lbl = read_cropped(cfg.data_path_tr_cropped, sid)
        if img.shape[:2] != cfg.crop_size:
            raise DataError(
                f"{cropped_paths(cfg.data_path_tr_cropped, sid)[0]}: in-plane size "
                f"{img.shape[:2]} differs from the configured crop {cfg.crop_size}; rerun "
                "scripts/create_cropped_imgs.py --overwrite"
            )
        images.append(img.transpose(2, 0, 1))
        labels.append(lbl.transpose(2, 0, 1))
    img_t = torch.from_numpy(np.ascontiguousarray(np.concatenate(images)))[:, None]
    lbl_t = torch.from_numpy(np.ascontiguousarray(np.concatenate(labels)))
    if int(lbl_t.max()) >= cfg.num_classes or int(lbl_t.min()) < 0:
        raise DataError(
            f"labels of {subject_ids} hold values outside 0..{cfg.num_classes - 1}; check "
            f"num_classes in experiment_init/init_{cfg.dataset}.py"
        )
    return img_t, lbl_t.to(torch.uint8)


def load_eval_volumes(cfg: ExperimentConfig, subject_ids: list[str]) -> list[EvalVolume]:
    """Raw subjects with ground truth, preprocessed once for repeated validation or testing."""
    return [
        prepare_eval_volume(cfg.data_layout, cfg.data_path_tr, sid, cfg.target_resolution,
                            cfg.crop_size)
        for sid in subject_ids
    ]
