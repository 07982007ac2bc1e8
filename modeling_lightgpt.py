"""LightGPT as a transformers model (remote code): copied into every export, so that

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

loads model.safetensors as it is (the parameter names are LightGPT's) and computes LightGPT's logits. One
file holds both the configuration and the model (config.json's auto_map points at both). It imports
transformers (5.x) and torch only, never LightGPT's own modules: an export is used where LightGPT is not.
It computes NoPE and the ablation switches RoPE, ALiBi and learned positions. Attention goes through
transformers' attention interface (eager or SDPA; flash attention too, except with ALiBi, whose biases
ride in the attention mask) and decoding through its cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

ROPE_BASE = 10_000.0  # model.ROPE_BASE
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
VOCAB_MULTIPLE = 64  # model.VOCAB_MULTIPLE: the table's rows are padded up to a multiple of this


class LightGPTConfig(PreTrainedConfig):
    model_type = "lightgpt"

    def __init__(self, vocab_size: int = 50_257, hidden_size: int = 1024, num_attention_heads: int = 16,
                 num_hidden_layers: int = 24, feed_forward_ratio: int = 4, position_encoding: str = "none",
                 max_position_embeddings: int = 1024, bos_token_id: int | None = 50_256,
                 eos_token_id: int | None = 50_256, tie_word_embeddings: bool = True, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.num_hidden_layers = num_hidden_layers
        self.feed_forward_ratio = feed_forward_ratio
        self.position_encoding = position_encoding
        self.max_position_embeddings = max_position_embeddings
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def alibi_slopes(n_head: int, device) -> torch.Tensor:
    """model.alibi_slopes: 2^(-8 / n) ... 2^(-8) for n a power of two, else the power of two p below n's,
    then every other slope of 2p."""
    p = 2 ** math.floor(math.log2(n_head))
    exponents = torch.cat([torch.arange(1, p + 1, device=device, dtype=torch.float32) * (8 / p),
                           (2 * torch.arange(n_head - p, device=device, dtype=torch.float32) + 1) * (4 / p)])
    return torch.exp2(-exponents)


def alibi_mask(mask, n_head: int, seen: int, T: int, dtype: torch.dtype, device) -> torch.Tensor:
    """transformers' causal mask (None, boolean or additive; (B, 1, T, S)) with ALiBi's biases folded in:
    -slope x (query index - key index) where attention is allowed, (1 or B, n_head, T, S). Indices, not
    position ids: left padding shifts both alike, so distances between real tokens are the model's."""
    q = torch.arange(seen, seen + T, device=device)
    k = torch.arange(seen + T if mask is None else mask.shape[-1], device=device)
    distance = (q[:, None] - k[None, :]).float()  # (T, S)
    bias = (-alibi_slopes(n_head, device).view(1, -1, 1, 1) * distance).to(dtype)  # (1, n_head, T, S)
    lowest = torch.finfo(dtype).min  # not -inf: a padding query with no key allowed gives no NaN
    if mask is None:
        return torch.where(distance >= 0, bias, lowest)
    if mask.dtype == torch.bool:
        return torch.where(mask, bias, lowest)
    return (mask.to(dtype) + bias).clamp(min=lowest)


def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """softmax(q k^T * scaling + mask) v, (B, n_head, T, head_dim) in, (B, T, n_head, head_dim) out."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """model.apply_rope: the first half of each head rotated with the second, in fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: LightGPTConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        C = config.hidden_size
        self.n_head, self.head_dim = config.num_attention_heads, C // config.num_attention_heads
        self.scaling, self.is_causal = self.head_dim**-0.5, True
        self.qkv = nn.Linear(C, 3 * C, bias=False)
        self.proj = nn.Linear(C, C, bias=False)

    def forward(self, x, attention_mask=None, cache=None, angles=None, **kwargs):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        if angles is not None:
            q, k = rope(q, *angles), rope(k, *angles)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)
        y, _ = attention(self, q, k, v, attention_mask, scaling=self.scaling, dropout=0.0, **kwargs)
        return self.proj(y.reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: LightGPTConfig):
        super().__init__()
        C = config.hidden_size
        self.up = nn.Linear(C, config.feed_forward_ratio * C, bias=False)
        self.down = nn.Linear(config.feed_forward_ratio * C, C, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.up(x)))


class Block(nn.Module):
    def __init__(self, config: LightGPTConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.hidden_size)  # eps None: the dtype's epsilon, as LightGPT's
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = nn.RMSNorm(config.hidden_size)
        self.mlp = MLP(config)

    def forward(self, x, **kwargs):
        x = x + self.attn(self.attn_norm(x), **kwargs)
        return x + self.mlp(self.mlp_norm(x))


class LightGPTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = LightGPTConfig
    base_model_prefix = ""
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"lm_head.weight": "token_embeddings.weight"}

    def __init__(self, config: LightGPTConfig):
        super().__init__(config)
        if config.position_encoding not in ("none", "rope", "alibi", "learned"):
            raise ValueError(f"position_encoding {config.position_encoding!r} is not supported by this modeling file")
        self.token_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        if config.position_encoding == "learned":
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.output_norm = nn.RMSNorm(config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.token_embeddings

    def set_input_embeddings(self, value):
        self.token_embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: Cache | None = None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int = 0, past_key_values=None,
                **kwargs):
        past_key_values = cache if cache is not None else past_key_values  # the name before transformers 5.25
        if inputs_embeds is None:
            inputs_embeds = self.token_embeddings(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        seen = past_key_values.get_seq_length() if past_key_values is not None else 0  # tokens cached before these
        if position_ids is None:
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + seen).unsqueeze(0)
        x, angles = inputs_embeds, None
        if self.config.position_encoding == "learned":
            x = x + self.position_embeddings(position_ids)
        elif self.config.position_encoding == "rope":
            head_dim = self.config.hidden_size // self.config.num_attention_heads
            inv_freq = ROPE_BASE ** -(torch.arange(0, head_dim, 2, device=x.device, dtype=torch.float32) / head_dim)
            theta = position_ids.float()[..., None] * inv_freq  # (B or 1, T, head_dim / 2)
            angles = (theta.cos()[:, None], theta.sin()[:, None])  # (B or 1, 1, T, head_dim / 2)
        mask = create_causal_mask(config=self.config, inputs_embeds=x, attention_mask=attention_mask,
                                  cache=past_key_values, position_ids=position_ids)
        if self.config.position_encoding == "alibi":
            if "flash" in (self.config._attn_implementation or ""):
                raise ValueError("ALiBi's biases ride in the attention mask, which flash attention does not take: "
                                 "load with attn_implementation='sdpa' or 'eager'")
            mask = alibi_mask(mask, self.config.num_attention_heads, seen, x.shape[1], x.dtype, x.device)
        for block in self.blocks:
            x = block(x, attention_mask=mask, cache=past_key_values, angles=angles, **kwargs)
        x = self.output_norm(x)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) and logits_to_keep else slice(None)
        logits = self.lm_head(x[:, keep])[..., : self.config.vocab_size]  # padded ids are never predicted
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: past_key_values})
