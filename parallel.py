"""Data parallelism for the training scripts: one process, DDP, or FSDP2 at sharding level 2 or 3.

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

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from adafactor import Adafactor
from common import Distributed, UserError, bf16_supported
from model import GPTConfig
from sizing import adafactor_state_bytes, gradient_bytes, weight_bytes


def training_memory(config: GPTConfig, shards: int, lora_rank: int = 0) -> tuple[int, int]:
    """(bytes on one rank's device, bytes of the whole fp32 weights): the least a rank needs to train
    `config`, before activations. Every rank builds the whole fp32 model (FSDP shards it afterwards); the
    fp32 gradients and Adafactor's state of the trainable weights (all of them, or with lora_rank the
    adapters and new token rows of a LoRA model whose config has the grown vocabulary) come on top, divided
    among `shards` ranks (FSDP) or whole (DDP, one process). sizing.py counts them on the meta device, so a
    shape far too big to build costs nothing."""
    weights = weight_bytes(config, lora_rank=lora_rank)
    trained = gradient_bytes(config, shards, lora_rank) + adafactor_state_bytes(config, shards, lora_rank)
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
