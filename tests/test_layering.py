"""Which package may import which: the errors module stays light, the layers point one way."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    """The top-level module names ``path`` imports (``utils.io`` for ``from utils.io import``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_errors_and_run_main_load_no_torch() -> None:
    """A script that only reports errors (`run_main`) starts without the training stack."""
    code = ("import sys, utils.errors; "
            "print(sorted(m for m in ('torch', 'numpy', 'utils.training') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_lower_layers_import_no_trainer_machinery() -> None:
    """Configs, losses, models and the numeric utilities never import the run skeleton or the
    step modules (they are imported by them)."""
    upper = {"utils.training", "utils.self_training", "utils.joint_training",
             "utils.baseline_training", "utils.pseudo_label_training", "utils.mean_teacher",
             "utils.bcp_training"}
    lower = [REPO / "experiment_init" / "__init__.py", *sorted((REPO / "losses").glob("*.py")),
             *sorted((REPO / "models").glob("*.py"))] + [
        REPO / "utils" / f"{name}.py" for name in
        ("errors", "io", "augment", "sampling", "crf", "device", "mixed_precision",
         "captured_step", "evaluation", "preprocess", "dataset", "run_dir", "copy_paste")]
    for path in lower:
        assert not _imports(path) & upper, (path.relative_to(REPO), _imports(path) & upper)
    # The step modules (one iteration each) sit below the run that calls them.
    for name in ("baseline_training", "joint_training"):
        assert not _imports(REPO / "utils" / f"{name}.py") & {"utils.training",
                                                             "utils.self_training"}, name


def test_utilities_do_not_import_experiment_init_for_errors() -> None:
    """The device and step utilities take plain values; only the config readers need
    experiment_init (its errors are in utils.errors)."""
    for name in ("device", "mixed_precision", "captured_step"):
        assert "experiment_init" not in _imports(REPO / "utils" / f"{name}.py"), name


def test_the_cpu_forwards_are_installed_where_each_network_is_built() -> None:
    """`models.cpu_training` replaces forwards only where a caller says so: each place that
    builds a network for the CPU installs it in its own code (a dropped line would leave the
    CPU path slower and larger without any test noticing the numbers)."""
    for rel in ("train_model/tr_baseline.py", "train_model/prop_method_joint_tr_rand_init.py",
                "train_model/self_training.py", "train_model/mean_teacher.py",
                "train_model/bcp.py", "utils/self_training.py", "scripts/predict.py"):
        calls = [node for node in ast.walk(ast.parse((REPO / rel).read_text()))
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                 and node.func.attr == "install"
                 and getattr(node.func.value, "id", None) == "cpu_training"]
        assert len(calls) == 1, rel
    assert "models.cpu_training" not in _imports(REPO / "utils" / "training.py")
    assert "models" not in _imports(REPO / "utils" / "training.py")
