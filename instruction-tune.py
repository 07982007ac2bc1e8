"""Instruction-tune a pretrained LightGPT with LoRA (or every weight, --full) on conversations in ChatML.

    python instruction-tune.py --base_model_path ./checkpoints/checkpoint.pt     # SmolTalk, every subset
    python instruction-tune.py --dataset_subset smol-magpie-ultra,smol-rewrite      # a mix of subsets
    python instruction-tune.py --dataset chats.jsonl                             # a local 'messages' file
    python instruction-tune.py --dataset builtin --device cpu ...                # offline, no download
    python instruction-tune.py --resume --merge_path ./checkpoints/chat.pt       # fold the adapters in
    python instruction-tune.py --full --checkpoint_path ./checkpoints/chat-full.pt # every weight, no LoRA

The base checkpoint is loaded and frozen. Its vocabulary grows by the ChatML special tokens
<|im_start|>, <|im_end|> and <|pad|> (new rows from the mean of the old ones, still tied to the
output layer), and every attention and MLP projection gets a LoRA adapter; only the adapters and the
new rows train. Conversations are rendered as `<|im_start|>{role}\\n{content}<|im_end|>\\n` and packed
into rows of at most --max_tokens_per_sample tokens, each conversation attending only to itself;
with --mask_input only the assistant's tokens are targets. An epoch is one pass over the training
conversations. The loop is pretraining's (training.train): Adafactor, accumulation, clipping, bf16,
compile, TensorBoard, exact --resume, SIGINT/SIGTERM save, torchrun DDP/FSDP.

The checkpoint holds only what trained (adapters, new rows, LoRA settings, the special tokens) and the
base checkpoint's content hash, so it is small and refuses another base. Chat with it through
generate.py / beam_search.py --lora_path, or write a merged checkpoint with --merge_path that every
script loads like a pretrained one. After training it is also written as a peft adapter folder
(--peft_path) for the base's export: transformers + peft load the pair (peft_adapter.py).

With --full there are no adapters: every weight trains (with --dropout as the model's own dropout), and
the checkpoint is the whole chat model (a "pretrain" checkpoint with the special tokens, as a merged one
is) with its training state and the base's content hash; every script loads it, --resume continues it,
and --merge_path writes the model alone, without the optimizer state.
"""

from __future__ import annotations

import os
from dataclasses import replace
from functools import partial

import torch

from adafactor import Adafactor
from chat import (
    SMOLTALK,
    SPECIAL_TOKENS,
    ChatTokenizer,
    pack,
    prepare_chat_data,
    render_prompt,
)
from checkpoint import (
    LORA_ENTRIES,
    MODEL_ENTRIES,
    TRAINING_ENTRIES,
    check_base,
    load_checkpoint,
    lora_checkpoint,
    model_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from common import (
    ArgumentParser,
    UserError,
    add_distributed_args,
    add_optimizer_args,
    add_system_args,
    check_learned_positions,
    check_memory,
    compile_enabled,
    float_in,
    positive_float,
    positive_int,
    precision_name,
    print0,
    probability,
    run_main,
)
from data import BatchPrefetcher, RowSampler, load_encoding, to_device
from files import atomic_folder, check_writable
from lora import (
    LoRAConfig,
    adapted_model,
    grow_vocabulary,
    lora_model,
    lora_state_dict,
    merge_lora,
    trainable_by_kind,
)
from metrics import sample_texts
from model import GPT, GPTConfig
from parallel import Distributed, Parallel, agree, eval_rank_share, training_memory
from peft_adapter import ADAPTER_CONFIG, peft_base_name, save_peft_adapter
from run_config import add_config_args, parse_with_config, run_settings
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

CHECKPOINT_KIND = "lora"  # checkpoint.lora_checkpoint builds it
FULL_KIND = "pretrain"  # --full: checkpoint.model_checkpoint builds it, a chat model with its training state
SAMPLE_QUESTIONS = ("What is a class?", "Hello! Who are you?")  # answered in TensorBoard at each evaluation
DATA_FLAGS = ("dataset", "dataset_subset", "max_tokens_per_sample", "mask_input")  # they choose the rows: fixed on resume
FULL_RESUME_ENTRIES = (*MODEL_ENTRIES, *TRAINING_ENTRIES, "steps_per_epoch", "args", "base", "special_tokens")
# Adafactor scales each step by the parameter's own RMS, floored at 1e-3. B starts at zero, so at that
# floor it would move by lr / 1000 per step and the adapters would sleep for thousands of steps; its
# floor is 1 instead: absolute steps of lr, as Adam takes, until B has grown. The new embedding rows
# start as copies of the mean row, much smaller than a real one (and all equal): their floor is the
# RMS of the base's rows, so they move as fast as a trained row would.
LORA_B_SCALE_FLOOR = 1.0


def parse_args(argv=None):
    p = ArgumentParser(description="Instruction-tune LightGPT with LoRA.")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=SMOLTALK, help="HF hub dataset with a 'messages' column, a local "
                   ".jsonl/.json/.parquet file, folder or glob with one, or 'builtin' (no download)")
    g.add_argument("--dataset_subset", default=None, help="subset(s) of a hub dataset, comma-separated to mix "
                   "(default: all for SmolTalk, the dataset's own otherwise)")
    g.add_argument("--dataset_path", default="./datasets", help="folder for the tokenized conversations")
    g.add_argument("--num_dataset_processes", type=positive_int, default=8,
                   help="workers for loading and tokenizing the conversations")
    g.add_argument("--max_tokens_per_sample", type=positive_int, default=1024,
                   help="tokens per training row; conversations are packed into rows, longer ones truncated")
    g.add_argument("--mask_input", action="store_true",
                   help="train only on the assistant's tokens (default: on every token of the conversation)")
    g = p.add_argument_group("training")
    g.add_argument("--base_model_path", default="./checkpoints/checkpoint.pt", help="the pretrained checkpoint")
    g.add_argument("--batch_size", type=positive_int, default=1, help="rows per forward pass")
    g.add_argument("--gradient_accumulation_steps", type=positive_int, default=64,
                   help="forward passes per optimizer step")
    g.add_argument("--num_epochs", type=positive_int, default=4, help="passes over the training conversations")
    g.add_argument("--learning_rate", type=positive_float, default=5e-4, help="peak learning rate of Adafactor")
    add_optimizer_args(g, warmup_steps=10, low_memory_names=("--optimizer_low_memory", "--low_memory_optimizer"))
    g.add_argument("--eval_interval", type=positive_int, default=1, help="evaluate test perplexity every this many epochs")
    g.add_argument("--eval_samples", type=positive_int, default=256, help="test rows per evaluation (at most)")
    add_loop_args(g)
    g = p.add_argument_group("LoRA")
    g.add_argument("--full", action="store_true", help="fine-tune every weight instead of LoRA adapters (needs the "
                   "memory of pretraining this model); the checkpoint is the whole chat model")
    g.add_argument("--rank", type=positive_int, default=8, help="rank of the LoRA matrices")
    g.add_argument("--alpha", type=float_in(1e-6, 1e6), default=1.0, help="strength of the LoRA update: it is "
                   "scaled by alpha / rank")
    g.add_argument("--dropout", type=probability, default=0.05, help="dropout on the adapters' inputs (with "
                   "--full: the model's own dropout)")
    g.add_argument("--activation_checkpointing", action="store_true",
                   help="recompute block activations in backward to save memory")
    g = p.add_argument_group("system")
    add_distributed_args(g)
    g.add_argument("--checkpoint_interval", type=positive_int, default=1, help="save a checkpoint every this many epochs")
    g.add_argument("--checkpoint_path", default="./checkpoints/lora_instruction.pt", help="the LoRA checkpoint")
    g.add_argument("--resume", action="store_true", help="continue from --checkpoint_path")
    g.add_argument("--merge_path", default=None, help="after training (or, with --resume, from a finished run), "
                   "also write base + adapters + new tokens as one checkpoint that every script loads")
    g.add_argument("--peft_path", default=None, help="after training, the LoRA as a peft adapter folder for the "
                   "base's export (default: --checkpoint_path without .pt, plus -peft)")
    g.add_argument("--run_dir_path", default="./runs/instruction-tune", help="TensorBoard run folder")
    add_system_args(g, seed_help="random seed (default: drawn and recorded in the checkpoint)", cpu_kernels=True)
    add_config_args(g)
    args = parse_with_config(p, argv)
    if args.full and args.peft_path is not None:
        p.error("--peft_path: a --full run has no adapters to write; export the chat model with export.py")
    if args.peft_path is None:
        args.peft_path = os.path.splitext(args.checkpoint_path)[0] + "-peft"
    return args


# ----------------------------------------------------------------------------- main


def main(args) -> list[tuple[int, float]]:
    check_merge_path(args)
    if not args.full:
        check_peft_path(args)

    def merge(ctx: Distributed) -> None:
        if args.merge_path:
            agree(ctx, partial(write_merged, args), who="rank0")
        if not args.full:
            agree(ctx, partial(write_peft, args), who="rank0")

    return run_trainer(args, partial(set_up, args), merge)


def check_merge_path(args) -> None:
    if args.merge_path is None:
        return
    if os.path.abspath(args.merge_path) in (os.path.abspath(args.checkpoint_path), os.path.abspath(args.base_model_path)):
        raise UserError(f"--merge_path {args.merge_path} would overwrite --checkpoint_path or --base_model_path; "
                        f"name a new file")
    if os.path.isdir(args.merge_path):
        raise UserError(f"--merge_path: {args.merge_path} is a directory; name the checkpoint file")


def check_peft_path(args) -> None:
    if os.path.exists(args.peft_path) and not os.path.isdir(args.peft_path):
        raise UserError(f"--peft_path: {args.peft_path} is a file; name a folder")
    if os.path.isdir(args.peft_path) and os.listdir(args.peft_path) and \
            not os.path.isfile(os.path.join(args.peft_path, ADAPTER_CONFIG)):
        raise UserError(f"--peft_path: {args.peft_path} holds other files than a peft adapter; name another folder")
    check_writable(os.path.dirname(os.path.abspath(args.peft_path)), "--peft_path")


def set_up(args, ctx: Distributed, device: torch.device) -> tuple | None:
    """What training.train() needs, or None for a finished run. Every rank runs it in the same order; a
    user error on any rank stops all of them."""
    base = agree(ctx, partial(load_checkpoint, args.base_model_path, "pretrain", "--base_model_path", MODEL_ENTRIES),
                 who="rank0")
    if "special_tokens" in base:
        raise UserError(f"--base_model_path {args.base_model_path} is already a chat model (merged); tune its "
                        f"LoRA checkpoint further with --resume, or start from the pretrained base")
    checkpoint = agree(ctx, partial(resume_state, args, base), who="rank0")
    if checkpoint and already_complete(args.checkpoint_path, checkpoint["step"], checkpoint["steps_per_epoch"],
                                       args.num_epochs):
        return None
    seed = run_seed(ctx, checkpoint, args.seed)
    torch.manual_seed(seed)  # the seed decides the adapters' initial weights, the same on every rank
    tokenizer = ChatTokenizer(load_encoding(base["token_encoding"]))
    if tokenizer.base_vocabulary_size != base["config"]["vocabulary_size"]:
        raise UserError(f"--base_model_path: its vocabulary ({base['config']['vocabulary_size']:,}) is not its "
                        f"tokenizer's {base['token_encoding']} ({tokenizer.base_vocabulary_size:,})")
    rows, test = packed_data(args, ctx, tokenizer, base["token_encoding"])
    layout = (args.batch_size, args.gradient_accumulation_steps, len(rows), ctx.world_size)
    accumulation, steps_per_epoch = agree(ctx, lambda: batch_layout(*layout, samples="{} packed training rows"))
    if checkpoint and checkpoint["steps_per_epoch"] != steps_per_epoch:
        raise UserError(f"{args.checkpoint_path} was trained with {checkpoint['steps_per_epoch']} steps per epoch; these "
                        f"flags and data give {steps_per_epoch}: resume with the run's --batch_size and "
                        f"--gradient_accumulation_steps on the same data")
    rows_per_epoch = steps_per_epoch * args.batch_size * accumulation * ctx.world_size
    sampler = RowSampler(rows, args.batch_size, rows_per_epoch, seed, ctx.rank, ctx.world_size)
    eval_rows = eval_share(args, ctx, test)
    parallel, optimizer = build_model(args, base, checkpoint, ctx, device)
    # What the checkpoints need of the base: its identity, not its weights, which the run need not hold.
    base = {k: base[k] for k in ("sha256", "config", "token_encoding", "eot_id")}
    step = 0
    start_rng_streams(ctx, seed, checkpoint, checkpoint["step"] if checkpoint else 0)
    if checkpoint:
        step = checkpoint["step"]
        sampler.load_state_dict(checkpoint["sampler"])
        print0(f"resumed {args.checkpoint_path} at step {step:,} ({epoch_position(step, steps_per_epoch)})")
    del checkpoint
    batches = BatchPrefetcher(sampler, device)
    print_summary(args, parallel, rows, ctx, device, accumulation, steps_per_epoch)

    total_steps = steps_per_epoch * args.num_epochs
    plan = Plan(start_step=step, total_steps=total_steps, steps_per_epoch=steps_per_epoch, num_epochs=args.num_epochs,
                accumulation=accumulation, max_gradient_norm=args.max_gradient_norm, eval_interval=args.eval_interval,
                checkpoint_interval=args.checkpoint_interval, checkpoint_path=args.checkpoint_path,
                run_dir=args.run_dir_path, description="instruction tuning", log_interval=args.log_interval,
                nonfinite=args.nonfinite, settings=run_settings(args, seed=seed), wandb=args.wandb,
                peak_tflops=args.peak_tflops)
    hooks = Hooks(
        next_batch=batches.next,
        learning_rate=lambda step: learning_rate_at(step, total_steps, args.learning_rate, args.warmup_steps,
                                                    args.lr_schedule, args.min_lr_ratio),
        eval_batches=partial(eval_batches, eval_rows, args.batch_size, device),
        state_to_save=partial(checkpoint_state, args, parallel, optimizer, batches, seed, base, steps_per_epoch, ctx),
        samples=partial(sample_texts, parallel.model, [(text, render_prompt(tokenizer, [{"role": "user", "content": text}]))
                                                       for text in SAMPLE_QUESTIONS], tokenizer.decode, device,
                        stop_id=tokenizer.im_end),
    )
    return plan, hooks, parallel, optimizer


# ----------------------------------------------------------------------------- set-up steps


def resume_state(args, base: dict) -> dict | None:
    """The checkpoint to continue (with --resume), which must have been tuned from this very base: a LoRA
    checkpoint, or with --full a whole chat model with its training state."""
    kind, required = ((FULL_KIND, FULL_RESUME_ENTRIES) if args.full else
                      (CHECKPOINT_KIND, (*LORA_ENTRIES, *TRAINING_ENTRIES, "steps_per_epoch", "args")))
    try:
        state = read_checkpoint(args.checkpoint_path, kind, args.resume, required=required)
    except UserError as e:
        other = CHECKPOINT_KIND if args.full else FULL_KIND
        if f"is a {other!r} checkpoint, expected" not in str(e):
            raise
        how = "it was tuned with LoRA: resume it without --full" if args.full else \
            "a --full run's checkpoint resumes with --full"
        raise UserError(f"{e}; {how}") from None
    if state:
        check_base(state, args.checkpoint_path, base, args.base_model_path, "--base_model_path")
        saved = state["args"]
        check_same_flags([(f"--{k}", getattr(args, k), saved.get(k)) for k in DATA_FLAGS], args.checkpoint_path)
        if args.full and args.dropout != state["config"]["dropout"]:
            print0(f"note: resuming with the checkpoint's dropout {state['config']['dropout']}; ignoring --dropout")
        changed = [f"--{k}" for k in ("rank", "alpha", "dropout") if not args.full and getattr(args, k) != state["lora"][k]]
        if changed:
            print0(f"note: resuming with the checkpoint's LoRA settings; ignoring {', '.join(changed)}")
    return state


def packed_data(args, ctx: Distributed, tokenizer: ChatTokenizer, encoding_spec: str):
    """The conversations tokenized (once per node, cached on disk) and packed into rows: (train, test)."""
    subset = args.dataset_subset or ("all" if args.dataset == SMOLTALK else None)
    prepare = partial(prepare_chat_data, args.dataset, subset, encoding_spec, args.dataset_path,
                      args.num_dataset_processes)
    data = agree(ctx, prepare, who="local0")
    data = agree(ctx, lambda: data if ctx.local_rank == 0 else prepare())
    T = args.max_tokens_per_sample
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0)).tolist()  # mixes sources
    train_rows = pack(data.train, T, args.mask_input, tokenizer.pad, order)
    test_rows = pack(data.test, T, args.mask_input, tokenizer.pad)
    for name, rows in (("training", train_rows), ("test", test_rows)):
        if rows.truncated or rows.dropped:
            print0(f"note: of the {name} conversations, {rows.truncated:,} longer than --max_tokens_per_sample {T} "
                   f"were cut short and {rows.dropped:,} left out (nothing to learn was left)")
        if not len(rows):
            use = "train on" if name == "training" else "evaluate on"
            raise UserError(f"--dataset {args.dataset}: no {name} conversation is left to {use}")
    return train_rows, test_rows


def eval_share(args, ctx: Distributed, test) -> tuple[torch.Tensor, ...]:
    """This rank's share of up to --eval_samples test rows (spread over the split, the same every time)."""
    n = min(args.eval_samples, len(test))
    chosen = torch.linspace(0, len(test) - 1, n).round().long().unique()
    return test.batch(eval_rank_share(chosen, ctx, f"rows ({len(test)})").tolist())


def build_model(args, base: dict, checkpoint: dict | None, ctx: Distributed,
                device: torch.device) -> tuple[Parallel, Adafactor]:
    if args.full:
        model = full_model(base, checkpoint, args.dropout)
    elif checkpoint:
        model = adapted_model(model_from_checkpoint(base), checkpoint)
    else:
        model = lora_model(model_from_checkpoint(base), LoRAConfig(args.rank, args.alpha, args.dropout), len(SPECIAL_TOKENS))
    check_learned_positions(model.config, args.max_tokens_per_sample, "--max_tokens_per_sample")
    check_fits(args, model, ctx, device)
    row_scale = None
    if not args.full:
        table = model.token_embeddings.base[: base["config"]["vocabulary_size"]]
        row_scale = table.float().square().mean().sqrt().item()  # before sharding: the whole table
    model.to(device).set_activation_checkpointing(args.activation_checkpointing)
    allow_tf32(device)
    parallel = Parallel(model, ctx, device, args.ddp_sharding_level, compile_enabled(args.compile, device))
    optimizer = parallel.optimizer(lr=args.learning_rate, beta2_decay=args.rms_decay, beta1=args.momentum,
                                   foreach=not args.optimizer_low_memory,
                                   params=None if args.full else param_groups(parallel.model, row_scale))
    if checkpoint:
        parallel.load_optimizer_state_dict(optimizer, checkpoint["optimizer"])
    return parallel, optimizer


def full_model(base: dict, checkpoint: dict | None, dropout: float) -> GPT:
    """--full: the base with its vocabulary grown by the special tokens, every weight trainable, at
    `dropout`; resumed, the checkpoint's own model (its weights and dropout)."""
    if checkpoint:
        return model_from_checkpoint(checkpoint)
    grown = grow_vocabulary(model_from_checkpoint(base), len(SPECIAL_TOKENS))
    model = GPT(replace(grown.config, dropout=dropout))
    model.load_state_dict(grown.state_dict())
    return model


def param_groups(model: GPT, row_scale: float) -> list[dict]:
    """The trainable weights: the A matrices, the B matrices and the new embedding rows, each group with
    the floor of Adafactor's relative step size it needs (see LORA_B_SCALE_FLOOR)."""
    kinds = trainable_by_kind(model)
    return [{"params": kinds["lora_a"]}, {"params": kinds["lora_b"], "eps": (None, LORA_B_SCALE_FLOOR)},
            {"params": kinds["new_rows"], "eps": (None, row_scale)}]


def check_fits(args, model: GPT, ctx: Distributed, device: torch.device) -> None:
    """Refuse in one line a model the device cannot hold: the whole fp32 weights (FSDP shards them only
    after they are built), and the adapters' gradients and Adafactor state (parallel.training_memory,
    pretraining's count). Activations are not counted."""
    shards = ctx.world_size if ctx.enabled and args.ddp_sharding_level else 1
    rank = 0 if args.full else model.lora_config.rank
    need, _ = training_memory(model.config, shards, lora_rank=rank, momentum=args.momentum > 0)
    c = model.config
    what = "every weight's" if args.full else "the adapters'"
    check_memory(need, device, f"{'fully tuning' if args.full else 'LoRA tuning'} --base_model_path "
                               f"{args.base_model_path} ({c.num_hidden_layers} layers, width {c.embedding_dimensions}: "
                               f"its weights, and {what} gradients and optimizer state)")


def print_summary(args, parallel: Parallel, rows, ctx: Distributed, device: torch.device, accumulation: int,
                  steps_per_epoch: int) -> None:
    model, c = parallel.model, parallel.model.config
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    compiled = ", compiled" if compile_enabled(args.compile, device) else ""
    how = (f"every weight, dropout {c.dropout}" if args.full else
           f"LoRA rank {model.lora_config.rank} on {', '.join(model.lora_config.targets)}")
    print0(f"model: {c.num_hidden_layers} layers, width {c.embedding_dimensions}, vocabulary {c.vocabulary_size:,}; "
           f"{how}: {trainable:,} trainable parameters; {device.type} {precision_name(device)}{compiled}"
           f"{parallel.summary}")
    targets = rows.target_count()
    print0(f"data: {rows.conversations:,} training conversations packed into {len(rows):,} rows of "
           f"{args.max_tokens_per_sample} tokens ({targets:,} targets{', assistant only' if args.mask_input else ''})")
    print0(f"training: {args.num_epochs} epochs x {steps_per_epoch} steps x "
           f"{args.batch_size * accumulation * ctx.world_size} rows")


# ----------------------------------------------------------------------------- hooks for the loop


def eval_batches(rows: tuple[torch.Tensor, ...], batch_size: int, device: torch.device):
    for i in range(0, len(rows[0]), batch_size):
        yield to_device(tuple(t[i : i + batch_size] for t in rows), device)


def checkpoint_state(args, parallel: Parallel, optimizer: Adafactor, batches: BatchPrefetcher, seed: int,
                     base: dict, steps_per_epoch: int, ctx: Distributed, step: int) -> dict:
    """What an exact resume and chatting need, and nothing of the frozen base but its identity (with --full,
    the whole chat model and the base's identity)."""
    model = parallel.model
    weights = parallel.model_state_dict()  # a collective under FSDP; only the trained entries are kept
    training = dict(optimizer=parallel.optimizer_state_dict(optimizer), step=step, steps_per_epoch=steps_per_epoch,
                    sampler=batches.state_dict(), rng=rng_states(ctx), seed=seed, world_size=ctx.world_size,
                    dataset=args.dataset)
    if args.full:
        identity = {"sha256": base["sha256"], "vocabulary_size": base["config"]["vocabulary_size"],
                    "path": os.path.abspath(args.base_model_path)}
        return model_checkpoint(model.config, weights, base["token_encoding"], base["eot_id"], vars(args),
                                special_tokens=SPECIAL_TOKENS, base=identity, **training)
    adapters = {k: weights[k] for k in lora_state_dict(model)} if weights else {}
    return lora_checkpoint(
        model.config,  # the grown vocabulary
        adapters,
        model.lora_config,
        SPECIAL_TOKENS,
        base,
        args.base_model_path,
        args=vars(args),
        **training,
    )


# ----------------------------------------------------------------------------- merging


def write_merged(args) -> None:
    """Base + adapters + new tokens as one ordinary checkpoint (rank 0), from the saved checkpoints; with
    --full the saved chat model without its training state."""
    if args.full:
        state = load_checkpoint(args.checkpoint_path, FULL_KIND, required=MODEL_ENTRIES)
        save_checkpoint(model_checkpoint(GPTConfig.from_dict(state["config"]), state["model"], state["token_encoding"],
                                         state["eot_id"], vars(args), special_tokens=state["special_tokens"]),
                        args.merge_path, flag="--merge_path")
        print0(f"saved the chat model to {args.merge_path}")
        return
    base = load_checkpoint(args.base_model_path, "pretrain", "--base_model_path", MODEL_ENTRIES)
    lora = load_checkpoint(args.checkpoint_path, CHECKPOINT_KIND, required=LORA_ENTRIES)
    check_base(lora, args.checkpoint_path, base, args.base_model_path, "--base_model_path")
    model = merge_lora(adapted_model(model_from_checkpoint(base), lora))
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_checkpoint(model_checkpoint(model.config, weights, lora["token_encoding"], lora["eot_id"], vars(args),
                                     special_tokens=lora["special_tokens"]), args.merge_path, flag="--merge_path")
    print0(f"saved the merged model to {args.merge_path}")


def write_peft(args) -> None:
    """The saved LoRA as a peft adapter folder (rank 0), written whole or not at all."""
    lora = load_checkpoint(args.checkpoint_path, CHECKPOINT_KIND, required=LORA_ENTRIES)
    base = peft_base_name(args.base_model_path)
    with atomic_folder(args.peft_path) as tmp:
        save_peft_adapter(lora, tmp, base)
    print0(f"saved the LoRA as a peft adapter for {base} to {args.peft_path}")


if __name__ == "__main__":
    run_main(main, parse_args)
