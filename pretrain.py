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

from common import (
    ArgumentParser,
    Interrupted,
    StopFlag,
    UserError,
    autocast,
    load_checkpoint,
    non_negative_int,
    positive_float,
    positive_int,
    precision_name,
    print0,
    probability,
    resolve_device,
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

CHECKPOINT_KIND = "pretrain"
ARCHITECTURE_FLAGS = ("embedding_dimensions", "num_attention_heads", "num_hidden_layers", "feed_forward_ratio", "dropout")


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
    g.add_argument("--embedding_dimensions", type=positive_int, default=1024, help="model width")
    g.add_argument("--num_attention_heads", type=positive_int, default=16, help="attention heads per block")
    g.add_argument("--num_hidden_layers", type=positive_int, default=24, help="Transformer blocks")
    g.add_argument("--feed_forward_ratio", type=int, choices=(1, 2, 4), default=4, help="MLP hidden width / model width")
    g.add_argument("--dropout", type=probability, default=0.1, help="dropout probability")
    g.add_argument("--activation_checkpointing", action="store_true", help="recompute block activations in backward to save memory")
    g = p.add_argument_group("system")
    g.add_argument("--ddp_sharding_level", type=int, choices=(0, 2, 3), default=2, help="under torchrun: 0 DDP, 2 shard gradients and optimizer state, 3 shard everything")
    g.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="torch.compile the model (auto: on for CUDA)")
    g.add_argument("--checkpoint_interval", type=positive_int, default=20, help="save a checkpoint every this many epochs")
    g.add_argument("--checkpoint_path", default="./checkpoints/checkpoint.pt", help="checkpoint file")
    g.add_argument("--resume", action="store_true", help="continue from --checkpoint_path")
    g.add_argument("--run_dir_path", default="./runs/pretrain", help="TensorBoard run folder")
    g.add_argument("--device", default="cuda", help="cpu, cuda, cuda:N or mps")
    g.add_argument("--seed", type=non_negative_int, default=None, help="random seed (default: drawn and recorded in the checkpoint)")
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
def evaluate(model, tokens, starts: list[int], tokens_per_sample: int, batch_size: int, device) -> float:
    """Test perplexity: exp of the mean cross-entropy over a fixed set of test windows."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    for i in range(0, len(starts), batch_size):
        x, y = to_device(window_batch(tokens, starts[i : i + batch_size], tokens_per_sample), device)
        with autocast(device):
            total += model(x, y).float() * len(x)
    model.train(was_training)
    return math.exp(total.item() / len(starts))


# ----------------------------------------------------------------------------- main


def main(args) -> list[tuple[int, float]]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("multi-process (torchrun) training is not available yet; run a single process")
    device = resolve_device(args.device)
    samples_per_step = args.batch_size * args.gradient_accumulation_steps
    steps_per_epoch = args.samples_per_epoch // samples_per_step
    if steps_per_epoch == 0:
        raise UserError(
            f"--samples_per_epoch {args.samples_per_epoch} is smaller than one optimizer step "
            f"(batch_size x gradient_accumulation_steps = {samples_per_step})"
        )
    if args.samples_per_epoch % samples_per_step:
        print0(f"warning: --samples_per_epoch {args.samples_per_epoch} is not a multiple of {samples_per_step}; "
               f"each epoch takes {steps_per_epoch * samples_per_step} samples")
    total_steps = steps_per_epoch * args.num_epochs

    # Never overwrite a run by accident: an existing checkpoint is continued or moved aside by the user.
    checkpoint = None
    if args.resume:
        checkpoint = load_checkpoint(args.checkpoint_path, CHECKPOINT_KIND)
        if checkpoint["token_encoding"] != args.token_encoding:
            raise UserError(f"--token_encoding {args.token_encoding} differs from the checkpoint's {checkpoint['token_encoding']}")
    elif os.path.exists(args.checkpoint_path):
        raise UserError(f"{args.checkpoint_path} exists; pass --resume to continue it, or choose another --checkpoint_path")

    seed = checkpoint["seed"] if checkpoint else args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)

    subset = args.dataset_subset or ("sample-10BT" if args.dataset == FINEWEB else None)
    files = prepare_token_files(args.dataset, subset, args.token_encoding, args.dataset_path, args.num_dataset_processes)
    train_tokens = open_tokens(files.train, files.meta)
    test_tokens = open_tokens(files.test, files.meta)

    if checkpoint:
        config = GPTConfig.from_dict(checkpoint["config"])
        changed = [f"--{k}" for k in ARCHITECTURE_FLAGS if getattr(args, k) != getattr(config, k)]
        if changed:
            print0(f"note: resuming with the checkpoint's architecture; ignoring {', '.join(changed)}")
        if config.vocabulary_size != files.meta["vocabulary_size"]:
            raise UserError(f"the checkpoint's vocabulary ({config.vocabulary_size}) differs from the token files' ({files.meta['vocabulary_size']})")
    else:
        try:
            config = GPTConfig(
                vocabulary_size=files.meta["vocabulary_size"],
                **{k: getattr(args, k) for k in ARCHITECTURE_FLAGS},
            )
        except ValueError as e:
            raise UserError(str(e)) from None

    model = GPT(config).to(device)
    model.set_activation_checkpointing(args.activation_checkpointing)
    optimizer = torch.optim.Adafactor(
        model.parameters(), lr=args.learning_rate, beta2_decay=args.rms_decay, foreach=not args.low_memory_optimizer
    )
    sampler = WindowSampler(train_tokens, args.tokens_per_sample, args.batch_size, seed)
    step = 0
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        sampler.load_state_dict(checkpoint["sampler"])
        set_rng_state(checkpoint["rng"])
        step = checkpoint["step"]
        print0(f"resumed {args.checkpoint_path} at step {step:,} (epoch {step // steps_per_epoch})")
        del checkpoint
    batches = BatchPrefetcher(sampler, device)

    use_compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    train_model = torch.compile(model) if use_compile else model
    eval_starts = eval_windows(test_tokens, args.tokens_per_sample, args.eval_samples)
    if len(eval_starts) >= args.batch_size:  # whole batches only: one shape for the compiled model
        eval_starts = eval_starts[: len(eval_starts) // args.batch_size * args.batch_size]

    print0(
        f"model: {model.num_parameters():,} parameters ({model.num_parameters(False):,} without embeddings), "
        f"{config.num_hidden_layers} layers, width {config.embedding_dimensions}, vocabulary {config.vocabulary_size:,}; "
        f"{device} {precision_name(device)}{', compiled' if use_compile else ''}"
    )
    print0(f"training: {args.num_epochs} epochs x {steps_per_epoch} steps x {samples_per_step} samples x {args.tokens_per_sample} tokens")

    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    writer = SummaryWriter(args.run_dir_path)

    def checkpoint_state() -> dict:
        return {
            "kind": CHECKPOINT_KIND,
            "config": config.to_dict(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "sampler": batches.state_dict(),
            "rng": rng_state(),
            "seed": seed,
            "token_encoding": args.token_encoding,
            "eot_id": files.meta["eot_id"],
            "dataset": files.meta["source"],
            "args": vars(args),
        }

    history = []  # (step, test perplexity), returned for callers and tests

    def log_eval() -> None:
        perplexity = evaluate(train_model, test_tokens, eval_starts, args.tokens_per_sample, args.batch_size, device)
        writer.add_scalar("test/perplexity", perplexity, step)
        history.append((step, perplexity))
        print0(f"step {step:,}: test perplexity {perplexity:.3f}")

    if step == 0:
        log_eval()
    model.train()
    tokens_per_step = samples_per_step * args.tokens_per_sample
    progress = tqdm(total=total_steps, initial=step, unit="step", desc="pretraining", disable=None)
    with StopFlag() as stop:
        while step < total_steps:
            epoch_start_step, started = step, time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            norm_sum = torch.zeros((), device=device)
            while step < total_steps and (step == epoch_start_step or step % steps_per_epoch):
                lr = learning_rate_at(step, total_steps, args.learning_rate, args.warmup_steps, args.lr_schedule, args.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                for _ in range(args.gradient_accumulation_steps):
                    x, y = batches.next()
                    with autocast(device):
                        loss = train_model(x, y) / args.gradient_accumulation_steps
                    loss.backward()
                    loss_sum += loss.detach()
                norm_sum += torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_gradient_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                progress.update()
                if stop.requested:
                    progress.close()
                    save_checkpoint(checkpoint_state(), args.checkpoint_path)
                    writer.close()
                    raise Interrupted(
                        f"stopped by {stop.name()}: checkpoint at step {step:,} saved to {args.checkpoint_path}; "
                        f"continue with --resume", stop.exit_code()
                    )

            # End of an epoch: one host sync for its metrics.
            steps = step - epoch_start_step
            loss, norm = loss_sum.item() / steps, norm_sum.item() / steps
            synchronize(device)
            tokens_per_s = steps * tokens_per_step / (time.perf_counter() - started)
            epoch = step // steps_per_epoch
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
                save_checkpoint(checkpoint_state(), args.checkpoint_path)
                print0(f"saved checkpoint to {args.checkpoint_path}")
    progress.close()
    writer.close()
    return history


if __name__ == "__main__":
    run_main(main, parse_args)
