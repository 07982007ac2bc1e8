"""Generate text from a LightGPT checkpoint, streaming each token as it is sampled.

    python generate.py --prompt "The meaning of life is"        # one prompt, then exit
    echo "Once upon a time" | python generate.py                 # one generation per input line
    python generate.py                                           # type prompts at the '> ' prompt
    python generate.py --lora_path ./checkpoints/lora_instruction.pt   # chat with an instruction-tuned model

Sampling: temperature, then top-k, then top-p (nucleus); --temperature 0 is greedy. The model keeps
the last --context_length tokens in a preallocated KV cache (a sliding window once it is full). On
CUDA the fixed-shape decode step, sampling included, is compiled into a CUDA graph.

Chat models (--lora_path, or a checkpoint merged by instruction-tune.py) take each prompt as a user
turn (after an optional --system message) and answer as the assistant, stopping at <|im_end|>. Lines
typed or piped in one run are one conversation: each new turn is prefilled after what the KV cache
already holds (the oldest turns slide out of a full cache, as the ring does), until `/reset`.
This module also holds what beam_search.py, evaluate.py, export.py and serve.py share: loading a model for
inference (a checkpoint, an exported folder or a hub id, a LoRA merged in), the inference flags, prompts,
sampling.
"""

from __future__ import annotations

import argparse
import codecs
import sys
from dataclasses import dataclass
from functools import cached_property
from typing import Iterator

import torch

from chat import SPECIAL_TOKENS, ChatTokenizer, render_prompt
from checkpoint import LORA_ENTRIES, MODEL_ENTRIES, check_base, load_checkpoint, model_from_checkpoint
from common import (
    ArgumentParser,
    UserError,
    add_model_path_args,
    add_system_args,
    bf16_supported,
    check_memory,
    compile_enabled,
    float_in,
    non_negative_float,
    positive_float,
    positive_int,
    probability,
    resolve_device,
    run_main,
    unit_interval,
)
from data import load_encoding
from hub import is_exported, load_exported
from lora import adapted_model, merge_lora
from model import GPT
from sampling import GREEDY_BELOW, History, Sampler, Sampling, sample  # noqa: F401  (their home; imported from here too)

RESET = "/reset"  # typed as a prompt: a chat starts a new conversation


# ----------------------------------------------------------------------------- shared with beam_search.py


def add_inference_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    """The flags generate.py and beam_search.py share (each adds its own --device/--compile/--seed)."""
    add_model_path_args(p, "chat with the instruction-tuned model")
    p.add_argument("--system", default=None, help="a chat model's system message, before the first user turn")
    p.add_argument("--max_tokens", type=positive_int, default=max_tokens, help="most tokens to generate per prompt")
    p.add_argument("--context_length", type=positive_int, default=1024,
                   help="tokens the model sees (its KV cache length)")
    p.add_argument("--prompt", default=None,
                   help="generate for this prompt and exit (default: read prompts from standard input)")


def add_sampling_args(p) -> None:
    """The sampling flags generate.py, serve.py and bench.py share; their defaults are Sampling's."""
    p.add_argument("--temperature", type=non_negative_float, default=Sampling.temperature,
                   help=f"softmax temperature; 0 (or below {GREEDY_BELOW:g}) is greedy")
    p.add_argument("--top_k", type=positive_int, default=Sampling.top_k,
                   help="sample only from the k most likely tokens")
    p.add_argument("--top_p", type=unit_interval, default=Sampling.top_p,
                   help="then only from the smallest set whose probability reaches p")
    p.add_argument("--min_p", type=probability, default=Sampling.min_p,
                   help="then only tokens at least min_p times as likely as the likeliest (0: off)")
    p.add_argument("--repetition_penalty", type=positive_float, default=Sampling.repetition_penalty,
                   help="divide the logits of tokens in the prompt or the answer by this (1: off; CTRL's rule)")
    p.add_argument("--presence_penalty", type=float_in(-2, 2), default=Sampling.presence_penalty,
                   help="subtract this from the logit of each token the answer holds (OpenAI's; 0: off)")
    p.add_argument("--frequency_penalty", type=float_in(-2, 2), default=Sampling.frequency_penalty,
                   help="subtract this once per time the answer holds the token (OpenAI's; 0: off)")


def load_model_state(path: str, flag: str = "--checkpoint_path") -> dict:
    """A pretrained (or merged) model's checked state: from a checkpoint file, an exported folder or a hub id."""
    if is_exported(path):
        return load_exported(path, flag)
    return load_checkpoint(path, "pretrain", flag, required=MODEL_ENTRIES)  # checked: config, weights, ...


def inference_model(checkpoint_path: str, device: torch.device,
                    lora_path: str | None = None) -> tuple[GPT, dict, dict | None]:
    """The model of a checkpoint or an exported folder, or of a base with a LoRA checkpoint's adapters merged
    in (so it runs as fast as any model), in eval mode on the device with bf16 weights where bf16 is native;
    and the checkpoint states (the LoRA's None without one)."""
    state = load_model_state(checkpoint_path)
    lora = None
    if lora_path is not None:
        if state.get("special_tokens"):
            raise UserError(f"--lora_path: --checkpoint_path {checkpoint_path} is already a merged chat model; "
                            f"use it alone, or pass the base checkpoint the LoRA was trained on")
        lora = load_checkpoint(lora_path, "lora", flag="--lora_path", required=LORA_ENTRIES)
        check_base(lora, lora_path, state, checkpoint_path, "--checkpoint_path")
        model = merge_lora(adapted_model(model_from_checkpoint(state), lora))
    else:
        model = model_from_checkpoint(state)
    if bf16_supported(device):
        model = model.to(torch.bfloat16)
    return model.to(device).eval(), state, lora


@dataclass
class Loaded:
    """What inference needs from the checkpoints."""
    model: GPT  # eval mode, on the device, bf16 weights where bf16 is native
    encoding: object  # a tiktoken encoding that decodes every id the model can produce
    eot: int  # end-of-text
    chat: ChatTokenizer | None = None  # a chat model's ChatML tokens; None for a plain language model

    @property
    def stop(self) -> set[int]:
        """The tokens that end an answer."""
        return {self.eot} if self.chat is None else {self.eot, self.chat.im_end}

    @cached_property
    def undecodable(self) -> frozenset[int]:
        """The ids below the model's vocabulary size that its tokenizer cannot decode (cl100k_base and o200k_base
        leave gaps): the engine never samples them and the server refuses them in requests."""
        holes = set()
        for token in range(self.model.config.vocabulary_size if self.encoding is not None else 0):
            try:
                self.encoding.decode_single_token_bytes(token)
            except KeyError:
                holes.add(token)
        return frozenset(holes)


def load_for_inference(checkpoint_path: str, device: torch.device, lora_path: str | None = None,
                       system: str | None = None) -> Loaded:
    """The model of a checkpoint, or of a base checkpoint and a LoRA checkpoint (merged on load, so it
    decodes as fast as any model), with its tokenizer."""
    model, state, lora = inference_model(checkpoint_path, device, lora_path)
    encoding, chat = model_tokenizer(model, state, lora, checkpoint_path, lora_path)
    if chat is None and system is not None:
        raise UserError("--system needs a chat model: pass --lora_path, or a checkpoint merged by instruction-tune.py")
    return Loaded(model, encoding, state["eot_id"], chat)


def model_tokenizer(model: GPT, state: dict, lora: dict | None, checkpoint_path: str,
                    lora_path: str | None = None) -> tuple[object, ChatTokenizer | None]:
    """The tokenizer the checkpoints record (with ChatML's tokens for a chat model), checked to cover
    exactly the model's ids: (tiktoken encoding, ChatTokenizer or None)."""
    special = (lora or state).get("special_tokens")
    encoding = load_encoding(state["token_encoding"])
    chat = None
    if special:
        if tuple(special) != SPECIAL_TOKENS:
            raise UserError(f"{lora_path or checkpoint_path}: its special tokens {special} are not ChatML's")
        chat = ChatTokenizer(encoding)
        encoding = chat.encoding
    if model.config.vocabulary_size != encoding.n_vocab:  # ids the tokenizer could not decode, or never produce
        raise UserError(f"{checkpoint_path}: the model has a vocabulary of {model.config.vocabulary_size:,} ids but its "
                        f"tokenizer ({state['token_encoding']}{' + ChatML' if chat else ''}) has {encoding.n_vocab:,}")
    return encoding, chat


def prompts(prompt: str | None) -> Iterator[str]:
    """--prompt once, or every non-blank line of standard input: typed at a terminal after a '> ' prompt,
    or piped, in which case each prompt is echoed as a '> ' line above its answer and answers are
    separated by a blank line, so that they can be told apart."""
    if prompt is not None:
        yield prompt
        return
    if sys.stdin is None or sys.stdin.closed:
        raise UserError("no prompt: pass --prompt, or give prompts on standard input")
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")  # bytes that are not UTF-8 become U+FFFD, not a traceback
    interactive = sys.stdin.isatty()
    first = True
    while True:
        if interactive:
            print("> ", end="", flush=True)
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            if interactive:
                print(flush=True)  # end the "> " line, so "interrupted" starts a line of its own
            raise
        if not line:
            if interactive:
                print(flush=True)
            return
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        if not interactive:
            print(("" if first else "\n") + f"> {text}", flush=True)
            first = False
        yield text


def encode_prompt(loaded: Loaded, text: str, system: str | None = None) -> list[int]:
    """A base model's prompt is plain text (base_prompt). A chat model's prompt is a user turn (after the
    system message) and the assistant's header, in ChatML."""
    if loaded.chat is None:
        return base_prompt(loaded, text)
    return render_prompt(loaded.chat, chat_messages(text, system))


def base_prompt(loaded: Loaded, text: str) -> list[int]:
    """Text to continue, as a base model reads it: a prompt starts a document, as every training document
    did, so end-of-text comes first. serve.py's /v1/completions encodes its prompts so, chat model or not."""
    return [loaded.eot] + loaded.encoding.encode_ordinary(text)


def chat_messages(text: str, system: str | None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": text}]


def decode_text(encoding, tokens: list[int]) -> str:
    """Tokens as text, whole characters only: bytes that form no character (a model can start with the
    middle of one) are left out rather than shown as U+FFFD."""
    return encoding.decode_bytes(tokens).decode("utf-8", errors="ignore")


class TextStream:
    """Generated tokens as text in whole characters (bytes of an unfinished character are held back; bytes
    that can never form one are left out, as decode_text does), cut before the first stop string. Text that
    could be the start of a stop string is held back until it is known not to be one. generate.py prints
    through it and serve.py answers through it."""

    def __init__(self, encoding, stops: tuple[str, ...]):
        self.encoding, self.stops = encoding, stops
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self.text, self.sent, self.tokens, self.stopped = "", 0, 0, False

    def add(self, token: int) -> str:
        """The text this token makes ready to send (often "", or a few characters)."""
        self.tokens += 1
        self.text += self.decoder.decode(self.encoding.decode_single_token_bytes(token))
        return self._release(final=False)

    def finish(self) -> str:
        self.text += self.decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if self.stops:
            hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
            if hits:  # no stop string can begin in text already sent: its start would have been held back
                self.text, self.stopped, end = self.text[: min(hits)], True, min(hits)
            elif not final:
                end -= self._held()
        out, self.sent = self.text[self.sent : end], end
        return out

    def _held(self) -> int:
        """Characters at the end that begin some stop string."""
        for k in range(min(max(map(len, self.stops)) - 1, len(self.text) - self.sent), 0, -1):
            if any(s.startswith(self.text[-k:]) for s in self.stops):
                return k
        return 0


class StopStringReached(Exception):
    """The text reached a --stop string: the answer ends there."""


class TokenPrinter:
    """Streams tokens as text (TextStream: whole characters, nothing past a stop string); a token that
    completes a stop string raises StopStringReached after the text before it is printed."""

    def __init__(self, encoding, out=None, stops: tuple[str, ...] = ()):
        self.stream, self.out = TextStream(encoding, stops), out or sys.stdout

    def write(self, token: int) -> None:
        self.out.write(self.stream.add(token))
        self.out.flush()
        if self.stream.stopped:
            raise StopStringReached

    def close(self) -> None:
        self.out.write(self.stream.finish() + "\n")
        self.out.flush()


# ----------------------------------------------------------------------------- decoding

def kv_cache_bytes(model: GPT, batch_size: int, context_length: int) -> int:
    """Bytes of a KV cache of batch_size rows x context_length tokens, in the precision of the model's weights."""
    return model.kv_bytes_per_token(model.token_embeddings.weight.element_size()) * batch_size * context_length


def setup_kv_cache(model: GPT, batch_size: int, context_length: int, what: str):
    """The model's KV cache of batch_size rows x context_length tokens (GPT.setup_cache), after refusing in
    one line (check_memory) a cache the device cannot hold; `what` names the cache in that line."""
    if model.config.position_encoding == "learned":  # a ring cache decodes past any fixed number of positions
        raise UserError(f"{what}: the model has learned positions (an ablation switch), which stop at "
                        f"{model.config.max_position_embeddings} tokens; decoding serves NoPE, RoPE and ALiBi models "
                        f"(evaluate.py scores a learned one)")
    check_memory(kv_cache_bytes(model, batch_size, context_length), model.token_embeddings.weight.device, what)
    return model.setup_cache(batch_size, context_length)


PREFILL_CHUNK = 1024  # prompt tokens per forward pass: bounds the attention mask and the logits a prompt needs


def prefill(model: GPT, idx: torch.Tensor, chunk: int | None = None, position: int = 0,
            on_logits=None) -> torch.Tensor:
    """Run prompts idx (B, P) into the model's KV cache at positions position .. position + P - 1 and
    return the logits after their last token (B, V). Position 0 starts a new sequence; a later one
    continues the sequence the cache holds. Long prompts go in chunks of at most `chunk` tokens (and
    the cache length), each continuing the sequence in the ring, so no (P x P) mask or
    (P x vocabulary) logits are ever made. on_logits(start, logits) sees each chunk's logits (B, chunk, V)
    (a server scoring the prompt's tokens)."""
    size = min(chunk or PREFILL_CHUNK, model.kv_cache.length)
    P = idx.size(1)
    for start in range(0, P, size):
        end = min(P, start + size)
        logits = model(idx[:, start:end], input_pos=torch.arange(position + start, position + end, device=idx.device))
        if on_logits is not None:
            on_logits(start, logits)
    return logits[:, -1]



class Decoder:
    """Prefill a prompt into the KV cache, then decode one token per call.

    Each step attends over the filled part of the cache rounded up to a span (KVCache.spans), so its
    shapes are fixed within a span. With use_compile the step (model and sampling) is compiled once per
    shape family (the span is a dynamic size after the second one), and on CUDA each span's step is
    captured as a CUDA graph that a decode step replays with one launch: no Python, no guards, no
    per-kernel launches. The step reads its token, position and noise from static buffers, writes
    the cache in place and advances the position on the device."""

    def __init__(self, model: GPT, context_length: int, batch_size: int, sampling: Sampling, sampler: Sampler,
                 use_compile: bool, compile_mode: str = "default"):
        device = model.token_embeddings.weight.device
        self.model, self.device, self.sampler = model, device, sampler
        self.sampling = sampling.clamped(model.config.vocabulary_size)
        self.cache = setup_kv_cache(model, batch_size, context_length,
                                    f"a KV cache of {batch_size} x --context_length {context_length} tokens")
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # static inputs
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.noise = torch.ones(batch_size, self.sampling.top_k, device=device)
        self.history = History(batch_size, model.config.vocabulary_size, device) if sampling.penalised else None
        self.rows = torch.arange(batch_size, device=device)
        self.next_position = 0  # host copy of the position, to choose the span
        step = self._decode_and_sample  # compiled without CUDA graphs of torch's own: _capture makes them
        self._step = torch.compile(step, fullgraph=True, mode=compile_mode) if use_compile else step
        self.graphs = {} if use_compile and device.type == "cuda" else None  # span -> (CUDAGraph, output)
        self._pool = None

    def prefill(self, idx: torch.Tensor, extend: bool = False) -> torch.Tensor:
        """idx (B, P) -> logits of the last position (B, V). Starts a new sequence, whatever P is, or with
        extend continues the one in the cache (a chat's next turn: only the new tokens are computed)."""
        start = self.next_position if extend else 0
        logits = prefill(self.model, idx, position=start)
        if self.history is not None:  # the penalties' history: this prompt (a chat's earlier turns too)
            for row in range(idx.size(0)):
                self.history.start(row, idx[row], keep_prompt=extend)
        self.next_position = start + idx.size(1)
        self.position.fill_(self.next_position)
        return logits

    def first_token(self, logits: torch.Tensor) -> torch.Tensor:
        """Sample the token after the prompt from prefill's logits."""
        noise = None if self.sampling.greedy else self.sampler.fill(self.noise)
        return self._sample(logits, noise)

    def _sample(self, logits: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        history = self.history
        token = sample(logits, self.sampling, noise, *((history.counts, history.in_prompt) if history else ()))
        if history is not None:
            history.add(self.rows, token)
        return token

    def _decode_and_sample(self, token: torch.Tensor, position: torch.Tensor, noise: torch.Tensor, span: int):
        self.cache.span = span
        logits = self.model(token, input_pos=position)[:, -1]  # (B, V)
        self.cache.span = None
        position.add_(1)
        return self._sample(logits, noise)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """token (B,) at the next position -> the token after it (B,), a fresh tensor."""
        if not self.sampling.greedy:
            self.sampler.fill(self.noise)
        span = self.cache.span_for(self.next_position)
        self.next_position += 1
        if self.graphs is None:
            return self._step(token.view_as(self.token), self.position, self.noise, span)
        self.token.copy_(token.view_as(self.token))
        if span not in self.graphs:
            self.graphs[span] = self._capture(span)
        graph, output = self.graphs[span]
        graph.replay()
        return output.clone()  # the next replay overwrites the graph's output

    def _capture(self, span: int):
        """Compile and warm up the step for this span on a side stream, then record it as a CUDA graph.
        The warm-up runs repeat the coming step exactly (same token, position and slots), and the
        position they advance is put back, so the sequence is unchanged."""
        position = self.position.clone()
        counts = self.history.counts.clone() if self.history is not None else None
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(self.token, self.position, self.noise, span)
                self.position.copy_(position)
                if counts is not None:  # the penalties' counts too: the warm-ups sampled nothing for real
                    self.history.counts.copy_(counts)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:  # one memory pool for every span's graph: they never run at once
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            output = self._step(self.token, self.position, self.noise, span)
        return graph, output


@torch.inference_mode()
def generate(decoder: Decoder, prompt_ids: list[int], stop: set[int], max_tokens: int, on_token=None,
             extend: bool = False) -> list[int]:
    """Sample up to max_tokens tokens after the prompt, stopping at a token of `stop`. The tokens
    returned are those sampled, the stopping one included; all but the last are in the cache by then.
    With extend the prompt continues the sequence in the cache instead of starting one."""
    token = decoder.first_token(decoder.prefill(torch.tensor([prompt_ids], device=decoder.device), extend))
    out = []
    while True:
        t = token.item()  # the one host sync per token: it must be printed and checked
        out.append(t)
        if t in stop:
            return out
        if on_token:
            on_token(t)
        if len(out) == max_tokens:
            return out
        token = decoder.step(token)


class Conversation:
    """A chat in the decoder's KV cache. Each user turn is prefilled after the tokens already there, in
    the layout render_conversation gives the whole chat (so the cached chat equals a fresh prefill of
    it), and the answer is generated until <|im_end|>."""

    def __init__(self, loaded: Loaded, decoder: Decoder, system: str | None):
        self.loaded, self.decoder, self.system = loaded, decoder, system
        self.pending: list[int] | None = None  # tokens sampled but not yet in the cache; None: no chat yet

    def reset(self) -> None:
        self.pending = None

    def turn_tokens(self, text: str) -> list[int]:
        """What the next prefill takes: the whole prompt for a new chat, else the end of the last answer and
        this turn (render_prompt's layout: each message <|im_start|>role\n...<|im_end|>\n)."""
        if self.pending is None:
            return encode_prompt(self.loaded, text, self.system)
        chat = self.loaded.chat
        turn = render_prompt(chat, chat_messages(text, None))[1:]  # without the chat's opening end-of-text
        return self.pending + chat.encode_text("\n") + turn

    def reply(self, text: str, max_tokens: int, on_token=None) -> list[int]:
        """The assistant's answer to a user turn (its tokens, <|im_end|> left out). An on_token that raises
        StopStringReached ends the answer at that token, as max_tokens would."""
        extend, seen = self.pending is not None, []

        def record(token: int) -> None:
            seen.append(token)
            if on_token:
                on_token(token)

        try:
            out = generate(self.decoder, self.turn_tokens(text), self.loaded.stop, max_tokens, record, extend)
        except StopStringReached:
            out = seen
        last, im_end = out[-1], self.loaded.chat.im_end
        if last in self.loaded.stop:  # <|im_end|> (or an end-of-text, which ChatML closes the same way)
            self.pending = [im_end]
            return out[:-1]
        self.pending = [last, im_end]  # cut at max_tokens: its last token, then the turn's end
        return out


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = ArgumentParser(description="Generate text with LightGPT.")
    add_inference_args(p, max_tokens=1000)
    add_sampling_args(p)
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end the answer before this text (repeat the flag for several, up to 4)")
    add_system_args(p, compile_help="compile the decode step into CUDA graphs (auto: on for CUDA)",
                    seed_help="random seed for reproducible output")
    args = p.parse_args(argv)
    if args.stop and (len(args.stop) > 4 or "" in args.stop):
        p.error("argument --stop: up to 4 stop strings, none empty")
    return args


def main(args) -> list[list[int]]:
    device = resolve_device(args.device)
    loaded = load_for_inference(args.checkpoint_path, device, args.lora_path, args.system)
    sampling = Sampling.from_args(args)
    decoder = Decoder(loaded.model, args.context_length, 1, sampling, Sampler(device, args.seed),
                      compile_enabled(args.compile, device))
    conversation = Conversation(loaded, decoder, args.system) if loaded.chat else None
    outputs = []
    for text in prompts(args.prompt):
        if conversation and text.strip() == RESET:
            conversation.reset()
            print("(a new conversation)", flush=True)
            continue
        printer, seen = TokenPrinter(loaded.encoding, stops=tuple(args.stop or ())), []
        try:
            if conversation:
                outputs.append(conversation.reply(text, args.max_tokens, printer.write))
            else:
                try:
                    out = generate(decoder, encode_prompt(loaded, text), loaded.stop, args.max_tokens,
                                   lambda t: (seen.append(t), printer.write(t)))
                except StopStringReached:  # a --stop string: the tokens up to the one that completed it
                    out = seen
                outputs.append(out[:-1] if out[-1] in loaded.stop else out)
        finally:  # Ctrl-C mid-answer still ends the line, so "interrupted" starts a line of its own
            printer.close()
    return outputs


if __name__ == "__main__":
    run_main(main, parse_args)
