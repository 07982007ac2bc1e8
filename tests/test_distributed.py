"""torchrun on the CPU with gloo: 2 processes at every sharding level against 1 process."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, tiny_pretrain_args
from helpers import check, launch, losses

from checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # every test launches torchrun processes

# Width 27 with 3 heads: every weight has an odd row count, so FSDP's shards are uneven.
# A constant learning rate lets a run of 2 epochs resumed to 4 match a run of 4 straight.
SHAPE = ["--embedding_dimensions", "27", "--num_attention_heads", "3", "--dropout", "0", "--lr_schedule", "constant"]


def args(data, run, *extra):
    return tiny_pretrain_args(data, str(run), *SHAPE, *extra)


def assert_same_state(a_path, b_path, atol=1e-6):
    a, b = load_checkpoint(str(a_path), "pretrain"), load_checkpoint(str(b_path), "pretrain")
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
        if stopped is not None:
            os.kill(stopped, signal.SIGKILL)  # torchrun's SIGTERM cannot end a stopped process
        try:
            launcher.wait(timeout=60)
        finally:
            if launcher.poll() is None:
                launcher.kill()
    text = log.read_text()
    ours = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and ours[0].startswith(f"error: rank {hung} stopped answering"), text[-3000:]
    assert "--collective_timeout" in ours[0]
    assert re.search(r"exitcode\s*:\s*2 ", text), text[-3000:]  # torchrun's report: the survivor's status
    assert not re.search(r'(pretrain|training|common|parallel)\.py", line', text), text[-3000:]  # no traceback of ours
    if hung == 1:  # the survivor is the writer: it left no partial file (a rank 0 killed mid-write may)
        assert not [f for f in os.listdir(tmp_path / "run") if f.endswith(".tmp")]
    assert load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"), "pretrain")["step"] > 0  # the last one, whole
