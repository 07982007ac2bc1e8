"""Never lose a run, never show a traceback: the checkpoint's lock, checksum and schema, output folders
checked before training, fsync'd atomic writes, resume flags, stale temporary files, a full disk."""

import errno
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile

import pytest
import torch

import common
import generate
import pretrain
from common import load_checkpoint, run_main
from conftest import ROOT, fails_with_one_line, tiny_pretrain_args


def run(argv):
    return pretrain.main(pretrain.parse_args(argv))


def fails_with(capsys, argv, *fragments):
    return fails_with_one_line(capsys, pretrain, argv, *fragments)


@pytest.fixture(scope="module")
def trained(builtin_data, tmp_path_factory):
    """A finished tiny run of 2 epochs (4 steps, seed 7): its checkpoint's path. Tests copy it."""
    path = tmp_path_factory.mktemp("trained")
    run(tiny_pretrain_args(builtin_data, str(path), "--num_epochs", "2"))
    return path / "checkpoint.pt"


def resumable(trained, builtin_data, folder, *extra):
    """A copy of the trained run in `folder` and the flags that resume it (to 3 epochs by default)."""
    os.makedirs(folder, exist_ok=True)
    shutil.copy(trained, os.path.join(folder, "checkpoint.pt"))
    argv = tiny_pretrain_args(builtin_data, str(folder), "--resume", *extra)
    argv[argv.index("--num_epochs") + 1] = "3"
    return argv


def temporary_files(folder):
    return glob.glob(os.path.join(folder, "**", "*.tmp"), recursive=True)


def edited(path, change):
    """Rewrite a checkpoint through `change(state)` as a writer without checksums would (an older
    LightGPT, or a hand edit): no sha256 entry."""
    state = torch.load(path, weights_only=True)
    state.pop("sha256", None)
    change(state)
    torch.save(state, path)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, *options) -> a fresh tmpfs folder (root only); the test is skipped where mounting is
    impossible (not root, no mount(8), a container that forbids it)."""
    mounted = []

    def mount(size, *options):
        folder = tmp_path / f"tmpfs{len(mounted)}"
        folder.mkdir()
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root and mount(8)")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs",
                                 str(folder)], capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


# ----------------------------------------------------------------------------- 2. checksums


def flip_a_bit_in_a_tensor(path):
    """Flip the exponent's top bit of one float in the first tensor record: a weight becomes huge, and
    the file still loads."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        record = next(i for i in z.infolist() if "/data/" in i.filename)
    header = record.header_offset
    start = header + 30 + int.from_bytes(data[header + 26 : header + 28], "little") + \
        int.from_bytes(data[header + 28 : header + 30], "little")
    data[start + 4 * 10 + 3] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_a_weight_is_refused_and_the_file_kept(trained, builtin_data, tmp_path, capsys):
    argv = resumable(trained, builtin_data, tmp_path)
    checkpoint = tmp_path / "checkpoint.pt"
    flip_a_bit_in_a_tensor(checkpoint)
    damaged = checkpoint.read_bytes()
    assert torch.load(checkpoint, weights_only=True)["model"]["token_embeddings.weight"].abs().max() > 1e5
    fails_with(capsys, argv, f"{checkpoint} is damaged", "checksum")
    assert checkpoint.read_bytes() == damaged  # not overwritten by a resumed run
    fails_with_one_line(capsys, generate, ["--checkpoint_path", str(checkpoint), "--device", "cpu", "--prompt", "x"],
                        f"{checkpoint} is damaged")


def test_a_checkpoint_edited_without_its_checksum_is_refused(trained, builtin_data, tmp_path, capsys):
    argv = resumable(trained, builtin_data, tmp_path)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    state["step"] = 2  # plain data is covered too, not only tensors
    torch.save(state, tmp_path / "checkpoint.pt")
    fails_with(capsys, argv, "is damaged")


def test_a_checkpoint_without_a_checksum_still_resumes(trained, builtin_data, tmp_path, capsys):
    """Written before checksums: loads unverified, without a word."""
    argv = resumable(trained, builtin_data, tmp_path)
    edited(tmp_path / "checkpoint.pt", lambda state: None)
    run(argv)
    assert load_checkpoint(str(tmp_path / "checkpoint.pt"), "pretrain")["step"] == 6
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- 4. fsync before the rename


def test_atomic_writes_reach_the_disk_before_and_after_the_rename(tmp_path, monkeypatch):
    """A power cut after the rename must not leave an empty "new" file where the old one was."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "notes.txt"
    with common.atomic_path(str(target)) as tmp, open(tmp, "w") as f:
        f.write("x")
    file, folder = os.stat(target).st_ino, os.stat(tmp_path).st_ino
    assert events == [("fsync", file), ("replace", file), ("fsync", folder)]


# ----------------------------------------------------------------------------- 8. the checkpoint's schema


def set_in(key, value):
    def change(state):
        target = state
        *parents, last = key
        for name in parents:
            target = target[name]
        target[last] = value
    return change


def delete(*key):
    def change(state):
        target = state
        for name in key[:-1]:
            target = target[name]
        del target[key[-1]]
    return change


MALFORMED = {  # what is wrong -> (the edit, what the one line must say)
    "no optimizer": (delete("optimizer"), "it has no 'optimizer' entry"),
    "no config field": (delete("config", "num_hidden_layers"), "its config has no 'num_hidden_layers'"),
    "negative width": (set_in(("config", "embedding_dimensions"), -32),
                       "its config is invalid (embedding_dimensions must be positive, got -32"),
    "text dropout": (set_in(("config", "dropout"), "0.1"), "its config's 'dropout' is '0.1', expected a number"),
    "version as text": (set_in(("version",), "1"), "its format version '1' is not a positive integer"),
    "step as text": (set_in(("step",), "4"), "its 'step' is '4', expected an integer >= 0"),
    "weight of another shape": (set_in(("model", "blocks.0.attn.qkv.weight"), torch.zeros(99, 32)),
                                "weight 'blocks.0.attn.qkv.weight' has shape (99, 32); its config needs (96, 32)"),
    "missing weight": (delete("model", "output_norm.weight"), "weight 'output_norm.weight' is missing"),
    "unknown weight": (set_in(("model", "extra.weight"), torch.zeros(2)), "unexpected weight 'extra.weight'"),
    "end-of-text past the vocabulary": (set_in(("eot_id",), 999), "its 'eot_id' 999 is not in its vocabulary of 257"),
    "optimizer state of another shape": (set_in(("optimizer", "state", 2, "row_var"), torch.zeros(5, 1)),
                                         "optimizer state 'row_var' of parameter 2 has shape (5, 1); expected (96, 1)"),
    "no rng": (set_in(("rng",), []), "its 'rng' is [], expected a list of RNG states"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_a_malformed_checkpoint_is_one_line_naming_the_file_and_the_fault(trained, builtin_data, tmp_path, capsys,
                                                                          case):
    change, fragment = MALFORMED[case]
    argv = resumable(trained, builtin_data, tmp_path)
    edited(tmp_path / "checkpoint.pt", change)
    fails_with(capsys, argv, f"--checkpoint_path: {tmp_path / 'checkpoint.pt'} ", fragment)


@pytest.mark.parametrize("case", ["no config field", "negative width", "version as text", "weight of another shape",
                                  "missing weight", "end-of-text past the vocabulary"])
def test_generate_names_the_same_faults(trained, tmp_path, capsys, case):
    change, fragment = MALFORMED[case]
    shutil.copy(trained, tmp_path / "checkpoint.pt")
    edited(tmp_path / "checkpoint.pt", change)
    argv = ["--checkpoint_path", str(tmp_path / "checkpoint.pt"), "--device", "cpu", "--prompt", "x"]
    fails_with_one_line(capsys, generate, argv, f"--checkpoint_path: {tmp_path / 'checkpoint.pt'} ", fragment)



