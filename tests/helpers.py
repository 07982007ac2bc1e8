"""Test helpers that more than one test file uses.

A certain model: a tiny base checkpoint and a LoRA checkpoint for it, their weights set by hand (never
trained), saved in the real checkpoint formats with the project's own functions. Plumbing tests (the
server, the chat loop, the browser page, stopping at <|im_end|>, exact token counts and finish reasons)
run on it, so that what they check does not hang on whether a tiny model happened to learn something,
which a last-bit difference anywhere in its training (another CPU's vector kernels) can change.

How it works: a lookup table in block 0's MLP over orthogonal embedding directions makes it a bigram
machine on a few tokens, and its logits put the next token of the chain more than MARGIN nats above any
other, so neither rounding nor sampling can change what it says:

- the base model says "yes." then end-of-text after "y"; after any other token it writes free text: one
  of FREE_LETTERS (a-z without the chain's e, s and y), never anything else, so it never ends;
- the LoRA (two rank-1 updates of that MLP, and the ChatML rows of the embedding) makes a chat model
  that answers "yes." then <|im_end|> after the prompt's last "\\n" (<|im_start|>assistant\\n), whatever
  was asked.

Block 1's attention is random (seeded) and reads and writes only directions that the letters have and
the chain tokens lack: which free letter comes next depends on the whole context (so cache and batching
bugs still change sampled text), the chain's margin does not.

After it, the smaller helpers that test files share (no test file imports another): LoRA on a tiny model,
greedy decoding two ways, reading the documentation's pages, and torchrun launches. Fixtures are in
conftest.py."""

import importlib
import os
import re
import subprocess
import time
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from conftest import ROOT

from chat import SPECIAL_TOKENS
from checkpoint import load_checkpoint, lora_checkpoint, model_checkpoint, model_from_checkpoint, save_checkpoint
from generate import Decoder, Sampler, Sampling
from lora import LoRAConfig, add_lora, grow_vocabulary, lora_model, lora_state_dict
from model import GPT, GPTConfig

CHAT_ANSWER = "yes."
BASE_AFTER_Y = "es."  # the base model after "y": then end-of-text
FREE_LETTERS = "abcdfghijklmnopqrtuvwxz"  # a-z without e, s, y: the base's free text never enters the chain
MARGIN = 40.0  # nats, at least, between the logit of the certain next token (or the weakest free letter)
# and any other token's; tests assert it (test_certain_model.py)

_CHAIN = ["\n", "y", "e", "s", "."]  # directions 0-4; then end-of-text 5, <|im_end|> 6, free 7, the rest 8
_EOT_DIR, _IM_END_DIR, _FREE_DIR, _REST_DIR, _LETTER_DIR = 5, 6, 7, 8, 9  # letter k also has direction 9 + k
_C, _LAYERS, _HEADS, _VOCAB, _EOT = 32, 2, 4, 257, 256
_GAIN, _SIZE, _UP = 12.0, 24.0, 4.0  # output norm gain; what the table writes; its keys' scale
_LETTER_PART, _QKV, _PROJ = 0.5, 8.0, 0.5  # a letter's own direction; the attention's weights' scales


def _direction(i: int) -> torch.Tensor:
    return F.one_hot(torch.tensor(i), _C).float()


def _base_weights() -> tuple[GPTConfig, dict]:
    config = GPTConfig(vocabulary_size=_VOCAB, embedding_dimensions=_C, num_attention_heads=_HEADS,
                       num_hidden_layers=_LAYERS, feed_forward_ratio=4, dropout=0.0)
    state = {k: torch.zeros_like(v) for k, v in GPT(config).state_dict().items()}
    table = state["token_embeddings.weight"]  # (padded vocabulary, C); padded rows stay zero
    table[:_VOCAB] = _direction(_REST_DIR)
    for i, ch in enumerate(_CHAIN):
        table[ord(ch)] = _direction(i)
    table[_EOT] = _direction(_EOT_DIR)
    for k, ch in enumerate(FREE_LETTERS):
        table[ord(ch)] = _direction(_FREE_DIR) + _LETTER_PART * _direction(_LETTER_DIR + k)
    # block 0's MLP, a lookup table: unit d fires on direction d and writes the direction of what follows
    # (silu(0) = 0, so a unit is silent for every other direction of 0-8)
    follows = {0: _FREE_DIR, 1: 2, 2: 3, 3: 4, 4: _EOT_DIR, _EOT_DIR: _FREE_DIR, _IM_END_DIR: _FREE_DIR,
               _FREE_DIR: _FREE_DIR, _REST_DIR: _FREE_DIR}
    for d, after in follows.items():
        state["blocks.0.mlp.up.weight"][d] = _UP * _direction(d)
        state["blocks.0.mlp.down.weight"][:, d] = _written(after)
    # block 1's attention, random: it reads and writes only the letters' own directions, which the chain
    # tokens lack and the table never reads
    g = torch.Generator().manual_seed(0)
    qkv = _QKV * torch.randn(3 * _C, _C, generator=g)
    qkv[:, :_LETTER_DIR] = 0
    proj = _PROJ * torch.randn(_C, _C, generator=g)
    proj[:_LETTER_DIR] = 0
    state["blocks.1.attn.qkv.weight"], state["blocks.1.attn.proj.weight"] = qkv, proj
    for name in state:
        if name.endswith("norm.weight"):
            state[name] = torch.ones(_C)
    state["output_norm.weight"] = torch.full((_C,), _GAIN)
    return config, state


def _written(direction: int) -> torch.Tensor:
    """What a table unit writes for `direction`, scaled by its activation on its own one-hot input."""
    return _SIZE / F.silu(torch.tensor(_UP * _C ** 0.5)) * _direction(direction)


def write_certain_model(folder) -> SimpleNamespace:
    """base.pt, lora.pt (its chat LoRA) and merged.pt (the two merged, as instruction-tune.py's
    --merge_path writes it) in `folder`: their paths."""
    folder = str(folder)
    paths = SimpleNamespace(**{k: os.path.join(folder, f"{k}.pt") for k in ("base", "lora", "merged")})
    config, weights = _base_weights()
    save_checkpoint(model_checkpoint(config, weights, "bytes", _EOT, {},
                                     dataset="none: weights set by hand (tests/helpers.py)"), paths.base)
    base = load_checkpoint(paths.base, "pretrain")
    rank, alpha = 2, 2.0
    model = lora_model(model_from_checkpoint(base), LoRAConfig(rank, alpha), len(SPECIAL_TOKENS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".lora_a", ".lora_b")):
                p.zero_()
        down = model.blocks[0].mlp.down
        scale = alpha / rank
        for r, (unit, before, after) in enumerate([(0, _FREE_DIR, 1), (4, _EOT_DIR, _IM_END_DIR)]):
            down.lora_a[r, unit] = 1.0  # "\n" now leads to "y", "." to <|im_end|> instead of end-of-text
            down.lora_b[:, r] = (_written(after) - _written(before)) / scale
        im_start, im_end, pad = (_direction(d) for d in (_REST_DIR, _IM_END_DIR, _REST_DIR))
        model.token_embeddings.new.copy_(torch.stack([im_start, im_end, pad]))
    save_checkpoint(lora_checkpoint(model.config, lora_state_dict(model), model.lora_config, SPECIAL_TOKENS, base,
                                    paths.base, {}), paths.lora)
    tune = importlib.import_module("instruction-tune")
    tune.write_merged(SimpleNamespace(full=False, base_model_path=paths.base, checkpoint_path=paths.lora,
                                      merge_path=paths.merged))
    return paths


def next_tokens(chat: bool) -> dict[int, int]:
    """The certain next token after each chain token: {token: next}."""
    im_end = _VOCAB + 1  # chat.SPECIAL_TOKENS: <|im_start|>, <|im_end|>, <|pad|> after the base vocabulary
    chain = [ord(ch) for ch in "yes."] + [im_end if chat else _EOT]
    follows = dict(zip(chain, chain[1:]))
    if chat:
        follows[ord("\n")] = chain[0]
    return follows


def margins(model, ids: list[int], chat: bool) -> tuple[float, float]:
    """The logits of `model` after every prefix of `ids`: (the smallest margin of the certain next token
    over every other token, after each chain token; the smallest margin of the weakest free letter over
    every token that is not a free letter, after every other token)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0].float()  # (T, V)
    follows = next_tokens(chat)
    letters = torch.tensor([ord(ch) for ch in FREE_LETTERS])
    others = torch.ones(logits.size(-1), dtype=torch.bool)
    others[letters] = False
    chain, free = float("inf"), float("inf")
    for token, row in zip(ids, logits):
        if token in follows:
            best = follows[token]
            rest = torch.cat([row[:best], row[best + 1 :]])
            chain = min(chain, (row[best] - rest.max()).item())
        else:
            free = min(free, (row[letters].min() - row[others].max()).item())
    return chain, free


# ----------------------------------------------------------------------------- a tiny byte model on disk

TRAINING_LENGTH = 32  # the --tokens_per_sample that conftest.py's `checkpoint` fixture records


# ----------------------------------------------------------------------------- LoRA on a tiny model

V, NEW = 300, 3  # the base vocabulary; the tokens LoRA adds


def tiny(dropout: float = 0.0, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocabulary_size=V, embedding_dimensions=32, num_attention_heads=4, num_hidden_layers=2,
                         dropout=dropout)).eval()


def adapted(model: GPT, rank: int = 4, alpha: float = 2.0, dropout: float = 0.0) -> GPT:
    return add_lora(grow_vocabulary(model, NEW), LoRAConfig(rank, alpha, dropout), (V, NEW)).eval()


def perturb(model: GPT, seed: int = 1) -> None:
    """Give every trainable weight a non-trivial value, as training would."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)


# ----------------------------------------------------------------------------- greedy decoding, two ways


def greedy_by_recomputation(model, prompt, steps, window):
    """Reference: every token from a full forward over the whole sequence with sliding-window attention."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([tokens]), window=window)[0, -1]
            tokens.append(int(logits.argmax()))
    return tokens[len(prompt):]


def greedy_decoder(model, context_length, use_compile=False, batch_size=1):
    return Decoder(model, context_length, batch_size, Sampling(temperature=0.0), Sampler(torch.device("cpu"), 0),
                   use_compile=use_compile)


def greedy_with_cache(model, prompt, steps, context_length, use_compile=False):
    decoder = greedy_decoder(model, context_length, use_compile)
    with torch.inference_mode():
        token = decoder.first_token(decoder.prefill(torch.tensor([prompt])))
        out = [int(token)]
        for _ in range(steps - 1):
            token = decoder.step(token)
            out.append(int(token))
    return out


# ----------------------------------------------------------------------------- the documentation's pages


def read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


# Every page of the documentation by its path from the root: README.md first, then docs/*.md in order.
_DOCS = os.path.join(ROOT, "docs")
PAGES = {"README.md": read_text(os.path.join(ROOT, "README.md"))} | {
    f"docs/{name}": read_text(os.path.join(_DOCS, name)) for name in sorted(os.listdir(_DOCS)) if name.endswith(".md")}


def section(heading: str) -> str:
    """From the heading that starts with `heading` to the next heading, on the first page that has it."""
    for text in PAGES.values():
        start = re.search(rf"^{re.escape(heading)}.*\n", text, re.MULTILINE)
        if start:
            end = re.compile(r"^#", re.MULTILINE).search(text, start.end())
            return text[start.start() : end.start() if end else None]
    raise AssertionError(f"no page has a heading {heading!r}")


def table(text: str) -> list[list[str]]:
    """The body rows of the first Markdown table in text, as lists of cell strings."""
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row] for row in rows[2:]]  # past the header and the rule


def tiktoken_vocabulary(name: str, monkeypatch) -> int:
    """An encoding's vocabulary as tiktoken declares it, without downloading its rank file."""
    import tiktoken_ext.openai_public as public

    monkeypatch.setattr(public, "load_tiktoken_bpe", lambda *args, **kwargs: {})
    spec = getattr(public, name)()
    return spec.get("explicit_n_vocab") or max(spec["special_tokens"].values()) + 1


def model_shapes() -> list[tuple[str, GPTConfig, str, str]]:
    """The suggested shapes: name, the config the row describes, its written parameter count and its --model
    name."""
    shapes = []
    for name, vocabulary, width, heads, layers, parameters, _, flag in table(section("## Suggested model shapes")):
        config = GPTConfig(vocabulary_size=int(vocabulary.replace(",", "")), embedding_dimensions=int(width),
                           num_attention_heads=int(heads), num_hidden_layers=int(layers))
        shapes.append((name, config, parameters, flag.strip("`")))
    return shapes


# ----------------------------------------------------------------------------- torchrun


def launch(nproc, argv, timeout=240, script="pretrain.py"):
    """Run a trainer under torchrun (or plainly for one process); returns the finished process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if nproc == 1:
        command = [sys.executable, script, *argv]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   script, *argv]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def check(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def losses(stdout):
    return [float(line.split("cross-entropy ")[1].split(",")[0]) for line in stdout.splitlines()
            if "cross-entropy" in line]


def whole(path):
    """A pretrain checkpoint's whole state; a sharded one (the default at levels 2 and 3) consolidated first,
    into a file beside it."""
    from checkpoint import load_checkpoint
    from sharded_checkpoint import consolidate, is_sharded

    state = load_checkpoint(str(path), "pretrain", required=())
    if not is_sharded(state):
        return state
    one = f"{path}.whole-{os.getpid()}-{time.monotonic_ns()}.pt"
    consolidate(str(path), state, one)
    return load_checkpoint(one, "pretrain")
