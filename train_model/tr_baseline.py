"""Step 1 of the method: the supervised 2D U-Net baseline (METHOD §6).

    python train_model/tr_baseline.py --dataset=acdc --no_of_tr_imgs=tr2 --comb_tr_imgs=c1

Each iteration draws 20 slices uniformly with replacement from the labeled volumes, augments
them (affine, random deformation, intensity), and takes one Adam step on the Dice loss. Every
``val_step_update`` iterations the validation volumes are scored in native resolution and the
best checkpoint is kept; at the end the best checkpoint is evaluated on the test set. The last
line printed is ``run directory: <path>``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

import experiment_init  # noqa: E402
from models import cpu_training  # noqa: E402
from models.unet import UNet  # noqa: E402
from utils.augment import augment_batch, to_onehot  # noqa: E402
from utils.dataset import (  # noqa: E402
    ensure_demo_data,
    load_eval_volumes,
    load_slices,
    verify_inputs,
)
from utils.device import configure_backend, resolve_device  # noqa: E402
from utils.run import (  # noqa: E402
    RunLog,
    save_config,
    seed_everything,
)
from utils.sampling import draw  # noqa: E402
from utils.training import (  # noqa: E402
    BestKeeper,
    NonFiniteGuard,
    add_common_flags,
    baseline_dir,
    finish_run,
    open_run_dir,
    resolve_flags,
    restore_progress,
    run_main,
    save_progress,
    segmentation_loss,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_flags(parser)
    parser.add_argument("--max_bad_steps", type=int, default=20,
                        help="stop after this many consecutive non-finite losses")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    start = time.time()
    args = parse_args(argv)
    cfg = experiment_init.load(args.dataset, args.data_root, args.out_dir)
    args = resolve_flags(args, cfg, lr_seg="lr", n_iter="n_iter")
    labeled_ids = cfg.labeled_ids(args.no_of_tr_imgs, args.comb_tr_imgs)
    val_ids = cfg.val_ids(args.no_of_tr_imgs, args.comb_tr_imgs)
    n_iter = args.n_iter
    seed = args.seed if args.seed is not None else args.ver
    device = resolve_device(args.device)
    configure_backend(device, args.low_memory)
    generator = seed_everything(seed)
    run_dir = baseline_dir(cfg, args)
    state = open_run_dir(run_dir, args)
    if state is None:
        save_config(run_dir, {"trainer": "tr_baseline", "flags": {**vars(args),
                              "seed": seed, "device": str(device)}, "config": cfg.to_dict(),
                              "labeled_ids": labeled_ids, "val_ids": val_ids,
                              "test_ids": cfg.test})
    print(f"baseline {cfg.dataset} {args.no_of_tr_imgs}/{args.comb_tr_imgs}: "
          f"labeled {labeled_ids}, "
          f"validation {val_ids}, {n_iter} iterations on {device}", flush=True)

    ensure_demo_data(cfg)
    verify_inputs(cfg, labeled_ids, val_ids + cfg.test)
    images, labels = load_slices(cfg, labeled_ids)
    images, labels = images.to(device), labels.to(device)
    slices = torch.arange(images.shape[0], device=device)  # drawn from with replacement
    keeper = BestKeeper(run_dir, load_eval_volumes(cfg, val_ids), cfg.num_classes, device)

    model = UNet(cfg.num_classes).to(device, memory_format=torch.channels_last)
    if device.type == "cpu":
        cpu_training.install(model)  # same function and state_dict, less memory and time
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr_seg)
    loss_fn = segmentation_loss(args.dsc_loss, cfg.num_classes)
    guard = NonFiniteGuard(args.max_bad_steps)
    log = RunLog(run_dir, rows=state["log_rows"] if state else None)
    start_it = 0
    if state is not None:
        start_it = restore_progress(state, model, optimizer, keeper, guard, generator)
        print(f"resuming {run_dir} at iteration {start_it}", flush=True)

    bar = tqdm(range(start_it, n_iter), desc="baseline", disable=args.no_progress,
               dynamic_ncols=True, initial=start_it, total=n_iter)
    for it in bar:
        idx = draw(slices, cfg.batch_size, generator, "labeled slice")
        x, y = augment_batch(images[idx], to_onehot(labels[idx], cfg.num_classes), generator,
                             rd_en=bool(args.rd_en), sigma=args.sigma, ri_en=bool(args.ri_en))
        if not args.en_1hot:
            y = F.one_hot(y.argmax(1), cfg.num_classes).permute(0, 3, 1, 2).float()
        model.train()
        loss = loss_fn(model(x.contiguous(memory_format=torch.channels_last)), y)
        if guard.ok(loss, it):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if it % cfg.val_step_update == 0 or it == n_iter - 1:
            val = keeper.update(model, optimizer, it)
            log.log(it, loss_seg=loss.item(), val_dice=val, bad_steps=guard.total)
            log.flush()
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{val:.3f}",
                            best=f"{keeper.best_score:.3f}")
        if (it + 1) % args.ckpt_every == 0 or it == n_iter - 1:
            save_progress(run_dir, args, it, model, optimizer, keeper, guard, log, generator)
    finish_run(model, keeper, guard, log, cfg, run_dir, device, not args.no_progress, start)


if __name__ == "__main__":
    run_main(main)
