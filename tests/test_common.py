"""common.py's plumbing as the scripts use it."""

import os

import pytest
import torch

from common import atomic_path, save_checkpoint


def real_checkpoint(path):
    save_checkpoint({"kind": "pretrain", "weights": torch.randn(64, 64)}, str(path))
    return path


# ----------------------------------------------------------------------------- atomic files


@pytest.fixture
def umask():
    """Set the process umask for one test, as a shell's `umask` would."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)], ids=["022", "027", "077"])
def test_atomic_files_get_the_mode_open_would_give(tmp_path, umask, mask, mode):
    """mkstemp makes its files 0600 whatever the umask; a checkpoint should be readable as any new file is."""
    umask(mask)
    real_checkpoint(tmp_path / "checkpoint.pt")
    with atomic_path(str(tmp_path / "notes.txt")) as tmp, open(tmp, "w") as f:
        f.write("x")
    for name in ("checkpoint.pt", "notes.txt"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == mode, name
