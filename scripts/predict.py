"""Segment new volumes with a trained run: its network, its preprocessing, native grid out.

    python scripts/predict.py --run_dir RUN --input IMG.nii.gz [FOLDER ...] --output OUT \
        [--checkpoint best|last] [--device auto] [--n4] [--save_probabilities]

Each input (a NIfTI file, or every .nii/.nii.gz file in a folder) is read as the run's dataset
reads its images (the dataset's channel of a 4D Decathlon image), preprocessed with the run's
recorded geometry (config.yaml, not today's init file), segmented slice by slice and mapped back
to its own grid: OUT/<name>_seg.nii.gz (nnU-Net layout: the images <case>_<CCCC> of the run's
channel, written as OUT/<case>.nii.gz) has the input's affine and header and the dataset's
label values (MMWHS: 205, ..., 850), so it opens over the image and its ground truth.
--save_probabilities adds OUT/<name>_probs.npz: ``probabilities`` (C, X, Y, Z) float32 softmax in
the native grid, ``label_values`` (the file value of each channel) and ``structures``.

An input that cannot be used (not 3D, too few channels, NaN, zero or implausible spacing, one
slice) is skipped with one line naming it and why; the exit status is the number skipped
(at most 100), 0 when every input was segmented, 2 for a run that cannot be used.
"""

from __future__ import annotations

import utils.wait_policy  # noqa: F401  (before torch: OpenMP reads it once)

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from models import cpu_training
from models.unet import JointUNet, UNet
from utils.device import resolve_device
from utils.errors import DataError, RunDirError, exit_status, run_main
from utils.evaluation import (
    native_labels,
    native_probs,
    prepare_volume,
    save_prediction,
)
from utils.flags import JOINT
from utils.integrity import image_problems
from utils.io import atomic_path, nifti_stem, nnunet_channel, read_volume
from utils.nnunet import case_of
from utils.preprocess import n4_bias_correction
from utils.run import load_checkpoint, read_run, selected_on
from utils.training import TRAINERS, on_device

# Name endings of the label files beside the images in the ACDC (and demo) and MMWHS raw
# layouts (utils/io.py); a folder's such files are not inputs.
LABEL_ENDINGS = ("_gt", "_label")


def input_files(paths: list[Path]) -> list[Path]:
    """The NIfTI files named by ``paths``: files as given; a folder's .nii/.nii.gz files,
    sorted, but for label files (`LABEL_ENDINGS`), which are named on stdout and left out."""
    files = []
    for path in paths:
        if not path.is_dir():
            files.append(path)
            continue
        for p in sorted(p for p in path.iterdir() if p.is_file() and nifti_stem(p)):
            if nifti_stem(p).endswith(LABEL_ENDINGS):
                print(f"ignoring {p}: a label file (name ends with "
                      f"{' or '.join(LABEL_ENDINGS)}); name it to segment it", flush=True)
            else:
                files.append(p)
    return files


def load_network(run_dir: Path, checkpoint: str, num_classes: int, trainer: str,
                 device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The run's network (JointUNet for the joint step) with the weights of
    checkpoints/<checkpoint>.pt, built as the trainers build it; and the checkpoint."""
    state = load_checkpoint(run_dir / "checkpoints" / f"{checkpoint}.pt", device)
    if "model" not in state:
        raise RunDirError(f"{run_dir}/checkpoints/{checkpoint}.pt: holds no network weights")
    model = on_device((JointUNet if trainer == TRAINERS[JOINT] else UNet)(num_classes), device)
    if device.type == "cpu":  # same function, less memory and time
        cpu_training.install(model)
    model.load_state_dict(state["model"])
    return model, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", type=Path, required=True,
                        help="a trained run (the last line a trainer prints)")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best",
                        help="best: the best-validation weights the run was tested with")
    parser.add_argument("--input", type=Path, nargs="+", required=True,
                        help="NIfTI files and/or folders of them")
    parser.add_argument("--output", type=Path, required=True, help="folder for the results")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--n4", action="store_true",
                        help="N4 bias-field correct each input first (for a run trained on "
                             "N4-corrected data, see data_path_tr in its config.yaml)")
    parser.add_argument("--save_probabilities", action="store_true",
                        help="also write <name>_probs.npz with the softmax maps")
    args = parser.parse_args()
    record, cfg = read_run(args.run_dir)
    device = resolve_device(args.device)
    model, state = load_network(args.run_dir, args.checkpoint, cfg.num_classes,
                                record.get("trainer", ""), device)
    chosen = selected_on(state) if args.checkpoint == "best" else \
        {"iteration": int(state["iteration"])}
    print(f"{args.run_dir}: {args.checkpoint}.pt {chosen}, {cfg.dataset} ({cfg.data_layout} "
          f"layout), {cfg.crop_size} crop at {cfg.target_resolution} mm, on {device}",
          flush=True)
    failed, written = 0, set()
    channel = nnunet_channel(cfg.data_layout)
    for path in input_files(args.input):
        name = nifti_stem(path)
        if channel is not None and name is not None:
            # nnU-Net names a case's images <case>_<CCCC> and its prediction <case>.
            if not name.endswith(f"_{channel:04d}"):
                print(f"ignoring {path}: not channel {channel} of an nnU-Net case", flush=True)
                continue
            name = case_of(name)
        try:
            if name is None:
                raise DataError(f"{path}: not a .nii or .nii.gz file")
            if name in written:
                raise DataError(f"{path}: an earlier input has the same name, {name}")
            vol = read_volume(name, path, None, cfg.data_layout)
            problems = image_problems(vol)
            if problems:
                raise DataError(f"{path}: {'; '.join(problems)}")
        except DataError as err:
            print(f"skipped {err}", flush=True)
            failed += 1
            continue
        if args.n4:
            vol.image = n4_bias_correction(vol.image, vol.spacing)
        probs = native_probs(model, prepare_volume(vol, cfg.target_resolution, cfg.crop_size),
                             device)
        out = args.output / (f"{name}.nii.gz" if channel is not None else f"{name}_seg.nii.gz")
        save_prediction(out, native_labels(probs), vol)
        if args.save_probabilities:
            values = (0, *(vol.label_values or range(1, cfg.num_classes)))
            with atomic_path(args.output / f"{name}_probs.npz") as tmp:
                np.savez_compressed(
                    tmp, probabilities=probs.permute(1, 2, 3, 0).float().cpu().numpy(),
                    label_values=np.asarray(values),
                    structures=np.asarray(("background", *cfg.struct_name)))
        written.add(name)
        print(f"wrote {out}", flush=True)
    print(f"{len(written)} segmented, {failed} skipped", flush=True)
    sys.exit(exit_status(failed))


if __name__ == "__main__":
    run_main(main)
