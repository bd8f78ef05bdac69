"""Trainer pieces: non-finite step guard, run-directory rules, segmentation-loss choice."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import experiment_init
from losses.cross_entropy import weighted_cross_entropy_loss
from losses.dice import soft_dice_loss
from losses.segmentation_loss import segmentation_loss
from utils.captured_step import NonFiniteGuard
from utils.device import resolve_device
from utils.errors import ConfigError, DataError, RunDirError, RunFinished, TrainingStopped, run_main
from utils.flags import BASELINE, add_flags, parse_flags, resolve_flags
from utils.preemption import Preempted
from utils.pseudo_labels import PseudoLabelRound
from utils.run_dir import open_run_dir
from utils.training import BestKeeper

REPO = Path(__file__).resolve().parents[1]


def test_guard_skips_and_counts_then_stops():
    guard = NonFiniteGuard(max_consecutive=3)
    assert guard.ok(torch.tensor(1.0), 0)
    assert not guard.ok(torch.tensor(math.nan), 1)
    assert not guard.ok(torch.tensor(math.inf), 2)
    assert guard.ok(torch.tensor(0.5), 3)  # a finite step resets the streak, not the total
    assert guard.total == 2 and guard.consecutive == 0
    assert not guard.ok(torch.tensor(math.nan), 4)
    assert not guard.ok(torch.tensor(math.nan), 5)
    with pytest.raises(TrainingStopped, match="3 consecutive non-finite losses up to "
                       "iteration 6.*best checkpoint"):
        guard.ok(torch.tensor(-math.inf), 6)


def test_guard_counts_a_later_loss_at_the_next_call_or_when_settled():
    guard = NonFiniteGuard(max_consecutive=3)
    guard.later(torch.tensor(math.nan), 0)
    assert guard.total == 0  # not read yet: the GPU may still be computing it
    guard.later(torch.tensor(1.0), 1)
    assert guard.total == 1 and guard.consecutive == 1
    guard.settle()
    assert guard.total == 1 and guard.consecutive == 0
    guard.later(torch.tensor(math.nan), 2)
    assert guard.ok(torch.tensor(math.inf), 3) is False and guard.total == 3
    guard.later(torch.tensor(math.nan), 4)
    with pytest.raises(TrainingStopped, match="3 consecutive non-finite losses up to "
                       "iteration 4"):
        guard.settle()
    guard.settle()  # nothing is counted twice
    assert guard.total == 4


def _args(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    return parser.parse_args(list(flags))


def test_run_directory_is_never_silently_replaced(tmp_path, capsys):
    run = tmp_path / "run"
    assert open_run_dir(run, _args()) is None and run.is_dir()
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "best.pt").write_text("x")
    with pytest.raises(RunDirError, match="--resume to continue it, --overwrite to replace it"):
        open_run_dir(run, _args())
    (run / "run.lock").write_text("{}")  # the caller's lock stays
    assert open_run_dir(run, _args("--overwrite")) is None
    assert [p.name for p in run.iterdir()] == ["run.lock"]
    (run / "config.yaml").write_text("x")  # killed before the first checkpoint: starts afresh
    assert open_run_dir(run, _args("--resume")) is None
    assert not (run / "config.yaml").exists()
    (run / "test_results").mkdir()
    (run / "test_results" / "summary.json").write_text("{}")
    with pytest.raises(RunFinished):
        open_run_dir(run, _args("--resume"))
    with pytest.raises(RunDirError, match="a run with these settings exists"):
        open_run_dir(run, _args())


def test_a_directory_without_checkpoint_or_results_is_not_a_run(tmp_path, capsys):
    """What a start that failed, or was killed before its first validation, leaves is reused
    by a new start; files that no run writes are not deleted without --overwrite."""
    run = tmp_path / "run"
    # pseudo_labels/: the round figure, written before the round's first checkpoint
    for name in ("config.yaml", "log.csv", ".config.yaml.x1.tmp.yaml", "tensorboard/ev",
                 "pseudo_labels/round1.png"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / ".best.pt.x2.tmp.pt").write_text("torn")  # never renamed
    assert open_run_dir(run, _args()) is None
    assert list(run.iterdir()) == []
    assert f"starting {run} afresh: it holds no periodic checkpoint or test results, only " \
        ".config.yaml.x1.tmp.yaml, checkpoints, config.yaml, log.csv, pseudo_labels, " \
        "tensorboard" in \
        capsys.readouterr().out
    (run / "config.yaml").write_text("x")
    (run / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match=r"holds files no run writes \(notes.txt\); move them"):
        open_run_dir(run, _args())
    assert (run / "notes.txt").is_file() and (run / "config.yaml").is_file()


def test_flags_not_given_take_the_init_file_settings():
    cfg = experiment_init.load("demo")
    cfg = type(cfg)(**{**cfg.__dict__, "lr": 0.25, "batch_size_ft": 6})
    args = resolve_flags(_args(), cfg, lr_seg="lr", n_iter="n_iter")
    assert args.lr_seg == 0.25 and args.n_iter == cfg.n_iter
    args = resolve_flags(_args("--lr_seg", "0.5", "--n_iter", "0"), cfg, lr_seg="lr",
                         n_iter="n_iter")
    assert args.lr_seg == 0.5 and args.n_iter == 0  # a flag given, even 0, wins
    assert _args().lr_seg is None  # the parser itself has no second default


TINY_SPLITS = """
labeled = {"tr1_c1": ["001"], "pool": ["001", "002"]}
validation = {"tr1_c1": ["002"]}
test = ["003"]
unlabeled_pool = "pool"
upper_bound = "pool"
"""


def _trainer(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "train_model" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_dataset(edited_config, tmp_path, monkeypatch, **edits: str) -> list[str]:
    """A 'tiny' dataset (3 generated patients of 32 x 32, one baseline iteration) with the init
    file ``edits``; returns the trainers' common flags for it."""
    folder = edited_config("tiny", n_iter="n_iter = 1", img_size_x="img_size_x = 32",
                           img_size_y="img_size_y = 32", batch_size="batch_size = 2",
                           demo_n_patients="demo_n_patients = 3", **edits)
    (folder / "data_cfg_tiny.py").write_text(TINY_SPLITS)
    monkeypatch.setattr(experiment_init, "CONFIG_DIR", folder)
    return ["--dataset", "tiny", "--no_of_tr_imgs", "tr1", "--comb_tr_imgs", "c1",
            "--data_root", str(tmp_path / "data"), "--out_dir", str(tmp_path / "runs"),
            "--device", "cpu", "--no_progress"]


def test_an_edited_init_file_reaches_the_run(edited_config, tmp_path, monkeypatch):
    """lr edited in the init file is the optimizer's rate and config.yaml's lr_seg; --lr_seg
    overrides it (both trainers resolve through resolve_flags; the joint one is checked through
    batch_size_ft, which reaches --bt_size's check)."""
    common = [*_tiny_dataset(edited_config, tmp_path, monkeypatch, lr="lr = 0.0005",
                             batch_size_ft="batch_size_ft = 3"), "--low_memory"]
    baseline = _trainer("tr_baseline")
    for extra, lr in (([], 0.0005), (["--lr_seg", "0.002", "--ver", "1"], 0.002)):
        baseline.main([*common, *extra])
        run = tmp_path / "runs" / "tiny" / "baseline" / f"tr1_c1_v{len(extra) // 3}"
        flags = yaml.safe_load((run / "config.yaml").read_text())["flags"]
        assert flags["lr_seg"] == lr and flags["n_iter"] == 1
        best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
        assert best["optimizer"]["param_groups"][0]["lr"] == lr
    joint = _trainer("prop_method_joint_tr_rand_init")
    with pytest.raises(ConfigError, match=r"init_tiny.py: batch_size_ft = 3 \(the default of "
                       r"--bt_size\) must be an even number"):
        joint.main(common)
    # --cuda_graph 1 off a GPU is refused before the joint run's directory is made.
    made = sorted((tmp_path / "runs").rglob("*"))
    with pytest.raises(ConfigError, match="--cuda_graph 1 needs a CUDA GPU"):
        joint.main([*common, "--bt_size", "2", "--cuda_graph", "1"])
    assert sorted((tmp_path / "runs").rglob("*")) == made


def _skipping_stepper(sigterm_after: int | None = None):
    """Stands in for ``baseline_stepper``: steps that report a non-finite loss through
    ``guard.later``, as a captured step does, and send SIGTERM to this process after
    iteration ``sigterm_after``."""
    def stepper(*args, **kwargs):
        guard = args[8]  # the run's NonFiniteGuard

        def step(it: int) -> torch.Tensor:
            loss = torch.tensor(math.nan)
            guard.later(loss, it)
            if it == sigterm_after:
                os.kill(os.getpid(), signal.SIGTERM)
            return loss

        return step

    return stepper


def test_losses_counted_later_are_settled_before_the_log_and_the_checkpoint(
        edited_config, tmp_path, monkeypatch):
    """A step that skips itself on the device (--cuda_graph 1) is counted by the guard one
    step later; the run settles the count before it logs or checkpoints, so the last
    iteration's non-finite loss is in log.csv and last.pt."""
    common = [*_tiny_dataset(edited_config, tmp_path, monkeypatch), "--n_iter", "3",
              "--max_bad_steps", "9"]
    baseline = _trainer("tr_baseline")
    run = tmp_path / "runs" / "tiny" / "baseline" / "tr1_c1_v0"
    # Stopped by SIGTERM after iteration 1, which is not validated: last.pt counts it.
    monkeypatch.setattr(baseline, "baseline_stepper", _skipping_stepper(sigterm_after=1))
    with pytest.raises(Preempted):
        baseline.main(common)
    stopped = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert stopped["iteration"] == 1 and stopped["bad_total"] == 2
    monkeypatch.setattr(baseline, "baseline_stepper", _skipping_stepper())
    baseline.main([*common, "--resume"])
    rows = (run / "log.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert float(rows[-1].split(",")[header.index("bad_steps")]) == 3
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert last["bad_total"] == 3 and last["bad_consecutive"] == 3


def _marker(model: torch.nn.Module) -> torch.Tensor:
    """The first batch norm's num_batches_tracked: a buffer no forward reads (momentum is
    set), which the stand-in steps below set to 1000 + iteration to tag the weights."""
    return next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)) \
        .num_batches_tracked


# Scripted validation Dice of the weights of iterations 0..5 (3 rounds of 2): round 1's best
# is iteration 0 and ends lower; iterations 2 and 4 beat their round's start bar only.
SCORES = [0.7, 0.5, 0.6, 0.4, 0.45, 0.1]


@pytest.mark.parametrize(("selection", "labellers", "tested"),
                         [("original", [1000, 1002], 1004), ("overall", [1000, 1000], 1000)])
def test_best_selection_decides_each_rounds_labeller_and_the_tested_model(
        edited_config, tmp_path, monkeypatch, selection, labellers, tested):
    """--best_selection original (the released code): at each round's end the bar drops to
    its last validation Dice, so round 3 labels with round 2's iteration 2 and the newest
    checkpoint that beat a bar (iteration 4) is tested; overall: iteration 0 throughout. The
    original's bar is kept across a SIGTERM at round 2's end and --resume."""
    from utils import self_training, training

    common = [*_tiny_dataset(edited_config, tmp_path, monkeypatch,
                             val_step_update="val_step_update = 1")]
    _trainer("tr_baseline").main(common)
    joint = _trainer("prop_method_joint_tr_rand_init")
    seen = []

    def label_pool(network, pool, labelling, run):  # the pool's ground truth, as labels
        seen.append(int(_marker(network)))
        return _gt_labeller(network, pool, labelling, run)

    def stepper(model, *args, **kwargs):
        def step(it: int) -> tuple[torch.Tensor, ...]:
            _marker(model).fill_(1000 + it)
            if it == 3 and selection == "original" and not seen[-1:] == ["resumed"]:
                os.kill(os.getpid(), signal.SIGTERM)
            return torch.zeros(()), torch.zeros(()), torch.zeros(())
        return step

    monkeypatch.setattr(self_training, "label_pool", label_pool)
    monkeypatch.setattr(joint, "joint_stepper", stepper)
    monkeypatch.setattr(training, "validation_score",
                        lambda model, *a, **k: SCORES[int(_marker(model)) - 1000])
    flags = [*common, "--bt_size", "2", "--n_rounds", "3", "--n_iter_per_round", "2", "--crf", "0",
             "--best_selection", selection]
    if selection == "original":
        with pytest.raises(Preempted):
            joint.main(flags)
        seen.append("resumed")
        flags.append("--resume")
    joint.main(flags)
    assert [x for x in seen[1:] if x != "resumed"] == labellers  # rounds 2 and 3
    run = next((tmp_path / "runs" / "tiny" / "joint").rglob("best.pt"))
    best = torch.load(run, weights_only=False)
    assert int(_marker_of(best["model"])) == tested
    assert best["val_dice"] == SCORES[tested - 1000]


def _gt_labeller(network, pool, labelling, run) -> PseudoLabelRound:
    """A stand-in for `self_training.label_pool`: the pool's ground truth, as labels."""
    return PseudoLabelRound(torch.cat([v[0] for v in pool.values()]),
                            torch.cat([v[1] for v in pool.values()]), list(pool))


def _both_steps_untrained(common: list[str], monkeypatch, on_baseline, on_joint) -> None:
    """Both trainers on the tiny dataset with stand-in steps (zero losses, no update) and the
    pool's ground truth as pseudo-labels; ``on_baseline(model)`` and ``on_joint(model)`` see
    each step's network when its stepper is built."""
    from utils import self_training

    baseline, joint = _trainer("tr_baseline"), _trainer("prop_method_joint_tr_rand_init")

    def baseline_stepper(model, *args, **kwargs):
        on_baseline(model)
        return lambda it: torch.zeros(())

    def joint_stepper(model, *args, **kwargs):
        on_joint(model)
        return lambda it: (torch.zeros(()), torch.zeros(()), torch.zeros(()))

    monkeypatch.setattr(self_training, "label_pool", _gt_labeller)
    monkeypatch.setattr(baseline, "baseline_stepper", baseline_stepper)
    monkeypatch.setattr(joint, "joint_stepper", joint_stepper)
    baseline.main(common)
    joint.main([*common, "--bt_size", "2", "--n_rounds", "1", "--n_iter_per_round", "1",
                "--crf", "0"])


@pytest.mark.parametrize("bn_stats", [None, "torch"])
def test_batch_norm_statistics_start_and_move_as_the_released_code(edited_config, tmp_path,
                                                                  monkeypatch, bn_stats):
    """Default (the released TF code): running statistics start at zero in both steps, and
    the joint encoder, decoder and projection head (the layers its loop's first graph run
    passed through) move as two updates per step, the segmentation head's as one. --bn_stats
    torch: PyTorch's start (variance 1) and one update everywhere."""
    common = _tiny_dataset(edited_config, tmp_path, monkeypatch)
    common += ["--bn_stats", bn_stats] if bn_stats else []
    seen = {}

    def record(step: str, model: torch.nn.Module) -> None:
        for part in ("encoder", "decoder", "proj_head", "seg_head"):
            if hasattr(model, part):
                bns = [m for m in getattr(model, part).modules()
                       if isinstance(m, torch.nn.BatchNorm2d)]
                seen[step, part] = ({round(m.momentum, 6) for m in bns},
                                    {float(v) for m in bns for v in m.running_var.unique()})

    _both_steps_untrained(common, monkeypatch, lambda m: record("baseline", m),
                          lambda m: record("joint", m))
    start = {0.0} if bn_stats is None else {1.0}
    twice = 0.0199 if bn_stats is None else 0.01
    assert seen == {("baseline", "encoder"): ({0.01}, start),
                    ("baseline", "decoder"): ({0.01}, start),
                    ("baseline", "seg_head"): ({0.01}, start),
                    ("joint", "encoder"): ({twice}, start),
                    ("joint", "decoder"): ({twice}, start),
                    ("joint", "proj_head"): ({twice}, start),
                    ("joint", "seg_head"): ({0.01}, start)}


@pytest.mark.parametrize("init", [None, "independent"])
def test_init_flag_decides_how_both_trainers_start_their_kernels(edited_config, tmp_path,
                                                                 monkeypatch, init):
    """Default (the released code): kernels of one shape start equal, in the baseline and in
    the joint step's fresh heads; --init independent: each its own draw."""
    common = _tiny_dataset(edited_config, tmp_path, monkeypatch)
    common += ["--init", init] if init else []
    equal = {}

    def baseline_kernels(model: torch.nn.Module) -> None:
        levels = model.encoder.levels
        equal["encoder"] = torch.equal(levels[4][1][0].weight, levels[5][0][0].weight)

    def joint_kernels(model: torch.nn.Module) -> None:
        net = model.proj_head.net
        equal["proj_head"] = torch.equal(net[0].weight, net[3].weight)

    _both_steps_untrained(common, monkeypatch, baseline_kernels, joint_kernels)
    assert equal == {"encoder": init is None, "proj_head": init is None}


def _marker_of(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return next(v for k, v in state.items() if k.endswith("num_batches_tracked"))


def test_a_failed_start_leaves_nothing_in_the_way(edited_config, tmp_path, monkeypatch):
    """A start refused for a flag or a data file makes no run directory, so the corrected
    command runs; a directory such a start left (config.yaml only) is not a run either."""
    common = _tiny_dataset(edited_config, tmp_path, monkeypatch)
    baseline = _trainer("tr_baseline")
    run = tmp_path / "runs" / "tiny" / "baseline" / "tr1_c1_v0"
    with pytest.raises(ConfigError, match=r"^--lr_seg=-1.0: must be a positive number$"):
        baseline.main([*common, "--lr_seg", "-1"])
    with pytest.raises(ConfigError, match="init_tiny.py: n_iter = 0 .the default of --n_iter. "
                       "must be at least 1"):
        edited_config("tiny", n_iter="n_iter = 0")
        baseline.main(common)
    edited_config("tiny", n_iter="n_iter = 1")
    assert not (tmp_path / "runs").exists()

    baseline.main(common)  # generates the data; then a dataset of its own that is not regenerated
    edited_config("tiny", demo_n_patients="", demo_seed="")
    label = next((tmp_path / "data" / "raw" / "patient003").glob("*_gt.nii.gz"))
    label.rename(label.with_name("moved"))
    with pytest.raises(DataError, match=f"{label}: id 003: label file not found; the lists test "
                                        "need it"):
        baseline.main([*common, "--ver", "1"])
    assert not run.with_name("tr1_c1_v1").exists()
    label.with_name("moved").rename(label)
    baseline.main([*common, "--ver", "1"])
    assert (run.with_name("tr1_c1_v1") / "test_results" / "summary.json").is_file()

    # What such a start used to leave behind (before the checks came first) is reused.
    run.with_name("tr1_c1_v2").mkdir()
    (run.with_name("tr1_c1_v2") / "config.yaml").write_text("flags: {lr_seg: -1}\n")
    baseline.main([*common, "--ver", "2"])
    assert (run.with_name("tr1_c1_v2") / "test_results" / "summary.json").is_file()


def test_the_lock_is_released_on_every_way_out(edited_config, tmp_path, monkeypatch):
    common = _tiny_dataset(edited_config, tmp_path, monkeypatch)
    baseline = _trainer("tr_baseline")
    lock = tmp_path / "runs" / "tiny" / "baseline" / "tr1_c1_v0" / "run.lock"
    baseline.main(common)
    assert lock.parent.is_dir() and not lock.exists()
    with pytest.raises(RunDirError, match="a run with these settings exists"):
        baseline.main(common)
    assert not lock.exists()
    with pytest.raises(RunFinished):
        baseline.main([*common, "--resume"])
    assert not lock.exists()
    for stop in (KeyboardInterrupt(), TrainingStopped("diverged"),
                 Preempted(lock.parent, 0, "SIGTERM")):
        def validate(*args, stop=stop):
            assert lock.exists()  # held while the run runs
            raise stop

        monkeypatch.setattr(BestKeeper, "update", validate)
        with pytest.raises(type(stop)):
            baseline.main([*common, "--overwrite"])
        assert not lock.exists(), stop


@pytest.mark.parametrize("error", [ConfigError("--x=1 is bad"), DataError("a.nii: unreadable"),
                                   RunDirError("run: exists"), TrainingStopped("diverged")])
def test_run_main_reports_the_projects_errors_in_one_line(error, capsys):
    def main() -> None:
        raise error

    with pytest.raises(SystemExit) as stop:
        run_main(main)
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"error: {error}\n"


@pytest.mark.parametrize("error", [ValueError("bug"), FileNotFoundError("bug"),
                                   FloatingPointError("bug"), KeyError("bug")])
def test_run_main_lets_programming_errors_keep_their_traceback(error):
    def main() -> None:
        raise error

    with pytest.raises(type(error)):
        run_main(main)


def test_user_errors_of_flags_are_project_errors():
    with pytest.raises(ConfigError, match="--device='gpu': choose auto, cpu or cuda"):
        resolve_device("gpu")
    with pytest.raises(SystemExit) as stop:  # argparse's own one-line usage error
        _args("--ckpt_every", "0")
    assert stop.value.code == 2


def test_segmentation_loss_choice():
    logits = torch.randn(2, 4, 8, 8)
    y = torch.nn.functional.one_hot(torch.randint(0, 4, (2, 8, 8)), 4).permute(0, 3, 1, 2).float()
    assert segmentation_loss(2, 4)(logits, y) == soft_dice_loss(logits, y)
    assert segmentation_loss(1, 4)(logits, y) == soft_dice_loss(logits, y, include_background=False)
    assert segmentation_loss(0, 4)(logits, y) == weighted_cross_entropy_loss(
        logits, y, torch.tensor([0.1, 0.3, 0.3, 0.3]))


def _run_probe(source: str, *argv: str) -> str:
    """stdout of ``python -c source argv...`` in a fresh process (its own allocator state),
    with the repository importable."""
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-c", source, *argv], cwd=root, check=True,
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)}).stdout


ALLOC_PROBE = """
import resource, sys, torch
from utils.device import configure_backend
configure_backend(torch.device("cpu"), low_memory=sys.argv[1] == "low_memory")
faults = []
sizes = (10_000_000, 12_000_000, 9_000_000, 16_000_000)  # floats: 36-64 MB, as activations
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    kept = [torch.empty(n).fill_(1.0) for n in sizes]
    del kept
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[1:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator settings")
def test_configure_backend_keeps_freed_tensor_memory() -> None:
    """After configure_backend(cpu), repeating a step's large allocations mostly reuses memory
    the process already holds; with low_memory (glibc's default) every one is a fresh mmap
    whose pages fault again (~46,000 4 KiB pages per repetition here)."""

    def faults(mode: str) -> int:
        return int(_run_probe(ALLOC_PROBE, mode).strip())

    default = faults("low_memory")
    assert default > 4 * 40_000  # the probe really allocates fresh pages each time
    assert faults("tuned") < default / 2


TRIM_PROBE = """
import torch
from utils.device import configure_backend, release_freed_memory
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 1e6
configure_backend(torch.device("cpu"))
kept = [torch.empty(n).fill_(1.0) for n in (20_000_000, 30_000_000, 25_000_000)]  # 300 MB
small = torch.ones(1000)  # allocated after them, as the pools and logs of a run
del kept
before = rss_mb()
release_freed_memory()
print(before, rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator")
def test_release_freed_memory_returns_kept_pages() -> None:
    """Memory configure_backend keeps after a phase stays resident until
    release_freed_memory hands its pages back."""
    before, after = map(float, _run_probe(TRIM_PROBE).split())
    assert before - after > 250, (before, after)


@pytest.mark.parametrize("tag", ["", " ", "a/b", "a\\b", "..", "."])
def test_a_tag_that_is_not_one_directory_name_is_a_config_error(tag, tmp_path):
    with pytest.raises(ConfigError, match="--tag=.*names one directory"):
        parse_flags(BASELINE, ["--dataset", "demo", "--tag", tag, "--out_dir", str(tmp_path)])


def test_a_tagged_variant_has_its_own_directories_and_baseline(edited_config, tmp_path,
                                                               monkeypatch):
    """--tag puts both steps under <step>/<tag>/; the joint step starts from the baseline of
    its tag; config.yaml records the tag and the provenance, the end time once finished."""
    common = _tiny_dataset(edited_config, tmp_path, monkeypatch, mtask_bs="mtask_bs = 2",
                           batch_size_ft="batch_size_ft = 2")
    runs = tmp_path / "runs" / "tiny"
    _trainer("tr_baseline").main([*common, "--tag", "abl"])
    base = runs / "baseline" / "abl" / "tr1_c1_v0"
    record = yaml.safe_load((base / "config.yaml").read_text())
    assert record["flags"]["tag"] == "abl"
    prov = record["provenance"]
    assert set(prov) >= {"git_commit", "git_dirty", "versions", "device_name", "host",
                         "started", "ended"}
    assert prov["ended"] >= prov["started"] and prov["versions"]["torch"] == torch.__version__
    assert not (runs / "baseline" / "tr1_c1_v0").exists()

    joint = _trainer("prop_method_joint_tr_rand_init")
    flags = [*common, "--n_rounds", "1", "--n_iter_per_round", "1", "--crf", "0"]
    with pytest.raises(RunDirError, match="baseline/tr1_c1_v0/checkpoints/best.pt: baseline "
                       "checkpoint not found"):
        joint.main(flags)  # the untagged joint run looks for the untagged baseline
    try:
        joint.main([*flags, "--tag", "abl"])
    except TrainingStopped:  # one baseline iteration may label nothing; the start is checked
        pass
    assert not (runs / "joint" / "abl" / "tr1_c1_v0" / "original" / "run.lock").exists()
    record = yaml.safe_load((runs / "joint" / "abl" / "tr1_c1_v0" / "original" / "config.yaml")
                            .read_text())
    assert record["flags"]["baseline_checkpoint"] == str(base / "checkpoints" / "best.pt")


# ---------------------------------- self_training_rounds with a stand-in run (fast)
N_ITER = 4


def _fake_run(tmp_path: Path, start_iteration: int = 0, state: dict | None = None):
    """What `self_training.self_training_rounds` uses of a `utils.training.Run`, recording the stop
    checks (the last iteration run) and the log rows."""
    seen = {"stops": [], "logs": []}
    run = SimpleNamespace(
        start_iteration=start_iteration, state=state, device=torch.device("cpu"),
        cfg=SimpleNamespace(num_classes=2, struct_name=("fg",)),
        keeper=SimpleNamespace(path=tmp_path / "checkpoints" / "best.pt"), run_dir=tmp_path,
        generator=torch.Generator(), args=SimpleNamespace(no_progress=True),
        stop_if_requested=seen["stops"].append,
        log=SimpleNamespace(log=lambda it, **row: seen["logs"].append((it, row))))
    return run, seen


def _self_train(tmp_path: Path, monkeypatch, start_iteration: int = 0,
                state: dict | None = None):
    """Three rounds of N_ITER on a two-volume pool with stand-ins: round k's "training" sets
    the run's weights to 10 + k and its learning rate to 100 + k, writes them as best.pt, then
    leaves worse ones (weights -1, learning rate 999); the labeller records the weights and
    learning rate it is given and labels every pixel with the number of its call."""
    from models.unet import UNet
    from utils import self_training
    from utils.crf import CRFParams
    from utils.run import save_checkpoint

    run, seen = _fake_run(tmp_path, start_iteration, state)
    pool = {sid: (torch.full((z, 1, 8, 8), 0.1 * z), torch.zeros(z, 8, 8, dtype=torch.uint8))
            for sid, z in (("p1", 2), ("p2", 3))}
    baseline = {k: torch.full_like(v, 0.25) if v.is_floating_point() else v
                for k, v in UNet(2).state_dict().items()}
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    seen.update(labelled=[], trained=[], figures=[])

    def label_pool(network, pool_, labelling, run_):
        weight = next(network.parameters()).detach().flatten()[0].item()
        seen["labelled"].append((weight, optimizer.param_groups[0]["lr"]))
        n = sum(v[0].shape[0] for v in pool_.values())
        return PseudoLabelRound(torch.cat([v[0] for v in pool_.values()]),
                                torch.full((n, 8, 8), len(seen["labelled"]), dtype=torch.uint8),
                                list(pool_), dice_before_crf=0.5, dice_after_crf=0.6)

    def best_then_worse(k: int) -> None:
        with torch.no_grad():
            model.weight.fill_(10 + k)
        optimizer.param_groups[0]["lr"] = 100 + k
        save_checkpoint(run.keeper.path, {"model": model.state_dict(),
                                          "optimizer": optimizer.state_dict()})
        with torch.no_grad():
            model.weight.fill_(-1)
        optimizer.param_groups[0]["lr"] = 999

    def train(rnd):
        seen["trained"].append((rnd.index, rnd.iterations, rnd.checkpoint["round"],
                                int(rnd.pseudo.labels.unique().item())))
        assert torch.equal(rnd.pseudo.images, torch.cat([v[0] for v in pool.values()]))
        best_then_worse(rnd.index)

    monkeypatch.setattr(self_training, "label_pool", label_pool)
    monkeypatch.setattr(self_training, "write_pseudo_label_figure",
                        lambda path, *a: seen["figures"].append(path.name))
    labelling = self_training.Labelling(CRFParams(**experiment_init.load("demo").crf_params))
    if state is not None:  # resumed in round 2 (index 1), whose training wrote best.pt
        best_then_worse(state["round"])
    for rnd in self_training.self_training_rounds(run, model, optimizer, baseline, pool,
                                                  labelling, 3, N_ITER):
        train(rnd)
    return seen


def test_self_training_rounds_label_with_the_baseline_then_the_restored_best(tmp_path,
                                                                             monkeypatch):
    seen = _self_train(tmp_path, monkeypatch)
    # round 1: the baseline's weights; later rounds: best.pt's weights and optimizer state
    assert seen["labelled"] == [(0.25, 1e-3), (10.0, 100), (11.0, 101)]
    assert seen["trained"] == [(k, range(N_ITER * k, N_ITER * (k + 1)), k, k + 1)
                               for k in range(3)]
    assert seen["stops"] == [-1, N_ITER - 1, 2 * N_ITER - 1]  # before each labelling
    quality = {"pseudo_kept": 2, "pseudo_dice_before_crf": 0.5, "pseudo_dice_after_crf": 0.6}
    assert seen["logs"] == [(N_ITER * k, {"round": k + 1, **quality}) for k in range(3)]
    assert seen["figures"] == ["round1.png", "round2.png", "round3.png"]


@pytest.mark.parametrize("start", [N_ITER + 2, 2 * N_ITER])
def test_a_resumed_self_training_skips_finished_rounds_and_keeps_the_checkpoints_labels(
        tmp_path, monkeypatch, start):
    """Resumed inside round 2 (or at its last iteration): round 2 goes on with the
    pseudo-labels of last.pt (labels 7), round 3 labels with best.pt."""
    from utils.self_training import as_data

    pseudo = PseudoLabelRound(torch.zeros(5, 1, 8, 8), torch.full((5, 8, 8), 7, dtype=torch.uint8),
                              ["p1", "p2"], dice_before_crf=0.5, dice_after_crf=0.6)
    seen = _self_train(tmp_path, monkeypatch, start, {"round": 1, "pseudo": as_data(pseudo)})
    assert seen["labelled"] == [(11.0, 101)]  # round 3 only, from the best.pt of round 2
    assert seen["trained"] == [(1, range(N_ITER, 2 * N_ITER), 1, 7)][:int(start < 2 * N_ITER)] \
        + [(2, range(2 * N_ITER, 3 * N_ITER), 2, 1)]
    assert seen["stops"] == [2 * N_ITER - 1]
    assert [it for it, _ in seen["logs"]] == [2 * N_ITER]  # round 2 logged before the stop
    assert seen["figures"] == ["round3.png"]


def test_a_round_resumed_trains_on_its_checkpoints_volumes_labels_and_counts(tmp_path,
                                                                           monkeypatch):
    """last.pt of round 2 kept p3 then p2 (p1 dropped): the resumed round trains on their
    slices in that order with last.pt's labels, and its checkpoints hold the same; round 3 is
    labelled afresh and logged with its own counts, without the CRF's starting labels."""
    from utils import self_training
    from utils.crf import CRFParams

    pool = {sid: (torch.full((z, 1, 8, 8), float(i)), None)
            for i, (sid, z) in enumerate((("p1", 2), ("p2", 3), ("p3", 1)))}
    labels = (torch.arange(4, dtype=torch.uint8).view(4, 1, 1) + 7).expand(4, 8, 8).clone()
    saved = PseudoLabelRound(torch.zeros(4, 1, 8, 8), labels, ["p3", "p2"], dropped=["p1"],
                             dice_before_crf=0.25, dice_after_crf=0.75, unsure_foreground=0.125)
    run, seen = _fake_run(tmp_path, N_ITER + 1,
                          {"round": 1, "pseudo": self_training.as_data(saved)})
    model = torch.nn.Linear(2, 2)
    labelled = []

    def label_pool(network, pool_, labelling, run_):
        labelled.append(network)
        return PseudoLabelRound(pool_["p1"][0], torch.full((2, 8, 8), 5, dtype=torch.uint8),
                                ["p1"], dropped=["p2", "p3"], unsure_foreground=0.0,
                                before_crf=torch.zeros(2, 8, 8, dtype=torch.uint8))

    monkeypatch.setattr(self_training, "label_pool", label_pool)
    monkeypatch.setattr(self_training, "restore_best", lambda run_, model_, opt: model_)
    monkeypatch.setattr(self_training, "write_pseudo_label_figure", lambda *a: None)
    rounds = self_training.self_training_rounds(
        run, model, torch.optim.Adam(model.parameters()), {}, pool,
        self_training.Labelling(CRFParams(**experiment_init.load("demo").crf_params)), 3, N_ITER)
    rnd = next(rounds)
    assert (rnd.index, rnd.iterations, labelled, seen["logs"]) == (1, range(N_ITER, 2 * N_ITER),
                                                                   [], [])
    assert torch.equal(rnd.pseudo.images, torch.cat([pool["p3"][0], pool["p2"][0]]))
    assert torch.equal(rnd.pseudo.labels, labels)
    assert (rnd.pseudo.kept, rnd.pseudo.dropped) == (["p3", "p2"], ["p1"])
    assert rnd.checkpoint["round"] == 1
    assert rnd.checkpoint["pseudo"]["dropped"] == ["p1"]
    assert torch.equal(rnd.checkpoint["pseudo"]["labels"], labels)
    rnd = next(rounds)
    assert (rnd.index, labelled) == (2, [model]) and rnd.pseudo.kept == ["p1"]
    assert rnd.checkpoint["pseudo"]["before_crf"] is None
    assert "images" not in rnd.checkpoint["pseudo"]
    assert seen["logs"] == [(2 * N_ITER, {"round": 3, "pseudo_kept": 1,
                                          "pseudo_unsure_foreground": 0.0})]
    assert next(rounds, None) is None


def test_label_pool_passes_the_labelling_settings(tmp_path, monkeypatch):
    from utils import self_training
    from utils.crf import CRFParams

    calls = []
    monkeypatch.setattr(self_training, "make_pseudo_labels",
                        lambda *args, **kwargs: calls.append((args, kwargs)))
    crf = CRFParams(**experiment_init.load("demo").crf_params)
    run, _ = _fake_run(tmp_path)
    net = torch.nn.Identity()
    for use_crf, overlap in ((False, True), (True, False)):
        labelling = self_training.Labelling(crf, use_crf=use_crf, test_aug_overlap=overlap,
                                            overlap_threshold=0.7, crf_workers=3)
        self_training.label_pool(net, {}, labelling, run)
        args, kwargs = calls.pop()
        assert args == (net, {}, 2, crf, run.device, run.generator, overlap, 0.7)
        assert kwargs == {"progress": False, "use_crf": use_crf, "crf_workers": 3}


# ------------------------------------- keep-best, the periodic step and the test of best.pt
def _scripted_validation(monkeypatch, scores: dict[int, float]) -> None:
    """Validation Dice scripted per iteration: the stand-in network's weight is its
    iteration."""
    from utils import training

    monkeypatch.setattr(training, "validation_score",
                        lambda model, *args: scores[int(model.weight.item())])


def test_best_keeper_keeps_the_first_of_equal_scores_until_its_bar_is_lowered(tmp_path,
                                                                             monkeypatch):
    _scripted_validation(monkeypatch, {0: 0.5, 1: 0.5, 2: 0.3, 3: 0.6, 4: 0.6, 5: 0.25})
    keeper = BestKeeper(tmp_path, [], 2, torch.device("cpu"))
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.Adam(model.parameters())

    def update(it: int) -> float:
        with torch.no_grad():
            model.weight.fill_(it)
        return keeper.update(model, optimizer, it, {"round": 7})

    assert [update(it) for it in range(5)] == [0.5, 0.5, 0.3, 0.6, 0.6]
    best = torch.load(keeper.path, weights_only=False)
    assert (keeper.best_iteration, keeper.best_score, keeper.bar) == (3, 0.6, 0.6)
    assert (best["iteration"], best["val_dice"], best["round"]) == (3, 0.6, 7)
    assert best["model"]["weight"].item() == 3
    keeper.lower_bar(0.2)  # a newer, lower-scoring checkpoint may win now
    update(5)
    assert (keeper.best_iteration, keeper.best_score, keeper.bar) == (5, 0.25, 0.25)
    assert torch.load(keeper.path, weights_only=False)["iteration"] == 5


def _bare_run(tmp_path: Path, val_step_update: int, ckpt_every: int, start_iteration: int):
    """A `utils.training.Run` without `start_run` (no data, no lock, no signal handlers):
    what `Run.train` and `Run.finish` use, the log as a list of rows."""
    from utils.mixed_precision import MixedPrecision
    from utils.training import Run

    run = Run.__new__(Run)
    rows: list = []
    run.args = argparse.Namespace(no_progress=True, ckpt_every=ckpt_every)
    run.cfg = SimpleNamespace(val_step_update=val_step_update, test=[], num_classes=2,
                              struct_name=("fg",))
    run.device, run.generator = torch.device("cpu"), torch.Generator()
    run.precision = MixedPrecision("cpu", None)
    run.run_dir, run.record, run.started = tmp_path, {"provenance": {}}, 0.0
    run.keeper = BestKeeper(tmp_path, [], 2, run.device)
    run.guard = NonFiniteGuard(10)
    run.log = SimpleNamespace(rows=rows, log=lambda it, **row: rows.append((it, row)),
                              flush=lambda: None, close=lambda: None)
    run.stop = SimpleNamespace(received=None, restore=lambda: None)
    run.start_iteration, run.saved_iteration = start_iteration, start_iteration - 1
    run.state, run.companions = None, {}
    return run


def test_a_resumed_run_gets_back_its_counts_its_bar_and_the_best_checkpoint_of_its_time(
        tmp_path, monkeypatch):
    """last.pt written after 5 skipped steps (the last 1 in a row) and a best of iteration 2
    under a lowered bar; best.pt rewritten later (or, for a last.pt from before any best,
    written at all) is put back as last.pt knew it."""
    import copy

    from utils import training

    _scripted_validation(monkeypatch, {2: 0.6, 9: 0.9})
    saved = []
    monkeypatch.setattr(training, "save_periodic_checkpoint",
                        lambda d, state: saved.append(copy.deepcopy(state)))
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.Adam(model.parameters())
    early = _bare_run(tmp_path / "a", 1, 1, 0)
    early.save_progress(0, model, optimizer)  # before any validation: no best
    run = _bare_run(tmp_path / "a", 1, 1, 0)
    with torch.no_grad():
        model.weight.fill_(2)
    run.keeper.update(model, optimizer, 2)
    run.keeper.lower_bar(0.3)
    for loss in (math.nan, math.nan, 1.0, math.nan, math.nan, 1.0, math.nan):
        run.guard.ok(torch.tensor(loss), 5)
    run.save_progress(5, model, optimizer)
    with torch.no_grad():
        model.weight.fill_(9)
    run.keeper.update(model, optimizer, 9)  # killed before the next last.pt

    for state, best_iteration in ((saved[1], 2), (saved[0], None)):
        resumed = _bare_run(tmp_path / "a", 1, 1, 0)
        resumed.state = state
        assert resumed.resume(torch.nn.Linear(1, 1), torch.optim.Adam(model.parameters())) \
            == state["iteration"] + 1
        if best_iteration is None:
            assert not resumed.keeper.path.exists()
            continue
        assert (resumed.guard.total, resumed.guard.consecutive) == (5, 1)
        assert (resumed.keeper.best_iteration, resumed.keeper.best_score) == (2, 0.6)
        assert resumed.keeper.bar == 0.3
        assert torch.load(resumed.keeper.path, weights_only=False)["iteration"] == 2


def test_the_periodic_step_validates_logs_and_checkpoints_on_the_rounds_schedule(
        tmp_path, monkeypatch):
    """A round of iterations 6..16 resumed at 9, validated every 4 iterations of the round
    and at its end, checkpointed after every third iteration and at the end; the guard's
    total count of skipped steps (one counted later, as a captured step does) in each row."""
    from utils import training

    _scripted_validation(monkeypatch, {10: 0.5, 14: 0.4, 16: 0.45})
    saved = []
    monkeypatch.setattr(training, "save_periodic_checkpoint", lambda d, state: saved.append(
        (state["iteration"], state["bad_total"], state["best_iteration"], state["best_bar"])))
    run = _bare_run(tmp_path, val_step_update=4, ckpt_every=3, start_iteration=9)
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.Adam(model.parameters())
    stepped = []

    def step(it: int) -> torch.Tensor:
        stepped.append(it)
        with torch.no_grad():
            model.weight.fill_(it)
        loss = torch.tensor(math.nan if it in (9, 14) else float(it))
        if it == 14:
            run.guard.later(loss, it)
        else:
            run.guard.ok(loss, it)
        return loss

    run.train(model, optimizer, range(6, 17), step, "round", lower_bar_at_end=True)
    assert stepped == list(range(9, 17))
    assert [(it, row["val_dice"], row["bad_steps"]) for it, row in run.log.rows] == [
        (10, 0.5, 1), (14, 0.4, 2), (16, 0.45, 2)]
    # iteration 10 stays best: a bar lowered at every validation would let 16 win
    assert saved == [(11, 1, 10, 0.5), (14, 2, 10, 0.5), (16, 2, 10, 0.45)]
    assert (run.keeper.best_iteration, run.keeper.bar) == (10, 0.45)


def test_finish_tests_the_best_checkpoint_not_the_last_weights(tmp_path, monkeypatch):
    from utils import training
    from utils.run import save_checkpoint

    run = _bare_run(tmp_path, val_step_update=1, ckpt_every=1, start_iteration=0)
    model = torch.nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(5)
    save_checkpoint(run.keeper.path, {"model": model.state_dict(), "iteration": 5,
                                      "val_dice": 0.8})
    with torch.no_grad():
        model.weight.fill_(9)  # the last iteration's weights
    tested = []
    monkeypatch.setattr(training, "load_eval_volumes", lambda cfg, ids: [])
    monkeypatch.setattr(training, "evaluate_test_set", lambda net, *args: tested.append(
        (net.weight.item(), args[-1])) or {"per_structure": {}, "mean_dice": 0.7})
    assert run.finish(model)["mean_dice"] == 0.7
    assert tested == [(5.0, {"set": "validation", "iteration": 5, "val_dice": 0.8})]
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["provenance"]["ended"]
