"""Comparison method ``bcp``: bidirectional copy-paste (Bai et al., CVPR 2023, as
DeepMed-Lab-ECNU/BCP code/ACDC_BCP_train.py).

    python train_model/bcp.py --dataset=acdc --no_of_tr_imgs=tr2 --comb_tr_imgs=c1

Stage 1 (``--pre_iter`` iterations, from scratch): copy-paste pre-training on labeled slices,
each of ``--labeled_bs``/2 (6) slices with a rectangle of ``--mask_ratio`` (2/3) of the side
from another labeled slice pasted in. Stage 2 (``--n_iter`` iterations): student and EMA
teacher (``--ema_decay`` 0.99 of the whole state_dict, as BCP's) both start from stage 1's best
checkpoint (optimizer included); each iteration mixes ``--labeled_bs`` labeled and
``--unlabeled_bs`` (12) pool slices both ways, a labeled slice around an unlabeled rectangle and
an unlabeled slice around a labeled one, against the labels and the teacher's pseudo-labels
(argmax, largest connected component per class), pseudo-labeled regions weighted
``--u_weight`` (0.5); loss (Dice + cross-entropy) / 2 (`utils.bcp_training`). Slices are
augmented as the baseline's batch. As BCP's, stage 2's best checkpoint is the best of stage 2
(its first validation replaces stage 1's), tested at the end. The last line printed is
``run directory: <path>``.
"""

from __future__ import annotations

import utils.wait_policy  # noqa: F401  (before torch: OpenMP reads it once)

import torch

from models import cpu_training
from models.ema import ema_update, freeze
from models.unet import UNet, one_stream_kernels, torch_batch_statistics
from utils.baseline_training import BaselineSettings
from utils.bcp_training import BCPSettings, bcp_stepper
from utils.dataset import load_pool, load_slices, unlabeled_slices
from utils.errors import ConfigError, run_main
from utils.flags import BCP, parse_flags
from utils.self_training import restore_best
from utils.training import on_device, start_run


def main(argv: list[str] | None = None) -> None:
    args, cfg = parse_flags(BCP, argv, __doc__.splitlines()[0])
    for flag in ("labeled_bs", "unlabeled_bs"):
        if getattr(args, flag) % 2:
            raise ConfigError(f"--{flag}={getattr(args, flag)}: bcp mixes two halves of its "
                              "batch; use an even number")
    plan = (f"pool {len(cfg.unlabeled_ids())} volumes, {args.pre_iter} copy-paste + "
            f"{args.n_iter} bidirectional copy-paste iterations")
    with start_run(args, cfg, BCP, plan) as run:
        device = run.device
        lab = tuple(t.to(device) for t in load_slices(cfg, run.ids["labeled_ids"]))
        unl = tuple(t.to(device) for t in unlabeled_slices(load_pool(cfg, run.ids["pool_ids"])))
        model, teacher = UNet(cfg.num_classes), UNet(cfg.num_classes)
        if args.init == "original":
            one_stream_kernels(model)
        if args.bn_stats == "torch":
            torch_batch_statistics(model)
        model, teacher = on_device(model, device), freeze(on_device(teacher, device))
        if device.type == "cpu":  # same function, less memory and time
            for net in (model, teacher):
                cpu_training.install(net)
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr_seg)
        settings = BCPSettings(
            BaselineSettings.from_flags(args, cfg.num_classes, args.labeled_bs),
            BaselineSettings.from_flags(args, cfg.num_classes, args.unlabeled_bs),
            args.u_weight, args.mask_ratio)
        run.resume(model, optimizer, teacher=teacher)
        stage1, stage2 = range(args.pre_iter), range(args.pre_iter, args.pre_iter + args.n_iter)

        step = bcp_stepper(model, None, optimizer, lab, None, settings, run.generator,
                           run.guard, run.precision)
        run.train(model, optimizer, stage1, step, "bcp stage 1 (copy-paste)",
                  names=("loss", "loss_dice", "loss_ce"), best_extra={"stage": 1})

        if run.start_iteration <= stage2.start:  # stage 2 begins here (not resumed inside it)
            run.stop_if_requested(stage2.start - 1)
            teacher.load_state_dict(restore_best(run, model, optimizer).state_dict())
            run.keeper.lower_bar(-1.0)  # BCP's stage 2 keeps its own best
        step = bcp_stepper(model, teacher, optimizer, lab, unl, settings, run.generator,
                           run.guard, run.precision)

        def iteration(it: int) -> tuple[torch.Tensor, ...]:
            losses = step(it)  # the student's update
            ema_update(teacher, model, args.ema_decay, buffers=True)  # then the teacher's
            return losses

        run.train(model, optimizer, stage2, iteration, "bcp stage 2 (bidirectional)",
                  names=("loss", "loss_dice", "loss_ce"), best_extra={"stage": 2})
        run.finish(model)


if __name__ == "__main__":
    run_main(main)
