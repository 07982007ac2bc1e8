"""files.py: the one file lock (shared and exclusive, who holds it, who removes it) and the one sweep of the
temporaries a killed run left; checkpoint.py's builders and lora.py's LoRAConfig, which give the
checkpoint kinds and the adapters' settings one home each."""

import os
import time
from dataclasses import replace

import pytest
import torch

from checkpoint import CheckpointLock, lora_checkpoint, model_checkpoint
from common import UserError
from files import FileLock, atomic_path, remove_stale_temporaries
from lora import LORA_TARGETS, LoRAConfig, add_lora, lora_state_dict
from model import GPT

# ----------------------------------------------------------------------------- FileLock


def test_shared_holders_coexist_and_the_last_one_out_removes_the_file(tmp_path):
    path = str(tmp_path / "files.lock")
    a, b = FileLock(path), FileLock(path)
    assert a.acquire(exclusive=False) and b.acquire(exclusive=False)
    a.release()
    assert os.path.exists(path)  # b still holds it
    b.release()
    assert not os.path.exists(path) and not a.held and not b.held


def test_an_exclusive_holder_is_named_to_whoever_it_blocks(tmp_path):
    path = str(tmp_path / "checkpoint.pt.lock")
    holder = FileLock(path)
    assert holder.acquire(exclusive=True) and holder.since is not None
    heard = []

    def give_up(who: str) -> None:
        heard.append(who)
        raise RuntimeError("given up")

    with pytest.raises(RuntimeError, match="given up"):
        FileLock(path).acquire(exclusive=True, when_held=give_up)
    with pytest.raises(RuntimeError):
        FileLock(path).acquire(exclusive=False, when_held=give_up)  # a reader waits for a writer too
    assert len(heard) == 2 and heard[0].startswith(f"pid {os.getpid()} on ")
    holder.release()
    assert not os.path.exists(path)
    again = FileLock(path)
    assert again.acquire(exclusive=True, when_held=give_up)  # free now: nobody is asked
    again.release()
    assert len(heard) == 2


def test_shared_to_exclusive_and_a_lock_file_nobody_can_make(tmp_path):
    path = str(tmp_path / "files.lock")
    lock = FileLock(path)
    assert lock.acquire(exclusive=False) and not lock.exclusive
    assert lock.acquire(exclusive=True) and lock.exclusive  # lets go of the shared lock first, as flock would
    lock.release()
    with pytest.raises(OSError):
        FileLock(str(tmp_path / "no such folder" / "files.lock")).acquire()


def test_the_checkpoint_lock_stops_a_second_run_in_one_line(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    with CheckpointLock(path):
        with pytest.raises(UserError, match=r"--checkpoint_path: .*checkpoint.pt is in use by another run \(pid "):
            CheckpointLock(path).acquire()
    with CheckpointLock(path):  # released on the way out
        pass
    with pytest.raises(UserError, match="cannot create the lock file"):
        CheckpointLock(str(tmp_path / "missing" / "checkpoint.pt")).acquire()


# ----------------------------------------------------------------------------- stale temporaries


def test_the_sweep_removes_only_atomic_path_temporaries_from_before(tmp_path):
    target = str(tmp_path / "tokens.bin")
    stale = tmp_path / "tokens.bin.ab12cd_9.tmp"  # atomic_path's name: mkstemp's 8 letters
    stale.write_bytes(b"x" * 1000)
    old = time.time() - 60
    os.utime(stale, (old, old))
    fresh = tmp_path / "tokens.bin.zz99yy_1.tmp"  # written after `before`: a run that is still saving
    fresh.write_bytes(b"y")
    other = tmp_path / "tokens.bin.notours.tmp"  # not a name atomic_path makes
    other.write_bytes(b"z")
    os.utime(other, (old, old))
    assert remove_stale_temporaries(target, before=time.time() - 30) == (1, 1000)
    assert not stale.exists() and fresh.exists() and other.exists()


def test_atomic_path_leaves_the_old_file_or_the_whole_new_one(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(ZeroDivisionError):
        with atomic_path(str(target)) as tmp, open(tmp, "w") as f:
            f.write("half")
            1 / 0
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]
    with atomic_path(str(target)) as tmp, open(tmp, "w") as f:
        f.write("new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["f.txt"]


# ----------------------------------------------------------------------------- LoRAConfig and the kinds


def test_lora_config_validates_and_round_trips():
    config = LoRAConfig(rank=4, alpha=8.0, dropout=0.05)
    assert config.targets == LORA_TARGETS
    assert LoRAConfig.from_dict(config.to_dict()) == config
    assert LoRAConfig.from_dict({"rank": 4, "alpha": 8, "dropout": 0.05}) == config  # before "targets" was saved
    for bad in (dict(rank=0, alpha=1.0), dict(rank=2, alpha=1.0, dropout=1.0),
                dict(rank=2, alpha=1.0, targets=("attn.qkv", "lm_head"))):
        with pytest.raises(ValueError):
            LoRAConfig(**bad)


def test_add_lora_wraps_only_the_targets_and_records_its_config(tiny_config):
    config = LoRAConfig(rank=2, alpha=4.0, targets=("attn.qkv", "mlp.down"))
    model = add_lora(GPT(tiny_config), config)
    assert model.lora_config == config
    names = {".".join(name.split(".")[2:4]) for name in lora_state_dict(model)}  # blocks.N.<target>.lora_a
    assert names == {"attn.qkv", "mlp.down"}


def test_the_builders_list_each_kind_and_refuse_unknown_entries(tiny_config):
    weights = GPT(tiny_config).state_dict()
    state = model_checkpoint(tiny_config, weights, "bytes", 256, {"flag": 1}, step=3, seed=7)
    assert state["kind"] == "pretrain" and state["config"] == tiny_config.to_dict() and state["step"] == 3
    assert "special_tokens" not in state and state["args"] == {"flag": 1}
    with pytest.raises(ValueError, match="not checkpoint entries"):
        model_checkpoint(tiny_config, weights, "bytes", 256, {}, stepp=3)
    base = {"sha256": "ab" * 32, "config": tiny_config.to_dict(), "token_encoding": "bytes", "eot_id": 256}
    lora = lora_checkpoint(tiny_config, {}, LoRAConfig(2, 1.0), ["<a>"], base, "base.pt", {}, step=0)
    assert lora["kind"] == "lora" and lora["lora"] == {"rank": 2, "alpha": 1.0, "dropout": 0.0,
                                                      "targets": list(LORA_TARGETS)}
    assert lora["base"]["sha256"] == base["sha256"] and os.path.isabs(lora["base"]["path"])
    assert isinstance(lora["config"]["vocabulary_size"], int) and torch.is_tensor(next(iter(weights.values())))



def test_a_lora_checkpoint_with_foreign_targets_is_named_not_a_traceback(tiny_config):
    from checkpoint import checkpoint_problem

    base = {"sha256": "ab" * 32, "config": tiny_config.to_dict(), "token_encoding": "bytes", "eot_id": 256}
    grown = replace(tiny_config, vocabulary_size=tiny_config.vocabulary_size + 1)
    state = lora_checkpoint(grown, {}, LoRAConfig(2, 1.0), ["<a>"], base, "base.pt", {})
    state["lora"]["targets"] = ["lm_head"]
    assert checkpoint_problem(state).startswith("its 'lora' settings are invalid (targets must be among")
