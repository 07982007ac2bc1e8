"""The training loop and its machinery, shared by pretrain.py and instruction-tune.py.

A trainer script sets up its model (wrapped by parallel.Parallel), optimizer and batches, then calls
train(plan, hooks, ...). What differs between trainers comes in as values (Plan: the run's length
and rhythm) and callables (Hooks: the next batch, the learning rate, the test batches, what to save):

- Steps: `for micro ...: loss / accumulation ... backward`, then clip, step; the loss and gradient
  norm stay on the device and are read once per epoch.
- Epochs: after each one, its metrics (standard output, TensorBoard); every eval_interval epochs the
  test perplexity, every checkpoint_interval epochs a checkpoint; both at the end too.
- Stopping: SIGINT/SIGTERM on any rank finishes the step on every rank, saves and raises Interrupted;
  before the first step (set-up, tokenizing, the first evaluation) there is nothing to save, and the
  script's StopFlag abandons the work at once (Stopped).
- Distributed: every rank takes part in evaluation and in building the state to save; rank 0 alone
  writes files. Set-up helpers (checkpoint, seed, RNG streams) keep all ranks in step.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from adafactor import Adafactor
from checkpoint import RESUME_ENTRIES, CheckpointLock, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from common import (
    NOTHING_SAVED,
    Interrupted,
    Stopped,
    UserError,
    autocast,
    first_line,
    out_of_memory_is_one_line,
    print0,
    synchronize,
)
from files import check_writable, os_reason, remove_stale_temporaries
from parallel import (
    Distributed,
    Parallel,
    agree,
    lost_rank_is_one_line,
    setup_distributed,
    shorten_timeouts,
    teardown_distributed,
)

# ----------------------------------------------------------------------------- stopping


class StopFlag:
    """SIGINT and SIGTERM alike, from set-up to the end of training. At first a signal raises Stopped
    at once: set-up and tokenizing are abandoned, leaving nothing half written, since there is nothing
    to save yet. After defer() it only sets the flag, which the training loop checks between optimizer
    steps, so that it can save a checkpoint and leave cleanly instead of dying mid-write."""

    def __init__(self):
        self.signal_number: int | None = None
        self.deferred = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def defer(self) -> None:
        self.deferred = True

    def _handle(self, signum, frame):
        self.signal_number = signum
        if not self.deferred:
            self.deferred = True  # raise once: a second signal must not cut short the clean-up on the way out
            raise Stopped(signum, NOTHING_SAVED)

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    def exit_code(self) -> int:
        return 128 + (self.signal_number or signal.SIGINT)

    def name(self) -> str:
        return signal.Signals(self.signal_number or signal.SIGINT).name


# ----------------------------------------------------------------------------- schedule


def learning_rate_at(step: int, total_steps: int, peak: float, warmup_steps: int, schedule: str,
                     min_ratio: float) -> float:
    """Linear warmup to the peak, then cosine or linear decay to min_ratio x peak at the last step."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return peak * (min_ratio + (1 - min_ratio) * decay)


# ----------------------------------------------------------------------------- batch arithmetic


def batch_layout(batch_size: int, gradient_accumulation_steps: int, samples_per_epoch: int,
                 world_size: int, samples: str = "--samples_per_epoch {}") -> tuple[int, int]:
    """Per-rank gradient accumulation and optimizer steps per epoch: gradient_accumulation_steps and
    samples_per_epoch are global and are divided among the ranks. `samples` names the epoch's samples
    in messages (a flag, or what the script's epoch is made of)."""
    epoch = samples.format(samples_per_epoch)
    if world_size > gradient_accumulation_steps:
        raise UserError(f"--gradient_accumulation_steps {gradient_accumulation_steps} is smaller than the "
                        f"world size {world_size}: every rank needs at least one micro-batch per step")
    if world_size > samples_per_epoch:
        raise UserError(f"{epoch}: fewer than the world size {world_size}")
    accumulation = gradient_accumulation_steps // world_size
    if gradient_accumulation_steps % world_size:
        print0(f"warning: --gradient_accumulation_steps {gradient_accumulation_steps} does not divide among "
               f"{world_size} processes; each does {accumulation} ({accumulation * world_size} in all)")
    if samples_per_epoch % world_size:
        print0(f"warning: {epoch}: does not divide among {world_size} processes")
    samples_per_step = batch_size * accumulation * world_size
    steps_per_epoch = samples_per_epoch // samples_per_step
    if steps_per_epoch == 0:
        raise UserError(f"{epoch}: fewer than one optimizer step takes "
                        f"(batch_size x gradient_accumulation_steps = {samples_per_step})")
    if samples_per_epoch % samples_per_step:
        print0(f"warning: {epoch}: not a multiple of {samples_per_step}; "
               f"each epoch takes {steps_per_epoch * samples_per_step} of them")
    return accumulation, steps_per_epoch


def epoch_position(step: int, steps_per_epoch: int) -> str:
    """Where a run stands after `step` optimizer steps, in the per-epoch log's 1-based epochs: epoch k is
    steps (k-1) x steps_per_epoch + 1 to k x steps_per_epoch, and its "epoch k/N" line is printed after
    the last of them, so a step on the boundary ends epoch k and the next one is in epoch k + 1."""
    epoch, into = divmod(step, steps_per_epoch)
    if into == 0:
        return f"end of epoch {epoch}" if epoch else "start of epoch 1"
    return f"epoch {epoch + 1}, {into} of {steps_per_epoch} steps done"


def already_complete(checkpoint_path: str, step: int, steps_per_epoch: int, num_epochs: int) -> bool:
    """Whether a resumed run has nothing left to train: its checkpoint is at or past the last step of
    --num_epochs. If so, it says so in one line."""
    total = steps_per_epoch * num_epochs
    if step < total:
        return False
    print0(f"{checkpoint_path} is already complete at step {step:,} ({epoch_position(step, steps_per_epoch)}); "
           f"--num_epochs {num_epochs} ends at step {total:,}: nothing to train (pass a larger --num_epochs to train "
           f"further)")
    return True


# ----------------------------------------------------------------------------- run set-up


@contextlib.contextmanager
def claim_outputs(ctx: Distributed, checkpoint_path: str, run_dir: str):
    """Hold the checkpoint for the life of the run. Rank 0, which writes every file, first checks that it
    can write the checkpoint's folder and the TensorBoard folder (before any work, not at the first save),
    then takes the checkpoint's lock (a second run on it stops at once) and removes the temporary files
    a run killed while saving left there. A problem on rank 0 stops every rank."""
    lock = CheckpointLock(checkpoint_path)

    def claim() -> None:
        if os.path.isdir(checkpoint_path):
            raise UserError(f"--checkpoint_path: {checkpoint_path} is a directory; name the checkpoint file")
        check_writable(os.path.dirname(os.path.abspath(checkpoint_path)), "--checkpoint_path")
        check_writable(run_dir, "--run_dir_path")
        lock.acquire()
        if lock.since is not None:  # only the lock's holder may touch the checkpoint's temporary files
            count, size = remove_stale_temporaries(checkpoint_path, lock.since)
            if count:
                amount = f"{size / 1e6:,.1f} MB" if size >= 1e6 else f"{size / 1e3:,.1f} kB"
                print0(f"note: removed {count} temporary file{'s' if count > 1 else ''} ({amount}) that an earlier "
                       f"run left when it was stopped while saving {checkpoint_path}")

    try:
        agree(ctx, claim, who="rank0")
        yield
    finally:
        lock.release()


def read_checkpoint(path: str, kind: str, resume: bool, required: tuple[str, ...] = RESUME_ENTRIES) -> dict | None:
    """The checkpoint a resumed run continues, or None for a fresh run. A fresh run never overwrites
    one by accident: an existing checkpoint is continued with --resume or moved aside by the user."""
    if not resume:
        if os.path.exists(path):
            raise UserError(f"{path} exists; pass --resume to continue it, or choose another --checkpoint_path")
        return None
    return load_checkpoint(path, kind, required=required)


def same_source(a, b) -> bool:
    """The same flag value, or two spellings of one local path."""
    return a == b or (isinstance(a, str) and isinstance(b, str) and os.path.exists(a) and os.path.exists(b)
                      and os.path.samefile(a, b))


def check_same_flags(pairs: list[tuple[str, object, object]], checkpoint_path: str) -> None:
    """(flag, value now, value in the checkpoint) for the flags a resumed run cannot change (they choose
    its samples): one line naming the first that differs."""
    for flag, value, was in pairs:
        if not same_source(value, was):
            if isinstance(was, bool):
                way = f"{'pass' if was else 'leave out'} {flag}"
            else:
                way = f"pass {flag} {was}" if was is not None else f"leave out {flag}"
            raise UserError(f"{flag} {value if value is not None else '(none)'} differs from the checkpoint's "
                            f"{was if was is not None else '(none)'}; {way} to continue {checkpoint_path}, or "
                            f"choose another --checkpoint_path for a new run")


def run_seed(ctx: Distributed, checkpoint: dict | None, seed: int | None) -> int:
    """The checkpoint's seed, else --seed, else a drawn one (saved, so the run can be repeated). Rank
    0's goes to every rank: one seed for all, so all build identical initial weights."""
    if checkpoint:
        if seed is not None and seed != checkpoint["seed"]:
            print0(f"note: resuming with the checkpoint's seed {checkpoint['seed']}; ignoring --seed {seed}")
        return checkpoint["seed"]
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    return agree(ctx, lambda: seed, who="rank0")


def start_rng_streams(ctx: Distributed, seed: int, checkpoint: dict | None, step: int) -> None:
    """Call once the weights are set: from here each rank draws its own dropout masks, continuing the
    stream it saved, or starting its own where there is none to continue."""
    if checkpoint is None:
        if ctx.enabled:
            torch.manual_seed(seed + ctx.rank)
    elif len(checkpoint["rng"]) == ctx.world_size:
        set_rng_state(checkpoint["rng"][ctx.rank])
    else:  # written by another world size: its streams cannot continue, so start fresh ones
        torch.manual_seed(seed + step * 1_000 + ctx.rank)


def allow_tf32(device: torch.device) -> None:
    """TF32 for the fp32 matrix products on CUDA (those autocast leaves in fp32): tensor-core speed at a
    precision training does not notice."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# ----------------------------------------------------------------------------- checkpoints


def rng_states(ctx: Distributed) -> list[dict]:
    """Every rank's RNG state, one per rank (a collective), so a resume continues each dropout stream."""
    if not ctx.enabled:
        return [rng_state()]
    states = [None] * ctx.world_size
    dist.all_gather_object(states, rng_state(), group=ctx.control_group)
    return states


def write_checkpoint(ctx: Distributed, state: dict, path: str) -> None:
    """Rank 0 writes the state every rank helped to build; the others wait for the whole file, so none
    runs ahead (or exits) while it is written, and stop with rank 0 when it cannot be (a full disk)."""
    agree(ctx, lambda: save_checkpoint(state, path), who="rank0")


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(module: torch.nn.Module, ctx: Distributed, batches: Iterable[tuple], device: torch.device) -> float:
    """Test perplexity: exp of the mean loss over the test batches, each weighted by its sample count.
    Each rank scores its own share, as many batches of the same sizes on every rank (FSDP gathers the
    weights in every forward), and the sums are all-reduced."""
    was_training = module.training
    module.eval()
    total = torch.zeros((), device=device)
    samples = 0
    with out_of_memory_is_one_line(f"in evaluation on {device.type}", "lower --batch_size or --tokens_per_sample"):
        for batch in batches:
            with autocast(device):
                total += module(*batch).float() * len(batch[0])
            samples += len(batch[0])
    if ctx.enabled:
        dist.all_reduce(total)
    module.train(was_training)
    return math.exp(total.item() / (samples * ctx.world_size))


# ----------------------------------------------------------------------------- logging


class RunLog:
    """Where a run reports: a progress bar and lines on standard output (rank 0), TensorBoard scalars
    (rank 0 writes them) and the history of test perplexities that train() returns. A failure to write
    the events (a full disk) is kept and raised by check(), which every rank calls at the same points."""

    def __init__(self, run_dir: str, ctx: Distributed):
        self.rank, self.run_dir = ctx.rank, run_dir
        self.writer, self.error = None, None
        self.progress = None
        self.history: list[tuple[int, float]] = []  # (step, test perplexity)
        if ctx.rank == 0:
            from torch.utils.tensorboard import SummaryWriter  # slow to import, and only training needs it

            quiet_event_writer_threads()
            self._write(lambda: setattr(self, "writer", SummaryWriter(run_dir)))

    def _write(self, work: Callable[[], None]) -> None:
        if self.error is None:
            try:
                work()
            except Exception as e:  # OSError; other types where TensorFlow's file system does the writing
                self.error = e

    def check(self) -> None:
        """Flush the events; a write that failed since the last check ends the run in one line."""
        if self.writer is not None:
            self._write(self.writer.flush)
        if self.error is not None:
            self.close()  # end the progress bar's line before the error's
            reason = os_reason(self.error) if isinstance(self.error, OSError) else first_line(self.error)
            raise UserError(f"--run_dir_path: cannot write TensorBoard events to {self.run_dir} ({reason})")

    def start_progress(self, total: int, initial: int, description: str) -> None:
        from tqdm import tqdm

        self.progress = tqdm(total=total, initial=initial, unit="step", desc=description,
                             disable=None if self.rank == 0 else True)

    def scalars(self, step: int, prefix: str, **values: float) -> None:
        if self.writer:
            for name, value in values.items():
                self._write(lambda: self.writer.add_scalar(f"{prefix}/{name}", value, step))

    def perplexity(self, step: int, value: float) -> None:
        self.scalars(step, "test", perplexity=value)
        self.history.append((step, value))
        print0(f"step {step:,}: test perplexity {value:.3f}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.writer:
            self._write(self.writer.close)
            self.writer = None


def quiet_event_writer_threads() -> None:
    """TensorBoard writes events from a thread of its own, whose failure (a full disk) Python prints as a
    traceback before the writer raises it again in the training thread. RunLog reports it there, in one
    line, so the thread's traceback is left out; every other thread's is printed as before."""
    previous = threading.excepthook
    if getattr(previous, "lightgpt", False):
        return

    def excepthook(args) -> None:
        if type(args.thread).__name__ != "_AsyncWriterThread":
            previous(args)

    excepthook.lightgpt = True
    threading.excepthook = excepthook


# ----------------------------------------------------------------------------- a whole run


def run_trainer(args, set_up: Callable, finish: Callable | None = None) -> list[tuple[int, float]]:
    """A trainer script's main: SIGINT/SIGTERM handled from the start (a signal during set-up or tokenizing
    abandons it in one line, with nothing half written; from the first evaluation on, train() stops
    where every rank can stop), the process group, the checkpoint's lock for the whole run, then
    set_up(ctx, device) -> train()'s first four arguments (None: nothing to train), the loop, and
    finish(ctx) (None: nothing), every rank alike. Returns train()'s history."""
    with StopFlag() as stop:
        ctx, device = setup_distributed(args.device, timedelta(minutes=args.collective_timeout))
        try:
            with claim_outputs(ctx, args.checkpoint_path, args.run_dir_path):
                run = set_up(ctx, device)
                with lost_rank_is_one_line(ctx):  # a rank that hangs in training: one line on the others
                    history = train(*run, ctx, device, stop) if run else []
                    if ctx.enabled:  # leave together, so no rank tears down while a peer still talks to it
                        dist.barrier(group=ctx.control_group)
                if finish is not None:
                    finish(ctx)
            return history
        finally:
            teardown_distributed()


# ----------------------------------------------------------------------------- the loop


@dataclass
class Plan:
    """The run's length and rhythm, counted in optimizer steps and epochs, and where it writes."""
    start_step: int  # 0 for a new run, the checkpoint's step for a resumed one
    total_steps: int
    steps_per_epoch: int
    num_epochs: int
    accumulation: int  # micro-batches per optimizer step on each rank
    max_gradient_norm: float
    eval_interval: int  # evaluate every this many epochs, and at the end
    checkpoint_interval: int  # save every this many epochs, and at the end
    checkpoint_path: str
    run_dir: str  # TensorBoard events
    description: str = "training"  # the progress bar's label


@dataclass
class Hooks:
    """What the loop asks its script for. Every rank calls each of them at the same points."""
    # This rank's next micro-batch: the forward's arguments, (B, T) inputs first (they count the tokens/s),
    # then targets (IGNORE_INDEX where nothing is learned) and whatever else the forward takes.
    next_batch: Callable[[], tuple]
    learning_rate: Callable[[int], float]  # step -> learning rate, a pure function of the step
    eval_batches: Callable[[], Iterable[tuple]]  # this rank's share of the test set, afresh for each evaluation
    state_to_save: Callable[[int], dict]  # step -> the whole checkpoint (a collective: weights are gathered)


@dataclass
class EpochTotals:
    """Sums over the optimizer steps of one epoch, kept on the device until the epoch ends."""
    loss: torch.Tensor
    norm: torch.Tensor
    steps: int = 0
    tokens: int = 0  # this rank's input tokens
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def start(cls, device: torch.device) -> "EpochTotals":
        return cls(torch.zeros((), device=device), torch.zeros((), device=device))


def train(plan: Plan, hooks: Hooks, parallel: Parallel, optimizer: Adafactor, ctx: Distributed,
          device: torch.device, stop: StopFlag) -> list[tuple[int, float]]:
    """Train from plan.start_step to plan.total_steps; returns (step, test perplexity) of every evaluation.
    `stop` is the script's StopFlag, entered before set-up; from here a signal is only flagged, so that
    every rank stops at the same point: after the first evaluation (nothing saved) or after a step (saved)."""
    log = RunLog(plan.run_dir, ctx)
    step, A = plan.start_step, plan.accumulation
    stop.defer()
    if step == 0:  # the untrained baseline
        log.perplexity(step, evaluate(parallel.wrapped, ctx, hooks.eval_batches(), device))
    agree(ctx, log.check, who="rank0")  # TensorBoard can write its events, before any training
    if stop_requested(ctx, stop):
        log.close()
        raise Stopped(stop.signal_number, NOTHING_SAVED, everywhere=True)
    parallel.wrapped.train()
    log.start_progress(plan.total_steps, step, plan.description)
    totals = EpochTotals.start(device)
    remedy = "lower --batch_size or --tokens_per_sample"  # they size the activations
    remedy += "" if parallel.model.activation_checkpointing else ", or use --activation_checkpointing"
    while step < plan.total_steps:
        lr = hooks.learning_rate(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with out_of_memory_is_one_line(f"in training step {step + 1:,} on {device.type}", remedy):
            for micro in range(A):
                batch = hooks.next_batch()
                with parallel.gradient_sync(micro == A - 1):  # gradients are reduced once, on the last one
                    with autocast(device):
                        loss = parallel.wrapped(*batch) / A  # the step's loss is the mean over its micro-batches
                    loss.backward()
                totals.loss += loss.detach()
                totals.tokens += batch[0].numel()
        totals.norm += parallel.clip_grad_norm_(plan.max_gradient_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        totals.steps += 1
        if step == plan.start_step + 1:  # compiled and warmed up: a rank that hangs from now on is noticed soon
            shorten_timeouts(ctx, device)
        log.progress.update()
        if stop_requested(ctx, stop):  # every rank sees the same answer at the same step
            interrupt(step, stop, plan, hooks, log, ctx)
        if step % plan.steps_per_epoch == 0 or step == plan.total_steps:
            end_epoch(step, lr, totals, plan, hooks, parallel, log, ctx, device)
            totals = EpochTotals.start(device)  # its clock starts after the evaluation and the save
    log.close()
    agree(ctx, log.check, who="rank0")  # the last events reached the disk, or one line says why not
    return log.history


def end_epoch(step: int, lr: float, totals: EpochTotals, plan: Plan, hooks: Hooks, parallel: Parallel,
              log: RunLog, ctx: Distributed, device: torch.device) -> None:
    """The epoch's metrics, averaged over the ranks (its one host sync); then evaluation and a
    checkpoint when they are due."""
    loss = parallel.all_reduce_mean(totals.loss).item() / totals.steps
    norm = totals.norm.item() / totals.steps  # the global norm: already the same on every rank
    synchronize(device)
    tokens_per_s = totals.tokens * ctx.world_size / (time.perf_counter() - totals.started)
    epoch = step // plan.steps_per_epoch
    log.scalars(step, "train", cross_entropy=loss, gradient_norm=norm, learning_rate=lr, tokens_per_s=tokens_per_s)
    log.progress.set_postfix(loss=f"{loss:.3f}", refresh=False)
    print0(f"epoch {epoch}/{plan.num_epochs}: cross-entropy {loss:.4f}, gradient norm {norm:.3f}, "
           f"lr {lr:.2e}, {tokens_per_s:,.0f} tokens/s")
    last = step == plan.total_steps
    if epoch % plan.eval_interval == 0 or last:
        log.perplexity(step, evaluate(parallel.wrapped, ctx, hooks.eval_batches(), device))
    if epoch % plan.checkpoint_interval == 0 or last:
        try:
            write_checkpoint(ctx, hooks.state_to_save(step), plan.checkpoint_path)
        except UserError:  # a full disk: end the progress bar's line before the error's
            log.close()
            raise
        print0(f"saved checkpoint to {plan.checkpoint_path}")
    agree(ctx, log.check, who="rank0")  # after the save: events that cannot be written end the run, not the work


# ----------------------------------------------------------------------------- stopping


def stop_requested(ctx: Distributed, stop: StopFlag) -> bool:
    """Whether any rank was signalled: a CPU all-reduce on the control group, no GPU sync."""
    if not ctx.enabled:
        return stop.requested
    flag = torch.tensor([int(stop.requested)])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=ctx.control_group)
    return bool(flag.item())


def interrupt(step: int, stop: StopFlag, plan: Plan, hooks: Hooks, log: RunLog, ctx: Distributed) -> None:
    """Save where every rank stopped, then leave with the signal's exit status (run_main prints why)."""
    log.progress.close()  # before the save, so its line does not interleave with the message
    write_checkpoint(ctx, hooks.state_to_save(step), plan.checkpoint_path)
    log.close()
    name = stop.name() if stop.requested else "a signal on another rank"
    raise Interrupted(f"stopped by {name}: checkpoint at step {step:,} saved to {plan.checkpoint_path}; "
                      f"continue with --resume", stop.exit_code())
