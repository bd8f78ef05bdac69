"""N4 bias-field correction with SimpleITK (METHOD §2.1), once, offline.

    python scripts/N4_bias_correction.py IN.nii.gz OUT.nii.gz
    python scripts/N4_bias_correction.py RAW_FOLDER CORRECTED_FOLDER

With folders, the tree is mirrored: every image is corrected, label files (``*_gt*``,
``*label*``, anything under ``labelsTr/``) and other files are copied unchanged, so the output
folder has the same raw layout and can be used as ``data_path_tr``. 4D images (Decathlon) are
corrected channel by channel. Existing outputs are skipped unless --overwrite. As the
released script, the field is fitted over the whole image; ``--mask otsu`` fits it on Otsu's
foreground instead.
"""

from __future__ import annotations

import utils.wait_policy  # noqa: F401  (before torch: OpenMP reads it once)

import argparse
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from utils.errors import ConfigError, DataError, run_main
from utils.io import atomic_path, load_nifti, save_nifti
from utils.preprocess import N4_MASKS, n4_bias_correction


def is_label(path: Path) -> bool:
    name = path.name.lower()
    return "_gt" in name or "label" in name or "labelstr" in {p.lower() for p in path.parts}


def correct_file(src: Path, dst: Path, mask: str = "none") -> None:
    img = load_nifti(src)
    data = np.asarray(img.get_fdata(dtype=np.float32))
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    if data.ndim not in (3, 4):
        raise DataError(f"{src}: expected a 3D or 4D image, got shape {data.shape}")
    try:
        if data.ndim == 3:
            out = n4_bias_correction(data, spacing, mask=mask)
        else:
            out = np.stack([n4_bias_correction(data[..., c], spacing, mask=mask)
                            for c in range(data.shape[3])], -1)
    except ValueError:  # negative intensities without a mask
        raise DataError(f"{src}: intensities down to {float(data.min()):g} cannot be corrected "
                        f"without a mask; rerun with --mask otsu") from None
    save_nifti(dst, out.astype(np.float32), img.affine, img.header)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", type=Path, help="a NIfTI file or a raw dataset folder")
    parser.add_argument("output", type=Path, help="output file or folder")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--mask", choices=N4_MASKS, default="none",
                        help="where the field is fitted: every voxel (the original) or "
                             "Otsu's foreground")
    args = parser.parse_args()
    if args.input.is_file():
        correct_file(args.input, args.output, args.mask)
        print(f"wrote {args.output}")
        return
    if not args.input.is_dir():
        raise DataError(f"{args.input}: no such file or folder")
    if args.output.resolve() == args.input.resolve():
        raise ConfigError("output folder must differ from the input folder (originals are kept)")
    files = sorted(p for p in args.input.rglob("*") if p.is_file())
    for src in tqdm(files, desc="N4"):
        dst = args.output / src.relative_to(args.input)
        if dst.exists() and not args.overwrite:
            continue
        if src.name.endswith((".nii", ".nii.gz")) and not is_label(src):
            correct_file(src, dst, args.mask)
        else:
            with atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)
    print(f"corrected folder written to {args.output}")


if __name__ == "__main__":
    run_main(main)
