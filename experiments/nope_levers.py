"""How fast a NoPE model learns at small scale, lever by lever: every variant trains for a fixed budget on the
builtin corpus (byte tokens, offline) and is scored by one evaluation, so each row of the table differs from
the baseline by what its line says.

    python experiments/nope_levers.py                                 # the default list below
    python experiments/nope_levers.py "nope" "rope: position_encoding=rope" "bos: start_token=1"
    python experiments/nope_levers.py --steps 500 --jobs 2 --output_path runs/levers "nope" "lr1e-2: lr=1e-2"

A variant is `name: key=value, key=value` (a bare name is the baseline). Keys: any GPTConfig field
(num_hidden_layers, embedding_dimensions, num_attention_heads, feed_forward_ratio, dropout,
position_encoding, ...) and the training keys in TRAINING below (lr, warmup, schedule, optimizer, steps,
batch, window, start_token, seed, ...). The baseline is nanoGPT's documented CPU recipe shape and budget:
4 layers, 4 heads, width 128, 64-byte windows, batch 12, 2,000 steps.

The evaluation: mean cross-entropy in nats per byte over the same 200 windows of the test stream (starts
spread evenly, the same for every variant), each window scored whole at 64 and at 256 bytes; a variant
trained with a start token has it before each test window, as it had one at the start of each training
window. Prints a Markdown table (and writes results.json and the sampled text under --output_path).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, fields, replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from adafactor import Adafactor  # noqa: E402
from data import eot_id, load_encoding, open_tokens, prepare_token_files, window_batch  # noqa: E402
from model import INITIALISATIONS, GPT, GPTConfig  # noqa: E402
from training import learning_rate_at  # noqa: E402

DEFAULT_VARIANTS = (
    "nope",
    "rope: position_encoding=rope",
    "alibi: position_encoding=alibi",
    "learned: position_encoding=learned",
)
SAMPLE_PROMPT = "The class statement"


@dataclass(frozen=True)
class Training:
    """A variant's training settings (the model's are GPTConfig fields)."""
    steps: int = 2000
    batch: int = 12
    window: int = 64
    lr: float = 3e-2
    warmup: int = 100
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    optimizer: str = "adafactor"  # or adamw
    beta2: float = 0.99  # AdamW's
    weight_decay: float = 0.0
    rms_decay: float = -0.8  # Adafactor's
    beta1: float = 0.0  # Adafactor's momentum (0: none, torch's Adafactor)
    eps2: float = 1e-3  # Adafactor's floor of a weight's RMS in its relative step size (torch's default)
    start_token: int = 0  # 1: end-of-text replaces the first input byte of every window
    init: str = "gpt2"  # or zero_qk (every head starts uniform: the counting signal from step 0), zero_proj
    embedding_std: float = 0.02  # the token embeddings' initial standard deviation (GPT-2's 0.02)
    qk_norm: int = 0  # 1: RMSNorm on each head's queries and keys (a learned gain each)
    head_temperature: int = 0  # 1: a learned scale of each head's attention logits, from 1
    seed: int = 0
    long_window: int = 0  # > 0: windows of this many bytes from step long_from x steps on (a length curriculum)
    long_from: float = 0.75


TRAINING = tuple(f.name for f in fields(Training))
BASE_MODEL = dict(vocabulary_size=257, embedding_dimensions=128, num_attention_heads=4, num_hidden_layers=4,
                  feed_forward_ratio=4, dropout=0.0)


def parse_variant(text: str, defaults: Training) -> tuple[str, GPTConfig, Training]:
    name, _, settings = text.partition(":")
    model, training = dict(BASE_MODEL), {}
    config_fields = {f.name: f.type for f in fields(GPTConfig)}
    for item in filter(None, (s.strip() for s in settings.replace(",", " ").split())):
        key, _, value = item.partition("=")
        if key in config_fields:
            model[key] = value if key == "position_encoding" else type(getattr(GPTConfig(), key))(float(value))
        elif key in TRAINING:
            kind = type(getattr(defaults, key))
            training[key] = value if kind is str else kind(float(value))
        else:
            raise SystemExit(f"variant {name!r}: unknown key {key!r} (GPTConfig fields or {', '.join(TRAINING)})")
    train = replace(defaults, **training)
    if model.get("position_encoding") == "learned" and "max_position_embeddings" not in model:
        # as nanoGPT's block_size: the longest training window; one more with a start token, which the
        # evaluation puts before a whole window (that last position is never trained)
        model["max_position_embeddings"] = max(train.window, train.long_window) + train.start_token
    return name.strip(), GPTConfig(**model), train


@dataclass(frozen=True)
class Evaluation:
    """What every variant is scored on, and where the builtin corpus's token files are."""
    lengths: tuple[int, ...] = (64, 256)
    windows: int = 200
    dataset_path: str = os.path.join(ROOT, "datasets")


def tokens(dataset_path: str) -> tuple[np.ndarray, np.ndarray, int]:
    files = prepare_token_files("builtin", None, "bytes", dataset_path, 1)
    return open_tokens(files.train, files.meta), open_tokens(files.test, files.meta), eot_id(load_encoding("bytes"))


def optimizer_for(model: GPT, t: Training):
    if t.optimizer == "adamw":
        decay = [p for p in model.parameters() if p.dim() >= 2]
        rest = [p for p in model.parameters() if p.dim() < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                  {"params": rest, "weight_decay": 0.0}], lr=t.lr, betas=(0.9, t.beta2))
    return Adafactor(model.parameters(), lr=t.lr, beta2_decay=t.rms_decay, eps=(None, t.eps2),
                     weight_decay=t.weight_decay, beta1=t.beta1)


@torch.no_grad()
def initialised(config: GPTConfig, init: str) -> GPT:
    """The model with one of its own initialisations (gpt2, zero_proj: GPT(config, init)), or with GPT-2's
    and queries and keys at zero (zero_qk: every head averages its whole prefix at first)."""
    if init not in (*INITIALISATIONS, "zero_qk"):
        raise SystemExit(f"unknown init {init!r}: {', '.join(INITIALISATIONS)} or zero_qk")
    model = GPT(config, init="gpt2" if init == "zero_qk" else init)
    if init == "zero_qk":
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * config.embedding_dimensions].zero_()
    return model


class QKLever(nn.Module):
    """QK normalisation and per-head temperature, applied to the output of an attention's fused qkv
    projection (a forward hook), so the experiment needs no switch in model.py: both are position-free."""

    def __init__(self, n_head: int, head_dim: int, qk_norm: bool, temperature: bool):
        super().__init__()
        self.n_head, self.head_dim = n_head, head_dim
        self.q_norm = nn.RMSNorm(head_dim) if qk_norm else None
        self.k_norm = nn.RMSNorm(head_dim) if qk_norm else None
        self.log_temperature = nn.Parameter(torch.zeros(n_head)) if temperature else None

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        B, T, _ = qkv.shape
        q, k, v = qkv.view(B, T, 3, self.n_head, self.head_dim).unbind(2)  # 3 x (B, T, n_head, head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.log_temperature is not None:
            q = q * self.log_temperature.exp()[:, None]  # (n_head, 1): each head's logits scaled
        return torch.stack([q, k, v], dim=2).view(B, T, -1)


def add_qk_levers(model: GPT, qk_norm: bool, temperature: bool) -> None:
    if not (qk_norm or temperature):
        return
    for block in model.blocks:
        attn = block.attn
        attn.lever = QKLever(attn.n_head, attn.head_dim, qk_norm, temperature)  # its parameters train too
        attn.qkv.register_forward_hook(lambda module, inputs, output, lever=attn.lever: lever(output))


def batch(train: np.ndarray, t: Training, generator: torch.Generator, eot: int,
          step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    window = t.long_window if t.long_window and step >= t.long_from * t.steps else t.window
    starts = torch.randint(0, len(train) - window - 1, (t.batch,), generator=generator).tolist()
    return window_batch(train, starts, window, eot if t.start_token else None)  # pretrain.py's windows


@torch.no_grad()
def evaluate(model: GPT, test: np.ndarray, length: int, start_token: bool, eot: int, windows: int = 200) -> float:
    """Mean cross-entropy (nats per byte) over `windows` fixed windows of the test stream, each scored whole."""
    if model.config.position_encoding == "learned" and length + start_token > model.config.max_position_embeddings:
        return float("nan")  # learned positions stop at the trained length
    model.eval()
    starts = np.linspace(0, len(test) - length - 1, windows).round().astype(np.int64)
    total, count = 0.0, 0
    for i in range(0, windows, 50):
        chunk = np.stack([test[s : s + length + 1] for s in starts[i : i + 50]]).astype(np.int64)
        x, y = torch.from_numpy(chunk[:, :-1]), torch.from_numpy(chunk[:, 1:])
        if start_token:  # the start token before the window; its own prediction is not scored
            x = torch.cat([torch.full((len(x), 1), eot), x], dim=1)
            y = torch.cat([torch.full((len(y), 1), -100), y], dim=1)
        n = (y != -100).sum().item()
        total += model(x, y).item() * n
        count += n
    model.train()
    return total / count


@torch.no_grad()
def sample(model: GPT, start_token: bool, eot: int, tokens: int = 160, seed: int = 0) -> str:
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    ids = ([eot] if start_token else []) + list(SAMPLE_PROMPT.encode())
    limit = model.config.max_position_embeddings if model.config.position_encoding == "learned" else 256
    for _ in range(tokens):
        logits = model(torch.tensor([ids[-limit:]]))[0, -1]
        nxt = torch.multinomial(torch.softmax(logits / 0.8, dim=-1), 1, generator=generator).item()
        if nxt == eot:
            break
        ids.append(nxt)
    model.train()
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def run(variant: str, defaults: Training, scoring: Evaluation) -> dict:
    torch.set_num_threads(1)
    name, config, t = parse_variant(variant, defaults)
    train, test, eot = tokens(scoring.dataset_path)
    torch.manual_seed(t.seed)
    model = initialised(config, t.init)
    if t.embedding_std != Training.embedding_std:  # else the model's own draw stands
        torch.nn.init.normal_(model.token_embeddings.weight, std=t.embedding_std)
    add_qk_levers(model, bool(t.qk_norm), bool(t.head_temperature))
    optimizer = optimizer_for(model, t)
    generator = torch.Generator().manual_seed(t.seed)
    curve, started = [], time.perf_counter()
    for step in range(t.steps):
        lr = learning_rate_at(step, t.steps, t.lr, t.warmup, t.schedule, t.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = batch(train, t, generator, eot, step)
        loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == t.steps - 1:
            curve.append((step, loss.item()))
    seconds = time.perf_counter() - started
    losses = {L: evaluate(model, test, L, bool(t.start_token), eot, scoring.windows) for L in scoring.lengths}
    return {"name": name, "variant": variant, "parameters": model.num_parameters(), "losses": losses,
            "ms_per_step": 1000 * seconds / t.steps, "curve": curve,
            "sample": sample(model, bool(t.start_token), eot)}


def table(results: list[dict], eval_lengths: tuple[int, ...]) -> str:
    head = "| variant | settings | parameters | " + " | ".join(f"{L}-byte loss" for L in eval_lengths)
    lines = [head + f" | {eval_lengths[-1]} - {eval_lengths[0]} | ms/step |",
             "|---|---|---|" + "---|" * len(eval_lengths) + "---|---|"]
    for r in results:
        cells = ["—" if math.isnan(r["losses"][L]) else f"{r['losses'][L]:.3f}" for L in eval_lengths]
        gap = r["losses"][eval_lengths[-1]] - r["losses"][eval_lengths[0]]
        settings = r["variant"].partition(":")[2].strip() or "baseline"
        lines.append(f"| {r['name']} | {settings} | {r['parameters'] / 1e6:.2f}M | " + " | ".join(cells)
                     + f" | {'—' if math.isnan(gap) else f'{gap:+.3f}'} | {r['ms_per_step']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="*", default=list(DEFAULT_VARIANTS), help="name: key=value, ... (see above)")
    p.add_argument("--steps", type=int, default=Training.steps, help="optimizer steps of every variant")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="variants trained at once")
    p.add_argument("--eval_lengths", default="64,256", help="window lengths the evaluation scores")
    p.add_argument("--eval_windows", type=int, default=Evaluation.windows, help="test windows scored at each length")
    p.add_argument("--dataset_path", default=Evaluation.dataset_path, help="where the builtin token files go")
    p.add_argument("--output_path", default=os.path.join(ROOT, "runs", "nope_levers"))
    args = p.parse_args(argv)
    lengths = tuple(int(L) for L in args.eval_lengths.split(","))
    scoring = Evaluation(lengths, args.eval_windows, args.dataset_path)
    defaults = Training(steps=args.steps)
    for v in args.variants:
        parse_variant(v, defaults)  # every line checked before anything trains
    tokens(args.dataset_path)  # the token files, made once before the workers read them
    os.makedirs(args.output_path, exist_ok=True)
    results = []
    with ProcessPoolExecutor(args.jobs) as pool:  # each row printed and saved as soon as its variant is done
        futures = {pool.submit(run, v, defaults, scoring): v for v in args.variants}
        for future in as_completed(futures):
            try:
                results.append(future.result())
            except Exception as e:  # one broken variant does not cost the others' results
                print(f"{futures[future]}: failed: {type(e).__name__}: {e}", flush=True)
                continue
            print(table(results[-1:], lengths).splitlines()[-1], flush=True)
            with open(os.path.join(args.output_path, "results.json"), "w") as f:
                json.dump(results, f, indent=1)
    order = {v: i for i, v in enumerate(args.variants)}
    results.sort(key=lambda r: order[r["variant"]])
    print()
    print(table(results, lengths))
    print()
    for r in results:
        print(f"{r['name']}: {r['sample']!r}")
    return results


if __name__ == "__main__":
    main()
