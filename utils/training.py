"""Pieces both trainers share: common flags, run directory, the segmentation loss choice,
validate-and-keep-best, final test evaluation and clean one-line errors.

The project's own errors, each a user-facing stop that `run_main` reports in one line:
`experiment_init.ConfigError` (settings and flags), `utils.io.DataError` (data files),
`utils.io.DiskFullError` (a write that found no space), `utils.run.RunDirError` (run
directories and checkpoints) and `TrainingStopped` (a run that cannot go on). Any other
exception is a programming error and keeps its traceback.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from experiment_init import ConfigError, ExperimentConfig, datasets
from losses.cross_entropy import weighted_cross_entropy_loss
from losses.dice import soft_dice_loss
from utils.dataset import load_eval_volumes
from utils.device import release_freed_memory
from utils.evaluation import EvalVolume, evaluate_test_set, validation_score
from utils.io import DataError, DiskFullError
from utils.run import (
    RunDirError,
    RunLog,
    load_checkpoint,
    load_latest_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
    save_periodic_checkpoint,
)


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of the original baseline (METHOD §9) plus device, seed and paths."""
    p = parser
    p.add_argument("--dataset", default="acdc",
                   help=f"one of {', '.join(datasets())} (experiment_init/init_<name>.py)")
    p.add_argument("--no_of_tr_imgs", default="tr1", help="labeled set size: tr1, tr2, tr8, ...")
    p.add_argument("--comb_tr_imgs", default="c1", help="combination of the labeled set: c1..c5")
    p.add_argument("--lr_seg", type=float, default=None,
                   help="Adam learning rate (default: lr of experiment_init/init_<dataset>.py)")
    p.add_argument("--ver", type=int, default=0, help="version (repeat) number of the run")
    p.add_argument("--dsc_loss", type=int, default=2, choices=(0, 1, 2),
                   help="0 weighted cross-entropy, 1 Dice w/o background, 2 Dice with background")
    p.add_argument("--rd_en", type=int, default=1, choices=(0, 1),
                   help="random deformation augmentation")
    p.add_argument("--sigma", type=float, default=5.0,
                   help="std (pixels) of the 3x3 random-deformation grid")
    p.add_argument("--ri_en", type=int, default=1, choices=(0, 1),
                   help="random intensity augmentation")
    p.add_argument("--en_1hot", type=int, default=1, choices=(0, 1),
                   help="1: train on soft one-hot labels after deformation; 0: re-harden them")
    p.add_argument("--rd_ni", type=int, default=1,
                   help="kept for command-line compatibility; the share of deformed slices is "
                   "drawn per batch (METHOD §6)")
    p.add_argument("--n_iter", type=int, default=None,
                   help="iterations (default: n_iter of experiment_init/init_<dataset>.py)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: --ver)")
    p.add_argument("--data_root", default=None,
                   help="dataset folder holding raw/ and cropped/ (default data/<dataset>)")
    p.add_argument("--out_dir", default=None, help="output root (default runs/)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run directory of the same settings")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its last periodic checkpoint")
    p.add_argument("--ckpt_every", type=positive_int, default=200,
                   help="iterations between periodic checkpoints (for --resume)")
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")
    p.add_argument("--low_memory", action="store_true",
                   help="CPU: return freed tensor memory to the OS after use (peak RSS of a "
                        "joint ACDC run ~1 GB lower, steps ~35%% slower)")


def resolve_flags(
    args: argparse.Namespace, cfg: ExperimentConfig, **settings: str
) -> argparse.Namespace:
    """``args`` with each flag in ``settings`` that was not given (None) set to the init-file
    setting named for it, e.g. ``resolve_flags(args, cfg, lr_seg="lr")``. The result is what
    the run uses and what its config.yaml and checkpoints record."""
    resolved = dict(vars(args))
    for flag, setting in settings.items():
        if resolved[flag] is None:
            resolved[flag] = getattr(cfg, setting)
    return argparse.Namespace(**resolved)


def run_name(args: argparse.Namespace) -> str:
    name = f"{args.no_of_tr_imgs}_{args.comb_tr_imgs}_v{args.ver}"
    return name if args.seed is None or args.seed == args.ver else f"{name}_seed{args.seed}"


def baseline_dir(cfg: ExperimentConfig, args: argparse.Namespace) -> Path:
    return cfg.srt_dir / cfg.dataset / "baseline" / run_name(args)


class TrainingStopped(RuntimeError):
    """A run that cannot go on: too many non-finite losses in a row, nothing to train on."""


def positive_int(text: str) -> int:
    """argparse type of a count that must be at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


# Flags that may differ between an interrupted run and its resumption.
RESUME_FREE_FLAGS = ("resume", "overwrite", "no_progress", "device", "ckpt_every", "low_memory")


class RunFinished(Exception):
    """--resume of a run whose test results are already written."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(f"{run_dir}: this run has finished already; nothing to resume")
        self.run_dir = run_dir


def open_run_dir(run_dir: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    """Create the run directory, or find the state to resume from.

    Returns the last periodic checkpoint when ``--resume`` finds one (after checking that the
    flags match the interrupted run's), else None for a fresh start. Never silently replaces a
    previous run's results: an existing directory needs --resume or --overwrite.
    """
    flags = resume_flags(args)
    if getattr(args, "resume", False) and run_dir.is_dir():
        if (run_dir / "test_results" / "summary.json").is_file():
            raise RunFinished(run_dir)
        state = load_latest_checkpoint(run_dir / "checkpoints", flags)
        if state is not None:
            return state
        shutil.rmtree(run_dir)  # interrupted before its first checkpoint: nothing to keep
    elif run_dir.exists() and any(run_dir.iterdir()):
        if not args.overwrite:
            raise RunDirError(
                f"{run_dir}: a run with these settings exists; pass --resume to continue it, "
                "--overwrite to replace it, or change --ver"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return None


def resume_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The flags an interrupted run is recognised by (stored in every periodic checkpoint)."""
    return {k: v for k, v in vars(args).items() if k not in RESUME_FREE_FLAGS}


def segmentation_loss(
    dsc_loss: int, num_classes: int
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The ``--dsc_loss`` choice as a function (logits, labels_onehot) -> scalar."""
    if dsc_loss == 2:
        return lambda logits, y: soft_dice_loss(logits, y, include_background=True)
    if dsc_loss == 1:
        return lambda logits, y: soft_dice_loss(logits, y, include_background=False)
    from losses.cross_entropy import class_weights

    weights = class_weights(num_classes)
    return lambda logits, y: weighted_cross_entropy_loss(logits, y, weights.to(logits.device))


class BestKeeper:
    """Validate in native resolution and keep the checkpoint with the best mean Dice (strict).

    Each validation ends by handing the memory it freed back to the OS
    (``utils.device.release_freed_memory``), so it does not stay resident under training.
    """

    def __init__(self, run_dir: Path, volumes: list[EvalVolume], num_classes: int,
                 device: torch.device) -> None:
        self.path = run_dir / "checkpoints" / "best.pt"
        self.volumes = volumes
        self.num_classes = num_classes
        self.device = device
        self.best_score = -1.0
        self.best_iteration = -1

    def update(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, iteration: int,
               extra: dict[str, Any] | None = None) -> float:
        score = validation_score(model, self.volumes, self.num_classes, self.device)
        if score > self.best_score:
            self.best_score, self.best_iteration = score, iteration
            save_checkpoint(self.path, {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "iteration": iteration,
                "val_dice": score,
                **(extra or {}),
            })
        release_freed_memory()
        return score


def test_best(
    model: torch.nn.Module,
    best_path: Path,
    test_volumes: list[EvalVolume],
    cfg: ExperimentConfig,
    run_dir: Path,
    device: torch.device,
    progress: bool,
) -> dict:
    """Load the best checkpoint into ``model`` and evaluate it on the test set."""
    model.load_state_dict(load_checkpoint(best_path, device)["model"])
    return evaluate_test_set(model, test_volumes, cfg.num_classes, cfg.struct_name,
                             run_dir / "test_results", device, progress)


def finish_run(
    model: torch.nn.Module,
    keeper: BestKeeper,
    guard: NonFiniteGuard,
    log: RunLog,
    cfg: ExperimentConfig,
    run_dir: Path,
    device: torch.device,
    progress: bool,
    start_time: float,
) -> dict:
    """Close the logs, test the best checkpoint, print the results; the last line printed is
    ``run directory: <path>`` (the outputs contract)."""
    log.close()
    print(f"best validation Dice {keeper.best_score:.4f} at iteration {keeper.best_iteration}; "
          f"{guard.total} non-finite steps skipped", flush=True)
    summary = test_best(model, keeper.path, load_eval_volumes(cfg, cfg.test), cfg, run_dir,
                        device, progress)
    parts = [f"{k} {v['dice']:.3f}" for k, v in summary["per_structure"].items()]
    print(f"test: mean Dice {summary['mean_dice']:.4f} ({', '.join(parts)})", flush=True)
    print(f"elapsed: {time.time() - start_time:.1f} s", flush=True)
    print(f"run directory: {run_dir}", flush=True)
    return summary


def save_progress(
    run_dir: Path,
    args: argparse.Namespace,
    iteration: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    keeper: BestKeeper,
    guard: NonFiniteGuard,
    log: RunLog,
    generator: torch.Generator,
    **extra: Any,
) -> None:
    """Write checkpoints/last.pt: everything needed to continue after ``iteration``."""
    save_periodic_checkpoint(run_dir / "checkpoints", {
        "args": resume_flags(args),
        "iteration": iteration,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "best_score": keeper.best_score,
        "best_iteration": keeper.best_iteration,
        "bad_total": guard.total,
        "bad_consecutive": guard.consecutive,
        "log_rows": log.rows,
        "rng": rng_state(generator),
        **extra,
    })


def restore_progress(
    state: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    keeper: BestKeeper,
    guard: NonFiniteGuard,
    generator: torch.Generator,
) -> int:
    """Load a last.pt state into the run's objects; returns the next iteration to run."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    keeper.best_score, keeper.best_iteration = state["best_score"], state["best_iteration"]
    guard.total, guard.consecutive = state["bad_total"], state["bad_consecutive"]
    restore_rng_state(state["rng"], generator)
    return int(state["iteration"]) + 1


class NonFiniteGuard:
    """Counts skipped non-finite steps; too many in a row stop the run."""

    def __init__(self, max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        self.total = 0
        self.consecutive = 0

    def ok(self, loss: torch.Tensor, iteration: int) -> bool:
        if torch.isfinite(loss).item():
            self.consecutive = 0
            return True
        self.total += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise TrainingStopped(
                f"{self.consecutive} consecutive non-finite losses up to iteration {iteration}; "
                "stopping (the best checkpoint so far is kept). Lower --lr_seg or check the data."
            )
        return False


def run_main(main: Callable[[], None]) -> None:
    """Run a script's main: the project's own errors end with one line on stderr and exit
    status 2; any other exception (a programming error) propagates with its traceback."""
    try:
        main()
    except RunFinished as done:
        print(str(done), flush=True)
        print(f"run directory: {done.run_dir}", flush=True)
        sys.exit(0)
    except (ConfigError, DataError, DiskFullError, RunDirError, TrainingStopped) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)

