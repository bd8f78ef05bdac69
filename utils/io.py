"""Reading and writing volumes: the raw layouts of METHOD §2, cropped volumes, atomic writes.

Arrays keep NIfTI axis order (x, y, slices). Every failure to find or read a file raises
`DataError` with a one-line message naming the file and what to do about it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from utils.errors import DataError, DiskFullError

# MMWHS raw label values in class order 1..7 (myo, LA, LV, RA, RV, AA, PA); others -> 0.
MMWHS_LABEL_VALUES = (205, 420, 500, 550, 600, 820, 850)


def _size(n_bytes: float) -> str:
    """``n_bytes`` for a message: "512 B", "3.2 MiB", "41.0 GiB"."""
    unit = "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if n_bytes < 1024:
            break
        n_bytes, unit = n_bytes / 1024, bigger
    return f"{n_bytes:.0f} B" if unit == "B" else f"{n_bytes:.1f} {unit}"


@dataclass
class Volume:
    """One subject's volume in native resolution.

    image: (X, Y, Z) float32; label: (X, Y, Z) int16 class indices or None;
    spacing: (sx, sy, sz) in mm; affine: 4x4 voxel-to-world matrix of the image file;
    label_values: the value of class 1, 2, ... in label files of its layout (None: the class
    index itself), see `DataLayout`.
    """

    subject_id: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, float, float]
    affine: np.ndarray
    header: nib.Nifti1Header
    image_path: Path
    label_path: Path | None
    label_values: tuple[int, ...] | None = None


def _disk_full(err: BaseException | None) -> OSError | None:
    """The ENOSPC or EDQUOT error behind ``err``, if any. Writers may wrap it: torch's zip
    writer, failing to finish the file after the OSError, raises a RuntimeError of its own."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return err
        err = err.__cause__ or err.__context__
    return None


def process_umask() -> int:
    """The process umask (e.g. 0o022), read without changing it where Linux shows it."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    # Setting and restoring is the portable way; another thread creating a file in between
    # would get mode 0666, hence the /proc reading first.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, previous: str | os.PathLike | None = None
) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    A crash at any moment leaves either the old file or the new one, never a torn file. The
    file gets the mode a plain ``open`` would give it (0644 under umask 022, 0664 under 002).
    With ``previous``, the file ``path`` held is renamed there once the new one is complete
    and on disk (a crash between the two renames leaves ``previous`` and no ``path``).
    """
    path = Path(path)
    tmp_path: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The temporary name ends with the real suffixes so that writers which choose the
        # format from the name (nibabel's .nii.gz, torch's zip) behave as for the final name.
        suffix = ".tmp" + "".join(path.suffixes)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        tmp_path = Path(tmp)
        # mkstemp creates the file 0600, which writers that truncate it keep and the rename
        # carries over: results would be unreadable to the rest of a lab's group.
        os.chmod(tmp, 0o666 & ~process_umask())
        os.close(fd)
        yield tmp_path
        # On disk before the rename: after a power loss the name never points to a file
        # whose blocks were not written yet (a file of zeros or a truncated one).
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp_path, path)
    except Exception as err:
        full = _disk_full(err)
        if full is None:
            raise
        if tmp_path is not None and tmp_path.exists():
            # Emptied, not only unlinked, before measuring what is free: a writer may still
            # hold it open (nibabel's gzip file stays open after a failed write).
            os.truncate(tmp_path, 0)
            tmp_path.unlink()
        free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else 0
        what = "disk quota exceeded" if full.errno == errno.EDQUOT else "no space left on device"
        raise DiskFullError(
            f"{path}: cannot write it, {what} ({_size(free)} free in {path.parent}); earlier "
            "files are intact: free some space and rerun (a training run with --resume)"
        ) from None
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def load_nifti(path: str | os.PathLike) -> nib.Nifti1Image:
    """Load a NIfTI file fully into memory, turning every failure into a one-line DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; check the data folder (--data_root) and the ids")
    try:
        img = nib.load(str(path))
        img.get_fdata(dtype=np.float32)  # force decompression now, so corrupt gzip fails here
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(
            f"{path}: cannot read NIfTI file ({reason}); re-copy or re-convert it"
        ) from err
    return img


def _spacing(img: nib.Nifti1Image, path: Path) -> tuple[float, float, float]:
    """Voxel size (mm) from the header, checked against the affine.

    nibabel silently turns a zero pixdim into 1, so a degenerate voxel-to-world matrix (a zero
    column: the real symptom of a zero spacing) is looked for in the affine as well.
    """
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    scales = np.linalg.norm(np.asarray(img.affine, dtype=float)[:3, :3], axis=0)
    if not np.all(np.isfinite(scales) & (scales > 0)):
        zooms = tuple(float(z) for z in scales)
    if len(zooms) < 3 or not all(np.isfinite(z) and z > 0 for z in zooms):
        raise DataError(f"{path}: voxel spacing {zooms} is not positive; fix the NIfTI header")
    return zooms  # type: ignore[return-value]


def _as_3d(data: np.ndarray, path: Path, channel: int | None = None) -> np.ndarray:
    if channel is not None and data.ndim == 4:
        if data.shape[3] <= channel:
            raise DataError(
                f"{path}: 4D image has {data.shape[3]} channels, channel {channel} is needed"
            )
        data = data[..., channel]
    if data.ndim != 3:
        raise DataError(
            f"{path}: expected a 3D volume (x, y, slices), got shape {data.shape}"
        )
    return data


def check_label_space(
    image_affine: np.ndarray, label_affine: np.ndarray, voxel_mm: float,
    image_path: Path, label_path: Path,
) -> None:
    """A label on the image's grid must also lie in its space: the same voxel-to-world
    matrix, up to 1 % of the smallest voxel size ``voxel_mm`` (header rounding)."""
    gap = float(np.abs(np.asarray(label_affine) - np.asarray(image_affine)).max())
    if gap <= 0.01 * voxel_mm:
        return
    image_axes = "".join(nib.aff2axcodes(image_affine))
    label_axes = "".join(nib.aff2axcodes(label_affine))
    what = (f"orientation {label_axes} differs from the image's {image_axes}"
            if image_axes != label_axes else f"affine differs from the image's by up to "
            f"{gap:.3g} mm")
    raise DataError(f"{label_path}: label {what} ({image_path.name}, same grid); the label "
                    "would be read onto other anatomy: re-save it in the image's space")


def _check_whole_numbers(raw: np.ndarray, label_path: Path) -> None:
    """Label values must be whole numbers: fractions (a resampled or rescaled label, float
    values such as 1.0000001) would be silently rounded."""
    if np.issubdtype(raw.dtype, np.integer):
        return
    off = raw[raw != np.rint(raw)]
    if off.size:
        raise DataError(f"{label_path}: label values are not whole numbers (e.g. {off[0]:.9g}, "
                        f"stored as {raw.dtype}); re-save the label with integer values")


def labels_to_classes(raw: np.ndarray, label_values: tuple[int, ...] | None) -> np.ndarray:
    """Class indices (int16) of a label map holding ``label_values``; other values -> 0."""
    if label_values is None:
        return raw.astype(np.int16)
    label = np.zeros(raw.shape, np.int16)
    for cls, value in enumerate(label_values, start=1):
        label[raw == value] = cls
    return label


def classes_to_labels(classes: np.ndarray, label_values: tuple[int, ...] | None) -> np.ndarray:
    """The inverse of `labels_to_classes`: a class-index map in the file values of a layout
    (uint8 class indices, or int16 values such as MMWHS's 205, ..., 850)."""
    if label_values is None:
        return classes.astype(np.uint8)
    return np.asarray((0, *label_values), np.int16)[classes]


def read_volume(
    subject_id: str,
    image_path: Path,
    label_path: Path | None,
    layout: str,
    known_labels_only: bool = False,
) -> Volume:
    """One image (the layout's channel of a 4D file) with, if given, a label file on its grid
    mapped to class indices. ``known_labels_only``: a label value that is not one of the
    layout's (`DataLayout.label_values`) is an error instead of background."""
    spec = data_layout(layout)
    label_values = spec.label_values
    img = load_nifti(image_path)
    image = _as_3d(np.asarray(img.get_fdata(dtype=np.float32)), image_path, spec.channel)
    spacing = _spacing(img, image_path)
    label = None
    if label_path is not None:
        lab_img = load_nifti(label_path)
        raw = _as_3d(np.asarray(lab_img.dataobj), label_path)
        if raw.shape != image.shape:
            raise DataError(
                f"{label_path}: label grid {raw.shape} differs from image grid {image.shape} "
                f"of {image_path.name}"
            )
        check_label_space(img.affine, lab_img.affine, min(spacing), image_path, label_path)
        _check_whole_numbers(raw, label_path)
        raw = np.rint(raw).astype(np.int32)
        if known_labels_only and label_values is not None:
            unknown = np.setdiff1d(np.unique(raw), (0, *label_values))
            if unknown.size:
                raise DataError(f"{label_path}: label values {unknown.tolist()[:8]} are not "
                                f"among the layout's (0, {', '.join(map(str, label_values))}); "
                                "write the dataset's label values")
        label = labels_to_classes(raw, label_values)
    return Volume(subject_id, image, label, spacing, img.affine, img.header, image_path,
                  label_path, label_values)


def acdc_ed_frame(patient_dir: Path) -> int:
    """ED frame number from Info.cfg (``ED: <n>``); 1 if Info.cfg is missing or has none."""
    cfg = patient_dir / "Info.cfg"
    if cfg.is_file():
        match = re.search(r"^\s*ED\s*:\s*(\d+)", cfg.read_text(), flags=re.MULTILINE)
        if match:
            return int(match.group(1))
    return 1


def acdc_paths(root: Path, subject_id: str) -> tuple[Path, Path]:
    """Image and label paths of the ED frame of ACDC patient ``subject_id`` ("001")."""
    pdir = root / f"patient{subject_id}"
    if not pdir.is_dir():
        raise DataError(
            f"{pdir}: patient folder not found; put the ACDC training folders under {root}"
        )
    ed = acdc_ed_frame(pdir)
    image = pdir / f"patient{subject_id}_frame{ed:02d}.nii.gz"
    if not image.is_file():  # the original always took frame 01
        image = pdir / f"patient{subject_id}_frame01.nii.gz"
        if not image.is_file():
            raise DataError(
                f"{pdir}: no ED frame file patient{subject_id}_frame{ed:02d}.nii.gz "
                "(nor frame01); check Info.cfg and the file names"
            )
    return image, image.with_name(image.name.replace(".nii.gz", "_gt.nii.gz"))


def decathlon_paths(root: Path, subject_id: str) -> tuple[Path, Path]:
    """Decathlon prostate: id "000" is ``prostate_00.nii.gz`` in imagesTr/ and labelsTr/."""
    name = f"prostate_{int(subject_id):02d}.nii.gz"
    return root / "imagesTr" / name, root / "labelsTr" / name


def mmwhs_paths(root: Path, subject_id: str) -> tuple[Path, Path]:
    """MMWHS MR: ``mr_train_<id>_image.nii.gz`` in root or one folder below it."""
    name = f"mr_train_{subject_id}_image.nii.gz"
    candidates = [root / name, *sorted(root.glob(f"*/{name}"))]
    image = next((p for p in candidates if p.is_file()), root / name)
    return image, image.with_name(f"mr_train_{subject_id}_label.nii.gz")


def channel_file(folder: Path, case: str, channel: int) -> Path:
    """``folder/<case>_<CCCC>.nii.gz``, nnU-Net's name of one channel's image of one case."""
    return folder / f"{case}_{channel:04d}.nii.gz"


def nnunet_paths(root: Path, case: str, channel: int = 0) -> tuple[Path, Path]:
    """nnU-Net v2 raw layout (utils/nnunet.py): the image of ``channel`` in imagesTr/ (or
    imagesTs/, or ``root`` itself, a flat folder of unlabeled images), the label
    ``labelsTr/<case>.nii.gz``. ``root`` may be the dataset folder or its labelsTr/ (how
    ``scripts/evaluate.py --gt`` names the ground truth)."""
    if root.name == "labelsTr":
        root = root.parent
    image = channel_file(root / "imagesTr", case, channel)
    for other in (root / "imagesTs", root):
        if not image.is_file() and channel_file(other, case, channel).is_file():
            image = channel_file(other, case, channel)
    return image, root / "labelsTr" / f"{case}.nii.gz"


@dataclass(frozen=True)
class DataLayout:
    """Where a dataset's raw files are and how they are read; one entry of `LAYOUTS`, named by
    the ``data_layout`` of ``experiment_init/init_<dataset>.py``.

    paths: (raw folder, subject id such as "001") -> (image path, label path).
    id_in_name: regular expression whose group 1 is the subject id in a file name without
        .nii/.nii.gz (how ``scripts/evaluate.py --pred`` pairs predictions with subjects).
    id_digits: zero-pad that id to this many digits (Decathlon's prostate_11 is "011");
        None keeps it as written.
    channel: the channel read from 4D image files (Decathlon prostate: T2, 0); None: 3D images.
    label_values: the value of class 1, 2, ... in the label files (MMWHS: 205, ..., 850);
        None: the files hold class indices.
    """

    paths: Callable[[Path, str], tuple[Path, Path]]
    id_in_name: str
    id_digits: int | None = None
    channel: int | None = None
    label_values: tuple[int, ...] | None = None


# Adding a layout is adding an entry here (README, "Adding a dataset").
LAYOUTS: dict[str, DataLayout] = {
    "acdc": DataLayout(acdc_paths, r"patient(\d+)"),
    "decathlon": DataLayout(decathlon_paths, r"prostate_(\d+)", id_digits=3, channel=0),
    "mmwhs": DataLayout(mmwhs_paths, r"mr_train_(\d+)", label_values=MMWHS_LABEL_VALUES),
    # nnU-Net's labels are consecutive 0..N, so the file values are the class indices.
    "nnunet": DataLayout(nnunet_paths, r"(.+)"),
}

# The nnU-Net layout reading another channel than 0: "nnunet_ch1", "nnunet_ch2", ...
NNUNET_CHANNEL = re.compile(r"nnunet_ch(\d+)")


def nnunet_channel(name: str) -> int | None:
    """The channel a layout name reads: "nnunet" -> 0, "nnunet_ch2" -> 2; None for others."""
    if name == "nnunet":
        return 0
    match = NNUNET_CHANNEL.fullmatch(name)
    return int(match.group(1)) if match else None


def data_layout(name: str) -> DataLayout:
    """The layout registered as ``name`` in `LAYOUTS`; a ValueError naming the known ones."""
    channel = nnunet_channel(name)
    if channel:
        return DataLayout(functools.partial(nnunet_paths, channel=channel), r"(.+)")
    if name not in LAYOUTS:
        raise ValueError(f"unknown data layout {name!r}: one of {', '.join(LAYOUTS)} "
                         "(utils/io.py, LAYOUTS; nnunet_ch<k> for channel k)")
    return LAYOUTS[name]


def raw_paths(layout: str, root: str | os.PathLike | tuple[Path, ...],
              subject_id: str) -> tuple[Path, Path]:
    """(image, label) paths of one subject in a raw layout. ``root`` may be several folders
    (`ExperimentConfig.raw_folders`: the dataset's, then its folder of unlabeled volumes): the
    first that holds the subject's image, else the first folder's paths."""
    roots = tuple(Path(r) for r in (root if isinstance(root, tuple) else (root,)))
    if not roots[0].is_dir():
        raise DataError(
            f"{roots[0]}: data folder not found; pass --data_root or set LCL_DATA_ROOT "
            "(see README, 'Where data and outputs live')"
        )
    for extra in roots[1:]:
        if not extra.is_dir():
            raise DataError(f"{extra}: folder of unlabeled volumes not found; fix "
                            "data_path_unlabeled in the dataset's init file")
    spec = data_layout(layout)
    first = spec.paths(roots[0], subject_id)
    for extra in roots[1:]:
        paths = spec.paths(extra, subject_id)
        if not first[0].is_file() and paths[0].is_file():
            return paths
    return first


def subject_id_in_name(layout: str, name: str) -> str | None:
    """The subject id a file name (without .nii/.nii.gz) names: ``patient011_frame01`` -> "011"
    (ACDC), ``prostate_11`` -> "011" (Decathlon), ``mr_train_1011_image`` -> "1011" (MMWHS); a
    name of digits is the id itself. None when it names none."""
    if name.isdigit():
        return name
    spec = data_layout(layout)
    match = re.match(spec.id_in_name, name)
    if match is None:
        return None
    sid = match.group(1)
    return f"{int(sid):0{spec.id_digits}d}" if spec.id_digits else sid


def nifti_stem(path: Path) -> str | None:
    """A NIfTI file's name without .nii or .nii.gz; None for other files."""
    for ext in (".nii.gz", ".nii"):
        if path.name.endswith(ext):
            return path.name[: -len(ext)]
    return None


def read_raw_volume(
    layout: str, root: str | os.PathLike | tuple[Path, ...], subject_id: str,
    with_label: bool = True,
) -> Volume:
    """Read one subject in its raw layout, with the label mapped to class indices."""
    image_path, label_path = raw_paths(layout, root, subject_id)
    return read_volume(subject_id, image_path, label_path if with_label else None, layout)


def save_nifti(
    path: str | os.PathLike,
    array: np.ndarray,
    affine: np.ndarray,
    header: nib.Nifti1Header | None = None,
) -> None:
    """Write ``array`` as NIfTI atomically (temporary file, then rename)."""
    img = nib.Nifti1Image(array, affine, header=header)
    if header is not None:
        img.set_data_dtype(array.dtype)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def cropped_paths(cropped_root: str | os.PathLike, subject_id: str) -> tuple[Path, Path]:
    d = Path(cropped_root) / subject_id
    return d / "img_cropped.nii.gz", d / "mask_cropped.nii.gz"


def write_cropped(
    cropped_root: str | os.PathLike,
    subject_id: str,
    image: np.ndarray,
    label: np.ndarray | None,
    target_resolution: tuple[float, float],
) -> None:
    """Store a preprocessed subject; the affine carries the target in-plane spacing (mm).
    Without a label (an unlabeled pool volume) only the image is written."""
    affine = np.diag([target_resolution[0], target_resolution[1], 1.0, 1.0])
    img_path, mask_path = cropped_paths(cropped_root, subject_id)
    if label is None:
        # A mask of an earlier cropping would be read as this image's ground truth.
        mask_path.unlink(missing_ok=True)
    save_nifti(img_path, image.astype(np.float32), affine)
    if label is not None:
        save_nifti(mask_path, label.astype(np.uint8), affine)


def read_cropped(
    cropped_root: str | os.PathLike, subject_id: str, label_required: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """(image float32, label int64), both (X, Y, Z) in the target grid. Without
    ``label_required``, a subject cropped without label (no mask file) gives label None."""
    img_path, mask_path = cropped_paths(cropped_root, subject_id)
    if not img_path.is_file():
        raise DataError(
            f"{img_path}: cropped volume not found; run scripts/create_cropped_imgs.py "
            "--dataset <name> first"
        )
    image = np.asarray(load_nifti(img_path).get_fdata(dtype=np.float32))
    if not mask_path.is_file():
        if not label_required:
            return image, None
        raise DataError(
            f"{mask_path}: cropped label not found (its subject was cropped without one); add "
            f"the raw label file and rerun scripts/create_cropped_imgs.py --ids {subject_id}"
        )
    label = np.rint(np.asarray(load_nifti(mask_path).dataobj)).astype(np.int64)
    return image, label
