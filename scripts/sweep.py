"""Run a dataset's grid of experiments (labeled-set size x combination x seed x variant x
method) through pseudo_lbl_rand_init.sh and the comparison methods' trainers, as a SLURM job
array or with local workers.

    python scripts/sweep.py --dataset acdc [--tr tr1 tr2 tr8] [--comb all | c1 c2 ...]
        [--seeds 0 1 2] [--variant NAME="--flag value ..."]...
        [--methods proposed self_training mean_teacher bcp] --backend slurm|local
        [--workers N] [--slurm "sbatch options"] [--max_running K] [--sweep_dir DIR]
        [--dry_run] [-- flags for both trainers]

``--methods`` (default ``proposed``): ``proposed`` is the pipeline script (baseline, then the
joint step); ``self_training`` runs the baseline trainer (``--resume``: the proposed line's
baseline when it has finished) and then train_model/self_training.py on it; ``mean_teacher``
and ``bcp`` run their own trainer. Flags after ``--`` go to every trainer that takes them,
``--n_iter`` (the baseline's, as in the pipeline script) to the baseline only.

The grid is every ``<tr>_<comb>`` labeled set of ``experiment_init/data_cfg_<dataset>.py`` that
has a validation list; asking for one that does not exist is an error listing those that do.
Seed S runs with ``--ver S``. A variant adds its flags and ``--tag NAME`` to the default
lines. The sweep folder (default ``<runs root>/sweeps/<dataset>_<time>``) receives:

- ``jobs.txt``: one complete shell command per line (proposed: baseline then joint step), each with
  ``--resume``, so rerunning a line, or a requeued task, continues instead of starting over;
- ``logs/<line>.log`` (output of line <line>, appended across attempts) and
  ``status/<line>.rc`` (its exit status, written when it ends);
- with ``--backend slurm``: ``sweep.sbatch``, a job array over the lines (``%K`` throttle from
  ``--max_running``, ``--requeue``; 120 s before the time limit a task requeues itself), submitted
  with ``sbatch`` (extra options from ``--slurm``); the job id is printed.

``--backend local`` runs the lines with ``--workers`` processes (default: one per visible GPU,
else 1): each worker has its own GPU (``CUDA_VISIBLE_DEVICES``, round-robin) and an equal share
of this process's CPUs as threads. It prints a line per finished run and exits 1 listing the
failed lines and their logs. ``--dry_run`` only writes the files. Preprocessing (cropped
volumes, scripts/create_cropped_imgs.py) runs once here before any job starts.
"""

from __future__ import annotations

import utils.wait_policy  # noqa: F401  (before torch: OpenMP reads it once)

import argparse
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import experiment_init
from utils.errors import ConfigError, run_main
from utils.flags import BASELINE, METHODS, for_step, route
from utils.io import write_text_atomic

REPO = Path(__file__).resolve().parents[1]

PIPELINE = REPO / "pseudo_lbl_rand_init.sh"
VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Flags the sweep sets itself on every line.
OWN_FLAGS = ("ver", "seed", "resume", "tag")
# The proposed method (pipeline script) and the comparison methods (train_model/<name>.py).
PROPOSED = "proposed"
ALL_METHODS = (PROPOSED, *METHODS)
# The comparison methods that start from the baseline of their unit.
FROM_BASELINE = ("self_training",)


def valid_grid(labeled: dict[str, list[str]],
               validation: dict[str, list[str]]) -> dict[str, list[str]]:
    """{tr: [comb, ...]} of every ``<tr>_<comb>`` key present in both split tables, in the
    order of the data_cfg file."""
    grid: dict[str, list[str]] = {}
    for key in labeled:
        match = re.fullmatch(r"(tr[^_]+)_(c[^_]+)", key)
        if match and key in validation:
            grid.setdefault(match[1], []).append(match[2])
    return grid


def describe_grid(grid: dict[str, list[str]]) -> str:
    return "; ".join(f"{tr}: {' '.join(combs)}" for tr, combs in grid.items())


def select_cells(grid: dict[str, list[str]], dataset: str, trs: Sequence[str] | None,
                 combs: Sequence[str] | None) -> list[tuple[str, str]]:
    """The requested (tr, comb) cells; ``trs``/``combs`` None (or combs ['all']) mean all.

    Raises ConfigError naming what exists when a requested tr, or a comb of one, does not.
    """
    where = f"experiment_init/data_cfg_{dataset}.py"
    trs = list(trs) if trs else list(grid)
    unknown = [tr for tr in trs if tr not in grid]
    if unknown:
        raise ConfigError(f"--tr {' '.join(unknown)}: no such labeled set with combinations in "
                          f"{where}; it has {describe_grid(grid)}")
    cells = []
    for tr in trs:
        wanted = grid[tr] if not combs or list(combs) == ["all"] else list(combs)
        missing = [c for c in wanted if c not in grid[tr]]
        if missing:
            raise ConfigError(f"--comb {' '.join(missing)} does not exist for {tr} in {where}; "
                              f"it has {describe_grid(grid)}")
        cells += [(tr, c) for c in wanted]
    return cells


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """``NAME=--flag value ...`` -> (NAME, ['--flag', 'value', ...])."""
    name, sep, flags = spec.partition("=")
    if not sep or not VARIANT_NAME.match(name):
        raise ConfigError(f"--variant {spec!r}: write NAME=\"--flag value ...\" with NAME made "
                          "of letters, digits, '_', '.', '-'")
    tokens = shlex.split(flags)
    check_free_flags(tokens, f"--variant {name}")
    return name, tokens


def flag_names(tokens: Sequence[str]) -> list[str]:
    return [t[2:].split("=", 1)[0] for t in tokens if t.startswith("--")]


def check_free_flags(tokens: Sequence[str], where: str) -> None:
    taken = [f"--{n}" for n in flag_names(tokens) if n in OWN_FLAGS]
    if taken:
        raise ConfigError(f"{where}: {' '.join(taken)} is set by the sweep (--seeds sets --ver "
                          "and the seed, --variant sets --tag, every line has --resume)")


@dataclass(frozen=True)
class Job:
    """One line of jobs.txt: one method (the proposed one: both steps) of one (tr, comb, seed,
    variant)."""

    tr: str
    comb: str
    seed: int
    variant: str | None
    command: str
    method: str = PROPOSED

    def label(self) -> str:
        where = f"{self.tr}/{self.comb} seed {self.seed} {self.variant or 'default'}"
        return where if self.method == PROPOSED else f"{where} {self.method}"


@dataclass
class SweepSpec:
    dataset: str
    cells: list[tuple[str, str]]
    seeds: list[int]
    variants: list[tuple[str, list[str]]] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=lambda: [PROPOSED])


def method_command(method: str, python: str, trainer_argv: list[str], flags: list[str],
                   lock: list[str]) -> str:
    """The shell command of a comparison method's line: its trainer with the flags it takes
    (after the baseline's trainer for a method that starts from it), ``lock`` (a flock
    prefix, or none) around each trainer that may share a run directory's baseline."""
    own = for_step(flags, method, skip=("n_iter",))
    trainer = [python, str(REPO / "train_model" / f"{method}.py"), *trainer_argv, *own]
    if method not in FROM_BASELINE:
        return shlex.join(trainer)
    baseline = [python, str(REPO / "train_model" / "tr_baseline.py"), *trainer_argv,
                *route(flags)[BASELINE]]
    return f"{shlex.join(lock + baseline)} && {shlex.join(trainer)}"


def make_jobs(spec: SweepSpec, python: str, lock_dir: Path) -> list[Job]:
    """Every line of the sweep, in order tr, comb, seed, variant (the default first), method.

    Lines of one (tr, comb, seed) share its baseline run directory unless a tag separates
    them, so with variants, or with more than one method that trains the baseline, each such
    line holds a lock of that unit (flock) while it may train the baseline.
    """
    jobs = []
    sharing = sum(m == PROPOSED or m in FROM_BASELINE for m in spec.methods)
    for tr, comb in spec.cells:
        for seed in spec.seeds:
            for name, extra in [(None, []), *spec.variants]:
                tag = [] if name is None else ["--tag", name]
                lock = []
                if spec.variants or sharing > 1:
                    lock = ["flock", str(lock_dir / f"{tr}_{comb}_v{seed}.lock")]
                for method in spec.methods:
                    if method == PROPOSED:
                        argv = [str(PIPELINE), tr, comb, spec.dataset, "--ver", str(seed),
                                "--resume", "--no_progress", *spec.flags, *extra, *tag]
                        command = (f"PYTHON={shlex.quote(python)} "
                                   f"{shlex.join([*lock, 'bash', *argv])}")
                    else:
                        trainer_argv = [f"--dataset={spec.dataset}", f"--no_of_tr_imgs={tr}",
                                        f"--comb_tr_imgs={comb}", "--ver", str(seed),
                                        "--resume", "--no_progress"]
                        command = method_command(method, python, trainer_argv,
                                                 [*spec.flags, *extra, *tag], lock)
                    jobs.append(Job(tr, comb, seed, name, command, method))
    return jobs


def sbatch_script(sweep_dir: Path, n_jobs: int, max_running: int | None, dataset: str) -> str:
    """A job array whose task i runs line i of jobs.txt and requeues itself near its limit.

    ``B:`` sends USR1 to the batch shell (without it only srun steps are signalled): the
    shell asks SLURM to requeue the task, and SLURM then ends it with SIGTERM. The line runs
    with SIGTERM ignored by its shells (and by ``tee``), so only the trainer acts on it: it
    writes last.pt and exits 75 without a second requeue. The shell waits for that, and
    writes the line's status only when the line ended by itself; the requeued task reruns the
    line, whose --resume continues from the last periodic checkpoint.
    """
    throttle = f"%{max_running}" if max_running else ""
    d = shlex.quote(str(sweep_dir))
    return f"""#!/bin/bash
#SBATCH --job-name=sweep-{dataset}
#SBATCH --array=1-{n_jobs}{throttle}
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output={sweep_dir}/logs/%a.log
# Written by scripts/sweep.py: task i runs line i of jobs.txt (lines carry --resume).
set -uo pipefail
sweep_dir={d}
task=$SLURM_ARRAY_TASK_ID
line=$(sed -n "${{task}}p" "$sweep_dir/jobs.txt")
export OMP_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-${{SLURM_CPUS_ON_NODE:-1}}}}
job=${{SLURM_ARRAY_JOB_ID}}_$task
rc_file=$sweep_dir/status/$task.rc
echo "== task $task (job $job, restart ${{SLURM_RESTART_COUNT:-0}}) on $(hostname) at $(date -Is)"
stopped=""
requeue() {{
  echo "== time limit in 120 s: requeueing $job (the line resumes)"
  scontrol requeue "$job" && stopped=requeued
}}
trap requeue USR1
trap 'stopped=${{stopped:-terminated}}' TERM
rm -f "$rc_file"
bash -c "trap '' TERM; $line" &
child=$!
wait "$child"; rc=$?
# A trapped signal ends `wait` early (status > 128) while the line still runs: wait again.
while [ "$rc" -gt 128 ] && kill -0 "$child" 2>/dev/null; do wait "$child"; rc=$?; done
if [ -n "$stopped" ]; then
  echo "== task $task $stopped; this attempt's exit status $rc at $(date -Is)"
  exit "$rc"
fi
echo "$rc" > "$rc_file.tmp" && mv "$rc_file.tmp" "$rc_file"
echo "== task $task exit status $rc at $(date -Is)"
exit "$rc"
"""


def submit(sbatch_path: Path, options: Sequence[str]) -> str:
    """sbatch the array; returns the job id."""
    cmd = ["sbatch", "--parsable", *options, str(sbatch_path)]
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    except FileNotFoundError as err:
        raise ConfigError("sbatch not found: run on a SLURM submit host (or start a local "
                          "cluster with scripts/slurm_local.sh), or use --backend local") from err
    except subprocess.CalledProcessError as err:
        raise ConfigError(f"{shlex.join(cmd)} failed: {err.stderr.strip()}") from err
    return out.strip().split(";")[0]


def visible_gpus() -> list[str]:
    """GPU ids the workers may use: $CUDA_VISIBLE_DEVICES when set, else every CUDA device."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def worker_env(slot: int, gpus: Sequence[str], threads: int) -> dict[str, str]:
    """Environment of worker ``slot``: its GPU (round-robin) and its share of CPU threads."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    return env


def run_local(jobs: Sequence[Job], sweep_dir: Path, workers: int, gpus: Sequence[str],
              cpus: int) -> list[tuple[int, Job, int]]:
    """Run the lines with ``workers`` concurrent processes; returns the failed
    (line number, job, exit status), after printing one line per finished run."""
    threads = max(1, cpus // workers)
    slots = list(range(workers))
    lock = threading.Lock()
    done = 0
    failed: list[tuple[int, Job, int]] = []

    def run(number: int, job: Job) -> None:
        nonlocal done
        with lock:
            slot = slots.pop(0)
        log = sweep_dir / "logs" / f"{number}.log"
        start = time.time()
        (sweep_dir / "status" / f"{number}.rc").unlink(missing_ok=True)
        try:
            with open(log, "a") as out:
                rc = subprocess.run(["bash", "-c", job.command], stdout=out,
                                    stderr=subprocess.STDOUT,
                                    env=worker_env(slot, gpus, threads)).returncode
            write_text_atomic(sweep_dir / "status" / f"{number}.rc", f"{rc}\n")
        finally:
            with lock:
                slots.append(slot)
        with lock:
            done += 1
            if rc != 0:
                failed.append((number, job, rc))
            state = "ok" if rc == 0 else f"FAILED (exit {rc})"
            print(f"[{done}/{len(jobs)}] {state}: line {number}, {job.label()}, "
                  f"{time.time() - start:.0f} s, log {log}", flush=True)

    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(run, i, job) for i, job in enumerate(jobs, start=1)]:
            future.result()
    return sorted(failed, key=lambda f: f[0])


def preprocess(dataset: str, data_root: str | None) -> None:
    """Cropped volumes of every training id, once, before any job could race to make them."""
    cmd = [sys.executable, str(REPO / "scripts" / "create_cropped_imgs.py"), "--dataset", dataset]
    if data_root:
        cmd += ["--data_root", data_root]
    print(f"preprocessing: {shlex.join(cmd)}", flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise ConfigError(f"preprocessing failed: {shlex.join(cmd)}")


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """The sweep's own arguments and the trainer flags after ``--``."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    own, flags = split_argv(argv)
    # argparse would read a value such as "--time=1:00:00" as an option of its own.
    for i in range(len(own) - 1):
        if own[i] == "--slurm":
            own[i:i + 2] = [f"--slurm={own[i + 1]}", ""]
    own = [a for a in own if a != ""]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                usage="%(prog)s --dataset D --backend slurm|local [options] "
                                      "[-- flags for both trainers]")
    p.add_argument("--dataset", required=True, help=experiment_init.dataset_help())
    p.add_argument("--tr", nargs="+", default=None,
                   help="labeled set sizes (default: every one with combinations)")
    p.add_argument("--comb", nargs="+", default=["all"], help="combinations, or 'all'")
    p.add_argument("--seeds", nargs="+", type=int, default=[0],
                   help="seeds; seed S runs with --ver S")
    p.add_argument("--variant", action="append", default=[], metavar='NAME="--flag value ..."',
                   help="extra lines with these flags and --tag NAME (repeatable)")
    p.add_argument("--methods", nargs="+", default=[PROPOSED], choices=ALL_METHODS,
                   help="methods of each cell: proposed (the pipeline script, default) and the "
                   "comparison methods")
    p.add_argument("--backend", required=True, choices=("slurm", "local"))
    p.add_argument("--workers", type=int, default=None,
                   help="local: concurrent runs (default: one per visible GPU, else 1)")
    p.add_argument("--slurm", default="", metavar='"sbatch options"',
                   help='slurm: options for sbatch, e.g. "--time=24:00:00 --gres=gpu:1"')
    p.add_argument("--max_running", type=int, default=None,
                   help="slurm: at most this many array tasks at once (%%K)")
    p.add_argument("--sweep_dir", type=Path, default=None,
                   help="where jobs.txt, logs/ and status/ go "
                        "(default <runs root>/sweeps/<dataset>_<time>)")
    p.add_argument("--dry_run", action="store_true", help="write the files, run nothing")
    args = p.parse_args(own)
    if args.workers is not None and args.workers < 1:
        p.error("--workers must be at least 1")
    if args.max_running is not None and args.max_running < 1:
        p.error("--max_running must be at least 1")
    return args, flags


def main(argv: Sequence[str] | None = None) -> None:
    args, flags = parse_args(sys.argv[1:] if argv is None else argv)
    check_free_flags(flags, "flags after --")
    paths = argparse.ArgumentParser(add_help=False)
    paths.add_argument("--data_root")
    paths.add_argument("--out_dir")
    where = paths.parse_known_args(flags)[0]
    cfg = experiment_init.load(args.dataset, where.data_root, where.out_dir)
    cells = select_cells(valid_grid(cfg.labeled, cfg.validation), args.dataset, args.tr,
                         args.comb)
    variants = [parse_variant(v) for v in args.variant]
    names = [n for n, _ in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"--variant names must differ: {' '.join(names)}")
    spec = SweepSpec(args.dataset, cells, list(dict.fromkeys(args.seeds)), variants, flags,
                     list(dict.fromkeys(args.methods)))

    sweep_dir = (args.sweep_dir or cfg.srt_dir / "sweeps"
                 / f"{args.dataset}_{datetime.now():%Y%m%d_%H%M%S}").resolve()
    for sub in ("logs", "status", "locks"):
        (sweep_dir / sub).mkdir(parents=True, exist_ok=True)
    jobs = make_jobs(spec, sys.executable, sweep_dir / "locks")
    write_text_atomic(sweep_dir / "jobs.txt", "".join(j.command + "\n" for j in jobs))
    for stale in (sweep_dir / "status").glob("*.rc"):  # statuses of a previous jobs.txt
        stale.unlink()
    methods = f" x {len(spec.methods)} methods" if len(spec.methods) > 1 else ""
    print(f"{len(jobs)} runs ({len(cells)} cells x {len(spec.seeds)} seeds x "
          f"{1 + len(variants)} variants{methods}): {sweep_dir / 'jobs.txt'}", flush=True)

    if args.backend == "slurm":
        script = sweep_dir / "sweep.sbatch"
        write_text_atomic(script, sbatch_script(sweep_dir, len(jobs), args.max_running,
                                                args.dataset))
        options = shlex.split(args.slurm)
        if args.dry_run:
            print(f"dry run: submit with  sbatch {shlex.join([*options, str(script)])}")
            return
        preprocess(args.dataset, where.data_root)
        job_id = submit(script, options)
        print(f"submitted job array {job_id} ({len(jobs)} tasks); logs in {sweep_dir / 'logs'}, "
              f"exit statuses in {sweep_dir / 'status'}", flush=True)
        return

    gpus = visible_gpus()
    workers = args.workers or max(1, len(gpus))
    if args.dry_run:
        print(f"dry run: would run {len(jobs)} lines with {workers} workers")
        return
    preprocess(args.dataset, where.data_root)
    failed = run_local(jobs, sweep_dir, workers, gpus, len(os.sched_getaffinity(0)))
    if failed:
        print(f"{len(failed)} of {len(jobs)} runs failed:", file=sys.stderr)
        for number, job, rc in failed:
            print(f"  line {number} ({job.label()}): exit {rc}, log "
                  f"{sweep_dir / 'logs' / f'{number}.log'}", file=sys.stderr)
        sys.exit(1)
    print(f"all {len(jobs)} runs finished; aggregate with  python scripts/aggregate_runs.py "
          f"{cfg.srt_dir}")


if __name__ == "__main__":
    run_main(main)
