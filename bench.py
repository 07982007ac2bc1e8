"""Benchmark LightGPT: training steps, decoding and tokenization.

    python bench.py train                         # the Small shape, batch 16 x 1024 tokens, on CUDA
    python bench.py train --model medium          # a named shape (pretrain.py's --model)
    python bench.py decode                        # 256 tokens after a 16-token prompt, batch 1 and 8
    python bench.py tokenize --token_encoding r50k_base --dataset ./corpus.jsonl
    python bench.py stream --token_encoding r50k_base --dataset ./shards/   # pretrain.py --streaming's batches/s
    python bench.py pack --token_encoding bytes   # LoRA steps on the builtin conversations, packed vs padded
    python bench.py serve --device cpu --checkpoint_path ./checkpoints/quickstart.pt   # serve.py, 1/4/16 clients
    python bench.py train --device cpu --embedding_dimensions 128 --num_attention_heads 4 \\
        --num_hidden_layers 2 --batch_size 4 --tokens_per_sample 128 --compare_hf   # tiny, on a CPU

`stream` draws pretrain.py --streaming's batches (--batch_size windows of --tokens_per_sample) from --dataset
with 1, 2, 4, ... up to --num_dataset_processes tokenizer threads and counts the tokens per second the stream
delivers, against which a run's tokens/s per rank is the need. `pack` times instruction tuning's LoRA steps on the builtin conversations packed into rows (as
instruction-tune.py does) and one conversation per padded row, and counts the conversation tokens each
processes per second. `serve` sends the same --requests streaming completions from 1, 4 and 16 concurrent
clients (--clients) to serve.py in this process on a loopback port, batched (continuous batching, up to
--max_batch rows) and served one at a time (one row), and counts completion tokens per second of wall
time; `--through engine` skips HTTP and submits to engine.py directly (needs neither fastapi nor uvicorn).
Each request samples with a seed of its own, so both servings generate the same tokens. Each measurement prints one JSON object on its own line of standard output (mode, system,
tokens_per_s, peak_memory_gib, and where they apply mfu, model_tflops, ms_per_step, ms_per_token),
then a table. Model inputs are random tokens, so no tokenizer or corpus is needed except for
`tokenize`. Flags share pretrain.py's and generate.py's names. `--compare_hf` times Hugging Face
transformers' GPT-2 of the same shape beside ours (transformers is needed only for that).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

import cpu_kernels
from adafactor import Adafactor
from common import (
    ArgumentParser,
    UserError,
    add_model_args,
    add_system_args,
    autocast,
    bf16_supported,
    compile_enabled,
    first_line,
    model_config,
    non_negative_int,
    positive_float,
    positive_int,
    precision_name,
    probability,
    resolve_device,
    run_main,
    synchronize,
)
from data import VOCABULARY_SIZES
from generate import Decoder, Sampler, Sampling, add_sampling_args, base_prompt, kv_cache_bytes
from model import GPT, peak_tflops
from run_config import add_config_args, parse_with_config


def client_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return counts


DECODE_COMPILE_MODES = {"plain": "default", "autotune": "max-autotune-no-cudagraphs"}  # torch.compile modes
ATTENTION_BACKENDS = {"auto": None, "flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                      "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}


def add_serve_args(g) -> None:
    """bench.py serve's flags."""
    g.add_argument("--checkpoint_path", default=None,
                   help="serve this checkpoint (default: a random model of the shape flags, ids shown as characters)")
    g.add_argument("--lora_path", default=None, help="with --checkpoint_path: its LoRA checkpoint")
    g.add_argument("--requests", type=positive_int, default=16, help="streaming completions per measurement")
    g.add_argument("--clients", type=client_counts, default=(1, 4, 16),
                   help="concurrent clients, a comma-separated list")
    g.add_argument("--max_batch", type=positive_int, default=16, help="the batched server's rows")
    g.add_argument("--through", choices=("http", "engine"), default="http",
                   help="requests over HTTP to serve.py, or submitted to engine.py directly")
    g.add_argument("--scenario", choices=("clients", "long-prompt", "shared-prefix"), default="clients",
                   help="clients: throughput from each --clients count; long-prompt: a long prompt "
                        "arriving while 8 answers stream, prefilled whole, in chunks inside the steps and between them; "
                        "shared-prefix: requests "
                        "sharing a system prompt, prefix cache off and on")
    g.add_argument("--prefill_chunk", type=positive_int, default=None,
                   help="long-prompt: a fixed chunk size to time as well (default: only whole and the engine's auto)")
    g.add_argument("--long_prompt_tokens", type=positive_int, default=1000, help="long-prompt: its length")
    g.add_argument("--system_tokens", type=positive_int, default=200, help="shared-prefix: the system prompt's length")


def parse_args(argv=None):
    p = ArgumentParser(description="Benchmark LightGPT.")
    p.add_argument("mode", choices=("train", "decode", "tokenize", "stream", "pack", "serve"), help="what to measure")
    g = p.add_argument_group("model")
    g.add_argument("--vocabulary_size", type=positive_int, default=None,
                   help="vocabulary of the random model (default: --token_encoding's, 50,257 for r50k_base)")
    add_config_args(g, presets=True)
    add_model_args(g)
    g = p.add_argument_group("train")
    g.add_argument("--batch_size", type=positive_int, default=16, help="samples per forward pass")
    g.add_argument("--gradient_accumulation_steps", type=positive_int, default=1,
                   help="forward passes per optimizer step")
    g.add_argument("--tokens_per_sample", type=positive_int, default=1024, help="tokens per sample")
    g.add_argument("--learning_rate", type=positive_float, default=1e-2, help="Adafactor learning rate")
    g.add_argument("--low_memory_optimizer", action="store_true", help="single-tensor Adafactor updates")
    g.add_argument("--optimizer", choices=("lightgpt", "torch"), default="lightgpt",
                   help="adafactor.py, or torch.optim.Adafactor for comparison")
    g.add_argument("--momentum", type=probability, default=0.9,
                   help="adafactor.py's momentum, as pretrain.py's default; --optimizer torch has none")
    g.add_argument("--activation_checkpointing", action="store_true",
                   help="recompute block activations in backward")
    g.add_argument("--iterations", type=positive_int, default=10, help="timed steps (train) or generations (decode)")
    g.add_argument("--warmup_iterations", type=non_negative_int, default=3,
                   help="untimed steps first (compilation, allocator)")
    g.add_argument("--peak_tflops", type=positive_float, default=None,
                   help="the device's peak for MFU (default: a table of known GPUs)")
    g = p.add_argument_group("decode")
    g.add_argument("--max_tokens", type=positive_int, default=256, help="tokens generated per sequence")
    g.add_argument("--prompt_tokens", type=positive_int, default=16, help="random prompt length")
    g.add_argument("--context_length", type=positive_int, default=1024, help="KV cache length")
    g.add_argument("--decode_batch_size", type=positive_int, default=8, help="the larger batch measured beside batch 1")
    g.add_argument("--decode_compile_mode", choices=tuple(DECODE_COMPILE_MODES), default="plain",
                   help="torch.compile of the decode step: plain, or autotune (Triton matrix products tried too)")
    add_sampling_args(g)
    g = p.add_argument_group("pack")
    g.add_argument("--rank", type=positive_int, default=8, help="LoRA rank of the instruction-tuning steps")
    add_serve_args(p.add_argument_group("serve"))
    g = p.add_argument_group("tokenize")
    g.add_argument("--dataset", default="builtin",
                   help="tokenize, stream: a local corpus (file, folder, glob), builtin, or (stream) a hub dataset")
    g.add_argument("--token_encoding", default="r50k_base", help="tiktoken encoding, bytes, or a .tiktoken file")
    g.add_argument("--num_dataset_processes", type=positive_int, default=8, help="tokenizer threads")
    g = p.add_argument_group("system")
    g.add_argument("--compare_hf", action="store_true", help="also time transformers' GPT-2 of the same shape "
                   "(serve: transformers' continuous batching, generate_batch, on a Llama of the served shape)")
    g.add_argument("--attention_backend", choices=tuple(ATTENTION_BACKENDS), default="auto",
                   help="the scaled_dot_product_attention kernel (auto: PyTorch's choice)")
    g.add_argument("--profile_path", default=None,
                   help="also profile LightGPT's timed work: print the top ops, write a Chrome trace here")
    add_system_args(g, compile_help="torch.compile (auto: on for CUDA)", seed_default=0, cpu_kernels=True)
    args = parse_with_config(p, argv)  # --config, then --model, fill the flags not given
    if args.vocabulary_size is None:
        args.vocabulary_size = VOCABULARY_SIZES.get(args.token_encoding, VOCABULARY_SIZES["r50k_base"])
    return args


# ----------------------------------------------------------------------------- helpers


def device_peak_tflops(args, device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    return peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def reset_peak_memory(device) -> None:
    """Free what earlier measurements left (reference cycles included), then restart the peak."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device) -> float:
    """Peak allocated GPU memory since the last reset, or on the CPU the process's peak resident
    memory so far (it cannot be reset, so it covers every earlier measurement of the run too)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def report(rows: list[dict], record: dict) -> None:
    rows.append(record)
    print(json.dumps(record), flush=True)


def timed(fn, iterations: int, warmup: int, device) -> list[float]:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def profile(fn, path: str, steps: int, device, label: str) -> None:
    """Run fn `steps` more times under torch.profiler; print the ops that took the most device time (CPU
    time on the CPU) and write a Chrome trace (chrome://tracing, ui.perfetto.dev) to `path`."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"profile of {steps} {label} ({sort}):", flush=True)
    print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    prof.export_chrome_trace(path)
    print(f"trace written to {path}", flush=True)


def hf_gpt2(args, device, positions: int):
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise UserError("--compare_hf needs the transformers package: pip install transformers") from None
    config = GPT2Config(vocab_size=args.vocabulary_size, n_positions=positions, n_embd=args.embedding_dimensions,
                        n_layer=args.num_hidden_layers, n_head=args.num_attention_heads,
                        n_inner=args.feed_forward_ratio * args.embedding_dimensions, resid_pdrop=args.dropout,
                        embd_pdrop=args.dropout, attn_pdrop=args.dropout)
    config._attn_implementation = "sdpa"  # PyTorch's fused attention, as ours
    return GPT2LMHeadModel(config).to(device)


# ----------------------------------------------------------------------------- train


def bench_train(args, device, rows) -> None:
    torch.manual_seed(args.seed)
    B, T = args.batch_size, args.tokens_per_sample
    x = torch.randint(0, args.vocabulary_size, (B, T), device=device)
    y = torch.randint(0, args.vocabulary_size, (B, T), device=device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    for system in ("lightgpt", "hf-gpt2") if args.compare_hf else ("lightgpt",):
        report(rows, train_one(args, device, system, x, y))


def train_one(args, device, system: str, x, y) -> dict:
    """Median time of whole optimizer steps of one system on the batch (x, y)."""
    B, T, A = args.batch_size, args.tokens_per_sample, args.gradient_accumulation_steps
    reset_peak_memory(device)
    if system == "lightgpt":
        model = GPT(model_config(args, args.vocabulary_size)).to(device)
        model.set_activation_checkpointing(args.activation_checkpointing)
        mfu_model = model
    else:
        model = hf_gpt2(args, device, T)
        if args.activation_checkpointing:
            model.gradient_checkpointing_enable()
        mfu_model = None
    model.train()
    module = torch.compile(model) if compile_enabled(args.compile, device) else model
    settings = dict(lr=args.learning_rate, foreach=not args.low_memory_optimizer)
    if args.optimizer == "lightgpt":
        optimizer = Adafactor(model.parameters(), compile=compile_enabled(args.compile, device), beta1=args.momentum,
                              **settings)
    else:
        optimizer = torch.optim.Adafactor(model.parameters(), **settings)

    def step():
        for _ in range(A):
            with autocast(device):
                loss = module(x, y) if system == "lightgpt" else module(input_ids=x, labels=x).loss
            (loss / A).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    ours = system == "lightgpt"  # the compiled CPU kernels are LightGPT's (with torch's optimizer: the norm's only)
    with cpu_kernels.for_training(args.cpu_kernels if ours else "off", device, compile_enabled(args.compile, device)) as path:
        seconds = statistics.median(timed(step, args.iterations, args.warmup_iterations, device))
        if args.profile_path and ours:
            profile(step, args.profile_path, 2, device, "training steps")
    tokens_per_s = B * T * A / seconds
    record = {"mode": "train", "system": system, "device": device_name(device), "precision": precision_name(device),
              "compiled": compile_enabled(args.compile, device), "cpu_kernels": (path or None) if ours else None,
              "activation_checkpointing": args.activation_checkpointing, "attention_backend": args.attention_backend,
              "optimizer": args.optimizer, "batch_size": B, "tokens_per_sample": T, "gradient_accumulation_steps": A,
              "parameters": sum(p.numel() for p in model.parameters()),
              "tokens_per_s": round(tokens_per_s, 1), "ms_per_step": round(seconds * 1e3, 2),
              "peak_memory_gib": round(peak_memory_gib(device), 3)}
    if mfu_model is not None:
        record["model_tflops"] = float(f"{tokens_per_s * mfu_model.flops_per_token(T) / 1e12:.4g}")
        peak = device_peak_tflops(args, device)
        record["mfu"] = float(f"{mfu_model.mfu(tokens_per_s, T, peak):.4g}") if peak else None
    return record


# ----------------------------------------------------------------------------- pack


def bench_pack(args, device, rows) -> None:
    """The same conversations two ways: packed rows (several conversations each, a block-diagonal mask)
    and one conversation per row padded to --tokens_per_sample; LoRA training steps over each, as
    instruction-tune.py takes them. Counts conversation tokens (not padding) per second."""
    from chat import ChatTokenizer, builtin_conversations, pack, padded, render_conversation
    from data import load_encoding
    from lora import LoRAConfig, add_lora

    tok = ChatTokenizer(load_encoding(args.token_encoding))
    conversations = [tuple(map(np.asarray, render_conversation(tok, c))) for c in builtin_conversations()]
    T, B = args.tokens_per_sample, args.batch_size
    for layout, make in (("packed", pack), ("padded", padded)):
        table = make(conversations, T, True, tok.pad)
        torch.manual_seed(args.seed)
        model = add_lora(GPT(model_config(args, tok.vocabulary_size)), LoRAConfig(args.rank, 1.0, 0.05),
                         (tok.base_vocabulary_size, 3)).to(device).train()
        module = torch.compile(model) if compile_enabled(args.compile, device) else model
        optimizer = Adafactor([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
        order = torch.randperm(len(table), generator=torch.Generator().manual_seed(args.seed)).tolist()
        batches = [tuple(t.to(device) for t in table.batch(order[i : i + B])) for i in range(0, len(order) - B + 1, B)]
        used = [int((x != tok.pad).sum()) for x, _, _ in batches]
        step_index = [0]

        def step():
            x, y, d = batches[step_index[0] % len(batches)]
            step_index[0] += 1
            with autocast(device):
                loss = module(x, y, d)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds = statistics.median(timed(step, args.iterations, args.warmup_iterations, device))
        tokens = statistics.mean(used)
        report(rows, {"mode": "pack", "system": layout, "device": device_name(device),
                      "precision": precision_name(device), "compiled": compile_enabled(args.compile, device),
                      "batch_size": B, "tokens_per_sample": T, "conversations": table.conversations,
                      "rows": len(table), "fill": round(sum(used) / (len(batches) * B * T), 3),
                      "tokens_per_s": round(tokens / seconds, 1), "ms_per_step": round(seconds * 1e3, 2),
                      "epoch_s": round(len(table) / B * seconds, 1)})


# ----------------------------------------------------------------------------- decode


def bench_decode(args, device, rows) -> None:
    torch.manual_seed(args.seed)
    for batch in dict.fromkeys((1, args.decode_batch_size)):
        prompt = torch.randint(0, args.vocabulary_size, (batch, args.prompt_tokens), device=device)
        for system in ("lightgpt", "hf-gpt2") if args.compare_hf else ("lightgpt",):
            report(rows, decode_one(args, device, system, prompt))


def decode_one(args, device, system: str, prompt) -> dict:
    """Median time to generate args.max_tokens tokens after `prompt` (B, P) with one system."""
    batch, P = prompt.shape
    compiled = compile_enabled(args.compile, device) and system == "lightgpt"
    reset_peak_memory(device)
    if system == "lightgpt":
        model = GPT(model_config(args, args.vocabulary_size))
        if bf16_supported(device):
            model = model.to(torch.bfloat16)
        model = model.to(device).eval()
        kv_cache_gib = float(f"{kv_cache_bytes(model, batch, args.context_length) / 2**30:.4g}")
        sampling = Sampling.from_args(args)
        decoder = Decoder(model, args.context_length, batch, sampling, Sampler(device, args.seed), compiled,
                          DECODE_COMPILE_MODES[args.decode_compile_mode])

        @torch.inference_mode()
        def run():
            token = decoder.first_token(decoder.prefill(prompt))
            for _ in range(args.max_tokens - 1):  # no host sync until the end (tokens stay on the device)
                token = decoder.step(token)
            return token
    else:
        kv_cache_gib = None
        model = hf_gpt2(args, device, P + args.max_tokens).eval()
        if bf16_supported(device):
            model = model.to(torch.bfloat16)  # the same weight precision as ours
        settings = dict(do_sample=args.temperature > 0, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens,
                        use_cache=True, pad_token_id=0)
        if args.temperature > 0:
            settings.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)

        @torch.inference_mode()
        def run():
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), **settings)

    seconds = statistics.median(timed(run, args.iterations, max(1, args.warmup_iterations), device))
    if args.profile_path and system == "lightgpt":
        root, ext = os.path.splitext(args.profile_path)
        profile(run, f"{root}-batch{batch}{ext or '.json'}", 1, device, f"generations of {args.max_tokens} tokens")
    return {"mode": "decode", "system": system, "device": device_name(device), "precision": precision_name(device),
            "compiled": compiled, "attention_backend": args.attention_backend, "batch_size": batch,
            "prompt_tokens": P, "new_tokens": args.max_tokens,
            "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
            "tokens_per_s": round(batch * args.max_tokens / seconds, 1),
            "ms_per_token": round(seconds / args.max_tokens * 1e3, 3),  # per decode step (batch tokens)
            "peak_memory_gib": round(peak_memory_gib(device), 3), "kv_cache_gib": kv_cache_gib}


# ----------------------------------------------------------------------------- serve


class _IdsAsCharacters:
    """A stand-in tokenizer for a random model: id i is the character U+0100 + i (below the surrogates
    for any vocabulary up to 55,040), so any id decodes and a text of such characters encodes back."""

    def __init__(self, vocabulary_size: int):
        if vocabulary_size > 0xD800 - 0x100:
            raise UserError(f"--vocabulary_size {vocabulary_size}: bench.py serve's random model takes at most "
                            f"{0xD800 - 0x100:,}; pass --checkpoint_path for a larger vocabulary")

    def decode_single_token_bytes(self, token: int) -> bytes:
        return chr(0x100 + token).encode()

    def encode_ordinary(self, text: str) -> list[int]:
        return [ord(c) - 0x100 for c in text]


def serving_model(args, device):
    """(the Loaded model to serve, the prompts as text): --checkpoint_path's with printable random prompts,
    or a random model of the shape flags."""
    from generate import Loaded, load_for_inference

    rng = np.random.default_rng(args.seed)
    if args.checkpoint_path:
        loaded = load_for_inference(args.checkpoint_path, device, args.lora_path)
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz     "))
        texts = ["".join(rng.choice(letters, args.prompt_tokens)) for _ in range(args.requests)]
        return loaded, texts
    encoding = _IdsAsCharacters(args.vocabulary_size)
    torch.manual_seed(args.seed)
    model = GPT(model_config(args, args.vocabulary_size))
    if bf16_supported(device):
        model = model.to(torch.bfloat16)
    loaded = Loaded(model.to(device).eval(), encoding, args.vocabulary_size - 1)
    texts = ["".join(chr(0x100 + int(i)) for i in rng.integers(0, args.vocabulary_size - 1, args.prompt_tokens))
             for _ in range(args.requests)]
    return loaded, texts


def _stream_completion(url: str, body: dict) -> int:
    """POST a streaming completion with the standard library; the completion tokens its usage reports."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    try:
        connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"the server answered {response.status}: {response.read()[:200]!r}")
        usage = None
        for line in response:
            if line.startswith(b"data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
        return usage["completion_tokens"]
    finally:
        connection.close()


def timed_request(engine, request, on_token=None) -> dict:
    """Submit a request to the engine and wait: its token count, time to first token and the gaps between
    tokens (seconds). on_token(n) is called on the engine's thread after the n-th token."""
    import threading

    times, finished, start = [], threading.Event(), time.perf_counter()

    def emit(event) -> None:
        if event.prompt is not None:
            return
        if event.token is None:
            finished.set()
            return
        times.append(time.perf_counter())
        if on_token:
            on_token(len(times))

    engine.submit(request, emit)
    finished.wait()
    return {"tokens": len(times), "ttft": times[0] - start if times else None,
            "gaps": [b - a for a, b in zip(times, times[1:])], "times": times}


def latency_record(results: list[dict]) -> dict:
    """p50 and p99 of the time to first token and of the gaps between tokens, in milliseconds."""
    def ms(values, q):
        return round(1000 * float(np.percentile(values, q)), 2) if values else None

    ttft, gaps = [r["ttft"] for r in results if r["ttft"] is not None], [g for r in results for g in r["gaps"]]
    return {"ttft_p50_ms": ms(ttft, 50), "ttft_p99_ms": ms(ttft, 99), "itl_p50_ms": ms(gaps, 50),
            "itl_p99_ms": ms(gaps, 99), "itl_max_ms": ms(gaps, 100)}


def bench_long_prompt(args, device, rows) -> None:
    """8 answers streaming when a --long_prompt_tokens prompt arrives (once each has 16 tokens): their gaps
    between tokens, all of them and while all 8 decode (steady_: the streams' own joins left out), with no long
    prompt (the control: the machine's own spread of gaps), with the long prompt prefilled whole (one call), in
    the engine's chunks inside its decode steps (mixed steps, the default) and between them, and in
    --prefill_chunk chunks if given."""
    from concurrent.futures import ThreadPoolExecutor

    from engine import Engine, Request
    from generate import Sampling

    args.requests = 9
    loaded, texts = serving_model(args, device)
    prompts = [base_prompt(loaded, t) for t in texts[:8]]
    long = base_prompt(loaded, (texts[8] * (args.long_prompt_tokens // max(1, len(texts[8])) + 1)))
    long = long[: args.long_prompt_tokens]
    context = args.long_prompt_tokens + args.max_tokens + args.prompt_tokens + 2
    greedy = Sampling(temperature=0.0)
    chunks = [("no long prompt (the control)", None, True, True), ("whole prefill", context, False, False),
              ("auto chunks in the steps", None, True, False), ("auto chunks between the steps", None, False, False)]
    chunks += [(f"chunks of {args.prefill_chunk}", args.prefill_chunk, True, False)] if args.prefill_chunk else []
    for label, chunk, mixed, control in chunks:  # control: the same 8 streams alone, the machine's own spread
        with Engine(loaded, context, 9, 16, prefill_chunk=chunk, prefix_cache=False, mixed_prefill=mixed) as engine:
            timed_request(engine, Request(prompts[0], 4, greedy))  # warm-up
            started = ThreadPoolExecutor(1)
            arrived, counts = [], [0] * 8

            def arrive(i: int, n: int) -> None:  # every stream has 16 tokens: the long prompt arrives
                counts[i] = n  # (called on the engine's thread only)
                if min(counts) >= 16 and not arrived and not control:
                    arrived.append(started.submit(timed_request, engine, Request(long, 4, greedy)))

            with ThreadPoolExecutor(8) as pool:
                results = list(pool.map(lambda i: timed_request(engine, Request(prompts[i], args.max_tokens, greedy),
                                                        lambda n, i=i: arrive(i, n)), range(8)))
            long_result = arrived[0].result() if arrived else {"ttft": None}
            started.shutdown()
        # while all 8 decode: the gaps after the last stream's first token (the streams' own joins excluded)
        decoding = max(r["times"][0] for r in results)
        steady = [{"ttft": None, "gaps": [b - a for a, b in zip(r["times"], r["times"][1:]) if a >= decoding]}
                  for r in results]
        steady = {f"steady_{k}": v for k, v in latency_record(steady).items() if k.startswith("itl")}
        report(rows, {"mode": "serve", "scenario": "long-prompt", "system": label, "device": device_name(device),
                      "streams": 8, "max_tokens": args.max_tokens, "long_prompt_tokens": len(long),
                      "long_ttft_ms": None if control else round(1000 * long_result["ttft"], 1),
                      **latency_record(results), **steady})


def bench_shared_prefix(args, device, rows) -> None:
    """--requests requests whose prompts share a --system_tokens system prompt, one after another: their time
    to first token with the prefix cache off and on."""
    from engine import Engine, Request
    from generate import Sampling

    loaded, texts = serving_model(args, device)
    system = base_prompt(loaded, (texts[0] * (args.system_tokens // max(1, len(texts[0])) + 1)))[: args.system_tokens]
    prompts = [system + loaded.encoding.encode_ordinary(t[:16]) for t in texts]
    context = args.system_tokens + 16 + args.max_tokens + 2
    for label, cache in (("prefix cache off", False), ("prefix cache on", True)):
        with Engine(loaded, context, args.max_batch, args.requests, prefix_cache=cache) as engine:
            timed_request(engine, Request(base_prompt(loaded, texts[-1][:4]), 4, Sampling(temperature=0.0)))
            results = [timed_request(engine, Request(p, args.max_tokens, Sampling(temperature=0.0))) for p in prompts]
            hits = engine.cached_tokens
        report(rows, {"mode": "serve", "scenario": "shared-prefix", "system": label, "device": device_name(device),
                      "requests": len(prompts), "system_tokens": len(system), "cached_tokens": hits,
                      **latency_record(results)})


def bench_serve(args, device, rows) -> None:
    """The same requests from each number of concurrent clients, served one at a time and batched."""
    from concurrent.futures import ThreadPoolExecutor

    from engine import Engine, Request
    from generate import Sampling

    loaded, texts = serving_model(args, device)
    sampling = Sampling.from_args(args)
    use_compile = compile_enabled(args.compile, device)
    params = sum(p.numel() for p in loaded.model.parameters())
    one_at_a_time = {}
    for system, max_batch in (("one-at-a-time", 1), ("batched", args.max_batch)):
        with contextlib.ExitStack() as stack:
            engine = stack.enter_context(Engine(loaded, args.context_length, max_batch, max(args.requests, 1),
                                                use_compile))
            if args.through == "http":
                try:
                    import serve
                except ImportError as e:
                    raise UserError(f"bench.py serve --through http needs fastapi and uvicorn ({e}); install "
                                    f"requirements.txt, or use --through engine") from None
                settings = serve.Settings("bench", args.max_tokens, sampling)
                server = stack.enter_context(serve.BackgroundServer(serve.create_app(engine, loaded, settings)))

                def one(i: int) -> int:
                    return _stream_completion(server.url, {"prompt": texts[i], "max_tokens": args.max_tokens,
                                                           "seed": args.seed + i, "stream": True,
                                                           "stream_options": {"include_usage": True}})
            else:
                prompts = [base_prompt(loaded, t) for t in texts]

                def one(i: int) -> int:
                    request = Request(prompts[i], args.max_tokens, sampling, args.seed + i, frozenset(loaded.stop))
                    return len(engine.generate(request)[0])

            one(0)  # warm-up: allocator, first compilation
            for clients in args.clients:
                with ThreadPoolExecutor(clients) as pool:
                    start = time.perf_counter()
                    tokens = sum(pool.map(one, range(args.requests)))
                    seconds = time.perf_counter() - start
                record = {"mode": "serve", "system": system, "through": args.through, "device": device_name(device),
                          "precision": precision_name(device), "compiled": use_compile, "parameters": params,
                          "clients": clients, "requests": args.requests, "max_batch": max_batch,
                          "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "tokens": tokens,
                          "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}
                if system == "one-at-a-time":
                    one_at_a_time[clients] = record
                else:
                    base = one_at_a_time[clients]
                    if base["tokens"] != tokens:
                        raise RuntimeError(f"batched serving generated {tokens} tokens, one at a time "
                                           f"{base['tokens']}: the same seeded requests must give the same tokens")
                    record["speedup"] = round(record["tokens_per_s"] / base["tokens_per_s"], 2)
                report(rows, record)
    if args.compare_hf:
        report(rows, hf_generate_batch(args, device, loaded, texts, sampling, rows))


def hf_generate_batch(args, device, loaded, texts: list[str], sampling, rows) -> dict:
    """The peer: transformers' own continuous batching (generate_batch, paged SDPA attention) on a Llama of the
    served model's shape (its width, heads, layers, vocabulary; a gated MLP of the same parameter count),
    random weights, the same prompts, the same sampling settings and token counts (no end-of-text)."""
    try:
        from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    except ImportError:
        raise UserError("--compare_hf needs the transformers package: pip install transformers") from None
    c = loaded.model.config
    config = LlamaConfig(vocab_size=c.vocabulary_size, hidden_size=c.embedding_dimensions,
                         intermediate_size=round(2 * c.feed_forward_ratio * c.embedding_dimensions / 3),
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_attention_heads, max_position_embeddings=args.context_length,
                         tie_word_embeddings=True)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(device, loaded.model.token_embeddings.weight.dtype).eval()
    model.set_attn_implementation("paged|sdpa")
    prompts = [base_prompt(loaded, t) for t in texts]
    generation = GenerationConfig(max_new_tokens=args.max_tokens, do_sample=not sampling.greedy,
                                  temperature=max(sampling.temperature, 1e-5), top_k=sampling.top_k,
                                  top_p=sampling.top_p, eos_token_id=-1, pad_token_id=0, max_batch_tokens=512)
    model.generate_batch(inputs=prompts[:2], generation_config=generation, progress_bar=False)  # warm-up
    if device.type == "cpu":  # its scheduler's thread gets the cores' OpenMP team, as our engine's does
        from engine import release_openmp_threads

        release_openmp_threads()
    start = time.perf_counter()
    out = model.generate_batch(inputs=prompts, generation_config=generation, progress_bar=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(r.generated_tokens) for r in out.values())
    ours = max((r["tokens_per_s"] for r in rows if r.get("system") == "batched"), default=None)
    return {"mode": "serve", "system": "transformers generate_batch", "through": "engine",
            "device": device_name(device), "requests": len(prompts), "max_tokens": args.max_tokens, "tokens": tokens,
            "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "lightgpt_batched_over_this": round(ours / (tokens / seconds), 2) if ours else None}


# ----------------------------------------------------------------------------- tokenize


TOKENIZE_DOCUMENTS = 20_000  # the most documents bench.py tokenize repeats a corpus to


def bench_stream(args, device, rows) -> None:
    """The stream's batches as pretrain.py --streaming draws them (one rank), by tokenizer threads: tokens
    per second after the buffer's first fill (the first --warmup_iterations batches are not timed)."""
    from data import load_encoding
    from streaming import StreamSampler, open_source

    source, encoding = open_source(args.dataset, None), load_encoding(args.token_encoding)
    workers, counts = 1, []
    while workers <= args.num_dataset_processes:
        counts.append(workers)
        workers *= 2
    for workers in counts:
        sampler = StreamSampler(source, encoding, args.tokens_per_sample, args.batch_size, seed=0,
                                buffer_tokens=1 << 20, workers=workers)
        try:
            for _ in range(args.warmup_iterations):
                sampler.next_batch()
            started, tokens = time.perf_counter(), 0
            for _ in range(args.iterations):
                tokens += sampler.next_batch()[0].numel()
            seconds = time.perf_counter() - started
        finally:
            sampler.close()
        report(rows, {"mode": "stream", "system": "lightgpt", "device": f"cpu ({os.cpu_count()} cores)",
                      "threads": workers, "encoding": args.token_encoding, "batch_size": args.batch_size,
                      "tokens_per_sample": args.tokens_per_sample, "tokens": tokens,
                      "tokens_per_s": round(tokens / seconds, 1)})


def bench_tokenize(args, device, rows) -> None:
    from data import load_encoding, resolve_corpus, write_token_files

    corpus = resolve_corpus(args.dataset, None)
    encoding = load_encoding(args.token_encoding)
    _, batches = corpus.load(args.num_dataset_processes)
    documents = [text for batch in batches for text in batch if isinstance(text, str) and text]  # as data.py skips
    characters = sum(len(d) for d in documents)
    if not characters:
        raise UserError(f"--dataset {args.dataset} holds no text to tokenize (no documents, or only empty ones)")
    # At least 4M characters, long enough to time, in at most TOKENIZE_DOCUMENTS documents: a corpus of tiny
    # documents repeated to 4M characters would be millions of Python strings and id lists (gigabytes).
    repeats = max(1, min(-(-4_000_000 // characters), TOKENIZE_DOCUMENTS // len(documents)))
    documents = documents * repeats
    batch = 1024
    threads = args.num_dataset_processes

    def raw():
        return sum(len(ids) for ids in encoding.encode_ordinary_batch(documents, num_threads=threads))

    def pipeline():
        with tempfile.TemporaryDirectory() as folder:
            batches = iter(documents[i : i + batch] for i in range(0, len(documents), batch))
            counts = write_token_files(batches, encoding,
                                       os.path.join(folder, "train.bin"), os.path.join(folder, "test.bin"),
                                       corpus.test_every, threads)
        return counts["train"]["tokens"] + counts["test"]["tokens"] - len(documents)  # without end-of-text

    tokens = raw()
    if pipeline() != tokens:
        raise RuntimeError("the pipeline and tiktoken disagree on the token count: a bug in data.py")
    results = {}
    for system, fn in (("tiktoken-batch", raw), ("lightgpt-pipeline", pipeline)):
        seconds = statistics.median(timed(fn, max(1, args.iterations // 3), 1, torch.device("cpu")))
        results[system] = tokens / seconds
        record = {"mode": "tokenize", "system": system, "device": f"cpu ({os.cpu_count()} cores)", "threads": threads,
                  "encoding": args.token_encoding, "documents": len(documents), "characters": characters * repeats,
                  "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
                  "peak_memory_gib": round(peak_memory_gib(torch.device("cpu")), 3)}
        if system == "lightgpt-pipeline":
            record["fraction_of_raw"] = round(results[system] / results["tiktoken-batch"], 3)
        report(rows, record)


# ----------------------------------------------------------------------------- main


def print_table(rows: list[dict]) -> None:
    columns = ["mode", "system", "clients", "threads", "batch_size", "tokens_per_s", "ms_per_step", "ms_per_token", "model_tflops", "mfu",
               "peak_memory_gib", "fraction_of_raw", "rows", "fill", "epoch_s", "speedup"]
    columns = [c for c in columns if any(c in r and r[c] is not None for r in rows)]
    cells = [[str(r.get(c, "") if r.get(c) is not None else "") for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print(file=sys.stdout)
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    if rows:
        print(f"device: {rows[0]['device']}")


def attention_backend(name: str):
    """A context that limits scaled_dot_product_attention to one kernel (compiled code picks its kernel
    when it is traced, inside this context)."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel([getattr(torch.nn.attention.SDPBackend, ATTENTION_BACKENDS[name])])


def main(args) -> list[dict]:
    device = resolve_device(args.device) if args.mode not in ("tokenize", "stream") else torch.device("cpu")
    if (args.checkpoint_path or args.lora_path) and args.mode != "serve":
        raise UserError(f"--checkpoint_path and --lora_path are for bench.py serve, not {args.mode}")
    if args.mode == "train" and args.optimizer == "torch" and args.momentum:
        raise UserError(f"--momentum {args.momentum}: torch.optim.Adafactor has none; pass --momentum 0 with "
                        f"--optimizer torch")
    rows: list[dict] = []
    try:
        with attention_backend(args.attention_backend):
            scenarios = {"clients": bench_serve, "long-prompt": bench_long_prompt, "shared-prefix": bench_shared_prefix}
            modes = {"train": bench_train, "decode": bench_decode, "tokenize": bench_tokenize, "stream": bench_stream,
                     "pack": bench_pack, "serve": scenarios[args.scenario]}
            modes[args.mode](args, device, rows)
    except RuntimeError as e:
        if not any(text in str(e) for text in ("No available kernel", "No viable backend")):
            raise
        raise UserError(f"--attention_backend {args.attention_backend} cannot run this attention on "
                        f"{device.type} ({first_line(e, 100)})") from None
    print_table(rows)
    return rows


if __name__ == "__main__":
    run_main(main, parse_args)
