"""torchrun on the CPU with gloo: 2 processes at every sharding level against 1 process."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, tiny_pretrain_args
from helpers import check, launch, losses, whole

from checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # every test launches torchrun processes

# Width 27 with 3 heads: every weight has an odd row count, so FSDP's shards are uneven.
# A constant learning rate lets a run of 2 epochs resumed to 4 match a run of 4 straight.
SHAPE = ["--embedding_dimensions", "27", "--num_attention_heads", "3", "--dropout", "0", "--lr_schedule", "constant"]


def args(data, run, *extra):
    return tiny_pretrain_args(data, str(run), *SHAPE, *extra)


def assert_same_state(a_path, b_path, atol=1e-6):
    a, b = whole(a_path), whole(b_path)
    assert a["step"] == b["step"] and a.keys() == b.keys()
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=1e-5, atol=atol, msg=name)
    assert a["optimizer"]["param_groups"][0].keys() == b["optimizer"]["param_groups"][0].keys()
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(b["optimizer"]["state"][index][key], value, rtol=1e-5, atol=atol,
                                       msg=f"{index}.{key}")


@pytest.fixture(scope="module")
def single(builtin_data, tmp_path_factory):
    """The 1-process reference: 4 epochs straight."""
    run = tmp_path_factory.mktemp("single")
    result = check(launch(1, args(builtin_data, run)))
    return run, losses(result.stdout)


@pytest.mark.parametrize("level, extra", [(0, []), (2, []), (3, []), (3, ["--activation_checkpointing"])])
def test_two_processes_match_one_process(builtin_data, tmp_path, single, level, extra):
    run, reference_losses = single
    result = check(launch(2, args(builtin_data, tmp_path, "--ddp_sharding_level", str(level), *extra)))
    assert f"2 processes, {'ddp' if level == 0 else f'fsdp level {level}'}" in result.stdout
    assert losses(result.stdout) == pytest.approx(reference_losses, abs=1e-4)
    # The consolidated checkpoint holds torch.optim.Adafactor's state: the sharded updates are its updates.
    assert_same_state(run / "checkpoint.pt", tmp_path / "checkpoint.pt")


def test_two_process_resume_continues_exactly(builtin_data, tmp_path):
    common = ("--ddp_sharding_level", "2", "--dropout", "0.1")
    check(launch(2, args(builtin_data, tmp_path / "straight", *common)))
    check(launch(2, args(builtin_data, tmp_path / "split", *common, "--num_epochs", "2")))
    check(launch(2, args(builtin_data, tmp_path / "split", *common, "--resume")))
    assert_same_state(tmp_path / "straight" / "checkpoint.pt", tmp_path / "split" / "checkpoint.pt", atol=1e-7)


@pytest.mark.parametrize("first, second", [(2, 1), (1, 2)])
def test_checkpoints_resume_across_world_sizes(builtin_data, tmp_path, single, first, second):
    """Half the run with one world size, the rest with the other: the same weights as straight through
    (the global batch and sample stream do not depend on the world size)."""
    run, _ = single
    level = ("--ddp_sharding_level", "3")
    check(launch(first, args(builtin_data, tmp_path, *level, "--num_epochs", "2")))
    resumed = check(launch(second, args(builtin_data, tmp_path, *level, "--resume")))
    assert f"written by {first} process(es), now {second}" in resumed.stdout
    assert_same_state(run / "checkpoint.pt", tmp_path / "checkpoint.pt")


def test_uneven_accumulation_warns(builtin_data, tmp_path):
    result = check(launch(2, args(builtin_data, tmp_path, "--gradient_accumulation_steps", "3", "--num_epochs", "1")))
    assert ("warning: --gradient_accumulation_steps 3 does not divide among 2 processes; "
            "each does 1 (2 in all)") in result.stdout


def test_impossible_split_is_one_clear_line(builtin_data, tmp_path):
    result = launch(2, args(builtin_data, tmp_path, "--gradient_accumulation_steps", "1"))
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert ours == [  # every rank stops; rank 0 alone says why
        "error: --gradient_accumulation_steps 1 is smaller than the world size 2: "
        "every rank needs at least one micro-batch per step"
    ]
    # torchrun itself reports the failed workers; no traceback comes from our code.
    assert 'pretrain.py", line' not in result.stderr and "[rank0]: Traceback" not in result.stderr


def test_signal_on_one_rank_stops_all_ranks_with_a_checkpoint(builtin_data, tmp_path):
    argv = args(builtin_data, tmp_path, "--num_epochs", "100000", "--ddp_sharding_level", "2")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "pretrain.py", *argv],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        output = []
        for line in launcher.stdout:  # wait until training is under way
            output.append(line)
            if "epoch 1/" in line:
                break
        workers = subprocess.run(["ps", "-o", "pid=", "--ppid", str(launcher.pid)], capture_output=True,
                                 text=True).stdout.split()
        assert len(workers) == 2, workers
        os.kill(int(workers[-1]), signal.SIGTERM)  # one rank only
        output.append(launcher.stdout.read())
        launcher.wait(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    text = "".join(output)
    assert launcher.returncode != 0
    assert "stopped by" in text and "saved to" in text, text[-3000:]
    state = load_checkpoint(str(tmp_path / "checkpoint.pt"), "pretrain")
    assert state["step"] > 0 and state["world_size"] == 2


def worker_of_rank(launcher_pid, rank):
    """The pid of the torchrun worker with this RANK."""
    for pid in subprocess.run(["ps", "-o", "pid=", "--ppid", str(launcher_pid)], capture_output=True,
                              text=True).stdout.split():
        with open(f"/proc/{pid}/environ", "rb") as f:
            if f"RANK={rank}".encode() in f.read().split(b"\0"):
                return int(pid)
    raise AssertionError(f"no worker of rank {rank}")


def is_running(pid):
    """Whether pid is a live process (not gone, not a zombie its parent has yet to reap)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def end_frozen_run(launcher, stopped):
    """Kill the frozen worker (torchrun's SIGTERM cannot end a stopped process), then the launcher."""
    if stopped is not None:
        os.kill(stopped, signal.SIGKILL)
    try:
        launcher.wait(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()


def our_lines(log) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("hung", [1, 0])
def test_a_hung_rank_stops_the_others_within_the_collective_timeout(builtin_data, tmp_path, hung):
    """A rank frozen mid-training (SIGSTOP) used to hold every other rank for the 6-hour set-up timeout;
    --collective_timeout 0.05 (3 s) must end the others with one line naming it, and leave no half-written file."""
    argv = args(builtin_data, tmp_path / "run", "--num_epochs", "100000", "--collective_timeout", "0.05")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "log"
    with open(log, "w") as out:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "pretrain.py", *argv],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
        )
    stopped = None
    try:
        deadline = time.monotonic() + 180
        while "saved checkpoint" not in log.read_text():  # training is under way, a checkpoint written
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        stopped, survivor = worker_of_rank(launcher.pid, hung), worker_of_rank(launcher.pid, 1 - hung)
        os.kill(stopped, signal.SIGSTOP)
        frozen_at = time.monotonic()
        while is_running(survivor):  # 3 s for the collective, up to 6 s to find out who is silent
            assert time.monotonic() - frozen_at < 60, "the other rank still waits a minute later"
            time.sleep(0.2)
    finally:
        end_frozen_run(launcher, stopped)
    text, ours = log.read_text(), our_lines(log)
    assert len(ours) == 1 and ours[0].startswith(f"error: rank {hung} stopped answering"), text[-3000:]
    assert "--collective_timeout" in ours[0]
    assert re.search(r"exitcode\s*:\s*2 ", text), text[-3000:]  # torchrun's report: the survivor's status
    assert not re.search(r'(pretrain|training|common|parallel)\.py", line', text), text[-3000:]  # no traceback of ours
    if hung == 1:  # the survivor is the writer: it left no partial file (a rank 0 killed mid-write may)
        assert not [f for f in os.listdir(tmp_path / "run") if f.endswith(".tmp")]
    assert load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"), "pretrain")["step"] > 0  # the last one, whole


# A pretrain.py whose corpus preparation (rank 0 tokenizes, then rank 1 finds its files) is slow or freezes
# on one rank: set-up work that no collective times.
SLOW_SETUP = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
import pretrain
from common import run_main

real = pretrain.prepare_token_files

def prepare(*args, **kwargs):
    if os.environ["RANK"] == {rank!r}:
        if {freeze}:
            os.kill(os.getpid(), signal.SIGSTOP)
        time.sleep({sleep})
    return real(*args, **kwargs)

pretrain.prepare_token_files = prepare
run_main(pretrain.main, pretrain.parse_args)
"""


def slow_setup(tmp_path, rank, freeze=False, sleep=0.0):
    script = tmp_path / "slow_setup.py"
    script.write_text(SLOW_SETUP.format(root=ROOT, rank=str(rank), freeze=freeze, sleep=sleep))
    return str(script)


def test_tokenizing_longer_than_the_collective_timeout_is_not_a_hang(builtin_data, tmp_path):
    """Rank 0 prepares the corpus for 8 s while rank 1 waits with --collective_timeout 0.05 (3 s): the waiting
    rank watches rank 0's heartbeat, so the run goes on and finishes."""
    script = slow_setup(tmp_path, rank=0, sleep=8)
    argv = args(builtin_data, tmp_path / "run", "--num_epochs", "1", "--collective_timeout", "0.05")
    result = check(launch(2, argv, script=script))
    assert "error:" not in result.stdout + result.stderr


@pytest.mark.parametrize("frozen", [0, 1])
def test_a_rank_frozen_in_set_up_stops_the_others_within_the_collective_timeout(builtin_data, tmp_path, frozen):
    """A rank frozen (SIGSTOP) while preparing the corpus: rank 0 as the one process that tokenizes, rank 1 as
    one finding its files afterwards. The other waited the 6-hour set-up timeout; it must stop within
    --collective_timeout (3 s) with one line naming the frozen rank and the phase."""
    script = slow_setup(tmp_path, rank=frozen, freeze=True)
    argv = args(builtin_data, tmp_path / "run", "--num_epochs", "1", "--collective_timeout", "0.05")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "log"
    with open(log, "w") as out:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", script, *argv],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
        )
    stopped = None
    try:
        deadline = time.monotonic() + 120
        while stopped is None:
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
            with contextlib.suppress(AssertionError):
                pid = worker_of_rank(launcher.pid, frozen)
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "T":
                        stopped = pid
        survivor = worker_of_rank(launcher.pid, 1 - frozen)
        frozen_at = time.monotonic()
        while is_running(survivor):
            assert time.monotonic() - frozen_at < 60, "the other rank still waits a minute later"
            time.sleep(0.2)
    finally:
        end_frozen_run(launcher, stopped)
    text, ours = log.read_text(), our_lines(log)
    assert len(ours) == 1, text[-3000:]
    assert ours[0].startswith(f"error: rank {frozen} stopped answering in set-up"), ours[0]
    assert "--collective_timeout 0.05 minutes" in ours[0]
    assert re.search(r"exitcode\s*:\s*2 ", text), text[-3000:]  # torchrun's report: the survivor's status
    assert not re.search(r'(pretrain|training|common|parallel)\.py", line', text), text[-3000:]


# ----------------------------------------------------------------------------- sharded checkpoints


def shard_folders(run) -> list[str]:
    return sorted(os.listdir(run / "checkpoint.pt.shards"))


@pytest.mark.parametrize("level", [2, 3])
def test_sharded_checkpoints_resume_exactly_and_leave_one_folder(builtin_data, tmp_path, level):
    common = ("--ddp_sharding_level", str(level), "--dropout", "0.1")
    check(launch(2, args(builtin_data, tmp_path / "straight", *common)))
    check(launch(2, args(builtin_data, tmp_path / "split", *common, "--num_epochs", "2")))
    pointer = load_checkpoint(str(tmp_path / "split" / "checkpoint.pt"), "pretrain")
    assert "model" not in pointer and pointer["sharded"]["world_size"] == 2
    assert sorted(pointer["sharded"]["files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each rank its own
    assert len(shard_folders(tmp_path / "split")) == 1
    check(launch(2, args(builtin_data, tmp_path / "split", *common, "--resume")))
    assert len(shard_folders(tmp_path / "split")) == 1  # the earlier save's folder removed
    assert_same_state(tmp_path / "straight" / "checkpoint.pt", tmp_path / "split" / "checkpoint.pt", atol=1e-7)


def test_a_sharded_checkpoint_reshards_to_one_process(builtin_data, tmp_path, single):
    """Half the run at 2 processes, level 3, sharded; the rest in 1 process: the weights of a run straight
    through in 1 process."""
    run, _ = single
    check(launch(2, args(builtin_data, tmp_path, "--ddp_sharding_level", "3", "--num_epochs", "2")))
    resumed = check(launch(1, args(builtin_data, tmp_path, "--resume")))
    assert "written by 2 process(es), now 1" in resumed.stdout
    assert not os.path.exists(tmp_path / "checkpoint.pt.shards") or not shard_folders(tmp_path)  # now one file
    assert_same_state(run / "checkpoint.pt", tmp_path / "checkpoint.pt")


def test_kill_9_during_a_sharded_save_leaves_the_previous_checkpoint(builtin_data, tmp_path):
    """Rank 1 dies (SIGKILL) right after writing its shards of the second save, before the pointer moves:
    the first save stays whole, and a resume from it finishes the run."""
    argv = args(builtin_data, tmp_path, "--ddp_sharding_level", "2", "--checkpoint_interval", "1", "--num_epochs", "2")
    script = tmp_path / "die_in_second_save.py"
    script.write_text(
        "import os, signal, sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import sharded_checkpoint\n"
        "save, saves = sharded_checkpoint.save_shards, [0]\n"
        "def save_then_die(*a, **k):\n"
        "    result = save(*a, **k)\n"
        "    saves[0] += 1\n"
        "    if saves[0] == 2 and os.environ['RANK'] == '1':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return result\n"
        "sharded_checkpoint.save_shards = save_then_die\n"
        "import pretrain\n"
        "pretrain.save_shards = save_then_die\n"
        f"pretrain.main(pretrain.parse_args({argv!r}))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    killed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert killed.returncode != 0, killed.stdout[-2000:]
    pointer = load_checkpoint(str(tmp_path / "checkpoint.pt"), "pretrain")
    assert pointer["step"] == 2  # the first save's
    assert len(shard_folders(tmp_path)) == 2  # its folder, and the second save's, never named
    resumed = check(launch(2, [*argv, "--num_epochs", "4", "--resume"]))
    assert "resumed" in resumed.stdout and len(shard_folders(tmp_path)) == 1
    assert whole(tmp_path / "checkpoint.pt")["step"] == 8


def test_a_consolidated_checkpoint_generates_exports_and_resumes(builtin_data, tmp_path, capsys):
    import consolidate
    import export
    import generate
    from conftest import fails_with_one_line

    check(launch(2, args(builtin_data, tmp_path, "--ddp_sharding_level", "3", "--num_epochs", "2")))
    pointer = str(tmp_path / "checkpoint.pt")
    fails_with_one_line(capsys, generate, ["--checkpoint_path", pointer, "--device", "cpu", "--prompt", "a"],
                        "is a sharded checkpoint", "python consolidate.py")
    one = str(tmp_path / "whole.pt")
    consolidate.main(consolidate.parse_args(["--checkpoint_path", pointer, "--output_path", one]))
    state = load_checkpoint(one, "pretrain")
    assert state["step"] == 4 and "sharded" not in state and state["optimizer"]["state"]
    generate.main(generate.parse_args(["--checkpoint_path", one, "--device", "cpu", "--prompt", "The", "--max_tokens",
                                       "5", "--seed", "0"]))
    export.main(export.parse_args(["--checkpoint_path", one, "--output_path", str(tmp_path / "export")]))
    assert os.path.isfile(tmp_path / "export" / "model.safetensors")
    fails_with_one_line(capsys, consolidate, ["--checkpoint_path", one, "--output_path", str(tmp_path / "x.pt")],
                        "already one file")


def test_a_missing_or_damaged_shard_file_is_one_line(builtin_data, tmp_path):
    check(launch(2, args(builtin_data, tmp_path, "--ddp_sharding_level", "2", "--num_epochs", "2")))
    (folder,) = shard_folders(tmp_path)
    shard = tmp_path / "checkpoint.pt.shards" / folder / "__1_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    failed = launch(2, args(builtin_data, tmp_path, "--ddp_sharding_level", "2", "--resume"))
    assert failed.returncode != 0 and "__1_0.distcp is damaged" in failed.stderr + failed.stdout
    shard.unlink()
    failed = launch(1, args(builtin_data, tmp_path, "--resume"))
    ours = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "__1_0.distcp is missing (rank 1 of the 2 that saved it wrote it)" in ours[0]


def test_shards_that_cannot_fill_this_model_are_one_line(builtin_data, tmp_path):
    """A pointer naming another model's shards (written by a run of another width): resharding is impossible."""
    from checkpoint import save_checkpoint

    check(launch(2, args(builtin_data, tmp_path / "a", "--num_epochs", "2")))
    check(launch(2, args(builtin_data, tmp_path / "b", "--num_epochs", "2", "--embedding_dimensions", "30")))
    pointer = load_checkpoint(str(tmp_path / "a" / "checkpoint.pt"), "pretrain")
    other = load_checkpoint(str(tmp_path / "b" / "checkpoint.pt"), "pretrain")
    pointer.pop("sha256")
    pointer["sharded"] = {**other["sharded"], "folder": os.path.join("..", "b", other["sharded"]["folder"])}
    save_checkpoint(pointer, str(tmp_path / "a" / "checkpoint.pt"))
    failed = launch(2, args(builtin_data, tmp_path / "a", "--resume"))
    ours = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert failed.returncode != 0 and ours and "cannot load its shards into this run" in ours[0], failed.stderr[-2000:]
