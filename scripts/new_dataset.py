"""Write the two configuration files of a dataset in nnU-Net v2's raw format, and say why.

    python scripts/new_dataset.py DATASET_DIR --name NAME [--labeled 1 2 8] [--combinations 5]
        [--validation 2] [--test N] [--seed 0] [--channel 0] [--target_spacing X Y]
        [--max_crop 256] [--config_dir DIR] [--overwrite]

Writes ``init_NAME.py`` and ``data_cfg_NAME.py`` (plain commented modules, edit them freely)
into experiment_init/ (or --config_dir, else ``$LCL_CONFIG_DIR``; a folder other than
experiment_init/ is read with ``LCL_CONFIG_DIR=DIR``) and prints what it chose:

- target in-plane resolution: the median in-plane spacing of the labeled volumes;
- crop size: the smallest multiple of 32 that holds, centred as preprocessing crops, the
  foreground of every labeled volume after resampling, at most --max_crop (the share of
  volumes the cap cuts is printed);
- CRF Gaussian width: ACDC's 10 pixels at 1.36719 mm, the same millimetres at this resolution;
- schedules: ACDC's (init_acdc.py);
- splits: seeded and disjoint test, validation and labeled sets ``tr<k>_c<j>``; the unlabeled
  pool is the remaining labeled cases plus every image without label (imagesTr/, imagesTs/).
"""

from __future__ import annotations

import utils.wait_policy  # noqa: F401  (before torch: OpenMP reads it once)

import argparse
import textwrap
from pathlib import Path

import numpy as np

import experiment_init
from utils.errors import ConfigError, DataError, run_main
from utils.io import load_nifti, nnunet_paths, write_text_atomic
from utils.nnunet import NnunetDataset, read_dataset
from utils.preprocess import rescaled_shape

# ACDC's shipped geometry and CRF (init_acdc.py), the reference the widths are converted from.
ACDC_RESOLUTION = 1.36719
ACDC_G_SXY = 10.0
POOL_KEY, ALL_KEY = "pool", "trall"


def layout_name(channel: int) -> str:
    return "nnunet" if channel == 0 else f"nnunet_ch{channel}"


def geometry(data: NnunetDataset, cases: list[str],
             target: tuple[float, float] | None) -> tuple[tuple[float, float], list[int]]:
    """The target in-plane spacing (mm) and, per labeled case, the centred square side (pixels
    of the target grid) that holds its foreground."""
    spacings, needs = [], []
    for case in cases:
        image_path, label_path = nnunet_paths(data.root, case, data.channel)
        img = load_nifti(label_path)
        spacing = tuple(float(z) for z in img.header.get_zooms()[:2])
        spacings.append(spacing)
        fg = np.asarray(img.dataobj)
        fg = fg.reshape(*fg.shape[:3]) > 0
        needs.append((fg, spacing))
    if target is None:
        target = tuple(float(np.median([s[i] for s in spacings])) for i in range(2))
    sides = []
    for fg, spacing in needs:
        if not fg.any():
            sides.append(0)
            continue
        shape = rescaled_shape(fg.shape[:2], spacing, target)
        side = 0
        for axis in range(2):
            hit = np.flatnonzero(fg.any(axis=tuple(a for a in range(3) if a != axis)))
            scale = shape[axis] / fg.shape[axis]
            lo, hi = hit[0] * scale, (hit[-1] + 1) * scale
            centre = shape[axis] / 2
            side = max(side, int(np.ceil(2 * max(centre - lo, hi - centre))))
        sides.append(side)
    return target, sides


def choose_crop(sides: list[int], cap: int) -> tuple[int, float]:
    """The smallest multiple of 32 holding every side, at most ``cap``; and the share of
    volumes whose foreground it cuts."""
    crop = min(max(32, -(-max(sides) // 32) * 32), cap)
    return crop, float(np.mean([s > crop for s in sides]))


def splits(labeled: list[str], unlabeled: list[str], sizes: list[int], combinations: int,
           n_val: int, n_test: int, seed: int) -> dict:
    """Seeded, disjoint test / validation / labeled sets; ConfigError when too few cases."""
    need = n_test + n_val + max(sizes)
    if need > len(labeled):
        raise ConfigError(f"the dataset has {len(labeled)} labeled cases, but --test {n_test} + "
                          f"--validation {n_val} + the largest --labeled {max(sizes)} need "
                          f"{need}; ask for fewer")
    rng = np.random.default_rng(seed)
    order = [labeled[i] for i in rng.permutation(len(labeled))]
    test, val, rest = sorted(order[:n_test]), sorted(order[n_test:n_test + n_val]), \
        order[n_test + n_val:]
    sets = {}
    for k in sizes:
        for j in range(1, combinations + 1):
            sets[f"tr{k}_c{j}"] = sorted(rest[i] for i in rng.choice(len(rest), k, replace=False))
    sets[ALL_KEY] = sorted(rest)
    sets[POOL_KEY] = sorted(rest) + list(unlabeled)
    return {"labeled": sets, "validation": {k: val for k in sets if k != POOL_KEY},
            "test": test}


def init_text(name: str, data: NnunetDataset, target: tuple[float, float], crop: int,
              why_crop: str) -> str:
    g_sxy = round(ACDC_G_SXY * ACDC_RESOLUTION / target[0], 2)
    comment = textwrap.fill(f"Target: the median in-plane spacing of the labeled volumes (or "
                            f"--target_spacing). Crop: {why_crop}.", 98,
                            initial_indent="# ", subsequent_indent="# ")
    return f'''"""Experiment settings of {name}, written by scripts/new_dataset.py: nnU-Net raw
dataset {data.root.name}, channel {data.channel} ({data.channel_name}).

Edit freely: every name here takes effect (a flag given on the command line overrides the five
that are flag defaults) and any other name is an error, see experiment_init/__init__.py.
"""

# Geometry after preprocessing: crop size in pixels, in-plane target spacing in mm.
{comment}
img_size_x = {crop}
img_size_y = {crop}
target_resolution = ({target[0]:.6g}, {target[1]:.6g})

# Classes (0 = background), from dataset.json's labels.
num_classes = {len(data.structures) + 1}
struct_name = {list(data.structures)!r}

# Optimisation: ACDC's schedule (init_acdc.py).
lr = 0.001  # Adam learning rate (--lr_seg default)
batch_size = 20  # slices per supervised batch
mtask_bs = 20  # labeled slices for the Dice term of a joint batch
batch_size_ft = 10  # contrastive pairs per joint batch (--bt_size default)
val_step_update = 50  # validate every this many iterations
n_iter = 5001  # baseline iterations (--n_iter default)
n_iter_per_round = 5000  # joint iterations per self-training round (--n_iter_per_round default)
n_rounds = 3  # self-training rounds (--n_rounds default)

# Joint-training batch construction: labeled Dice slices need at least this many labels.
min_labels_dice_slice = 3

# Dense CRF of the pseudo-labels; spatial stds in pixels of the cropped grid. g_sxy: ACDC's
# 10 px at 1.36719 mm, the same millimetres at {target[0]:.6g} mm; the rest as ACDC's.
crf_params = dict(a_sxy=0.01, a_srgb=0.5, a_w1=10.0, g_sxy={g_sxy}, g_w2=30.0, n_iter=30)

# Data locations: the nnU-Net dataset folder as it is (absolute path), cropped volumes in the
# dataset's data folder (see experiment_init.load).
data_layout = "{layout_name(data.channel)}"  # nnU-Net raw layout, channel {data.channel}
data_path_tr = {str(data.root.resolve())!r}
data_path_tr_cropped = "cropped"  # written by scripts/create_cropped_imgs.py
srt_dir = "runs"  # output root (relative to the repository)
'''


def _table(name: str, table: dict[str, list[str]]) -> str:
    rows = "".join(textwrap.fill(f"{k!r}: {v!r},", 98, initial_indent="    ",
                                 subsequent_indent="        ", break_on_hyphens=False) + "\n"
                   for k, v in table.items())
    return f"{name} = {{\n{rows}}}\n"


def data_cfg_text(name: str, chosen: dict, seed: int, n_unlabeled: int) -> str:
    return (f'''"""Case splits of {name}, written by scripts/new_dataset.py (seed {seed}).

Disjoint test, validation and labeled sets tr<k>_c<j>; '{ALL_KEY}' is every labeled case outside
test and validation (the upper bound); '{POOL_KEY}' (the unlabeled pool) adds the {n_unlabeled}
images without label.
"""

''' + _table("labeled", chosen["labeled"]) + "\n" + _table("validation", chosen["validation"])
            + "\n" + textwrap.fill(f"test = {chosen['test']!r}", 98, subsequent_indent="    ",
                                   break_on_hyphens=False) + f"\n\nunlabeled_pool = {POOL_KEY!r}\n"
            f"upper_bound = {ALL_KEY!r}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset_dir", type=Path, help="an nnU-Net raw dataset folder")
    parser.add_argument("--name", required=True, help="the --dataset name of the new dataset")
    parser.add_argument("--labeled", type=int, nargs="+", default=[1, 2, 8],
                        help="sizes of the labeled sets tr<k>")
    parser.add_argument("--combinations", type=int, default=5, help="sets c1.. of each size")
    parser.add_argument("--validation", type=int, default=2, help="validation cases")
    parser.add_argument("--test", type=int, default=None,
                        help="test cases (default: the labeled cases left after validation and "
                             "the largest labeled set, at most half of them)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits")
    parser.add_argument("--channel", type=int, default=0, help="the image channel read")
    parser.add_argument("--target_spacing", type=float, nargs=2, default=None,
                        metavar=("X", "Y"), help="in-plane target spacing in mm")
    parser.add_argument("--max_crop", type=int, default=256, help="largest crop side (pixels)")
    parser.add_argument("--config_dir", type=Path, default=None,
                        help="folder for the files (default $LCL_CONFIG_DIR, else "
                             "experiment_init/; read one elsewhere with LCL_CONFIG_DIR=DIR)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files")
    args = parser.parse_args()
    if not args.name.isidentifier():
        raise ConfigError(f"--name {args.name!r}: use letters, digits and underscores")
    if min(args.labeled) < 1 or args.combinations < 1 or args.validation < 1:
        raise ConfigError("--labeled, --combinations and --validation must be at least 1")
    if args.max_crop < 32 or args.max_crop % 32:
        raise ConfigError(f"--max_crop {args.max_crop}: a multiple of 32 is needed")
    folder = experiment_init.config_folder(args.config_dir)
    outputs = [folder / f"init_{args.name}.py", folder / f"data_cfg_{args.name}.py"]
    existing = [p for p in outputs if p.exists()]
    if existing and not args.overwrite:
        raise ConfigError(f"{existing[0]}: exists; pass --overwrite to replace it")
    data = read_dataset(args.dataset_dir, args.channel)
    labeled = list(data.labeled)
    if not labeled:
        raise DataError(f"{args.dataset_dir / 'labelsTr'}: no labeled case")
    n_test = args.test
    if n_test is None:
        n_test = max(1, min(len(labeled) // 2,
                            len(labeled) - args.validation - max(args.labeled)))
    chosen = splits(labeled, list(data.unlabeled), args.labeled, args.combinations,
                    args.validation, n_test, args.seed)
    target, sides = geometry(data, labeled, tuple(args.target_spacing)
                             if args.target_spacing else None)
    crop, cut = choose_crop(sides, args.max_crop)
    why_crop = (f"the smallest multiple of 32 holding the centred foreground of every labeled "
                f"volume (largest {max(sides)} px), capped at {args.max_crop}; cuts "
                f"{cut:.0%} of the volumes")
    print(f"{data.root}: {len(labeled)} labeled and {len(data.unlabeled)} unlabeled cases, "
          f"channel {data.channel} ({data.channel_name}), structures "
          f"{', '.join(data.structures)}")
    how = "given" if args.target_spacing else "median in-plane spacing of the labeled volumes"
    print(f"target resolution {target[0]:.4g} x {target[1]:.4g} mm ({how})")
    print(f"crop {crop} x {crop}: {why_crop}")
    print(f"CRF g_sxy {ACDC_G_SXY * ACDC_RESOLUTION / target[0]:.2f} px (ACDC's 10 px at "
          f"{ACDC_RESOLUTION} mm); schedules as init_acdc.py")
    sets = [k for k in chosen["labeled"] if k not in (ALL_KEY, POOL_KEY)]
    print(f"splits (seed {args.seed}): test {len(chosen['test'])}, validation "
          f"{args.validation}, labeled sets {', '.join(sets)}, {ALL_KEY} "
          f"{len(chosen['labeled'][ALL_KEY])}, pool {len(chosen['labeled'][POOL_KEY])}")
    for k in args.labeled:
        drawn = {tuple(chosen["labeled"][f"tr{k}_c{j}"]) for j in range(1, args.combinations + 1)}
        if len(drawn) < args.combinations:
            print(f"note: tr{k} has {len(drawn)} distinct sets of its {args.combinations} "
                  f"({len(chosen['labeled'][ALL_KEY])} cases to draw from)")
    write_text_atomic(outputs[0], init_text(args.name, data, target, crop, why_crop))
    write_text_atomic(outputs[1], data_cfg_text(args.name, chosen, args.seed,
                                                len(data.unlabeled)))
    # Read back as the trainers read it, so that a file that would not load fails here.
    experiment_init.load(args.name, config_dir=folder)
    for path in outputs:
        print(f"wrote {path}")


if __name__ == "__main__":
    run_main(main)
