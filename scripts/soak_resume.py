"""Kill a short joint training with SIGKILL at random moments, resume it each time, and check
that it ends exactly as an uninterrupted run does (on the CPU: bit-identical).

    python scripts/soak_resume.py --dataset demo --kills 20 [--seed 0] [--work_dir DIR] \\
        [--out soak.json]

Trains a tiny baseline once, then the joint step on it without interruption (the reference),
then the same joint run again: each of its processes is killed at a moment drawn uniformly
over the reference's duration (seeded by --seed) and the run resumed with --resume, until a
process finishes. A run that finishes before all kills are spent is compared and the next one
starts in a fresh directory; one that was never killed replaces the reference's duration (the
machine's load may have changed). Every process runs on one CPU thread.

Each kill is reported with the phase it hit: start-up, pseudo-labelling, training step,
validation, log writing, checkpoint writing or test evaluation. The phase is inferred when the
process is frozen (SIGSTOP) just before the SIGKILL, from what it printed (progress bars and
round lines) and the files of its run directory it had open; between a training step and the
validation after it, from the time since the iteration began (longer than any plain step of
the reference: validation). Compared with the reference, exactly: the model tensors of
checkpoints/best.pt and checkpoints/last.pt, test_results/summary.json and log.csv. Exit
status 1 on any difference or failed process.
"""

from __future__ import annotations

import utils.wait_policy  # noqa: F401  (before torch: OpenMP reads it once)

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from experiment_init import load
from utils.io import write_text_atomic

REPO = Path(__file__).resolve().parents[1]

# One thread: the same arithmetic in every process, so that resumed runs can be bit-identical.
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# A tqdm bar as the trainers print it: "joint round 2:  30%|███    | 3/10 [00:05<...]".
BAR = re.compile(r"^(joint round (?P<round>\d+)|pseudo-labels|test): +\d+%\|[^|]*\| *"
                 r"(?P<n>\d+)/(?P<total>\d+)")
PHASES = ("start-up", "pseudo-labelling", "training step", "validation", "log writing",
          "checkpoint writing", "test evaluation", "shut-down")


@dataclass
class Schedule:
    """The joint run's settings that the phase inference needs."""

    n_rounds: int
    n_iter: int  # per round
    ckpt_every: int
    val_every: int  # val_step_update of the dataset's init file

    def validates(self, n: int) -> bool:
        """Whether the round's iteration ``n`` (0-based) is followed by a validation."""
        return n % self.val_every == 0 or n == self.n_iter - 1

    def checkpoints(self, it: int) -> bool:
        return (it + 1) % self.ckpt_every == 0 or (it + 1) % self.n_iter == 0


@dataclass
class Process:
    """A trainer process whose stdout and stderr are read as they come: ``pieces`` holds
    (seconds since the start, text) for each line or carriage-return-ended piece of both."""

    cmd: list[str]
    env: dict[str, str]
    pieces: list[tuple[float, str]] = field(default_factory=list)

    def start(self) -> None:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self.readers = [threading.Thread(target=self._read, args=(s,), daemon=True)
                        for s in (self.proc.stdout, self.proc.stderr)]
        for reader in self.readers:
            reader.start()

    def _read(self, stream) -> None:
        partial = ""
        for chunk in iter(lambda: os.read(stream.fileno(), 65536), b""):
            parts = re.split(r"[\r\n]", partial + chunk.decode(errors="replace"))
            partial = parts.pop()
            now = time.monotonic() - self.started
            self.pieces.extend((now, p) for p in parts if p.strip())
        if partial.strip():
            self.pieces.append((time.monotonic() - self.started, partial))

    def text(self) -> str:
        return "\n".join(p for _, p in self.pieces)

    def finish(self) -> int:
        self.proc.wait()
        self.seconds = time.monotonic() - self.started
        for reader in self.readers:
            reader.join()
        return self.proc.returncode


def open_files(pid: int, run_dir: Path) -> list[Path]:
    """The files of ``run_dir`` that process ``pid`` has open (relative paths; Linux /proc)."""
    found = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for fd in fds:
        try:
            target = Path(os.readlink(f"/proc/{pid}/fd/{fd}").removesuffix(" (deleted)"))
        except OSError:
            continue
        if target.is_relative_to(run_dir):
            found.append(target.relative_to(run_dir))
    return found


def phase(pieces: list[tuple[float, str]], now: float, files: list[Path], schedule: Schedule,
          step_seconds: float) -> tuple[str, str]:
    """(phase, detail) of a process frozen ``now`` seconds after its start, from its output
    ``pieces`` and its open run-directory ``files`` (see the module's docstring)."""
    for f in files:
        # The atomic writer's temporary name: ".<name>.<random>.tmp<suffixes>".
        temporary = f.name.startswith(".") and ".tmp" in f.name
        written = f.name[1:].split(".tmp")[0].rsplit(".", 1)[0]
        if temporary and f.parts[0] == "checkpoints":
            return "checkpoint writing", str(f.parent / written)
        if temporary and written in ("log.csv", "curves.png"):
            return "log writing", written
        if f.parts[0] == "test_results":
            return "test evaluation", str(f)
    lines = [p for _, p in pieces]
    if any(p.startswith("run directory: ") for p in lines):
        return "shut-down", "after the last line"
    if any(p.startswith("best validation Dice") for p in lines):
        return "test evaluation", ""
    bars = [(t, m) for t, p in pieces if (m := BAR.match(p))]
    if not bars:
        return "start-up", ""
    t, bar = bars[-1]
    n, total = int(bar["n"]), int(bar["total"])
    if bar["round"] is None:  # the pseudo-labels bar; the test bar comes after "best ..."
        return "pseudo-labelling", f"volume {min(n + 1, total)}/{total}"
    rnd = int(bar["round"])
    if n == total:  # the round is done: the next one restores the best checkpoint and labels
        if rnd == schedule.n_rounds:
            return "log writing", "the run's last log"
        return "pseudo-labelling", f"before round {rnd + 1}"
    it = (rnd - 1) * schedule.n_iter + n
    where = f"round {rnd}, iteration {it}"
    same = [m for _, m in bars if m["round"] == bar["round"] and int(m["n"]) == n]
    if len(same) > 1:  # the bar's refresh after this iteration's validation and log
        return ("checkpoint writing" if schedule.checkpoints(it) else "training step"), where
    if schedule.validates(n) and now - t > step_seconds:
        return "validation", where
    return "training step", where


def step_seconds(pieces: list[tuple[float, str]], schedule: Schedule) -> float:
    """The longest plain training step of a run (one neither validated nor checkpointed), from
    the times its progress bars moved on."""
    bars = [(t, int(m["round"]), int(m["n"])) for t, p in pieces
            if (m := BAR.match(p)) and m["round"]]
    steps = [t2 - t1 for (t1, r1, n1), (t2, r2, n2) in zip(bars, bars[1:])
             if r1 == r2 and n2 == n1 + 1 and not schedule.validates(n1)
             and not schedule.checkpoints((r1 - 1) * schedule.n_iter + n1)]
    return max(steps) if steps else float("inf")


def run_dir_of(process: Process) -> Path:
    found = [p for _, p in process.pieces if p.startswith("run directory: ")]
    if not found:
        raise SystemExit(f"error: {' '.join(process.cmd)} failed:\n{process.text()[-3000:]}")
    return Path(found[-1].removeprefix("run directory: "))


def differences(reference: Path, run: Path) -> list[str]:
    """What differs between two finished runs: the model tensors of best.pt and last.pt,
    summary.json and log.csv (each exactly)."""
    found = []
    for name in ("checkpoints/best.pt", "checkpoints/last.pt"):
        a = torch.load(reference / name, weights_only=True)["model"]
        b = torch.load(run / name, weights_only=True)["model"]
        if a.keys() != b.keys():
            found.append(f"{name}: other tensors")
            continue
        changed = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
        if changed:
            found.append(f"{name}: {len(changed)} of {len(a)} model tensors differ "
                         f"({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''})")
    for name in ("test_results/summary.json", "log.csv"):
        if (reference / name).read_bytes() != (run / name).read_bytes():
            found.append(f"{name} differs")
    return found


def kill_until_done(joint: list[str], run_dir: Path, env: dict[str, str],
                    moment: Callable[[], float], kills: int, schedule: Schedule,
                    slowest_step: float, name: str) -> tuple[Path, list[dict], float]:
    """Run the joint command ``joint``, whose run directory is ``run_dir``, killing each of
    its first ``kills`` processes ``moment()`` seconds after its start (if it still runs) and
    resuming, until a process finishes. Returns the run directory it printed and each kill:
    the process (1, 2, ...), its moment, the phase it hit, and what the next process said on
    resuming; and the seconds the last process ran. ``name`` begins each kill's line."""
    hits: list[dict] = []
    while True:
        process = Process([*joint, "--resume" if hits else "--overwrite"], env)
        seconds = moment() if len(hits) < kills else None
        process.start()
        try:
            process.proc.wait(timeout=seconds)
            killed = False
        except subprocess.TimeoutExpired:
            os.killpg(process.proc.pid, signal.SIGSTOP)
            time.sleep(0.1)  # what the process wrote to its pipes is read meanwhile
            files = open_files(process.proc.pid, run_dir)
            hit, detail = phase(list(process.pieces), seconds, files, schedule, slowest_step)
            os.killpg(process.proc.pid, signal.SIGKILL)
            killed = True
        rc = process.finish()
        if hits and hits[-1]["resume"] is None:  # how this process went on after the kill
            hits[-1]["resume"] = [p for _, p in process.pieces if p.startswith(
                ("resuming from ", "skipping ", "starting ", "warning: "))]
        if killed and rc == -signal.SIGKILL:
            hits.append({"process": len(hits) + 1, "seconds": seconds, "phase": hit,
                         "detail": detail, "resume": None})
            print(f"{name}, process {len(hits)}: killed {seconds:.1f} s after its start: {hit}"
                  + (f" ({detail})" if detail else ""), flush=True)
            continue
        if rc != 0:
            raise SystemExit(f"error: {' '.join(process.cmd)} exited {rc}:\n"
                             f"{process.text()[-3000:]}")
        return run_dir_of(process), hits, process.seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="demo")
    p.add_argument("--kills", type=int, required=True, help="SIGKILLs to survive")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--work_dir", type=Path, default=None,
                   help="where the runs go (default: a new temporary folder, kept)")
    p.add_argument("--out", type=Path, default=None, help="JSON result file")
    p.add_argument("--data_root", default=None, help="the trainers' --data_root")
    p.add_argument("--baseline_n_iter", type=int, default=36)
    p.add_argument("--n_rounds", type=int, default=2)
    p.add_argument("--n_iter_per_round", type=int, default=10)
    p.add_argument("--ckpt_every", type=int, default=3)
    args = p.parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="soak_resume_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"working in {work}", flush=True)
    env = {**os.environ, **THREADS}
    # PyTorch's batch-norm statistics and independent kernels: with the original's, runs this
    # short leave round 2 a labeller that predicts no structure.
    common = ["--dataset", args.dataset, "--no_of_tr_imgs", "tr1", "--comb_tr_imgs", "c1",
              "--device", "cpu", "--bn_stats", "torch", "--init", "independent",
              *(["--data_root", args.data_root] if args.data_root else [])]
    schedule = Schedule(args.n_rounds, args.n_iter_per_round, args.ckpt_every,
                        load(args.dataset, args.data_root).val_step_update)

    base = Process([sys.executable, "train_model/tr_baseline.py", *common, "--no_progress",
                    "--n_iter", str(args.baseline_n_iter), "--out_dir", str(work / "baseline"),
                    "--overwrite"], env)
    base.start()
    base.finish()
    joint = [sys.executable, "train_model/prop_method_joint_tr_rand_init.py", *common,
             "--pretr_dir", str(run_dir_of(base)), "--n_rounds", str(args.n_rounds),
             "--n_iter_per_round", str(args.n_iter_per_round), "--ckpt_every",
             str(args.ckpt_every)]
    reference = Process([*joint, "--out_dir", str(work / "reference"), "--overwrite"], env)
    reference.start()
    reference.finish()
    ref_dir = run_dir_of(reference)
    duration = reference.seconds
    slowest_step = step_seconds(reference.pieces, schedule)
    print(f"reference: {ref_dir} in {duration:.1f} s (plain steps up to {slowest_step:.2f} s); "
          f"killing at moments uniform in [0, {duration:.1f}) s, seed {args.seed}", flush=True)

    rng = random.Random(args.seed)
    kills: list[dict] = []
    runs: list[dict] = []
    while len(kills) < args.kills:
        out = work / f"run{len(runs) + 1}"
        run_dir, hits, seconds = kill_until_done(
            [*joint, "--out_dir", str(out)], out / ref_dir.relative_to(work / "reference"), env,
            lambda limit=duration: rng.uniform(0, limit), args.kills - len(kills), schedule,
            slowest_step, f"run {len(runs) + 1}")
        if not hits:  # an uninterrupted run again: its duration is the newer measure
            duration = seconds
        for hit in hits:
            kills.append({"run": len(runs) + 1, **hit})
        found = differences(ref_dir, run_dir)
        runs.append({"run_dir": str(run_dir), "kills": len(hits), "differences": found})
        print(f"run {len(runs)}: {len(hits)} kills, " + ("; ".join(found) if found else
              "final weights, summary.json and log.csv identical to the reference"), flush=True)

    count = Counter(k["phase"] for k in kills)
    phases = ", ".join(f"{name} {count[name]}" for name in PHASES if count[name])
    same = not any(r["differences"] for r in runs)
    line = (f"{len(kills)} kills survived (phases: {phases}), final weights and summary.json "
            "identical" if same else
            f"MISMATCH after {len(kills)} kills (phases: {phases}): "
            + "; ".join(d for r in runs for d in r["differences"]))
    print(line, flush=True)
    if args.out:
        write_text_atomic(args.out, json.dumps({
            "identical": same, "summary": line, "kills": kills, "runs": runs,
            "reference": {"run_dir": str(ref_dir), "seconds": duration,
                          "slowest_plain_step_seconds": slowest_step},
            "settings": {k: str(v) if isinstance(v, Path) else v
                         for k, v in vars(args).items()}}, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
