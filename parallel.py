"""Several processes: joining torchrun's process group (and leaving it), agreeing on errors across ranks, a
lost rank as one line; and data parallelism for the training scripts: one process, DDP, or FSDP2 at
sharding level 2 or 3.

- level 0: DistributedDataParallel; every rank keeps whole weights, gradients and optimizer state.
- level 2: FSDP2 with parameters kept whole between forward and backward (reshard_after_forward=False):
  gradients and optimizer state are sharded, parameters are gathered once per step.
- level 3: FSDP2 resharding parameters after each block's forward: parameters, gradients and optimizer
  state are all sharded, at the cost of gathering parameters again in the backward pass.

FSDP2 is applied per Transformer block, then to the root (the tied embedding and final norm), with bf16
parameters and fp32 gradient reduction on CUDA. With torch.compile each block is compiled before it is
sharded, as PyTorch's FSDP2 guidance has it; without FSDP the whole model is compiled.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from adafactor import Adafactor
from common import UserError, bf16_supported, first_line, resolve_device
from model import GPTConfig
from sizing import adafactor_state_bytes, gradient_bytes, weight_bytes

# ----------------------------------------------------------------------------- processes
# torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them everything runs as one process and
# these helpers are no-ops. Printing and file writing go through rank 0 (common.print0).


@dataclass
class Distributed:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    control_group: object = None  # a gloo group for small CPU messages (stop flags, errors)
    probe_group: object = None  # a gloo group left idle, to find out who still answers when a collective failed
    collective_timeout: timedelta = timedelta(minutes=10)  # what a collective, or a rank's silence, may last
    agreements: int = 0  # agree() calls so far: every rank makes the same ones, in the same order
    phase: str = "set-up"  # what the ranks are doing, for the message when one stops answering: then "training"

    @property
    def enabled(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def setup_distributed(device_name: str, collective_timeout: timedelta = timedelta(minutes=10)
                      ) -> tuple[Distributed, torch.device]:
    """Join the process group torchrun prepared (NCCL on CUDA, gloo on the CPU), one device per local
    rank. Returns the rank layout and this process's device. Every group waits at most collective_timeout
    for a rank, from the start: long work on some ranks (one process per node tokenizing the corpus) goes
    through agree(), whose waiting ranks watch the workers' heartbeat instead of a collective's clock."""
    device = resolve_device(device_name)
    if not launched_by_torchrun():
        return Distributed(), device
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    limit = f"--collective_timeout {collective_timeout.total_seconds() / 60:g} minutes"
    try:
        if device.type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise UserError(f"local rank {local_rank} has no GPU: this node shows {torch.cuda.device_count()}; "
                                f"lower --nproc-per-node")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device, timeout=collective_timeout)
            control = dist.new_group(backend="gloo", timeout=collective_timeout)
        elif device.type == "cpu":
            dist.init_process_group("gloo", timeout=collective_timeout)
            control = dist.group.WORLD
        else:
            raise UserError(f"--device {device_name}: distributed training runs on cuda (NCCL) or cpu (gloo)")
        probe = dist.new_group(backend="gloo", timeout=collective_timeout)
    except RuntimeError as e:  # DistStoreError, gloo's connect timeout: a rank that never came
        if not lost_rank(e):
            raise
        raise UserError(f"not every rank joined the process group within {limit}: {first_line(e)}") from None
    return Distributed(rank, local_rank, world, control, probe, collective_timeout), device


def silent_ranks(ctx: Distributed) -> list[int]:
    """After a collective failed: the ranks that do not answer within collective_timeout. Rank 0 collects
    an answer from every rank and sends the list to those that answered; when rank 0 is silent, the others
    name it. It runs on the probe group, which nothing else uses, so no half-done operation of the failed
    collective is in its way."""
    group, seconds = ctx.probe_group, ctx.collective_timeout.total_seconds()
    deadline = time.monotonic() + seconds

    def arrives(work) -> bool:
        try:
            return work.wait(timeout=timedelta(seconds=max(deadline - time.monotonic(), 0.001))) is not False
        except RuntimeError:  # gloo: "Timed out waiting ... for recv operation to complete"
            return False

    verdict = torch.zeros(ctx.world_size)  # 1 marks a silent rank
    if ctx.rank == 0:
        answers = {r: dist.irecv(torch.zeros(1), src=r, group=group) for r in range(1, ctx.world_size)}
        for r, work in answers.items():
            verdict[r] = not arrives(work)
        for r in range(1, ctx.world_size):
            if not verdict[r]:
                dist.send(verdict, dst=r, group=group)
        return verdict.nonzero().flatten().tolist()
    hello = dist.isend(torch.zeros(1), dst=0, group=group)  # not waited on: rank 0 may be the silent one
    deadline += seconds  # rank 0 waits up to one timeout for the others before it answers
    if not arrives(dist.irecv(verdict, src=0, group=group)):
        return [0]
    return verdict.nonzero().flatten().tolist()


def lost_rank(error: BaseException) -> bool:
    """Whether a collective failed because another rank stopped answering or went away."""
    text = str(error)
    return isinstance(error, dist.DistError) or any(
        s in text for s in ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer"))


@contextlib.contextmanager
def lost_rank_is_one_line(ctx: Distributed):
    """A collective that fails because a rank stopped answering (a timeout) or went away becomes one line
    naming that rank and ctx.phase ("set-up", "training"), on every rank still running (UserError, exit
    status 2), instead of a traceback. On GPUs NCCL's watchdog may end the process first, after the same
    timeout (torchrun sets TORCH_NCCL_ASYNC_ERROR_HANDLING=1)."""
    try:
        yield
    except RuntimeError as e:  # gloo and NCCL raise RuntimeErrors (DistError among them)
        if not (ctx.enabled and lost_rank(e)):
            raise
        phase = ctx.phase
        silent = [r for r in silent_ranks(ctx) if r != ctx.rank]
        if not silent:
            raise UserError(f"a collective failed in {phase}: {first_line(e)} ({_limit(ctx)})") from None
        raise UserError(f"{_ranks(silent)} stopped answering in {phase} (no reply within {_limit(ctx)}); every "
                        f"rank stops, saving nothing{_resume_hint(phase)}") from None


def _limit(ctx: Distributed) -> str:
    return f"--collective_timeout {ctx.collective_timeout.total_seconds() / 60:g} minutes"


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"


def _resume_hint(phase: str) -> str:
    return ": continue from the last checkpoint with --resume" if phase == "training" else ""


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_objects(ctx: Distributed, value) -> list:
    """Every rank's `value`, in rank order, on every rank (a collective on the control group)."""
    if not ctx.enabled:
        return [value]
    values = [None] * ctx.world_size
    dist.all_gather_object(values, value, group=ctx.control_group)
    return values


def agree(ctx: Distributed, work: Callable, who: str = "all"):
    """Run `work` on the ranks named by `who` ("all", "rank0" or "local0"), and make a UserError on any
    of them a UserError on every rank, so all ranks stop together with the same one-line message
    instead of some waiting forever. With who="rank0" the result is broadcast to every rank.

    The work may take hours (one process per node downloading and tokenizing a corpus) while the other
    ranks wait: they wait on the workers' heartbeat, not on a collective's clock. A worker beats every
    HEARTBEAT_SECONDS (at most a quarter of the timeout) from a thread while it works; a rank stops with
    one line naming the workers when none of the unfinished ones has beaten for --collective_timeout (a
    frozen or lost process)."""
    if not ctx.enabled:
        return work()
    runs_here = who == "all" or (who == "rank0" and ctx.rank == 0) or (who == "local0" and ctx.local_rank == 0)
    workers = _workers(ctx, who)
    key = f"lightgpt/agree/{ctx.agreements}"
    ctx.agreements += 1
    store = dist.distributed_c10d._get_default_store()  # private, but the one store every rank already shares
    interval = min(HEARTBEAT_SECONDS, ctx.collective_timeout.total_seconds() / 4)
    result, error = None, None
    if runs_here:
        with _heartbeat(store, f"{key}/beat", interval):
            try:
                result = work()
            except UserError as e:
                error = str(e)
        store.set(f"{key}/done/{ctx.rank}", "1")
        store.add(f"{key}/done", 1)
    _await_workers(ctx, store, key, workers, interval)
    errors = [None] * ctx.world_size
    dist.all_gather_object(errors, error, group=ctx.control_group)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise UserError(first, everywhere=True)
    if who == "rank0":
        box = [result]
        dist.broadcast_object_list(box, src=0, group=ctx.control_group)
        result = box[0]
    return result


HEARTBEAT_SECONDS = 1.0


def _workers(ctx: Distributed, who: str) -> list[int]:
    """The ranks that run agree()'s work. Local rank 0 of each node: torchrun numbers ranks node by node, with
    the same number of processes on every node (LOCAL_WORLD_SIZE)."""
    if who == "all":
        return list(range(ctx.world_size))
    if who == "rank0":
        return [0]
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
    return list(range(0, ctx.world_size, per_node))


@contextlib.contextmanager
def _heartbeat(store, key: str, interval: float):
    """Add 1 to the store's counter `key` every `interval` seconds while the block runs (a daemon thread: a
    process frozen by the OS, or one holding the GIL forever, stops beating)."""
    done = threading.Event()

    def beat():
        while not done.wait(interval):
            try:
                store.add(key, 1)
            except RuntimeError:  # the store went away: the waiting ranks will say so
                return

    thread = threading.Thread(target=beat, name="lightgpt-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _await_workers(ctx: Distributed, store, key: str, workers: list[int], interval: float) -> None:
    """Return once every worker of agree() `key` has finished; raise a one-line UserError when the unfinished
    ones have all been silent (no heartbeat) for collective_timeout. Polls two counters, so thousands of ranks
    cost the store little."""
    patience = ctx.collective_timeout.total_seconds()
    beats, heard, pause = -1, time.monotonic(), 0.001
    while store.add(f"{key}/done", 0) < len(workers):
        now = store.add(f"{key}/beat", 0)
        if now != beats:
            beats, heard = now, time.monotonic()
        elif time.monotonic() - heard > patience:
            missing = [r for r in workers if not store.check([f"{key}/done/{r}"])]
            raise UserError(f"{_ranks(missing)} stopped answering in {ctx.phase} (no sign of life within "
                            f"{_limit(ctx)}); every rank stops, saving nothing")
        time.sleep(pause)  # short at first: most agree() work takes milliseconds
        pause = min(2 * pause, interval / 2)


# ----------------------------------------------------------------------------- data parallelism


def training_memory(config: GPTConfig, shards: int, lora_rank: int = 0, momentum: bool = False) -> tuple[int, int]:
    """(bytes on one rank's device, bytes of the whole fp32 weights): the least a rank needs to train
    `config`, before activations. Every rank builds the whole fp32 model (FSDP shards it afterwards); the
    fp32 gradients and Adafactor's state of the trainable weights (all of them, or with lora_rank the
    adapters and new token rows of a LoRA model whose config has the grown vocabulary) come on top, divided
    among `shards` ranks (FSDP) or whole (DDP, one process). sizing.py counts them on the meta device, so a
    shape far too big to build costs nothing."""
    weights = weight_bytes(config, lora_rank=lora_rank)
    trained = gradient_bytes(config, shards, lora_rank) + adafactor_state_bytes(config, shards, lora_rank, momentum)
    return weights + trained, weights


def eval_rank_share(items, ctx: Distributed, what: str):
    """This rank's share of the test examples `items` (a list or a tensor) for evaluation: every rank gets as
    many as the others, the remainder is left out. `what` names the examples in the one-line error when
    there are fewer of them than processes."""
    items = items[: len(items) // ctx.world_size * ctx.world_size]  # equal shares
    if not len(items):
        raise UserError(f"the test split has fewer {what} than the {ctx.world_size} processes")
    return items[ctx.rank :: ctx.world_size]


class Parallel:
    """The model as the training loop drives it: the module to call, gradient-sync control for
    accumulation, global-norm clipping, and whole (consolidated) state for checkpoints.

    Two views of one network: `model` is the plain GPT whose parameters the optimizer steps and whose
    state is saved (sharded in place under FSDP, never compiled, so no `_orig_mod.` keys); `wrapped` is
    what the loop calls: the compiled and/or DDP-wrapped model (under FSDP the model itself)."""

    def __init__(self, model: nn.Module, ctx: Distributed, device: torch.device, level: int, use_compile: bool):
        self.model, self.ctx, self.use_compile, self.level = model, ctx, use_compile, level
        self.kind = "single" if not ctx.enabled else "ddp" if level == 0 else "fsdp"
        if self.kind == "single":
            self.wrapped = torch.compile(model) if use_compile else model
        elif self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
            self.wrapped = torch.compile(self.ddp) if use_compile else self.ddp
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            # An explicit mesh on our device type: FSDP's default follows the machine's accelerator,
            # which would put a --device cpu run on a GPU.
            mesh = init_device_mesh(device.type, (ctx.world_size,))
            # Where autocast computes in bf16, gather bf16 weights too; gradients are still reduced in fp32.
            policy = MixedPrecisionPolicy()
            if bf16_supported(device):
                policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for block in model.blocks:
                if use_compile:
                    block.compile()
                fully_shard(block, mesh=mesh, reshard_after_forward=level == 3, mp_policy=policy)
            # The root's tied embedding is needed again first thing in backward: keep it gathered.
            fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
            self.wrapped = model  # blocks compiled above, before sharding

    @property
    def summary(self) -> str:
        """How training runs, for the scripts' summary line: "; 2 processes, fsdp level 3" ("" alone)."""
        if not self.ctx.enabled:
            return ""
        level = f" level {self.level}" if self.kind == "fsdp" else ""
        return f"; {self.ctx.world_size} process{'es' if self.ctx.world_size > 1 else ''}, {self.kind}{level}"

    def optimizer(self, params=None, **kwargs) -> Adafactor:
        """Adafactor (adafactor.py): torch.optim.Adafactor's updates, sharded or not, with no host syncs,
        its arithmetic compiled when the model is. It steps `params` (parameters or groups, taken from
        self.model after wrapping), by default every trainable parameter."""
        if params is None:
            params = [p for p in self.model.parameters() if p.requires_grad]
        return Adafactor(params, compile=self.use_compile, **kwargs)

    def gradient_sync(self, enabled: bool):
        """Skip the gradient all-reduce / reduce-scatter on accumulation micro-steps that do not step."""
        if self.kind == "ddp":
            return contextlib.nullcontext() if enabled else self.ddp.no_sync()
        if self.kind == "fsdp":
            self.model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip to a global gradient norm (across shards) and return that norm (no host sync)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.kind != "fsdp":
            return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
        return norm

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.ctx.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= self.ctx.world_size
        return t

    # ------------------------------------------------------------------------- consolidated state

    def model_state_dict(self) -> dict:
        """Whole weights on the CPU on rank 0 (every rank must call it)."""
        if self.kind == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def optimizer_state_dict(self, optimizer: Adafactor) -> dict:
        """torch.optim.Adafactor's state format with whole tensors (every rank must call it)."""
        return optimizer.consolidated_state_dict()

    def load_optimizer_state_dict(self, optimizer: Adafactor, state: dict) -> None:
        optimizer.load_consolidated_state_dict(state)
