"""Comparison method ``self_training``: the proposed method's self-training rounds without its
local contrastive loss (pseudo-labels + segmentation loss only).

    python train_model/self_training.py --dataset=acdc --no_of_tr_imgs=tr2 --comb_tr_imgs=c1

As the joint step (train_model/prop_method_joint_tr_rand_init.py): the encoder and decoder
start from the best baseline checkpoint of the same tag/tr/comb/ver (``--pretr_dir``; the
segmentation head from scratch, the batch-norm statistics as ``--bn_stats``), and each of
``--n_rounds`` rounds (`utils.self_training`) pseudo-labels the unlabeled pool with the best
model so far (dense CRF, ``--crf``) and trains ``--n_iter_per_round`` iterations; rounds after
the first restore the best checkpoint, optimizer included (``--best_selection``).

Batch (`utils.pseudo_label_training`): the joint step's ``mtask_bs`` labeled slices (20) plus
as many pseudo-labeled slices, both drawn from the slices with at least
``min_labels_dice_slice`` labels (pseudo-labels with none such: those with the most), each half
augmented as the joint step's labeled batch (affine, random deformation, intensity per
``--ri_en``/``--intensity_with_deformation``); one Adam step on the segmentation loss
(``--dsc_loss``) of all 2 x mtask_bs slices. The best checkpoint is
evaluated on the test set; the last line printed is ``run directory: <path>``.
"""

from __future__ import annotations

import utils.wait_policy  # noqa: F401  (before torch: OpenMP reads it once)

import torch

from losses.segmentation_loss import segmentation_loss
from models import cpu_training
from models.unet import UNet, one_stream_kernels, torch_batch_statistics
from utils.baseline_training import BaselineSettings
from utils.dataset import load_pool, load_slices
from utils.errors import TrainingStopped, run_main
from utils.flags import SELF_TRAINING, parse_flags
from utils.pseudo_label_training import pseudo_label_stepper
from utils.run import load_checkpoint
from utils.sampling import pseudo_dice_index, slices_with_min_labels
from utils.self_training import (
    describe,
    find_baseline,
    labelling_from_flags,
    self_training_rounds,
)
from utils.training import on_device, start_run


def main(argv: list[str] | None = None) -> None:
    args, cfg = parse_flags(SELF_TRAINING, argv, __doc__.splitlines()[0])
    baseline_ckpt = find_baseline(cfg, args)
    baseline = load_checkpoint(baseline_ckpt)["model"]
    plan = (f"pool {len(cfg.unlabeled_ids())} volumes, {args.n_rounds} rounds x "
            f"{args.n_iter_per_round} iterations, segmentation loss only")
    with start_run(args, cfg, SELF_TRAINING, plan, baseline_checkpoint=str(baseline_ckpt)) as run:
        device = run.device
        lab = tuple(t.to(device) for t in load_slices(cfg, run.ids["labeled_ids"]))
        lab_index = slices_with_min_labels(lab[1], cfg.num_classes,
                                           cfg.min_labels_dice_slice).cpu()
        pool = load_pool(cfg, run.ids["pool_ids"])
        model = UNet(cfg.num_classes)
        if args.init == "original":
            one_stream_kernels(model)  # the head's start; the rest is the baseline's
        model = on_device(model, device)
        if device.type == "cpu":  # same function, less memory and time
            cpu_training.install(model)
        model.load_encoder_decoder(baseline)
        if args.bn_stats == "torch":
            torch_batch_statistics(model)
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr_seg)
        loss_fn = segmentation_loss(args.dsc_loss, cfg.num_classes)
        settings = BaselineSettings.from_flags(args, cfg.num_classes, cfg.mtask_bs)
        run.resume(model, optimizer)

        for rnd in self_training_rounds(run, model, optimizer, baseline, pool,
                                        labelling_from_flags(args, cfg), args.n_rounds,
                                        args.n_iter_per_round):
            pseudo = (rnd.pseudo.images.to(device), rnd.pseudo.labels.to(device))
            unl_index, met = pseudo_dice_index(pseudo[1], cfg.num_classes,
                                               cfg.min_labels_dice_slice)
            if unl_index.numel() == 0:
                raise TrainingStopped(
                    f"round {rnd.index + 1}: the pseudo-labels hold no structure in any slice; "
                    f"is the baseline {baseline_ckpt} trained (see its test_results)?")
            print(describe(rnd, args.n_rounds, f"{unl_index.numel()} slices with " + (
                f"at least {cfg.min_labels_dice_slice} labels" if met else
                f"the most labels (none has {cfg.min_labels_dice_slice})"), bool(args.crf)),
                flush=True)

            iteration = pseudo_label_stepper(model, optimizer, lab, pseudo, lab_index, unl_index,
                                             settings, loss_fn, run.generator, run.guard,
                                             run.precision)
            run.train(model, optimizer, rnd.iterations, iteration,
                      f"self-training round {rnd.index + 1}", names=("loss_seg",),
                      best_extra={"round": rnd.index + 1}, progress_extra=rnd.checkpoint,
                      lower_bar_at_end=args.best_selection == "original")
        run.finish(model)


if __name__ == "__main__":
    run_main(main)
