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
from conftest import ROOT, fails_with_one_line, tiny_pretrain_args
from helpers import check

import checkpoint
import files
import generate
import pretrain
from checkpoint import load_checkpoint
from common import UserError


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


# ----------------------------------------------------------------------------- 1. one run per checkpoint


def test_a_second_run_on_a_held_checkpoint_stops_at_once_naming_the_holder(builtin_data, tmp_path, capsys):
    argv = tiny_pretrain_args(builtin_data, str(tmp_path), "--num_epochs", "1")
    with checkpoint.CheckpointLock(str(tmp_path / "checkpoint.pt")):  # another run holds it
        fails_with(capsys, argv, f"{tmp_path / 'checkpoint.pt'} is in use by another run",
                   f"pid {os.getpid()} on {socket.gethostname()}")
    assert not os.path.exists(tmp_path / "checkpoint.pt")  # stopped before any work
    run(argv)  # released: the path is free again, and no lock file is left behind
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "checkpoint.yaml", "runs"]  # the run and its config


@pytest.mark.slow
def test_two_processes_on_one_checkpoint_path(builtin_data, tmp_path):
    """Two real runs: the second stops at once naming the first; kill -9 of the first leaves no stuck lock."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "pretrain.py", *tiny_pretrain_args(builtin_data, str(tmp_path))]
    first = subprocess.Popen(command + ["--num_epochs", "100000", "--checkpoint_interval", "100000"],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        for line in first.stdout:  # the lock is taken before the first evaluation
            if "test perplexity" in line:
                break
        second = subprocess.run(command + ["--num_epochs", "1"], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 2, second.stdout + second.stderr
        [line] = second.stderr.strip().splitlines()
        assert line.startswith(f"error: --checkpoint_path: {tmp_path / 'checkpoint.pt'} is in use by another run "
                               f"(pid {first.pid} on {socket.gethostname()}, since "), line
        assert line.endswith("); wait for it to end, or choose another --checkpoint_path"), line
        assert first.poll() is None  # the first run goes on
        first.kill()  # kill -9: the kernel drops the lock with the process
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
        first.stdout.close()
    with checkpoint.CheckpointLock(str(tmp_path / "checkpoint.pt")):
        pass


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


# ----------------------------------------------------------------------------- 3. output folders checked first


def a_file_in_the_way(tmp_path):
    (tmp_path / "file").write_text("x")
    return tmp_path / "file" / "folder", "not a directory"


@pytest.mark.parametrize("flag", ["--checkpoint_path", "--run_dir_path"])
def test_an_output_folder_that_cannot_be_made_stops_the_run_before_training(builtin_data, tmp_path, capsys, flag):
    """Found at the first save, after an epoch of work, or in the middle of TensorBoard's set-up."""
    blocked, reason = a_file_in_the_way(tmp_path)
    argv = tiny_pretrain_args(builtin_data, str(tmp_path / "run"), "--num_epochs", "1")
    path = str(blocked / "checkpoint.pt") if flag == "--checkpoint_path" else str(blocked)
    argv[argv.index(flag) + 1] = path
    fails_with(capsys, argv, flag, f"cannot write to {blocked} ({reason})")


@pytest.fixture
def read_only_folder(tmp_path, tmpfs):
    """A folder this process cannot write: chmod for a user, a read-only mount for root (who ignores modes)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir(mode=0o555)
        yield folder, "permission denied"
        folder.chmod(0o755)
    else:
        yield tmpfs("64k", "ro"), "read-only file system"


@pytest.mark.parametrize("flag", ["--checkpoint_path", "--run_dir_path"])
def test_a_read_only_output_folder_stops_the_run_before_training(builtin_data, tmp_path, capsys, read_only_folder,
                                                                 flag):
    folder, reason = read_only_folder
    argv = tiny_pretrain_args(builtin_data, str(tmp_path / "run"), "--num_epochs", "1")
    argv[argv.index(flag) + 1] = str(folder / "checkpoint.pt") if flag == "--checkpoint_path" else str(folder)
    fails_with(capsys, argv, flag, f"cannot write to {folder} ({reason})")
    assert "test perplexity" not in capsys.readouterr().out


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
    with files.atomic_path(str(target)) as tmp, open(tmp, "w") as f:
        f.write("x")
    file, folder = os.stat(target).st_ino, os.stat(tmp_path).st_ino
    assert events == [("fsync", file), ("replace", file), ("fsync", folder)]


# ----------------------------------------------------------------------------- 5. resume flags


def test_resume_with_another_seed_notes_that_the_checkpoints_seed_wins(trained, builtin_data, tmp_path, capsys):
    argv = resumable(trained, builtin_data, tmp_path)
    argv[argv.index("--seed") + 1] = "8"
    run(argv)
    assert "note: resuming with the checkpoint's seed 7; ignoring --seed 8" in capsys.readouterr().out


def test_resume_on_another_corpus_is_refused_naming_the_flag_to_pass(trained, builtin_data, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Another corpus.\n\nWith two documents.\n")
    argv = resumable(trained, builtin_data, tmp_path / "run")
    argv[argv.index("--dataset") + 1] = str(corpus)
    fails_with(capsys, argv, f"--dataset {corpus} differs from the checkpoint's builtin", "pass --dataset builtin")
    argv = resumable(trained, builtin_data, tmp_path / "run", "--token_encoding", "r50k_base")
    fails_with(capsys, argv, "--token_encoding r50k_base differs from the checkpoint's bytes",
               "pass --token_encoding bytes")


def test_resume_with_another_hub_subset_is_refused(trained, builtin_data, tmp_path, capsys):
    argv = resumable(trained, builtin_data, tmp_path)

    def on_a_hub_dataset(state):
        state["args"].update(dataset="someone/corpus", dataset_subset="en")

    edited(tmp_path / "checkpoint.pt", on_a_hub_dataset)
    argv[argv.index("--dataset") + 1] = "someone/corpus"
    fails_with(capsys, argv + ["--dataset_subset", "fr"], "--dataset_subset fr differs from the checkpoint's en",
               "pass --dataset_subset en")  # before any download


@pytest.mark.parametrize("num_epochs", ["1", "2"])
def test_resume_of_a_finished_run_says_it_is_complete(trained, builtin_data, tmp_path, capsys, num_epochs):
    """It exited 0 having done nothing, silently (and after tokenizing, building the model, ...)."""
    argv = resumable(trained, builtin_data, tmp_path)
    argv[argv.index("--num_epochs") + 1] = num_epochs
    before = (tmp_path / "checkpoint.pt").read_bytes()
    assert run(argv) == []
    out = capsys.readouterr().out
    assert f"already complete at step 4 (end of epoch 2); --num_epochs {num_epochs} ends at step " in out
    assert "pass a larger --num_epochs to train further" in out
    assert "model:" not in out  # nothing was set up
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


# ----------------------------------------------------------------------------- 6. stale temporary files


def test_stale_temporary_checkpoints_are_removed_by_the_next_run(trained, builtin_data, tmp_path, capsys):
    argv = resumable(trained, builtin_data, tmp_path)
    stale = [tmp_path / "checkpoint.pt.k2j4_x9a.tmp", tmp_path / "checkpoint.pt.0abcdefg.tmp"]
    others = [tmp_path / "other.pt.k2j4_x9a.tmp", tmp_path / "checkpoint.pt.notes", tmp_path / "checkpoint.pt.tmp"]
    for path in stale + others:
        path.write_bytes(b"\0" * 1000)
        os.utime(path, (time.time() - 60, time.time() - 60))
    run(argv)
    assert [p for p in stale if p.exists()] == []
    assert all(p.exists() for p in others)  # not this checkpoint's, or not our temporary names
    assert "note: removed 2 temporary files (2.0 kB) that an earlier run left" in capsys.readouterr().out


@pytest.mark.slow
def test_a_run_killed_while_saving_leaves_a_temporary_file_the_next_run_removes(builtin_data, tmp_path):
    """kill -9 in the middle of a save, for real: the file is orphaned until the next run."""
    argv = tiny_pretrain_args(builtin_data, str(tmp_path), "--num_epochs", "2")
    script = (
        "import os, signal, sys, torch\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "def save_and_die(obj, f):\n"
        "    out = open(f, 'wb') if isinstance(f, str) else f\n"
        "    out.write(b'\\0' * 100_000)\n"
        "    out.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "torch.save = save_and_die\n"
        "import pretrain\n"
        f"pretrain.main(pretrain.parse_args({argv!r}))\n"
    )
    killed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert len(temporary_files(tmp_path)) == 1 and not os.path.exists(tmp_path / "checkpoint.pt")
    run(argv)
    assert temporary_files(tmp_path) == []
    assert load_checkpoint(str(tmp_path / "checkpoint.pt"), "pretrain")["step"] == 4


# ----------------------------------------------------------------------------- 7. a full disk


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(trained, builtin_data, tmp_path,
                                                                               capsys, monkeypatch):
    argv = resumable(trained, builtin_data, tmp_path)
    before = (tmp_path / "checkpoint.pt").read_bytes()

    def save_on_a_full_disk(obj, f):
        with (open(f, "wb") if isinstance(f, str) else open(os.devnull, "wb")) as out:
            out.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    fails_with(capsys, argv, f"cannot save step 6 to {tmp_path / 'checkpoint.pt'} (no space left on device)",
               "the checkpoint already there is intact")
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert temporary_files(tmp_path) == []


def test_a_full_tmpfs_while_saving_is_one_line_and_keeps_the_previous_checkpoint(trained, builtin_data, tmp_path,
                                                                                capsys, tmpfs):
    """torch's own writer on a real full disk: it said `unexpected pos 704 vs 598` with a traceback."""
    size = os.path.getsize(trained)
    folder = tmpfs(f"{(size * 3 // 2 // 4096 + 2) * 4096}")  # room for one checkpoint, not for two at once
    argv = resumable(trained, builtin_data, folder)
    before = (folder / "checkpoint.pt").read_bytes()
    argv[argv.index("--run_dir_path") + 1] = str(tmp_path / "runs")
    fails_with(capsys, argv, f"cannot save step 6 to {folder / 'checkpoint.pt'} (no space left on device)")
    assert (folder / "checkpoint.pt").read_bytes() == before
    assert temporary_files(folder) == []


def test_a_full_disk_under_the_tensorboard_events_is_one_line(builtin_data, tmp_path, capsys, monkeypatch):
    """The events are written by a background thread: its traceback came first, then ours."""
    from tensorboard.summary.writer import record_writer

    real, written = record_writer.RecordWriter.write, []

    def write_until_the_disk_is_full(self, data):
        if b"train/" in data:  # the header, the settings and the first evaluation went; the first metrics do not
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(data)
        real(self, data)

    monkeypatch.setattr(record_writer.RecordWriter, "write", write_until_the_disk_is_full)
    argv = tiny_pretrain_args(builtin_data, str(tmp_path), "--num_epochs", "2", "--checkpoint_interval", "1",
                              "--log_interval", "1")
    fails_with(capsys, argv, f"--run_dir_path: cannot write TensorBoard events to {tmp_path / 'runs'} "
                             f"(no space left on device)")
    assert load_checkpoint(str(tmp_path / "checkpoint.pt"), "pretrain")["step"] == 2  # saved before it stopped


def test_a_full_disk_under_the_run_folder_is_found_before_training(builtin_data, tmp_path, capsys, tmpfs):
    folder = tmpfs("64k")
    with open(folder / "filler", "wb", buffering=0) as f:  # fill the disk
        with pytest.raises(OSError, match="No space left"):
            while True:
                f.write(b"\0" * 4096)
    argv = tiny_pretrain_args(builtin_data, str(tmp_path), "--num_epochs", "1", "--run_dir_path", str(folder / "runs"))
    fails_with(capsys, argv, f"--run_dir_path: cannot write to {folder / 'runs'} (no space left on device)")


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


# ----------------------------------------------------------------------------- under torchrun


def torchrun(argv, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "pretrain.py", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def our_errors(result):
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_under_torchrun_rank_0_holds_the_lock_and_every_rank_stops(builtin_data, tmp_path):
    with checkpoint.CheckpointLock(str(tmp_path / "checkpoint.pt")):
        result = torchrun(tiny_pretrain_args(builtin_data, str(tmp_path), "--num_epochs", "1"))
    assert result.returncode != 0
    assert our_errors(result) == [  # rank 0 alone says why; no rank waits for the others
        f"error: --checkpoint_path: {tmp_path / 'checkpoint.pt'} is in use by another run (pid {os.getpid()} on "
        f"{result.stderr.split(' on ', 1)[1].split(')')[0]}); wait for it to end, or choose another --checkpoint_path"]
    # torchrun reports the failed workers with a traceback of its own; none comes from our code.
    assert 'pretrain.py", line' not in result.stderr and "[rank0]: Traceback" not in result.stderr


def test_a_sharded_save_that_torch_reports_as_a_bad_position_names_the_full_disk(tmpfs, monkeypatch):
    """DCP's writers sometimes meet a full disk inside torch's zip writer, which says only "unexpected pos":
    the one line asks the disk itself why (the torchrun test below checks that the folder is removed)."""
    folder = tmpfs("64k") / "step-000000008-abcd"
    folder.mkdir()
    with open(folder / "__0_0.distcp", "wb") as f:  # the disk fills up
        with pytest.raises(OSError):
            f.write(b"x" * (1 << 20))
            f.flush()

    def failing(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    import torch.distributed.checkpoint as dcp

    from sharded_checkpoint import save_shards

    monkeypatch.setattr(dcp, "save", failing)
    with pytest.raises(UserError, match=r"cannot write the sharded checkpoint to .* \(no space left on device\); "
                                        r"the checkpoint already there is intact"):
        save_shards({}, {}, str(folder), 0, None)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["single", "sharded"])
def test_under_torchrun_a_full_disk_stops_every_rank_in_one_line(trained, builtin_data, tmp_path, tmpfs, form):
    """A failed save (rank 0's file, or any rank's shards) reaches the other ranks, which would otherwise wait at
    the barrier for hours; the checkpoint already there stays whole."""
    size = os.path.getsize(trained)
    if form == "sharded":  # the shards' files hold more than one file does: measure a first save of them
        check(torchrun(tiny_pretrain_args(builtin_data, str(tmp_path / "measure"), "--num_epochs", "2",
                                          "--checkpoint_format", form)))
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(tmp_path / "measure")
                   for f in files if "runs" not in d)
    folder = tmpfs(f"{(size * 3 // 2 // 4096 + 2) * 4096}")  # room for the first checkpoint, not for two at once
    argv = tiny_pretrain_args(builtin_data, str(folder), "--num_epochs", "4", "--run_dir_path", str(tmp_path / "runs"),
                              "--checkpoint_format", form)
    result = torchrun(argv)
    assert result.returncode != 0
    errors = our_errors(result)
    if form == "single":
        assert errors == [f"error: --checkpoint_path: cannot save step 8 to {folder / 'checkpoint.pt'} "
                          f"(no space left on device); the checkpoint already there is intact"]
    else:
        assert len(errors) == 1 and errors[0].startswith("error: --checkpoint_path: cannot write the sharded "
                                                         "checkpoint to "), result.stderr[-3000:]
        assert errors[0].endswith("(no space left on device); the checkpoint already there is intact")
        assert os.listdir(folder / "checkpoint.pt.shards") == [load_checkpoint(
            str(folder / "checkpoint.pt"), "pretrain", required=())["sharded"]["folder"].split(os.sep)[-1]]
    assert 'pretrain.py", line' not in result.stderr
    assert load_checkpoint(str(folder / "checkpoint.pt"), "pretrain", required=())["step"] == 4
    assert temporary_files(folder) == []
