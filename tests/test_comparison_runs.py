"""Short real runs of the comparison methods on the demo data (train_model/self_training.py,
mean_teacher.py, bcp.py): each writes the outputs contract (config.yaml, log.csv,
checkpoints/best.pt and last.pt, test_results/summary.json) that scripts/aggregate_runs.py and
scripts/predict.py read, and each, killed with SIGKILL after a periodic checkpoint and resumed,
ends bit for bit (on the CPU) as the uninterrupted run, its EMA teacher included."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
COMMON = ["--dataset", "demo", "--no_of_tr_imgs", "tr1", "--comb_tr_imgs", "c1", "--ver", "7",
          "--no_progress"]
# Small batches and few iterations; every method checkpoints inside its run.
# Eight iterations each (last 7), checkpoints every 3 and at the end of a round / stage.
METHODS = {
    "self_training": ["--n_rounds", "2", "--n_iter_per_round", "4", "--ckpt_every", "3"],
    "mean_teacher": ["--n_iter", "8", "--ckpt_every", "3", "--labeled_bs", "4",
                     "--unlabeled_bs", "4", "--consistency_start", "1",
                     "--consistency_rampup", "6"],
    "bcp": ["--pre_iter", "3", "--n_iter", "5", "--ckpt_every", "3", "--labeled_bs", "4",
            "--unlabeled_bs", "4"],
}
LAST = 7


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=900)


def _run_dir(proc: subprocess.CompletedProcess) -> Path:
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip().splitlines()[-1].removeprefix("run directory: "))


@pytest.fixture(scope="module")
def baseline(demo_env, tmp_path_factory) -> Path:
    """A 36-iteration baseline at --lr_seg 0.01 (at the default rate it would barely move
    from its start, and its pseudo-labels would hold no structure)."""
    out = tmp_path_factory.mktemp("cmp_base")
    return _run_dir(_run([sys.executable, "train_model/tr_baseline.py", *COMMON, "--n_iter", "36",
                          "--lr_seg", "0.01", "--ckpt_every", "100", "--out_dir", str(out)],
                         demo_env))


def _cmd(method: str, out: Path, baseline: Path | None) -> list[str]:
    extra = ["--pretr_dir", str(baseline)] if method == "self_training" else []
    return [sys.executable, f"train_model/{method}.py", *COMMON, *METHODS[method], *extra,
            "--out_dir", str(out)]


class WholeRuns(dict):
    """method -> (output root, run directory) of its uninterrupted run, run when first asked
    for (so that a selection of the tests runs only its methods)."""

    def __init__(self, demo_env, tmp_path_factory, baseline_of) -> None:
        super().__init__()
        self.env, self.tmp, self.baseline_of = demo_env, tmp_path_factory, baseline_of

    def __missing__(self, method: str) -> tuple[Path, Path]:
        out = self.tmp.mktemp(f"whole_{method}")
        self[method] = out, _run_dir(_run(_cmd(method, out, self.baseline_of(method)), self.env))
        return self[method]


@pytest.fixture(scope="module")
def whole(demo_env, tmp_path_factory, request) -> WholeRuns:
    return WholeRuns(demo_env, tmp_path_factory,
                     lambda m: request.getfixturevalue("baseline") if m == "self_training"
                     else None)


@pytest.mark.parametrize("method", list(METHODS))
def test_a_method_run_writes_the_outputs_contract(method, whole, load_script):
    root, run_dir = whole[method]
    assert run_dir == root / "demo" / method / "tr1_c1_v7"
    summary = json.loads((run_dir / "test_results" / "summary.json").read_text())
    assert set(summary["per_structure"]) == {"rv", "myo", "lv"}
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert last["iteration"] == LAST
    assert (run_dir / "log.csv").read_text().strip().splitlines()[-1].startswith(f"{LAST},")
    if method != "self_training":  # the EMA teacher travels with every periodic checkpoint
        teacher = last["companions"]["teacher"]
        assert teacher.keys() == last["model"].keys()
        weights = [k for k, v in last["model"].items() if v.is_floating_point()
                   and "running" not in k]
        assert any(not torch.equal(teacher[k], last["model"][k]) for k in weights)
        # an average of the student's recent weights: near them (a teacher left at its own
        # start, e.g. not given stage 1's best, would be as far as another random network)
        gap = sum((teacher[k] - last["model"][k]).norm() ** 2 for k in weights) ** 0.5
        assert gap / sum(last["model"][k].norm() ** 2 for k in weights) ** 0.5 < 0.3
    if method == "bcp":
        assert best["stage"] == 2  # stage 2's own best, as BCP's
    aggregate = load_script("aggregate_runs")
    assert aggregate.read_run(run_dir / "config.yaml").method == method
    predict = load_script("predict")
    model, _ = predict.load_network(run_dir, "best", 4, method, torch.device("cpu"))
    assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 4, 64, 64)


def test_mean_teacher_at_decay_0_is_the_student(demo_env, tmp_path):
    """With --ema_decay 0 each EMA update copies the student: a teacher left out of the loop
    (or trained by its own gradients) would differ."""
    cmd = [sys.executable, "train_model/mean_teacher.py", *COMMON, "--n_iter", "2",
           "--labeled_bs", "2", "--unlabeled_bs", "2", "--ema_decay", "0",
           "--out_dir", str(tmp_path)]
    last = torch.load(_run_dir(_run(cmd, demo_env)) / "checkpoints" / "last.pt",
                      weights_only=True)
    for key, value in last["model"].items():
        if "num_batches" not in key and "running" not in key:  # the teacher's own statistics
            assert torch.equal(value, last["companions"]["teacher"][key]), key


# When to kill: a periodic checkpoint inside the second round (iteration 5) / inside stage 2
# (5: stage 1 is 0-2) / after the first one (mean teacher: 2 or 5).
KILL_AFTER = {"self_training": lambda s: s.get("round") == 1,
              "mean_teacher": lambda s: s["iteration"] >= 2,
              "bcp": lambda s: s["iteration"] >= 5}


@pytest.mark.parametrize("method", list(METHODS))
def test_a_killed_method_run_resumes_bit_for_bit(method, whole, demo_env, tmp_path):
    root, run_dir = whole[method]
    out = tmp_path / "killed"
    cmd = _cmd(method, out, whole.baseline_of(method))
    proc = subprocess.Popen(cmd, cwd=REPO, env={**demo_env, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = out / run_dir.relative_to(root) / "checkpoints" / "last.pt"
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if last.is_file():
            try:
                if KILL_AFTER[method](torch.load(last, weights_only=True)):
                    break
            except (EOFError, RuntimeError):  # written atomically, but be safe
                pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(last, weights_only=True)["iteration"]
    assert killed_at < LAST, "the run finished before it could be killed"
    again = _run([*cmd, "--resume"], demo_env)
    assert again.returncode == 0, again.stderr
    assert f"at iteration {killed_at + 1}" in again.stdout
    a = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["iteration"] == b["iteration"] == LAST
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for key, value in a.get("companions", {}).get("teacher", {}).items():
        assert torch.equal(value, b["companions"]["teacher"][key]), key
    sa = json.loads((run_dir / "test_results" / "summary.json").read_text())
    sb = json.loads((last.parents[1] / "test_results" / "summary.json").read_text())
    assert sa["per_subject"] == sb["per_subject"]
