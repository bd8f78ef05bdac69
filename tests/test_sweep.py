"""scripts/sweep.py: the grid, jobs.txt, the job array's requeue, the local workers, and a real
sweep on a one-node SLURM cluster (scripts/slurm_local.sh; select with ``-m slurm``)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import experiment_init
from utils.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "sweep.py"


@pytest.fixture
def sweep(load_script):
    return load_script("sweep")


def _lines(sweep_dir: Path) -> list[list[str]]:
    return [shlex.split(line) for line in (sweep_dir / "jobs.txt").read_text().splitlines()]


def test_grid_is_every_combination_with_a_validation_list(sweep):
    cfg = experiment_init.load("acdc")
    grid = sweep.valid_grid(cfg.labeled, cfg.validation)
    assert grid == {"tr1": ["c1", "c2", "c3", "c4", "c5"], "tr2": ["c1", "c2", "c3", "c4", "c5"],
                    "tr8": ["c1", "c2", "c3"]}
    assert sweep.valid_grid({"tr1_c1": ["1"], "tr1_c2": ["2"]}, {"tr1_c2": ["3"]}) == {
        "tr1": ["c2"]}
    assert sweep.select_cells(grid, "acdc", ["tr8", "tr1"], ["c3"]) == [("tr8", "c3"),
                                                                         ("tr1", "c3")]
    assert len(sweep.select_cells(grid, "acdc", None, ["all"])) == 13
    with pytest.raises(ConfigError, match="tr8: c1 c2 c3") as err:
        sweep.select_cells(grid, "acdc", ["tr1", "tr8"], ["c4"])
    assert "--comb c4 does not exist for tr8" in str(err.value)
    with pytest.raises(ConfigError, match="--tr tr52: .*tr2: c1 c2 c3 c4 c5"):
        sweep.select_cells(grid, "acdc", ["tr52"], None)


def test_jobs_txt_one_resumable_command_per_run(tmp_path, capsys, sweep):
    (tmp_path / "s" / "status").mkdir(parents=True)
    (tmp_path / "s" / "status" / "1.rc").write_text("0\n")  # of an earlier jobs.txt
    sweep.main(["--dataset", "acdc", "--tr", "tr2", "--comb", "c1", "c3", "--seeds", "0", "4",
                "--backend", "local", "--dry_run", "--sweep_dir", str(tmp_path / "s"),
                "--", "--n_iter", "20", "--device", "cpu"])
    lines = _lines(tmp_path / "s")
    assert [(a[3], a[4], a[a.index("--ver") + 1]) for a in lines] == [
        ("tr2", "c1", "0"), ("tr2", "c1", "4"), ("tr2", "c3", "0"), ("tr2", "c3", "4")]
    for argv in lines:
        assert argv[0] == f"PYTHON={sys.executable}" and argv[1] == "bash"
        assert argv[2] == str(REPO / "pseudo_lbl_rand_init.sh") and argv[5] == "acdc"
        assert "--resume" in argv and argv[-4:] == ["--n_iter", "20", "--device", "cpu"]
        assert "--tag" not in argv and "flock" not in argv  # no variants: nothing shared
    assert "4 runs (2 cells x 2 seeds x 1 variants)" in capsys.readouterr().out
    assert not list((tmp_path / "s" / "status").iterdir())


def test_variants_add_tagged_lines_that_share_a_lock_per_unit(tmp_path, sweep):
    sweep.main(["--dataset", "demo", "--tr", "tr1", "--comb", "c1", "c2", "--backend", "slurm",
                "--variant", 'mean=--loss_reduction mean', "--variant", "lam=--lamda_local 0.5",
                "--max_running", "3", "--slurm", "--time=1:00:00 --cpus-per-task=1",
                "--dry_run", "--sweep_dir", str(tmp_path / "s")])
    lines = _lines(tmp_path / "s")
    assert len(lines) == 6
    tags = [a[a.index("--tag") + 1] if "--tag" in a else None for a in lines]
    assert tags == [None, "mean", "lam"] * 2
    assert lines[1][-4:] == ["--loss_reduction", "mean", "--tag", "mean"]
    locks = [a[a.index("flock") + 1] for a in lines]
    assert len(set(locks[:3])) == 1 and len(set(locks[3:])) == 1 and locks[0] != locks[3]
    sbatch = (tmp_path / "s" / "sweep.sbatch").read_text()
    for option in ("--array=1-6%3", "--requeue", "--signal=B:USR1@120",
                   f"--output={tmp_path / 's'}/logs/%a.log"):
        assert f"#SBATCH {option}\n" in sbatch


def test_methods_add_a_line_each_sharing_the_baseline(tmp_path, capsys, sweep):
    sweep.main(["--dataset", "demo", "--tr", "tr1", "--comb", "c1", "--seeds", "0", "1",
                "--methods", "proposed", "self_training", "mean_teacher", "bcp",
                "--backend", "local", "--dry_run", "--sweep_dir", str(tmp_path / "s"), "--",
                "--n_iter", "20", "--lamda_local", "0.2", "--ema_decay", "0.9", "--crf", "0"])
    text = (tmp_path / "s" / "jobs.txt").read_text().splitlines()
    assert len(text) == 8 and "8 runs (1 cells x 2 seeds x 1 variants x 4 methods)" in \
        capsys.readouterr().out
    proposed, self_training, mean_teacher, bcp = text[:4]
    lock = str(tmp_path / "s" / "locks" / "tr1_c1_v0.lock")
    assert proposed.split()[1:4] == ["flock", lock, "bash"]  # two lines train the baseline
    baseline, trainer = self_training.split(" && ")
    assert baseline.split()[:2] == ["flock", lock]
    assert baseline.split()[3].endswith("train_model/tr_baseline.py")
    assert baseline.endswith("--resume --no_progress --n_iter 20")  # the baseline's flags
    assert trainer.split()[1].endswith("train_model/self_training.py")
    assert trainer.endswith("--ver 0 --resume --no_progress --crf 0")  # its own flags only
    for line, name in ((mean_teacher, "mean_teacher"), (bcp, "bcp")):
        argv = line.split()
        assert argv[1].endswith(f"train_model/{name}.py") and "flock" not in argv
        assert argv[-4:] == ["--resume", "--no_progress", "--ema_decay", "0.9"]
    assert "--ver 1" in text[4] and "--ver 1" in text[7]


@pytest.mark.parametrize("argv, message", [
    (["--", "--ver", "3"], "--ver is set by the sweep"),
    (["--variant", "x=--seed 2"], "--variant x: --seed is set by the sweep"),
    (["--variant", "bad name=--crf 0"], "NAME made of"),
    (["--variant", "a=--crf 0", "--variant", "a=--crf 1"], "names must differ"),
    (["--", "--resume"], "--resume is set by the sweep"),
    (["--", "--ver=3"], "--ver is set by the sweep"),
    (["--variant", "x=--tag=y"], "--variant x: --tag is set by the sweep"),
])
def test_bad_requests_are_errors(tmp_path, argv, message, sweep):
    with pytest.raises(ConfigError, match=message):
        sweep.main(["--dataset", "demo", "--backend", "local", "--dry_run", "--sweep_dir",
                    str(tmp_path), *argv])


def test_array_task_requeues_itself_on_usr1_and_keeps_the_lines_status(tmp_path, sweep):
    sweep_dir = tmp_path / "s"
    (sweep_dir / "status").mkdir(parents=True)
    (sweep_dir / "jobs.txt").write_text("exit 9\nsleep 2; echo line two; exit 3\n")
    script = sweep_dir / "sweep.sbatch"
    script.write_text(sweep.sbatch_script(sweep_dir, 2, None, "demo"))
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.txt\n')
    (fake / "scontrol").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", SLURM_ARRAY_TASK_ID="2",
               SLURM_ARRAY_JOB_ID="77")
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)
    proc.send_signal(signal.SIGUSR1)
    out = proc.communicate(timeout=30)[0]
    assert (tmp_path / "scontrol.txt").read_text() == "requeue 77_2\n"
    assert "line two" in out and "requeueing 77_2" in out
    # the line's own status, not the interrupted wait's 128 + 10; no status file, as the
    # requeued task reruns the line
    assert proc.returncode == 3 and "task 2 requeued; this attempt's exit status 3" in out
    assert not (sweep_dir / "status" / "2.rc").exists()


def test_local_workers_get_their_own_gpu_and_a_share_of_the_threads(tmp_path, sweep):
    sweep_dir = tmp_path / "s"
    for sub in ("logs", "status"):
        (sweep_dir / sub).mkdir(parents=True)
    record = tmp_path / "record"
    now = 'echo "$CUDA_VISIBLE_DEVICES $OMP_NUM_THREADS $(date +%s.%N)'
    command = (now + ' start" >> {r}; sleep 0.5; ' + now + ' end" >> {r}; '
               'echo "output of {n}"; exit {rc}')
    jobs = [sweep.Job("tr1", f"c{n}", 0, None, command.format(r=record, n=n, rc=n % 2))
            for n in range(1, 6)]
    failed = sweep.run_local(jobs, sweep_dir, workers=2, gpus=["3", "5"], cpus=7)
    assert [(number, rc) for number, _, rc in failed] == [(1, 1), (3, 1), (5, 1)]
    for n in range(1, 6):
        assert (sweep_dir / "status" / f"{n}.rc").read_text() == f"{n % 2}\n"
        assert (sweep_dir / "logs" / f"{n}.log").read_text() == f"output of {n}\n"
    events = [line.split() for line in record.read_text().splitlines()]
    assert {(gpu, threads) for gpu, threads, _, _ in events} == {("3", "3"), ("5", "3")}
    # never two runs on one GPU at once: per GPU, starts and ends alternate in time
    for gpu in ("3", "5"):
        kinds = [k for g, _, _, k in sorted(events, key=lambda e: float(e[2])) if g == gpu]
        assert kinds == ["start", "end"] * (len(kinds) // 2)


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch, sweep):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,7")
    assert sweep.visible_gpus() == ["2", "7"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert sweep.visible_gpus() == []
    assert sweep.worker_env(1, [], 4)["CUDA_VISIBLE_DEVICES"] == ""  # inherited, no GPU
    env = sweep.worker_env(3, ["2", "7"], 4)
    assert env["CUDA_VISIBLE_DEVICES"] == "7" and env["OMP_NUM_THREADS"] == "4"


def test_local_backend_preprocesses_once_and_lists_failed_runs(tmp_path, demo_env):
    """A flag the trainers reject makes every run fail fast: exit 1 with the logs listed."""
    env = dict(demo_env, CUDA_VISIBLE_DEVICES="")
    sweep_dir = tmp_path / "s"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dataset", "demo", "--tr", "tr1", "--comb", "c1", "c2",
         "--backend", "local", "--workers", "2", "--sweep_dir", str(sweep_dir), "--",
         "--lr_seg", "fast"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "preprocessing:" in proc.stdout and "subjects written to" in proc.stdout
    assert "[2/2] FAILED (exit 2): line " in proc.stdout
    for n, comb in ((1, "c1"), (2, "c2")):
        log = sweep_dir / "logs" / f"{n}.log"
        assert f"line {n} (tr1/{comb} seed 0 default): exit 2, log {log}" in proc.stderr
        assert "invalid float value: 'fast'" in log.read_text()
    cropped = experiment_init.load("demo", Path(demo_env["LCL_DATA_ROOT"]) / "demo")
    assert len(list(cropped.data_path_tr_cropped.iterdir())) == 20


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    """The one-node cluster of scripts/slurm_local.sh (started here if .ci/run did not)."""
    proc = subprocess.run(["bash", str(REPO / "scripts" / "slurm_local.sh")],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slurm
def test_sweep_on_slurm_then_aggregate(tmp_path, demo_env, slurm_cluster):
    """Two array tasks (tr1 c1, c2) with tiny schedules, polled through their status files."""
    sweep_dir = tmp_path / "sweep"
    submit = subprocess.run(
        [sys.executable, str(SCRIPT), "--dataset", "demo", "--tr", "tr1", "--comb", "c1", "c2",
         "--backend", "slurm", "--max_running", "2", "--sweep_dir", str(sweep_dir),
         "--slurm", "--cpus-per-task=1", "--", "--n_iter", "20", "--n_iter_per_round", "10",
         "--n_rounds", "1", "--device", "cpu"],
        env=demo_env, capture_output=True, text=True, timeout=300)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job_id = submit.stdout.split("submitted job array ")[1].split()[0]
    status = [sweep_dir / "status" / f"{n}.rc" for n in (1, 2)]
    deadline = time.time() + 400
    while not all(s.is_file() for s in status) and time.time() < deadline:
        time.sleep(2)
    if not all(s.is_file() for s in status):
        subprocess.run(["scancel", job_id], check=False)
    logs = "\n".join(p.read_text()[-2000:] for p in sorted((sweep_dir / "logs").glob("*.log")))
    assert all(s.is_file() for s in status), "tasks did not finish in time:\n" + logs
    assert [s.read_text() for s in status] == ["0\n", "0\n"], logs

    runs_root = Path(demo_env["LCL_RUNS_ROOT"])
    agg = subprocess.run([sys.executable, str(REPO / "scripts" / "aggregate_runs.py"),
                          str(runs_root / "demo"), "--out", str(tmp_path / "t.csv")],
                         capture_output=True, text=True, timeout=120)
    assert agg.returncode == 0, agg.stderr
    assert "| baseline | tr1 | " in agg.stdout and "| joint original | tr1 | " in agg.stdout
    assert agg.stdout.count("| 2 (2) |") == 2 and "Not in the table: none" in agg.stdout

    # a rerun of a line is cheap: both steps find their finished run and exit 0
    line = (sweep_dir / "jobs.txt").read_text().splitlines()[0]
    rerun = subprocess.run(["bash", "-c", line], env=demo_env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.count("has finished already") == 2


def _submit_one(sweep_dir: Path, seed: str, env: dict[str, str], n_iter: str) -> str:
    """Submit a one-task sweep (tr1 c1, ``--seeds seed``); returns the array task's job id."""
    submit = subprocess.run(
        [sys.executable, str(SCRIPT), "--dataset", "demo", "--tr", "tr1", "--comb", "c1",
         "--seeds", seed, "--backend", "slurm", "--sweep_dir", str(sweep_dir),
         "--slurm", "--cpus-per-task=1", "--", "--n_iter", n_iter, "--ckpt_every", "10",
         "--n_iter_per_round", "10", "--n_rounds", "1", "--device", "cpu"],
        env=env, capture_output=True, text=True, timeout=300)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    return submit.stdout.split("submitted job array ")[1].split()[0] + "_1"


def _wait_for(path: Path, timeout: float, job: str) -> None:
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline:
        time.sleep(0.5)
    if not path.exists():
        subprocess.run(["scancel", job.split("_")[0]], check=False)
        pytest.fail(f"{path} did not appear within {timeout:.0f} s")


def _state(job: str) -> str:
    """The job's state in squeue ("" when it has left the queue)."""
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                          text=True).stdout.strip()


@pytest.mark.slurm
def test_time_limit_warning_requeues_the_task_once_and_it_resumes(tmp_path, demo_env,
                                                                  slurm_cluster):
    """``scancel --batch --signal=USR1`` (what ``--signal=B:USR1@120`` sends before the time
    limit) mid-baseline: the batch shell requeues the task, SLURM's SIGTERM makes the trainer
    write last.pt and exit 75 without a second requeue, and the requeued task resumes from that
    checkpoint and finishes both steps."""
    sweep_dir = tmp_path / "sweep"
    job = _submit_one(sweep_dir, "5", demo_env, "400")
    run_dir = Path(demo_env["LCL_RUNS_ROOT"]) / "demo" / "baseline" / "tr1_c1_v5"
    _wait_for(run_dir / "checkpoints" / "last.pt", 400, job)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    deadline = time.time() + 120
    while "PENDING" not in _state(job) and time.time() < deadline:
        time.sleep(0.5)
    # SLURM holds a requeued job for about two minutes; release it now
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    status = sweep_dir / "status" / "1.rc"
    _wait_for(status, 600, job)
    log = (sweep_dir / "logs" / "1.log").read_text()
    assert status.read_text() == "0\n", log[-3000:]
    assert f"requeueing {job}" in log and "restart 1)" in log and "restart 2)" not in log
    assert "stopped by SIGTERM after iteration" in log and "task 1 requeued;" in log
    assert "not requeued after SIGTERM" in log
    stopped_at = int(log.split("stopped by SIGTERM after iteration ")[1].split(";")[0])
    assert 0 < stopped_at < 399
    assert f"resuming {run_dir} at iteration {stopped_at + 1}" in log
    assert (run_dir / "test_results" / "summary.json").is_file()
    joint = Path(demo_env["LCL_RUNS_ROOT"]) / "demo" / "joint" / "tr1_c1_v5" / "original"
    assert (joint / "test_results" / "summary.json").is_file()
    assert log.rstrip().splitlines()[-1].startswith("== task 1 exit status 0")


@pytest.mark.slurm
def test_a_cancelled_task_stays_cancelled(tmp_path, demo_env, slurm_cluster):
    """Plain ``scancel`` sends SIGTERM: the trainer writes last.pt and stops, and must not
    requeue the job the user cancelled."""
    sweep_dir = tmp_path / "sweep"
    job = _submit_one(sweep_dir, "6", demo_env, "400")
    run_dir = Path(demo_env["LCL_RUNS_ROOT"]) / "demo" / "baseline" / "tr1_c1_v6"
    _wait_for(run_dir / "checkpoints" / "last.pt", 400, job)
    subprocess.run(["scancel", job], check=True)
    deadline = time.time() + 120
    while _state(job) and time.time() < deadline:
        time.sleep(1)
    time.sleep(5)  # a requeue by the trainer would show the task pending again
    assert not _state(job)
    log = (sweep_dir / "logs" / "1.log").read_text()
    assert "not requeued after SIGTERM" in log, log[-3000:]
    assert not (sweep_dir / "status" / "1.rc").exists()
    assert not (run_dir / "test_results").exists()


# ------------------------------------------- each line's flags, and what the runs are given
def test_each_line_is_its_seed_then_the_common_flags_then_its_variant(tmp_path, sweep):
    """A repeated seed runs once; a line's flags are the sweep's own, those after --, then its
    variant's (so a variant's value wins) and its tag; the lines of one (tr, comb, seed) share
    a lock, other seeds have their own; without --sweep_dir the sweep goes under --out_dir."""
    out = tmp_path / "runs"
    sweep.main(["--dataset", "demo", "--tr", "tr1", "--comb", "c2", "--seeds", "3", "3", "5",
                "--backend", "local", "--dry_run", "--variant", "v=--lamda_local 0.5",
                "--", "--n_iter", "20", "--out_dir", str(out)])
    (sweep_dir,) = (out / "sweeps").iterdir()
    assert sweep_dir.name.startswith("demo_")
    lines = _lines(sweep_dir)
    locks = sweep_dir / "locks"
    common = ["--resume", "--no_progress", "--n_iter", "20", "--out_dir", str(out)]
    expected = []
    for seed in ("3", "5"):
        head = [f"PYTHON={sys.executable}", "flock", str(locks / f"tr1_c2_v{seed}.lock"), "bash",
                str(REPO / "pseudo_lbl_rand_init.sh"), "tr1", "c2", "demo", "--ver", seed]
        expected += [head + common, head + common + ["--lamda_local", "0.5", "--tag", "v"]]
    assert lines == expected


def test_local_backend_gives_run_local_this_process_cpus_and_a_worker_per_gpu(
        tmp_path, monkeypatch, sweep):
    calls = []
    monkeypatch.setattr(sweep.os, "sched_getaffinity", lambda pid: {0, 2, 4, 6, 8, 10})
    monkeypatch.setattr(sweep, "visible_gpus", lambda: ["4", "6", "9"])
    monkeypatch.setattr(sweep, "preprocess", lambda *a: calls.append(("preprocess", *a)))
    monkeypatch.setattr(sweep, "run_local",
                        lambda jobs, d, workers, gpus, cpus: calls.append(
                            ("run", len(jobs), workers, gpus, cpus)) or [])
    argv = ["--dataset", "demo", "--tr", "tr1", "--comb", "c1", "c3", "--backend", "local",
            "--sweep_dir", str(tmp_path / "s"), "--", "--data_root", str(tmp_path / "d")]
    sweep.main(argv)
    sweep.main(argv[:-3] + ["--workers", "2", *argv[-3:]])
    assert calls == [("preprocess", "demo", str(tmp_path / "d")), ("run", 2, 3, ["4", "6", "9"], 6),
                     ("preprocess", "demo", str(tmp_path / "d")), ("run", 2, 2, ["4", "6", "9"], 6)]


def test_local_threads_are_a_share_at_least_one_and_failures_come_in_line_order(
        tmp_path, monkeypatch, sweep):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # this process's: not the workers'
    monkeypatch.setenv("MKL_NUM_THREADS", "7")
    sweep_dir = tmp_path / "s"
    for sub in ("logs", "status"):
        (sweep_dir / sub).mkdir(parents=True)
    show = 'echo "$OMP_NUM_THREADS $MKL_NUM_THREADS"'
    jobs = [sweep.Job("tr1", "c1", 0, None, f"{show}; sleep 0.4; exit 4"),
            sweep.Job("tr1", "c2", 0, None, f"{show}; exit 5")]
    failed = sweep.run_local(jobs, sweep_dir, workers=2, gpus=[], cpus=3)
    assert [(number, job.comb, rc) for number, job, rc in failed] == [(1, "c1", 4), (2, "c2", 5)]
    for n in (1, 2):
        assert (sweep_dir / "logs" / f"{n}.log").read_text() == "1 1\n"


@pytest.mark.parametrize("cpus_per_task, threads", [("3", "3"), (None, "16")])
def test_array_task_threads_are_its_cpus_per_task(tmp_path, sweep, cpus_per_task, threads):
    sweep_dir = tmp_path / "s"
    (sweep_dir / "status").mkdir(parents=True)
    (sweep_dir / "jobs.txt").write_text('echo "threads $OMP_NUM_THREADS"\n')
    script = sweep_dir / "sweep.sbatch"
    script.write_text(sweep.sbatch_script(sweep_dir, 1, None, "demo"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    env.update(SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_JOB_ID="5", SLURM_CPUS_ON_NODE="16")
    if cpus_per_task:
        env["SLURM_CPUS_PER_TASK"] = cpus_per_task
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0 and f"threads {threads}\n" in proc.stdout


def test_slurm_backend_preprocesses_and_submits_with_the_users_options(tmp_path, monkeypatch,
                                                                        capsys, sweep):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/args\n'
                                 'echo "4242;cluster_a"\n')
    (fake / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    done = []
    monkeypatch.setattr(sweep, "preprocess", lambda *a: done.append(a))
    sweep.main(["--dataset", "demo", "--tr", "tr1", "--comb", "c1", "--backend", "slurm",
                "--slurm", "--time=1:00:00 --qos=low", "--sweep_dir", str(tmp_path / "s"),
                "--", "--data_root", str(tmp_path / "d")])
    assert done == [("demo", str(tmp_path / "d"))]
    assert (tmp_path / "args").read_text().splitlines() == [
        "--parsable", "--time=1:00:00", "--qos=low", str(tmp_path / "s" / "sweep.sbatch")]
    assert "submitted job array 4242 (1 tasks)" in capsys.readouterr().out
