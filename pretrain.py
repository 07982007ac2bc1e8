"""Pretrain LightGPT from scratch.

    python pretrain.py                                   # the Small model on FineWeb sample-10BT
    python pretrain.py --model quickstart                # the README's quick start: builtin corpus, CPU
    python pretrain.py --model medium                    # a named shape, small ... xxxlarge, with its tokenizer
    python pretrain.py --dataset builtin --token_encoding bytes --device cpu \\
        --embedding_dimensions 128 --num_attention_heads 4 --num_hidden_layers 4 ...   # offline, tiny

Tokenizes the corpus into token files on first use, then trains with Adafactor, gradient accumulation,
bf16 autocast and torch.compile on CUDA, evaluates test perplexity every --eval_interval epochs, logs
to TensorBoard and writes atomic checkpoints that --resume continues exactly. One epoch is
--samples_per_epoch samples, i.e. samples_per_epoch / (batch_size x gradient_accumulation_steps)
optimizer steps. SIGINT/SIGTERM save a checkpoint, then exit non-zero; before the first step they stop
the run at once, saving nothing.

This script sets a run up (flags, corpus, model, resume) and hands it to training.train(), the loop
that instruction tuning shares.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from functools import partial
from typing import Iterator

import numpy as np
import torch

from adafactor import Adafactor
from checkpoint import (
    RESUME_ENTRIES,
    SHARDED_RESUME_ENTRIES,
    model_checkpoint,
    require_entries,
)
from common import (
    ARCHITECTURE_FLAGS,
    ArgumentParser,
    UserError,
    add_distributed_args,
    add_model_args,
    add_optimizer_args,
    add_system_args,
    check_learned_positions,
    check_memory,
    compile_enabled,
    model_config,
    non_negative_int,
    positive_float,
    positive_int,
    precision_name,
    print0,
    probability,
    run_main,
)
from data import (
    FINEWEB,
    BatchPrefetcher,
    TokenFiles,
    WindowSampler,
    corpus_subset,
    eot_id,
    eval_windows,
    load_encoding,
    open_tokens,
    prepare_token_files,
    to_device,
    window_batch,
)
from metrics import sample_texts
from model import GPT, INITIALISATIONS, GPTConfig
from parallel import (
    Distributed,
    Parallel,
    agree,
    eval_rank_share,
    gather_objects,
    training_memory,
)
from run_config import add_config_args, parse_with_config, run_settings
from sharded_checkpoint import (
    check_files,
    is_sharded,
    load_shards,
    model_tensors,
    new_folder,
    save_shards,
    sharded_entry,
)
from streaming import Source, StreamSampler, open_source
from streaming import test_tokens as stream_test_tokens
from training import (
    Hooks,
    Plan,
    add_loop_args,
    allow_tf32,
    already_complete,
    batch_layout,
    check_same_flags,
    epoch_position,
    learning_rate_at,
    read_checkpoint,
    rng_states,
    run_seed,
    run_trainer,
    start_rng_streams,
)

CHECKPOINT_KIND = "pretrain"  # checkpoint.model_checkpoint builds it


def parse_args(argv=None):
    p = ArgumentParser(description="Pretrain LightGPT.")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=FINEWEB, help="HF hub dataset with a 'text' column, a local "
                   ".txt/.jsonl/.json/.parquet file, folder or glob, or 'builtin' (no download)")
    g.add_argument("--dataset_subset", default=None, help="subset of a hub dataset; FineWeb: sample-10BT, "
                   "sample-100BT, sample-350BT or all (default: sample-10BT for FineWeb, the dataset's own "
                   "otherwise)")
    g.add_argument("--token_encoding", default="r50k_base",
                   help="r50k_base, p50k_base, cl100k_base, o200k_base, bytes, or a path to a .tiktoken file")
    g.add_argument("--dataset_path", default="./datasets", help="folder for the token files")
    g.add_argument("--num_dataset_processes", type=positive_int, default=8,
                   help="workers for loading and tokenizing the corpus")
    g.add_argument("--streaming", action="store_true", help="read the corpus as a stream while training, "
                   "tokenized on the fly by --num_dataset_processes threads: no download or token files first")
    g.add_argument("--shuffle_buffer_tokens", type=positive_int, default=1 << 20,
                   help="--streaming: tokens of packed windows in each rank's shuffle buffer")
    g = p.add_argument_group("training")
    g.add_argument("--batch_size", type=positive_int, default=1, help="samples per forward pass")
    g.add_argument("--gradient_accumulation_steps", type=positive_int, default=128,
                   help="forward passes per optimizer step")
    g.add_argument("--tokens_per_sample", type=positive_int, default=1024, help="context length of a training sample")
    g.add_argument("--short_tokens_per_sample", type=non_negative_int, default=0,
                   help="a length curriculum: train on windows of this many tokens first, then of "
                   "--tokens_per_sample (0: off); a NoPE model learns faster on short windows")
    g.add_argument("--short_fraction", type=probability, default=0.85,
                   help="the fraction of the run's optimizer steps on --short_tokens_per_sample windows")
    g.add_argument("--samples_per_epoch", type=positive_int, default=4096, help="training samples per epoch")
    g.add_argument("--num_epochs", type=positive_int, default=1686, help="epochs to train for")
    g.add_argument("--learning_rate", type=positive_float, default=1e-2, help="peak learning rate of Adafactor")
    add_optimizer_args(g, warmup_steps=100, momentum=0.9)
    g.add_argument("--start_token", choices=("eot", "none"), default="eot",
                   help="eot: end-of-text replaces the first input token of every training and test window, "
                   "a fixed start for a NoPE model's attention to count from; none: the text as it is")
    g.add_argument("--eval_interval", type=positive_int, default=10,
                   help="evaluate test perplexity every this many epochs")
    g.add_argument("--eval_samples", type=positive_int, default=256,
                   help="test windows per evaluation (fixed, spread over the test split)")
    add_loop_args(g)
    g = p.add_argument_group("model")
    add_config_args(g, presets=True)
    add_model_args(g)
    g.add_argument("--init", choices=INITIALISATIONS[::-1], default="zero_proj",
                   help="zero_proj: the residual projections start at zero, every block as the identity; "
                   "gpt2: GPT-2's random initialisation throughout")
    g.add_argument("--activation_checkpointing", action="store_true",
                   help="recompute block activations in backward to save memory")
    g = p.add_argument_group("system")
    add_distributed_args(g)
    g.add_argument("--checkpoint_interval", type=positive_int, default=20,
                   help="save a checkpoint every this many epochs")
    g.add_argument("--checkpoint_path", default="./checkpoints/checkpoint.pt", help="checkpoint file")
    g.add_argument("--checkpoint_format", choices=("auto", "single", "sharded"), default="auto",
                   help="single: one file (weights gathered on rank 0); sharded: every rank writes its own shards "
                   "(torch.distributed.checkpoint) beside a small file naming them; auto: sharded at "
                   "--ddp_sharding_level 2 and 3 under torchrun, single otherwise")
    g.add_argument("--resume", action="store_true", help="continue from --checkpoint_path")
    g.add_argument("--run_dir_path", default="./runs/pretrain", help="TensorBoard run folder")
    add_system_args(g, seed_help="random seed (default: drawn and recorded in the checkpoint)", cpu_kernels=True)
    return parse_with_config(p, argv)  # --config, then --model, fill the flags not given


# ----------------------------------------------------------------------------- main


def main(args) -> list[tuple[int, float]]:
    return run_trainer(args, partial(set_up, args))


def set_up(args, ctx: Distributed, device: torch.device) -> tuple[Plan, Hooks, Parallel, Adafactor] | None:
    """Everything training.train() needs, for a new run or a resumed one; None for a resumed run that is
    already complete. Every rank runs it in the same order: a user error on any rank stops all of them
    (agree), before anything slow where possible."""
    layout = (args.batch_size, args.gradient_accumulation_steps, args.samples_per_epoch, ctx.world_size)
    accumulation, steps_per_epoch = agree(ctx, lambda: batch_layout(*layout))
    agree(ctx, partial(check_curriculum, args))
    checkpoint = agree(ctx, partial(resume_state, args), who="rank0")  # rank 0 reads it; every rank gets it
    if checkpoint and already_complete(args.checkpoint_path, checkpoint["step"], steps_per_epoch, args.num_epochs):
        return None
    seed = run_seed(ctx, checkpoint, args.seed)
    torch.manual_seed(seed)  # the seed alone decides the initial weights, on every rank
    corpus = streamed_corpus(args, ctx) if args.streaming else token_files(args, ctx)
    config = architecture(args, checkpoint, corpus.meta["vocabulary_size"])
    check_learned_positions(config, args.tokens_per_sample, "--tokens_per_sample")
    start_token = corpus.meta["eot_id"] if args.start_token == "eot" else None
    total_steps = steps_per_epoch * args.num_epochs  # the schedule spans all epochs (a longer resume stretches it)
    short_samples = round(args.short_fraction * total_steps) * args.batch_size * accumulation * ctx.world_size
    curriculum = (start_token, args.short_tokens_per_sample, short_samples)
    if args.streaming:
        test_tokens = corpus.test
        sampler = StreamSampler(corpus.source, corpus.encoding, args.tokens_per_sample, args.batch_size, seed, ctx.rank,
                                ctx.world_size, *curriculum, args.shuffle_buffer_tokens, args.num_dataset_processes)
    else:
        train_tokens, test_tokens = open_tokens(corpus.train, corpus.meta), open_tokens(corpus.test, corpus.meta)
        # Every sample is drawn by one generator shared by all ranks; rank r takes the r-th of each round of
        # draws, so ranks see different samples and the global batch does not depend on the world size.
        sampler = WindowSampler(train_tokens, args.tokens_per_sample, args.batch_size, seed, ctx.rank,
                                ctx.world_size, *curriculum)
    eval_starts = eval_share(args, ctx, test_tokens)
    parallel, optimizer = build_model(args, config, checkpoint, ctx, device)
    step = resume_streams(args, ctx, checkpoint, sampler, seed, steps_per_epoch)
    del checkpoint  # its tensors are copied by now; holding them would keep a second copy of the weights
    batches = BatchPrefetcher(sampler, device)  # the next batch travels to the device while this one computes
    print_summary(args, parallel, ctx, device, accumulation, steps_per_epoch)

    plan = Plan(start_step=step, total_steps=total_steps, steps_per_epoch=steps_per_epoch, num_epochs=args.num_epochs,
                accumulation=accumulation, max_gradient_norm=args.max_gradient_norm, eval_interval=args.eval_interval,
                checkpoint_interval=args.checkpoint_interval, checkpoint_path=args.checkpoint_path,
                run_dir=args.run_dir_path, description="pretraining", log_interval=args.log_interval,
                nonfinite=args.nonfinite, settings=run_settings(args, seed=seed), wandb=args.wandb,
                peak_tflops=args.peak_tflops)
    hooks = Hooks(
        next_batch=batches.next,
        learning_rate=lambda step: learning_rate_at(step, total_steps, args.learning_rate, args.warmup_steps,
                                                    args.lr_schedule, args.min_lr_ratio),
        eval_batches=partial(eval_batches, test_tokens, eval_starts, args.tokens_per_sample, args.batch_size,
                             start_token, device),
        state_to_save=partial(checkpoint_state, args, parallel, optimizer, batches, seed, corpus.meta, ctx),
        samples=sampler_of_texts(args, parallel, start_token, device),
        close=sampler.close if args.streaming else None,
    )
    return plan, hooks, parallel, optimizer


# ----------------------------------------------------------------------------- set-up steps


def check_curriculum(args) -> None:
    if args.short_tokens_per_sample >= args.tokens_per_sample:
        raise UserError(f"--short_tokens_per_sample {args.short_tokens_per_sample}: the curriculum's windows must "
                        f"be shorter than --tokens_per_sample {args.tokens_per_sample} (or 0: no curriculum)")


def resume_state(args) -> dict | None:
    """The checkpoint to continue (with --resume), checked against the flags that cannot change: the
    corpus and its tokenizer (a resume continues the same sample stream). A sharded checkpoint's file
    holds all but the weights and optimizer state, which build_model loads from its shards."""
    state = read_checkpoint(args.checkpoint_path, CHECKPOINT_KIND, args.resume, required=())
    if not state:
        return None
    require_entries(state, SHARDED_RESUME_ENTRIES if is_sharded(state) else RESUME_ENTRIES, args.checkpoint_path,
                    CHECKPOINT_KIND)
    pairs = [("--token_encoding", args.token_encoding, state["token_encoding"])]
    saved = state.get("args")
    if isinstance(saved, dict):  # a stream's state and a token file's sampler do not continue each other
        pairs.append(("--streaming", args.streaming, bool(saved.get("streaming", False))))
    if isinstance(saved, dict) and isinstance(saved.get("dataset"), str):
        pairs[:0] = [("--dataset", args.dataset, saved["dataset"]),
                     ("--dataset_subset", corpus_subset(args.dataset, args.dataset_subset),
                      corpus_subset(saved["dataset"], saved.get("dataset_subset")))]
    check_same_flags(pairs, args.checkpoint_path)
    return state


def token_files(args, ctx: Distributed) -> TokenFiles:
    """The corpus as token files. One process per node tokenizes (nodes need not share a disk); the
    others then reuse its files."""
    subset = corpus_subset(args.dataset, args.dataset_subset)
    prepare = partial(prepare_token_files, args.dataset, subset, args.token_encoding, args.dataset_path,
                      args.num_dataset_processes)
    files = agree(ctx, prepare, who="local0")
    return agree(ctx, lambda: files if ctx.local_rank == 0 else prepare())  # the others find the files whole


@dataclass
class StreamedCorpus:
    source: Source
    encoding: object  # tiktoken.Encoding
    test: np.ndarray  # the held-out test tokens
    meta: dict  # what token files' metadata would say: vocabulary_size, eot_id, source


def streamed_corpus(args, ctx: Distributed) -> StreamedCorpus:
    """--streaming: the corpus opened as a stream and its held-out test tokens (rank 0 reads them from the
    stream's start; every rank gets them)."""
    encoding = load_encoding(args.token_encoding)
    source = agree(ctx, lambda: open_source(args.dataset, args.dataset_subset))
    wanted = args.eval_samples * args.tokens_per_sample + 1
    test = agree(ctx, lambda: stream_test_tokens(source, encoding, wanted), who="rank0")
    meta = {"vocabulary_size": encoding.n_vocab, "eot_id": eot_id(encoding), "source": f"stream: {source.what}"}
    print0(f"streaming {source.what}: {len(test):,} held-out test tokens (every {source.test_every}th document)")
    return StreamedCorpus(source, encoding, test, meta)


def architecture(args, checkpoint: dict | None, vocabulary_size: int) -> GPTConfig:
    """The flags' shape for a new run; a resumed run keeps its checkpoint's and names the flags it ignores."""
    if not checkpoint:
        return model_config(args, vocabulary_size)
    config = GPTConfig.from_dict(checkpoint["config"])
    # The saved weights fix the shape, so flags that disagree are reported and ignored, not an error.
    changed = [f"--{k}" for k in ARCHITECTURE_FLAGS if getattr(args, k) != getattr(config, k)]
    if changed:
        print0(f"note: resuming with the checkpoint's architecture; ignoring {', '.join(changed)}")
    if config.vocabulary_size != vocabulary_size:
        raise UserError(f"the checkpoint's vocabulary ({config.vocabulary_size}) differs from the token files' "
                        f"({vocabulary_size})")
    return config


def eval_share(args, ctx: Distributed, test_tokens: np.ndarray) -> list[int]:
    """This rank's share of the fixed test windows; every rank gets as many as the others."""
    starts = agree(ctx, lambda: eval_windows(test_tokens, args.tokens_per_sample, args.eval_samples))
    return eval_rank_share(starts, ctx, "--tokens_per_sample windows")


def resume_streams(args, ctx: Distributed, checkpoint: dict | None, sampler: WindowSampler, seed: int,
                   steps_per_epoch: int) -> int:
    """The step to start from. A resumed run's sampler and RNG streams continue where they were saved,
    so it draws the same samples and dropout masks as a run that never stopped; at a new --tokens_per_sample
    (growing the context) the same generator goes on drawing windows of the new length."""
    start_rng_streams(ctx, seed, checkpoint, checkpoint["step"] if checkpoint else 0)
    if not checkpoint:
        return 0
    step, rng = checkpoint["step"], checkpoint["rng"]
    if not args.streaming:
        sampler.load_state_dict(checkpoint["sampler"])  # its generator draws starts for windows of any length
    elif len(checkpoint["sampler"]) == ctx.world_size:
        sampler.load_state_dict(checkpoint["sampler"][ctx.rank])  # each rank's own stream, where it stopped
    else:  # written by another world size: every rank from the earliest position, no document skipped
        sampler.resharded(checkpoint["sampler"])
    saved = checkpoint.get("args")
    trained_at = saved.get("tokens_per_sample") if isinstance(saved, dict) else None
    if isinstance(trained_at, int) and trained_at != args.tokens_per_sample:  # growing (or shrinking) the context
        print0(f"note: resuming at --tokens_per_sample {args.tokens_per_sample} (the checkpoint trained at "
               f"{trained_at}): samples are drawn afresh at the new length")
    other_world = f", written by {len(rng)} process(es), now {ctx.world_size}" if len(rng) != ctx.world_size else ""
    print0(f"resumed {args.checkpoint_path} at step {step:,} ({epoch_position(step, steps_per_epoch)}){other_world}")
    return step


def build_model(args, config: GPTConfig, checkpoint: dict | None, ctx: Distributed,
                device: torch.device) -> tuple[Parallel, Adafactor]:
    """The model (seeded or the checkpoint's weights), wrapped for this world size, and its optimizer."""
    agree(ctx, partial(check_model_fits, args, config, checkpoint, ctx, device))
    model = GPT(config, args.init).to(device)  # the same seed on every rank: identical weights before sharding
    model.set_activation_checkpointing(args.activation_checkpointing)
    sharded = checkpoint is not None and is_sharded(checkpoint)
    if checkpoint and not sharded:
        model.load_state_dict(checkpoint["model"])
    allow_tf32(device)
    # Under torchrun: DDP, or FSDP with each block compiled before it is sharded; else the model, compiled.
    parallel = Parallel(model, ctx, device, args.ddp_sharding_level, compile_enabled(args.compile, device))
    optimizer = parallel.optimizer(lr=args.learning_rate, beta2_decay=args.rms_decay, beta1=args.momentum,
                                   foreach=not args.low_memory_optimizer)
    if sharded:  # every rank checks a share of the files, then loads into its own shards (DCP reshards)
        entry = checkpoint["sharded"]
        agree(ctx, lambda: check_files(args.checkpoint_path, entry, ctx.rank, ctx.world_size))
        agree(ctx, lambda: load_shards(args.checkpoint_path, entry, model_tensors(parallel),
                                       optimizer.sharded_state_dict(), ctx.control_group))
    elif checkpoint:
        parallel.load_optimizer_state_dict(optimizer, checkpoint["optimizer"])
    return parallel, optimizer


def check_model_fits(args, config: GPTConfig, checkpoint: dict | None, ctx: Distributed,
                     device: torch.device) -> None:
    """Refuse in one line, before building it, a model whose weights, gradients and optimizer state the
    device cannot hold (building it would fail with a traceback, or on Linux succeed lazily and be killed
    later). Processes on one machine share its memory, so on the CPU their needs add up."""
    shards = ctx.world_size if ctx.enabled and args.ddp_sharding_level else 1
    device_bytes, weight_bytes = training_memory(config, shards, momentum=args.momentum > 0)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if ctx.enabled else 1
    processes = f" in {local} processes" if local > 1 else ""
    c = config
    shape = (f"--embedding_dimensions {c.embedding_dimensions}, --num_hidden_layers {c.num_hidden_layers}, "
             f"--feed_forward_ratio {c.feed_forward_ratio}, a {c.vocabulary_size:,}-token vocabulary from "
             f"--token_encoding {args.token_encoding}{', as the checkpoint has it' if checkpoint else ''}")
    if device.type == "cpu":
        check_memory(device_bytes * local, device,
                     f"training the model ({shape}: fp32 weights, gradients and Adafactor state){processes}")
        return
    check_memory(device_bytes, device, f"training the model ({shape}: fp32 weights, gradients and Adafactor state)")
    check_memory(weight_bytes * local, torch.device("cpu"),  # the model is built in host memory first
                 f"building the model ({shape}) in host memory{processes}")


def print_summary(args, parallel: Parallel, ctx: Distributed, device: torch.device, accumulation: int,
                  steps_per_epoch: int) -> None:
    """Two lines on what is about to run: the model and where it runs, then the run's size."""
    model, c = parallel.model, parallel.model.config
    compiled = ", compiled" if compile_enabled(args.compile, device) else ""
    print0(f"model: {model.num_parameters():,} parameters ({model.num_parameters(False):,} without embeddings), "
           f"{c.num_hidden_layers} layers, width {c.embedding_dimensions}, vocabulary {c.vocabulary_size:,}; "
           f"{device.type} {precision_name(device)}{compiled}{parallel.summary}")
    length = f"{args.tokens_per_sample} tokens"
    if args.short_tokens_per_sample:
        length = f"{args.short_tokens_per_sample} tokens, then {length} for the last {1 - args.short_fraction:.0%}"
    print0(f"training: {args.num_epochs} epochs x {steps_per_epoch} steps x "
           f"{args.batch_size * accumulation * ctx.world_size} samples x {length}")


# ----------------------------------------------------------------------------- hooks for the loop


def eval_batches(tokens: np.ndarray, starts: list[int], tokens_per_sample: int, batch_size: int,
                 start_token: int | None, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's test windows, batch by batch, on the device, made as the training windows are."""
    for i in range(0, len(starts), batch_size):
        yield to_device(window_batch(tokens, starts[i : i + batch_size], tokens_per_sample, start_token), device)


SAMPLE_PROMPTS = ("The", "Once upon a time,", "The class statement")  # the last one suits the builtin corpus


def sampler_of_texts(args, parallel: Parallel, start_token: int | None, device: torch.device):
    """The hook that samples continuations of SAMPLE_PROMPTS at each evaluation (TensorBoard text), or None
    where the tokenizer cannot be had (an encoding not cached on an offline machine whose token files exist)."""
    try:
        encoding = load_encoding(args.token_encoding)
    except UserError as e:
        print0(f"note: no sample texts in TensorBoard ({e})")
        return None
    start = [] if start_token is None else [start_token]
    prompts = [(text, start + encoding.encode_ordinary(text)) for text in SAMPLE_PROMPTS]
    return partial(sample_texts, parallel.model, prompts, encoding.decode, device)


def saves_sharded(args, ctx: Distributed) -> bool:
    """--checkpoint_format: sharded (DCP) at FSDP levels 2 and 3 under torchrun, by default; one file else."""
    fsdp = ctx.enabled and args.ddp_sharding_level in (2, 3)
    return args.checkpoint_format == "sharded" or (args.checkpoint_format == "auto" and fsdp)


def checkpoint_state(args, parallel: Parallel, optimizer: Adafactor, batches: BatchPrefetcher, seed: int,
                     meta: dict, ctx: Distributed, step: int) -> dict:
    """Everything an exact resume needs. Every rank builds it; rank 0 writes it. One file: the weights and
    optimizer state gathered from the shards. Sharded: every rank first writes its own shards into a new
    folder (sharded_checkpoint.py), and the file written is the pointer to them."""
    if saves_sharded(args, ctx):
        folder = agree(ctx, lambda: new_folder(args.checkpoint_path, step), who="rank0")
        try:
            mine = agree(ctx, lambda: save_shards(model_tensors(parallel), optimizer.sharded_state_dict(), folder,
                                                   ctx.rank, ctx.control_group))
        except UserError:  # every rank is past its writes: rank 0 removes the half-written folder
            if ctx.rank == 0:
                shutil.rmtree(folder, ignore_errors=True)  # (the pointer still names the last whole one)
            raise
        weights, optimizer_state = {}, None
        shards = sharded_entry(args.checkpoint_path, folder, gather_objects(ctx, mine), ctx.world_size,
                               args.ddp_sharding_level)
    else:
        weights, optimizer_state = parallel.model_state_dict(), parallel.optimizer_state_dict(optimizer)
    state = model_checkpoint(
        parallel.model.config,
        weights,
        token_encoding=args.token_encoding,  # a resume must tokenize the same way; generate.py decodes with it
        eot_id=meta["eot_id"],
        args=vars(args),  # for the record; a resume takes its flags from its own command line
        step=step,
        # from before the prefetched batch, which a resume draws again; streamed: every rank's own stream
        sampler=gather_objects(ctx, batches.state_dict()) if args.streaming else batches.state_dict(),
        rng=rng_states(ctx),
        seed=seed,
        world_size=ctx.world_size,
        dataset=meta["source"],
    )
    if optimizer_state is not None:
        state["optimizer"] = optimizer_state  # torch.optim.Adafactor's format, whole tensors
        return state
    del state["model"]  # in the shards
    state["sharded"] = shards
    state["optimizer_groups"] = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return state


if __name__ == "__main__":
    run_main(main, parse_args)
