"""Shared fixtures: small synthetic volumes written as real NIfTI files in each raw layout."""

from __future__ import annotations

import utils.wait_policy  # noqa: F401  (before torch: OpenMP reads it once)

import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from experiment_init import CONFIG_DIR


def blob_volume(shape=(40, 36, 5), seed=0, num_classes=4) -> tuple[np.ndarray, np.ndarray]:
    """An image with concentric structures and the matching label map, (X, Y, Z)."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    cx, cy = shape[0] / 2 + rng.uniform(-3, 3), shape[1] / 2 + rng.uniform(-3, 3)
    r = np.hypot(x - cx, y - cy)
    label = np.zeros(shape, np.int16)
    image = np.zeros(shape, np.float32)
    for z in range(shape[2]):
        scale = 1.0 - 0.1 * z
        lab = np.zeros(shape[:2], np.int16)
        radii = [12 * scale, 8 * scale, 5 * scale][: num_classes - 1]
        for cls, rad in enumerate(radii, start=1):
            lab[r < rad] = cls
        label[..., z] = lab
        image[..., z] = 100 + 80 * lab + rng.normal(0, 5, shape[:2])
    return image, label


def nested_squares(n: int, size: int, seed: int):
    """(n, 1, size, size) images and (n, size, size) long labels: each slice holds a 12-pixel
    square of class 1 around a 5 x 7 block of class 2 at a random place; image = label / 2 +
    0.1 + uniform noise of 0.05, so a slice's classes can be read back from its image."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    lab = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        r, c = torch.randint(2, size - 14, (2,), generator=gen).tolist()
        lab[i, r : r + 12, c : c + 12] = 1
        lab[i, r + 3 : r + 8, c + 2 : c + 9] = 2
    img = lab[:, None].float() / 2 + 0.05 * torch.rand(n, 1, size, size, generator=gen) + 0.1
    return img, lab


def write_nifti(path: Path, data: np.ndarray, spacing=(1.5, 1.5, 8.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 2.0]
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.fixture
def acdc_root(tmp_path: Path) -> Path:
    """Two ACDC patients: 001 with ED frame 1, 002 with ED frame 3 (Info.cfg decides)."""
    root = tmp_path / "acdc_raw"
    for pid, ed in (("001", 1), ("002", 3)):
        image, label = blob_volume(seed=int(pid))
        pdir = root / f"patient{pid}"
        write_nifti(pdir / f"patient{pid}_frame{ed:02d}.nii.gz", image)
        write_nifti(pdir / f"patient{pid}_frame{ed:02d}_gt.nii.gz", label.astype(np.uint8))
        # an ES frame with a different label, which must not be picked up
        write_nifti(pdir / f"patient{pid}_frame12.nii.gz", image * 0)
        write_nifti(pdir / f"patient{pid}_frame12_gt.nii.gz", np.zeros_like(label, np.uint8))
        (pdir / "Info.cfg").write_text(f"ED: {ed}\nES: 12\nGroup: NOR\nNbFrame: 30\n")
    return root


@pytest.fixture(scope="session")
def demo_env(tmp_path_factory) -> dict[str, str]:
    """Environment for trainer subprocesses: demo data generated once, outputs in a temp dir."""
    import os

    from experiment_init import load
    from utils.demo_data import make_demo_dataset

    root = tmp_path_factory.mktemp("demo_session")
    cfg = load("demo", data_root=root / "data" / "demo")
    n = cfg.demo_n_patients
    make_demo_dataset(cfg.data_path_tr, [f"{i:03d}" for i in range(1, n + 1)], seed=cfg.demo_seed)
    env = dict(os.environ)
    env.update(LCL_DATA_ROOT=str(root / "data"), LCL_RUNS_ROOT=str(root / "runs"))
    return env


@pytest.fixture
def edited_config(tmp_path: Path) -> Callable[..., Path]:
    """``make(name="demo", **edits)`` -> a configuration folder (one per test) holding
    ``init_<name>.py`` / ``data_cfg_<name>.py``: copies of the demo's with each
    ``setting="new line"`` of ``edits`` replacing that setting's line (``""`` deletes it; a
    setting the file lacks is appended). Calling it again edits the files already there."""
    folder = tmp_path / "experiment_init"

    def make(name: str = "demo", **edits: str) -> Path:
        folder.mkdir(exist_ok=True)
        init = folder / f"init_{name}.py"
        if not init.is_file():
            shutil.copy(CONFIG_DIR / "data_cfg_demo.py", folder / f"data_cfg_{name}.py")
            shutil.copy(CONFIG_DIR / "init_demo.py", init)
        lines = init.read_text().splitlines()
        for setting, line in edits.items():
            at = [i for i, s in enumerate(lines) if s.split("=")[0].strip() == setting]
            if at:
                lines[at[0]] = line
            else:
                lines.append(line)
        init.write_text("\n".join(lines) + "\n")
        return folder

    return make


@pytest.fixture
def load_script():
    """``load_script("sweep")``: the module of scripts/sweep.py, importable for its functions."""
    import importlib.util
    import sys

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(autouse=True)
def _stop_signal_handlers():
    """A trainer's main run in-process installs SIGTERM/SIGUSR1 handlers until its run finishes;
    one that stops with an error leaves them: put the test process's own back."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


@pytest.fixture(scope="session")
def tiny_runs(demo_env, tmp_path_factory) -> dict[str, Path]:
    """{"baseline": run dir, "joint": run dir} of a 20-iteration demo baseline and a one-round,
    two-iteration joint run on it, both finished (test_results/ written)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("tiny_runs")
    common = ["--dataset", "demo", "--no_of_tr_imgs", "tr1", "--comb_tr_imgs", "c1",
              "--out_dir", str(out), "--no_progress"]
    runs = {}
    for step, script, extra in (
            ("baseline", "tr_baseline.py", ["--n_iter", "20"]),
            ("joint", "prop_method_joint_tr_rand_init.py",
             ["--n_rounds", "1", "--n_iter_per_round", "2", "--loss_reduction", "mean"])):
        proc = subprocess.run([sys.executable, f"train_model/{script}", *common, *extra],
                              cwd=repo, env=demo_env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr
        runs[step] = Path(proc.stdout.strip().splitlines()[-1].removeprefix("run directory: "))
    return runs
