"""A run's directory: where each step's run lives (`run_directory`), what a run writes there,
and the decision between resuming, starting afresh and refusing (`open_run_dir`)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from experiment_init import ExperimentConfig
from utils.errors import RunDirError, RunFinished
from utils.flags import BASELINE, BCP, JOINT, MEAN_TEACHER, RESUME_FREE_FLAGS, SELF_TRAINING
from utils.run import load_latest_checkpoint
from utils.run_lock import LOCK_NAME

# The script of each step, as config.yaml names it.
TRAINERS = {BASELINE: "tr_baseline", JOINT: "prop_method_joint_tr_rand_init",
            SELF_TRAINING: "self_training", MEAN_TEACHER: "mean_teacher", BCP: "bcp"}


def run_name(args: argparse.Namespace) -> str:
    name = f"{args.no_of_tr_imgs}_{args.comb_tr_imgs}_v{args.ver}"
    return name if args.seed is None or args.seed == args.ver else f"{name}_seed{args.seed}"


def run_directory(cfg: ExperimentConfig, args: argparse.Namespace, step: str) -> Path:
    """``<out>/<dataset>/<step>/[<tag>/]<tr>_<comb>_v<ver>[_seed<seed>]``, the joint step's in
    a sub-folder per ``--loss_reduction``."""
    path = cfg.srt_dir / cfg.dataset / step / (args.tag or "") / run_name(args)
    return path / args.loss_reduction if step == JOINT else path


# What a run writes in its directory (utils/run.py); the atomic writer's temporary files are
# these names with a leading "." and a suffix.
RUN_FILES = ("config.yaml", "log.csv", "curves.png", "tensorboard", "checkpoints",
             "test_results", "pseudo_labels", LOCK_NAME)


def holds_results(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds what a run produced: a checkpoint or test results. A start
    that failed, or was stopped before its first validation, leaves neither and is not a run."""
    return any(p.is_file() and not p.name.startswith(".")
               for sub in ("checkpoints", "test_results") for p in (run_dir / sub).rglob("*"))


def open_run_dir(run_dir: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    """Find the state to resume from, or empty the run directory (but for its lock) for a
    fresh start; the caller holds the directory's lock (`utils.run_lock.lock_run_dir`).

    Returns the last periodic checkpoint when ``--resume`` finds one (after checking that the
    flags match the interrupted run's), else None for a fresh start. Never silently replaces a
    previous run's results: a directory holding a checkpoint or test results needs --resume or
    --overwrite. One holding neither is reused, unless it holds files no run writes.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    if getattr(args, "resume", False):
        if (run_dir / "test_results" / "summary.json").is_file():
            raise RunFinished(run_dir)
        state = load_latest_checkpoint(run_dir / "checkpoints", resume_flags(args))
        if state is not None:
            return state
    elif holds_results(run_dir) and not args.overwrite:
        raise RunDirError(
            f"{run_dir}: a run with these settings exists; pass --resume to continue it, "
            "--overwrite to replace it, or change --ver"
        )
    left = sorted(e.name for e in run_dir.iterdir() if e.name != LOCK_NAME)
    if left and not args.overwrite:
        foreign = [name for name in left if name not in RUN_FILES
                   and not name.startswith(tuple(f".{known}." for known in RUN_FILES))]
        if foreign:
            raise RunDirError(f"{run_dir}: holds files no run writes ({', '.join(foreign)}); "
                              "move them away, or pass --overwrite to delete them")
        print(f"starting {run_dir} afresh: it holds no periodic checkpoint or test results, "
              f"only {', '.join(left)} of a start that stopped early", flush=True)
    for entry in left:
        path = run_dir / entry
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return None


def resume_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The flags an interrupted run is recognised by (stored in every periodic checkpoint)."""
    return {k: v for k, v in vars(args).items() if k not in RESUME_FREE_FLAGS}
