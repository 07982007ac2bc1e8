"""common.py's plumbing as the scripts use it."""

import os
import zipfile

import pytest
import torch
from conftest import ROOT

import beam_search
import bench
import generate
import pretrain
from checkpoint import load_checkpoint, save_checkpoint
from common import UserError
from files import atomic_path

# ----------------------------------------------------------------------------- --help


def help_entries(module, capsys, monkeypatch) -> dict[str, str]:
    """--help as {flag: its invocation and help, joined into one line}."""
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside a help
    with pytest.raises(SystemExit) as e:
        module.parse_args(["--help"])
    assert e.value.code == 0
    entries = {}
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  -"):  # a flag starts an entry; its help may follow on the next line
            flag = line.split()[0].rstrip(",")
            entries[flag] = line.strip()
        elif line.startswith("    ") and entries:
            entries[flag] += " " + line.strip()
    return entries


@pytest.mark.parametrize("module", [pretrain, generate, beam_search, bench])
def test_help_names_each_default_once(module, capsys, monkeypatch):
    """argparse's defaults formatter appended "(default: X)" to helps that already said their default."""
    entries = help_entries(module, capsys, monkeypatch)
    assert len(entries) >= 10
    for entry in entries.values():
        assert entry.lower().count("default") <= 1, entry
    assert sum(entry.endswith(")") and "(default: " in entry for entry in entries.values()) >= 5


def test_help_shows_real_defaults_but_not_python_ones(capsys, monkeypatch):
    entries = help_entries(pretrain, capsys, monkeypatch)
    assert entries["--batch_size"].endswith("samples per forward pass (default: 1)")
    assert entries["--dataset_subset"].count("default") == 1
    assert entries["--seed"].endswith("(default: drawn and recorded in the checkpoint)")
    text = " ".join(entries.values())
    assert "(default: False)" not in text and "(default: None)" not in text  # a switch is off; None says nothing


def test_rms_decay_reads_the_same_in_help_and_docs(capsys, monkeypatch):
    assert "at most 0" in help_entries(pretrain, capsys, monkeypatch)["--rms_decay"]
    with open(os.path.join(ROOT, "docs", "pretraining.md")) as f:
        row = next(line for line in f if line.startswith("| --rms_decay |"))
    assert "at most 0" in row and "negative" not in row


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


# ----------------------------------------------------------------------------- messages


def test_a_long_library_message_is_cut_after_a_word():
    """datasets' 'Couldn't find ... An error happened while trying to )' ended mid-sentence, unmarked."""
    from common import first_line

    error = FileNotFoundError("Couldn't find any data file at /x. An error happened while trying to locate it\nmore")
    assert first_line(error, 60) == "Couldn't find any data file at /x. An error happened ..."
    assert len(first_line(error, 60)) <= 60
    assert first_line(error, 200, with_type=True) == ("FileNotFoundError: Couldn't find any data file at /x. "
                                                      "An error happened while trying to locate it")
    assert first_line(ValueError("")) == "ValueError"
