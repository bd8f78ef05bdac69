"""Every command-line flag of the two trainers, which step reads it, and how its value is found.

The steps are ``baseline`` (train_model/tr_baseline.py) and ``joint``
(train_model/prop_method_joint_tr_rand_init.py); the comparison methods ``self_training``,
``mean_teacher`` and ``bcp`` (train_model/<name>.py) are steps of their own. Each trainer's
parser is `parser(step)`; the pipeline script asks this module which of its two steps each of
its flags goes to:

    python -m utils.flags route --n_iter 4 --lamda_local 0.2 --ver 1
    baseline=(--n_iter 4 --ver 1)
    joint=(--lamda_local 0.2 --ver 1)

The output is two bash array assignments, each word quoted for the shell.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from experiment_init import ExperimentConfig, dataset_help, load
from utils.crf import CRFParams
from utils.errors import ConfigError

BASELINE = "baseline"
JOINT = "joint"
STEPS = (BASELINE, JOINT)  # the two steps of the method (the pipeline script's)
# The comparison methods (README "Comparison methods"), each its own trainer and run directory.
SELF_TRAINING = "self_training"
MEAN_TEACHER = "mean_teacher"
BCP = "bcp"
METHODS = (SELF_TRAINING, MEAN_TEACHER, BCP)
# The steps that label the unlabeled pool in self-training rounds (utils.self_training).
ROUNDS = (JOINT, SELF_TRAINING)
# The steps with an EMA teacher on the unlabeled pool (utils.mean_teacher).
TEACHER = (MEAN_TEACHER, BCP)


def positive_int(text: str) -> int:
    """argparse type of a count that must be at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


@dataclass(frozen=True)
class Flag:
    """One flag: ``options`` are argparse's keywords; ``steps`` the trainers that accept it;
    ``routed`` the steps the pipeline script gives it to (default: ``steps``); ``resume_free``
    says it may differ between an interrupted run and its resumption."""

    name: str
    steps: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)
    routed: tuple[str, ...] | None = None
    resume_free: bool = False

    def takes_value(self) -> bool:
        return self.options.get("action") != "store_true"


def _both(name: str, resume_free: bool = False, methods: tuple[str, ...] = METHODS,
          **options: Any) -> Flag:
    """A flag of both steps of the method and of the comparison ``methods`` (default all)."""
    return Flag(name, STEPS + methods, options, routed=STEPS, resume_free=resume_free)


def _joint(name: str, resume_free: bool = False, **options: Any) -> Flag:
    return Flag(name, (JOINT,), options, resume_free=resume_free)


def _rounds(name: str, resume_free: bool = False, **options: Any) -> Flag:
    """A flag of the self-training rounds: the joint step's and the self_training method's."""
    return Flag(name, ROUNDS, options, routed=(JOINT,), resume_free=resume_free)


def _only(steps: tuple[str, ...], name: str, **options: Any) -> Flag:
    """A flag of comparison methods only (never given by the pipeline script)."""
    return Flag(name, steps, options, routed=())


FLAGS: tuple[Flag, ...] = (
    # The original baseline's flags (METHOD §9).
    _both("dataset", default="acdc",
          help=dataset_help()),
    _both("no_of_tr_imgs", default="tr2", help="labeled set size: tr1, tr2, tr8, ..."),
    _both("comb_tr_imgs", default="c1", help="combination of the labeled set: c1..c5"),
    _both("lr_seg", type=float, default=None,
          help="Adam learning rate (default: lr of experiment_init/init_<dataset>.py)"),
    _both("ver", type=int, default=0, help="version (repeat) number of the run"),
    _both("dsc_loss", type=int, default=2, choices=(0, 1, 2), methods=(SELF_TRAINING, MEAN_TEACHER),
          help="0 weighted cross-entropy, 1 Dice w/o background, 2 Dice with background"),
    _both("rd_en", type=int, default=1, choices=(0, 1), help="random deformation augmentation"),
    _both("sigma", type=float, default=5.0,
          help="std (pixels) of the 3x3 random-deformation grid"),
    _both("ri_en", type=int, default=1, choices=(0, 1), help="random intensity augmentation"),
    _both("intensity_with_deformation", type=int, default=0, choices=(0, 1),
          help="labeled (Dice) batch: 0 as the released code, whose intensity augmentation "
          "reached the batch only with --rd_en 0 (with deformation on, its result was "
          "discarded); 1 both, as the paper describes"),
    _both("en_1hot", type=int, default=1, choices=(0, 1),
          help="1: train on soft one-hot labels after deformation; 0: re-harden them"),
    _both("rd_ni", type=int, default=1,
          help="kept for command-line compatibility; the share of deformed slices is drawn per "
          "batch (METHOD §6)"),
    Flag("n_iter", STEPS + METHODS, dict(
        type=int, default=None,
        help="iterations (default: n_iter of experiment_init/init_<dataset>.py); joint step "
        "and self_training: the whole run, as the original's 15001 (3 rounds x 5000 + 1), so "
        "--n_iter_per_round is n_iter // n_rounds; mean_teacher: the whole run (default: the "
        "method's baseline + joint iterations, n_iter + n_rounds x n_iter_per_round of the "
        "init file); bcp: its stage 2 (default: the joint step's n_rounds x n_iter_per_round; "
        "stage 1 is --pre_iter)"), routed=(BASELINE,)),
    # Device, seed and paths.
    _both("device", resume_free=True, default="auto", help="auto | cpu | cuda"),
    _both("seed", type=int, default=None, help="random seed (default: --ver)"),
    _both("data_root", default=None,
          help="dataset folder holding raw/ and cropped/ (default data/<dataset>)"),
    _both("out_dir", default=None, help="output root (default runs/)"),
    _both("tag", default=None,
          help="variant name: the run goes to <out_dir>/<dataset>/<step>/<tag>/..., apart "
          "from the default runs (the joint step then starts from the baseline of the same tag)"),
    _both("overwrite", resume_free=True, action="store_true",
          help="replace an existing run directory of the same settings"),
    _both("resume", resume_free=True, action="store_true",
          help="continue an interrupted run from its last periodic checkpoint (a run not "
          "started yet starts, a finished one is left as it is)"),
    _both("force_unlock", resume_free=True, action="store_true",
          help="take over the run directory's lock held by a process on another host (check "
          "that it is gone first; a dead process on this host is taken over without it)"),
    _both("ckpt_every", resume_free=True, type=positive_int, default=200,
          help="iterations between periodic checkpoints (for --resume)"),
    _both("no_progress", resume_free=True, action="store_true", help="hide progress bars"),
    _both("amp", default="off", choices=("off", "bf16", "fp16"),
          help="mixed precision of the network's forward: bf16 (CPU with AMX or AVX512-BF16, "
          "or GPU) or fp16 (GPU, with a gradient scaler); losses and optimizer stay float32"),
    _both("cuda_graph", resume_free=True, methods=(), type=int, default=0, choices=(0, 1),
          help="GPU: replay each training iteration from one CUDA graph (fused Adam; a faster "
          "step, the same draws; not with --amp fp16)"),
    _both("compile", resume_free=True, methods=(), type=int, default=0, choices=(0, 1),
          help="GPU: the training forward compiled by torch.compile (about half a minute "
          "more at the start; with --cuda_graph 1 the fastest step)"),
    _both("threads", resume_free=True, type=positive_int, default=None,
          help="CPU threads (default: $OMP_NUM_THREADS, else $SLURM_CPUS_PER_TASK, else the "
          "CPUs this process may run on)"),
    _both("low_memory", resume_free=True, action="store_true",
          help="CPU: return freed tensor memory to the OS after use (lower peak memory, slower "
          "steps)"),
    # The joint step's own (METHOD §7, §9).
    _joint("data_aug", type=int, default=0, choices=(0, 1),
           help="as in the original, only recorded (it named the output folder); the Dice "
           "batch is always augmented"),
    _joint("temp_fac", type=float, default=0.1, help="temperature of the loss"),
    _joint("bbox_dim", type=int, default=150,
           help="kept for command-line compatibility; the local loss uses whole slices"),
    _joint("pretr_n_iter", type=int, default=None,
           help="iterations of the baseline run to start from (checked against its config; "
           "default: the dataset's baseline n_iter)"),
    _rounds("pretr_dir", default=None,
           help="baseline run directory to start from (default: the baseline of the same "
           "dataset/tag/tr/comb/ver/seed under the output root)"),
    _joint("local_loss_exp_no", type=int, default=1, choices=(0, 1),
           help="1 inter-image (default), 0 intra-image local contrastive loss"),
    _joint("lamda_local", type=float, default=0.1, help="weight λ of the local loss"),
    _joint("no_of_neg_eles", type=int, default=3,
           help="kept for command-line compatibility; the original never used it"),
    _joint("no_of_pos_eles", type=positive_int, default=3,
           help="sampled positive pixels per class and image (P)"),
    _joint("bt_size", type=int, default=None,
           help="contrastive pairs per batch (B), even (default: batch_size_ft of "
           "experiment_init/init_<dataset>.py)"),
    _rounds("test_aug_overlap", type=int, default=0, choices=(0, 1),
           help="keep only pool volumes whose two augmented predictions agree"),
    _rounds("test_f1_threshold", type=float, default=0.9,
           help="mean foreground Dice needed by --test_aug_overlap"),
    _rounds("n_rounds", type=int, default=None,
           help="self-training rounds (default: n_rounds of the init file)"),
    _rounds("n_iter_per_round", type=int, default=None,
           help="iterations per round (default: --n_iter // --n_rounds, else "
           "n_iter_per_round of the init file)"),
    _rounds("crf", type=int, default=1, choices=(0, 1),
           help="1: refine pseudo-labels with the dense CRF (the original); 0: argmax"),
    _rounds("crf_workers", resume_free=True, type=positive_int, default=None,
           help="processes refining pseudo-labels with the dense CRF, at most the CPUs this "
           "process may use (default: the run's CPU threads, see --threads); 1: one slice "
           "after another in the trainer; the labels are the same"),
    _rounds("best_selection", default="original", choices=("original", "overall"),
           help="the best checkpoint, restored by each round and tested at the end: "
           "'original' as the released code, whose bar resets at each round's end to its last "
           "validation Dice, so the newest checkpoint that beat it wins; 'overall' the best "
           "validation Dice of all rounds"),
    _both("bn_stats", default="original", choices=("original", "torch"),
          help="batch-norm running statistics: 'original' as the released TF code, starting "
          "at zero and, in the joint step's encoder, decoder and projection head, moved twice "
          "per iteration (its loop ran the training graph twice); 'torch': PyTorch's, from "
          "variance 1, once per iteration"),
    _both("intensity_draws", default="original", choices=("original", "independent"),
          help="brightness shift and contrast factor of an intensity augmentation: "
          "'original' from one uniform draw, as the released graph's two identically seeded "
          "ops (the factor rises with the shift); 'independent': a draw each"),
    _both("init", default="original", choices=("original", "independent"),
          help="the conv kernels' start: 'original' as the released code, each kernel the "
          "leading values of one normal stream (so kernels of one shape start equal); "
          "'independent': each its own He-normal draw"),
    _joint("loss_reduction", default="original", choices=("original", "mean"),
           help="'original': the released code's arithmetic (published numbers); 'mean': the "
           "paper's mean over pairs (see README)"),
    _both("max_bad_steps", type=int, default=20,
          help="stop after this many consecutive non-finite losses"),
    # The comparison methods' own (README "Comparison methods").
    _only(TEACHER, "labeled_bs", type=positive_int, default=12,
          help="labeled slices per batch (SSL4MIS's and BCP's 12 of 24; bcp: even, two halves "
          "a and b)"),
    _only(TEACHER, "unlabeled_bs", type=positive_int, default=12,
          help="unlabeled pool slices per batch (SSL4MIS's and BCP's 12 of 24; bcp: even)"),
    _only(TEACHER, "ema_decay", type=float, default=0.99,
          help="decay of the teacher's exponential moving average of the student's weights"),
    _only((MEAN_TEACHER,), "consistency", type=float, default=0.1,
          help="weight of the consistency loss at the end of its ramp-up"),
    _only((MEAN_TEACHER,), "consistency_rampup", type=int, default=None,
          help="iterations of the sigmoid ramp-up exp(-5 (1 - t)^2) of the consistency weight "
          "(default: the whole run, as SSL4MIS's 200 x 150 of its 30000)"),
    _only((MEAN_TEACHER,), "consistency_start", type=int, default=None,
          help="first iteration with a consistency loss (default: --n_iter // 30, as "
          "SSL4MIS's 1000 of its 30000)"),
    _only((MEAN_TEACHER,), "teacher_noise", type=float, default=0.1,
          help="std of the Gaussian noise on the teacher's input, clipped at twice it"),
    _only((BCP,), "pre_iter", type=int, default=None,
          help="iterations of stage 1, copy-paste pre-training on labeled slices (default: "
          "n_iter of experiment_init/init_<dataset>.py, the baseline's; BCP's 10000)"),
    _only((BCP,), "u_weight", type=float, default=0.5,
          help="loss weight of the pseudo-labeled region of each mixed image (labeled: 1)"),
    _only((BCP,), "mask_ratio", type=float, default=2 / 3,
          help="side of the pasted rectangle as a fraction of the slice's side"),
)

# Flags whose default is a setting of experiment_init/init_<dataset>.py, per step.
INIT_FILE_DEFAULTS = {
    BASELINE: {"lr_seg": "lr", "n_iter": "n_iter"},
    JOINT: {"lr_seg": "lr", "bt_size": "batch_size_ft", "n_rounds": "n_rounds",
            "n_iter_per_round": "n_iter_per_round"},
    SELF_TRAINING: {"lr_seg": "lr", "n_rounds": "n_rounds",
                    "n_iter_per_round": "n_iter_per_round"},
    MEAN_TEACHER: {"lr_seg": "lr"},
    BCP: {"lr_seg": "lr", "pre_iter": "n_iter"},
}

# Flags whose default is computed from init-file settings (and flags resolved before them),
# per step: flag -> (value of (cfg, args), the rule in words for an error).
COMPUTED_DEFAULTS: dict[str, dict[str, tuple[Callable[[Any, Any], Any], str]]] = {
    MEAN_TEACHER: {
        "n_iter": (lambda cfg, a: cfg.n_iter + cfg.n_rounds * cfg.n_iter_per_round,
                   "n_iter + n_rounds x n_iter_per_round"),
        "consistency_rampup": (lambda cfg, a: a.n_iter, "--n_iter"),
        "consistency_start": (lambda cfg, a: a.n_iter // 30, "--n_iter // 30"),
    },
    BCP: {"n_iter": (lambda cfg, a: cfg.n_rounds * cfg.n_iter_per_round,
                     "n_rounds x n_iter_per_round")},
}

# Flags that may differ between an interrupted run and its resumption.
RESUME_FREE_FLAGS = tuple(f.name for f in FLAGS if f.resume_free)

# What a flag's value must be for a run to use it: flag -> (test, the rule in words). Checked
# on the resolved values, before a run directory is made.
VALUE_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr_seg": (lambda v: 0 < v < math.inf, "a positive number"),
    "n_iter": (lambda v: v >= 1, "at least 1"),
    "n_iter_per_round": (lambda v: v >= 1, "at least 1"),
    "n_rounds": (lambda v: v >= 1, "at least 1"),
    "bt_size": (lambda v: v >= 2 and v % 2 == 0, "an even number >= 2 (pairs of pairs)"),
    "ver": (lambda v: v >= 0, "at least 0"),
    "seed": (lambda v: 0 <= v < 2**32, "in 0..2**32-1 (numpy's range)"),
    "sigma": (lambda v: 0 <= v < math.inf, "a number >= 0"),
    "temp_fac": (lambda v: 0 < v < math.inf, "a positive number"),
    "lamda_local": (lambda v: 0 <= v < math.inf, "a number >= 0"),
    "test_f1_threshold": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "max_bad_steps": (lambda v: v >= 1, "at least 1"),
    "ema_decay": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "consistency": (lambda v: 0 <= v < math.inf, "a number >= 0"),
    "consistency_rampup": (lambda v: v >= 0, "at least 0"),
    "consistency_start": (lambda v: v >= 0, "at least 0"),
    "teacher_noise": (lambda v: 0 <= v < math.inf, "a number >= 0"),
    "pre_iter": (lambda v: v >= 1, "at least 1"),
    "u_weight": (lambda v: 0 <= v < math.inf, "a number >= 0"),
    "mask_ratio": (lambda v: 0 < v < 1, "in (0, 1)"),
}


def add_flags(parser: argparse.ArgumentParser, steps: tuple[str, ...] = STEPS) -> None:
    """Add to ``parser`` the flags that every one of ``steps`` accepts."""
    for flag in FLAGS:
        if all(step in flag.steps for step in steps):
            parser.add_argument(f"--{flag.name}", **flag.options)


def parser(step: str, description: str | None = None) -> argparse.ArgumentParser:
    """The command-line parser of one step's trainer."""
    p = argparse.ArgumentParser(description=description)
    add_flags(p, (step,))
    return p


def resolve_flags(
    args: argparse.Namespace, cfg: ExperimentConfig, **settings: str
) -> argparse.Namespace:
    """``args`` with each flag in ``settings`` that was not given (None) set to the init-file
    setting named for it, e.g. ``resolve_flags(args, cfg, lr_seg="lr")``. The result is what
    the run uses and what its config.yaml and checkpoints record."""
    resolved = dict(vars(args))
    for flag, setting in settings.items():
        if resolved[flag] is None:
            resolved[flag] = getattr(cfg, setting)
    return argparse.Namespace(**resolved)


def check_tag(tag: str | None) -> None:
    """A --tag is one directory name: not empty, no path separator, not '.' or '..'."""
    if tag is None:
        return
    if tag.strip() == "" or tag in (".", "..") or any(c in tag for c in "/\\\0"):
        raise ConfigError(f"--tag={tag!r}: a tag names one directory; use a non-empty name "
                          "without path separators, other than '.' and '..'")


def check_values(args: argparse.Namespace, from_init: dict[str, str], dataset: str) -> None:
    """Raise ConfigError for the first flag of ``args`` whose value breaks its `VALUE_RULES`
    rule; ``from_init`` names the flags that took an init-file setting (flag -> setting)."""
    for name, (ok, rule) in VALUE_RULES.items():
        value = getattr(args, name, None)
        if value is None or ok(value):
            continue
        if name in from_init:
            raise ConfigError(f"experiment_init/init_{dataset}.py: {from_init[name]} = {value} "
                              f"(the default of --{name}) must be {rule}")
        raise ConfigError(f"--{name}={value}: must be {rule}")


def parse_flags(
    step: str, argv: list[str] | None = None, description: str | None = None
) -> tuple[argparse.Namespace, ExperimentConfig]:
    """Parse one step's command line, read its dataset's configuration, resolve the flags
    whose default is an init-file setting (`INIT_FILE_DEFAULTS`) and check the values
    (`VALUE_RULES`, and the CRF parameters of a step with rounds), all before any run directory
    exists."""
    args = parser(step, description).parse_args(argv)
    check_tag(args.tag)
    cfg = load(args.dataset, args.data_root, args.out_dir)
    if step in ROUNDS and args.n_iter_per_round is None and args.n_iter is not None:
        # The released joint script's --n_iter (default 15001) counted the whole run.
        rounds = cfg.n_rounds if args.n_rounds is None else args.n_rounds
        if rounds >= 1:
            if args.n_iter < rounds:
                raise ConfigError(f"--n_iter={args.n_iter}: the joint step's whole run (the "
                                  f"original's 15001 = 3 rounds x 5000 + 1) must give each "
                                  f"of its {rounds} rounds an iteration; or set "
                                  f"--n_iter_per_round")
            args.n_iter_per_round = args.n_iter // rounds
    from_init = {flag: setting for flag, setting in INIT_FILE_DEFAULTS[step].items()
                 if getattr(args, flag) is None}
    resolved = resolve_flags(args, cfg, **INIT_FILE_DEFAULTS[step])
    for flag, (value, rule) in COMPUTED_DEFAULTS.get(step, {}).items():
        if getattr(resolved, flag) is None:
            setattr(resolved, flag, value(cfg, resolved))
            from_init[flag] = rule
    check_values(resolved, from_init, cfg.dataset)
    if step in ROUNDS:
        try:
            CRFParams(**cfg.crf_params)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"experiment_init/init_{cfg.dataset}.py: crf_params "
                              f"{cfg.crf_params!r} cannot be used: {err}") from err
    return resolved, cfg


def _flag_words(argv: list[str]):
    """(the Flag or None, its words) of each flag of a command line, in order.

    ``--name=value`` is one word; ``--name value`` two when the flag takes a value. A flag no
    step knows is None, with a following word that does not start with ``--`` as its value."""
    known = {f.name: f for f in FLAGS}
    i = 0
    while i < len(argv):
        word = argv[i]
        name = word[2:].split("=", 1)[0] if word.startswith("--") else None
        flag = known.get(name) if name else None
        words = [word]
        if name and "=" not in word and i + 1 < len(argv):
            follows = argv[i + 1]
            has_value = flag.takes_value() if flag else not follows.startswith("--")
            if has_value:
                words.append(follows)
        i += len(words)
        yield flag, words


def route(argv: list[str]) -> dict[str, list[str]]:
    """Split the pipeline script's flags between the steps (`Flag.routed`), order kept.

    A flag no step knows goes to both, whose parsers then report it."""
    out: dict[str, list[str]] = {step: [] for step in STEPS}
    for flag, words in _flag_words(argv):
        targets = STEPS if flag is None else flag.steps if flag.routed is None else flag.routed
        for step in targets:
            if step in out:
                out[step] += words
    return out


def for_step(argv: list[str], step: str, skip: tuple[str, ...] = ()) -> list[str]:
    """The words of ``argv`` that ``step``'s trainer accepts but for the flags named in
    ``skip`` (a sweep's flags for each of its methods), order kept; a flag no step knows is
    kept, for the parser to report."""
    return [w for flag, words in _flag_words(argv)
            if flag is None or (step in flag.steps and flag.name not in skip) for w in words]


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "route":
        print("usage: python -P -m utils.flags route [trainer flags...]", file=sys.stderr)
        return 2
    for step, words in route(argv[1:]).items():
        print(f"{step}=({' '.join(shlex.quote(w) for w in words)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
