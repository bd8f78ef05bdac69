"""Where the time goes: network step, joint step, local loss, pseudo-labels, memory, start-up.

    python scripts/benchmark.py [--device auto|cpu|cuda] [--dataset acdc] [--amp bf16|fp16]
                                [--repeats 5] [--quick] [--low_memory] [--reference]

Prints a table and one JSON line per figure, e.g.
``{"name": "overhead_ratio", "value": 1.04, "unit": "x", "device": "cpu", ...}``.
Figures are medians over ``--repeats`` runs after one warm-up run; network and joint steps
are timed alternately and ``overhead_ratio`` is the median ratio of back-to-back pairs.
``joint_batch`` (batch sampling and augmentation alone) shows the host-side part of the
overhead. ``baseline_step`` is the baseline trainer's iteration, ``validation`` one validation
(two volumes in native resolution), and ``protocol_estimate`` the dataset's whole default
protocol built from these figures (`protocol_seconds`). ``--steps_only`` stops after the step
figures; ``--profile FILE`` writes torch.profiler's table of the joint step.
``crf_volume_w<n>`` times the CRF stage alone over n worker processes (1, 2, and all
available CPUs when more), ``crf_scaling_w<n>`` its speed-up over one worker divided by n.
Synthetic slices of the dataset's crop size are used (no data needed); the joint step is the
trainer's own `utils.joint_training.joint_stepper`. ``--quick`` uses a quarter of the crop
area and fewer repeats (a smoke run that finishes in about two minutes on two CPU cores).

``--reference`` times only the peer the issue measured on another machine: the plain PyTorch
U-Net of the published shape (`models.unet.UNet` without `models.cpu_training`), 20 images,
PyTorch's default settings (no `configure_backend`), in channels_last and in the default
layout. Its ratio to the peer's 2.0 s (figure ``machine_factor``) scales figures measured
elsewhere to this machine. On CPU the other figures use the trainers' network:
`models.cpu_training.install` on the same `JointUNet`.
"""

from __future__ import annotations

import utils.wait_policy  # noqa: F401  (before torch: OpenMP reads it once)

import time

from utils.errors import ConfigError

_T0 = time.perf_counter()  # before the heavy imports: time_to_first_step counts them

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

_T_TORCH = time.perf_counter()  # torch's own import, the floor of every process start
from torch import nn

import experiment_init
from losses.dice import soft_dice_loss
from losses.local_contrastive import local_contrastive_loss, sample_positive_indices
from losses.local_contrastive_loop import loop_local_contrastive_loss
from models import cpu_training
from models.unet import JointUNet, UNet
from utils.augment import to_onehot
from utils.baseline_training import BaselineSettings, baseline_stepper
from utils.captured_step import CapturedStep, check_step_flags
from utils.crf import CRFParams, CRFPool
from utils.device import (
    available_cpus,
    configure_backend,
    resolve_device,
    set_cpu_threads,
)
from utils.evaluation import predict_slices, prepare_volume, validation_score
from utils.io import Volume
from utils.joint_training import (
    JointSettings,
    build_joint_data,
    joint_batch,
    joint_stepper,
)
from utils.mixed_precision import MixedPrecision, cpu_flags, mixed_precision
from utils.provenance import device_name, git_state
from utils.pseudo_labels import make_pseudo_labels
from utils.training import NonFiniteGuard

# The /proc/cpuinfo flags that decide CPU step times, recorded with every figure.
SPEED_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def synthetic_slices(n: int, size: tuple[int, int], num_classes: int,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Nested discs (every class present) at random positions, with noise: (N,1,H,W), (N,H,W)."""
    h, w = size
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    centre = torch.rand(n, 2, generator=generator) * 0.3 + 0.35
    r = ((yy[None] - centre[:, 0, None, None] * h) ** 2
         + (xx[None] - centre[:, 1, None, None] * w) ** 2).sqrt()
    labels = torch.zeros(n, h, w, dtype=torch.long)
    for c in range(1, num_classes):  # a handful of classes, not pixels: a short loop
        labels[r < min(h, w) * (0.3 - 0.25 * (c - 1) / max(num_classes - 1, 1))] = c
    images = labels.float() / num_classes + 0.05 * torch.randn(n, h, w, generator=generator)
    return images[:, None], labels


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (device work is asynchronous); no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def sample_times(fns: list[Callable[[], object]], repeats: int, device: torch.device,
                 inner: int | None = None) -> list[list[float]]:
    """Seconds per call of each of ``fns``: ``repeats`` samples each, after one warm-up call
    each. The samples are interleaved (fn 0, fn 1, ..., fn 0, fn 1, ...) so that the machine's
    slow swings in speed (other tenants, clock) hit all functions alike and their ratio is
    steadier than the ratio of separately taken medians.

    On a GPU a sample is 10 consecutive calls and one synchronisation, as the trainer runs
    its iterations (it never waits for the GPU between them except for the non-finite check),
    so the host's work for one call may overlap the device's work for the previous one.
    ``inner`` overrides the number of calls per sample.
    """
    if inner is None:
        inner = 10 if device.type == "cuda" else 1
    for fn in fns:
        fn()
    synchronize(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, samples in zip(fns, times, strict=True):
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            synchronize(device)
            samples.append((time.perf_counter() - t) / inner)
    return times


def timed(fn: Callable[[], object], repeats: int, device: torch.device,
          inner: int | None = None) -> float:
    """Median seconds per call of ``fn`` (see `sample_times`)."""
    return statistics.median(sample_times([fn], repeats, device, inner)[0])


# This plain U-Net step (20 x 1 x 192 x 192, channels_last, one optimizer step) took 2.0 s on
# the 2-core machine where the original TF code was timed: dividing by it turns a figure from
# this machine into that machine's scale.
PEER_REFERENCE_STEP_S = 2.0


def reference_figures(cfg: experiment_init.ExperimentConfig, size: tuple[int, int], n: int,
                      repeats: int, device: torch.device, precision: MixedPrecision,
                      report: Callable[[str, float, str], None]) -> float:
    """Time one optimizer step (soft Dice, Adam) of the plain `UNet` on n x 1 x size synthetic
    slices, in channels_last (figure reference_unet_step) and in the default layout
    (reference_unet_step_nchw). Returns the channels_last seconds per step."""
    images, labels = synthetic_slices(n, size, cfg.num_classes, torch.Generator().manual_seed(0))
    y = to_onehot(labels, cfg.num_classes).to(device)
    autocast = precision.autocast
    seconds: dict[str, float] = {}
    for fig, layout in (("reference_unet_step", torch.channels_last),
                        ("reference_unet_step_nchw", torch.contiguous_format)):
        ref = UNet(cfg.num_classes).to(device, memory_format=layout)
        opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
        x = images.to(device).contiguous(memory_format=layout)

        def step(ref: nn.Module = ref, opt: torch.optim.Optimizer = opt,
                 x: torch.Tensor = x) -> None:
            with autocast():
                logits = ref(x)
            precision.step(soft_dice_loss(logits.float(), y), opt)

        seconds[fig] = timed(step, repeats, device)
        report(fig, seconds[fig], "s")
    return seconds["reference_unet_step"]


def network_rate(cfg: experiment_init.ExperimentConfig, size: tuple[int, int],
                 device: torch.device, precision: MixedPrecision, seconds: float) -> None:
    """A ``--concurrent`` worker: set up the network step as `main` does, print ``ready``,
    wait for a line on stdin (all workers start together), run network steps for ``seconds``
    and print ``{"steps_per_s": ...}`` (whole steps over the time they took)."""
    s = JointSettings(num_classes=cfg.num_classes, n_seg=cfg.mtask_bs)
    images, labels = synthetic_slices(s.n_seg + 2 * s.bt_size, size, cfg.num_classes,
                                      torch.Generator().manual_seed(0))
    batch = images.to(device).contiguous(memory_format=torch.channels_last)
    y = to_onehot(labels[: s.n_seg], cfg.num_classes).to(device)
    model = JointUNet(cfg.num_classes).to(device, memory_format=torch.channels_last)
    if device.type == "cpu":
        cpu_training.install(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        with precision.autocast():
            logits, _ = model(batch, s.n_seg)
        precision.step(soft_dice_loss(logits.float(), y), opt)

    step()
    synchronize(device)
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.perf_counter()
    steps = 0
    while time.perf_counter() - start < seconds:
        step()
        synchronize(device)
        steps += 1
    print(json.dumps({"steps_per_s": steps / (time.perf_counter() - start),
                      "threads": torch.get_num_threads()}), flush=True)


def concurrent_rates(argv: list[str], n: int, threads: int | None, seconds: float) -> list[float]:
    """Steps per second of each of ``n`` `network_rate` workers started together, each with
    ``threads`` CPU threads as the sweep's local workers get them (``OMP_NUM_THREADS``), or
    with no settings at all (None: two trainers started by hand)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") and not k.startswith("SLURM_")}
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, *argv, "--rate_worker", str(seconds)]
    procs = [subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for _ in range(n)]
    for p in procs:
        line = "-"
        while line and line.strip() != "ready":  # after the worker's table header
            line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"a --concurrent worker failed: {' '.join(cmd)}")
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    rates = []
    for p in procs:
        out, _ = p.communicate(timeout=seconds * 20 + 600)
        rates.append(json.loads(out.strip().splitlines()[-1])["steps_per_s"])
    return rates


def concurrent_figures(argv: list[str], n: int, seconds: float,
                       report: Callable[[str, float, str], None]) -> None:
    """``concurrent_efficiency``: the aggregate steps per second of ``n`` network-step
    processes with the CPUs split between them (as the sweep starts them) over the best single
    process on the same CPUs (all of them, or one share); ``concurrent_efficiency_default``:
    the same with ``n`` processes started with no thread settings."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    share = max(1, (cpus or 1) // n)
    single = max(concurrent_rates(argv, 1, t, seconds)[0] for t in sorted({cpus, share}))
    report("single_steps_per_s", single, "1/s")
    split = concurrent_rates(argv, n, share, seconds)
    report("concurrent_efficiency", sum(split) / single, "x")
    default = concurrent_rates(argv, n, None, seconds)
    report("concurrent_efficiency_default", sum(default) / single, "x")


def beside_load_figures(argv: list[str], seconds: float,
                        report: Callable[[str, float, str], None]) -> None:
    """``beside_load_share``: the steps per second of one network-step process started with no
    thread settings beside one single-threaded busy process (a Python loop), over the same
    process alone; on C cores its fair share is (C - 1) / C of the alone rate at best."""
    alone = concurrent_rates(argv, 1, None, seconds)[0]
    report("alone_steps_per_s", alone, "1/s")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        beside = concurrent_rates(argv, 1, None, seconds)[0]
    finally:
        busy.kill()
        busy.wait()
    report("beside_load_share", beside / alone, "x")


def commit_name(state: dict[str, object]) -> str:
    """The short hash of ``utils.provenance.git_state``, with "+" when the working tree
    differs from it (the figures then come from code of no commit), "?" outside git."""
    commit = state.get("git_commit")
    return "?" if not commit else str(commit)[:7] + ("+" if state.get("git_dirty") else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dataset", default="acdc")
    parser.add_argument("--amp", default=None, choices=(None, "bf16", "fp16"),
                        help="as the trainers' --amp: the network under autocast")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--low_memory", action="store_true",
                        help="as the trainers' --low_memory (glibc's default allocator on CPU)")
    parser.add_argument("--reference", action="store_true",
                        help="time only the plain UNet, the peer measured on another machine, "
                             "with PyTorch's default settings; prints machine_factor")
    parser.add_argument("--threads", type=int, default=None,
                        help="as the trainers' --threads (not with --reference)")
    parser.add_argument("--concurrent", type=int, default=None, metavar="N",
                        help="time only N network-step processes run together (see "
                        "concurrent_figures) against one alone")
    parser.add_argument("--beside_load", action="store_true",
                        help="time only one network-step process beside one single-threaded "
                        "busy process against it alone (see beside_load_figures)")
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="--concurrent, --beside_load: seconds each process steps")
    parser.add_argument("--steps_only", action="store_true",
                        help="stop after the step figures and peak memory")
    parser.add_argument("--compile", default=None, choices=("default", "reduce-overhead"),
                        help="time the steps with the network under torch.compile in this mode "
                        "(the trainers' --compile 1 is 'default')")
    parser.add_argument("--cuda_graph", type=int, default=0, choices=(0, 1),
                        help="as the trainers' --cuda_graph 1: the network, joint and baseline "
                        "steps each replayed from one CUDA graph")
    parser.add_argument("--profile", default=None, metavar="FILE",
                        help="also write torch.profiler's table of 5 joint steps to FILE")
    parser.add_argument("--rate_worker", type=float, default=None, help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    args = parser.parse_args(argv)
    t_imported = time.perf_counter()
    device = resolve_device(args.device)
    cfg = experiment_init.load(args.dataset)
    size = cfg.crop_size if not args.quick else (cfg.crop_size[0] // 2, cfg.crop_size[1] // 2)
    repeats = 2 if args.quick else args.repeats
    s = JointSettings(num_classes=cfg.num_classes, n_seg=cfg.mtask_bs)
    n_all = s.n_seg if args.reference else s.n_seg + 2 * s.bt_size
    if not args.reference:  # the peer ran with PyTorch's default threads
        set_cpu_threads(args.threads)
    features = sorted((cpu_flags() or set()) & set(SPEED_FEATURES))
    info = {"device": device.type, "machine": device_name(device),
            "cpu_features": " ".join(features), "cpus": len(os.sched_getaffinity(0)),
            "commit": commit_name(git_state()),
            "dataset": args.dataset, "batch": f"{n_all}x1x{size[0]}x{size[1]}",
            "amp": args.amp or "off", "compile": args.compile or "off",
            "cuda_graph": bool(args.cuda_graph),
            "threads": torch.get_num_threads(), "quick": args.quick,
            "low_memory": args.low_memory or args.reference}
    print(f"{'figure':<26}{'value':>12}  unit   ({', '.join(f'{k}={v}' for k, v in info.items())})",
          flush=True)
    figures: list[tuple[str, float, str]] = []

    def report(fig: str, value: float, unit: str) -> None:
        # Each row as soon as it is measured: a run cut short still shows what it measured.
        figures.append((fig, value, unit))
        print(f"{fig:<26}{value:>12.4f}  {unit}", flush=True)

    precision = mixed_precision(args.amp or "off", device)
    if args.cuda_graph:
        check_step_flags(device, args.amp or "off")
    autocast = precision.autocast

    if args.rate_worker is not None:
        configure_backend(device, args.low_memory)
        network_rate(cfg, size, device, precision, args.rate_worker)
        return
    if args.concurrent is not None or args.beside_load:
        valued = ("--concurrent", "--seconds", "--threads")  # the workers get their own
        keep = [a for i, a in enumerate(argv) if not a.startswith((*valued, "--beside_load"))
                and (i == 0 or argv[i - 1] not in valued)]
        if args.concurrent is not None:
            concurrent_figures(keep, args.concurrent, args.seconds, report)
        if args.beside_load:
            beside_load_figures(keep, args.seconds, report)
        print_json(figures, info)
        return
    if args.reference:
        # No configure_backend: the peer ran with PyTorch's defaults.
        t_ref = reference_figures(cfg, size, n_all, repeats, device, precision, report)
        if device.type == "cpu" and (n_all, *size) == (20, 192, 192):  # the peer's batch
            report("machine_factor", t_ref / PEER_REFERENCE_STEP_S, "x")
        print_json(figures, info)
        return
    configure_backend(device, args.low_memory)
    gen = torch.Generator().manual_seed(0)
    lab_img, lab_lbl = synthetic_slices(40, size, cfg.num_classes, gen)
    unl_img, unl_lbl = synthetic_slices(40, size, cfg.num_classes, gen)
    lab_img, unl_img = lab_img.to(device), unl_img.to(device)
    # uint8 label pools, as the trainers keep them (utils.dataset.load_slices)
    lab_lbl, unl_lbl = lab_lbl.to(device, torch.uint8), unl_lbl.to(device, torch.uint8)
    data, _ = build_joint_data(lab_img, lab_lbl, unl_img, unl_lbl, cfg.num_classes,
                               cfg.min_labels_dice_slice)
    model = JointUNet(cfg.num_classes).to(device, memory_format=torch.channels_last)
    if device.type == "cpu" and not args.compile:  # as the trainers
        cpu_training.install(model)
    t_opt = time.perf_counter()
    # The first optimizer of a process imports torch._dynamo (torch.optim's own start-up).
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t_opt = time.perf_counter() - t_opt
    guard = NonFiniteGuard(max_consecutive=10)  # the trainer's check (one sync per step)
    if args.compile:
        model.forward = torch.compile(model.forward, mode=args.compile)

    joint_step = joint_stepper(model, opt, data, s, soft_dice_loss, gen, guard, precision,
                               bool(args.cuda_graph))

    def joint() -> None:
        joint_step(0)

    synchronize(device)
    t_ready = time.perf_counter()
    joint()
    synchronize(device)
    t_first = time.perf_counter()
    report("time_to_first_step", t_first - _T0, "s")
    print(f"  (imports {t_imported - _T0:.1f} s, of which torch {_T_TORCH - _T0:.1f} s; "
          f"device + data + model {t_ready - t_imported:.1f} s, of which the first optimizer "
          f"{t_opt:.1f} s; first joint step {t_first - t_ready:.1f} s)", flush=True)

    batch = torch.cat([lab_img[:n_all // 2], unl_img[: n_all - n_all // 2]]).contiguous(
        memory_format=torch.channels_last)
    y = to_onehot(lab_lbl[: s.n_seg], cfg.num_classes)

    def network_loss(_: tuple = ()) -> tuple[torch.Tensor]:
        with autocast():
            logits, _ = model(batch, s.n_seg)
        return (soft_dice_loss(logits.float(), y),)

    if args.cuda_graph:
        network_graph = CapturedStep(network_loss, model, opt, (), graph=True)

        def network() -> None:
            network_graph(())
    else:
        def network() -> None:
            model.train()
            precision.step(network_loss()[0], opt)

    # Interleaved: the ratio is that of back-to-back pairs of steps (median over pairs).
    net_times, joint_times = sample_times([network, joint], repeats, device)
    t_net = statistics.median(net_times)
    report("network_step", t_net, "s")
    report("joint_step", statistics.median(joint_times), "s")
    report("overhead_ratio",
           statistics.median(j / n for n, j in zip(net_times, joint_times, strict=True)), "x")
    # The host-side share of the overhead, timed alone: its few per cent are below the noise of
    # the ratio on a shared CPU.
    report("joint_batch", timed(lambda: joint_batch(data, s, gen), repeats, device), "s")
    # Peak of a process that has run joint steps, as the trainer does; taken before the loop
    # reference below, which the trainer never runs.
    if device.type == "cuda":
        report("peak_memory", torch.cuda.max_memory_allocated() / 2**30, "GiB")
    else:  # ru_maxrss is in KiB on Linux
        report("peak_memory", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "GiB")
    if args.profile:
        write_profile(Path(args.profile), joint, device)
    if args.steps_only:
        print_json(figures, info)
        return
    t_base = baseline_figure(cfg, lab_img, lab_lbl, repeats, device, precision, args.compile,
                             gen, bool(args.cuda_graph))
    report("baseline_step", t_base, "s")
    t_val = validation_figure(model, cfg, size, repeats, device)
    report("validation", t_val, "s")

    emb = torch.randn(2 * s.bt_size, 16, *size, device=device, requires_grad=True)
    onehot = to_onehot(torch.cat([lab_lbl[: s.bt_size], unl_lbl[: s.bt_size]]), cfg.num_classes)
    pos = sample_positive_indices(onehot, s.no_of_pos_eles, gen)

    def vec() -> None:
        local_contrastive_loss(emb, onehot, pos, reduction="mean").backward()

    def loop() -> None:
        loop_local_contrastive_loss(emb, onehot, pos, 0.1).backward()

    t_vec = timed(vec, repeats, device)
    t_loop = timed(loop, max(1, repeats // 2), device, inner=1)
    torch.testing.assert_close(local_contrastive_loss(emb, onehot, pos, reduction="mean"),
                               loop_local_contrastive_loss(emb, onehot, pos, 0.1), rtol=1e-4,
                               atol=1e-5)
    for fig, value, unit in (("contrastive_loss", t_vec, "s"),
                             ("contrastive_loss_loop", t_loop, "s"),
                             ("contrastive_loss_speedup", t_loop / t_vec, "x"),
                             ("contrastive_loss_share", t_vec / t_net, "x")):
        report(fig, value, unit)

    pool = {"volume": (unl_img[:10].cpu(), None)}  # the trainer's pool lives on the host
    crf = CRFParams(**cfg.crf_params)

    def pseudo() -> None:
        with autocast():
            make_pseudo_labels(model, pool, cfg.num_classes, crf, device, gen, progress=False)

    # inner=1: the CRF runs on the CPU and takes about a second; batching calls gains nothing.
    t_pseudo = timed(pseudo, repeats, device, inner=1)
    report("pseudo_label_volume", t_pseudo, "s")
    crf = crf_figures(model, unl_img, crf, repeats, device, report)
    if not args.quick:
        minutes = protocol_seconds(cfg, t_base, statistics.median(joint_times), t_val,
                                   t_pseudo - crf[1] + min(crf.values())) / 60
        report("protocol_estimate", minutes, "min")
    print_json(figures, info)


def crf_figures(model: nn.Module, images: torch.Tensor, crf: CRFParams, repeats: int,
                device: torch.device, report: Callable[[str, float, str], None]
                ) -> dict[int, float]:
    """The CRF stage of pseudo-labelling alone, per 10-slice volume, over `CRFPool`s of 1, 2
    and (when more) all available CPUs' workers: 4 volumes per sample, handed to the pool as
    `make_pseudo_labels` does on this device (2n volumes for n > 2 workers, so that every
    worker has two). Figures ``crf_volume_w<n>`` (s), ``crf_scaling_w<n>`` (speed-up over 1
    worker / n) and ``crf_pool_start_w<n>`` (the first pass's extra seconds: starting the
    processes, each running this script again; the first pool of the process, n = 2, also
    starts `utils.crf`'s fork server). Returns seconds per volume by n."""
    four = [(images[s : s + 10, 0].cpu().numpy(),
             predict_slices(model, images[s : s + 10], device).cpu().numpy())
            for s in range(0, 40, 10)]
    cpus = available_cpus()
    seconds: dict[int, float] = {}
    for n in [1, 2] + ([cpus] if cpus > 2 else []):
        volumes = four * max(1, n // 2)
        with CRFPool(crf, n, eager=device.type == "cuda") as pool:

            def refine(pool: CRFPool = pool, volumes: list = volumes) -> None:
                for pending in [pool.refine(*volume) for volume in volumes]:
                    pending.result()

            t = time.perf_counter()
            refine()
            first = time.perf_counter() - t
            # At most 5 samples: a sample is seconds of CPU work, and its spread is small.
            seconds[n] = timed(refine, min(repeats, 5), device, inner=1) / len(volumes)
        report(f"crf_volume_w{n}", seconds[n], "s")
        if n > 1:
            report(f"crf_scaling_w{n}", seconds[1] / (n * seconds[n]), "x")
            report(f"crf_pool_start_w{n}", first - seconds[n] * len(volumes), "s")
    return seconds


def baseline_figure(cfg: experiment_init.ExperimentConfig, images: torch.Tensor,
                    labels: torch.Tensor, repeats: int, device: torch.device,
                    precision: MixedPrecision, compile_mode: str | None,
                    generator: torch.Generator, cuda_graph: bool = False) -> float:
    """Seconds per baseline iteration (`utils.baseline_training.baseline_stepper`: the
    `UNet` on ``cfg.batch_size`` augmented slices of ``images`` (N, 1, H, W))."""
    model = UNet(cfg.num_classes).to(device, memory_format=torch.channels_last)
    if device.type == "cpu" and not compile_mode:
        cpu_training.install(model)
    if compile_mode:
        model.forward = torch.compile(model.forward, mode=compile_mode)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    s = BaselineSettings(cfg.num_classes, cfg.batch_size)
    slices = torch.arange(images.shape[0])
    guard = NonFiniteGuard(max_consecutive=10)
    iteration = baseline_stepper(model, opt, images, labels, slices, s, soft_dice_loss,
                                 generator, guard, precision, cuda_graph)

    def step() -> None:
        iteration(0)

    return timed(step, repeats, device)


def validation_figure(model: nn.Module, cfg: experiment_init.ExperimentConfig,
                      size: tuple[int, int], repeats: int, device: torch.device) -> float:
    """Seconds per validation as `utils.training.BestKeeper` runs it (`validation_score`,
    native resolution) on two synthetic 10-slice volumes of 1.2 x the crop at 1.4 mm."""
    shape = (int(size[0] * 1.2), int(size[1] * 1.2))
    gen = torch.Generator().manual_seed(1)
    volumes = []
    for i in range(2):
        img, lbl = synthetic_slices(10, shape, cfg.num_classes, gen)
        vol = Volume(f"v{i}", img[:, 0].permute(1, 2, 0).numpy().copy(),
                     lbl.permute(1, 2, 0).numpy().astype("int16"), (1.4, 1.4, 10.0),
                     torch.eye(4).numpy(), None, Path(f"v{i}.nii.gz"), None)
        volumes.append(prepare_volume(vol, cfg.target_resolution, size))

    def validate() -> None:  # in float32, as the trainers validate
        validation_score(model, volumes, cfg.num_classes, device)

    return timed(validate, repeats, device, inner=1)


def validations(iterations: int, every: int) -> int:
    """How many validations `utils.training.Run.train` runs over ``iterations`` iterations:
    every ``every`` from the first, and at the last."""
    return len(range(0, iterations, every)) + ((iterations - 1) % every != 0)


def protocol_seconds(cfg: experiment_init.ExperimentConfig, baseline_step: float,
                     joint_step: float, validation: float, pseudo_label_volume: float) -> float:
    """The dataset's whole default protocol from measured parts: ``n_iter`` baseline steps,
    ``n_rounds`` x ``n_iter_per_round`` joint steps, their validations, and each round's
    pseudo-labels of the unlabeled pool (as 10-slice volumes). The final test evaluations and
    start-up are not counted."""
    n_val = (validations(cfg.n_iter, cfg.val_step_update)
             + cfg.n_rounds * validations(cfg.n_iter_per_round, cfg.val_step_update))
    return (cfg.n_iter * baseline_step + cfg.n_rounds * cfg.n_iter_per_round * joint_step
            + n_val * validation + cfg.n_rounds * len(cfg.unlabeled_ids()) * pseudo_label_volume)


def write_profile(path: Path, step: Callable[[], None], device: torch.device) -> None:
    """torch.profiler's table of 5 calls of ``step`` (after the warm-up), by self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                            else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            step()
        synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=40))


def print_json(figures: list[tuple[str, float, str]], info: dict[str, object]) -> None:
    """One JSON line per figure, with the run's settings."""
    for fig, value, unit in figures:
        print(json.dumps({"name": fig, "value": round(value, 6), "unit": unit, **info}))


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:  # a setting this machine cannot run
        raise SystemExit(f"error: {err}") from None
