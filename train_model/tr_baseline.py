"""Step 1 of the method: the supervised 2D U-Net baseline (METHOD §6).

    python train_model/tr_baseline.py --dataset=acdc --no_of_tr_imgs=tr2 --comb_tr_imgs=c1

Each iteration draws 20 slices uniformly with replacement from the labeled volumes, augments
them (affine, random deformation, intensity), and takes one Adam step on the Dice loss. Every
``val_step_update`` iterations the validation volumes are scored in native resolution and the
best checkpoint is kept; at the end the best checkpoint is evaluated on the test set. The last
line printed is ``run directory: <path>``.
"""

from __future__ import annotations

import utils.wait_policy  # noqa: F401  (before torch: OpenMP reads it once)

import torch

from models import cpu_training
from models.unet import UNet, one_stream_kernels, torch_batch_statistics
from utils.baseline_training import BaselineSettings, baseline_stepper
from utils.dataset import load_slices
from utils.errors import run_main
from utils.flags import BASELINE, parse_flags
from utils.training import on_device, segmentation_loss, start_run


def main(argv: list[str] | None = None) -> None:
    args, cfg = parse_flags(BASELINE, argv, __doc__.splitlines()[0])
    val_ids = cfg.val_ids(args.no_of_tr_imgs, args.comb_tr_imgs)
    with start_run(args, cfg, BASELINE, f"validation {val_ids}, {args.n_iter} iterations") as run:
        images, labels = (t.to(run.device) for t in load_slices(cfg, run.ids["labeled_ids"]))
        slices = torch.arange(images.shape[0])  # drawn from with replacement, on the host
        model = UNet(cfg.num_classes)
        if args.init == "original":
            one_stream_kernels(model)
        if args.bn_stats == "torch":
            torch_batch_statistics(model)
        model = on_device(model, run.device)
        if run.device.type == "cpu":  # same function, less memory and time
            cpu_training.install(model)
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr_seg)
        loss_fn = segmentation_loss(args.dsc_loss, cfg.num_classes)
        run.resume(model, optimizer)

        s = BaselineSettings.from_flags(args, cfg.num_classes, cfg.batch_size)

        iteration = baseline_stepper(model, optimizer, images, labels, slices, s, loss_fn,
                                     run.generator, run.guard, run.precision,
                                     bool(args.cuda_graph), bool(args.compile))
        run.train(model, optimizer, range(args.n_iter), iteration, "baseline", names=("loss_seg",))
        run.finish(model)


if __name__ == "__main__":
    run_main(main)
