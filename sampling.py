"""Sampling: the settings, one pure function from logits to next tokens, and the seeded noise it draws from.
The order is vLLM's and Hugging Face's: logit bias, then the penalties (repetition over the prompt and the
answer so far, presence and frequency over the answer, as OpenAI defines them), then temperature (0 is
greedy), top-k, top-p and min-p. generate.py's decoder, the
server's engine and beam search's callers use them; hub.py reads the defaults for an export's
generation_config.json."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

GREEDY_BELOW = 1e-5  # temperatures below this are greedy: dividing logits by them would overflow to NaN


@dataclass(frozen=True)
class Sampling:
    """Sampling settings (hashable: the engine samples the rows that share them in one call)."""

    temperature: float = 1.0
    top_k: int = 500
    top_p: float = 0.9
    min_p: float = 0.0  # keep tokens at least min_p times as likely as the likeliest (after temperature)
    repetition_penalty: float = 1.0  # a seen token's logit divided by it (multiplied, if negative): CTRL's rule
    presence_penalty: float = 0.0  # subtracted from the logit of each token the answer already holds
    frequency_penalty: float = 0.0  # subtracted once per time the answer already holds the token
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), as OpenAI's logit_bias

    @property
    def penalised(self) -> bool:
        """Whether sampling reads the history: the prompt's tokens and the counts of the answer's."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @classmethod
    def from_args(cls, args) -> "Sampling":
        """The settings add_sampling_args' flags give."""
        return cls(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty,
                   args.presence_penalty, args.frequency_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def clamped(self, vocabulary_size: int) -> "Sampling":
        """The same settings with top_k no larger than the vocabulary."""
        return replace(self, top_k=min(self.top_k, vocabulary_size))


def adjusted(logits: torch.Tensor, sampling: Sampling, counts: torch.Tensor | None,
             in_prompt: torch.Tensor | None) -> torch.Tensor:
    """The logits (B, V) after the logit bias and the penalties, in fp32 (the same tensor when neither applies).
    counts (B, V): how often each token is in the answer so far; in_prompt (B, V) bool: in the prompt."""
    if not sampling.logit_bias and not sampling.penalised:
        return logits
    logits = logits.float().clone()
    if sampling.logit_bias:
        ids, bias = zip(*sampling.logit_bias)
        logits[:, list(ids)] += torch.tensor(bias, device=logits.device)
    if sampling.penalised:
        if sampling.repetition_penalty != 1.0:
            seen = in_prompt | (counts > 0)
            penalty = torch.where(logits > 0, 1 / sampling.repetition_penalty, sampling.repetition_penalty)
            logits = torch.where(seen, logits * penalty, logits)
        logits = logits - sampling.frequency_penalty * counts - sampling.presence_penalty * (counts > 0).float()
    return logits


def sample(logits: torch.Tensor, sampling: Sampling, noise: torch.Tensor | None, counts: torch.Tensor | None = None,
           in_prompt: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V). `noise` (B, K), K = min(top_k, V), holds Exp(1) draws:
    argmax(p / noise) samples from p (the exponential race) without a host sync. Top-p keeps the
    smallest set of most likely tokens whose probability reaches top_p (at least one), min-p those at
    least min_p times as likely as the likeliest. Only the k best tokens are sorted, never the whole
    vocabulary. counts and in_prompt are the history the penalties read (sampling.penalised)."""
    logits = adjusted(logits, sampling, counts, in_prompt)
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
    if sampling.min_p > 0.0:
        probs = probs.masked_fill(probs < sampling.min_p * probs[:, :1], 0.0)  # probs[:, 0]: the likeliest
    choice = (probs / noise.clamp_min(1e-30)).argmax(dim=-1, keepdim=True)  # (B, 1); 0 / 0 would be NaN
    return top_ids.gather(-1, choice).squeeze(-1)


class History:
    """What the penalties read, per batch row, on the device: counts (rows, V) of the answer's tokens so far,
    and in_prompt (rows, V), the prompt's tokens. Updated in place, without a host sync."""

    def __init__(self, rows: int, vocabulary_size: int, device: torch.device):
        self.counts = torch.zeros(rows, vocabulary_size, device=device)
        self.in_prompt = torch.zeros(rows, vocabulary_size, dtype=torch.bool, device=device)

    def start(self, row: int, prompt: torch.Tensor, keep_prompt: bool = False) -> None:
        """A new answer in `row` after the prompt ids (P,): its counts restart and the prompt's tokens are
        marked (added to those marked before with keep_prompt: a chat's next turn reads its earlier ones)."""
        self.counts[row].zero_()
        if not keep_prompt:
            self.in_prompt[row].zero_()
        self.in_prompt[row, prompt.view(-1)] = True

    def add(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Count the tokens (n,) just sampled in the rows (n,)."""
        self.counts.index_put_((rows, tokens), torch.ones_like(tokens, dtype=self.counts.dtype), accumulate=True)


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
