"""A run's directory: resolved config, logs (CSV, TensorBoard, PNG curves) and checkpoints.

Layout of a run directory::

    config.yaml            resolved configuration and flags
    log.csv                one row per logged iteration (losses, validation Dice, ...)
    curves.png             loss and validation-Dice curves
    tensorboard/           TensorBoard scalars
    checkpoints/best.pt    best-validation weights (+ optimizer), written atomically
    checkpoints/last.pt    periodic checkpoint for --resume
    checkpoints/previous.pt  the periodic checkpoint before it, the fallback of --resume
    test_results/          summary.json, per-subject predictions and metrics
    run.lock               who writes the run now (utils/run_lock.py); gone once it ends

Checkpoints hold data only (tensors, numbers, strings, lists, dicts): they are read with
``torch.load(weights_only=True)``, which cannot run code, so a checkpoint from elsewhere
(--pretr_dir) is safe to open. Each carries a checksum of its contents, checked on loading,
since the zip format torch writes does not check its data (a flipped bit loads silently).
"""

from __future__ import annotations

import csv
import hashlib
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

from experiment_init import ExperimentConfig
from utils.errors import ConfigError, RunDirError
from utils.io import atomic_path, write_text_atomic


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


def read_run(run_dir: Path) -> tuple[dict[str, Any], ExperimentConfig]:
    """A run's config.yaml (trainer, flags, ids, provenance) and the configuration it ran
    with, as recorded then; RunDirError when it is missing or unreadable."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise RunDirError(f"{path}: not found; --run_dir must name a run directory (the last "
                          "line a trainer prints)")
    try:
        record = yaml.safe_load(path.read_text())
        return record, ExperimentConfig.from_dict(record["config"])
    except (yaml.YAMLError, TypeError, KeyError, ConfigError) as err:
        raise RunDirError(f"{path}: cannot be read as a run's record ({type(err).__name__}: "
                          f"{err})") from None


LAST_CHECKPOINT = "last.pt"
PREVIOUS_CHECKPOINT = "previous.pt"
# Keys every periodic checkpoint holds (see utils.training.save_progress).
PERIODIC_KEYS = ("args", "iteration", "model", "optimizer")


def checksum(state: Any) -> str:
    """SHA-256 (hex) of a checkpoint's contents: every tensor's dtype, shape and bytes and every
    plain value's type and repr, in the order of the (nested) dicts, lists and tuples."""
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, dict):
            digest.update(b"{")
            for k, v in value.items():
                feed(k)
                feed(v)
            digest.update(b"}")
        elif isinstance(value, list | tuple):
            digest.update(b"[" if isinstance(value, list) else b"(")
            for v in value:
                feed(v)
            digest.update(b"]")
        else:
            digest.update(f"{type(value).__name__}:{value!r};".encode())

    feed(state)
    return digest.hexdigest()


def save_checkpoint(path: Path, state: dict[str, Any], previous: Path | None = None) -> None:
    """torch.save ``state`` and its `checksum` to a temporary name, then rename: a kill never
    leaves a torn checkpoint. With ``previous``, the file ``path`` held is moved there."""
    with atomic_path(path, previous) as tmp, open(tmp, "wb") as fh:
        # Through a Python file object, a full disk raises OSError(ENOSPC); torch's own file
        # writer reports it as an unrelated RuntimeError.
        torch.save({**state, "checksum": checksum(state)}, fh)


def save_periodic_checkpoint(checkpoint_dir: Path, state: dict[str, Any]) -> None:
    """Write ``checkpoint_dir/last.pt``, keeping the one it replaces as ``previous.pt``."""
    save_checkpoint(checkpoint_dir / LAST_CHECKPOINT, state,
                    previous=checkpoint_dir / PREVIOUS_CHECKPOINT)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint's contents, read as data only: one that would need arbitrary unpickling
    (which can run any code) is refused with RunDirError, as is a missing, unreadable or
    damaged one (contents that do not match their checksum). Checkpoints written before
    checksums were added load unchecked."""
    if not path.is_file():
        raise RunDirError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
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
        # The first sentence: torch goes on with advice about other situations.
        reason = str(err).splitlines()[0].split(". ")[0] if str(err) else "empty file"
        raise RunDirError(f"{path}: not a readable PyTorch checkpoint ({reason}); it may be "
                          "truncated or of another format") from None
    if not isinstance(state, dict):
        raise RunDirError(f"{path}: holds a {type(state).__name__}, not a checkpoint of this code")
    if "checksum" in state:
        expected = state.pop("checksum")
        if checksum(state) != expected:
            raise RunDirError(f"{path}: contents do not match the checksum written with them; "
                              "the file was damaged after it was written")
    return state


def selected_on(state: dict[str, Any]) -> dict[str, Any]:
    """What a best.pt checkpoint was chosen on, for summary.json: the set, its iteration, its
    validation Dice (mean foreground, native resolution) and, for the joint step, its round."""
    chosen = {"set": "validation", "iteration": int(state["iteration"]),
              "val_dice": float(state["val_dice"])}
    if "round" in state:
        chosen["round"] = int(state["round"])
    return chosen


def periodic_problem(state: dict[str, Any], flags: dict[str, Any]) -> str | None:
    """Why a loaded checkpoint cannot continue the run of ``flags`` (None if it can)."""
    missing = [k for k in PERIODIC_KEYS if k not in state]
    if missing:
        return f"not a periodic checkpoint (no {', '.join(missing)})"
    before = state["args"]
    diff = {k: (before.get(k), v) for k, v in flags.items() if before.get(k) != v}
    if diff:
        listed = ", ".join(f"--{k} {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
        return f"written by a run with other flags ({listed})"
    return None


def load_latest_checkpoint(checkpoint_dir: Path, flags: dict[str, Any]) -> dict[str, Any] | None:
    """The newest usable periodic checkpoint of the run of ``flags``: ``last.pt``, else
    ``previous.pt``. Usable: it loads as data, matches its checksum and was written with
    ``flags``. Prints which file it uses; a newer file it skips is renamed ``<name>.unusable``
    (so that the next rotation cannot push the good one out) and the reason printed.

    Returns None when neither file exists (the run stopped before its first checkpoint);
    raises RunDirError naming each file and its problem when none is usable.
    """
    present = [checkpoint_dir / name for name in (LAST_CHECKPOINT, PREVIOUS_CHECKPOINT)
               if (checkpoint_dir / name).is_file()]
    if not present:
        return None
    skipped: list[tuple[Path, str]] = []
    for path in present:
        try:
            state = load_checkpoint(path)
            problem = periodic_problem(state, flags)
        except RunDirError as err:
            problem = str(err).removeprefix(f"{path}: ")
        if problem is None:
            for bad, why in skipped:
                aside = bad.with_name(bad.name + ".unusable")
                os.replace(bad, aside)
                print(f"skipping {bad} ({why}); kept as {aside.name}", flush=True)
            print(f"resuming from {path} (iteration {state['iteration']})", flush=True)
            return state
        skipped.append((path, problem))
    listed = "; ".join(f"{path}: {why}" for path, why in skipped)
    raise RunDirError(f"{checkpoint_dir.parent}: --resume found no usable checkpoint ({listed}); "
                      "resume with the original flags, or start again with --overwrite")


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
        if axes[0].lines:  # a run whose every loss was non-finite has nothing to label
            axes[0].legend()
        val = [(r["iteration"], r["val_dice"]) for r in self.rows if "val_dice" in r]
        if val:
            axes[1].plot(*zip(*val), marker=".", lw=1)
            best = max(val, key=lambda p: p[1])
            axes[1].axhline(best[1], ls="--", c="gray", lw=0.8)
            # The curve's maximum; best.pt may be a later checkpoint (--best_selection original).
            axes[1].set_title(f"validation mean foreground Dice (max {best[1]:.3f} @ {best[0]})")
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
