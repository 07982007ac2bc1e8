"""torchrun on the CPU with gloo: 2 processes at every sharding level against 1 process."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from common import load_checkpoint
from conftest import ROOT, tiny_pretrain_args

pytestmark = pytest.mark.slow  # every test launches torchrun processes

# Width 27 with 3 heads: every weight has an odd row count, so FSDP's shards are uneven.
# A constant learning rate lets a run of 2 epochs resumed to 4 match a run of 4 straight.
SHAPE = ["--embedding_dimensions", "27", "--num_attention_heads", "3", "--dropout", "0", "--lr_schedule", "constant"]


def launch(nproc, argv, timeout=240):
    """Run pretrain.py under torchrun (or plainly for one process); returns the finished process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if nproc == 1:
        command = [sys.executable, "pretrain.py", *argv]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "pretrain.py", *argv]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def check(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def args(data, run, *extra):
    return tiny_pretrain_args(data, str(run), *SHAPE, *extra)


def losses(stdout):
    return [float(line.split("cross-entropy ")[1].split(",")[0]) for line in stdout.splitlines()
            if "cross-entropy" in line]


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
