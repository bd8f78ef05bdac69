"""Experiment settings for ACDC (cardiac cine MRI, ED frame): geometry, classes, paths, training.

Edit freely: every name here takes effect (a flag given on the command line overrides
the five that are flag defaults) and any other name is an error, see experiment_init/__init__.py.
The names keep the meaning they had in the original code. Paths are relative to
the repository unless you set ``LCL_DATA_ROOT`` / ``LCL_RUNS_ROOT`` or pass ``--data_root`` /
``--out_dir`` (see README, "Where data and outputs live").
"""

# Geometry after preprocessing (METHOD §2): crop size in pixels, in-plane target spacing in mm.
img_size_x = 192
img_size_y = 192
target_resolution = (1.36719, 1.36719)

# Classes (0 = background).
num_classes = 4
struct_name = ["rv", "myo", "lv"]

# Optimisation.
lr = 0.001  # Adam learning rate (--lr_seg default)
batch_size = 20  # slices per supervised batch (METHOD §6)
mtask_bs = 20  # labeled slices for the Dice term of a joint batch (METHOD §7)
batch_size_ft = 10  # contrastive pairs B per joint batch (--bt_size default)
val_step_update = 50  # validate every this many iterations
n_iter = 5001  # baseline iterations (tr_baseline.py --n_iter default)
n_iter_per_round = 5000  # joint iterations per self-training round (--n_iter_per_round default)
n_rounds = 3  # self-training rounds (--n_rounds default)

# Joint-training batch construction: labeled Dice slices need at least this many labels.
min_labels_dice_slice = 3

# Dense CRF of the pseudo-labels (METHOD §7.2); spatial stds in pixels of the cropped grid.
crf_params = dict(a_sxy=0.01, a_srgb=0.5, a_w1=10.0, g_sxy=10.0, g_w2=30.0, n_iter=30)

# Data locations (relative to the dataset folder, see experiment_init.load).
data_layout = "acdc"  # which raw-layout reader of utils/io.py to use
data_path_tr = "raw"  # raw ACDC layout: patientNNN/patientNNN_frameXX[_gt].nii.gz + Info.cfg
data_path_tr_cropped = "cropped"  # written by scripts/create_cropped_imgs.py
srt_dir = "runs"  # output root (relative to the repository)
