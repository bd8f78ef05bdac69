"""--amp and --threads: which precisions each device is refused, the fp16 scaler's update equals
the float32 update, the joint step runs its network in bf16 and its losses in float32, a
baseline run under --amp bf16 trains in bf16, and where the thread count comes from."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from models.unet import JointUNet
from utils.captured_step import NonFiniteGuard
from utils.device import cpu_threads
from utils.errors import ConfigError
from utils.joint_training import JointSettings, build_joint_data, joint_stepper
from utils.mixed_precision import MixedPrecision, cpu_flags, mixed_precision

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n\nflags : x\n")
    assert cpu_flags(info) == {"fpu", "sse", "avx512f", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") is None


@pytest.mark.parametrize("amp, features, message", [
    ("fp16", {"amx_bf16"}, "--amp fp16 is for GPUs"),
    ("bf16", {"avx512f", "avx2"}, "neither AMX (amx_bf16) nor AVX512-BF16 (avx512_bf16)"),
    ("bf16", None, "cannot tell whether this CPU computes bf16 natively"),
    ("tf32", {"amx_bf16"}, "--amp 'tf32': choose one of off, bf16, fp16"),
])
def test_cpu_refuses_what_it_cannot_compute_natively(amp, features, message, monkeypatch):
    monkeypatch.setattr("utils.mixed_precision.cpu_flags", lambda: None)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        mixed_precision(amp, CPU, features)


@pytest.mark.parametrize("feature", ["amx_bf16", "avx512_bf16"])
def test_cpu_bf16_with_a_native_feature(feature):
    p = mixed_precision("bf16", CPU, {"sse", feature})
    assert p.dtype is torch.bfloat16 and p.scaler is None
    assert mixed_precision("off", CPU, set()).dtype is None


def _pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    a = torch.nn.Linear(8, 3)
    b = torch.nn.Linear(8, 3)
    b.load_state_dict(a.state_dict())
    return a, b


def test_fp16_scaler_step_equals_the_float32_step_and_skips_overflow():
    """The scaler multiplies the loss by a power of two and divides the gradients back, so the
    update is the float32 one exactly; a gradient that overflows skips the update and halves
    the scale. (The scaler's arithmetic is the same on every device; CPU here.)"""
    a, b = _pair()
    opt_a, opt_b = torch.optim.Adam(a.parameters(), 1e-2), torch.optim.Adam(b.parameters(), 1e-2)
    plain = MixedPrecision("cpu", None)
    scaled = MixedPrecision("cpu", torch.float16, torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
    x = torch.randn(4, 8)
    for _ in range(3):
        plain.step(a(x).square().mean(), opt_a)
        scaled.step(b(x).square().mean(), opt_b)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)

    before = [p.detach().clone() for p in b.parameters()]
    scaled.step(b(x).sum() * float("inf"), opt_b)
    assert all(torch.equal(p, q) for p, q in zip(b.parameters(), before, strict=True))
    assert scaled.state_dict()["scale"] == 2.0 ** 9

    restored = MixedPrecision("cpu", torch.float16, torch.amp.GradScaler("cpu"))
    restored.load_state_dict(scaled.state_dict())
    assert restored.state_dict() == scaled.state_dict()


def test_joint_step_runs_the_network_in_bf16_and_the_losses_in_float32():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    num_classes, n = 4, 24
    labels = torch.zeros(n, 32, 32, dtype=torch.long)
    labels[:, 4:28, 4:28] = 1
    labels[:, 8:24, 8:24] = 2
    labels[:, 12:20, 12:20] = 3
    images = labels[:, None].float() / 4 + 0.05 * torch.randn(n, 1, 32, 32)
    data, _ = build_joint_data(images, labels, images.clone(), labels.clone(), num_classes, 3)
    model = JointUNet(num_classes)
    seen: list[torch.dtype] = []
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    settings = JointSettings(num_classes=num_classes, n_seg=4, bt_size=2)
    def step(precision: MixedPrecision):
        return joint_stepper(model, optimizer, data, settings,
                             lambda logits, y: (logits.softmax(1) - y).abs().mean(), gen,
                             NonFiniteGuard(max_consecutive=3), precision)

    losses = step(MixedPrecision("cpu", torch.bfloat16))(0)
    assert seen == [torch.bfloat16]
    assert [t.dtype for t in losses] == [torch.float32] * 3
    assert all(p.dtype == torch.float32 for p in model.parameters())
    step(MixedPrecision("cpu", None))(1)
    assert seen[-1] == torch.float32  # no precision: float32


def test_thread_count_precedence_and_cap():
    cpus = {0, 1, 2, 3}
    assert cpu_threads(3, {"OMP_NUM_THREADS": "2"}, cpus) == (3, "--threads")
    assert cpu_threads(None, {"OMP_NUM_THREADS": "2", "SLURM_CPUS_PER_TASK": "1"}, cpus) == \
        (2, "OMP_NUM_THREADS")
    assert cpu_threads(None, {"SLURM_CPUS_PER_TASK": "1"}, cpus) == (1, "SLURM_CPUS_PER_TASK")
    assert cpu_threads(None, {}, cpus) == (4, "CPUs this process may run on")
    assert cpu_threads(16, {}, {0, 1}) == (2, "--threads")  # never more than the CPUs
    with pytest.raises(ConfigError, match="SLURM_CPUS_PER_TASK='two'"):
        cpu_threads(None, {"SLURM_CPUS_PER_TASK": "two"}, cpus)
    with pytest.raises(ConfigError, match="OMP_NUM_THREADS='0'"):
        cpu_threads(None, {"OMP_NUM_THREADS": "0"}, cpus)


def _first_loss(run_dir: Path) -> float:
    with open(run_dir / "log.csv") as f:
        return float(next(csv.DictReader(f))["loss_seg"])


def test_baseline_under_amp_bf16_trains_in_bf16(tmp_path, demo_env):
    """The same seed in float32 and bf16: the first logged loss differs by bf16 rounding only
    (a trainer that ignored --amp would log the float32 loss exactly)."""
    if mixed_precision_refusal() is not None:
        pytest.skip(f"this CPU cannot run --amp bf16: {mixed_precision_refusal()}")
    env = {k: v for k, v in demo_env.items() if k not in ("OMP_NUM_THREADS",)}
    env["SLURM_CPUS_PER_TASK"] = "1"
    runs = {}
    for amp in ("off", "bf16"):
        cmd = [sys.executable, "train_model/tr_baseline.py", "--dataset", "demo",
               "--no_of_tr_imgs", "tr1", "--comb_tr_imgs", "c1", "--ver", "11", "--n_iter", "2",
               "--no_progress", "--device", "cpu", "--amp", amp,
               "--out_dir", str(tmp_path / amp)]
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, done.stderr
        assert "(1 CPU threads: SLURM_CPUS_PER_TASK" in done.stdout
        runs[amp] = Path(done.stdout.strip().splitlines()[-1].removeprefix("run directory: "))
    assert "; --amp bf16)" in done.stdout
    record = yaml.safe_load((runs["bf16"] / "config.yaml").read_text())
    assert record["flags"]["amp"] == "bf16" and record["flags"]["threads"] == 1
    off, bf16 = _first_loss(runs["off"]), _first_loss(runs["bf16"])
    assert off != bf16 and abs(off - bf16) < 0.02 * abs(off)


def mixed_precision_refusal() -> str | None:
    try:
        mixed_precision("bf16", CPU)
    except ConfigError as err:
        return str(err)
    return None


# ------------------------------------------------ what runs in which precision, what it reads
def test_autocast_is_the_chosen_dtype_on_the_chosen_device_without_a_cast_cache():
    import warnings

    linear = torch.nn.Linear(2, 2)
    for dtype in (torch.bfloat16, torch.float16, None):
        with MixedPrecision("cpu", dtype).autocast():
            assert linear(torch.ones(1, 2)).dtype == (dtype or torch.float32)
            assert dtype is None or not torch.is_autocast_cache_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no CUDA here: the context is built, not entered
        ctx = MixedPrecision("cuda", torch.float16).autocast()
    assert (ctx.device, ctx.fast_dtype, ctx._cache_enabled) == ("cuda", torch.float16, False)


@pytest.mark.parametrize("scaled", [False, True])
def test_each_step_updates_with_its_own_loss_gradient_only(scaled):
    """Gradients of an earlier step are not carried into the next (SGD, lr 1: the update is
    the gradient itself)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    precision = MixedPrecision("cpu", torch.float16 if scaled else None,
                               torch.amp.GradScaler("cpu", init_scale=4.0) if scaled else None)
    x = torch.tensor([[1.0, 2.0, 3.0]])
    precision.step(model(x).sum() * 5, optimizer)
    before = model.weight.detach().clone()
    precision.step(model(x).sum(), optimizer)
    torch.testing.assert_close(before - model.weight.detach(), x, rtol=0, atol=0)


def test_a_gpu_gets_the_precision_asked_for(monkeypatch):
    import warnings

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    p = mixed_precision("bf16", cuda)
    assert (p.device_type, p.dtype, p.scaler) == ("cuda", torch.bfloat16, None)
    assert mixed_precision("off", cuda).device_type == "cuda"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a GradScaler for CUDA built without CUDA
        p = mixed_precision("fp16", cuda)
    assert p.dtype is torch.float16 and isinstance(p.scaler, torch.amp.GradScaler)
    assert p.scaler._device == "cuda"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Old GPU")
    with pytest.raises(ConfigError, match="Old GPU does not support bf16; use --amp fp16"):
        mixed_precision("bf16", cuda)


def test_cpuinfo_without_flags_is_a_cpu_without_features(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: some CPU\n")
    assert cpu_flags(info) == set()


def test_a_scaler_state_loads_and_an_empty_one_changes_nothing():
    precision = MixedPrecision("cpu", torch.float16, torch.amp.GradScaler("cpu", init_scale=8.0))
    precision.load_state_dict({})
    assert precision.state_dict()["scale"] == 8.0
    other = MixedPrecision("cpu", torch.float16, torch.amp.GradScaler("cpu", init_scale=64.0))
    precision.load_state_dict(other.state_dict())
    assert precision.state_dict()["scale"] == 64.0
    MixedPrecision("cpu", None).load_state_dict(other.state_dict())  # float32: nothing to load
