"""A full disk: every write through the atomic writer that fails with ENOSPC stops with one line
naming the file and the free space, leaves every earlier file intact, and a run stopped so
resumes."""

from __future__ import annotations

import errno
import gc
import os
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import blob_volume
from test_training import TINY_SPLITS, _trainer

import experiment_init
from utils.errors import DiskFullError, run_main
from utils.io import read_cropped, save_nifti, write_cropped, write_text_atomic
from utils.run import load_checkpoint, save_periodic_checkpoint


def _no_space(path: object) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _filling(real_write, when=lambda target: True):
    """A writer that writes part of a file where ``when(target)``, then fails as a full disk."""

    def write(obj, target, *args, **kwargs):
        name = target.name if hasattr(target, "write") else str(target)  # file object or path
        if not when(name):
            return real_write(obj, target, *args, **kwargs)
        if hasattr(target, "write"):
            target.write(b"PK\x03\x04 partial")
        else:
            Path(name).write_bytes(b"partial")
        raise _no_space(name)

    return write


def _one_line_naming(err: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: cannot write it, no space left on device (")
    assert f"free in {path.parent})" in msg and "--resume" in msg
    return msg


def test_a_full_disk_while_writing_a_checkpoint_keeps_both_earlier_ones(tmp_path, monkeypatch):
    ckpts = tmp_path / "checkpoints"
    for it in (7, 15):
        save_periodic_checkpoint(ckpts, {"iteration": it, "model": {"w": torch.full((9,), it)}})
    monkeypatch.setattr(torch, "save", _filling(torch.save))
    with pytest.raises(DiskFullError) as err:
        save_periodic_checkpoint(ckpts, {"iteration": 23, "model": {"w": torch.zeros(9)}})
    _one_line_naming(err, ckpts / "last.pt")
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.pt", "previous.pt"]  # no temp
    assert load_checkpoint(ckpts / "last.pt")["iteration"] == 15  # checksum intact
    assert load_checkpoint(ckpts / "previous.pt")["iteration"] == 7


def test_a_full_disk_while_writing_results_or_volumes(tmp_path, monkeypatch):
    results = tmp_path / "test_results"
    write_text_atomic(results / "summary.json", "{}\n")
    image, label = blob_volume()
    write_cropped(tmp_path / "cropped", "001", image, label, (1.25, 1.25))
    save_nifti(results / "001" / "pred.nii.gz", label, np.eye(4))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    monkeypatch.setattr(Path, "write_text", lambda self, text: _filling(None)(text, self))
    with pytest.raises(DiskFullError) as err:
        write_text_atomic(results / "summary.json", '{"mean_dice": 0.9}\n')
    _one_line_naming(err, results / "summary.json")
    monkeypatch.setattr(nib, "save", _filling(nib.save))
    with pytest.raises(DiskFullError) as err:
        write_cropped(tmp_path / "cropped", "001", image * 2, label, (1.25, 1.25))
    _one_line_naming(err, tmp_path / "cropped" / "001" / "img_cropped.nii.gz")
    with pytest.raises(DiskFullError) as err:
        save_nifti(results / "001" / "pred.nii.gz", label * 0, np.eye(4))
    _one_line_naming(err, results / "001" / "pred.nii.gz")

    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # same files, same bytes: no temporary left, nothing replaced
    np.testing.assert_allclose(read_cropped(tmp_path / "cropped", "001")[0], image)


def test_an_error_other_than_a_full_disk_is_not_reported_as_one(tmp_path, monkeypatch):
    def fail(self, text):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(Path, "write_text", fail)
    with pytest.raises(OSError, match="Input/output error"):
        write_text_atomic(tmp_path / "a.txt", "x")
    assert list(tmp_path.iterdir()) == []


def _free_kib(msg: str) -> float:
    return float(msg.split("(")[1].split(" KiB free")[0])


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 256 KiB tmpfs mounted on a temporary folder (root only), unmounted afterwards."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        gc.collect()  # a failed write's traceback may hold the file a writer left open
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


def test_a_really_full_disk(tiny_tmpfs):
    ckpts = tiny_tmpfs / "run" / "checkpoints"
    save_periodic_checkpoint(ckpts, {"iteration": 7, "model": {"w": torch.ones(1000)}})
    with pytest.raises(DiskFullError) as err:  # 400 KB on a 256 KiB disk
        save_periodic_checkpoint(ckpts, {"iteration": 15, "model": {"w": torch.ones(100_000)}})
    # the free space is measured once the failed write's temporary file is gone
    assert 200 < _free_kib(_one_line_naming(err, ckpts / "last.pt")) <= 256
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.pt"]
    assert load_checkpoint(ckpts / "last.pt")["iteration"] == 7
    with pytest.raises(DiskFullError) as err:  # nibabel keeps this one's file open
        save_nifti(tiny_tmpfs / "pred.nii.gz", np.random.rand(100, 100, 20), np.eye(4))
    assert 200 < _free_kib(_one_line_naming(err, tiny_tmpfs / "pred.nii.gz")) <= 256
    assert sorted(p.name for p in tiny_tmpfs.iterdir()) == ["run"]


def test_a_run_stopped_by_a_full_disk_resumes(edited_config, tmp_path, monkeypatch, capsys):
    """The baseline stops at its second periodic checkpoint, resumes, stops again writing its
    test results, and resumes to the end: each stop is one line on stderr, exit status 2."""
    folder = edited_config("tiny", n_iter="n_iter = 12", img_size_x="img_size_x = 32",
                           img_size_y="img_size_y = 32", batch_size="batch_size = 2",
                           demo_n_patients="demo_n_patients = 3",
                           val_step_update="val_step_update = 4")
    (folder / "data_cfg_tiny.py").write_text(TINY_SPLITS)
    monkeypatch.setattr(experiment_init, "CONFIG_DIR", folder)
    argv = ["--dataset", "tiny", "--no_of_tr_imgs", "tr1", "--comb_tr_imgs", "c1",
            "--data_root", str(tmp_path / "data"), "--out_dir", str(tmp_path / "runs"),
            "--device", "cpu", "--no_progress", "--ckpt_every", "4"]
    run = tmp_path / "runs" / "tiny" / "baseline" / "tr1_c1_v0"
    baseline = _trainer("tr_baseline")

    def stopped(path: Path) -> str:
        with pytest.raises(SystemExit) as stop:
            run_main(lambda: baseline.main(argv))
        assert stop.value.code == 2
        out, err = capsys.readouterr()
        assert err.count("\n") == 1 and err.startswith(f"error: {path}: cannot write it, no "
                                                       "space left on device (")
        return out

    periodic = {"n": 0}

    def second_periodic(name: str) -> bool:
        periodic["n"] += ".last.pt." in name
        return ".last.pt." in name and periodic["n"] == 2

    with monkeypatch.context() as m:
        m.setattr(torch, "save", _filling(torch.save, second_periodic))
        stopped(run / "checkpoints" / "last.pt")
    assert load_checkpoint(run / "checkpoints" / "last.pt")["iteration"] == 3
    assert (run / "log.csv").read_text().splitlines()[-1].startswith("4,")

    argv.append("--resume")
    real_write_text = Path.write_text
    with monkeypatch.context() as m:
        m.setattr(Path, "write_text", lambda self, text: _filling(
            lambda t, p: real_write_text(Path(p), t), lambda p: "summary.json" in p)(text, self))
        out = stopped(run / "test_results" / "summary.json")
    assert f"resuming from {run / 'checkpoints' / 'last.pt'} (iteration 3)" in out
    assert load_checkpoint(run / "checkpoints" / "last.pt")["iteration"] == 11

    run_main(lambda: baseline.main(argv))
    out = capsys.readouterr().out
    assert f"resuming from {run / 'checkpoints' / 'last.pt'} (iteration 11)" in out
    assert (run / "test_results" / "summary.json").is_file()
