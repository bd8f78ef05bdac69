"""utils/provenance.py: the git state of a real throw-away repository, and null where git or a
checkout is missing."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from utils import provenance

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")


def _git(root, *args):
    subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t",
                    *args], check=True, capture_output=True)


@needs_git
def test_git_state_names_the_commit_and_whether_the_tree_changed(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "commit", "-qm", "one")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    assert provenance.git_state(tmp_path) == {"git_commit": head, "git_dirty": False}
    (tmp_path / "a.py").write_text("x = 2\n")
    assert provenance.git_state(tmp_path) == {"git_commit": head, "git_dirty": True}


def test_git_state_is_null_outside_a_checkout_or_without_git(tmp_path, monkeypatch):
    assert provenance.git_state(tmp_path) == {"git_commit": None, "git_dirty": None}
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no git on the PATH
    assert provenance.git_state(provenance.REPO_ROOT) == {"git_commit": None, "git_dirty": None}


def test_session_records_versions_device_host_and_time():
    got = provenance.session(torch.device("cpu"))
    assert set(got["versions"]) == {"python", "torch", "cuda", "cudnn", "numpy", "medpy",
                                    "pydensecrf2"}
    assert got["versions"]["torch"] == str(torch.__version__)
    assert got["versions"]["medpy"] is not None  # installed with the requirements
    assert got["device_name"] and got["host"] and got["started"][:2] == "20"
