"""LoRA for LightGPT: a frozen base layer plus a trainable low-rank update (alpha / rank) B A x, with B at
zero so that an adapted model starts out computing what its base does; the embedding grows by the chat
special tokens, whose rows alone train, and stays tied to the output layer. merge_lora folds both back into a
plain GPT. LoRAConfig is what a LoRA checkpoint saves of the settings (checkpoint.py builds and checks it)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from model import GPT, CausalSelfAttention, GPTConfig

LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")  # every projection of every block


@dataclass(frozen=True)
class LoRAConfig:
    """The adapters' settings: their rank, the update's scale alpha / rank, dropout on their inputs, and the
    projections of every block they wrap."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not set(self.targets) <= set(LORA_TARGETS):
            raise ValueError(f"targets must be among {LORA_TARGETS}, got {self.targets!r}")

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict) -> "LoRAConfig":
        """From a checkpoint's "lora" entry (older ones have no "targets": every projection)."""
        return cls(rank=d["rank"], alpha=float(d["alpha"]), dropout=float(d["dropout"]),
                   targets=tuple(d.get("targets", LORA_TARGETS)))




class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: y = W x + (alpha / rank) B A dropout(x).
    A (rank, in) starts random as nn.Linear's weights do, B (out, rank) at zero: at first the layer
    computes exactly what W does, and the update grows from there."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        # The base's dtype and device (a bf16 or fp64 model multiplies its adapters with its own inputs);
        # A drawn in fp32 first, so that a seed gives the same adapters at every dtype.
        a = torch.empty(rank, base.in_features, device=base.weight.device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's own initialisation
        self.lora_a = nn.Parameter(a.to(base.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device, dtype=base.weight.dtype))
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b)  # (..., rank) -> (..., out)
        return self.base(x) + update * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The plain linear layer W + (alpha / rank) B A."""
        dtype = self.base.weight.dtype
        linear = nn.Linear(self.base.in_features, self.base.out_features, bias=False, device=self.lora_a.device,
                           dtype=dtype)
        exact = torch.promote_types(dtype, torch.float32)  # the sum in at least fp32, rounded once
        delta = (self.lora_b.to(exact) @ self.lora_a.to(exact)) * self.scale
        linear.weight.copy_((self.base.weight.to(exact) + delta).to(dtype))
        return linear


class GrownEmbedding(nn.Module):
    """A frozen token table with a few trainable rows (ids start .. start + n - 1): the chat special
    tokens a base model never saw. Embedding lookups and the tied output layer both read `weight`, the
    frozen rows with the trainable ones in place."""

    def __init__(self, table: torch.Tensor, start: int, n: int):
        super().__init__()
        self.start = start
        self.base = nn.Parameter(table.detach().clone(), requires_grad=False)  # (padded_vocab, C)
        self.new = nn.Parameter(table[start : start + n].detach().clone())  # (n, C)

    @property
    def weight(self) -> torch.Tensor:
        end = self.start + self.new.size(0)
        return torch.cat([self.base[: self.start], self.new, self.base[end:]])  # (padded_vocab, C)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight)


@torch.no_grad()
def grow_vocabulary(model: GPT, new_tokens: int) -> GPT:
    """A copy of `model` whose vocabulary has `new_tokens` more ids after its own. Their rows start at
    the mean of the existing rows (an average token, not a random one the model would over-predict);
    everything else is unchanged, so the old ids' logits are exactly the old model's."""
    c = model.config
    grown = GPT(replace(c, vocabulary_size=c.vocabulary_size + new_tokens)).to(model.token_embeddings.weight.device)
    state = model.state_dict()
    old = state["token_embeddings.weight"]
    table = old.new_zeros(grown.token_embeddings.weight.shape)  # padded rows zero, as they never matter
    table[: c.vocabulary_size] = old[: c.vocabulary_size]
    table[c.vocabulary_size : c.vocabulary_size + new_tokens] = old[: c.vocabulary_size].float().mean(0).to(old.dtype)
    state["token_embeddings.weight"] = table
    grown.load_state_dict(state)
    return grown.to(old.dtype)


def add_lora(model: GPT, config: LoRAConfig, trainable_rows: tuple[int, int] | None = None) -> GPT:
    """Freeze `model` and wrap each of its config.targets projections with a LoRALinear, in place. With
    trainable_rows (start, n), those embedding rows train too (GrownEmbedding). The frozen network runs
    as it does at inference, without its own dropout: the adapters learn to correct the model that will
    answer, and config.dropout on their inputs is the regularisation. model.lora_config records the
    settings (what a LoRA checkpoint saves)."""
    model.requires_grad_(False)
    model.config = replace(model.config, dropout=0.0)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        elif isinstance(module, CausalSelfAttention):
            module.dropout = 0.0
    for block in model.blocks:
        for target in config.targets:
            parent_name, name = target.split(".")
            parent = getattr(block, parent_name)
            setattr(parent, name, LoRALinear(getattr(parent, name), config.rank, config.alpha, config.dropout))
    if trainable_rows is not None:
        model.token_embeddings = GrownEmbedding(model.token_embeddings.weight, *trainable_rows)
    model.lora_config = config
    return model


def trainable_by_kind(model: GPT) -> dict[str, list[nn.Parameter]]:
    """LoRA's trainable weights in model order, by kind (the optimizer's groups, in this order)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return {"lora_a": [p for n, p in named if n.endswith(".lora_a")],
            "lora_b": [p for n, p in named if n.endswith(".lora_b")],
            "new_rows": [p for n, p in named if n == "token_embeddings.new"]}


def lora_state_dict(model: GPT) -> dict:
    """Only what LoRA training changed: the adapters and the trainable embedding rows."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_a", ".lora_b", "token_embeddings.new"))}


@torch.no_grad()
def merge_lora(model: GPT) -> GPT:
    """Fold the adapters and trainable rows into plain weights, in place: a GPT like any other, which
    computes what the adapted model does (at inference, where dropout is off)."""
    for block in model.blocks:
        for target in LORA_TARGETS:
            parent_name, name = target.split(".")
            parent = getattr(block, parent_name)
            layer = getattr(parent, name)
            if isinstance(layer, LoRALinear):
                setattr(parent, name, layer.merged())
    if isinstance(model.token_embeddings, GrownEmbedding):
        table = model.token_embeddings.weight.detach()
        model.token_embeddings = nn.Embedding(*table.shape, device=table.device, dtype=table.dtype)
        model.token_embeddings.weight.copy_(table)
    return model.requires_grad_(True)


def lora_parameters(config: GPTConfig, rank: int) -> int:
    """Trainable adapter weights of a LoRA of this rank on every LORA_TARGETS projection."""
    C, H = config.embedding_dimensions, config.feed_forward_ratio * config.embedding_dimensions
    per_block = rank * ((C + 3 * C) + (C + C) + (C + H) + (H + C))  # rank x (in + out) for qkv, proj, up, down
    return config.num_hidden_layers * per_block


def lora_model(base: GPT, config: LoRAConfig, new_tokens: int) -> GPT:
    """The base model, its vocabulary grown by `new_tokens` (the chat special tokens), with fresh adapters
    (add_lora) that train together with the new rows."""
    vocabulary = base.config.vocabulary_size
    return add_lora(grow_vocabulary(base, new_tokens), config, (vocabulary, new_tokens))


def adapted_model(base: GPT, lora: dict) -> GPT:
    """The base model with a LoRA checkpoint's adapters (not merged; merge_lora folds them in). The LoRA
    state is one load_checkpoint checked (its adapters fit), the pair one check_base accepted."""
    model = lora_model(base, LoRAConfig.from_dict(lora["lora"]), len(lora["special_tokens"]))
    model.load_state_dict(lora["adapters"], strict=False)  # the frozen base's weights are already in place
    return model
