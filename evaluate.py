"""Evaluate a LightGPT checkpoint at several context lengths: how far past its training length does a
model without positional embeddings (NoPE) keep predicting well?

    python evaluate.py --checkpoint_path ./checkpoints/quickstart.pt --device cpu   # 0.5x ... 4x the training length
    python evaluate.py --context_lengths 512,1024,4096 --windows 128                 # lengths of your choice
    python evaluate.py --lora_path ./checkpoints/lora_instruction.pt                 # an instruction-tuned model

For each context length L it scores --windows windows of L + 1 test tokens (inputs and targets shifted
by one): half start right after an end-of-text token (a document boundary, as every training document
began), half at random offsets. It reports the perplexity at L, exp(mean loss over every position of
every window), and the loss at each position 0 ... L-1 averaged over the windows. The corpus is the
test split of the checkpoint's own corpus and tokenizer unless --dataset/--token_encoding say otherwise
(tokenized as pretrain.py does, reusing its token files). Writes results.json, results.csv,
loss_by_position.csv, perplexity.png and loss_by_position.png into --output_path, and the same numbers as
TensorBoard scalars there.

With --tasks it runs benchmarks instead, through EleutherAI's lm-evaluation-harness (the optional `lm-eval`
package; harness.py is LightGPT's model class for it):

    python evaluate.py --checkpoint_path ./exports/quickstart --tasks hellaswag,arc_easy --device cuda
    python evaluate.py --tasks mytask --include_path ./my_tasks --limit 100   # task YAMLs of your own

and writes lm_eval_results.json and the scores as TensorBoard scalars into --output_path.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from common import (
    ArgumentParser,
    UserError,
    add_model_path_args,
    add_system_args,
    autocast,
    non_negative_int,
    positive_int,
    precision_name,
    resolve_device,
    run_main,
)
from data import corpus_subset, open_tokens, prepare_token_files
from files import atomic_path, check_writable
from generate import Loaded, inference_model, model_tokenizer
from model import GPT

DEFAULT_MULTIPLES = "0.5,1,1.5,2,3,4"
LOGITS_BUDGET = 1 << 28  # logits elements one forward may produce (1 GiB in fp32): longer windows go fewer at a time
LOSS_CHUNK = 1 << 24  # logits elements turned into fp32 log-probabilities at a time
TENSORBOARD_POINTS = 256  # loss-by-position scalars written per length, evenly spaced


def comma_list(kind, name, check):
    """An argparse type for a comma-separated list of numbers, each of which passes `check`."""

    def parse(text: str):
        try:
            values = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {name}, got {text!r}") from None
        if not values or not all(check(v) for v in values):
            raise argparse.ArgumentTypeError(f"expected comma-separated {name}, got {text!r}")
        return values

    parse.__name__ = f"comma-separated {name}"
    return parse


positive_ints = comma_list(int, "positive integers", lambda v: v > 0)
positive_floats = comma_list(float, "positive numbers", lambda v: 0 < v < float("inf"))


def parse_args(argv=None):
    p = ArgumentParser(description="Perplexity and loss by position of a LightGPT checkpoint at several "
                                   "context lengths.")
    add_model_path_args(p, "evaluate the instruction-tuned model")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None, help="the corpus whose test split is scored, as pretrain.py takes "
                   "it (default: the checkpoint's pretraining corpus)")
    g.add_argument("--dataset_subset", default=None, help="subset of a hub dataset (default: the checkpoint's "
                   "when --dataset is, else as pretrain.py: sample-10BT for FineWeb)")
    g.add_argument("--token_encoding", default=None, help="the tokenizer (default: the checkpoint's)")
    g.add_argument("--dataset_path", default="./datasets", help="folder for the token files")
    g.add_argument("--num_dataset_processes", type=positive_int, default=8,
                   help="workers for loading and tokenizing the corpus (first use only)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--context_lengths", type=positive_ints, default=None,
                   help="comma-separated context lengths in tokens (default: --multiples x the training length)")
    g.add_argument("--multiples", type=positive_floats, default=positive_floats(DEFAULT_MULTIPLES),
                   help=f"comma-separated multiples of the training length, when --context_lengths is not given "
                        f"(default: {DEFAULT_MULTIPLES})")
    g.add_argument("--training_length", type=positive_int, default=None,
                   help="the context length the model was trained at (default: the checkpoint's "
                        "tokens_per_sample, or max_tokens_per_sample for an instruction-tuned one)")
    g.add_argument("--windows", type=positive_int, default=64,
                   help="windows per context length, half at document boundaries, half at random offsets "
                        "(at most one per start offset in the test split)")
    g.add_argument("--batch_size", type=positive_int, default=8,
                   help="windows per forward pass (fewer for long windows, to bound the logits' memory)")
    g.add_argument("--output_path", default="./runs/evaluate",
                   help="folder for the results (JSON, CSV, PNG) and TensorBoard scalars")
    g = p.add_argument_group("benchmarks (lm-evaluation-harness, instead of the context-length sweep)")
    g.add_argument("--tasks", type=task_list, default=None,
                   help="comma-separated lm-eval tasks, e.g. hellaswag,arc_easy,piqa,lambada_openai (needs lm-eval)")
    g.add_argument("--num_fewshot", type=non_negative_int, default=None,
                   help="examples in each prompt (default: each task's own, mostly 0)")
    g.add_argument("--limit", type=positive_int, default=None, help="score only this many examples of each task")
    g.add_argument("--include_path", default=None, help="a folder of lm-eval task YAML files to add to its own")
    g.add_argument("--max_length", type=positive_int, default=None,
                   help="tokens a request is scored in (default: the training length, else 1024)")
    add_system_args(g, compile_help=None, seed_default=0, seed_help="seed of the random window offsets")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- windows


def task_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated lm-eval task names, got {text!r}")
    return names


task_list.__name__ = "a task list"


def check_windows(n_tokens: int, length: int, windows: int) -> None:
    """A window of length + 1 tokens fits the test split, and at most one window per start offset is asked
    for: more would only repeat windows, and the offsets are drawn (and kept) up front."""
    offsets = n_tokens - length  # distinct windows of length + 1 tokens
    if offsets < 1:
        raise UserError(f"--context_lengths: the test split holds {n_tokens:,} tokens, too few for a window of "
                        f"{length:,} + 1; use shorter lengths or a larger corpus")
    if windows > offsets:
        raise UserError(f"--windows: the test split holds {n_tokens:,} tokens, so {offsets:,} distinct windows of "
                        f"{length:,} + 1 tokens; ask for at most that many, not {windows:,}")


def window_starts(tokens: np.ndarray, boundaries: np.ndarray, length: int, windows: int,
                  rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Start offsets of windows of length + 1 tokens: about half at the start of a document, 0 or right
    after an end-of-text token (`boundaries` holds those positions; drawn without repeats, as many as
    there are documents far enough from the end), the rest at uniformly random offsets."""
    check_windows(len(tokens), length, windows)
    last = len(tokens) - (length + 1)  # the last offset a whole window starts at
    fits = boundaries[boundaries <= last]
    boundary = rng.choice(fits, size=min((windows + 1) // 2, len(fits)), replace=False) if len(fits) else fits
    random = rng.integers(0, last + 1, size=windows - len(boundary))
    return sorted(int(s) for s in boundary), sorted(int(s) for s in random)


# ----------------------------------------------------------------------------- losses


def token_losses(model: GPT, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, L) cross-entropy of every target. One plain causal forward over the whole window: scoring
    known tokens is a prefill, and a prefill through the KV cache is this same computation plus writing
    the cache, which only decoding token by token pays back. So the plain forward is the faster path."""
    B, L = x.shape
    with autocast(device):
        logits = model(x)  # (B, L, V): bf16 on CUDA, fp32 elsewhere
    V = logits.size(-1)
    step = max(1, LOSS_CHUNK // (B * V))  # positions per fp32 log-softmax, so no (B, L, V) fp32 copy is made
    return torch.cat([
        F.cross_entropy(logits[:, i : i + step].float().reshape(-1, V), y[:, i : i + step].reshape(-1),
                        reduction="none").view(B, -1)
        for i in range(0, L, step)
    ], dim=1)


def evaluate_lengths(model: GPT, tokens: np.ndarray, eot: int, lengths: list[int], windows: int, batch_size: int,
                     device: torch.device, seed: int = 0, progress=None, start_token: bool = False) -> dict[int, dict]:
    """For each context length: the perplexity and the loss by position over `windows` windows of the
    token array (see window_starts), the model in eval mode on `device`. Returns {length: results}, each
    with perplexity, loss, windows, boundary_windows, tokens, loss_by_position (every window),
    boundary_loss_by_position and random_loss_by_position (None when there are no such windows), and the
    window starts. `progress` (a tqdm) is advanced by one per window. start_token: each window is read
    after an end-of-text, as a model pretrained with --start_token eot saw its windows (its first token's
    own prediction is not scored, so every window still scores L targets)."""
    # A document starts at 0 (a split holds whole documents) and after each end-of-text token.
    boundaries = np.concatenate([[0], np.flatnonzero(np.asarray(tokens) == eot) + 1])
    vocabulary = model.config.vocabulary_size
    results = {}
    for length in lengths:
        rng = np.random.default_rng([seed, length])  # the same windows for a length, whatever else is asked
        boundary, random = window_starts(tokens, boundaries, length, windows, rng)
        rows = max(1, min(batch_size, LOGITS_BUDGET // (length * vocabulary)))
        sums = {}
        for kind, starts in (("boundary", boundary), ("random", random)):
            total = torch.zeros(length, dtype=torch.float64, device=device)
            for i in range(0, len(starts), rows):
                chunk = starts[i : i + rows]
                w = torch.from_numpy(np.stack([tokens[s : s + length + 1] for s in chunk]).astype(np.int64))
                w = w.to(device)  # (B, L + 1)
                x, y = w[:, :-1], w[:, 1:]
                if start_token:  # (B, L + 1) inputs: end-of-text first; its prediction (of w[:, 0]) dropped
                    x, y = torch.cat([torch.full_like(w[:, :1], eot), x], dim=1), w
                with torch.no_grad():
                    losses = token_losses(model, x, y, device)[:, -length:]  # (B, L)
                    total += losses.sum(0, dtype=torch.float64)
                if progress is not None:
                    progress.update(len(chunk))
            sums[kind] = total.cpu()
        n = len(boundary) + len(random)
        by_position = (sums["boundary"] + sums["random"]) / n
        loss = by_position.mean().item()
        results[length] = {
            "perplexity": math.exp(loss),
            "loss": loss,
            "windows": n,
            "boundary_windows": len(boundary),
            "tokens": n * length,
            "loss_by_position": by_position.tolist(),
            "boundary_loss_by_position": (sums["boundary"] / len(boundary)).tolist() if boundary else None,
            "random_loss_by_position": (sums["random"] / len(random)).tolist() if random else None,
            "boundary_starts": boundary,
            "random_starts": random,
        }
    return results


# ----------------------------------------------------------------------------- set-up


def load_model(args, device: torch.device) -> tuple[GPT, dict, dict | None]:
    """The model to evaluate (a LoRA merged into its base), eval mode on the device, bf16 weights where
    bf16 is native; and the checkpoint states, for their records."""
    return inference_model(args.checkpoint_path, device, args.lora_path)


def saved_args(state: dict) -> dict:
    return state["args"] if isinstance(state.get("args"), dict) else {}


def corpus(args, state: dict) -> tuple[str, str | None, str]:
    """--dataset, its subset and --token_encoding, each defaulting to what the (base) checkpoint was
    pretrained on."""
    encoding = args.token_encoding or state["token_encoding"]
    dataset, subset = args.dataset, args.dataset_subset
    saved = saved_args(state)
    recorded = saved.get("dataset") if isinstance(saved.get("dataset"), str) and "tokens_per_sample" in saved else None
    if dataset is None:
        if recorded is None:
            raise UserError(f"--dataset: {args.checkpoint_path} does not record the corpus it was pretrained on "
                            f"(an instruction-tuned or older checkpoint); pass --dataset")
        dataset = recorded
    if subset is None and dataset == recorded and isinstance(saved.get("dataset_subset"), str):
        subset = saved["dataset_subset"]  # the checkpoint's corpus: its subset too
    return dataset, corpus_subset(dataset, subset), encoding  # pretrain.py's rule, FineWeb's default included


def training_length(args, state: dict, lora: dict | None) -> int | None:
    """--training_length, else what the checkpoint records: the instruction tuning's row length for a LoRA
    or merged checkpoint, the pretraining sample length otherwise."""
    if args.training_length is not None:
        return args.training_length
    for saved in (saved_args(lora), saved_args(state)) if lora is not None else (saved_args(state),):
        for key in ("max_tokens_per_sample", "tokens_per_sample"):
            value = saved.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def context_lengths(args, trained: int | None) -> list[int]:
    if args.context_lengths is not None:
        return sorted(set(args.context_lengths))
    if trained is None:
        raise UserError(f"--context_lengths: {args.checkpoint_path} does not record its training length; pass "
                        f"--context_lengths or --training_length")
    return sorted({max(1, round(m * trained)) for m in args.multiples})


def test_tokens(args, state: dict, model: GPT) -> tuple[np.ndarray, dict, tuple[str, str | None, str]]:
    """The test split's tokens (made as pretrain.py makes them, or reused), checked against the model."""
    dataset, subset, encoding = corpus(args, state)
    files = prepare_token_files(dataset, subset, encoding, args.dataset_path, args.num_dataset_processes)
    meta = files.meta
    if meta["vocabulary_size"] > model.config.vocabulary_size or meta["eot_id"] != state["eot_id"]:
        raise UserError(f"--token_encoding {encoding}: its vocabulary ({meta['vocabulary_size']:,} tokens, end-of-text "
                        f"{meta['eot_id']}) is not the model's ({model.config.vocabulary_size:,}, end-of-text "
                        f"{state['eot_id']}); use the checkpoint's, {state['token_encoding']}")
    return open_tokens(files.test, meta), meta, (dataset, subset, encoding)


# ----------------------------------------------------------------------------- outputs


def write_results(path: str, record: dict, results: dict[int, dict], trained: int | None) -> None:
    """results.json (everything), results.csv (one row per length) and loss_by_position.csv (one row per
    length and position), each written atomically."""
    rows = [{"length": L, "multiple": round(L / trained, 4) if trained else "", **{k: r[k] for k in
             ("perplexity", "loss", "windows", "boundary_windows", "tokens")}} for L, r in results.items()]
    with atomic_path(os.path.join(path, "results.json")) as tmp, open(tmp, "w") as f:
        json.dump({**record, "results": [{**row, **{k: v for k, v in results[row["length"]].items() if k not in row}}
                                         for row in rows]}, f, indent=1)
    with atomic_path(os.path.join(path, "results.csv")) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with atomic_path(os.path.join(path, "loss_by_position.csv")) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("length", "position", "loss", "boundary_loss", "random_loss"))
        for L, r in results.items():
            b, o = r["boundary_loss_by_position"], r["random_loss_by_position"]
            for t, loss in enumerate(r["loss_by_position"]):
                writer.writerow((L, t, f"{loss:.6f}", f"{b[t]:.6f}" if b else "", f"{o[t]:.6f}" if o else ""))


def smoothed(values: list[float]) -> np.ndarray:
    """A running mean over about 1/64 of the positions, so the plot shows the trend, not the noise of a
    few dozen windows per position."""
    k = max(1, len(values) // 64)
    padded = np.concatenate([np.full(k - 1, values[0]), values])
    return np.convolve(padded, np.ones(k) / k, mode="valid")


def write_plots(path: str, results: dict[int, dict], trained: int | None, title: str) -> list[str]:
    """perplexity.png and loss_by_position.png, with the training length marked. Skipped, with a note,
    where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print("note: matplotlib is not installed (pip install matplotlib); skipping the PNG plots")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = list(results)
    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lengths, [results[L]["perplexity"] for L in lengths], marker="o")
    ax.set(xscale="log", xlabel="context length (tokens)", ylabel="test perplexity", title=title)
    ax.set_xticks(lengths, [str(L) for L in lengths])
    ax.minorticks_off()
    if trained:
        ax.axvline(trained, color="gray", linestyle="--", label=f"training length {trained}")
        ax.legend()
    ax.grid(alpha=0.3)
    written.append(save_figure(fig, os.path.join(path, "perplexity.png")))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for L in lengths:
        ax.plot(range(L), smoothed(results[L]["loss_by_position"]), label=f"L={L}", linewidth=1)
    if trained:
        ax.axvline(trained, color="gray", linestyle="--", label=f"training length {trained}")
    ax.set(xlabel="position in the window", ylabel="test loss (nats, running mean)", title=title)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    written.append(save_figure(fig, os.path.join(path, "loss_by_position.png")))
    return written


def save_figure(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write_tensorboard(path: str, results: dict[int, dict]) -> None:
    """eval/perplexity at step = length, and eval/loss_by_position/L<length> at step = position (at most
    TENSORBOARD_POINTS positions per length)."""
    scalars = []
    for L, r in results.items():
        scalars.append(("eval/perplexity", r["perplexity"], L))
        scalars += [(f"eval/loss_by_position/L{L}", r["loss_by_position"][t], t)
                    for t in range(0, L, max(1, L // TENSORBOARD_POINTS))]
    write_scalars(path, scalars)


def write_scalars(path: str, scalars) -> None:
    """TensorBoard scalars into `path`: (tag, value, step) triples, or a {tag: value} dict at step 0."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # slow to import, and only needed here
    except ImportError:
        print("note: tensorboard is not installed (pip install tensorboard); skipping the TensorBoard scalars")
        return
    writer = SummaryWriter(path)
    try:
        for tag, value, step in (((k, v, 0) for k, v in scalars.items()) if isinstance(scalars, dict) else scalars):
            writer.add_scalar(tag, value, global_step=step)
    finally:
        writer.close()


# ----------------------------------------------------------------------------- main


def run_benchmarks(args, device: torch.device) -> dict:
    """--tasks: lm-eval's tasks on the model, the results in --output_path (lm_eval_results.json, the scores
    as TensorBoard scalars)."""
    from harness import require_lm_eval, run_tasks, task_scores

    require_lm_eval()
    check_writable(args.output_path, "--output_path")
    model, state, lora = load_model(args, device)
    encoding, chat = model_tokenizer(model, state, lora, args.checkpoint_path, args.lora_path)
    loaded = Loaded(model, encoding, state["eot_id"], chat)
    max_length = args.max_length or training_length(args, state, lora) or 1024
    print(f"evaluating {args.lora_path or args.checkpoint_path} on {', '.join(args.tasks)} (lm-evaluation-harness; "
          f"{device.type} {precision_name(device)}; requests of at most {max_length} tokens)")
    results = run_tasks(loaded, args.tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                        include_path=args.include_path, batch_size=args.batch_size, max_length=max_length,
                        seed=args.seed, device=device)
    scores = task_scores(results)
    record = {"checkpoint_path": args.checkpoint_path, "lora_path": args.lora_path, "tasks": args.tasks,
              "num_fewshot": args.num_fewshot, "limit": args.limit, "max_length": max_length, "scores": scores,
              "n_samples": results.get("n-samples"), "versions": results.get("versions"),
              "device": device.type, "precision": precision_name(device)}
    with atomic_path(os.path.join(args.output_path, "lm_eval_results.json")) as tmp, open(tmp, "w") as f:
        json.dump(record, f, indent=2, default=str)
    write_scalars(args.output_path, {f"lm_eval/{task}/{metric}": value for task, metrics in scores.items()
                                     for metric, value in metrics.items()})
    from lm_eval.utils import make_table

    print(make_table(results))
    print(f"wrote lm_eval_results.json and TensorBoard scalars to {args.output_path}")
    return scores


def main(args) -> dict[int, dict]:
    device = resolve_device(args.device)
    if args.tasks:
        return run_benchmarks(args, device)
    model, state, lora = load_model(args, device)
    trained = training_length(args, state, lora)
    lengths = context_lengths(args, trained)
    limit = model.config.max_position_embeddings
    if model.config.position_encoding == "learned" and max(lengths) > limit:
        raise UserError(f"--context_lengths: {args.checkpoint_path} has learned positions, which stop at {limit} "
                        f"tokens; a window of {max(lengths)} is past them (ask for lengths up to {limit})")
    check_writable(args.output_path, "--output_path")
    tokens, meta, (dataset, subset, encoding) = test_tokens(args, state, model)
    for length in lengths:  # every length before any is scored
        check_windows(len(tokens), length, args.windows)
    print(f"evaluating {args.lora_path or args.checkpoint_path} on the test split of {meta['source']} "
          f"({len(tokens):,} tokens, {encoding}); {device.type} {precision_name(device)}; training length "
          f"{trained or 'unknown'}; {args.windows} windows at each of {', '.join(map(str, lengths))} tokens")
    from tqdm import tqdm

    start_token = saved_args(state).get("start_token") == "eot"  # pretrained with one: read each window after it
    with tqdm(total=args.windows * len(lengths), unit="window", desc="evaluating", disable=None) as progress:
        results = evaluate_lengths(model, tokens, state["eot_id"], lengths, args.windows, args.batch_size, device,
                                   args.seed, progress, start_token)
    record = {"checkpoint_path": args.checkpoint_path, "lora_path": args.lora_path, "dataset": dataset,
              "dataset_subset": subset, "token_encoding": encoding, "source": meta["source"],
              "test_tokens": len(tokens), "training_length": trained, "seed": args.seed, "start_token": start_token,
              "device": device.type, "precision": precision_name(device)}
    write_results(args.output_path, record, results, trained)
    name = os.path.basename((args.lora_path or args.checkpoint_path).rstrip("/"))
    write_plots(args.output_path, results, trained, f"{name} on {meta['source']}"[:80])
    write_tensorboard(args.output_path, results)
    print(f"{'length':>8} {'multiple':>8} {'perplexity':>10} {'windows':>7}")
    for L, r in results.items():
        multiple = f"{L / trained:.2f}x" if trained else "-"
        print(f"{L:>8} {multiple:>8} {r['perplexity']:>10.3f} {r['windows']:>7}")
    print(f"wrote results.json, results.csv, loss_by_position.csv, plots and TensorBoard scalars to {args.output_path}")
    return results


if __name__ == "__main__":
    run_main(main, parse_args)
