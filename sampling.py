"""Sampling: the settings (temperature first, then top-k, then top-p; temperature 0 is greedy), one pure
function from logits to next tokens, and the seeded noise it draws from. generate.py's decoder, the
server's engine and beam search's callers use them; hub.py reads the defaults for an export's
generation_config.json."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

GREEDY_BELOW = 1e-5  # temperatures below this are greedy: dividing logits by them would overflow to NaN


@dataclass(frozen=True)
class Sampling:
    """Sampling settings: temperature first, then top-k, then top-p; a temperature of 0 is greedy."""

    temperature: float = 1.0
    top_k: int = 500
    top_p: float = 0.9

    @classmethod
    def from_args(cls, args) -> "Sampling":
        """The settings add_sampling_args' flags give."""
        return cls(args.temperature, args.top_k, args.top_p)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def clamped(self, vocabulary_size: int) -> "Sampling":
        """The same settings with top_k no larger than the vocabulary."""
        return replace(self, top_k=min(self.top_k, vocabulary_size))


def sample(logits: torch.Tensor, sampling: Sampling, noise: torch.Tensor | None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V). `noise` (B, K), K = min(top_k, V), holds Exp(1) draws:
    argmax(p / noise) samples from p (the exponential race) without a host sync. Top-p keeps the
    smallest set of most likely tokens whose probability reaches top_p (at least one). Only the k best
    tokens are sorted, never the whole vocabulary."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    k = min(sampling.top_k, logits.size(-1))
    top_logits, top_ids = torch.topk(logits, k, dim=-1)  # (B, K), sorted; dividing by T > 0 keeps the order
    probs = torch.softmax(top_logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        # The mass of the tokens ranked above each one: a shifted cumulative sum, not cumsum - p, which
        # can round a mass of exactly top_p down and keep one token too many.
        above = F.pad(probs.cumsum(dim=-1)[:, :-1], (1, 0))
        probs = probs.masked_fill(above >= sampling.top_p, 0.0)
    choice = (probs / noise.clamp_min(1e-30)).argmax(dim=-1, keepdim=True)  # (B, 1); 0 / 0 would be NaN
    return top_ids.gather(-1, choice).squeeze(-1)


class Sampler:
    """Seeded noise for `sample`, drawn on the device by its own generator."""

    def __init__(self, device: torch.device, seed: int | None):
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def fill(self, noise: torch.Tensor) -> torch.Tensor:
        return noise.exponential_(generator=self.generator)
