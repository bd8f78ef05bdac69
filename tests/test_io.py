"""Raw-layout readers, cropped volumes and atomic writes on real NIfTI files."""

from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest
from conftest import blob_volume, write_nifti

from utils.errors import ConfigError, DataError
from utils.io import (
    MMWHS_LABEL_VALUES,
    classes_to_labels,
    labels_to_classes,
    read_cropped,
    read_raw_volume,
    read_volume,
    save_nifti,
    subject_id_in_name,
    write_cropped,
    write_text_atomic,
)


def test_acdc_reader_uses_ed_frame_from_info_cfg(acdc_root):
    vol = read_raw_volume("acdc", acdc_root, "002")
    assert vol.image_path.name == "patient002_frame03.nii.gz"
    _, label = blob_volume(seed=2)
    np.testing.assert_array_equal(vol.label, label)
    assert vol.spacing == (1.5, 1.5, 8.0)
    assert vol.affine[0, 3] == -10.0


def test_acdc_reader_falls_back_to_frame01(acdc_root):
    (acdc_root / "patient001" / "Info.cfg").unlink()
    vol = read_raw_volume("acdc", acdc_root, "001")
    assert vol.image_path.name == "patient001_frame01.nii.gz"
    assert vol.label.max() == 3


def test_decathlon_reader_takes_t2_channel(tmp_path):
    image, label = blob_volume()
    four_d = np.stack([image, -image], axis=-1)  # channel 1 (ADC) must be ignored
    write_nifti(tmp_path / "imagesTr" / "prostate_07.nii.gz", four_d)
    write_nifti(tmp_path / "labelsTr" / "prostate_07.nii.gz", np.minimum(label, 2).astype(np.uint8))
    vol = read_raw_volume("decathlon", tmp_path, "007")
    np.testing.assert_allclose(vol.image, image)
    assert set(np.unique(vol.label)) == {0, 1, 2}


def test_mmwhs_reader_maps_label_values(tmp_path):
    image, _ = blob_volume()
    raw = np.zeros(image.shape, np.int16)
    values = [205, 420, 500, 550, 600, 820, 850, 421]  # 421 is not a structure -> 0
    for i, v in enumerate(values):
        raw[i * 4 : i * 4 + 4] = v
    write_nifti(tmp_path / "mr_train" / "mr_train_1003_image.nii.gz", image)
    write_nifti(tmp_path / "mr_train" / "mr_train_1003_label.nii.gz", raw)
    vol = read_raw_volume("mmwhs", tmp_path, "1003")
    for i in range(7):
        assert np.all(vol.label[i * 4 : i * 4 + 4] == i + 1)
    assert np.all(vol.label[28:32] == 0)


def test_missing_folder_and_file_errors_name_the_path(tmp_path, acdc_root):
    with pytest.raises(DataError, match="data folder not found"):
        read_raw_volume("acdc", tmp_path / "nope", "001")
    with pytest.raises(DataError, match="patient005"):
        read_raw_volume("acdc", acdc_root, "005")
    (acdc_root / "patient001" / "patient001_frame01_gt.nii.gz").unlink()
    with pytest.raises(DataError, match="patient001_frame01_gt.nii.gz: file not found"):
        read_raw_volume("acdc", acdc_root, "001")


def test_corrupt_gzip_and_bad_dimensions(tmp_path, acdc_root):
    path = acdc_root / "patient001" / "patient001_frame01.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated gzip stream
    with pytest.raises(DataError, match="patient001_frame01.nii.gz: cannot read"):
        read_raw_volume("acdc", acdc_root, "001")
    path.write_bytes(gzip.compress(b"not a nifti file at all" * 20))
    with pytest.raises(DataError, match="cannot read"):
        read_raw_volume("acdc", acdc_root, "001")
    write_nifti(path, np.zeros((10, 10), np.float32))
    with pytest.raises(DataError, match="expected a 3D volume"):
        read_raw_volume("acdc", acdc_root, "001")


def test_label_grid_mismatch(acdc_root):
    write_nifti(acdc_root / "patient001" / "patient001_frame01_gt.nii.gz",
                np.zeros((40, 36, 4), np.uint8))
    with pytest.raises(DataError, match="label grid"):
        read_raw_volume("acdc", acdc_root, "001")


def test_cropped_round_trip_and_atomic_save(tmp_path):
    image, label = blob_volume()
    write_cropped(tmp_path, "001", image, label, (1.25, 1.25))
    img, lbl = read_cropped(tmp_path, "001")
    np.testing.assert_allclose(img, image)
    np.testing.assert_array_equal(lbl, label)
    assert nib.load(str(tmp_path / "001" / "img_cropped.nii.gz")).header.get_zooms()[:2] == (
        1.25, 1.25)
    # no temporary files left behind
    assert sorted(p.name for p in (tmp_path / "001").iterdir()) == [
        "img_cropped.nii.gz", "mask_cropped.nii.gz"]
    with pytest.raises(DataError, match="create_cropped_imgs"):
        read_cropped(tmp_path, "002")


def test_cropped_volume_without_label(tmp_path):
    image, label = blob_volume()
    write_cropped(tmp_path, "001", image, label, (1.25, 1.25))
    # cropped again without label (its label file was removed): the old mask goes with it
    write_cropped(tmp_path, "001", image + 1, None, (1.25, 1.25))
    assert sorted(p.name for p in (tmp_path / "001").iterdir()) == ["img_cropped.nii.gz"]
    img, lbl = read_cropped(tmp_path, "001", label_required=False)
    np.testing.assert_allclose(img, image + 1)
    assert lbl is None
    with pytest.raises(DataError, match="mask_cropped.nii.gz: cropped label not found.*--ids 001"):
        read_cropped(tmp_path, "001")


def test_save_nifti_failure_keeps_old_file(tmp_path):
    path = tmp_path / "x.nii.gz"
    save_nifti(path, np.ones((3, 3, 3), np.float32), np.eye(4))
    with pytest.raises(nib.spatialimages.HeaderDataError):
        save_nifti(path, np.ones((3, 3, 3), dtype=object), np.eye(4))
    np.testing.assert_array_equal(nib.load(str(path)).get_fdata(), 1.0)
    assert [p.name for p in tmp_path.iterdir()] == ["x.nii.gz"]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_get_the_mode_of_the_umask(tmp_path, umask):
    """Every writer of a run (all through the atomic writer) leaves files with the mode a
    plain open() gives, so a lab's group can read results on a shared cluster."""
    import torch

    from utils.run import RunLog, save_checkpoint, save_config

    image, label = blob_volume()
    old = os.umask(umask)
    try:
        save_config(tmp_path, {"a": 1})
        log = RunLog(tmp_path, tensorboard=False)
        log.log(0, loss_seg=0.5, val_dice=0.1)
        log.flush()  # log.csv and curves.png
        save_checkpoint(tmp_path / "checkpoints" / "last.pt", {"w": torch.zeros(2)})
        write_text_atomic(tmp_path / "test_results" / "summary.json", "{}\n")
        save_nifti(tmp_path / "test_results" / "pred.nii.gz", label, np.eye(4))
        write_cropped(tmp_path / "cropped", "001", image, label, (1.25, 1.25))
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) == 9
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in files}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)
    assert modes["plain"] == 0o666 & ~umask


def test_label_values_map_both_ways_and_unknown_values_are_named(tmp_path):
    classes = np.array([[[0, 1, 7], [3, 2, 0]]])
    raw = classes_to_labels(classes, MMWHS_LABEL_VALUES)
    np.testing.assert_array_equal(raw, [[[0, 205, 850], [500, 420, 0]]])
    np.testing.assert_array_equal(labels_to_classes(raw, MMWHS_LABEL_VALUES), classes)
    assert classes_to_labels(classes, None).dtype == np.uint8
    np.testing.assert_array_equal(labels_to_classes(classes, None), classes)
    image, _ = blob_volume()
    img = write_nifti(tmp_path / "img.nii.gz", image)
    pred = write_nifti(tmp_path / "pred.nii.gz", np.ones(image.shape, np.int16))
    assert read_volume("x", img, pred, "mmwhs").label.max() == 0  # a ground truth's rule
    with pytest.raises(DataError, match=r"label values \[1\] are not among the layout's"):
        read_volume("x", img, pred, "mmwhs", known_labels_only=True)


@pytest.mark.parametrize("layout,name,sid", [
    ("acdc", "patient011_frame01", "011"), ("acdc", "011", "011"), ("acdc", "notes", None),
    ("decathlon", "prostate_11", "011"), ("decathlon", "prostate_03_seg", "003"),
    ("mmwhs", "mr_train_1011_image", "1011"), ("mmwhs", "patient011", None)])
def test_subject_id_in_name(layout, name, sid):
    assert subject_id_in_name(layout, name) == sid


def test_a_new_layout_is_one_registry_entry(tmp_path, monkeypatch, edited_config):
    """A layout added to LAYOUTS alone is accepted by the config, read (its paths, 4D channel
    and label values) and parsed from file names; an unknown one is an error naming LAYOUTS."""
    import experiment_init
    from utils import io

    def flat_paths(root, sid):
        return root / f"img_{sid}.nii.gz", root / f"seg_{sid}.nii.gz"

    monkeypatch.setitem(io.LAYOUTS, "flat", io.DataLayout(
        flat_paths, r"img_(\d+)", id_digits=4, channel=1, label_values=(7, 9, 11)))
    image, label = blob_volume()
    # channel 1 of a 4D file is the image; channel 0 a decoy
    write_nifti(tmp_path / "img_12.nii.gz", np.stack([image * 0 - 5, image], axis=-1))
    write_nifti(tmp_path / "seg_12.nii.gz", np.asarray((0, 7, 9, 11), np.int16)[label])
    vol = io.read_raw_volume("flat", tmp_path, "12")
    np.testing.assert_array_equal(vol.image, image)
    np.testing.assert_array_equal(vol.label, label)
    assert vol.label_values == (7, 9, 11)
    assert io.subject_id_in_name("flat", "img_12") == "0012"
    folder = edited_config(data_layout="data_layout = 'flat'")
    assert experiment_init.load("demo", config_dir=folder).data_layout == "flat"
    monkeypatch.delitem(io.LAYOUTS, "flat")
    with pytest.raises(ConfigError, match=r"data_layout 'flat' is not one of "
                       r"acdc, decathlon, mmwhs, nnunet \(utils/io.py, LAYOUTS\)"):
        experiment_init.load("demo", config_dir=folder)
    with pytest.raises(ValueError, match=r"unknown data layout 'flat'.*LAYOUTS"):
        io.subject_id_in_name("flat", "img_12")


# ---------------------------------------------------- what a reader must refuse, not accept
def test_a_label_a_fraction_of_a_voxel_off_its_image_is_refused(tmp_path):
    """Tolerance: 1 % of the smallest voxel size (1.5 mm here, not the 8 mm slices)."""
    image, label = blob_volume()
    img = write_nifti(tmp_path / "img.nii.gz", image)
    for shift, refused in ((0.05, True), (0.01, False)):
        affine = nib.load(str(img)).affine.copy()
        affine[0, 3] += shift
        nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), str(tmp_path / "lab.nii.gz"))
        if refused:
            with pytest.raises(DataError, match="label affine differs from the image's by up "
                               "to 0.05 mm"):
                read_volume("x", img, tmp_path / "lab.nii.gz", "acdc")
        else:
            np.testing.assert_array_equal(
                read_volume("x", img, tmp_path / "lab.nii.gz", "acdc").label, label)


def test_the_reader_refuses_a_zero_spacing_that_nibabel_reads_as_one(tmp_path):
    image, _ = blob_volume()
    hdr = nib.Nifti1Header()
    hdr.set_sform(np.diag([1.5, 0.0, 8.0, 1.0]), code=1)
    hdr["pixdim"][1:4] = (1.5, 0.0, 8.0)
    nib.save(nib.Nifti1Image(image, None, header=hdr), str(tmp_path / "img.nii.gz"))
    with pytest.raises(DataError, match=r"voxel spacing \(1.5, 0.0, 8.0\) is not positive"):
        read_volume("x", tmp_path / "img.nii.gz", None, "acdc")


def test_a_4d_image_without_the_layouts_channel_is_refused(tmp_path, monkeypatch):
    from utils import io

    monkeypatch.setitem(io.LAYOUTS, "second", io.DataLayout(io.acdc_paths, r"(\d+)", channel=1))
    image, _ = blob_volume()
    path = write_nifti(tmp_path / "one_channel.nii.gz", image[..., None])
    with pytest.raises(DataError, match="4D image has 1 channels, channel 1 is needed"):
        read_volume("x", path, None, "second")
    path = write_nifti(tmp_path / "two.nii.gz", np.stack([image, image + 1], -1))
    np.testing.assert_allclose(read_volume("x", path, None, "second").image, image + 1)


def test_nnunet_channel_layout_names(tmp_path):
    from utils.io import data_layout, nnunet_channel

    assert [nnunet_channel(n) for n in ("nnunet", "nnunet_ch2", "nnunet_ch12", "nnunet_ch",
                                        "nnunet_ch1x", "acdc")] == [0, 2, 12, None, None, None]
    with pytest.raises(ValueError, match="unknown data layout 'nnunet_ch1x'"):
        data_layout("nnunet_ch1x")
    assert data_layout("nnunet_ch3").paths(tmp_path, "c")[0] == \
        tmp_path / "imagesTr" / "c_0003.nii.gz"


def test_acdc_falls_back_to_frame01_when_the_ed_frame_file_is_missing(acdc_root):
    (acdc_root / "patient002" / "Info.cfg").write_text("ED: 5\nES: 12\n")
    with pytest.raises(DataError, match="no ED frame file patient002_frame05.nii.gz"):
        read_raw_volume("acdc", acdc_root, "002")
    image, label = blob_volume(seed=9)
    write_nifti(acdc_root / "patient002" / "patient002_frame01.nii.gz", image)
    write_nifti(acdc_root / "patient002" / "patient002_frame01_gt.nii.gz", label.astype(np.uint8))
    vol = read_raw_volume("acdc", acdc_root, "002")
    assert vol.image_path.name == "patient002_frame01.nii.gz"
    np.testing.assert_array_equal(vol.label, label)


def test_a_file_given_as_the_data_folder_is_named_as_not_a_folder(tmp_path):
    (tmp_path / "raw").write_text("not a folder")
    for layout in ("acdc", "decathlon", "mmwhs"):
        with pytest.raises(DataError, match=f"{tmp_path / 'raw'}: data folder not found"):
            read_raw_volume(layout, tmp_path / "raw", "001")
