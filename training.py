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
import functools
import math
import os
import signal
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from adafactor import Adafactor
from checkpoint import (
    RESUME_ENTRIES,
    CheckpointLock,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
import cpu_kernels
from common import (
    NOTHING_SAVED,
    Interrupted,
    Stopped,
    UserError,
    autocast,
    compile_enabled,
    out_of_memory_is_one_line,
    positive_float,
    positive_int,
    print0,
    synchronize,
)
from files import check_writable, os_reason, remove_stale_temporaries
from metrics import RunLog, check_wandb, peak_tflops, steps_text
from parallel import (
    Distributed,
    Parallel,
    agree,
    gather_objects,
    lost_rank_is_one_line,
    setup_distributed,
    teardown_distributed,
)
from run_config import config_path_beside, write_config
from sharded_checkpoint import prune as prune_shards

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


# ----------------------------------------------------------------------------- flags


def add_loop_args(g, log_interval: int = 10) -> None:
    """The loop's own flags, which both trainers take."""
    g.add_argument("--log_interval", type=positive_int, default=log_interval,
                   help="a metrics line and TensorBoard points (loss, gradient norm, learning rate, tokens/s, "
                   "MFU, peak memory) every this many optimizer steps")
    g.add_argument("--peak_tflops", type=positive_float, default=None,
                   help="the device's peak TFLOP/s for MFU (default: a known GPU's data-sheet bf16 peak; on the CPU "
                   "the fp32 matrix-product rate measured at start)")
    g.add_argument("--wandb", default=None, metavar="PROJECT",
                   help="also log to this Weights & Biases project (pip install wandb; WANDB_MODE=offline keeps "
                   "the run on the disk)")
    g.add_argument("--nonfinite", choices=("stop", "skip"), default="stop",
                   help="a step whose loss or gradient norm is not finite: stop the run in one line, keeping the "
                   "last good checkpoint, or skip the step's update (one host sync per step)")


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
    return gather_objects(ctx, rng_state())


OPTIMIZER_REMEDY = ("its state needs 4 to 8 bytes per weight: shard it with --ddp_sharding_level 2 or 3 under torchrun, "
                    "use --momentum 0 (4 bytes per weight less), or train a smaller model")
GATHER_REMEDY = ("a checkpoint gathers the whole model and optimizer state into host memory; give the machine more "
                 "memory, or run fewer processes on it")


def write_checkpoint(ctx: Distributed, state: dict, path: str) -> None:
    """Rank 0 writes the state every rank helped to build; the others wait for the whole file, so none
    runs ahead (or exits) while it is written, and stop with rank 0 when it cannot be (a full disk). Once it
    is in place, shard folders it does not name (an earlier save's) are removed."""
    def save() -> None:
        save_checkpoint(state, path)
        prune_shards(path, state["sharded"]["folder"] if "sharded" in state else None)

    agree(ctx, save, who="rank0")


def gathered_state(hooks: "Hooks", step: int) -> dict:
    """The checkpoint to save (a collective: the shards are gathered), an allocation failure in one line."""
    with out_of_memory_is_one_line(f"gathering the checkpoint of step {step:,}", GATHER_REMEDY):
        return hooks.state_to_save(step)


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


# ----------------------------------------------------------------------------- a whole run


def run_trainer(args, set_up: Callable, finish: Callable | None = None) -> list[tuple[int, float]]:
    """A trainer script's main: SIGINT/SIGTERM handled from the start (a signal during set-up or tokenizing
    abandons it in one line, with nothing half written; from the first evaluation on, train() stops
    where every rank can stop), the process group, the checkpoint's lock for the whole run, then
    set_up(ctx, device) -> train()'s first four arguments (None: nothing to train), the loop, and
    finish(ctx) (None: nothing), every rank alike. Returns train()'s history."""
    check_wandb(args.wandb)  # the optional package, before any work
    with StopFlag() as stop:
        ctx, device = setup_distributed(args.device, timedelta(minutes=args.collective_timeout))
        try:
            # a rank that hangs or goes away, in set-up or training: one line on the others
            with (lost_rank_is_one_line(ctx), claim_outputs(ctx, args.checkpoint_path, args.run_dir_path),
                  cpu_kernels.for_training(args.cpu_kernels, device, compile_enabled(args.compile, device)) as kernels):
                if kernels:
                    print0(f"CPU kernels: {kernels}")
                run = set_up(ctx, device)
                ctx.phase = "training"
                with _closing(run):
                    history = train(*run, ctx, device, stop) if run else []
                    if ctx.enabled:  # leave together, so no rank tears down while a peer still talks to it
                        dist.barrier(group=ctx.control_group)
                if finish is not None:
                    finish(ctx)
            return history
        finally:
            teardown_distributed()


@contextlib.contextmanager
def _closing(run: tuple | None):
    """Call the hooks' close when the loop ends, however it ends."""
    try:
        yield
    finally:
        if run and run[1].close is not None:
            run[1].close()


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
    log_interval: int = 10  # a metrics line and TensorBoard points every this many optimizer steps
    nonfinite: str = "stop"  # a step with a non-finite loss or gradient norm: stop, or skip it
    settings: dict = field(default_factory=dict)  # the run's resolved flags, for TensorBoard's hparams and text
    wandb: str | None = None  # a Weights & Biases project to log to as well
    peak_tflops: float | None = None  # MFU's denominator, if given (else metrics.peak_tflops decides)


@dataclass
class Hooks:
    """What the loop asks its script for. Every rank calls each of them at the same points."""
    # This rank's next micro-batch: the forward's arguments, (B, T) inputs first (they count the tokens/s),
    # then targets (IGNORE_INDEX where nothing is learned) and whatever else the forward takes.
    next_batch: Callable[[], tuple]
    learning_rate: Callable[[int], float]  # step -> learning rate, a pure function of the step
    eval_batches: Callable[[], Iterable[tuple]]  # this rank's share of the test set, afresh for each evaluation
    state_to_save: Callable[[int], dict]  # step -> the whole checkpoint (a collective: weights are gathered)
    samples: Callable[[], list[tuple[str, str]]] | None = None  # (prompt, continuation) pairs logged at evaluations
    close: Callable[[], None] | None = None  # called when the loop ends, however it ends (a stream's threads)


@dataclass
class Totals:
    """Sums over a stretch of optimizer steps (a log interval, an epoch), kept on the device until read."""
    loss: torch.Tensor
    norm: torch.Tensor
    steps: int = 0
    tokens: int = 0  # this rank's input tokens
    flops: float = 0.0  # this rank's training FLOPs (model.flops_per_token's convention)
    data_seconds: float = 0.0  # time the loop waited for its next batch
    skipped: int = 0  # steps skipped for a non-finite loss or gradient norm (--nonfinite skip)
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def start(cls, device: torch.device) -> "Totals":
        return cls(torch.zeros((), device=device), torch.zeros((), device=device))

    def add(self, loss: torch.Tensor, norm: torch.Tensor, tokens: int, flops: float, data_seconds: float) -> None:
        self.loss += loss
        self.norm += norm
        self.steps += 1
        self.tokens += tokens
        self.flops += flops
        self.data_seconds += data_seconds


class NonFinite:
    """The guard against a non-finite loss or gradient norm. The norm is global (the same on every rank)
    and a non-finite loss on any rank makes it non-finite, so every rank decides alike. stop: the run
    ends in one line naming the first such step, before any checkpoint holds its weights (on the CPU
    before the step is applied; on an accelerator the step is recorded on the device, without a host
    sync, and read at the next log line, evaluation or save). skip: the step's update is dropped (one
    host sync per step); MAX_SKIPPED_IN_A_ROW such steps in a row end the run."""

    MAX_SKIPPED_IN_A_ROW = 10

    def __init__(self, mode: str, device: torch.device, checkpoint_path: str):
        self.mode, self.device, self.checkpoint_path = mode, device, checkpoint_path
        self.first = torch.full((), -1, dtype=torch.long, device=device)  # the first non-finite step, on the device
        self.in_a_row = 0

    def skip(self, step: int, loss: torch.Tensor, norm: torch.Tensor) -> bool:
        """Whether step `step` (1-based) must not be applied; raises when the run must stop at once."""
        finite = torch.isfinite(loss) & torch.isfinite(norm)
        if self.mode == "stop" and self.device.type != "cpu":
            self.first = torch.where((self.first < 0) & ~finite, step, self.first)
            return False
        if bool(finite):
            self.in_a_row = 0
            return False
        if self.mode == "stop":
            self.fail(step, float(loss), float(norm))
        self.in_a_row += 1
        if self.in_a_row >= self.MAX_SKIPPED_IN_A_ROW:
            raise UserError(f"steps {step - self.in_a_row + 1:,} to {step:,}: {self.in_a_row} non-finite losses or "
                            f"gradient norms in a row (skipped); the weights are left as they were after step "
                            f"{step - self.in_a_row:,}, unsaved. {self.remedy()}", everywhere=True)
        return True

    def check(self) -> None:
        """Raise if a step recorded on the device was non-finite (a host sync: call it where one is due)."""
        first = int(self.first)
        if first >= 0:
            self.fail(first)

    def fail(self, step: int, loss: float | None = None, norm: float | None = None) -> None:
        values = f" (loss {loss}, gradient norm {norm})" if loss is not None else ""
        raise UserError(f"step {step:,}: non-finite loss or gradient norm{values}; training stopped and "
                        f"{self.checkpoint_path} keeps its last good state (nothing after it was saved). "
                        f"{self.remedy()}", everywhere=True)

    @staticmethod
    def remedy() -> str:
        return "Lower --learning_rate, raise --warmup_steps, or pass --nonfinite skip to drop such steps"


def train(plan: Plan, hooks: Hooks, parallel: Parallel, optimizer: Adafactor, ctx: Distributed,
          device: torch.device, stop: StopFlag) -> list[tuple[int, float]]:
    """Train from plan.start_step to plan.total_steps; returns (step, test perplexity) of every evaluation.
    `stop` is the script's StopFlag, entered before set-up; from here a signal is only flagged, so that
    every rank stops at the same point: after the first evaluation (nothing saved) or after a step (saved)."""
    log = RunLog(plan.run_dir, ctx.rank, peak_tflops(device, plan.peak_tflops), plan.wandb)
    log.settings(plan.settings)
    agree(ctx, functools.partial(write_run_config, plan), who="rank0")
    step, A = plan.start_step, plan.accumulation
    guard = NonFinite(plan.nonfinite, device, plan.checkpoint_path)
    stop.defer()
    check_finite_weights(parallel, ctx, plan.checkpoint_path if step else None)
    if step == 0:  # the untrained baseline
        log.perplexity(step, evaluate(parallel.wrapped, ctx, hooks.eval_batches(), device))
        log.samples(step, hooks.samples)
    agree(ctx, log.check, who="rank0")  # TensorBoard can write its events, before any training
    if stop_requested(ctx, stop):
        log.close()
        raise Stopped(stop.signal_number, NOTHING_SAVED, everywhere=True)
    parallel.wrapped.train()
    log.start_progress(plan.total_steps, step, plan.description)
    window, totals = Totals.start(device), Totals.start(device)  # since the last log line; the epoch
    flops_per_token = functools.lru_cache(parallel.model.flops_per_token)
    while step < plan.total_steps:
        lr = hooks.learning_rate(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        done = take_step(step + 1, A, plan.max_gradient_norm, hooks, parallel, optimizer, guard, device,
                         flops_per_token)
        for t in (window, totals):
            if done is None:
                t.skipped += 1
            else:
                t.add(*done)
        step += 1
        log.progress.update()
        if stop_requested(ctx, stop):  # every rank sees the same answer at the same step
            guard.check()
            interrupt(step, stop, plan, hooks, log, ctx)
        if step % plan.log_interval == 0 or step == plan.total_steps:
            guard.check()
            log_metrics(step, lr, window, parallel, log, ctx, device)
            window = Totals.start(device)
        if step % plan.steps_per_epoch == 0 or step == plan.total_steps:
            guard.check()
            paused = time.perf_counter()
            end_epoch(step, lr, totals, plan, hooks, parallel, log, ctx, device)
            totals = Totals.start(device)  # its clock starts after the evaluation and the save
            window.started += time.perf_counter() - paused  # nor does the log interval's count them
    log.close()
    agree(ctx, log.check, who="rank0")  # the last events reached the disk, or one line says why not
    return log.history


def check_finite_weights(parallel: Parallel, ctx: Distributed, resumed_from: str | None) -> None:
    """Refuse, in one line, to train weights that are already non-finite (a checkpoint saved from a run that
    blew up): every step would be non-finite. Each rank checks its shards; the answer is all-reduced."""
    finite = torch.stack([torch.isfinite(_local_tensor(p)).all() for p in parallel.model.parameters()]).all()
    finite = finite.to(torch.int32)
    if ctx.enabled:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not bool(finite):
        where = f"{resumed_from} holds" if resumed_from else "the model's starting weights hold"
        raise UserError(f"{where} non-finite weights (NaN or infinity): training them cannot recover; resume from "
                        f"an earlier checkpoint or start afresh", everywhere=True)


def _local_tensor(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def write_run_config(plan: Plan) -> None:
    """The run's resolved flags beside its checkpoint and in its TensorBoard folder, as a config file:
    `--config` of it (with a new --checkpoint_path and --run_dir_path) repeats the run."""
    if not plan.settings:
        return
    header = (f"The resolved flags of the run that wrote {plan.checkpoint_path}. Repeat it with --config this file "
              f"(and a new\n--checkpoint_path and --run_dir_path); flags on the command line override it.")
    for path in (config_path_beside(plan.checkpoint_path), os.path.join(plan.run_dir, "config.yaml")):
        try:
            write_config(plan.settings, path, header)
        except OSError as e:
            raise UserError(f"cannot write the run's config to {path} ({os_reason(e)})") from None


def take_step(step: int, A: int, max_norm: float, hooks: Hooks, parallel: Parallel, optimizer: Adafactor,
              guard: NonFinite, device: torch.device, flops_per_token: Callable[[int], float]) -> tuple | None:
    """Optimizer step `step` (1-based): A micro-batches forward and backward, clip, step. Returns its (loss,
    gradient norm) on the device, this rank's tokens and FLOPs; None when the guard skipped it."""
    step_loss, tokens, flops, waited = torch.zeros((), device=device), 0, 0.0, 0.0
    remedy = "lower --batch_size or --tokens_per_sample"  # they size the activations
    remedy += "" if parallel.model.activation_checkpointing else ", or use --activation_checkpointing"
    with out_of_memory_is_one_line(f"in training step {step:,} on {device.type}", remedy):
        for micro in range(A):
            started = time.perf_counter()
            batch = hooks.next_batch()
            waited += time.perf_counter() - started
            with parallel.gradient_sync(micro == A - 1):  # gradients are reduced once, on the last one
                with autocast(device):
                    loss = parallel.wrapped(*batch) / A  # the step's loss is the mean over its micro-batches
                loss.backward()
            step_loss += loss.detach()
            tokens += batch[0].numel()
            flops += batch[0].numel() * flops_per_token(batch[0].size(1))
        norm = parallel.clip_grad_norm_(max_norm)
    skip = guard.skip(step, step_loss, norm)
    if not skip:
        with out_of_memory_is_one_line(f"in the optimizer step {step:,} on {device.type}", OPTIMIZER_REMEDY):
            optimizer.step()  # its state is allocated at the first step
    optimizer.zero_grad(set_to_none=True)
    return None if skip else (step_loss, norm, tokens, flops, waited)


def log_metrics(step: int, lr: float, window: Totals, parallel: Parallel, log: RunLog, ctx: Distributed,
                device: torch.device) -> None:
    """A log interval's line and TensorBoard points: loss and gradient norm averaged over its steps (and the
    ranks), the learning rate, tokens/s, MFU against the device's peak where known, peak memory on CUDA."""
    synchronize(device)
    seconds = time.perf_counter() - window.started
    values = {"learning_rate": lr, "tokens_per_s": window.tokens * ctx.world_size / seconds}
    if window.steps:
        values["cross_entropy"] = parallel.all_reduce_mean(window.loss).item() / window.steps
        values["gradient_norm"] = window.norm.item() / window.steps  # the global norm: the same on every rank
    if log.peak_tflops:
        values["mfu"] = window.flops / seconds / (log.peak_tflops * 1e12)  # this rank's FLOPs on its device
    if device.type == "cuda":
        values["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    if window.skipped:
        values["skipped_steps"] = window.skipped
    values["data_wait"] = window.data_seconds / seconds  # the fraction of the time spent waiting for batches
    log.scalars(step, "train", **values)
    log.line(step, values)


def end_epoch(step: int, lr: float, totals: Totals, plan: Plan, hooks: Hooks, parallel: Parallel,
              log: RunLog, ctx: Distributed, device: torch.device) -> None:
    """The epoch's line, averaged over the ranks (its one host sync); then evaluation and a checkpoint
    when they are due."""
    loss = parallel.all_reduce_mean(totals.loss).item() / max(1, totals.steps)
    norm = totals.norm.item() / max(1, totals.steps)  # the global norm: already the same on every rank
    synchronize(device)
    tokens_per_s = totals.tokens * ctx.world_size / (time.perf_counter() - totals.started)
    epoch = step // plan.steps_per_epoch
    log.progress.set_postfix(loss=f"{loss:.3f}", refresh=False)
    skipped = f", {steps_text(totals.skipped)} skipped (non-finite)" if totals.skipped else ""
    log.write(f"epoch {epoch}/{plan.num_epochs}: cross-entropy {loss:.4f}, gradient norm {norm:.3f}, "
              f"lr {lr:.2e}, {tokens_per_s:,.0f} tokens/s{skipped}")
    last = step == plan.total_steps
    if epoch % plan.eval_interval == 0 or last:
        log.perplexity(step, evaluate(parallel.wrapped, ctx, hooks.eval_batches(), device))
        log.samples(step, hooks.samples)
    if epoch % plan.checkpoint_interval == 0 or last:
        try:
            write_checkpoint(ctx, gathered_state(hooks, step), plan.checkpoint_path)
        except UserError:  # a full disk: end the progress bar's line before the error's
            log.close()
            raise
        log.write(f"saved checkpoint to {plan.checkpoint_path}")
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
    write_checkpoint(ctx, gathered_state(hooks, step), plan.checkpoint_path)
    log.close()
    name = stop.name() if stop.requested else "a signal on another rank"
    raise Interrupted(f"stopped by {name}: checkpoint at step {step:,} saved to {plan.checkpoint_path}; "
                      f"continue with --resume", stop.exit_code())
