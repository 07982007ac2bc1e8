"""Sizing: parameters, memory per GPU, compute, time, cost and decoding limits of a LightGPT run,
worked out before renting GPUs. model_sizing.ipynb is its front end; tests/test_sizing.py checks it
against the program itself.

- Plan: one frozen dataclass with the model's shape and the run's settings (batch, accumulation, world
  size, sharding level 0/2/3, activation checkpointing, low-memory optimizer, precision, LoRA rank).
- Counts come from the model, never from a second formula: parameters from GPT.num_parameters() on the
  meta device (no memory, any size), FLOPs from GPT.flops_per_token(), KV bytes from
  GPT.kv_bytes_per_token(), adapters from lora_parameters(), the loss's chunk from model._chunk_rows().
  parallel.training_memory() is built from this module's weight, gradient and optimizer-state bytes.
- Activations are the tensors autograd saves for backward, op by op, as this implementation runs them:
  `kernels="cuda"` (fused RMSNorm saving its input and 1/rms, flash/cuDNN attention saving q, k, v, the
  output and a log-sum-exp per row, never T x T, bool dropout masks) or `kernels="cpu"` (RMSNorm
  decomposed into ops that also save the normalised x, the CPU flash kernel when attention has no
  dropout and the math path with T x T probabilities when it has, dropout masks in the activation dtype).
  The "cpu" set equals a saved_tensors_hooks count of the real model (tests); the "cuda" set is the same
  ops with the GPU's kernels, compared with bench.py's measured peaks in docs/performance.md.
- Peak memory is the largest of a step's moments: the end of the forward pass (every saved activation
  plus the fused loss's chunks), the backward pass at the loss, at its first and its last block and at the
  embedding, and the optimizer step. On the CPU it matches a real step's peak allocation (tests). It counts
  eager PyTorch; torch.compile (on by default on CUDA) plans its own buffers.

Bytes throughout; GiB = 2**30 bytes. Memory is per GPU (per rank); FLOPs and tokens are for the run.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch

from chat import SPECIAL_TOKENS
from lora import LoRAConfig, add_lora, lora_parameters
from data import VOCABULARY_SIZES
from model import GPT, GPUS, GPTConfig, _chunk_rows, gpu_spec, peak_tflops
from run_config import MODEL_PRESETS

GIB = 2**30
GPU_SIZES_GIB = (24, 40, 80, 141)  # the common cards: RTX 4090 / L4 / A10G, A100 40GB, A100 / H100 80GB, H200
# The model card's six shapes (run_config.MODEL_PRESETS, configs/*.yaml) with their names and training-token budgets.
CARD = {"small": ("Small", 7e9), "medium": ("Medium", 34e9), "large": ("Large", 132e9),
        "xlarge": ("X-large", 262e9), "xxlarge": ("XX-large", 1e12), "xxxlarge": ("XXX-large", 2e12)}
TOKENS_PER_PARAMETER = 20  # compute-optimal training tokens per parameter (Hoffmann et al., 2022)

# bench.py's peak memory of the Small shape on one H200, from docs/performance.md ("Measured on one NVIDIA H200
# (2026-11-28)"): batch 16 x 1024 tokens, bf16 autocast, torch.compile, our Adafactor, dropout 0.1.
MEASURED_H200_GIB = {False: 18.9, True: 5.6}  # by activation checkpointing


def bench_plan(activation_checkpointing: bool) -> "Plan":
    """The run behind MEASURED_H200_GIB: `python bench.py train --compile on [--activation_checkpointing]`."""
    return Plan.preset("small", batch_size=16, tokens_per_sample=1024, gradient_accumulation_steps=1,
                       activation_checkpointing=activation_checkpointing, compile=True, precision="bf16")


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan(GPTConfig):
    """A model shape (GPTConfig's fields, first) and how it is trained. gradient_accumulation_steps is
    global, as in pretrain.py: each of world_size ranks runs gradient_accumulation_steps // world_size
    micro-batches per step."""

    tokens_per_sample: int = 1024
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    world_size: int = 1
    sharding_level: int = 0  # --ddp_sharding_level: 0 (DDP), 2 or 3 (FSDP2); with one process, none
    activation_checkpointing: bool = False
    low_memory_optimizer: bool = False  # Adafactor foreach=False: one update at a time
    momentum: bool = False  # Adafactor's first moment (--momentum above 0: pretrain.py's default 0.9)
    compile: bool = False  # torch.compile'd Adafactor recomputes updates instead of holding them
    precision: str = "bf16"  # "bf16": autocast over fp32 weights (CUDA); "fp32": no autocast
    lora_rank: int = 0  # > 0: instruction tuning with adapters of this rank on a frozen model
    lora_dropout: float = 0.05  # instruction-tune.py --dropout, on the adapters' inputs
    kernels: str = "cuda"  # whose kernels' saved tensors to count: "cuda" or "cpu"

    def __post_init__(self):
        super().__post_init__()  # the model's own checks
        problems = []
        if self.sharding_level not in (0, 2, 3):
            problems.append(f"sharding_level must be 0, 2 or 3, got {self.sharding_level}")
        if self.precision not in ("bf16", "fp32"):
            problems.append(f"precision must be 'bf16' or 'fp32', got {self.precision!r}")
        if self.kernels not in ("cuda", "cpu"):
            problems.append(f"kernels must be 'cuda' or 'cpu', got {self.kernels!r}")
        for name in ("tokens_per_sample", "batch_size", "gradient_accumulation_steps", "world_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.lora_rank < 0:
            problems.append(f"lora_rank must be 0 (pretraining) or positive, got {self.lora_rank}")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def preset(cls, name: str, **settings) -> "Plan":
        """A card shape by its --model name (configs/NAME.yaml), with any other fields."""
        preset = MODEL_PRESETS[name]
        shape = {k: v for k, v in preset.items() if k in cls.__dataclass_fields__}
        shape["vocabulary_size"] = VOCABULARY_SIZES[preset["token_encoding"]]
        return cls(**{**shape, **settings})

    @property
    def config(self) -> GPTConfig:
        """The model's shape alone."""
        return GPTConfig.from_dict(self.to_dict())

    @property
    def trained_config(self) -> GPTConfig:
        """The network that trains: with LoRA, the base grown by the chat special tokens, dropout off."""
        if not self.lora_rank:
            return self.config
        return replace(self.config, vocabulary_size=self.vocabulary_size + len(SPECIAL_TOKENS), dropout=0.0)

    @property
    def micro_batches(self) -> int:
        """Micro-batches per optimizer step on each rank (training.batch_layout's rule)."""
        return max(1, self.gradient_accumulation_steps // self.world_size)

    @property
    def fsdp(self) -> bool:
        return self.world_size > 1 and self.sharding_level in (2, 3)

    @property
    def shards(self) -> int:
        return self.world_size if self.fsdp else 1

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.tokens_per_sample * self.micro_batches * self.world_size


# ----------------------------------------------------------------------------- parameters


@functools.lru_cache(maxsize=16)
def meta_model(config: GPTConfig) -> GPT:
    """The real model on the meta device: shapes without memory, so any size is free to build. Cached:
    read its accounting, change nothing."""
    with torch.device("meta"):
        return GPT(config)


def parameters(config: GPTConfig, lora_rank: int = 0) -> dict:
    """The model's own counts (GPT.num_parameters) split by kind, and LoRA's trainable weights."""
    model = meta_model(replace(config, num_hidden_layers=1))
    per_block = sum(p.numel() for p in model.blocks[0].parameters())
    model = meta_model(config)
    counts = {"total": model.num_parameters(), "embedding": config.vocabulary_size * config.embedding_dimensions,
              "non_embedding": model.num_parameters(include_embeddings=False), "per_block": per_block}
    if lora_rank:
        counts["lora"] = lora_parameters(config, lora_rank)
        counts["new_token_rows"] = len(SPECIAL_TOKENS) * config.embedding_dimensions
        counts["trainable"] = counts["lora"] + counts["new_token_rows"]
    else:
        counts["trainable"] = counts["total"]
    return counts


@functools.lru_cache(maxsize=64)
def parameter_shapes(config: GPTConfig, lora_rank: int = 0) -> tuple[tuple[tuple[int, ...], int, bool], ...]:
    """(shape, copies in the model, trainable) of every parameter tensor, from a one-block meta model:
    the embedding table with its padding rows, as stored. With LoRA (config: the vocabulary grown by the
    chat special tokens, Plan.trained_config) the base is frozen and the adapters and the special tokens'
    embedding rows train, as in instruction-tune.py."""
    with torch.device("meta"):
        model = GPT(replace(config, num_hidden_layers=1))
    if lora_rank:
        add_lora(model, LoRAConfig(lora_rank, 1.0, 0.0), trainable_rows=(config.vocabulary_size - len(SPECIAL_TOKENS),
                                                             len(SPECIAL_TOKENS)))
    return tuple((tuple(p.shape), config.num_hidden_layers if name.startswith("blocks.") else 1, p.requires_grad)
                 for name, p in model.named_parameters())


def _rows(shape: tuple[int, ...], shards: int) -> int:
    """Elements of one rank's shard: FSDP2 cuts dim 0 into `shards` pieces padded to equal size."""
    return math.ceil(shape[0] / shards) * math.prod(shape[1:])


def weight_bytes(config: GPTConfig, shards: int = 1, lora_rank: int = 0, bytes_per_value: int = 4) -> int:
    """Every weight (fp32 by default) on one rank: whole, or a 1/shards piece of each tensor."""
    shapes = parameter_shapes(config, lora_rank)
    return bytes_per_value * sum(copies * _rows(shape, shards) for shape, copies, _ in shapes)


def gradient_bytes(config: GPTConfig, shards: int = 1, lora_rank: int = 0) -> int:
    """fp32 gradients of the trainable weights on one rank."""
    return 4 * sum(copies * _rows(shape, shards) for shape, copies, trains in parameter_shapes(config, lora_rank)
                   if trains)


def adafactor_state_bytes(config: GPTConfig, shards: int = 1, lora_rank: int = 0, momentum: bool = False) -> int:
    """adafactor.py's state on one rank, fp32 like the gradients: a (R, C) matrix keeps row statistics
    (its own R / shards rows) and column statistics (all C, all-reduced so every rank holds them), a
    vector its elementwise second moment (sharded); with momentum (--momentum above 0), a first moment as
    large as the gradients too. The step counter lives on the host."""
    n = gradient_bytes(config, shards, lora_rank) // 4 if momentum else 0
    for shape, copies, trains in parameter_shapes(config, lora_rank):
        if trains:
            n += copies * (math.ceil(shape[0] / shards) + shape[1] if len(shape) == 2 else _rows(shape, shards))
    return 4 * n


def adamw_state_bytes(config: GPTConfig, shards: int = 1, lora_rank: int = 0) -> int:
    """AdamW's two fp32 moments per trainable weight, for comparison (LightGPT does not use it)."""
    return 2 * gradient_bytes(config, shards, lora_rank)


def largest_update_bytes(config: GPTConfig, shards: int = 1, lora_rank: int = 0) -> int:
    """The largest single fp32 update the low-memory optimizer forms (one parameter at a time)."""
    return 4 * max(_rows(shape, shards) for shape, _, trains in parameter_shapes(config, lora_rank) if trains)


# ----------------------------------------------------------------------------- activations


def _activation_bytes_per_value(plan: Plan) -> int:
    return 2 if plan.precision == "bf16" else 4


def activations(plan: Plan, batch_size: int | None = None) -> dict:
    """Bytes autograd saves for backward in one micro-batch (batch_size rows of plan.tokens_per_sample),
    by term, and `saved`, their sum: what a saved_tensors_hooks count of the real model sees.

    Per block and token, without checkpointing: each RMSNorm's input (fp32: the residual stream, or the
    fp32 copy autocast makes of a bf16 one) and 1/rms; the qkv projection's input (the norm's output in
    the compute dtype); q, k and v (views of the projection's output) and the attention output with its
    per-head log-sum-exp; the MLP's input, its hidden activation before and after SiLU; dropout masks.
    With activation checkpointing a block keeps only its input. The output layer keeps the final norm's
    input, and the fused loss keeps its gradients, formed in the forward pass: (tokens, width) for the
    input and the whole (vocabulary, width) table in fp32, whatever the batch."""
    c, cpu = plan.trained_config, plan.kernels == "cpu"
    B, T = batch_size or plan.batch_size, plan.tokens_per_sample
    N, C, H, F, L = B * T, c.embedding_dimensions, c.num_attention_heads, c.feed_forward_ratio, c.num_hidden_layers
    a = _activation_bytes_per_value(plan)  # matrix-product outputs (bf16 under autocast)
    r = 4  # RMSNorm inputs: fp32 (autocast runs rms_norm in fp32)
    mask = a if cpu else 1  # a dropout mask element: the activation dtype on the CPU, bool on CUDA
    lora = plan.lora_rank > 0
    # CPU RMSNorm also saves x / rms (4 bytes) for its weight's gradient, when the weight trains.
    norm = r * C + 4 + (4 * C if cpu and not lora else 0)
    attention_dropout = c.dropout if not lora else 0.0
    if cpu and attention_dropout > 0:  # the math path: scaled q and k, v and the output copied, T x T thrice
        attention = 3 * a * C + 3 * a * H * T + a * C
    else:  # flash / cuDNN / efficient (CPU flash): q, k, v as views of qkv, the output, the log-sum-exp
        attention = 3 * a * C + a * C + 4 * H
    per_token = 2 * norm + attention + a * F * C  # the SiLU's input
    if lora:
        # A frozen projection keeps nothing of its input; each adapter keeps its dropped-out input (and
        # the mask), and its rank-r middle. With no adapter dropout, proj's adapter input is the
        # attention output, already kept.
        inputs = (C, C, C, F * C)  # qkv, proj, up, down
        p = plan.lora_dropout
        per_token += sum(((mask + a) * n if p > 0 else a * n) for n in inputs) - (0 if p > 0 else a * C)
        per_token += 4 * a * plan.lora_rank
    else:
        per_token += a * C + a * C + a * F * C  # the qkv and MLP inputs, the SiLU's output
        per_token += 2 * mask * C if c.dropout > 0 else 0  # after the attention projection and the MLP
    per_block = per_token * N
    if lora:  # packed rows: attention keeps its document mask, converted to the compute dtype, per layer
        per_block += a * B * T * T
    stream = 2 if plan.fsdp and plan.precision == "bf16" else 4  # the residual stream between blocks
    terms = {}
    if plan.activation_checkpointing:
        terms["blocks"] = L * stream * C * N + (B * T * T if lora else 0)  # block inputs (and the bool mask)
    else:
        terms["blocks"] = L * per_block
    # Weights cast to bf16 by autocast, saved by every matrix product (FSDP gathers bf16 weights instead).
    copies = plan.precision == "bf16" and not plan.fsdp
    block_matrices = sum(math.prod(s) for s, n, _ in parameter_shapes(c, plan.lora_rank) if n > 1 and len(s) == 2)
    per_block_copies = 2 * block_matrices if copies else 0
    terms["autocast_weight_copies"] = 0 if plan.activation_checkpointing else L * per_block_copies
    terms["output"] = 8 * N + norm * N + 8  # token ids, the final norm, the loss's token count
    terms["loss_gradients"] = 4 * C * N + 4 * c.padded_vocabulary_size * C
    terms["saved"] = sum(terms.values())
    terms["per_block"] = per_block  # what one block keeps without checkpointing (recomputed with it)
    terms["autocast_weight_copies_per_block"] = per_block_copies
    return terms


def loss_chunk_bytes(plan: Plan, batch_size: int | None = None) -> int:
    """The fused loss's transient memory in the forward pass: fp32 logits of at most LOGITS_CHUNK_BYTES
    per chunk; the previous chunk's are still referenced while the next is computed (two alive), and
    under bf16 each also has a bf16 copy; the weight cast to the compute dtype (with LoRA the table
    itself, put together from its frozen and trainable rows); the loss's input."""
    c = plan.trained_config
    N = (batch_size or plan.batch_size) * plan.tokens_per_sample
    V, C = c.padded_vocabulary_size, c.embedding_dimensions
    rows = _chunk_rows(N, V)
    pair = rows + min(rows, N - rows) if N > rows else rows  # the largest two consecutive chunks
    if plan.precision == "bf16":  # per logit: fp32 + the bf16 product, or fp32 + the bf16 gradient
        chunks = max(6 * pair * V, 6 * rows * V + 2 * V * C)  # + the bf16 (vocabulary, width) product
        weight = 0 if plan.fsdp else 2 * V * C
    else:
        chunks = max(4 * pair * V, 4 * rows * V + 4 * V * C)
        weight = 0
    if plan.lora_rank:
        weight += 4 * V * C
    return chunks + weight + 4 * C * N


# ----------------------------------------------------------------------------- memory per GPU

MEMORY_TERMS = {
    "weights": "fp32 weights on this GPU: whole at level 0, a 1/N shard at levels 2 and 3",
    "gathered_weights": "FSDP's all-gathered compute-dtype weights: every block from forward to backward at "
                        "level 2, the root and two blocks (one prefetched) at level 3",
    "gradients": "fp32 gradients; sharded at levels 2/3 on the step's micro-batch, but whole (FSDP2) on the "
                 "micro-batches that skip synchronisation, and held through the forward pass when accumulating",
    "ddp_buckets": "DDP's flat gradient buckets (level 0, several GPUs): one more copy of the gradients",
    "optimizer_state": "Adafactor's factored second moments (row and column statistics of each matrix), and "
                       "with --momentum its first moment (one number per trained weight)",
    "optimizer_update": "the optimizer's transient: all updates at once (foreach), or the largest one "
                        "(--low_memory_optimizer, or compiled)",
    "activations": "tensors saved for backward, one micro-batch (see activations())",
    "loss_chunk": "the fused loss's fp32 logits chunks and casts, during its forward pass",
    "backward_working": "one block's backward: its gradients forming, the gradient flowing down the residual "
                        "stream, and with checkpointing the block's recomputed activations",
}


def memory(plan: Plan, batch_size: int | None = None) -> dict:
    """Bytes per GPU by term (MEMORY_TERMS), the moments of a training step (at_forward: the forward pass's
    end, the loss computing its chunks; at_backward: the loss's backward; at_backward_top and
    at_backward_bottom: the first and the last block's; at_backward_end: the embedding's, every gradient
    formed; at_step: the optimizer's), and `peak`, their largest, with `phase` naming it."""
    c, shards, lora = plan.trained_config, plan.shards, plan.lora_rank
    B = batch_size or plan.batch_size
    N, C = B * plan.tokens_per_sample, c.embedding_dimensions
    whole_grads = gradient_bytes(c, 1, lora)
    act = activations(plan, B)
    t = {"weights": weight_bytes(c, shards, lora), "gathered_weights": gathered_weight_bytes(plan)}
    accumulating = plan.micro_batches > 1
    step_grads = gradient_bytes(c, shards, lora)
    t["gradients"] = whole_grads if accumulating else step_grads
    t["ddp_buckets"] = whole_grads if plan.world_size > 1 and not plan.fsdp else 0
    t["optimizer_state"] = adafactor_state_bytes(c, shards, lora, plan.momentum)
    one_at_a_time = plan.low_memory_optimizer or plan.compile
    t["optimizer_update"] = largest_update_bytes(c, shards, lora) if one_at_a_time else step_grads
    t["activations"] = act["saved"]
    t["loss_chunk"] = loss_chunk_bytes(plan, B)
    block = backward_block(plan, B, act)
    t["backward_working"] = block["working"]

    resident = t["weights"] + t["optimizer_state"] + t["ddp_buckets"]
    held = t["gradients"] if accumulating else 0  # gradients alive through the forward pass
    base = resident + held + t["gathered_weights"]
    L, V = c.num_hidden_layers, c.padded_vocabulary_size
    pending = 0 if lora else 4 * V * C

    def in_block(i: int) -> int:
        formed = 0 if accumulating else (L - 1 - i) * block["grad_rank"]
        return base + 8 * N + (i + 1) * block["kept"] + pending + formed + t["backward_working"]

    moments = {
        "forward": base + t["activations"] + t["loss_chunk"],
        # the loss's backward: its saved gradients and their scaled copies
        "backward": base + t["activations"] + 4 * C * N + 4 * V * C,
        "backward_top": in_block(L - 1),
        "backward_bottom": in_block(0),
        # the embedding's backward forms a whole (vocabulary, width) gradient beside all the others
        "backward_end": base + (0 if accumulating else step_grads) + 4 * V * C + block["flowing"],
        "step": resident + step_grads + t["optimizer_update"],
    }
    t.update({f"at_{k}": v for k, v in moments.items()})
    t["phase"] = max(moments, key=moments.get)
    t["peak"] = moments[t["phase"]]
    return t


def gathered_weight_bytes(plan: Plan) -> int:
    """FSDP's gathered weights on a rank: at level 2 the whole model (bf16 under autocast), at level 3 the
    root's tied table and norm and two blocks (one computing, the next prefetched); 0 without FSDP."""
    if not plan.fsdp:
        return 0
    c, lora = plan.trained_config, plan.lora_rank
    gathered = 2 if plan.precision == "bf16" else 4
    if plan.sharding_level == 2:
        return weight_bytes(c, 1, lora, gathered)
    block = sum(math.prod(s) for s, n, _ in parameter_shapes(c, lora) if n > 1)
    return gathered * (c.padded_vocabulary_size * c.embedding_dimensions + c.embedding_dimensions + 2 * block)


def backward_block(plan: Plan, batch_size: int, act: dict) -> dict:
    """One block's backward pass: what each block keeps for it (`kept`), the gradients it forms on this
    rank (`grad_rank`), the gradient of the residual stream (`flowing`) and the working memory while it
    runs (`working`: its recomputed activations when checkpointed, its gradients forming, `flowing`)."""
    # Backward, block by block from the top: block l's saved tensors (or, checkpointed, its input and its
    # recomputed activations) are there with those of every block below; the gradients of the blocks above
    # are formed (sharded after each block's reduce-scatter), its own are forming; the gradient of the
    # residual stream flows down (fp32, two at a time where the branches add); the loss's gradient of the
    # tied table waits, whole, for the embedding's own (LoRA's table is put together twice, so it does not
    # wait). Linear in the block's index: check both ends.
    c, shards, lora = plan.trained_config, plan.shards, plan.lora_rank
    flowing = 2 * 4 * c.embedding_dimensions * batch_size * plan.tokens_per_sample
    shapes = parameter_shapes(c, lora)
    block_grad = 4 * sum(math.prod(s) for s, n, trains in shapes if n > 1 and trains)
    block_grad_rank = 4 * sum(_rows(s, shards) for s, n, trains in shapes if n > 1 and trains)
    if plan.activation_checkpointing:
        kept = act["blocks"] // c.num_hidden_layers  # a block's input
        recompute = act["per_block"] + act["autocast_weight_copies_per_block"]
    else:
        kept = act["per_block"] + act["autocast_weight_copies_per_block"]
        recompute = 0
    return {"kept": kept, "grad_rank": block_grad_rank, "flowing": flowing,
            "working": recompute + block_grad + flowing}


def largest_batch(plan: Plan, capacity_bytes: float) -> int:
    """The largest batch_size whose predicted peak fits in capacity_bytes (0: not even one row)."""
    if memory(plan, 1)["peak"] > capacity_bytes:
        return 0
    low, high = 1, 2
    while memory(plan, high)["peak"] <= capacity_bytes:
        low, high = high, high * 2
    while high - low > 1:  # memory(low) fits, memory(high) does not
        mid = (low + high) // 2
        low, high = (mid, high) if memory(plan, mid)["peak"] <= capacity_bytes else (low, mid)
    return low


# ----------------------------------------------------------------------------- compute, time and cost


def compute(plan: Plan, num_gpus: int, gpu: str = "H100", mfu: float = 0.4, training_tokens: float | None = None,
            price_per_gpu_hour: float | None = None) -> dict:
    """Training FLOPs (GPT.flops_per_token at plan.tokens_per_sample) for training_tokens (default
    TOKENS_PER_PARAMETER per parameter), and the time, GPU-hours and cost on num_gpus GPUs of a kind
    (its data-sheet bf16 peak from model.GPUS) at a model-FLOPs utilisation."""
    c = plan.config
    model = meta_model(c)
    n = model.num_parameters()
    tokens = training_tokens if training_tokens is not None else TOKENS_PER_PARAMETER * n
    per_token = model.flops_per_token(plan.tokens_per_sample)
    peak = peak_tflops(gpu)
    if peak is None:
        raise ValueError(f"unknown GPU {gpu!r}: one of {', '.join(sorted(GPUS))}")
    seconds = per_token * tokens / (num_gpus * peak * 1e12 * mfu)
    out = {"parameters": n, "training_tokens": tokens, "tokens_per_parameter": tokens / n,
           "flops_per_token": per_token, "total_flops": per_token * tokens, "seconds": seconds,
           "days": seconds / 86400, "gpu_hours": num_gpus * seconds / 3600,
           "optimizer_steps": math.ceil(tokens / plan.tokens_per_step)}
    out["cost"] = out["gpu_hours"] * price_per_gpu_hour if price_per_gpu_hour is not None else None
    return out


# ----------------------------------------------------------------------------- inference


def inference(plan: Plan, context_length: int, gpu: str = "H100", bytes_per_value: int = 2) -> dict:
    """Decoding with generate.py's KV cache (GPT.kv_bytes_per_token, bf16 on a GPU): its bytes per token
    and per full context, the batch-1 speed limit from memory bandwidth (each token reads every weight
    and the whole cache once), and the most cached tokens (batch x context) beside the weights."""
    c = plan.config
    model = meta_model(c)
    per_token = model.kv_bytes_per_token(bytes_per_value)
    weights = weight_bytes(c, bytes_per_value=bytes_per_value)
    logits = 4 * c.padded_vocabulary_size  # one row's fp32 logits per sequence in the batch
    spec = gpu_spec(gpu)
    bandwidth, capacity = (spec.bandwidth_tbps, spec.memory_gb) if spec else (None, None)
    out = {"kv_bytes_per_token": per_token, "kv_bytes_per_context": per_token * context_length,
           "weight_bytes": weights}
    read = weights + per_token * context_length
    out["batch1_tokens_per_s_limit"] = bandwidth * 1e12 / read if bandwidth else None
    if capacity:
        free = capacity * GIB - weights
        out["max_cached_tokens"] = max(0, free // per_token)
        out["max_batch_at_context"] = max(0, free // (per_token * context_length + logits))
    return out


# ----------------------------------------------------------------------------- the program's own count


def saved_tensor_bytes(model: GPT, idx: torch.Tensor, targets: torch.Tensor, documents=None) -> int:
    """Bytes of the tensors autograd saves in one forward pass of the real model, counted with
    torch.autograd.graph.saved_tensors_hooks: each storage once (q, k and v are views of one), the
    parameters (the weights' own memory) left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, targets, documents)
    return sum(storages.values())


# ----------------------------------------------------------------------------- tables


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (the notebook displays it; pandas is not a dependency)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_bytes(n: float) -> str:
    """Bytes in GiB, or MiB / KiB where that reads better: '18.13 GiB', '2.1 MiB'."""
    for scale, unit in ((GIB, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(n) >= 0.1 * scale:
            return f"{n / scale:,.2f} {unit}" if unit == "GiB" else f"{n / scale:,.1f} {unit}"
    return f"{n:,.0f} B"


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.2M' (K, M, B, T), for counts of parameters, tokens and FLOPs."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{suffix}{unit}"
    return f"{n:g}{unit}"
