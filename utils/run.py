"""A run's directory: resolved config, logs (CSV, TensorBoard, PNG curves) and checkpoints.

Layout of a run directory::

    config.yaml            resolved configuration and flags
    log.csv                one row per logged iteration (losses, validation Dice, ...)
    curves.png             loss and validation-Dice curves
    tensorboard/           TensorBoard scalars
    checkpoints/best.pt    best-validation weights (+ optimizer), written atomically
    checkpoints/last.pt    periodic checkpoint for --resume
    test_results/          summary.json, per-subject predictions and metrics

Checkpoints hold data only (tensors, numbers, strings, lists, dicts): they are read with
``torch.load(weights_only=True)``, which cannot run code, so a checkpoint from elsewhere
(--pretr_dir) is safe to open.
"""

from __future__ import annotations

import csv
import io
import math
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from utils.io import atomic_path, write_text_atomic


class RunDirError(RuntimeError):
    """A run directory or checkpoint that cannot be used as asked."""


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator for the augmentation draws."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every random-number state a run draws from, for an exact resume, as plain data
    (tuples, lists, numbers, tensors) that a weights-only checkpoint holds."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [name, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_config(run_dir: Path, config: dict[str, Any]) -> None:
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temporary name, then rename: a kill never leaves a torn checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint's contents, read as data only: one that would need arbitrary unpickling
    (which can run any code) is refused with RunDirError, as is a missing or unreadable one."""
    if not path.is_file():
        raise RunDirError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message is a page of advice; its one line about this file names the object.
        found = [ln for ln in str(err).splitlines() if "WeightsUnpickler error: " in ln]
        what = found[0].split("WeightsUnpickler error: ")[1].split(". Please")[0] if found else ""
        raise RunDirError(
            f"{path}: refused, the checkpoint holds objects other than tensors and plain values "
            f"and loading them could run arbitrary code ({what or 'not weights-only'}); use a "
            "checkpoint written by this code"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise RunDirError(f"{path}: not a readable PyTorch checkpoint ({err}); it may be "
                          "truncated or of another format") from None


class RunLog:
    """CSV + TensorBoard log of scalars, with the PNG curves redrawn on demand.

    The CSV is rewritten atomically from memory, so a kill never leaves a torn file and a
    resumed run can restore the rows it had.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True,
                 rows: list[dict[str, float]] | None = None) -> None:
        """``rows``: the rows of an interrupted run being resumed (its last checkpoint's)."""
        self.run_dir = run_dir
        self.rows: list[dict[str, float]] = list(rows or [])
        self.writer = None
        if tensorboard:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
            from torch.utils.tensorboard import SummaryWriter

            # On resume, events logged after the checkpoint are dropped (purge_step).
            purge = int(self.rows[-1]["iteration"]) + 1 if self.rows else None
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)

    def log(self, step: int, **scalars: float) -> None:
        row = {"iteration": step, **{k: float(v) for k, v in scalars.items()}}
        self.rows.append(row)
        if self.writer is not None:
            for k, v in scalars.items():
                if v is not None and math.isfinite(float(v)):
                    self.writer.add_scalar(k, float(v), step)

    def flush(self) -> None:
        keys: list[str] = []
        for row in self.rows:
            keys += [k for k in row if k not in keys]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomic(self.run_dir / "log.csv", buf.getvalue())
        if self.writer is not None:
            self.writer.flush()
        self.plot()

    def plot(self) -> None:
        """curves.png: training losses (left) and validation Dice (right) against iteration."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        loss_keys = sorted({k for r in self.rows for k in r if k.startswith("loss")})
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for k in loss_keys:
            pts = [(r["iteration"], r[k]) for r in self.rows if k in r and math.isfinite(r[k])]
            if pts:
                axes[0].plot(*zip(*pts), label=k, lw=1)
        axes[0].set(xlabel="iteration", ylabel="loss", title="training losses")
        if loss_keys:
            axes[0].legend()
        val = [(r["iteration"], r["val_dice"]) for r in self.rows if "val_dice" in r]
        if val:
            axes[1].plot(*zip(*val), marker=".", lw=1)
            best = max(val, key=lambda p: p[1])
            axes[1].axhline(best[1], ls="--", c="gray", lw=0.8)
            axes[1].set_title(f"validation mean foreground Dice (best {best[1]:.3f} @ {best[0]})")
        for key, style in (("pseudo_dice_before_crf", "v"), ("pseudo_dice_after_crf", "^")):
            pts = [(r["iteration"], r[key]) for r in self.rows if key in r]
            if pts:
                axes[1].plot(*zip(*pts), style, label=key.replace("_", " "))
        if any("pseudo_dice_after_crf" in r for r in self.rows):
            axes[1].legend(loc="lower right")
        axes[1].set(xlabel="iteration", ylabel="Dice")
        fig.tight_layout()
        with atomic_path(self.run_dir / "curves.png") as tmp:
            fig.savefig(tmp, dpi=100)
        plt.close(fig)

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()
