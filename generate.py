"""Generate text from a LightGPT checkpoint, streaming each token as it is sampled.

    python generate.py --prompt "The meaning of life is"        # one prompt, then exit
    echo "Once upon a time" | python generate.py                 # one generation per input line
    python generate.py                                           # type prompts at the '> ' prompt

Sampling: temperature, then top-k, then top-p (nucleus); --temperature 0 is greedy. The model keeps
the last --context_length tokens in a preallocated KV cache (a sliding window once it is full). On
CUDA the fixed-shape decode step, sampling included, is compiled into a CUDA graph.
This module also holds what beam_search.py shares: the inference flags, loading, prompts, sampling.
"""

from __future__ import annotations

import argparse
import codecs
import sys
from typing import Iterator

import torch

from common import (
    compile_enabled,
    ArgumentParser,
    UserError,
    load_checkpoint,
    non_negative_float,
    non_negative_int,
    positive_int,
    resolve_device,
    run_main,
    unit_interval,
)
from data import load_encoding
from model import GPT, GPTConfig



# ----------------------------------------------------------------------------- shared with beam_search.py


def add_inference_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--checkpoint_path", default="./checkpoints/checkpoint.pt", help="the model checkpoint")
    p.add_argument("--lora_path", default=None, help="a LoRA adapter checkpoint (not supported yet)")
    p.add_argument("--max_tokens", type=positive_int, default=max_tokens, help="most tokens to generate per prompt")
    p.add_argument("--context_length", type=positive_int, default=1024, help="tokens the model sees (its KV cache length)")
    p.add_argument("--prompt", default=None, help="generate for this prompt and exit (default: read prompts from standard input)")
    p.add_argument("--device", default="cuda", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--seed", type=non_negative_int, default=None, help="random seed for reproducible output")


def add_sampling_args(p) -> None:
    """The sampling flags generate.py and bench.py share."""
    p.add_argument("--temperature", type=non_negative_float, default=1.0, help="softmax temperature; 0 is greedy")
    p.add_argument("--top_k", type=positive_int, default=500, help="sample only from the k most likely tokens")
    p.add_argument("--top_p", type=unit_interval, default=0.9, help="then only from the smallest set whose probability reaches p")


def load_for_inference(args) -> tuple[GPT, object, int, torch.device]:
    """The model (eval mode, bf16 weights on CUDA), its tokenizer and end-of-text id, and the device."""
    if args.lora_path is not None:
        raise UserError("--lora_path: LoRA adapters are not supported yet (they arrive with instruction tuning)")
    device = resolve_device(args.device)
    state = load_checkpoint(args.checkpoint_path, "pretrain")
    try:
        model = GPT(GPTConfig.from_dict(state["config"]))
        model.load_state_dict(state["model"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"--checkpoint_path: {args.checkpoint_path} holds no usable model ({str(e).splitlines()[0][:120]})") from None
    encoding = load_encoding(state["token_encoding"])
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        model = model.to(torch.bfloat16)
    model.to(device).eval()
    return model, encoding, state["eot_id"], device


def prompts(args) -> Iterator[str]:
    """--prompt once, or every line of standard input (with a '> ' prompt when typed at a terminal)."""
    if args.prompt is not None:
        yield args.prompt
        return
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        yield line.rstrip("\n")


def encode_prompt(encoding, eot: int, text: str) -> list[int]:
    """A prompt starts a document, as every training document did: end-of-text first."""
    return [eot] + encoding.encode_ordinary(text)


class TokenPrinter:
    """Streams tokens as text, holding back the bytes of a character that is not complete yet."""

    def __init__(self, encoding, out=None):
        self.encoding, self.out = encoding, out or sys.stdout
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(self, token: int) -> None:
        self.out.write(self.decoder.decode(self.encoding.decode_single_token_bytes(token)))
        self.out.flush()

    def close(self) -> None:
        self.out.write(self.decoder.decode(b"", final=True) + "\n")
        self.out.flush()


# ----------------------------------------------------------------------------- sampling


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, noise: torch.Tensor | None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V): temperature, then top-k, then top-p (the smallest set of
    tokens whose probability reaches top_p, at least one); temperature 0 is greedy. `noise` (B, K),
    K = min(top_k, V), holds Exp(1) draws: argmax(p / noise) samples from p (the exponential race)
    without a host sync. Only the k best tokens are sorted, never the whole vocabulary."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    top_logits, top_ids = torch.topk(logits.float() / temperature, min(top_k, logits.size(-1)), dim=-1)  # (B, K), sorted
    probs = torch.softmax(top_logits, dim=-1)
    if top_p < 1.0:
        before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
        probs = probs.masked_fill(before >= top_p, 0.0)
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

    def noise(self, shape, device) -> torch.Tensor:
        return torch.empty(shape, device=device).exponential_(generator=self.generator)


# ----------------------------------------------------------------------------- decoding


class Decoder:
    """Prefill a prompt into the KV cache, then decode one token per call. The decode step has fixed
    shapes (the cache is a ring), so on CUDA it is compiled with mode="reduce-overhead": a CUDA graph,
    with the sampling inside it."""

    def __init__(self, model: GPT, context_length: int, batch_size: int, device: torch.device,
                 temperature: float, top_k: int, top_p: float, use_compile: bool):
        self.model, self.device = model, device
        self.settings = (temperature, min(top_k, model.config.vocabulary_size), top_p)
        self.cache = model.setup_cache(batch_size, context_length)
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # advanced in place: no host copy per step
        self._step = torch.compile(self._decode_and_sample, mode="reduce-overhead", fullgraph=True) if use_compile else self._decode_and_sample

    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, P) -> logits of the last position (B, V). Starts a new sequence, whatever P is."""
        self.cache.reset()
        positions = torch.arange(idx.size(1), device=self.device)
        return self.model(idx, input_pos=positions)[:, -1]

    def _decode_and_sample(self, token: torch.Tensor, position: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        logits = self.model(token, input_pos=position)[:, -1]  # (B, V)
        return sample(logits, *self.settings, noise)

    def step(self, token: torch.Tensor, position: int, noise: torch.Tensor) -> torch.Tensor:
        """token (B, 1) at absolute `position` -> the next token (B,). The result is cloned: a CUDA
        graph's output is overwritten by its next replay, and it is fed back as the next input."""
        self.position.fill_(position)
        return self._step(token, self.position, noise).clone()


@torch.inference_mode()
def generate(model: GPT, prompt_ids: list[int], eot: int, args, sampler: Sampler, decoder: Decoder, on_token=None) -> list[int]:
    """Sample up to args.max_tokens tokens after the prompt, stopping at end-of-text."""
    device = decoder.device
    temperature, top_k, top_p = decoder.settings  # top_k already clamped to the vocabulary
    idx = torch.tensor([prompt_ids], device=device)
    logits = decoder.prefill(idx)
    token = sample(logits, temperature, top_k, top_p, sampler.noise((1, top_k), device))
    out = []
    position = len(prompt_ids)
    while True:
        t = token.item()  # the one host sync per token: it must be printed and checked
        if t == eot:
            break
        out.append(t)
        if on_token:
            on_token(t)
        if len(out) == args.max_tokens:
            break
        token = decoder.step(token.view(1, 1), position, sampler.noise((1, top_k), device))
        position += 1
    return out


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = ArgumentParser(description="Generate text with LightGPT.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_inference_args(p, max_tokens=1000)
    add_sampling_args(p)
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="torch.compile the decode step into a CUDA graph (auto: on for CUDA)")
    return p.parse_args(argv)


def main(args) -> list[list[int]]:
    model, encoding, eot, device = load_for_inference(args)
    use_compile = compile_enabled(args.compile, device)
    decoder = Decoder(model, args.context_length, 1, device, args.temperature, args.top_k, args.top_p, use_compile)
    sampler = Sampler(device, args.seed)
    outputs = []
    for text in prompts(args):
        printer = TokenPrinter(encoding)
        outputs.append(generate(model, encode_prompt(encoding, eot, text), eot, args, sampler, decoder, printer.write))
        printer.close()
    return outputs


if __name__ == "__main__":
    run_main(main, parse_args)
