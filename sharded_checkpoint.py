"""Sharded checkpoints: pretrain.py at --ddp_sharding_level 2 and 3 under torchrun saves with
torch.distributed.checkpoint (DCP), each rank writing its own shards of the weights and the optimizer state,
with no gather on rank 0.

    checkpoint.pt                          the pointer: a checkpoint file (checkpoint.py) with everything but
                                           the weights and optimizer state, and `sharded`: the folder, the
                                           world size and level that wrote it, and each file's SHA-256
    checkpoint.pt.shards/step-000000123-1a2b/   DCP's files: .metadata and one __<rank>_0.distcp per rank

A save writes a new folder (every rank its files, fsynced, hashed by the rank that wrote them), then rank 0
replaces the pointer atomically (checkpoint.save_checkpoint), then removes every other folder. A run killed
at any moment leaves the pointer naming a whole folder: the previous one until the new pointer is in place.
A load checks every file against its hash (each rank a share of them) and loads in place into this run's
shards, whatever world size or level wrote them (DCP reshards). consolidate() makes one ordinary file of it,
the kind generate.py, export.py and instruction-tune.py read.
"""

from __future__ import annotations

import os
import secrets
import shutil
import warnings

import torch

from common import UserError, first_line
from files import file_sha256, fsync_path, os_reason, write_refusal

SHARDS = ".shards"  # the folders' folder: <checkpoint>.shards/


def shards_root(checkpoint_path: str) -> str:
    return checkpoint_path + SHARDS


def new_folder(checkpoint_path: str, step: int) -> str:
    """A fresh folder name for a save at `step` (random, so a killed save's leftovers never collide)."""
    return os.path.join(shards_root(checkpoint_path), f"step-{step:09d}-{secrets.token_hex(2)}")


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def save_shards(model_state: dict, optimizer_state: dict, folder: str, rank: int, group=None) -> dict[str, str]:
    """Every rank: write this rank's shards into `folder` (DCP, coordinating over `group`), fsync them, and
    return {file: sha256} of the files this rank wrote (its own .distcp files; rank 0 also .metadata). A
    failed write, on any rank, is one line on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        try:
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder,
                     process_group=group, no_dist=not _distributed())
        except CheckpointException as e:  # every rank gets the first failure (a full disk on any of them)
            raise first_failure(e) from None
        mine = {}
        for name in sorted(os.listdir(folder)):
            if name.startswith(f"__{rank}_") or (rank == 0 and name == ".metadata"):
                path = os.path.join(folder, name)
                fsync_path(path)
                mine[name] = file_sha256(path)
        return mine
    except (OSError, RuntimeError) as e:
        # torch's zip writer reports a full disk as "unexpected pos": ask the disk, beside the folder (rank 0
        # removes the folder itself once every rank has failed)
        reason = os_reason(e) if isinstance(e, OSError) else write_refusal(os.path.dirname(folder)) or first_line(e)
        raise UserError(f"--checkpoint_path: cannot write the sharded checkpoint to {folder} ({reason}); "
                        f"the checkpoint already there is intact") from None


def first_failure(e: BaseException) -> BaseException:
    """DCP wraps the ranks' failures in one CheckpointException (a BaseException, not an Exception): the first
    rank's own exception."""
    failures = getattr(e, "failures", None)
    if not failures:
        return e
    first = next(iter(failures.values()))
    return first[0] if isinstance(first, tuple) else first


def sharded_entry(checkpoint_path: str, folder: str, hashes: list[dict[str, str]], world_size: int,
                  level: int) -> dict:
    """The pointer's `sharded` entry: the folder (relative to the checkpoint's own folder) and every file's hash."""
    fsync_path(folder, folder=True)
    files = {name: digest for part in hashes for name, digest in part.items()}
    return {"folder": os.path.relpath(folder, os.path.dirname(os.path.abspath(checkpoint_path))),
            "files": files, "world_size": world_size, "level": level}


def prune(checkpoint_path: str, keep: str | None) -> None:
    """Rank 0, after the pointer is in place: remove every shard folder but the one it names (the previous
    save's, and leftovers of saves killed midway)."""
    root = shards_root(checkpoint_path)
    if not os.path.isdir(root):
        return
    keep_path = os.path.abspath(folder_of(checkpoint_path, keep)) if keep else None
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if os.path.abspath(path) != keep_path:
            shutil.rmtree(path, ignore_errors=True)


def folder_of(checkpoint_path: str, relative: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), relative)


def check_files(checkpoint_path: str, entry: dict, rank: int = 0, world_size: int = 1) -> None:
    """This rank's share of the pointer's files exist and hash as recorded: one line naming the first that
    does not (a missing rank's file, a damaged one)."""
    folder = folder_of(checkpoint_path, entry["folder"])
    for i, (name, digest) in enumerate(sorted(entry["files"].items())):
        if i % world_size != rank:
            continue
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            writer = name[2:].split("_")[0] if name.startswith("__") else "0"
            raise UserError(f"{checkpoint_path}: its shard file {path} is missing (rank {writer} of the "
                            f"{entry['world_size']} that saved it wrote it); restore it, or resume from another "
                            f"checkpoint")
        try:
            actual = file_sha256(path)
        except OSError as e:
            raise UserError(f"{checkpoint_path}: cannot read its shard file {path} ({os_reason(e)})") from None
        if actual != digest:
            raise UserError(f"{checkpoint_path}: its shard file {path} is damaged (its contents do not match the "
                            f"hash saved with it); use another copy")


def load_shards(checkpoint_path: str, entry: dict, model_state: dict, optimizer_state: dict | None,
                group=None) -> None:
    """Load the folder's weights (and optimizer state, if given) in place into these tensors, resharding to
    however they are placed now. Optimizer keys this run has and the checkpoint lacks (momentum added on
    resume) stay zero; keys the checkpoint has and this run does not want are left out."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    folder = folder_of(checkpoint_path, entry["folder"])
    metadata = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    saved = set(metadata)
    state = {"model": model_state}
    if optimizer_state is not None:
        state["optimizer"] = {index: {key: value for key, value in entry_state.items()
                                      if f"optimizer.{index}.{key}" in saved}
                              for index, entry_state in optimizer_state.items()}
    missing = [f"model.{k}" for k in model_state if f"model.{k}" not in saved]
    if missing:
        raise UserError(f"{checkpoint_path}: its shards hold no {missing[0]}: a checkpoint of another model")
    for name, tensor in model_state.items():
        shape = tuple(getattr(metadata[f"model.{name}"], "size", ()))
        if shape != tuple(tensor.shape):  # a DTensor's shape is the whole tensor's
            raise UserError(f"{checkpoint_path}: cannot load its shards into this run: its {name} has shape "
                            f"{shape}, this model's {tuple(tensor.shape)} (the shards are another model's)")
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=folder, process_group=group, no_dist=not _distributed())
    except (Exception, CheckpointException) as e:  # what cannot be resharded into this run's tensors
        e = first_failure(e)
        raise UserError(f"{checkpoint_path}: cannot load its shards into this run ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else 'no detail'})") from None


def consolidate(checkpoint_path: str, state: dict, output_path: str) -> dict:
    """One ordinary checkpoint file from a sharded one, in this process (DCP reads every rank's shards):
    the whole weights and torch.optim.Adafactor-format optimizer state, as a level-0 run saves them."""
    from adafactor import Adafactor
    from checkpoint import save_checkpoint
    from model import GPT, GPTConfig

    entry = state["sharded"]
    check_files(checkpoint_path, entry)
    model = GPT(GPTConfig.from_dict(state["config"]))
    groups = state.get("optimizer_groups") or [{}]
    beta1 = groups[0].get("beta1", 0.0)
    optimizer = Adafactor(model.parameters(), beta1=beta1)
    load_shards(checkpoint_path, entry, model.state_dict(), optimizer.sharded_state_dict())
    whole = {k: v for k, v in state.items() if k not in ("sharded", "optimizer_groups", "sha256")}
    optimizer_state = optimizer.state_dict()
    if state.get("optimizer_groups"):
        for group, saved in zip(optimizer_state["param_groups"], state["optimizer_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
    whole.update(model={k: v.detach().clone() for k, v in model.state_dict().items()}, optimizer=optimizer_state)
    save_checkpoint(whole, output_path)
    return whole


def is_sharded(state: dict) -> bool:
    return isinstance(state.get("sharded"), dict)


def model_tensors(parallel) -> dict:
    """The model's state as DCP saves and loads it: under FSDP2 its DTensor shards, sharing storage."""
    return {k: v for k, v in parallel.model.state_dict().items() if isinstance(v, torch.Tensor)}
