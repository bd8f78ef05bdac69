"""Evaluation in native resolution (METHOD §8): predict, map back, score, write test_results/.

Edge cases are explicit: a structure that is empty in both prediction and ground truth has
Dice 1; empty in exactly one has Dice 0. HD95 and ASSD are undefined (``None`` in JSON, empty in
CSV) whenever either side is empty, and the means over subjects count only defined values; the
number of undefined values is reported beside each mean so it is never silently flattered.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from utils.figures import write_subject_figure
from utils.io import (
    Volume,
    atomic_path,
    classes_to_labels,
    read_raw_volume,
    save_nifti,
    write_text_atomic,
)
from utils.preprocess import Geometry, to_native, to_target


@dataclass
class EvalVolume:
    """A raw subject prepared once for repeated prediction: image_c is (CX, CY, Z) float32."""

    volume: Volume
    image_c: np.ndarray
    geometry: Geometry


def prepare_eval_volume(
    layout: str,
    raw_root: Path,
    subject_id: str,
    target_resolution: tuple[float, float],
    crop: tuple[int, int],
) -> EvalVolume:
    return prepare_volume(read_raw_volume(layout, raw_root, subject_id), target_resolution, crop)


def prepare_volume(
    vol: Volume, target_resolution: tuple[float, float], crop: tuple[int, int]
) -> EvalVolume:
    """A volume read in native resolution, preprocessed as the network sees it (METHOD §2)."""
    image_c, _, geometry = to_target(vol.image, None, vol.spacing[:2], target_resolution, crop)
    return EvalVolume(vol, image_c, geometry)


@torch.no_grad()
def predict_slices(
    model: torch.nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 32
) -> torch.Tensor:
    """Softmax (N, C, H, W) on ``device`` of (N, 1, H, W) slices, in eval mode (batch norm with
    running statistics); the model's training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    out = [torch.softmax(model(images[s : s + batch_size].to(device)).float(), 1)
           for s in range(0, images.shape[0], batch_size)]
    model.train(was_training)
    return torch.cat(out)


def predict_probs(
    model: torch.nn.Module, image_c: np.ndarray, device: torch.device, batch_size: int = 32
) -> torch.Tensor:
    """Softmax of every slice of a cropped (CX, CY, Z) volume -> (Z, C, CX, CY) on ``device``."""
    slices = torch.from_numpy(np.ascontiguousarray(image_c.transpose(2, 0, 1)))[:, None]
    return predict_slices(model, slices, device, batch_size)


def native_probs(model: torch.nn.Module, ev: EvalVolume, device: torch.device) -> torch.Tensor:
    """Softmax of every slice of one subject in its native grid: (Z, C, X, Y) on ``device``."""
    return to_native(predict_probs(model, ev.image_c, device), ev.geometry)


def native_labels(probs: torch.Tensor) -> np.ndarray:
    """The (X, Y, Z) uint8 class-index map of (Z, C, X, Y) native-grid probabilities."""
    return probs.argmax(1).permute(1, 2, 0).to(torch.uint8).cpu().numpy()


def predict_native(
    model: torch.nn.Module, ev: EvalVolume, device: torch.device
) -> np.ndarray:
    """Predicted label map of one subject in its native (X, Y, Z) grid (uint8 class indices)."""
    return native_labels(native_probs(model, ev, device))


def prediction_path(out_dir: Path, subject_id: str) -> Path:
    """Where a run's test_results/ (``out_dir``) hold the prediction of ``subject_id``."""
    return out_dir / subject_id / f"pred_seg_id_{subject_id}.nii.gz"


def save_prediction(path: Path, pred: np.ndarray, vol: Volume) -> None:
    """Write an (X, Y, Z) class-index map beside ``vol``'s image: its affine and header, the
    label values of its layout (MMWHS: 205, ..., 850), so it opens over the raw ground truth."""
    save_nifti(path, classes_to_labels(pred, vol.label_values), vol.affine, vol.header)


def dice_per_class(
    pred_labels: torch.Tensor, true_labels: torch.Tensor, num_classes: int,
    absent: float = 1.0,
) -> torch.Tensor:
    """Hard Dice of each foreground class over the whole label map.

    Args:
        pred_labels: integer label map of any shape, e.g. (N, H, W) or (X, Y, Z).
        true_labels: integer label map of the same shape.
        num_classes: C, including background 0.

    Returns:
        float64 tensor (C - 1,): Dice of classes 1..C-1, pooled over all voxels. A class absent
        from both maps scores ``absent``; present in exactly one, 0.0.
    """
    if pred_labels.shape != true_labels.shape:
        raise ValueError(
            f"pred {tuple(pred_labels.shape)} and true {tuple(true_labels.shape)} differ"
        )
    classes = torch.arange(1, num_classes, device=pred_labels.device)
    # (C-1, V) boolean masks; counts in int64 so large volumes cannot overflow.
    pred = pred_labels.reshape(1, -1) == classes[:, None]
    true = true_labels.reshape(1, -1).to(pred_labels.device) == classes[:, None]
    inter = (pred & true).sum(dim=1).double()
    total = pred.sum(dim=1).double() + true.sum(dim=1).double()
    both_empty = total == 0
    dice = 2.0 * inter / torch.where(both_empty, torch.ones_like(total), total)
    return torch.where(both_empty, torch.full_like(dice, absent), dice)


def mean_foreground_dice(
    pred_labels: torch.Tensor, true_labels: torch.Tensor, num_classes: int
) -> float:
    """Mean hard Dice over the foreground classes present in either label map (same shapes,
    any); NaN when none is. The released code's validation and augmentation-overlap score:
    sklearn's ``f1_score(average=None)`` scores only the labels that occur, so a structure
    absent from both maps is left out rather than counted as 1."""
    dice = dice_per_class(pred_labels, true_labels, num_classes, absent=float("nan"))
    return float(dice.nanmean())


def structure_metrics(
    pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...], num_classes: int
) -> list[dict[str, float | None]]:
    """Dice, HD95 and ASSD (mm) of classes 1..C-1 of two (X, Y, Z) label maps."""
    # Imported here: medpy pulls in scipy.stats, slow to import, which training never needs
    # before the test set is evaluated.
    from medpy.metric import binary

    dice = dice_per_class(torch.from_numpy(pred), torch.from_numpy(gt), num_classes).tolist()
    results = []
    for c in range(1, num_classes):
        p, g = pred == c, gt == c
        entry: dict[str, float | None] = {"dice": dice[c - 1], "hd95": None, "assd": None}
        if p.any() and g.any():
            entry["hd95"] = float(binary.hd95(p, g, voxelspacing=spacing))
            entry["assd"] = float(binary.assd(p, g, voxelspacing=spacing))
        results.append(entry)
    return results


def validation_score(
    model: torch.nn.Module, volumes: list[EvalVolume], num_classes: int, device: torch.device
) -> float:
    """Mean over volumes of the mean foreground Dice in native resolution (METHOD §6), each
    volume's mean over the structures present in its label or prediction
    (`mean_foreground_dice`)."""
    scores = []
    for ev in volumes:
        pred = native_probs(model, ev, device).argmax(1).permute(1, 2, 0)  # on the device
        scores.append(mean_foreground_dice(pred, torch.from_numpy(ev.volume.label), num_classes))
    return float(np.mean(scores))


UNITS = {"dice": "fraction", "hd95": "mm", "assd": "mm"}
STATISTICS = ("mean and sample standard deviation (ddof 1, null for one value) over subjects; "
              "HD95 and ASSD over the subjects where they are defined")


def _stats_defined(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and sample std (ddof 1) of the defined values, and how many are undefined."""
    defined = [v for v in values if v is not None]
    mean = float(np.mean(defined)) if defined else None
    std = float(np.std(defined, ddof=1)) if len(defined) > 1 else None
    return mean, std, len(values) - len(defined)


def summarize(
    per_subject: dict[str, list[dict[str, float | None]]],
    struct_names: tuple[str, ...],
    selected_on: dict | None = None,
) -> dict:
    """The summary.json structure from per-subject, per-structure metrics.

    Each metric's mean over subjects has its std beside it (``dice_std``, ``mean_dice_std``,
    see STATISTICS); ``selected_on`` says which checkpoint made the predictions (see
    `utils.run.selected_on`; None: not known)."""
    per_structure = {}
    for k, name in enumerate(struct_names):
        entry: dict[str, float | int | None] = {}
        for metric in ("dice", "hd95", "assd"):
            mean, std, undefined = _stats_defined([m[k][metric] for m in per_subject.values()])
            entry[metric] = mean
            entry[f"{metric}_std"] = std
            if metric != "dice":
                entry[f"{metric}_undefined"] = undefined
        per_structure[name] = entry
    subject_means = {
        sid: float(np.mean([m["dice"] for m in metrics])) for sid, metrics in per_subject.items()
    }
    _, mean_dice_std, _ = _stats_defined(list(subject_means.values()))
    return {
        "mean_dice": float(np.mean(list(subject_means.values()))),
        "mean_dice_std": mean_dice_std,
        "units": UNITS,
        "statistics": STATISTICS,
        "selected_on": selected_on,
        "test_ids": list(per_subject),
        "per_structure": per_structure,
        "per_subject": {
            sid: {name: metrics[k] for k, name in enumerate(struct_names)}
            for sid, metrics in per_subject.items()
        },
        "per_subject_mean_dice": subject_means,
        "n_subjects": len(per_subject),
    }


def _fmt(v: float | None) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6f}"


def write_test_results(out_dir: Path, summary: dict, struct_names: tuple[str, ...]) -> None:
    """summary.json, metrics_per_subject.csv and the original's text files, each atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf)
    columns = [f"{n}_{m}" for n in struct_names for m in ("dice", "hd95", "assd")]
    writer.writerow(["subject", *columns, "mean_dice"])
    for sid, metrics in summary["per_subject"].items():
        row = [sid]
        for name in struct_names:
            row += [_fmt(metrics[name][m]) for m in ("dice", "hd95", "assd")]
        writer.writerow([*row, _fmt(summary["per_subject_mean_dice"][sid])])
    write_text_atomic(out_dir / "metrics_per_subject.csv", buf.getvalue())
    # The original's text outputs: Dice per subject and structure, per structure, net mean.
    dsc = np.array([[summary["per_subject"][s][n]["dice"] for n in struct_names]
                    for s in summary["per_subject"]])
    for name, arr in (("dsc_per_subject.txt", dsc),
                      ("dsc_per_struct.txt", dsc.mean(0, keepdims=True)),
                      ("net_dsc_mean.txt", np.array([[summary["mean_dice"]]]))):
        with atomic_path(out_dir / name) as tmp:
            np.savetxt(tmp, arr, fmt="%.6f")


def evaluate_test_set(
    model: torch.nn.Module,
    volumes: list[EvalVolume],
    num_classes: int,
    struct_names: tuple[str, ...],
    out_dir: Path,
    device: torch.device,
    progress: bool = True,
    selected_on: dict | None = None,
) -> dict:
    """Predict every test subject, save predictions as NIfTI with the raw affine, write metrics
    (``selected_on``: see `summarize`)."""
    from tqdm import tqdm

    per_subject = {}
    for ev in tqdm(volumes, desc="test", disable=not progress, leave=False):
        vol = ev.volume
        pred = predict_native(model, ev, device)
        save_prediction(prediction_path(out_dir, vol.subject_id), pred, vol)
        per_subject[vol.subject_id] = structure_metrics(pred, vol.label, vol.spacing, num_classes)
        write_subject_figure(out_dir / "figures" / f"{vol.subject_id}.png", vol.subject_id,
                             vol.image, vol.label, pred, vol.spacing,
                             [m["dice"] for m in per_subject[vol.subject_id]], struct_names)
    summary = summarize(per_subject, struct_names, selected_on)
    write_test_results(out_dir, summary, struct_names)
    return summary
