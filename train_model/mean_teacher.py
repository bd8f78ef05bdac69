"""Comparison method ``mean_teacher`` (Tarvainen & Valpola 2017, as SSL4MIS's
train_mean_teacher_2D.py).

    python train_model/mean_teacher.py --dataset=acdc --no_of_tr_imgs=tr2 --comb_tr_imgs=c1

The student (this project's U-Net, from scratch as the baseline) and its teacher, an
exponential moving average of the student's weights (``--ema_decay`` 0.99, SSL4MIS's warm-up
min(1 - 1/(step + 1), 0.99); the teacher gets no gradient and keeps its own batch-norm
statistics). Each iteration (`utils.mean_teacher`) draws ``--labeled_bs`` (12) labeled slices
and ``--unlabeled_bs`` (12) slices of the unlabeled pool, augments both as the baseline's batch,
and takes one Adam step of the student on the segmentation loss (``--dsc_loss``) of the labeled
slices plus w(it) x the mean squared difference between the student's and the teacher's
softmax on the pool slices, the teacher's input with noise N(0, 0.1^2) clipped at +-0.2;
w(it) = 0.1 x exp(-5 (1 - it / rampup)^2), 0 before ``--consistency_start``. Then the EMA
update. Validation, best checkpoint (of the student) and test as the baseline's; periodic
checkpoints hold the teacher. The last line printed is ``run directory: <path>``.
"""

from __future__ import annotations

import utils.wait_policy  # noqa: F401  (before torch: OpenMP reads it once)

import torch

from losses.segmentation_loss import segmentation_loss
from models import cpu_training
from models.ema import ema_update, freeze
from models.unet import UNet, one_stream_kernels, torch_batch_statistics
from utils.baseline_training import BaselineSettings
from utils.dataset import load_pool, load_slices, unlabeled_slices
from utils.errors import run_main
from utils.flags import MEAN_TEACHER, parse_flags
from utils.mean_teacher import MeanTeacherSettings, mean_teacher_stepper
from utils.training import on_device, start_run


def main(argv: list[str] | None = None) -> None:
    args, cfg = parse_flags(MEAN_TEACHER, argv, __doc__.splitlines()[0])
    plan = (f"pool {len(cfg.unlabeled_ids())} volumes, {args.n_iter} iterations of "
            f"{args.labeled_bs} labeled + {args.unlabeled_bs} unlabeled slices")
    with start_run(args, cfg, MEAN_TEACHER, plan) as run:
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
        teacher.load_state_dict(model.state_dict())
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr_seg)
        loss_fn = segmentation_loss(args.dsc_loss, cfg.num_classes)
        settings = MeanTeacherSettings(
            BaselineSettings.from_flags(args, cfg.num_classes, args.labeled_bs),
            BaselineSettings.from_flags(args, cfg.num_classes, args.unlabeled_bs),
            args.teacher_noise, args.consistency, args.consistency_rampup, args.consistency_start)
        run.resume(model, optimizer, teacher=teacher)

        step = mean_teacher_stepper(model, teacher, optimizer, lab, unl, settings, loss_fn,
                                    run.generator, run.guard, run.precision)

        def iteration(it: int) -> tuple[torch.Tensor, ...]:
            losses = step(it)  # the student's update
            ema_update(teacher, model, args.ema_decay, step=it)  # then the teacher's
            return losses

        run.train(model, optimizer, range(args.n_iter), iteration, "mean teacher",
                  names=("loss", "loss_seg", "loss_cons"))
        run.finish(model)


if __name__ == "__main__":
    run_main(main)
