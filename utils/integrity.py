"""Dataset integrity: every configured volume exists, loads, and is consistent.

`check_subject` lists what is wrong with one subject (empty when nothing is); the trainers call
`require_valid` on the subjects they need before training, which stops at the first problem
with one line naming the file, the id, what is wrong and what to do. A volume only the unlabeled
pool needs (`ExperimentConfig.pool_only_ids`) may come without a label file.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from experiment_init import ExperimentConfig
from utils.errors import DataError
from utils.io import Volume, raw_paths, read_raw_volume

# In-plane and slice spacing outside this range (mm) is almost surely a broken header.
PLAUSIBLE_SPACING_MM = (0.05, 30.0)


@dataclass
class Problem:
    subject_id: str
    path: str
    what: str

    def line(self) -> str:
        return f"{self.path}: id {self.subject_id}: {self.what}"


def image_problems(vol: Volume) -> list[str]:
    """What makes a volume's image unusable (spacing, non-finite values, blank, one slice),
    each said in a phrase with what to do."""
    problems = []
    lo, hi = PLAUSIBLE_SPACING_MM
    if not all(lo <= s <= hi for s in vol.spacing):
        problems.append(f"implausible voxel spacing {vol.spacing} mm; fix the header")
    if not np.isfinite(vol.image).all():
        problems.append("image holds NaN or infinite values; re-convert it")
    elif vol.image.min() == vol.image.max():
        problems.append(f"image intensity is {float(vol.image.flat[0]):g} everywhere; "
                        "the file is blank: re-convert it")
    if vol.image.shape[2] == 1:
        problems.append(f"volume of one slice (shape {vol.image.shape}); a 2D image "
                        "stored as 3D? re-convert the whole stack of slices")
    return problems


def lacks_label(cfg: ExperimentConfig, subject_id: str) -> bool:
    """Whether the subject's raw image is there and its label file is not (False when the image
    or its folder is missing: reading it says what is wrong)."""
    try:
        image_path, label_path = raw_paths(cfg.data_layout, cfg.raw_folders(), subject_id)
    except DataError:
        return False
    return image_path.is_file() and not label_path.is_file()


def missing_label(cfg: ExperimentConfig, subject_id: str) -> str:
    """What to do about the missing label file of a subject that needs one, in a phrase."""
    uses = cfg.label_uses(subject_id)
    pool = f"labeled['{cfg.unlabeled_pool}'] of experiment_init/data_cfg_{cfg.dataset}.py"
    if not uses:  # an unlabeled pool volume asked for as a labeled training volume
        return (f"label file not found; the labeled set being trained on needs it, but only "
                f"the unlabeled pool {pool} may lack labels: add the label file")
    return (f"label file not found; the lists {', '.join(uses)} need it: add it, or keep the "
            f"id only in the unlabeled pool {pool}")


def check_subject(
    cfg: ExperimentConfig, subject_id: str, label_optional: bool = False
) -> list[Problem]:
    """Problems of one subject's raw image and label (layout, loading, grid, spacing, labels).
    ``label_optional``: a missing label file is no problem (an unlabeled pool volume)."""
    unlabeled = lacks_label(cfg, subject_id)
    try:
        vol = read_raw_volume(cfg.data_layout, cfg.raw_folders(), subject_id,
                              with_label=not unlabeled)
    except DataError as err:
        msg = str(err)
        path, _, what = msg.partition(": ")
        return [Problem(subject_id, path, what)]
    problems = [Problem(subject_id, str(vol.image_path), what) for what in image_problems(vol)]
    if unlabeled:
        if not label_optional:
            label_path = raw_paths(cfg.data_layout, cfg.raw_folders(), subject_id)[1]
            problems.append(Problem(subject_id, str(label_path), missing_label(cfg, subject_id)))
        return problems
    labels = np.unique(vol.label)
    bad = labels[(labels < 0) | (labels >= cfg.num_classes)]
    if bad.size:
        problems.append(Problem(
            subject_id, str(vol.label_path),
            f"label values {bad.tolist()} outside 0..{cfg.num_classes - 1} "
            f"(num_classes of experiment_init/init_{cfg.dataset}.py); fix the label file"))
    return problems


def configured_ids(cfg: ExperimentConfig) -> list[str]:
    """Every id named in the splits (labeled sets, unlabeled pool, validation, test)."""
    ids = {i for table in (cfg.labeled, cfg.validation) for lst in table.values() for i in lst}
    return sorted(ids | set(cfg.test))


def require_valid(
    cfg: ExperimentConfig, subject_ids: list[str], unlabeled_ok: Collection[str] = ()
) -> None:
    """Raise DataError with a one-line message at the first problem among ``subject_ids``;
    those in ``unlabeled_ok`` may lack a label file."""
    for sid in subject_ids:
        problems = check_subject(cfg, sid, label_optional=sid in unlabeled_ok)
        if problems:
            raise DataError(problems[0].line() + " (run scripts/check_dataset.py --dataset "
                            f"{cfg.dataset} for a full report)")
