"""common.py's plumbing as the scripts use it."""

import os
import zipfile

import pytest
import torch

from common import UserError, atomic_path, load_checkpoint, save_checkpoint


# ----------------------------------------------------------------------------- checkpoint files


def real_checkpoint(path):
    save_checkpoint({"kind": "pretrain", "weights": torch.randn(64, 64)}, str(path))
    return path


def not_a_checkpoint(tmp_path, name, contents: bytes):
    path = tmp_path / name
    path.write_bytes(contents)
    return path


def truncated(tmp_path):
    data = real_checkpoint(tmp_path / "whole.pt").read_bytes()
    return not_a_checkpoint(tmp_path, "cut.pt", data[: len(data) // 2])


def a_zip(tmp_path):
    path = tmp_path / "archive.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes.txt", "hello")
    return path


def pickled_object(tmp_path):
    path = tmp_path / "object.pt"
    torch.save({"kind": "pretrain", "version": 1, "object": zipfile.ZipInfo()}, path)  # an arbitrary class
    return path


@pytest.mark.parametrize("make, reason", [
    (lambda p: not_a_checkpoint(p, "garbage.pt", b"this is not a checkpoint"), "not a PyTorch file"),
    (lambda p: not_a_checkpoint(p, "empty.pt", b""), "an empty file"),
    (a_zip, "a zip archive, not a PyTorch file"),
    (truncated, "a truncated or damaged PyTorch file"),
    (pickled_object, "it holds Python objects other than tensors and plain data"),
])
def test_a_file_that_is_no_checkpoint_is_named_in_full(tmp_path, make, reason):
    """Not PyTorch's own message, which is pages long or was cut mid-word."""
    path = make(tmp_path)
    with pytest.raises(UserError) as e:
        load_checkpoint(str(path), "pretrain")
    assert str(e.value) == f"--checkpoint_path: {path} is not a LightGPT checkpoint ({reason})"


def test_a_pickle_that_is_no_checkpoint_warns_nothing(tmp_path, recwarn):
    import pickle

    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=4))  # torch warns about protocol 4 on stderr
    with pytest.raises(UserError, match="not a LightGPT checkpoint"):
        load_checkpoint(str(path), "pretrain")
    assert [str(w.message) for w in recwarn] == []  # a second line under the one-line error


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
