"""Step 2 of the method: pseudo-labels + joint Dice and local contrastive training (METHOD §7).

    python train_model/prop_method_joint_tr_rand_init.py --dataset=acdc --no_of_tr_imgs=tr2 \
        --comb_tr_imgs=c1

The encoder and decoder start from the best baseline checkpoint of the same tr/comb/ver (the
heads start from scratch). Each of ``--n_rounds`` self-training rounds pseudo-labels the
unlabeled pool with the current best model (dense CRF refinement), then trains
``--n_iter_per_round`` iterations on batches of 20 labeled slices (Dice loss) and 2B contrastive
slices (local contrastive loss, weight ``--lamda_local``). Rounds after the first restore the
best checkpoint, optimizer included. The best checkpoint is evaluated on the test set; the last
line printed is ``run directory: <path>``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import experiment_init  # noqa: E402
from experiment_init import ConfigError  # noqa: E402
from models import cpu_training  # noqa: E402
from models.unet import JointUNet, UNet  # noqa: E402
from utils.crf import CRFParams  # noqa: E402
from utils.dataset import (  # noqa: E402
    ensure_demo_data,
    load_eval_volumes,
    load_slices,
    verify_inputs,
)
from utils.device import configure_backend, release_freed_memory, resolve_device  # noqa: E402
from utils.joint_training import JointSettings, build_joint_data, joint_iteration  # noqa: E402
from utils.pseudo_labels import (  # noqa: E402
    SURE_SOFTMAX,
    PseudoLabelRound,
    make_pseudo_labels,
)
from utils.run import (  # noqa: E402
    RunDirError,
    RunLog,
    load_checkpoint,
    save_config,
    seed_everything,
)
from utils.sampling import pair_layout  # noqa: E402
from utils.training import (  # noqa: E402
    BestKeeper,
    NonFiniteGuard,
    TrainingStopped,
    add_common_flags,
    baseline_dir,
    finish_run,
    open_run_dir,
    positive_int,
    resolve_flags,
    restore_progress,
    run_main,
    run_name,
    save_progress,
    segmentation_loss,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_flags(p)
    p.add_argument("--data_aug", type=int, default=0, choices=(0, 1),
                   help="as in the original, only recorded (it named the output folder); the "
                   "Dice batch is always augmented")
    p.add_argument("--temp_fac", type=float, default=0.1, help="temperature of the loss")
    p.add_argument("--bbox_dim", type=int, default=150,
                   help="kept for command-line compatibility; the local loss uses whole slices")
    p.add_argument("--pretr_n_iter", type=int, default=None,
                   help="iterations of the baseline run to start from (checked against its "
                   "config; default: the dataset's baseline n_iter)")
    p.add_argument("--pretr_dir", default=None,
                   help="baseline run directory to start from (default: the baseline of the "
                   "same dataset/tr/comb/ver/seed under the output root)")
    p.add_argument("--local_loss_exp_no", type=int, default=1, choices=(0, 1),
                   help="1 inter-image (default), 0 intra-image local contrastive loss")
    p.add_argument("--lamda_local", type=float, default=0.1, help="weight λ of the local loss")
    p.add_argument("--no_of_neg_eles", type=int, default=3,
                   help="kept for command-line compatibility; the original never used it")
    p.add_argument("--no_of_pos_eles", type=positive_int, default=3,
                   help="sampled positive pixels per class and image (P)")
    p.add_argument("--bt_size", type=int, default=None,
                   help="contrastive pairs per batch (B), even (default: batch_size_ft of "
                   "experiment_init/init_<dataset>.py, 10)")
    p.add_argument("--test_aug_overlap", type=int, default=0, choices=(0, 1),
                   help="keep only pool volumes whose two augmented predictions agree")
    p.add_argument("--test_f1_threshold", type=float, default=0.9,
                   help="mean foreground Dice needed by --test_aug_overlap")
    p.add_argument("--n_rounds", type=int, default=None,
                   help="self-training rounds (default: n_rounds of the init file, 3)")
    p.add_argument("--n_iter_per_round", type=int, default=None,
                   help="iterations per round (default: init file; 5000 as in the paper); "
                   "--n_iter sets the same value")
    p.add_argument("--crf", type=int, default=1, choices=(0, 1),
                   help="1: refine pseudo-labels with the dense CRF (the original); 0: argmax")
    p.add_argument("--loss_reduction", default="original", choices=("original", "mean"),
                   help="'original': the released code's arithmetic (published numbers); "
                   "'mean': the paper's mean over pairs (see README)")
    p.add_argument("--max_bad_steps", type=int, default=20,
                   help="stop after this many consecutive non-finite losses")
    return p.parse_args(argv)


def find_baseline(cfg: experiment_init.ExperimentConfig, args: argparse.Namespace) -> Path:
    base = Path(args.pretr_dir) if args.pretr_dir else baseline_dir(cfg, args)
    path = base / "checkpoints" / "best.pt"
    if not path.is_file():
        raise RunDirError(
            f"{path}: baseline checkpoint not found; run train_model/tr_baseline.py with the same "
            f"--dataset {cfg.dataset} --no_of_tr_imgs {args.no_of_tr_imgs} --comb_tr_imgs "
            f"{args.comb_tr_imgs} --ver {args.ver} first, or pass --pretr_dir"
        )
    return path


def main(argv: list[str] | None = None) -> None:
    start = time.time()
    args = parse_args(argv)
    cfg = experiment_init.load(args.dataset, args.data_root, args.out_dir)
    args = resolve_flags(args, cfg, lr_seg="lr", bt_size="batch_size_ft", n_rounds="n_rounds")
    labeled_ids = cfg.labeled_ids(args.no_of_tr_imgs, args.comb_tr_imgs)
    val_ids = cfg.val_ids(args.no_of_tr_imgs, args.comb_tr_imgs)
    pool_ids = cfg.unlabeled_ids()
    n_rounds = args.n_rounds
    n_iter = args.n_iter_per_round or args.n_iter or cfg.n_iter_per_round
    try:
        pair_layout(args.bt_size, args.local_loss_exp_no == 1)  # validates --bt_size first
    except ValueError as err:
        raise ConfigError(f"{err} (its default is batch_size_ft of "
                          f"experiment_init/init_{cfg.dataset}.py)") from err
    seed = args.seed if args.seed is not None else args.ver
    device = resolve_device(args.device)
    configure_backend(device, args.low_memory)
    generator = seed_everything(seed)
    baseline_ckpt = find_baseline(cfg, args)
    baseline = load_checkpoint(baseline_ckpt, device)  # refused here if it is not plain data
    run_dir = cfg.srt_dir / cfg.dataset / "joint" / run_name(args) / args.loss_reduction
    state = open_run_dir(run_dir, args)
    if state is None:
        flags = {**vars(args), "n_rounds": n_rounds, "n_iter_per_round": n_iter, "seed": seed,
                 "device": str(device), "baseline_checkpoint": str(baseline_ckpt)}
        save_config(run_dir, {"trainer": "prop_method_joint_tr_rand_init", "flags": flags,
                              "config": cfg.to_dict(), "labeled_ids": labeled_ids,
                              "val_ids": val_ids, "pool_ids": pool_ids, "test_ids": cfg.test})
    print(f"joint {cfg.dataset} {args.no_of_tr_imgs}/{args.comb_tr_imgs}: labeled {labeled_ids}, "
          f"pool {len(pool_ids)} volumes, {n_rounds} rounds x {n_iter} iterations, "
          f"reduction '{args.loss_reduction}' on {device}", flush=True)

    ensure_demo_data(cfg)
    verify_inputs(cfg, labeled_ids + pool_ids, val_ids + cfg.test)
    lab_img, lab_lbl = load_slices(cfg, labeled_ids)
    lab_img, lab_lbl = lab_img.to(device), lab_lbl.to(device)
    pool = {sid: load_slices(cfg, [sid]) for sid in pool_ids}
    keeper = BestKeeper(run_dir, load_eval_volumes(cfg, val_ids), cfg.num_classes, device)

    if args.pretr_n_iter is not None:
        print(f"starting from {baseline_ckpt} (best of its run; --pretr_n_iter "
              f"{args.pretr_n_iter})", flush=True)
    model = JointUNet(cfg.num_classes).to(device)
    model.load_encoder_decoder(baseline["model"])
    model = model.to(memory_format=torch.channels_last)
    if device.type == "cpu":
        cpu_training.install(model)  # same function and state_dict, less memory and time
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr_seg)
    dice_loss = segmentation_loss(args.dsc_loss, cfg.num_classes)
    guard = NonFiniteGuard(args.max_bad_steps)
    crf = CRFParams(**cfg.crf_params)
    log = RunLog(run_dir, rows=state["log_rows"] if state else None)
    settings = JointSettings(
        num_classes=cfg.num_classes, n_seg=cfg.mtask_bs, bt_size=args.bt_size,
        no_of_pos_eles=args.no_of_pos_eles, temp_fac=args.temp_fac, lamda_local=args.lamda_local,
        inter_image=args.local_loss_exp_no == 1, loss_reduction=args.loss_reduction,
        rd_en=bool(args.rd_en), sigma=args.sigma,
        ri_en=bool(args.ri_en), en_1hot=bool(args.en_1hot))
    start_it = 0
    if state is not None:
        start_it = restore_progress(state, model, optimizer, keeper, guard, generator)
        print(f"resuming {run_dir} at iteration {start_it}", flush=True)

    for rnd in range(n_rounds):
        first_it = rnd * n_iter
        if first_it + n_iter <= start_it:
            continue  # finished before the interruption
        if state is not None and state["round"] == rnd:
            # resumed inside this round: the same pseudo-labels
            pseudo = PseudoLabelRound(
                images=torch.cat([pool[sid][0] for sid in state["pseudo"]["kept"]]),
                **state["pseudo"])
        else:
            if rnd == 0:  # the first pseudo-labels come from the baseline network itself
                labeler = UNet(cfg.num_classes).to(device)
                if device.type == "cpu":
                    cpu_training.install(labeler)
                labeler.load_state_dict(baseline["model"])
            else:
                best = load_checkpoint(keeper.path, device)
                model.load_state_dict(best["model"])
                optimizer.load_state_dict(best["optimizer"])
                labeler = model
            pseudo = make_pseudo_labels(
                labeler, pool, cfg.num_classes, crf,
                device, generator, bool(args.test_aug_overlap), args.test_f1_threshold,
                progress=not args.no_progress, use_crf=bool(args.crf))
        data, complete = build_joint_data(lab_img, lab_lbl, pseudo.images.to(device),
                                          pseudo.labels.to(device), cfg.num_classes,
                                          cfg.min_labels_dice_slice)
        if data.unl_index.numel() == 0:
            raise TrainingStopped(
                f"round {rnd + 1}: the pseudo-labels hold no structure in any slice, so the "
                f"contrastive term has nothing to work on; is the baseline {baseline_ckpt} "
                "trained (see its test_results)?")
        msg = (f"round {rnd + 1}/{n_rounds}: pseudo-labels for {len(pseudo.kept)} volumes "
               f"({len(pseudo.dropped)} dropped), {data.unl_index.numel()} slices with "
               + ("every class" if complete else "the most classes (none has every class)"))
        if pseudo.unsure_foreground is not None:
            msg += (f"; {pseudo.unsure_foreground:.1%} of predicted foreground pixels have max "
                    f"softmax < {SURE_SOFTMAX}")
        if pseudo.dice_before_crf is not None:
            msg += (f"; pseudo-label Dice vs ground truth {pseudo.dice_before_crf:.4f} before CRF, "
                    f"{pseudo.dice_after_crf:.4f} after" + ("" if args.crf else " (--crf 0)"))
        print(msg, flush=True)
        if start_it <= first_it:
            quality = {} if pseudo.dice_before_crf is None else {
                "pseudo_dice_before_crf": pseudo.dice_before_crf,
                "pseudo_dice_after_crf": pseudo.dice_after_crf}
            if pseudo.unsure_foreground is not None:
                quality["pseudo_unsure_foreground"] = pseudo.unsure_foreground
            log.log(first_it, round=rnd + 1, pseudo_kept=len(pseudo.kept), **quality)

        release_freed_memory()  # of the pseudo-labelling, before training grows the heap
        begin = max(first_it, start_it)
        bar = tqdm(range(begin, first_it + n_iter), desc=f"joint round {rnd + 1}",
                   disable=args.no_progress, dynamic_ncols=True, initial=begin - first_it,
                   total=n_iter)
        for it in bar:
            loss, loss_seg, loss_lcl = joint_iteration(model, optimizer, data, settings,
                                                       dice_loss, generator, guard.ok, it)
            last = it == first_it + n_iter - 1
            if (it - first_it) % cfg.val_step_update == 0 or last:
                val = keeper.update(model, optimizer, it, {"round": rnd + 1})
                log.log(it, loss=loss.item(), loss_seg=loss_seg.item(),
                        loss_local=loss_lcl.item(), val_dice=val, bad_steps=guard.total)
                log.flush()
                bar.set_postfix(dice=f"{loss_seg.item():.3f}", lcl=f"{loss_lcl.item():.3f}",
                                val=f"{val:.3f}", best=f"{keeper.best_score:.3f}")
            if (it + 1) % args.ckpt_every == 0 or last:
                # pseudo-labels as plain data, without their images (re-read from the pool)
                kept = {f.name: getattr(pseudo, f.name) for f in fields(pseudo)
                        if f.name != "images"}
                kept["labels"] = pseudo.labels.cpu()
                save_progress(run_dir, args, it, model, optimizer, keeper, guard, log,
                              generator, round=rnd, pseudo=kept)
    finish_run(model, keeper, guard, log, cfg, run_dir, device, not args.no_progress, start)


if __name__ == "__main__":
    run_main(main)
