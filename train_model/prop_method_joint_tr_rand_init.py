"""Step 2 of the method: pseudo-labels + joint Dice and local contrastive training (METHOD §7).

    python train_model/prop_method_joint_tr_rand_init.py --dataset=acdc --no_of_tr_imgs=tr2 \
        --comb_tr_imgs=c1

The encoder and decoder start from the best baseline checkpoint of the same tag/tr/comb/ver
(the heads start from scratch). Each of ``--n_rounds`` self-training rounds
(`utils.self_training`) pseudo-labels the unlabeled pool with the current best model (dense CRF
refinement), then trains ``--n_iter_per_round`` iterations of this file's step on batches of 20
labeled slices (Dice loss) and 2B contrastive slices (local contrastive loss, weight
``--lamda_local``). Rounds after the first restore the best checkpoint, optimizer included.
The best checkpoint is evaluated on the test set; the last line printed is
``run directory: <path>``.
"""

from __future__ import annotations

import utils.wait_policy  # noqa: F401  (before torch: OpenMP reads it once)

import torch

from losses.segmentation_loss import segmentation_loss
from models import cpu_training
from models.unet import (
    JointUNet,
    one_stream_kernels,
    repeat_running_updates,
    torch_batch_statistics,
)
from utils.dataset import load_pool, load_slices
from utils.errors import TrainingStopped, run_main
from utils.flags import JOINT, parse_flags
from utils.joint_training import JointSettings, build_joint_data, joint_stepper
from utils.run import load_checkpoint
from utils.self_training import (
    describe,
    find_baseline,
    labelling_from_flags,
    self_training_rounds,
)
from utils.training import on_device, start_run


def main(argv: list[str] | None = None) -> None:
    args, cfg = parse_flags(JOINT, argv, __doc__.splitlines()[0])
    baseline_ckpt = find_baseline(cfg, args)
    baseline = load_checkpoint(baseline_ckpt)["model"]  # refused here if it is not plain data
    plan = (f"pool {len(cfg.unlabeled_ids())} volumes, {args.n_rounds} rounds x "
            f"{args.n_iter_per_round} iterations, reduction '{args.loss_reduction}'")
    with start_run(args, cfg, JOINT, plan, baseline_checkpoint=str(baseline_ckpt)) as run:
        device = run.device
        lab_img, lab_lbl = (t.to(device) for t in load_slices(cfg, run.ids["labeled_ids"]))
        pool = load_pool(cfg, run.ids["pool_ids"])
        if args.pretr_n_iter is not None:
            print(f"starting from {baseline_ckpt} (best of its run; --pretr_n_iter "
                  f"{args.pretr_n_iter})", flush=True)
        model = JointUNet(cfg.num_classes)
        if args.init == "original":
            one_stream_kernels(model)  # the heads' start; the rest is the baseline's
        model = on_device(model, device)
        if device.type == "cpu":  # same function, less memory and time
            cpu_training.install(model)
        model.load_encoder_decoder(baseline)
        if args.bn_stats == "original":
            repeat_running_updates([model.encoder, model.decoder, model.proj_head], 2)
        else:
            torch_batch_statistics(model)
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr_seg)
        dice_loss = segmentation_loss(args.dsc_loss, cfg.num_classes)
        settings = JointSettings.from_flags(args, cfg.num_classes, cfg.mtask_bs)
        run.resume(model, optimizer)

        labelling = labelling_from_flags(args, cfg)
        for rnd in self_training_rounds(run, model, optimizer, baseline, pool, labelling,
                                        args.n_rounds, args.n_iter_per_round):
            data, complete = build_joint_data(lab_img, lab_lbl, rnd.pseudo.images.to(device),
                                              rnd.pseudo.labels.to(device), cfg.num_classes,
                                              cfg.min_labels_dice_slice)
            if data.unl_index.numel() == 0:
                raise TrainingStopped(
                    f"round {rnd.index + 1}: the pseudo-labels hold no structure in any slice, "
                    "so the contrastive term has nothing to work on; is the baseline "
                    f"{baseline_ckpt} trained (see its test_results)?")
            print(describe(rnd, args.n_rounds, f"{data.unl_index.numel()} slices with " + (
                "every class" if complete else "the most classes (none has every class)"),
                bool(args.crf)), flush=True)

            iteration = joint_stepper(model, optimizer, data, settings, dice_loss, run.generator,
                                      run.guard, run.precision, bool(args.cuda_graph),
                                      bool(args.compile))
            run.train(model, optimizer, rnd.iterations, iteration, f"joint round {rnd.index + 1}",
                      names=("loss", "loss_seg", "loss_local"),
                      best_extra={"round": rnd.index + 1}, progress_extra=rnd.checkpoint,
                      lower_bar_at_end=args.best_selection == "original")
        run.finish(model)


if __name__ == "__main__":
    run_main(main)
