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
- One forward for training, evaluation and (with a cache, in a later step) decoding.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # targets with this id add nothing to the loss (padding, masked prompts)
VOCAB_MULTIPLE = 64  # the embedding table is padded up to a multiple of this many rows


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class GPTConfig:
    vocabulary_size: int = 50_257
    embedding_dimensions: int = 1024
    num_attention_heads: int = 16
    num_hidden_layers: int = 24
    feed_forward_ratio: int = 4
    dropout: float = 0.1

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


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        C = config.embedding_dimensions
        self.n_head = config.num_attention_heads
        self.head_dim = config.head_dimensions
        self.qkv = nn.Linear(C, 3 * C, bias=False)
        self.proj = nn.Linear(C, C, bias=False)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim)  # (B, T, 3, n_head, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, n_head, T, head_dim)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )  # (B, n_head, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.proj(y))


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


class Block(nn.Module):
    """Pre-norm residual block: x + Attn(RMSNorm(x)), then x + MLP(RMSNorm(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.embedding_dimensions)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = nn.RMSNorm(config.embedding_dimensions)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


# ----------------------------------------------------------------------------- model


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.token_embeddings = nn.Embedding(config.padded_vocabulary_size, config.embedding_dimensions)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.output_norm = nn.RMSNorm(config.embedding_dimensions)
        self.activation_checkpointing = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02) everywhere, norms at one, and the two projections that
        write into the residual stream scaled by 1/sqrt(2 * layers) so its variance stays put with depth."""
        residual_std = 0.02 / math.sqrt(2 * self.config.num_hidden_layers)
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

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) token ids. With targets (B, T): the mean cross-entropy over the targets that are
        not IGNORE_INDEX. Without: logits (B, T, vocabulary_size), padded ids cut off."""
        x = self.token_embeddings(idx)  # (B, T, C)
        for block in self.blocks:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.output_norm(x)
        logits = F.linear(x, self.token_embeddings.weight)  # (B, T, padded_vocab), tied weights
        logits = logits[..., : self.config.vocabulary_size]  # padded ids are never predicted
        if targets is None:
            return logits
        return F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX
        )

    # ------------------------------------------------------------------------- accounting

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Trainable parameters; the padding rows of the embedding table are never used and not counted."""
        n = sum(p.numel() for p in self.parameters())
        c = self.config
        n -= (c.padded_vocabulary_size - c.vocabulary_size) * c.embedding_dimensions
        if not include_embeddings:
            n -= c.vocabulary_size * c.embedding_dimensions
        return n

    def flops_per_token(self, context_length: int) -> float:
        """Training FLOPs per token (forward + backward): 6 per weight in the matrix products
        (the tied output layer counted once as a product) plus the attention scores and values."""
        c = self.config
        matmul_weights = self.num_parameters(include_embeddings=False) - sum(
            p.numel() for p in self.parameters() if p.dim() == 1
        ) + c.padded_vocabulary_size * c.embedding_dimensions
        attention = 2 * 2 * c.num_hidden_layers * c.embedding_dimensions * context_length / 2  # causal half
        return 6 * matmul_weights + 3 * attention
