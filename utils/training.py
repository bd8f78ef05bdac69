"""The skeleton every trainer shares (the two steps' and the comparison methods'): the start
of a run (`start_run`: seed, device, input checks, run directory and its lock, resume,
config.yaml, logs, keep-best, guard) and its periodic step (`Run.train`: validate, log,
checkpoint around the method's own iteration), then
the test of the best checkpoint (`Run.finish`).

Errors end a run through `utils.errors.run_main` (one line, exit status 2; 75 after a
pre-emption); the run directory's lock is released on each of these ways out.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from experiment_init import ExperimentConfig
from utils.captured_step import NonFiniteGuard, check_step_flags
from utils.dataset import ensure_demo_data, load_eval_volumes, verify_inputs
from utils.device import (
    configure_backend,
    release_freed_memory,
    resolve_device,
    set_cpu_threads,
)
from utils.evaluation import EvalVolume, evaluate_test_set, validation_score
from utils.flags import BASELINE
from utils.mixed_precision import MixedPrecision, mixed_precision
from utils.preemption import Preempted, StopRequests
from utils.provenance import now, session
from utils.run import (
    RunLog,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
    save_config,
    save_periodic_checkpoint,
    seed_everything,
    selected_on,
)
from utils.run_dir import TRAINERS, open_run_dir, resume_flags, run_directory
from utils.run_lock import RunLock, lock_run_dir


def on_device(
    model: torch.nn.Module, device: torch.device, channels_last: bool = True
) -> torch.nn.Module:
    """``model`` on ``device``, channels-last for training. On the CPU the callers then
    install `models.cpu_training`'s forwards themselves, so that the swap is visible where
    the model is built."""
    return model.to(device, memory_format=torch.channels_last) if channels_last \
        else model.to(device)


class BestKeeper:
    """Validate in native resolution and keep the checkpoint whose mean Dice beats ``bar``
    (strictly): the best so far, unless `lower_bar` lowered the bar (the released joint
    trainer at the end of each round), after which a newer, lower-scoring checkpoint may win.

    Each validation ends by handing the memory it freed back to the OS
    (``utils.device.release_freed_memory``), so it does not stay resident under training.
    """

    def __init__(self, run_dir: Path, volumes: list[EvalVolume], num_classes: int,
                 device: torch.device) -> None:
        self.path = run_dir / "checkpoints" / "best.pt"
        self.volumes = volumes
        self.num_classes = num_classes
        self.device = device
        self.best_score = -1.0  # the validation Dice of best.pt
        self.best_iteration = -1
        self.bar = -1.0  # what a validation must beat to become best.pt
        # What best.pt holds, copied: each periodic checkpoint carries it, so that a resumed
        # run can put back the best.pt of its checkpoint's iteration (a killed run may have
        # written a later one before its next periodic checkpoint).
        self.best_state: dict[str, Any] | None = None

    def update(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, iteration: int,
               extra: dict[str, Any] | None = None) -> float:
        score = validation_score(model, self.volumes, self.num_classes, self.device)
        if score > self.bar:
            self.bar = self.best_score = score
            self.best_iteration = iteration
            self.best_state = copy.deepcopy({
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "iteration": iteration,
                "val_dice": score,
                **(extra or {}),
            })
            save_checkpoint(self.path, self.best_state)
        release_freed_memory()
        return score

    def lower_bar(self, score: float) -> None:
        """From now on a validation beating ``score`` replaces best.pt (the released joint
        trainer set its bar to each round's last validation Dice)."""
        self.bar = score

    def restore(self, best_state: dict[str, Any] | None) -> None:
        """Rewrite best.pt as it was when the periodic checkpoint being resumed was written
        (``best_state``; None: no best yet, and any best.pt is from after it)."""
        self.best_state = best_state
        if best_state is not None:
            save_checkpoint(self.path, best_state)
        elif self.path.exists():
            self.path.unlink()


class Run:
    """One training run after its start (`start_run`): where it writes, what it resumes from,
    and the objects of its periodic step.

    Attributes: ``args`` (resolved flags), ``cfg``, ``device``, ``generator`` (the CPU
    generator of every augmentation and sampling draw), ``run_dir``, ``ids`` (labeled_ids,
    val_ids, [pool_ids,] test_ids), ``state`` (the interrupted run's last.pt, or None),
    ``start_iteration`` (the first iteration to run, set by `resume`), ``keeper``, ``guard``,
    ``log``, ``record`` (what config.yaml holds), ``stop`` (SIGTERM/SIGUSR1 received, from
    here until `finish`), ``lock`` (the run directory's, held until `close`), ``precision``
    (--amp: the forward's autocast and the update step).

    Used as a context manager (``with start_run(...) as run:``), it closes on every way out:
    the end, an error, a pre-emption, Ctrl-C.
    """

    def __init__(self, args: argparse.Namespace, cfg: ExperimentConfig, device: torch.device,
                 generator: torch.Generator, run_dir: Path, ids: dict[str, list[str]],
                 state: dict[str, Any] | None, record: dict[str, Any], lock: RunLock,
                 precision: MixedPrecision | None = None) -> None:
        self.args, self.cfg, self.device, self.generator = args, cfg, device, generator
        self.precision = precision or MixedPrecision(device.type, None)
        self.run_dir, self.ids, self.state, self.record = run_dir, ids, state, record
        self.lock = lock
        self.start_iteration = 0
        self.saved_iteration = -1  # the iteration checkpoints/last.pt holds
        self.companions: dict[str, torch.nn.Module] = {}  # see `resume`
        self.started = time.time()
        self.keeper = BestKeeper(run_dir, load_eval_volumes(cfg, ids["val_ids"]),
                                 cfg.num_classes, device)
        self.guard = NonFiniteGuard(args.max_bad_steps)
        self.log = RunLog(run_dir, rows=state["log_rows"] if state else None)
        self.stop = StopRequests()
        self.stop.install()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Put back the signal handlers and release the run directory's lock."""
        self.stop.restore()
        self.lock.release()

    def resume(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               **companions: torch.nn.Module) -> int:
        """Load an interrupted run's last.pt into ``model``, ``optimizer``, the keeper, the
        guard and every random state; returns the first iteration to run (0 when fresh).

        ``companions``: networks trained beside ``model`` but not by the optimizer (a mean
        teacher), by name; from here on each periodic checkpoint holds their state_dicts under
        ``companions`` and a resume loads them back."""
        self.companions = companions
        if self.state is None:
            return self.start_iteration
        s = self.state
        model.load_state_dict(s["model"])
        for name, module in companions.items():
            module.load_state_dict(s["companions"][name])
        optimizer.load_state_dict(s["optimizer"])
        self.keeper.best_score, self.keeper.best_iteration = s["best_score"], s["best_iteration"]
        self.keeper.bar = s["best_bar"]
        self.keeper.restore(s["best"])
        self.guard.total, self.guard.consecutive = s["bad_total"], s["bad_consecutive"]
        restore_rng_state(s["rng"], self.generator)
        self.precision.load_state_dict(s["grad_scaler"])
        self.saved_iteration = int(s["iteration"])
        self.start_iteration = self.saved_iteration + 1
        print(f"resuming {self.run_dir} at iteration {self.start_iteration}", flush=True)
        return self.start_iteration

    def train(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        iterations: range,
        step: Callable[[int], torch.Tensor | tuple[torch.Tensor, ...]],
        desc: str,
        names: tuple[str, ...] = ("loss",),
        best_extra: dict[str, Any] | None = None,
        progress_extra: dict[str, Any] | None = None,
        lower_bar_at_end: bool = False,
    ) -> None:
        """Run ``step(it)``, one iteration of the method returning its losses (a scalar tensor
        or a tuple of them, logged under ``names``), for
        each of ``iterations`` not run yet, each followed by the periodic step: every
        ``val_step_update`` iterations of ``iterations`` and at its end, validate, keep the
        best (its checkpoint gets ``best_extra``) and log the losses; every ``--ckpt_every``
        iterations and at the end, write checkpoints/last.pt (with ``progress_extra``). A stop
        signal is acted on before each iteration (`stop_if_requested`). ``lower_bar_at_end``:
        the last validation's Dice becomes the bar of the next best (`BestKeeper.lower_bar`),
        before last.pt records it."""
        begin = max(iterations.start, self.start_iteration)
        bar = tqdm(range(begin, iterations.stop), desc=desc, disable=self.args.no_progress,
                   dynamic_ncols=True, initial=begin - iterations.start, total=len(iterations))
        for it in bar:
            self.stop_if_requested(it - 1, model, optimizer, progress_extra)
            out = step(it)
            losses = dict(zip(names, out if isinstance(out, tuple) else (out,), strict=True))
            last = it == iterations.stop - 1
            if (it - iterations.start) % self.cfg.val_step_update == 0 or last:
                self.guard.settle()
                val = self.keeper.update(model, optimizer, it, best_extra)
                if last and lower_bar_at_end:
                    self.keeper.lower_bar(val)
                losses = {k: v.item() for k, v in losses.items()}  # synchronises a GPU
                self.log.log(it, **losses, val_dice=val, bad_steps=self.guard.total)
                self.log.flush()
                bar.set_postfix({**{k: f"{v:.3f}" for k, v in losses.items()},
                                 "val": f"{val:.3f}", "best": f"{self.keeper.best_score:.3f}"})
            if (it + 1) % self.args.ckpt_every == 0 or last:
                self.save_progress(it, model, optimizer, progress_extra)

    def save_progress(self, iteration: int, model: torch.nn.Module,
                      optimizer: torch.optim.Optimizer,
                      extra: dict[str, Any] | None = None) -> None:
        """Write checkpoints/last.pt: everything needed to continue after ``iteration``."""
        self.guard.settle()
        save_periodic_checkpoint(self.run_dir / "checkpoints", {
            "args": resume_flags(self.args),
            "iteration": iteration,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "best_score": self.keeper.best_score,
            "best_iteration": self.keeper.best_iteration,
            "best_bar": self.keeper.bar,
            "best": self.keeper.best_state,
            "bad_total": self.guard.total,
            "bad_consecutive": self.guard.consecutive,
            "log_rows": self.log.rows,
            "rng": rng_state(self.generator),
            "grad_scaler": self.precision.state_dict(),
            **({"companions": {name: m.state_dict() for name, m in self.companions.items()}}
               if self.companions else {}),
            **(extra or {}),
        })
        self.saved_iteration = iteration

    def stop_if_requested(self, done: int, model: torch.nn.Module | None = None,
                          optimizer: torch.optim.Optimizer | None = None,
                          extra: dict[str, Any] | None = None) -> None:
        """At an iteration boundary (``done``: the last iteration run): if SIGTERM or SIGUSR1
        has come, write checkpoints/last.pt unless it holds ``done`` already, flush the log
        and raise `Preempted`."""
        if self.stop.received is None:
            return
        if done > self.saved_iteration:
            self.save_progress(done, model, optimizer, extra)
        self.log.flush()
        raise Preempted(self.run_dir, done, self.stop.received)

    def finish(self, model: torch.nn.Module) -> dict:
        """Close the logs, test the best checkpoint, record the end time in config.yaml, print
        the results; the last line printed is ``run directory: <path>`` (the outputs
        contract)."""
        self.stop_if_requested(self.saved_iteration)
        self.log.close()
        print(f"best validation Dice {self.keeper.best_score:.4f} at iteration "
              f"{self.keeper.best_iteration}; {self.guard.total} non-finite steps skipped",
              flush=True)
        best = load_checkpoint(self.keeper.path, self.device)
        model.load_state_dict(best["model"])
        summary = evaluate_test_set(model, load_eval_volumes(self.cfg, self.cfg.test),
                                    self.cfg.num_classes, self.cfg.struct_name,
                                    self.run_dir / "test_results", self.device,
                                    not self.args.no_progress, selected_on(best))
        self.record["provenance"]["ended"] = now()
        save_config(self.run_dir, self.record)
        parts = [f"{k} {v['dice']:.3f}" for k, v in summary["per_structure"].items()]
        print(f"test: mean Dice {summary['mean_dice']:.4f} ({', '.join(parts)})", flush=True)
        print(f"elapsed: {time.time() - self.started:.1f} s", flush=True)
        print(f"run directory: {self.run_dir}", flush=True)
        self.stop.restore()
        return summary


def start_run(
    args: argparse.Namespace, cfg: ExperimentConfig, step: str, plan: str, **recorded: Any
) -> Run:
    """The start every trainer shares, after its flags are parsed (`utils.flags.parse_flags`).

    Seeds every random source, picks the device, checks every input volume, takes the run
    directory's lock and opens the directory (or finds the interrupted run's state for
    --resume), writes config.yaml (resolved flags, the ``recorded`` extras among them, the
    configuration, the ids and the provenance; a resumed run adds its own provenance under
    ``provenance.resumed``), prints the run's first line (``<step> <dataset> <tr>/<comb>:
    labeled [...], <plan> on <device>``) and loads the validation volumes. Training starts
    after `Run.resume`; the caller closes the run (``with``), which releases the lock.
    """
    ids = {"labeled_ids": cfg.labeled_ids(args.no_of_tr_imgs, args.comb_tr_imgs),
           "val_ids": cfg.val_ids(args.no_of_tr_imgs, args.comb_tr_imgs)}
    if step != BASELINE:  # every other step learns from the unlabeled pool
        ids["pool_ids"] = cfg.unlabeled_ids()
    ids["test_ids"] = cfg.test
    seed = args.seed if args.seed is not None else args.ver
    device = resolve_device(args.device)
    precision = mixed_precision(args.amp, device)
    if getattr(args, "cuda_graph", 0) or getattr(args, "compile", 0):
        check_step_flags(device, args.amp, bool(args.cuda_graph), bool(args.compile))
    configure_backend(device, args.low_memory)
    threads, threads_from = set_cpu_threads(args.threads)
    generator = seed_everything(seed)
    # The inputs are checked before the run directory is made or touched: a start refused for
    # its data leaves nothing in the way of the corrected command.
    ensure_demo_data(cfg)
    verify_inputs(cfg, ids["labeled_ids"], ids["val_ids"] + cfg.test, ids.get("pool_ids", []))
    run_dir = run_directory(cfg, args, step)
    lock = lock_run_dir(run_dir, args.force_unlock)
    try:
        state = open_run_dir(run_dir, args)
        if state is None:
            flags = {**vars(args), "seed": seed, "device": str(device), "threads": threads,
                     **recorded}
            record = {"trainer": TRAINERS[step], "flags": flags, "config": cfg.to_dict(), **ids,
                      "provenance": {**session(device), "ended": None}}
        else:
            written = run_dir / "config.yaml"
            record = yaml.safe_load(written.read_text()) if written.is_file() else {}
            record.setdefault("provenance", {"ended": None}).setdefault("resumed", []).append(
                session(device))
        save_config(run_dir, record)
        print(f"{step} {cfg.dataset} {args.no_of_tr_imgs}/{args.comb_tr_imgs}: labeled "
              f"{ids['labeled_ids']}, {plan} on {device} ({threads} CPU threads: "
              f"{threads_from}{'' if args.amp == 'off' else '; --amp ' + args.amp})", flush=True)
        return Run(args, cfg, device, generator, run_dir, ids, state, record, lock, precision)
    except BaseException:
        lock.release()
        raise
