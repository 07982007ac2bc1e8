"""Pretrain LightGPT from scratch.

    python pretrain.py                                   # the Small model on FineWeb sample-10BT
    python pretrain.py --dataset builtin --token_encoding bytes --device cpu \\
        --embedding_dimensions 128 --num_attention_heads 4 --num_hidden_layers 4 ...   # offline, tiny

Tokenizes the corpus into token files on first use, then trains with Adafactor, gradient accumulation,
bf16 autocast and torch.compile on CUDA, evaluates test perplexity every --eval_interval epochs, logs
to TensorBoard and writes atomic checkpoints that --resume continues exactly. One epoch is
--samples_per_epoch samples, i.e. samples_per_epoch / (batch_size x gradient_accumulation_steps)
optimizer steps. SIGINT/SIGTERM save a checkpoint, then exit non-zero.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

import torch.distributed as dist

from common import (
    ARCHITECTURE_FLAGS,
    compile_enabled,
    add_model_args,
    add_system_args,
    ArgumentParser,
    Distributed,
    agree,
    setup_distributed,
    teardown_distributed,
    Interrupted,
    StopFlag,
    UserError,
    autocast,
    load_checkpoint,
    model_config,
    non_negative_int,
    positive_float,
    positive_int,
    precision_name,
    print0,
    probability,
    rng_state,
    run_main,
    save_checkpoint,
    set_rng_state,
    synchronize,
    non_positive_float,
)
from data import (
    FINEWEB,
    BatchPrefetcher,
    WindowSampler,
    eval_windows,
    open_tokens,
    prepare_token_files,
    to_device,
    window_batch,
)
from model import GPT, GPTConfig
from parallel import Parallel

CHECKPOINT_KIND = "pretrain"


def parse_args(argv=None):
    p = ArgumentParser(description="Pretrain LightGPT.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=FINEWEB, help="HF hub dataset with a 'text' column, a local .txt/.jsonl/.json/.parquet file, folder or glob, or 'builtin' (no download)")
    g.add_argument("--dataset_subset", default=None, help="subset of a hub dataset; FineWeb: sample-10BT, sample-100BT, sample-350BT or all (default: sample-10BT for FineWeb, the dataset's default configuration otherwise)%(default).0s")
    g.add_argument("--token_encoding", default="r50k_base", help="r50k_base, p50k_base, cl100k_base, o200k_base, bytes, or a path to a .tiktoken file")
    g.add_argument("--dataset_path", default="./datasets", help="folder for the token files")
    g.add_argument("--num_dataset_processes", type=positive_int, default=8, help="workers for loading and tokenizing the corpus")
    g = p.add_argument_group("training")
    g.add_argument("--batch_size", type=positive_int, default=1, help="samples per forward pass")
    g.add_argument("--gradient_accumulation_steps", type=positive_int, default=128, help="forward passes per optimizer step")
    g.add_argument("--tokens_per_sample", type=positive_int, default=1024, help="context length of a training sample")
    g.add_argument("--samples_per_epoch", type=positive_int, default=4096, help="training samples per epoch")
    g.add_argument("--num_epochs", type=positive_int, default=1686, help="epochs to train for")
    g.add_argument("--learning_rate", type=positive_float, default=1e-2, help="peak learning rate of Adafactor")
    g.add_argument("--warmup_steps", type=non_negative_int, default=100, help="optimizer steps of linear learning-rate warmup")
    g.add_argument("--lr_schedule", choices=("cosine", "linear", "constant"), default="cosine", help="learning-rate decay after warmup")
    g.add_argument("--min_lr_ratio", type=probability, default=0.1, help="final learning rate as a fraction of the peak (cosine/linear)")
    g.add_argument("--rms_decay", type=non_positive_float, default=-0.8, help="Adafactor's beta2 decay exponent (negative)")
    g.add_argument("--low_memory_optimizer", action="store_true", help="single-tensor Adafactor updates: less memory, a little slower")
    g.add_argument("--max_gradient_norm", type=positive_float, default=1.0, help="clip the global gradient norm to this value")
    g.add_argument("--eval_interval", type=positive_int, default=10, help="evaluate test perplexity every this many epochs")
    g.add_argument("--eval_samples", type=positive_int, default=256, help="test windows per evaluation (fixed, spread over the test split)")
    g = p.add_argument_group("model")
    add_model_args(g)
    g.add_argument("--activation_checkpointing", action="store_true", help="recompute block activations in backward to save memory")
    g = p.add_argument_group("system")
    g.add_argument("--ddp_sharding_level", type=int, choices=(0, 2, 3), default=2, help="under torchrun: 0 DDP, 2 shard gradients and optimizer state, 3 shard everything")
    g.add_argument("--checkpoint_interval", type=positive_int, default=20, help="save a checkpoint every this many epochs")
    g.add_argument("--checkpoint_path", default="./checkpoints/checkpoint.pt", help="checkpoint file")
    g.add_argument("--resume", action="store_true", help="continue from --checkpoint_path")
    g.add_argument("--run_dir_path", default="./runs/pretrain", help="TensorBoard run folder")
    add_system_args(g, seed_help="random seed (default: drawn and recorded in the checkpoint)%(default).0s")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- schedule


def learning_rate_at(step: int, total_steps: int, peak: float, warmup_steps: int, schedule: str, min_ratio: float) -> float:
    """Linear warmup to the peak, then cosine or linear decay to min_ratio x peak at the last step."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return peak * (min_ratio + (1 - min_ratio) * decay)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(module, ctx, tokens, starts: list[int], tokens_per_sample: int, batch_size: int, device) -> float:
    """Test perplexity: exp of the mean cross-entropy over a fixed set of test windows. Each rank scores
    its share (the same number of windows on every rank) and the sums are all-reduced."""
    was_training = module.training
    module.eval()
    mine = starts[ctx.rank :: ctx.world_size]
    total = torch.zeros((), device=device)
    for i in range(0, len(mine), batch_size):
        x, y = to_device(window_batch(tokens, mine[i : i + batch_size], tokens_per_sample), device)
        with autocast(device):
            total += module(x, y).float() * len(x)
    if ctx.enabled:
        dist.all_reduce(total)
    module.train(was_training)
    return math.exp(total.item() / (len(mine) * ctx.world_size))


# ----------------------------------------------------------------------------- batch arithmetic


def batch_layout(args, world_size: int) -> tuple[int, int]:
    """Per-rank gradient accumulation and optimizer steps per epoch: gradient_accumulation_steps and
    samples_per_epoch are global and are divided among the ranks."""
    if world_size > args.gradient_accumulation_steps:
        raise UserError(f"--gradient_accumulation_steps {args.gradient_accumulation_steps} is smaller than the "
                        f"world size {world_size}: every rank needs at least one micro-batch per step")
    if world_size > args.samples_per_epoch:
        raise UserError(f"--samples_per_epoch {args.samples_per_epoch} is smaller than the world size {world_size}")
    accumulation = args.gradient_accumulation_steps // world_size
    if args.gradient_accumulation_steps % world_size:
        print0(f"warning: --gradient_accumulation_steps {args.gradient_accumulation_steps} does not divide among "
               f"{world_size} processes; each does {accumulation} ({accumulation * world_size} in all)")
    if args.samples_per_epoch % world_size:
        print0(f"warning: --samples_per_epoch {args.samples_per_epoch} does not divide among {world_size} processes")
    samples_per_step = args.batch_size * accumulation * world_size
    steps_per_epoch = args.samples_per_epoch // samples_per_step
    if steps_per_epoch == 0:
        raise UserError(
            f"--samples_per_epoch {args.samples_per_epoch} is smaller than one optimizer step "
            f"(batch_size x gradient_accumulation_steps = {samples_per_step} samples)"
        )
    if args.samples_per_epoch % samples_per_step:
        print0(f"warning: --samples_per_epoch {args.samples_per_epoch} is not a multiple of {samples_per_step}; "
               f"each epoch takes {steps_per_epoch * samples_per_step} samples")
    return accumulation, steps_per_epoch


# ----------------------------------------------------------------------------- main


def main(args) -> list[tuple[int, float]]:
    ctx, device = setup_distributed(args.device)
    try:
        history = train(args, ctx, device)
        if ctx.enabled:  # leave together, so no rank tears down while a peer still talks to it
            dist.barrier(group=ctx.control_group)
        return history
    finally:
        teardown_distributed()


def train(args, ctx: Distributed, device: torch.device) -> list[tuple[int, float]]:
    accumulation, steps_per_epoch = agree(ctx, lambda: batch_layout(args, ctx.world_size))
    total_steps = steps_per_epoch * args.num_epochs

    # Never overwrite a run by accident: an existing checkpoint is continued or moved aside by the user.
    def read_checkpoint():
        if not args.resume:
            if os.path.exists(args.checkpoint_path):
                raise UserError(f"{args.checkpoint_path} exists; pass --resume to continue it, or choose another --checkpoint_path")
            return None
        state = load_checkpoint(args.checkpoint_path, CHECKPOINT_KIND)
        if state["token_encoding"] != args.token_encoding:
            raise UserError(f"--token_encoding {args.token_encoding} differs from the checkpoint's {state['token_encoding']}")
        return state

    checkpoint = agree(ctx, read_checkpoint, who="rank0")  # rank 0 reads it; every rank gets it
    seed = checkpoint["seed"] if checkpoint else args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    if ctx.enabled and not checkpoint:
        seed = agree(ctx, lambda: seed, who="rank0")  # one seed for all ranks: identical initial weights
    torch.manual_seed(seed)

    # One process per node tokenizes (nodes need not share a disk); the others then reuse its files.
    subset = args.dataset_subset or ("sample-10BT" if args.dataset == FINEWEB else None)
    prepare = lambda: prepare_token_files(args.dataset, subset, args.token_encoding, args.dataset_path, args.num_dataset_processes)
    files = agree(ctx, prepare, who="local0")
    files = agree(ctx, lambda: files if ctx.local_rank == 0 else prepare())
    train_tokens = open_tokens(files.train, files.meta)
    test_tokens = open_tokens(files.test, files.meta)

    def make_config():
        if checkpoint:
            config = GPTConfig.from_dict(checkpoint["config"])
            changed = [f"--{k}" for k in ARCHITECTURE_FLAGS if getattr(args, k) != getattr(config, k)]
            if changed:
                print0(f"note: resuming with the checkpoint's architecture; ignoring {', '.join(changed)}")
            if config.vocabulary_size != files.meta["vocabulary_size"]:
                raise UserError(f"the checkpoint's vocabulary ({config.vocabulary_size}) differs from the token files' ({files.meta['vocabulary_size']})")
            return config
        return model_config(args, files.meta["vocabulary_size"])

    config = make_config()
    # Every sample is drawn by one generator shared by all ranks; rank r takes the r-th of each round of
    # draws, so ranks see different samples and the global batch does not depend on the world size.
    sampler = WindowSampler(train_tokens, args.tokens_per_sample, args.batch_size, seed, ctx.rank, ctx.world_size)
    eval_starts = agree(ctx, lambda: eval_windows(test_tokens, args.tokens_per_sample, args.eval_samples))
    eval_starts = eval_starts[: len(eval_starts) // ctx.world_size * ctx.world_size]  # equal shares
    if not eval_starts:
        raise UserError(f"the test split has fewer --tokens_per_sample windows than the {ctx.world_size} processes")

    model = GPT(config).to(device)  # the same seed on every rank: identical weights before sharding
    model.set_activation_checkpointing(args.activation_checkpointing)
    step = 0
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        step = checkpoint["step"]
    use_compile = compile_enabled(args.compile, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    parallel = Parallel(model, ctx, device, args.ddp_sharding_level, use_compile)
    optimizer = parallel.optimizer(lr=args.learning_rate, beta2_decay=args.rms_decay, foreach=not args.low_memory_optimizer)
    if checkpoint:
        parallel.load_optimizer_state_dict(optimizer, checkpoint["optimizer"])
        sampler.load_state_dict(checkpoint["sampler"])
        rng = checkpoint["rng"]
        if len(rng) == ctx.world_size:
            set_rng_state(rng[ctx.rank])
        else:  # another world size: dropout streams cannot continue, so start fresh ones
            torch.manual_seed(seed + step * 1_000 + ctx.rank)
        print0(f"resumed {args.checkpoint_path} at step {step:,} (epoch {step // steps_per_epoch})"
               + (f", written by {len(rng)} process(es), now {ctx.world_size}" if len(rng) != ctx.world_size else ""))
        del checkpoint
    elif ctx.enabled:
        torch.manual_seed(seed + ctx.rank)  # weights are set: from here each rank draws its own dropout masks
    batches = BatchPrefetcher(sampler, device)
    module = parallel.wrapped

    print0(
        f"model: {model.num_parameters():,} parameters ({model.num_parameters(False):,} without embeddings), "
        f"{config.num_hidden_layers} layers, width {config.embedding_dimensions}, vocabulary {config.vocabulary_size:,}; "
        f"{device.type} {precision_name(device)}{', compiled' if use_compile else ''}"
        + (f"; {ctx.world_size} process{'es' if ctx.world_size > 1 else ''}, {parallel.kind}" + (f" level {args.ddp_sharding_level}" if parallel.kind == "fsdp" else "") if ctx.enabled else "")
    )
    print0(f"training: {args.num_epochs} epochs x {steps_per_epoch} steps x {args.batch_size * accumulation * ctx.world_size} "
           f"samples x {args.tokens_per_sample} tokens")

    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    writer = SummaryWriter(args.run_dir_path) if ctx.rank == 0 else None
    history = []  # (step, test perplexity), returned for callers and tests

    def save() -> None:
        """Every rank helps build the whole state; rank 0 writes it."""
        rngs = [rng_state()]  # one per rank
        if ctx.enabled:
            rngs = [None] * ctx.world_size
            dist.all_gather_object(rngs, rng_state(), group=ctx.control_group)
        state = {
            "kind": CHECKPOINT_KIND,
            "config": config.to_dict(),
            "model": parallel.model_state_dict(),
            "optimizer": parallel.optimizer_state_dict(optimizer),
            "step": step,
            "sampler": batches.state_dict(),
            "rng": rngs,
            "seed": seed,
            "world_size": ctx.world_size,
            "token_encoding": args.token_encoding,
            "eot_id": files.meta["eot_id"],
            "dataset": files.meta["source"],
            "args": vars(args),
        }
        save_checkpoint(state, args.checkpoint_path)
        if ctx.enabled:
            dist.barrier(group=ctx.control_group)  # nobody runs ahead (or exits) before the file is whole

    def log_eval() -> None:
        perplexity = evaluate(module, ctx, test_tokens, eval_starts, args.tokens_per_sample, args.batch_size, device)
        if writer:
            writer.add_scalar("test/perplexity", perplexity, step)
        history.append((step, perplexity))
        print0(f"step {step:,}: test perplexity {perplexity:.3f}")

    def stop_requested(stop: StopFlag) -> bool:
        """Whether any rank was signalled: a CPU all-reduce on the control group, no GPU sync."""
        if not ctx.enabled:
            return stop.requested
        flag = torch.tensor([int(stop.requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=ctx.control_group)
        return bool(flag.item())

    if step == 0:
        log_eval()
    module.train()
    tokens_per_step = args.batch_size * accumulation * ctx.world_size * args.tokens_per_sample
    progress = tqdm(total=total_steps, initial=step, unit="step", desc="pretraining", disable=None if ctx.rank == 0 else True)
    with StopFlag() as stop:
        while step < total_steps:
            epoch_start_step, started = step, time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            norm_sum = torch.zeros((), device=device)
            while step < total_steps and (step == epoch_start_step or step % steps_per_epoch):
                lr = learning_rate_at(step, total_steps, args.learning_rate, args.warmup_steps, args.lr_schedule, args.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                for micro in range(accumulation):
                    x, y = batches.next()
                    with parallel.gradient_sync(micro == accumulation - 1):
                        with autocast(device):
                            loss = module(x, y) / accumulation
                        loss.backward()
                    loss_sum += loss.detach()
                norm_sum += parallel.clip_grad_norm_(args.max_gradient_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                progress.update()
                if stop_requested(stop):  # every rank sees the same answer at the same step
                    progress.close()
                    save()
                    if writer:
                        writer.close()
                    name = stop.name() if stop.requested else "a signal on another rank"
                    raise Interrupted(
                        f"stopped by {name}: checkpoint at step {step:,} saved to {args.checkpoint_path}; "
                        f"continue with --resume", stop.exit_code()
                    )

            # End of an epoch: one host sync for its metrics, averaged over the ranks.
            steps = step - epoch_start_step
            loss = parallel.all_reduce_mean(loss_sum).item() / steps
            norm = norm_sum.item() / steps  # the global norm: already the same on every rank
            synchronize(device)
            tokens_per_s = steps * tokens_per_step / (time.perf_counter() - started)
            epoch = step // steps_per_epoch
            if writer:
                writer.add_scalar("train/cross_entropy", loss, step)
                writer.add_scalar("train/gradient_norm", norm, step)
                writer.add_scalar("train/learning_rate", lr, step)
                writer.add_scalar("train/tokens_per_s", tokens_per_s, step)
            progress.set_postfix(loss=f"{loss:.3f}", refresh=False)
            print0(f"epoch {epoch}/{args.num_epochs}: cross-entropy {loss:.4f}, gradient norm {norm:.3f}, "
                   f"lr {lr:.2e}, {tokens_per_s:,.0f} tokens/s")
            if epoch % args.eval_interval == 0 or step == total_steps:
                log_eval()
            if epoch % args.checkpoint_interval == 0 or step == total_steps:
                save()
                print0(f"saved checkpoint to {args.checkpoint_path}")
    progress.close()
    if writer:
        writer.close()
    return history


if __name__ == "__main__":
    run_main(main, parse_args)
