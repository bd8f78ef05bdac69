"""The self-training schedule of the joint step (METHOD §7): each round labels the unlabeled
pool with the best network so far, trains on the labels, and keeps the best checkpoint.

Round 1 labels with the baseline network; each later round first restores the best checkpoint
(weights and optimizer; which one is best, `--best_selection`, is `utils.training.BestKeeper`'s)
and labels with it. A run resumed inside a round trains on the pseudo-labels its periodic
checkpoint holds.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from experiment_init import ExperimentConfig
from models import cpu_training
from models.unet import UNet
from utils.crf import CRFParams
from utils.device import available_cpus, release_freed_memory
from utils.errors import RunDirError
from utils.figures import write_pseudo_label_figure
from utils.flags import BASELINE
from utils.pseudo_labels import SURE_SOFTMAX, PseudoLabelRound, make_pseudo_labels
from utils.run import load_checkpoint
from utils.run_dir import run_directory
from utils.training import Run, on_device

# A pool of volumes: id -> (images (Z, 1, H, W) cropped slices, ground truth (Z, H, W) or None).
Pool = dict[str, tuple[torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True)
class Labelling:
    """How the pool is pseudo-labelled (the joint step's --crf, --test_aug_overlap,
    --test_f1_threshold, --crf_workers and the dataset's CRF parameters)."""

    crf: CRFParams
    use_crf: bool = True
    test_aug_overlap: bool = False
    overlap_threshold: float = 0.9
    crf_workers: int = 1


def labelling_from_flags(args: argparse.Namespace, cfg: ExperimentConfig) -> Labelling:
    """The `Labelling` of a rounds trainer's flags and its dataset's CRF parameters (checked by
    `utils.flags.parse_flags`), made once the run has set its CPU threads. Default: as many CRF
    processes as the run's CPU threads, so that the sweep's workers, each given a share of the
    CPUs, keep to their share."""
    workers = min(args.crf_workers or torch.get_num_threads(), available_cpus())
    return Labelling(CRFParams(**cfg.crf_params), bool(args.crf), bool(args.test_aug_overlap),
                     args.test_f1_threshold, workers)


def find_baseline(cfg: ExperimentConfig, args: argparse.Namespace) -> Path:
    """The best checkpoint of the baseline a rounds trainer starts from: ``--pretr_dir``'s, else
    that of the baseline run of the same dataset/tag/tr/comb/ver/seed."""
    base = Path(args.pretr_dir) if args.pretr_dir else run_directory(cfg, args, BASELINE)
    path = base / "checkpoints" / "best.pt"
    if not path.is_file():
        raise RunDirError(
            f"{path}: baseline checkpoint not found; run train_model/tr_baseline.py with the same "
            f"--dataset {cfg.dataset} --no_of_tr_imgs {args.no_of_tr_imgs} --comb_tr_imgs "
            f"{args.comb_tr_imgs} --ver {args.ver} first, or pass --pretr_dir"
        )
    return path


@dataclass(frozen=True)
class Round:
    """One self-training round as the method trains it: ``index`` (0-based), its pseudo-labels,
    its ``iterations`` (global iteration numbers) and what its periodic checkpoints hold
    besides the run's state (the round and its pseudo-labels, for a resume inside it)."""

    index: int
    pseudo: PseudoLabelRound
    iterations: range
    checkpoint: dict[str, Any]


def self_training_rounds(
    run: Run,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    baseline: dict[str, torch.Tensor],
    pool: Pool,
    labelling: Labelling,
    n_rounds: int,
    n_iter: int,
) -> Iterator[Round]:
    """The rounds of the run not finished yet, each labelled and ready to train: the caller
    trains each round's iterations (the method's own loop, whose periodic step keeps the best
    checkpoint) before asking for the next, which labels with that best checkpoint.

    ``baseline``: the state_dict of the baseline U-Net, round 1's labeller; ``n_iter``
    iterations per round.
    """
    for index in range(n_rounds):
        iterations = range(index * n_iter, (index + 1) * n_iter)
        if iterations.stop <= run.start_iteration:
            continue  # finished before the interruption
        pseudo = resumed_pseudo_labels(run.state, index, pool)
        if pseudo is None:
            run.stop_if_requested(iterations.start - 1)  # last.pt holds it: labelling is redone
            network = baseline_network(baseline, run) if index == 0 else \
                restore_best(run, model, optimizer)
            pseudo = label_pool(network, pool, labelling, run)
            write_round_figure(run, index, pseudo, pool)
            pseudo = replace(pseudo, before_crf=None)  # only the figure needs it
        if iterations.start >= run.start_iteration:
            log_quality(run, index, pseudo, iterations.start)
        release_freed_memory()  # of the pseudo-labelling, before training grows the heap
        yield Round(index, pseudo, iterations, {"round": index, "pseudo": as_data(pseudo)})


def baseline_network(baseline: dict[str, torch.Tensor], run: Run) -> torch.nn.Module:
    """The baseline U-Net with its weights, on the run's device."""
    network = on_device(UNet(run.cfg.num_classes), run.device, channels_last=False)
    if run.device.type == "cpu":  # same function, less memory and time
        cpu_training.install(network)
    network.load_state_dict(baseline)
    return network


def restore_best(run: Run, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer) -> torch.nn.Module:
    """Load the best checkpoint so far (weights and optimizer) into the run's own; returns
    ``model``."""
    best = load_checkpoint(run.keeper.path, run.device)
    model.load_state_dict(best["model"])
    optimizer.load_state_dict(best["optimizer"])
    return model


def label_pool(network: torch.nn.Module, pool: Pool, labelling: Labelling,
               run: Run) -> PseudoLabelRound:
    return make_pseudo_labels(network, pool, run.cfg.num_classes, labelling.crf, run.device,
                              run.generator, labelling.test_aug_overlap,
                              labelling.overlap_threshold, progress=not run.args.no_progress,
                              use_crf=labelling.use_crf, crf_workers=labelling.crf_workers)


def as_data(pseudo: PseudoLabelRound) -> dict[str, Any]:
    """Pseudo-labels as plain data for a checkpoint, without their images (the pool has
    them)."""
    kept = {f.name: getattr(pseudo, f.name) for f in fields(pseudo) if f.name != "images"}
    kept["labels"] = pseudo.labels.cpu()
    return kept


def resumed_pseudo_labels(state: dict[str, Any] | None, index: int,
                          pool: Pool) -> PseudoLabelRound | None:
    """The pseudo-labels of round ``index`` held by an interrupted run's last.pt, if it was
    interrupted inside that round; else None."""
    if state is None or state["round"] != index:
        return None
    return PseudoLabelRound(images=torch.cat([pool[sid][0] for sid in state["pseudo"]["kept"]]),
                            **state["pseudo"])


def write_round_figure(run: Run, index: int, pseudo: PseudoLabelRound, pool: Pool) -> None:
    """``pseudo_labels/round<k>.png`` in the run directory: a few pool slices with the
    pseudo-labels before and after the CRF and the pool's ground truth where it has one."""
    truths = [pool[sid][1] for sid in pseudo.kept]
    gt = None if any(t is None for t in truths) else torch.cat(truths).numpy()
    names = [f"{sid} slice {z}" for sid in pseudo.kept for z in range(pool[sid][0].shape[0])]
    title = f"round {index + 1}: pseudo-labels of {len(pseudo.kept)} pool volumes"
    if pseudo.dice_before_crf is not None:
        title += (f"\nmean foreground Dice vs ground truth {pseudo.dice_before_crf:.3f} before "
                  f"the CRF, {pseudo.dice_after_crf:.3f} after")
    after = pseudo.labels.numpy()
    before = after if pseudo.before_crf is None else pseudo.before_crf.numpy()
    if pseudo.before_crf is None:
        title += " (--crf 0: no CRF)"
    write_pseudo_label_figure(run.run_dir / "pseudo_labels" / f"round{index + 1}.png", title,
                              pseudo.images[:, 0].numpy(), before, after, gt,
                              run.cfg.struct_name, names)


def log_quality(run: Run, index: int, pseudo: PseudoLabelRound, iteration: int) -> None:
    """One log row at the round's first iteration: the round, the volumes kept and the
    pseudo-labels' quality where the pool has ground truth."""
    quality = {} if pseudo.dice_before_crf is None else {
        "pseudo_dice_before_crf": pseudo.dice_before_crf,
        "pseudo_dice_after_crf": pseudo.dice_after_crf}
    if pseudo.unsure_foreground is not None:
        quality["pseudo_unsure_foreground"] = pseudo.unsure_foreground
    run.log.log(iteration, round=index + 1, pseudo_kept=len(pseudo.kept), **quality)


def describe(rnd: Round, n_rounds: int, trained_on: str, use_crf: bool) -> str:
    """The line printed at a round's start: its pseudo-labels, what the method trains on
    (``trained_on``) and their quality."""
    pseudo = rnd.pseudo
    msg = (f"round {rnd.index + 1}/{n_rounds}: pseudo-labels for {len(pseudo.kept)} volumes "
           f"({len(pseudo.dropped)} dropped), {trained_on}")
    if pseudo.unsure_foreground is not None:
        msg += (f"; {pseudo.unsure_foreground:.1%} of predicted foreground pixels have max "
                f"softmax < {SURE_SOFTMAX}")
    if pseudo.dice_before_crf is not None:
        msg += (f"; pseudo-label Dice vs ground truth {pseudo.dice_before_crf:.4f} before CRF, "
                f"{pseudo.dice_after_crf:.4f} after" + ("" if use_crf else " (--crf 0)"))
    return msg
