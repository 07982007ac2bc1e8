"""The LightGPT network: a decoder-only Transformer with no positional embeddings.

Design, bottom-up in this file:
- GPTConfig: the frozen architecture, validated once, saved as a plain dict in every checkpoint.
- No positional embeddings (NoPE): causal attention alone tells tokens apart by position, so the
  context length is not baked into any weight and can vary or grow after training.
- Pre-norm blocks: x + Attn(RMSNorm(x)), then x + MLP(RMSNorm(x)); a final RMSNorm; no biases.
- Attention through scaled_dot_product_attention with a fused qkv projection and is_causal=True.
- MLP: Linear -> SiLU -> Linear with hidden = feed_forward_ratio x width.
- Token embeddings tied to the output layer; the table is padded to a multiple of 64 rows for
  faster matrix products, and the padded ids are cut off the logits so they are never targets and
  never sampled.
- One forward for training, evaluation and decoding. Decoding uses a preallocated key/value cache
  written at an index: a ring of `length` slots per layer. With NoPE one query's attention over a set
  of keys does not depend on their order, so when the ring is full the next token simply overwrites
  the oldest slot: the window slides with no shifting, no position bookkeeping and fixed shapes.
  This equals recomputing the whole sequence with sliding-window causal attention of that width.
  Until the ring is full a decode step attends only over its filled prefix, rounded up to one of a
  few power-of-two spans so that a compiled decoder needs only a few shapes.
- Position encodings, an ablation switch (position_encoding, default "none": NoPE is the design).
  "rope" rotates queries and keys by their absolute positions (keys before they enter the ring, so
  the ring still works unchanged: only q_pos - k_pos reaches the scores); "alibi" adds -m_h x
  (q_pos - k_pos) to head h's scores through a float mask, key positions read from the ring's slot_pos;
  "learned" adds a trained embedding of each absolute position to the token's (GPT-2, nanoGPT), up to
  max_position_embeddings positions and no further. Positions restart at every packed document, so
  packed rows still equal separate runs.
- Accounting: parameters, training FLOPs per token, MFU, KV-cache bytes per token.
- On the CPU, eager fp32 training takes RMSNorm's own backward (_RMSNormFunction), or the compiled
  lightgpt::rms_norm inside cpu_norm_kernel(op) (cpu_kernels.py builds it from csrc/cpu_kernels.cpp).
- This module imports nothing of LightGPT's: sharing (hub.py: from_pretrained, save_pretrained,
  push_to_hub) and adapters (lora.py) build on it from their own modules.
- Packed sequences (instruction tuning): several conversations share a row, each attending only to
  itself through a block-diagonal causal mask built from per-position document ids. With NoPE this
  is exactly running them one by one: no position offsets to correct.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

POSITION_ENCODINGS = ("none", "rope", "alibi", "learned")  # NoPE, rotary (RoFormer), linear biases (ALiBi), GPT-2's
ROPE_BASE = 10_000.0  # the rotary frequencies: base ** (-2i / head_dim)
IGNORE_INDEX = -100  # targets with this id add nothing to the loss (padding, masked prompts)
INITIALISATIONS = ("gpt2", "zero_proj")  # GPT.reset_parameters: GPT-2's, or residual projections at zero
VOCAB_MULTIPLE = 64  # the embedding table is padded up to a multiple of this many rows
LOGITS_CHUNK_BYTES = 2**29  # the loss computes fp32 logits for at most this many bytes at a time


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class GPTConfig:
    vocabulary_size: int = 50_257
    embedding_dimensions: int = 1024
    num_attention_heads: int = 16
    num_hidden_layers: int = 24
    feed_forward_ratio: int = 4
    dropout: float = 0.1
    position_encoding: str = "none"  # an ablation switch; checkpoints from before it have none
    max_position_embeddings: int = 1024  # learned positions only: the longest sequence they cover

    def __post_init__(self):
        problems = []
        if self.vocabulary_size < 2:
            problems.append(f"vocabulary_size must be at least 2, got {self.vocabulary_size}")
        if self.embedding_dimensions < 1:
            problems.append(f"embedding_dimensions must be positive, got {self.embedding_dimensions}")
        if self.num_attention_heads < 1:
            problems.append(f"num_attention_heads must be positive, got {self.num_attention_heads}")
        elif self.embedding_dimensions % self.num_attention_heads:
            problems.append(
                f"embedding_dimensions ({self.embedding_dimensions}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_hidden_layers < 1:
            problems.append(f"num_hidden_layers must be positive, got {self.num_hidden_layers}")
        if self.feed_forward_ratio not in (1, 2, 4):
            problems.append(f"feed_forward_ratio must be 1, 2 or 4, got {self.feed_forward_ratio}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.position_encoding not in POSITION_ENCODINGS:
            problems.append(f"position_encoding must be one of {', '.join(POSITION_ENCODINGS)}, "
                            f"got {self.position_encoding!r}")
        elif (self.position_encoding == "rope" and self.num_attention_heads >= 1
              and not self.embedding_dimensions % self.num_attention_heads and self.head_dimensions % 2):
            problems.append(f"position_encoding rope needs an even head width "
                            f"(embedding_dimensions / num_attention_heads), got {self.head_dimensions}")
        if self.max_position_embeddings < 1:
            problems.append(f"max_position_embeddings must be positive, got {self.max_position_embeddings}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def padded_vocabulary_size(self) -> int:
        return math.ceil(self.vocabulary_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    @property
    def head_dimensions(self) -> int:
        return self.embedding_dimensions // self.num_attention_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


# ----------------------------------------------------------------------------- blocks


def sliding_window_mask(T: int, window: int, device) -> torch.Tensor:
    """(T, T) boolean mask: query i sees keys i - window < j <= i."""
    i = torch.arange(T, device=device)
    return (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)


def document_mask(documents: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean mask for packed rows: query i sees key j <= i of its own document only.
    documents (B, T) holds each position's document id; a document's positions are contiguous."""
    T = documents.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=documents.device).tril()
    same = documents[:, :, None] == documents[:, None, :]  # (B, T, T)
    return (same & causal).unsqueeze(1)


def document_positions(documents: torch.Tensor) -> torch.Tensor:
    """(B, T) positions that restart at 0 where each packed document starts."""
    t = torch.arange(documents.size(1), device=documents.device).expand_as(documents)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    return t - torch.where(starts, t, 0).cummax(dim=1).values  # (B, T): minus the start of its document


def additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean attention mask as the additive one SDPA makes of it (0 where allowed, -inf elsewhere); an
    additive mask (ALiBi's) or None as it is."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def rope_angles(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles at these positions ((T,) or (B, T)), fp32, shaped to broadcast
    over (B, n_head, T, head_dim // 2). Computed from the positions, so no length caps them and a
    decode step's position tensor needs no host sync."""
    inv_freq = ROPE_BASE ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (..., T, head_dim // 2)
    angles = angles.view(1, 1, *angles.shape) if positions.dim() == 1 else angles.unsqueeze(1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x (B, n_head, T, head_dim) rotated pairwise (first half with second half) by its angles, in fp32."""
    cos, sin = rope
    x1, x2 = x.float().chunk(2, dim=-1)  # 2 x (B, n_head, T, head_dim // 2)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


def alibi_slopes(n_head: int, device) -> torch.Tensor:
    """ALiBi's per-head slopes, (n_head,) fp32: 2^(-8 / n) ... 2^(-8) for n a power of two; otherwise the
    power of two p below n's slopes, then every other slope of 2p (as in the paper's code). Built on
    the device from constants: no host copy in a decode step."""
    p = 2 ** math.floor(math.log2(n_head))
    exponents = torch.cat([torch.arange(1, p + 1, device=device, dtype=torch.float32) * (8 / p),
                           (2 * torch.arange(n_head - p, device=device, dtype=torch.float32) + 1) * (4 / p)])
    return torch.exp2(-exponents)


def alibi_mask(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, allowed: torch.Tensor | None,
               dtype: torch.dtype) -> torch.Tensor:
    """(1 or B, n_head, T, S) float attention mask: -slope x (q_pos - k_pos) where `allowed` (a boolean
    mask broadcasting to (B, 1, T, S); None: causal), -inf elsewhere. Positions shared by every row are
    (T,) and (S,); a cache's per-row positions are (B, T) and (B, S)."""
    distance = (q_pos[..., :, None] - k_pos[..., None, :]).float()  # (T, S) or (B, T, S)
    if allowed is None:
        allowed = distance >= 0
    distance = distance.view(-1, 1, *distance.shape[-2:])  # (1 or B, 1, T, S)
    bias = -slopes.view(1, -1, 1, 1) * distance  # (1 or B, n_head, T, S)
    return torch.where(allowed, bias, float("-inf")).to(dtype)  # (1 or B, n_head, T, S)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        C = config.embedding_dimensions
        self.n_head = config.num_attention_heads
        self.head_dim = config.head_dimensions
        self.qkv = nn.Linear(C, 3 * C, bias=False)
        self.proj = nn.Linear(C, C, bias=False)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: "KVCache | None" = None, mask=None, rope=None) -> torch.Tensor:
        B, T, C = x.shape
        # Split, not unbind: the backward then joins the three gradients with one copy (cat), not two.
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # 3 x (B, n_head, T, head_dim)
                   for t in self.qkv(x).split(C, dim=2))  # 3 x (B, T, C)
        if rope is not None:  # keys rotated at their absolute positions before they enter the ring
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cache is not None and cache.mixed is not None:
            y = self._mixed(q, k, v, cache, mask)  # (1, n_head, D + T, head_dim)
        else:
            if cache is not None:
                k, v = cache.update(self.layer_index, k, v)  # decode: the cached keys and values, this one included
            dropout = self.dropout if self.training else 0.0
            if cache is not None and T == 1 and cache.split is not None:
                y = decode_attention(q, k, v, mask, cache.split)  # (B, n_head, 1, head_dim)
            elif mask is None:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)  # (B, n_head, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.proj(y))

    def _mixed(self, q, k, v, cache: "KVCache", masks: tuple) -> torch.Tensor:
        """A mixed step's attention: the first D tokens are the decode rows' (one each, over their rows of the
        cache), the rest a prompt chunk of one row (over that row's ring and itself, causally)."""
        D = cache.mixed[0]
        (k_dec, v_dec), (k_chunk, v_chunk) = cache.update_mixed(self.layer_index, k, v)
        decode_mask, chunk_mask = masks
        y_dec = decode_attention(q[:, :, :D].transpose(0, 2), k_dec, v_dec, decode_mask, cache.split)
        if chunk_mask is None:  # a chunk that starts its sequence: plain causal
            y_chunk = F.scaled_dot_product_attention(q[:, :, D:], k_chunk, v_chunk, is_causal=True)
        else:
            y_chunk = F.scaled_dot_product_attention(q[:, :, D:], k_chunk, v_chunk, attn_mask=chunk_mask)
        return torch.cat([y_dec.transpose(0, 2), y_chunk], dim=2)  # (1, n_head, D + T, head_dim)


def decode_attention(q, k, v, mask, split: tuple[int, int, int] | None) -> torch.Tensor:
    """A decode step's attention, q (B, n_head, 1, head_dim) over the span's keys (B, n_head, S, head_dim). With
    split (n, a, b), rows 0 .. n-1 attend over their first a slots and the rest over their first b (views, no
    copy): a batch whose rows hold sequences of very different lengths does not pay the longest one's span in
    every row (a row's slots past its own span are empty, so the result is the same)."""
    if split is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    n, a, b = split
    head = F.scaled_dot_product_attention(q[:n], k[:n, :, :a], v[:n, :, :a], attn_mask=mask[:n, ..., :a])
    tail = F.scaled_dot_product_attention(q[n:], k[n:, :, :b], v[n:, :, :b], attn_mask=mask[n:, ..., :b])
    return torch.cat([head, tail])


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        C = config.embedding_dimensions
        hidden = config.feed_forward_ratio * C
        self.up = nn.Linear(C, hidden, bias=False)
        self.down = nn.Linear(hidden, C, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.silu(self.up(x))))


class _RMSNormFunction(torch.autograd.Function):
    """y = x / rms(x) * weight, differentiated by LayerNorm's native backward: RMSNorm is LayerNorm with
    the mean held at zero, whose gradient lacks only LayerNorm's mean term, added back here. On the CPU
    autograd's backward of the composite takes about a dozen kernels and makes the norm 3x slower than
    LayerNorm; this takes the one fused kernel, a matrix-vector product and an add."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        # rms through one reduction (vector_norm reads x once; a dot product writes x * x first)
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.size(-1)).add_(eps).rsqrt_()  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)  # the input, not x / rms: the same bytes, and what LayerNorm's backward reads
        return (x * rstd).mul_(weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        C = x.size(-1)
        # LayerNorm's dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)), g = grad * weight; RMSNorm's
        # lacks the mean(g) term. The weight's gradient, sum(grad * x_hat), is the same for both.
        grad_x, grad_weight, _ = torch.ops.aten.native_layer_norm_backward(
            grad, x, [C], torch.zeros_like(rstd), rstd, weight, None, [True, ctx.needs_input_grad[1], False])
        mean_g = (grad @ weight).unsqueeze(-1).mul_(rstd).div_(C)  # (..., 1) rstd x mean(g)
        return grad_x.add_(mean_g), grad_weight, None


_cpu_norm = None  # the compiled lightgpt::rms_norm inside cpu_norm_kernel(), else None (_RMSNormFunction)


@contextlib.contextmanager
def cpu_norm_kernel(op):
    """Inside the block, RMSNorm's eager fp32 CPU training calls go through `op`, the compiled
    lightgpt::rms_norm (cpu_kernels.py builds and loads it): one C++ op whose backward never crosses into
    Python. None keeps _RMSNormFunction. The previous choice comes back when the block ends."""
    global _cpu_norm
    previous, _cpu_norm = _cpu_norm, op
    try:
        yield
    finally:
        _cpu_norm = previous


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (the same weight and eps), with a backward of its own when training eagerly on the CPU in
    fp32 (the compiled kernel inside cpu_norm_kernel(), else _RMSNormFunction); elsewhere torch's own
    (compiled, CUDA and autocast paths unchanged)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == torch.float32 and torch.is_grad_enabled()
                and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")):
            eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
            if _cpu_norm is not None and self.weight is not None:
                return _cpu_norm(x, self.weight, eps)
            return _RMSNormFunction.apply(x, self.weight, eps)
        return super().forward(x)


class Block(nn.Module):
    """Pre-norm residual block: x + Attn(RMSNorm(x)), then x + MLP(RMSNorm(x))."""

    def __init__(self, config: GPTConfig, layer_index: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.embedding_dimensions)
        self.attn = CausalSelfAttention(config, layer_index)
        self.mlp_norm = RMSNorm(config.embedding_dimensions)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache=None, mask=None, rope=None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cache, mask, rope)
        return x + self.mlp(self.mlp_norm(x))


# ----------------------------------------------------------------------------- loss


def _chunk_rows(N: int, padded_vocab: int) -> int:
    return max(1, min(N, LOGITS_CHUNK_BYTES // (4 * padded_vocab)))


def _chunk_logits(x: torch.Tensor, weight: torch.Tensor, vocabulary_size: int) -> torch.Tensor:
    """fp32 logits of a chunk of rows over the padded vocabulary, padded columns at -inf (so they
    take no probability and get no gradient); the product itself runs in the autocast dtype."""
    logits = x @ weight.t()  # (n, padded_vocab): aligned shapes for the matrix unit
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if logits.size(1) > vocabulary_size:
        logits[:, vocabulary_size:] = float("-inf")
    return logits


def _output_rows(weight: torch.Tensor, vocabulary_size: int) -> torch.Tensor:
    """The rows of the tied table the loss multiplies by: all of them on an accelerator (aligned shapes),
    the real ids only on the CPU, whose BLAS gains nothing from the padding (a fifth more work for bytes)."""
    return weight[:vocabulary_size] if weight.device.type == "cpu" else weight


class _LinearCrossEntropy(torch.autograd.Function):
    """Output layer + cross-entropy, chunk by chunk, with the gradients computed in the forward pass:
    the full (tokens x vocabulary) fp32 logits never exist, only one chunk's at a time."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocabulary_size):
        device = x.device.type
        compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        valid = targets != IGNORE_INDEX
        count = valid.sum().clamp(min=1)
        accumulate = torch.promote_types(compute_dtype, torch.float32)
        loss = torch.zeros((), device=x.device, dtype=accumulate)
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=accumulate)
        w = _output_rows(weight, vocabulary_size).to(compute_dtype)
        grad_w_rows = grad_w[: w.size(0)]  # the padded rows get no gradient
        rows = _chunk_rows(x.size(0), weight.size(0))
        for start in range(0, x.size(0), rows):
            xs = x[start : start + rows].to(compute_dtype)
            t, keep = targets[start : start + rows], valid[start : start + rows]
            logits = _chunk_logits(xs, w, vocabulary_size)  # (n, padded_vocab) fp32
            safe_t = t.clamp(min=0)[:, None]
            target_logit = logits.gather(1, safe_t)  # (n, 1)
            # One pass over the chunk, in place: exp(logits - max), its sum, then the softmax.
            top = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(top).exp_()
            total = probs.sum(dim=-1, keepdim=True)
            lse = top + total.log()  # (n, 1)
            loss += torch.where(keep[:, None], lse - target_logit, 0.0).sum()
            # d(sum of losses)/d(logits) = softmax - one_hot(target), zero for ignored rows
            dlogits = probs.div_(total)
            dlogits.scatter_add_(1, safe_t, torch.full_like(total, -1.0))
            dlogits = dlogits.mul_(keep[:, None]).to(compute_dtype)
            grad_x[start : start + rows] = (dlogits @ w).to(x.dtype)
            grad_w_rows += dlogits.t() @ xs
        ctx.save_for_backward(grad_x, grad_w, count)
        ctx.weight_dtype = weight.dtype
        return loss / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w, count = ctx.saved_tensors
        scale = grad_loss / count
        return grad_x * scale.to(grad_x.dtype), (grad_w * scale).to(ctx.weight_dtype), None, None


def check_targets(targets: torch.Tensor, vocabulary_size: int) -> None:
    """Targets are token ids or IGNORE_INDEX: a -1 would otherwise be scored as token 0 and a padded id
    as an infinite loss. An assert on the device, so it costs no host sync (on CUDA it fails as a
    device-side assert, as PyTorch's own cross_entropy does)."""
    ok = ((targets >= 0) & (targets < vocabulary_size)) | (targets == IGNORE_INDEX)
    torch._assert_async(ok.all(), f"targets must be token ids in [0, {vocabulary_size}) or {IGNORE_INDEX} (ignored)")


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         vocabulary_size: int) -> torch.Tensor:
    """Mean cross-entropy of logits x @ weight.T (padded columns excluded) over the targets that are
    not IGNORE_INDEX, without materialising the whole logits tensor. x (N, C), targets (N,)."""
    check_targets(targets, vocabulary_size)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(x, weight, targets, vocabulary_size)
    valid = targets != IGNORE_INDEX
    loss = torch.zeros((), device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
    rows = _chunk_rows(x.size(0), weight.size(0))
    for start in range(0, x.size(0), rows):
        logits = _chunk_logits(x[start : start + rows], _output_rows(weight, vocabulary_size), vocabulary_size)
        loss += F.cross_entropy(logits, targets[start : start + rows], ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / valid.sum().clamp(min=1)


# ----------------------------------------------------------------------------- model


class GPT(nn.Module):
    export_info: dict = {}  # what a saved folder records beside the architecture (tokenizer, corpora, ...); replaced, never mutated

    def __init__(self, config: GPTConfig, init: str = "gpt2"):
        super().__init__()
        self.config = config
        self.token_embeddings = nn.Embedding(config.padded_vocabulary_size, config.embedding_dimensions)
        if config.position_encoding == "learned":
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.embedding_dimensions)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.output_norm = RMSNorm(config.embedding_dimensions)
        self.activation_checkpointing = False
        self.kv_cache: KVCache | None = None
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: str = "gpt2") -> None:
        """GPT-2 initialisation: N(0, 0.02) everywhere, norms at one, and the two projections that
        write into the residual stream scaled by 1/sqrt(2 * layers) so its variance stays put with depth.
        init="zero_proj" starts those two projections at zero instead, so every block starts as the
        identity and joins the residual stream as it learns (modded-nanoGPT's; pretrain.py's default,
        worth about 0.15 nats per byte to a small NoPE model: docs/nope-at-small-scale.md)."""
        if init not in INITIALISATIONS:
            raise ValueError(f"init must be one of {INITIALISATIONS}, got {init!r}")
        residual_std = 0.0 if init == "zero_proj" else 0.02 / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:  # RMSNorm weights
                nn.init.ones_(p)
            elif name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=residual_std)
            else:
                nn.init.normal_(p, mean=0.0, std=0.02)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.activation_checkpointing = enabled

    def setup_cache(self, batch_size: int, length: int, dtype: torch.dtype | None = None) -> "KVCache":
        """Preallocate a key/value cache of `length` tokens for decoding with forward(..., input_pos=...)."""
        if self.config.position_encoding == "learned" and length > self.config.max_position_embeddings:
            raise ValueError(f"learned positions stop at {self.config.max_position_embeddings} tokens "
                             f"(max_position_embeddings): no cache of {length}")
        weight = self.token_embeddings.weight
        self.kv_cache = KVCache(self.config, batch_size, length, weight.device, dtype or weight.dtype)
        if weight.device.type == "cpu":  # the CPU's BLAS multiplies one row by a transposed table 3x slower
            self.kv_cache.output_weight = weight.detach().t().contiguous().t()  # the same values, column-major
        return self.kv_cache

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, documents: torch.Tensor | None = None,
                *, input_pos: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
        """idx (B, T) token ids. With targets (B, T): the mean cross-entropy over the targets that are
        not IGNORE_INDEX. Without: logits (B, T, vocabulary_size), padded ids cut off.
        documents (B, T): packed rows, each position attending only to its own document (document_mask).

        input_pos (T,) absolute positions switch on the KV cache (setup_cache first): T > 1 is a prefill
        that starts a new sequence (or continues one), T = 1 decodes one token (position 0 starts a new
        sequence too); input_pos (B, 1) decodes each row at its own position (KVCache.begin). With the
        cache's `mixed` set, idx (1, D + T) is a mixed step: rows 0 .. D-1's next tokens, then a prompt chunk
        of one row, at input_pos (D + T,) (KVCache.begin_mixed); the logits are (1, D + T, vocabulary_size).
        window limits attention to the last `window` keys (sliding-window causal attention; a cache of
        length L implies window L)."""
        cache, mask = self._attention(idx.size(1), documents, input_pos, window, idx.device)
        rope, x = None, self.token_embeddings(idx)  # (B, T, C)
        if self.config.position_encoding == "learned":
            x = x + self.position_embeddings(self._absolute_positions(idx.size(1), documents, input_pos, cache))
        elif self.config.position_encoding != "none":
            mask, rope = self._positions(idx.size(1), documents, input_pos, cache, mask, idx.device)
        if cache is not None:  # a cached call's boolean masks as SDPA's additive ones, made once, not in every layer
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            mask = tuple(additive(m, dtype) for m in mask) if isinstance(mask, tuple) else additive(mask, dtype)
        for block in self.blocks:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cache, mask, rope, use_reentrant=False)
            else:
                x = block(x, cache, mask, rope)
        x = self.output_norm(x)
        if targets is None:
            faster = None if cache is None else cache.output_weight  # a CPU decoder's column-major copy
            logits = F.linear(x, self.token_embeddings.weight if faster is None else faster)  # (B, T, padded_vocab)
            return logits[..., : self.config.vocabulary_size]  # padded ids are never predicted
        return linear_cross_entropy(x.reshape(-1, x.size(-1)), self.token_embeddings.weight, targets.reshape(-1),
                                    self.config.vocabulary_size)

    def _attention(self, T: int, documents, input_pos, window, device) -> tuple["KVCache | None", torch.Tensor | None]:
        """The KV cache a call uses (None: no cache) and its attention mask (None: plain causal)."""
        if input_pos is not None:
            cache = self.kv_cache
            if cache is None:
                raise RuntimeError("call setup_cache() before decoding with input_pos")
            if window is not None and window != cache.length:
                raise ValueError(f"a KV cache fixes the window at the cache length ({cache.length}), not {window}")
            if cache.mixed is not None:
                if self.config.position_encoding != "none":
                    raise ValueError("a mixed step runs the default model only (no position encoding)")
                return cache, cache.begin_mixed(input_pos)
            if self.config.position_encoding == "alibi" and input_pos.numel() > 1:
                cache.ring_pos = cache.row_view(cache.slot_pos).clone()  # the ring before this chunk overwrites it
            return cache, cache.begin(input_pos)
        if documents is not None:
            if window is not None:
                raise ValueError("documents and window cannot be combined")
            return None, document_mask(documents)
        return None, sliding_window_mask(T, window, device) if window is not None and T > window else None

    def _absolute_positions(self, T: int, documents, input_pos, cache) -> torch.Tensor:
        """Learned positions' share of a call: each token's absolute position, (T,) or (B, T) or (B, 1)."""
        if cache is not None:
            positions = cache.positions[:, None] if T == 1 else input_pos  # a decode step's rows: their own
        else:
            positions = document_positions(documents) if documents is not None else torch.arange(
                T, device=self.position_embeddings.weight.device)
        limit = self.config.max_position_embeddings
        if cache is None and documents is None and T > limit:
            raise ValueError(f"learned positions stop at {limit} tokens (max_position_embeddings), got {T}")
        return positions

    def _positions(self, T: int, documents, input_pos, cache, mask, device) -> tuple[torch.Tensor | None, tuple | None]:
        """RoPE or ALiBi's share of a call: (the attention mask, ALiBi's biases folded in; the rotary cos and
        sin or None). Queries sit at input_pos with a cache, else at 0 .. T-1, restarting per document."""
        q_pos = input_pos if input_pos is not None else torch.arange(T, device=device)
        if cache is not None and T == 1:
            q_pos = cache.positions[:, None]  # (B, 1): a decode step's rows each sit at their own position
        if self.config.position_encoding == "rope":
            if documents is not None:
                q_pos = document_positions(documents)  # (B, T)
            return mask, rope_angles(q_pos, self.config.head_dimensions)
        k_pos = q_pos  # the keys of a call without a cache, or of a prefill that starts a sequence
        if cache is not None and T == 1:
            k_pos = cache.row_view(cache.slot_pos)[:, : cache.span or cache.length]  # (B, S); -1: empty, masked
        elif cache is not None and cache.continuing:
            q_pos = input_pos.expand(cache.ring_pos.size(0), -1)  # (B, T)
            k_pos = torch.cat([cache.ring_pos[:, : cache.ring], q_pos], dim=1)  # (B, R + T): the ring as it was, then this chunk
        weight = self.token_embeddings.weight
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else weight.dtype
        slopes = alibi_slopes(self.config.num_attention_heads, device)
        return alibi_mask(slopes, q_pos, k_pos, mask, dtype), None  # mask None (plain causal): q_pos >= k_pos

    # ------------------------------------------------------------------------- accounting

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Trainable parameters; the padding rows of the embedding table are never used and not counted."""
        n = sum(p.numel() for p in self.parameters())
        c = self.config
        n -= (c.padded_vocabulary_size - c.vocabulary_size) * c.embedding_dimensions
        if not include_embeddings:
            n -= c.vocabulary_size * c.embedding_dimensions
            if c.position_encoding == "learned":
                n -= c.max_position_embeddings * c.embedding_dimensions
        return n

    def flops_per_token(self, context_length: int) -> float:
        """Training FLOPs per token (forward + backward), the PaLM-paper convention that MFU figures use:
        6 per weight of every matrix product (the tied output layer once, the real vocabulary only),
        plus 12 x layers x width x context for attention scores and values (no causal discount)."""
        c = self.config
        matmul_weights = sum(p.numel() for p in self.blocks.parameters() if p.dim() == 2)
        matmul_weights += c.vocabulary_size * c.embedding_dimensions  # the output layer
        return 6 * matmul_weights + 12 * c.num_hidden_layers * c.embedding_dimensions * context_length

    def mfu(self, tokens_per_s: float, context_length: int, peak_tflops: float) -> float:
        """Model FLOPs utilisation: the training FLOPs these tokens took per second, over the peak."""
        return tokens_per_s * self.flops_per_token(context_length) / (peak_tflops * 1e12)

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """Bytes of KV cache one token takes: a key and a value of the model width in every layer."""
        return 2 * self.config.num_hidden_layers * self.config.embedding_dimensions * bytes_per_value


@dataclass(frozen=True)
class GPU:
    """A GPU's figures from its vendor's data sheet."""
    peak_tflops: float  # dense bf16 matrix products, TFLOP/s: MFU's denominator
    memory_gb: int  # memory as sold (GB)
    bandwidth_tbps: float  # memory bandwidth, TB/s


# Known GPUs by name, for MFU (bench.py) and sizing.py. The first name contained in a device's name wins,
# so the specific variants come first.
GPUS = {"H200": GPU(989.0, 141, 4.8), "H100 PCIe": GPU(756.0, 80, 2.0), "H100 NVL": GPU(835.0, 80, 3.9),
        "H100": GPU(989.0, 80, 3.35), "A100": GPU(312.0, 80, 2.04), "L40S": GPU(362.0, 48, 0.864),
        "L40": GPU(181.0, 48, 0.864), "L4": GPU(121.0, 24, 0.3), "A10G": GPU(125.0, 24, 0.6),
        "RTX 4090": GPU(165.0, 24, 1.008), "RTX 3090": GPU(71.0, 24, 0.936)}


def gpu_spec(device_name: str) -> GPU | None:
    """The data sheet of a known GPU by its name (the first key of GPUS contained in it), or None."""
    return next((v for k, v in GPUS.items() if k in device_name), None)


def peak_tflops(device_name: str) -> float | None:
    """The data-sheet dense bf16 peak of a known GPU by its name, or None."""
    spec = gpu_spec(device_name)
    return spec.peak_tflops if spec else None


# ----------------------------------------------------------------------------- cache


class LayerKV(nn.Module):
    """One layer's keys and values, (batch, n_head, length, head_dim) each. A buffer of its own per layer,
    not a slice of one big tensor: a compiled in-place write into a slice makes torch.compile copy the
    whole tensor back at every step, while a whole buffer is updated in place, one slot at a time."""

    def __init__(self, shape: tuple, device, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)


class KVCache(nn.Module):
    """Keys and values of the last `length` tokens of every layer and batch row, preallocated as module
    buffers (so a compiled decode step can run as a CUDA graph).

    The cache owns the ring: in each row the token at absolute position p lives in slot p % length,
    and slot_pos (batch, length) records which position each slot holds (-1: empty). Each row keeps
    its own positions, so rows can hold sequences of different lengths (a server's requests, each
    joining when it arrives): a decode step takes one position per row. Slots fill from 0 up, so until
    a ring wraps the filled ones are a prefix: a decode step attends over the first `span` slots only
    (each row's empty ones masked), not over all `length`. `span` is None (every slot) unless a decoder
    sets it for one step to a bucket from spans(), so that a compiled decode needs only a few shapes.
    `rows` (None: all) limits the calls to a slice of the batch: a server prefills one new request into
    its own row while the other rows keep theirs. `mixed` (None: off) makes the next call a mixed step: the
    decode tokens of rows 0 .. D-1 and a chunk of one row's prompt in one forward (begin_mixed). Not part of
    the model's state dict. `split` (None: off) lets a decode step's first rows and the others attend over spans
    of their own (decode_attention)."""

    def __init__(self, config: GPTConfig, batch_size: int, length: int, device, dtype: torch.dtype):
        super().__init__()
        shape = (batch_size, config.num_attention_heads, length, config.head_dimensions)
        self.batch_size, self.length = batch_size, length
        self.span: int | None = None
        self.split: tuple[int, int, int] | None = None  # (n, a, b): a decode step's rows 0 .. n-1 attend over a slots, the rest b
        self.rows: slice | None = None  # the batch rows the next calls use; None: every row
        self.slots: torch.Tensor | None = None  # where this call's tokens go, set by begin()
        self.positions: torch.Tensor | None = None  # a decode step's position in each row, (B,), set by begin()
        self.continuing = False  # whether this multi-token call continues the sequence in the ring
        self.in_place = False  # a continuing call whose tokens go right after the ring's filled slots (no wrap)
        self.mixed: tuple[int, int] | None = None  # (decode rows D, chunk row): the next call is a mixed step
        self._mixed_calls: tuple | None = None  # the two calls' places in the ring, set by begin_mixed()
        self.ring = length  # the ring slots a continuing call reads: those before its start while the ring is unfilled
        self.ring_pos: torch.Tensor | None = None  # ALiBi: slot_pos before a multi-token call, set by GPT
        self.output_weight: torch.Tensor | None = None  # a faster layout of the output layer, if any
        self.layers = nn.ModuleList(LayerKV(shape, device, dtype) for _ in range(config.num_hidden_layers))
        self._buffers_by_layer = [(kv.k, kv.v) for kv in self.layers]  # plain tuples: cheaper per step than
        # ModuleList indexing and module attribute lookups (the cache never moves; setup_cache makes it in place)
        self.register_buffer("slot_pos", torch.full((batch_size, length), -1, device=device, dtype=torch.long),
                             persistent=False)

    def spans(self, smallest: int = 64) -> list[int]:
        """The decode spans: powers of two from `smallest` below the length, then the length."""
        out = []
        while smallest < self.length:
            out.append(smallest)
            smallest *= 2
        return out + [self.length]

    def span_for(self, position: int) -> int:
        """The smallest span that holds every filled slot once the token at `position` is written."""
        filled = min(position + 1, self.length)
        return next(s for s in self.spans() if s >= filled)

    def row_view(self, t: torch.Tensor) -> torch.Tensor:
        """t's batch rows that the calls use: t itself for every row (no slice, so a compiled step updates
        the whole buffer in place), else a view of the rows."""
        return t if self.rows is None else t[self.rows]

    def reset(self) -> None:
        """Forget every slot of the rows in use: their next tokens start new sequences."""
        self.row_view(self.slot_pos).fill_(-1)

    def begin(self, input_pos: torch.Tensor) -> torch.Tensor | None:
        """Place a call's tokens in the ring and return the attention mask.

        A multi-token call has input_pos (T,) consecutive positions, the same in every row. From position 0
        it starts a new sequence: mask None (plain causal) if it fits the ring, else a sliding window. A
        later multi-token call (a chunk of a long prefill, at most `length` tokens) continues the sequence:
        it attends to the ring as well, through a (B, 1, T, length + T) mask. A decode step (T = 1) takes
        input_pos (1,), one position for every row, or (B, 1), each row's own; a row at position 0 starts a
        new sequence. It attends over the span's filled slots of its row, with no host sync, so that it
        runs inside a CUDA graph."""
        L = self.length
        slot_pos = self.row_view(self.slot_pos)  # (B, L)
        B = slot_pos.size(0)
        self.continuing = False
        T = input_pos.size(-1)
        if T > 1:
            start = int(input_pos[0])  # one host sync per prefill call, never inside a CUDA graph
            mask = None
            if start == 0:
                slot_pos.fill_(-1)
                mask = sliding_window_mask(T, L, input_pos.device) if T > L else None
            elif T > L:
                raise ValueError(f"a call that continues a sequence takes at most the cache length ({L}) tokens")
            else:
                self.continuing = True
                # Until the ring wraps, position p sits in slot p: a chunk at `start` reads slots 0 .. start-1 only
                # (a server's long prompt, chunk by chunk, attends over what is there, not over the whole ring).
                self.ring = R = start if start <= L else L
                self.in_place = start + T <= L  # slots start .. start+T-1 follow the ring: attend over the cache
                ring = slot_pos[:, None, :R]
                recent = (ring >= 0) & (ring > input_pos[None, :, None] - L)
                causal = torch.ones(T, T, dtype=torch.bool, device=input_pos.device).tril().expand(B, T, T)
                mask = torch.cat([recent, causal], dim=2).unsqueeze(1)  # (B, 1, T, R + T): ring keys, then the chunk
            self.slots = input_pos[-L:] % L  # only the last L tokens stay in the ring
            slot_pos.index_copy_(1, self.slots, input_pos[-L:].expand(B, -1))
            return mask
        pos = input_pos.reshape(-1).expand(B)  # (B,): every row's position
        self.positions = pos
        slot_pos.masked_fill_((pos == 0)[:, None], -1)  # position 0 starts a new sequence in its row
        self.slots = pos % L  # (B,): the oldest slot once a ring is full
        slot_pos.scatter_(1, self.slots[:, None], pos[:, None])
        S = self.span or L
        return (slot_pos[:, :S] >= 0).view(B, 1, 1, S)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one layer's new keys and values (B, n_head, T, head_dim) into their slots and return what
        the queries attend over: a prefill its own keys, a decode step the span of the ring."""
        return self._write(layer, k, v, self.rows, self.slots, self.continuing, self.in_place, self.ring)

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor, rows: slice | None, slots: torch.Tensor,
               continuing: bool, in_place: bool, ring: int) -> tuple[torch.Tensor, torch.Tensor]:
        """update() for a call placed by begin() as given (a mixed step's two calls pass their own places
        instead of setting them on the cache: a module's attribute assignment costs microseconds)."""
        cache_k, cache_v = self._buffers_by_layer[layer]
        if rows is not None:
            cache_k, cache_v = cache_k[rows], cache_v[rows]
        if continuing and in_place:  # the ring, then this chunk, is the cache's first R + T slots
            cache_k.index_copy_(2, slots, k.to(cache_k.dtype))
            cache_v.index_copy_(2, slots, v.to(cache_v.dtype))
            end = ring + k.size(2)
            return cache_k[:, :, :end].to(k.dtype), cache_v[:, :, :end].to(v.dtype)
        if continuing:  # read the ring before this chunk overwrites its oldest slots
            keys = torch.cat([cache_k[:, :, :ring].to(k.dtype), k], dim=2)
            values = torch.cat([cache_v[:, :, :ring].to(v.dtype), v], dim=2)
        if k.size(2) > 1:  # a prefill: the same slots in every row
            n = slots.numel()
            cache_k.index_copy_(2, slots, k[:, :, -n:].to(cache_k.dtype))
            cache_v.index_copy_(2, slots, v[:, :, -n:].to(cache_v.dtype))
            return (keys, values) if continuing else (k, v)
        index = slots.view(-1, 1, 1, 1).expand(k.shape)  # (B, n_head, 1, head_dim): each row's own slot
        cache_k.scatter_(2, index, k.to(cache_k.dtype))
        cache_v.scatter_(2, index, v.to(cache_v.dtype))
        S = self.span or self.length
        return cache_k[:, :, :S].to(k.dtype), cache_v[:, :, :S].to(v.dtype)

    def begin_mixed(self, input_pos: torch.Tensor) -> tuple:
        """Place a mixed step's tokens and return its two masks: input_pos (D + T,) holds the decode positions
        of rows 0 .. D-1, then the T >= 2 consecutive positions of a prompt chunk for row `chunk` (self.mixed =
        (D, chunk)), which starts its sequence or continues it. The two calls are placed exactly as a decode
        step of rows 0 .. D-1 and then a prefill of the chunk into its row would place them; a server gives
        the chunk's row, when it is below D, a dummy decode position inside the chunk (overwritten by it)."""
        D, chunk = self.mixed
        if input_pos.size(0) - D < 2:
            raise ValueError("a mixed step's prompt chunk takes at least 2 tokens")
        try:
            self.rows = slice(0, D)
            decode_mask = self.begin(input_pos[:D].view(D, 1))
            decode = self.slots
            self.rows = slice(chunk, chunk + 1)
            chunk_mask = self.begin(input_pos[D:])
            self._mixed_calls = (decode, (self.slots, self.continuing, self.ring, self.in_place))
        finally:
            self.rows, self.continuing = None, False
        return decode_mask, chunk_mask

    def update_mixed(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple:
        """A mixed step's update: k, v (1, n_head, D + T, head_dim) -> the decode rows' keys and values (D, n_head,
        span, head_dim) and the chunk's (1, n_head, ring + T or T, head_dim), each written as update() writes it."""
        D, chunk = self.mixed
        slots, (chunk_slots, continuing, ring, in_place) = self._mixed_calls
        decode = self._write(layer, k[:, :, :D].transpose(0, 2), v[:, :, :D].transpose(0, 2), slice(0, D), slots,
                             False, False, ring)  # (D, n_head, 1, head_dim) each
        return decode, self._write(layer, k[:, :, D:], v[:, :, D:], slice(chunk, chunk + 1), chunk_slots, continuing,
                                   in_place, ring)

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep batch rows `rows` (e.g. the beams that survive a beam-search step), in place."""
        for kv in self.layers:
            kv.k.copy_(kv.k.index_select(0, rows))
            kv.v.copy_(kv.v.index_select(0, rows))
        self.slot_pos.copy_(self.slot_pos.index_select(0, rows))
