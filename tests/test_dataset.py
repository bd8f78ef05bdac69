"""utils/dataset.py: cropping and loading, with unlabeled pool volumes that have no label file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import experiment_init
from utils.crf import CRFParams
from utils.dataset import create_cropped, load_pool, load_slices, verify_inputs
from utils.demo_data import make_demo_dataset
from utils.errors import DataError
from utils.io import cropped_paths, raw_paths, save_nifti, write_cropped
from utils.pseudo_labels import make_pseudo_labels


@pytest.fixture
def cfg(tmp_path: Path) -> experiment_init.ExperimentConfig:
    """The demo configuration over three generated patients: 001 (labeled sets, pool), 002
    (labeled sets, pool) and 021, which only the pool lists."""
    cfg = experiment_init.load("demo", data_root=tmp_path / "demo")
    make_demo_dataset(cfg.data_path_tr, ["001", "002", "021"], seed=cfg.demo_seed)
    return cfg


def _drop_label(cfg: experiment_init.ExperimentConfig, sid: str) -> Path:
    label = raw_paths(cfg.data_layout, cfg.data_path_tr, sid)[1]
    label.unlink()
    return label


class IntensityLogits(torch.nn.Module):
    """A tiny model: class logits proportional to the image with increasing weights, so that
    the argmax follows the intensity (dark: background, bright: the last class)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, num_classes, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.linspace(-2.0, 2.0, num_classes).view(-1, 1, 1, 1))
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_pool_volume_without_label_is_cropped_and_loaded_with_gt_none(cfg):
    assert "021" in cfg.pool_only_ids() and "001" not in cfg.pool_only_ids()
    _drop_label(cfg, "021")
    assert create_cropped(cfg, ["001", "021"]) == 2
    img21, mask21 = cropped_paths(cfg.data_path_tr_cropped, "021")
    assert img21.is_file() and not mask21.exists()
    assert all(p.is_file() for p in cropped_paths(cfg.data_path_tr_cropped, "001"))
    assert create_cropped(cfg, ["001", "021"]) == 0  # the image-only crop counts as done
    verify_inputs(cfg, ["002"], [], ["001", "021"])

    pool = load_pool(cfg, ["001", "021"])
    assert list(pool) == ["001", "021"]
    img1, gt1 = pool["001"]
    img21_t, gt21 = pool["021"]
    assert gt21 is None and img21_t.shape[1:] == (1, *cfg.crop_size)
    # the labeled pool volume keeps its ground truth, as the labeled set reads it
    lab_img, lab_lbl = load_slices(cfg, ["001"])
    assert gt1 is not None and gt1.dtype == torch.uint8 and int(gt1.max()) > 0
    assert torch.equal(gt1, lab_lbl) and torch.equal(img1, lab_img)

    # one pseudo-label pass: Dice measured on 001 alone, 021 labelled all the same
    model = IntensityLogits(cfg.num_classes)
    params = CRFParams(**cfg.crf_params)

    def label(volumes):
        return make_pseudo_labels(model, volumes, cfg.num_classes, params, torch.device("cpu"),
                                  torch.Generator().manual_seed(0), progress=False,
                                  use_crf=False)

    both, alone = label(pool), label({"001": pool["001"]})
    assert both.kept == ["001", "021"]
    assert both.labels.shape[0] == img1.shape[0] + img21_t.shape[0]
    assert alone.dice_before_crf is not None and both.dice_before_crf == alone.dice_before_crf

    # the label supplied later is cropped in without --overwrite
    make_demo_dataset(cfg.data_path_tr, ["001", "002", "021"], seed=cfg.demo_seed)
    assert create_cropped(cfg, ["021"]) == 1 and mask21.is_file()
    assert load_pool(cfg, ["021"])["021"][1] is not None


def test_labeled_subject_without_label_is_a_clear_error(cfg):
    label = _drop_label(cfg, "001")
    for load in (lambda: create_cropped(cfg, ["001"]), lambda: load_pool(cfg, ["001"]),
                 lambda: load_slices(cfg, ["001"])):
        with pytest.raises(DataError) as err:
            load()
        msg = str(err.value)
        assert msg.startswith(f"{label}: id 001: label file not found")
        assert "labeled['tr1_c1']" in msg and "add it" in msg
    assert not cropped_paths(cfg.data_path_tr_cropped, "001")[0].exists()
    with pytest.raises(DataError, match="label file not found"):
        verify_inputs(cfg, ["002"], [], ["001"])


def test_pool_only_volume_trained_on_as_labeled_needs_its_label(cfg):
    # the pool's own list (the demo's upper bound tr20) as the labeled set of a run
    _drop_label(cfg, "021")
    create_cropped(cfg, ["021"])  # image only, as the cropping script writes it
    with pytest.raises(DataError, match="labeled set being trained on needs it"):
        load_slices(cfg, ["021"])
    with pytest.raises(DataError, match="id 021: label file not found"):
        verify_inputs(cfg, ["021"], [], ["021"])


def _hand_cropped(cfg: experiment_init.ExperimentConfig, sid: str, subject: int, n_slices: int,
                  label: np.ndarray | None = None) -> None:
    """A cropped volume written directly, (X, Y, Z): label 1 on the rows x < 8 + 4 z (an
    asymmetric, slice-dependent pattern) unless given, image 100 * subject + 10 * z + label,
    so that each loaded slice's subject, slice number and orientation can be read back."""
    cx, cy = cfg.crop_size
    x = np.arange(cx)[:, None, None]
    z = np.arange(n_slices)[None, None, :]
    if label is None:
        label = np.broadcast_to(x < 8 + 4 * z, (cx, cy, n_slices)).astype(np.uint8)
    image = 100.0 * subject + 10.0 * z + label
    write_cropped(cfg.data_path_tr_cropped, sid, image, label, cfg.target_resolution)


@pytest.fixture
def bare_cfg(tmp_path: Path) -> experiment_init.ExperimentConfig:
    """The demo configuration without raw data (only hand-made cropped volumes are read)."""
    return experiment_init.load("demo", data_root=tmp_path / "demo")


def test_loaded_slices_keep_subject_order_slice_order_and_orientation(bare_cfg):
    _hand_cropped(bare_cfg, "001", subject=1, n_slices=3)
    _hand_cropped(bare_cfg, "002", subject=2, n_slices=2)
    images, labels = load_slices(bare_cfg, ["002", "001"])
    assert images.shape == (5, 1, *bare_cfg.crop_size) and labels.dtype == torch.uint8
    # slice k is (subject, z) in the order asked for; its image and label agree pixel-wise
    for k, (subject, z) in enumerate([(2, 0), (2, 1), (1, 0), (1, 1), (1, 2)]):
        want = torch.zeros(bare_cfg.crop_size, dtype=torch.uint8)
        want[: 8 + 4 * z] = 1  # the first axis of the slice is the volume's x
        assert torch.equal(labels[k], want)
        assert torch.equal(images[k, 0], 100.0 * subject + 10.0 * z + want.float())
    pool = load_pool(bare_cfg, ["001"])
    assert torch.equal(pool["001"][0], images[2:]) and torch.equal(pool["001"][1], labels[2:])


@pytest.mark.parametrize("bad", [4, -1])
def test_cropped_labels_outside_the_classes_are_refused(bare_cfg, bad):
    label = np.zeros((*bare_cfg.crop_size, 2), np.int16)
    label[3, 4, 1] = bad  # num_classes = 4: labels 0..3
    _hand_cropped(bare_cfg, "001", subject=1, n_slices=2, label=label)
    mask = cropped_paths(bare_cfg.data_path_tr_cropped, "001")[1]
    save_nifti(mask, label, np.diag([*bare_cfg.target_resolution, 1.0, 1.0]))  # keeps int16
    with pytest.raises(DataError, match="outside 0..3"):
        load_slices(bare_cfg, ["001"])


def test_a_labeled_pool_volume_cropped_without_label_is_an_error(bare_cfg):
    _hand_cropped(bare_cfg, "001", subject=1, n_slices=2)
    cropped_paths(bare_cfg.data_path_tr_cropped, "001")[1].unlink()
    with pytest.raises(DataError, match="cropped label not found"):
        load_pool(bare_cfg, ["001"], create_missing=False)


def test_verify_inputs_checks_eval_volumes_and_raw_data_of_uncropped_volumes_only(cfg):
    create_cropped(cfg, ["001"])
    _drop_label(cfg, "001")  # the cropped copy is what training reads
    verify_inputs(cfg, ["001"], [], [])
    with pytest.raises(DataError, match="id 001: label file not found"):
        verify_inputs(cfg, ["002"], ["001"], [])  # evaluation reads the raw volume
    assert create_cropped(cfg, ["002"]) == 1
    assert create_cropped(cfg, ["002"]) == 0
    assert create_cropped(cfg, ["002"], overwrite=True) == 1
