"""Build one joint-training batch exactly as the joint trainer does and show what the loss sees.

    python scripts/show_joint_batch.py --dataset demo --no_of_tr_imgs tr2 --comb_tr_imgs c1 \
        [--local_loss_exp_no 0|1] [--seed S] [--pseudo_labels gt|RUN_DIR] --out DIR

Writes ``DIR/joint_batch.npz``:
    images (20 + 2B, 1, H, W) float32: the Dice slices, then contrastive set 1, then set 2;
    labels (20 + 2B, H, W) int: argmax of the (soft) Dice labels, then the contrastive labels;
    pairs (B, 2) int: indices into the last 2B images (set-1 image, set-2 image) of each pair;
    variant: "inter" or "intra".
and ``DIR/joint_batch.png``: the 2B contrastive images in pair order (set 1 above set 2) with
label contours. ``--pseudo_labels gt`` puts the pool's ground truth in place of pseudo-labels
(for inspection only; the figure says so); a RUN_DIR pseudo-labels the pool with that run's
best checkpoint and the dense CRF, as the trainer's first round does with the baseline.
"""

from __future__ import annotations

import utils.wait_policy  # noqa: F401  (before torch: OpenMP reads it once)

import argparse
from pathlib import Path

import numpy as np
import torch

import experiment_init
from models.unet import JointUNet, UNet
from utils.crf import CRFParams
from utils.dataset import ensure_demo_data, load_pool, load_slices
from utils.errors import ConfigError, run_main
from utils.io import atomic_path
from utils.joint_training import JointSettings, build_joint_data, joint_batch
from utils.pseudo_labels import make_pseudo_labels
from utils.run import load_checkpoint, seed_everything
from utils.sampling import pair_layout


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="demo")
    p.add_argument("--no_of_tr_imgs", default="tr2")
    p.add_argument("--comb_tr_imgs", default="c1")
    p.add_argument("--local_loss_exp_no", type=int, default=1, choices=(0, 1),
                   help="1 inter-image pairs (default), 0 intra-image pairs")
    p.add_argument("--bt_size", type=int, default=JointSettings.bt_size,
                   help="contrastive pairs per batch (B)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pseudo_labels", default="gt",
                   help="'gt' (the pool's ground truth, inspection only) or a run directory "
                   "whose checkpoints/best.pt labels the pool")
    p.add_argument("--data_root", default=None, help="as the trainers' --data_root")
    p.add_argument("--out", required=True, help="output folder")
    return p.parse_args(argv)


def pool_labels(
    cfg: experiment_init.ExperimentConfig, pool: dict, source: str, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pool's images (N, 1, H, W) and labels (N, H, W): ground truth or pseudo-labels."""
    if source == "gt":
        unlabeled = [sid for sid, (_, lbl) in pool.items() if lbl is None]
        if unlabeled:
            raise ConfigError(
                f"--pseudo_labels gt: pool volumes {', '.join(unlabeled)} have no ground "
                "truth; pass a run directory to pseudo-label them")
        return (torch.cat([img for img, _ in pool.values()]),
                torch.cat([lbl for _, lbl in pool.values()]))
    ckpt = Path(source) / "checkpoints" / "best.pt"
    state = load_checkpoint(ckpt)["model"]
    model = (JointUNet if any(k.startswith("proj_head.") for k in state) else UNet)(
        cfg.num_classes)
    model.load_state_dict(state)
    pseudo = make_pseudo_labels(model, pool, cfg.num_classes, CRFParams(**cfg.crf_params),
                                torch.device("cpu"), generator)
    return pseudo.images, pseudo.labels


def save_figure(path: Path, images: np.ndarray, labels: np.ndarray, first: list[int],
                second: list[int], title: str, num_classes: int) -> None:
    """2B contrastive images (2B, H, W) with label contours: pair i in column i, set 1 in the
    top row, set 2 below; each column says which picked slices the pair holds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = len(first)
    h = b // 2
    name = [f"L{j}" if j < h else f"U{j - h}" for j in range(b)]
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(2, b, figsize=(1.6 * b, 3.7), squeeze=False)
    for i in range(b):
        for row in range(2):
            ax = axes[row, i]
            k = i + row * b
            ax.imshow(images[k], cmap="gray", vmin=0.0, vmax=1.5)
            for c in range(1, num_classes):
                if (labels[k] == c).any():
                    ax.contour(labels[k] == c, levels=[0.5], colors=[colours(c - 1)],
                               linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, i].set_title(f"pair {i}\n{name[first[i]]}, {name[second[i]]}", fontsize=8)
    axes[0, 0].set_ylabel("set 1", fontsize=8)
    axes[1, 0].set_ylabel("set 2", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    inter = args.local_loss_exp_no == 1
    first, second = pair_layout(args.bt_size, inter)  # validates --bt_size first
    cfg = experiment_init.load(args.dataset, args.data_root)
    ensure_demo_data(cfg)
    generator = seed_everything(args.seed)
    lab_img, lab_lbl = load_slices(cfg, cfg.labeled_ids(args.no_of_tr_imgs, args.comb_tr_imgs))
    pool = load_pool(cfg, cfg.unlabeled_ids())
    unl_img, unl_lbl = pool_labels(cfg, pool, args.pseudo_labels, generator)
    data, _ = build_joint_data(lab_img, lab_lbl, unl_img, unl_lbl, cfg.num_classes,
                               cfg.min_labels_dice_slice)
    settings = JointSettings(num_classes=cfg.num_classes, n_seg=cfg.mtask_bs,
                             bt_size=args.bt_size, inter_image=inter)
    images, y, yc, _ = joint_batch(data, settings, generator)
    b = args.bt_size
    labels = torch.cat([y.argmax(1), yc.argmax(1)]).numpy().astype(np.int64)
    images = images.float().contiguous().numpy()
    variant = "inter" if inter else "intra"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "joint_batch.npz") as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, images=images, labels=labels,
                            pairs=np.stack([np.arange(b), np.arange(b) + b], 1),
                            variant=np.array(variant))
    source = ("ground truth in place of pseudo-labels (inspection only)"
              if args.pseudo_labels == "gt" else f"pseudo-labels of {args.pseudo_labels}")
    title = (f"{cfg.dataset} {args.no_of_tr_imgs}/{args.comb_tr_imgs}, {variant}-image pairs, "
             f"seed {args.seed}; L = labeled, U = pool, {source}")
    n_seg = cfg.mtask_bs
    save_figure(out / "joint_batch.png", images[n_seg:, 0], labels[n_seg:], first.tolist(),
                second.tolist(), title, cfg.num_classes)
    print(f"wrote {out / 'joint_batch.npz'} and {out / 'joint_batch.png'}")


if __name__ == "__main__":
    run_main(main)
