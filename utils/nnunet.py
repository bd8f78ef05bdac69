"""nnU-Net v2's raw dataset format as a data layout: ``dataset.json``, imagesTr/, labelsTr/.

A dataset folder ``DatasetNNN_Name/`` holds ``dataset.json`` (``channel_names``, ``labels``
name -> value, ``numTraining``, ``file_ending``), ``imagesTr/<case>_<CCCC>.nii.gz`` (one file per
channel, CCCC the 4-digit channel), ``labelsTr/<case>.nii.gz`` and optionally ``imagesTs/``.
This method reads one channel; a case with a label file can be labeled, validation or test
volume, an image without one belongs to the unlabeled pool. What the method cannot use is
refused with a `DataError` naming the file and the reason.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib

from utils.errors import DataError
from utils.io import channel_file, check_label_space

NIFTI_ENDINGS = (".nii.gz", ".nii")
IMAGE_FOLDERS = ("imagesTr", "imagesTs")


@dataclass(frozen=True)
class NnunetDataset:
    """What this method uses of one nnU-Net raw dataset.

    structures: names of classes 1, 2, ... (their label values are 1, 2, ...);
    labeled: cases with a label file, sorted; unlabeled: cases with an image of the channel
    but no label (imagesTr/ or imagesTs/), sorted; channel_name: ``channel_names[channel]``.
    """

    root: Path
    channel: int
    channel_name: str
    structures: tuple[str, ...]
    labeled: tuple[str, ...]
    unlabeled: tuple[str, ...]


def _cases(folder: Path, channel: int) -> dict[str, Path]:
    """{case: image file of ``channel``} of the images in ``folder``."""
    if not folder.is_dir():
        return {}
    suffix = f"_{channel:04d}.nii.gz"
    return {p.name[: -len(suffix)]: p for p in sorted(folder.iterdir())
            if p.name.endswith(suffix)}


def _labels(labels: object, path: Path) -> tuple[str, ...]:
    """Structure names of classes 1..N from ``labels``; refuses what the method cannot use."""
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"{path}: 'labels' must map names to label values")
    if "ignore" in labels:
        raise DataError(f"{path}: an 'ignore' label is not supported (every pixel of a "
                        "labeled slice is trained on); relabel it as a class or background")
    if any(not isinstance(v, int) or isinstance(v, bool) for v in labels.values()):
        raise DataError(f"{path}: region-based labels (lists of values) are not supported; "
                        "give each structure one integer value")
    by_value = {v: k for k, v in labels.items()}
    if len(by_value) != len(labels) or sorted(by_value) != list(range(len(labels))):
        raise DataError(f"{path}: label values {sorted(labels.values())} are not consecutive "
                        "0, 1, ..., N with 0 the background; renumber them")
    if len(labels) < 2:
        raise DataError(f"{path}: 'labels' names no structure besides the background")
    return tuple(by_value[v] for v in range(1, len(labels)))


def read_dataset(root: str | Path, channel: int = 0, check_grids: bool = True) -> NnunetDataset:
    """Read and check the nnU-Net raw dataset in ``root``.

    ``check_grids``: a label whose grid (shape) or space (voxel-to-world matrix, spacing
    included, as `utils.io.check_label_space`) differs from its image's is refused (header
    reads only).
    """
    root = Path(root)
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: not found; give an nnU-Net raw dataset folder "
                        "(DatasetNNN_Name/ with dataset.json, imagesTr/, labelsTr/)")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as err:
        raise DataError(f"{meta_path}: not valid JSON ({err})") from None
    for key in ("channel_names", "labels", "file_ending"):
        if key not in meta:
            raise DataError(f"{meta_path}: lacks '{key}'")
    if meta["file_ending"] not in NIFTI_ENDINGS:
        raise DataError(f"{meta_path}: file_ending {meta['file_ending']!r} is not supported; "
                        "convert the images and labels to .nii.gz")
    if meta["file_ending"] == ".nii":
        raise DataError(f"{meta_path}: file_ending '.nii' is not supported; gzip the files "
                        "to .nii.gz and set file_ending to '.nii.gz'")
    names = {str(k): str(v) for k, v in meta["channel_names"].items()}
    if str(channel) not in names:
        raise DataError(f"{meta_path}: no channel {channel} in channel_names "
                        f"{meta['channel_names']}; choose --channel among {', '.join(names)}")
    structures = _labels(meta["labels"], meta_path)
    training = _cases(root / "imagesTr", channel)
    tests = _cases(root / "imagesTs", channel)
    label_dir = root / "labelsTr"
    labeled = sorted(c for c in training if (label_dir / f"{c}.nii.gz").is_file())
    orphans = sorted(p.name for p in label_dir.glob("*.nii.gz")
                     if p.name[: -len(".nii.gz")] not in training) if label_dir.is_dir() else []
    if orphans:
        raise DataError(f"{label_dir / orphans[0]}: a label without image "
                        f"{channel_file(root / 'imagesTr', orphans[0][:-7], channel).name}")
    twice = sorted(set(training) & set(tests))
    if twice:
        raise DataError(f"{tests[twice[0]]}: case {twice[0]} is in imagesTr/ too; rename one")
    if check_grids:
        for case in labeled:
            image = nib.load(str(training[case]))
            label_path = label_dir / f"{case}.nii.gz"
            label = nib.load(str(label_path))
            if image.shape != label.shape:
                raise DataError(f"{label_path}: label grid {label.shape} differs from its image "
                                f"grid {image.shape} ({training[case].name}); resample the label "
                                "onto the image")
            check_label_space(image.affine, label.affine, min(image.header.get_zooms()[:3]),
                              training[case], label_path)
    unlabeled = sorted(c for c in training if c not in labeled) + sorted(tests)
    return NnunetDataset(root, channel, names[str(channel)], structures, tuple(labeled),
                         tuple(unlabeled))


def case_of(name: str) -> str:
    """The case a file name (without .nii.gz) names: ``<case>_<CCCC>`` -> ``<case>``; a name
    without the channel ending is the case itself."""
    match = re.fullmatch(r"(.+)_\d{4}", name)
    return match.group(1) if match else name
