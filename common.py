"""Plumbing shared by every LightGPT script: argument checks and the shared flags, one-line errors,
devices and precision, atomic files, checkpoints, interrupt handling, and the rank-aware spots
(printing, writing files)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import pickle
import re
import signal
import socket
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from model import (POSITION_ENCODINGS, GPT, GPTConfig, add_lora, grow_vocabulary, lora_state_dict, merge_lora,
                   trainable_by_kind)

CHECKPOINT_VERSION = 1


class UserError(Exception):
    """A problem the user can fix (a flag, a file, the network): shown as one line, exit status 2.
    `everywhere` marks an error every rank raised together, which only rank 0 prints."""

    def __init__(self, message: str, everywhere: bool = False):
        super().__init__(message)
        self.everywhere = everywhere


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the work in progress was saved. Carries the exit status to use."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


NOTHING_SAVED = "before the first step; nothing was saved"  # how Stopped ends a trainer's message


class Stopped(KeyboardInterrupt):
    """SIGINT/SIGTERM arrived before there was anything to save (setting up, tokenizing, the first
    evaluation): the work is abandoned as Ctrl-C abandons it, a KeyboardInterrupt, so every `with` block
    on the way out cleans up (atomic writes remove their temporary files) and no `except Exception`
    mistakes it for an error. `what` finishes "stopped by SIGTERM ...". signal_number None: a signal on
    another rank. `everywhere` as for UserError."""

    def __init__(self, signal_number: int | None, what: str, everywhere: bool = False):
        self.signal_number, self.what, self.everywhere = signal_number, what, everywhere
        super().__init__(str(self))

    def __str__(self) -> str:
        name = signal.Signals(self.signal_number).name if self.signal_number else "a signal on another rank"
        return f"stopped by {name} {self.what}"

    @property
    def exit_code(self) -> int:
        return 128 + (self.signal_number or signal.SIGINT)


def first_line(exc: BaseException, limit: int = 200, with_type: bool = False) -> str:
    """The first line of an exception's message (at most `limit` characters, cut after a whole word and
    marked " ..."), or its type name when the message is empty; with_type puts the type name first
    ("OSError: ..."). Library errors can run to pages, and a one-line error must stay one line."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = text.splitlines()[0]
    if len(line) > limit:
        line = line[: limit - 4].rsplit(" ", 1)[0].rstrip(" ,;:") + " ..."
    return f"{type(exc).__name__}: {line}" if with_type else line


# ----------------------------------------------------------------------------- arguments


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with "(default: X)", once: not after a help that already says what its
    default is, nor for a switch (off unless given) or a None default (its help says what happens)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error instead of the usage block, and HelpFormatter's --help."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        if formatter_class is argparse.ArgumentDefaultsHelpFormatter:  # the scripts ask for argparse's, which
            formatter_class = HelpFormatter  # repeats a default a help already names
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(kind, name, check):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        if kind is float and not (value == value and abs(value) != float("inf")):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if not check(value):
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}")
        return value

    parse.__name__ = name  # argparse names the type in its messages
    return parse


positive_int = _number(int, "a positive integer", lambda v: v > 0)
non_negative_int = _number(int, "an integer >= 0", lambda v: v >= 0)
positive_float = _number(float, "a positive number", lambda v: v > 0)
non_negative_float = _number(float, "a number >= 0", lambda v: v >= 0)
probability = _number(float, "a number in [0, 1)", lambda v: 0 <= v < 1)
unit_interval = _number(float, "a number in (0, 1]", lambda v: 0 < v <= 1)
non_positive_float = _number(float, "a number <= 0", lambda v: v <= 0)
seed_int = _number(int, "an integer in [0, 2**63)", lambda v: 0 <= v < 2**63)  # generators take 64 bits


def float_in(low: float, high: float):
    """An argparse type for a number in [low, high]."""
    return _number(float, f"a number in [{low:g}, {high:g}]", lambda v: low <= v <= high)


# The flags that set the model's shape: every GPTConfig field but the vocabulary, which the tokenizer sets.
ARCHITECTURE_FLAGS = tuple(f.name for f in fields(GPTConfig) if f.name != "vocabulary_size")


# --model names a shape so nobody types its flags: the model card's six (README "Suggested model shapes"),
# each with the tokenizer it was sized for and that tokenizer's vocabulary (bench.py's random model takes
# it; pretrain.py reads it from the token files), and the README's quick start, a whole offline run.
# A preset fills only the flags a command line leaves out (parse_with_preset), and only those the script has.
MODEL_PRESETS: dict[str, dict] = {
    "small": dict(embedding_dimensions=1024, num_attention_heads=16, num_hidden_layers=24,
                  token_encoding="r50k_base", vocabulary_size=50_257),
    "medium": dict(embedding_dimensions=2048, num_attention_heads=32, num_hidden_layers=32,
                   token_encoding="r50k_base", vocabulary_size=50_257),
    "large": dict(embedding_dimensions=4096, num_attention_heads=64, num_hidden_layers=32,
                  token_encoding="cl100k_base", vocabulary_size=100_277),
    "xlarge": dict(embedding_dimensions=4096, num_attention_heads=64, num_hidden_layers=64,
                   token_encoding="cl100k_base", vocabulary_size=100_277),
    "xxlarge": dict(embedding_dimensions=8192, num_attention_heads=128, num_hidden_layers=64,
                    token_encoding="o200k_base", vocabulary_size=200_019),
    "xxxlarge": dict(embedding_dimensions=8192, num_attention_heads=128, num_hidden_layers=128,
                     token_encoding="o200k_base", vocabulary_size=200_019),
    "quickstart": dict(dataset="builtin", token_encoding="bytes", vocabulary_size=257, device="cpu",
                       embedding_dimensions=256, num_attention_heads=4, num_hidden_layers=4,
                       batch_size=16, gradient_accumulation_steps=1, tokens_per_sample=256,
                       samples_per_epoch=1024, num_epochs=4, eval_interval=1, warmup_steps=50,
                       learning_rate=2e-2, seed=0,
                       checkpoint_path="./checkpoints/quickstart.pt", run_dir_path="./runs/quickstart"),
}


def parse_with_preset(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse a command line that may name a --model preset. Each flag takes the command line's value if
    it gives one (even one equal to the default), else the preset's, else its default."""
    args = p.parse_args(argv)
    unset = object()  # a second parse into a namespace of sentinels tells which flags were given
    given = p.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), unset)))
    for key, value in MODEL_PRESETS[args.model].items():
        if hasattr(args, key) and getattr(given, key) is unset:
            setattr(args, key, value)
    return args


def add_model_args(g) -> None:
    """The architecture flags pretrain.py and bench.py share (the Small shape by default), one per
    ARCHITECTURE_FLAGS entry."""
    # --model takes effect only when the script parses with parse_with_preset
    g.add_argument("--model", choices=tuple(MODEL_PRESETS), default="small",
                   help="a named shape (with its tokenizer), or quickstart, the README's whole offline run; "
                        "flags given on the command line override it")
    g.add_argument("--embedding_dimensions", type=positive_int, default=1024, help="model width")
    g.add_argument("--num_attention_heads", type=positive_int, default=16, help="attention heads per block")
    g.add_argument("--num_hidden_layers", type=positive_int, default=24, help="Transformer blocks")
    g.add_argument("--feed_forward_ratio", type=int, choices=(1, 2, 4), default=4,
                   help="MLP hidden width / model width")
    g.add_argument("--dropout", type=probability, default=0.1, help="dropout probability")
    g.add_argument("--position_encoding", choices=POSITION_ENCODINGS, default="none",
                   help="an ablation switch: rope or alibi add positions to attention; "
                        "none (NoPE) is LightGPT's design")


def add_system_args(g, compile_help: str | None = "torch.compile the model (auto: on for CUDA)",
                    seed_default: int | None = None, seed_help: str | None = "random seed") -> None:
    """--device, --compile and --seed, which the scripts share. compile_help=None leaves --compile out
    (a script that never compiles), seed_help=None leaves --seed out (a deterministic one); each
    script says what its seed and compilation cover."""
    g.add_argument("--device", default="cuda", help="cpu, cuda, cuda:N or mps")
    if compile_help is not None:
        g.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help=compile_help)
    if seed_help is not None:
        g.add_argument("--seed", type=seed_int, default=seed_default, help=seed_help)


def add_optimizer_args(g, warmup_steps: int, low_memory_names: tuple = ("--low_memory_optimizer",)) -> None:
    """The learning-rate schedule, Adafactor and clipping flags the trainers share (each its own warmup;
    the card names the low-memory flag differently for instruction tuning, so both names are taken there)."""
    g.add_argument("--warmup_steps", type=non_negative_int, default=warmup_steps,
                   help="optimizer steps of linear learning-rate warmup")
    g.add_argument("--lr_schedule", choices=("cosine", "linear", "constant"), default="cosine",
                   help="learning-rate decay after warmup")
    g.add_argument("--min_lr_ratio", type=probability, default=0.1,
                   help="final learning rate as a fraction of the peak (cosine/linear)")
    g.add_argument("--rms_decay", type=non_positive_float, default=-0.8,
                   help="Adafactor's decay exponent of the second-moment (RMS) average; at most 0")
    g.add_argument(*low_memory_names, action="store_true",
                   help="single-tensor Adafactor updates: less memory, a little slower")
    g.add_argument("--max_gradient_norm", type=positive_float, default=1.0,
                   help="clip the global gradient norm to this value")


def add_model_path_args(p, lora_use: str) -> None:
    """--checkpoint_path and --lora_path, as every script that loads a model for inference takes them
    (inference_model); lora_use ends the --lora_path help: what the adapted model is used for."""
    p.add_argument("--checkpoint_path", default="./checkpoints/checkpoint.pt",
                   help="the model checkpoint, or a folder export.py wrote (or its HuggingFace Hub id)")
    p.add_argument("--lora_path", default=None,
                   help=f"a LoRA checkpoint from instruction-tune.py for the base --checkpoint_path: {lora_use}")


def add_distributed_args(g) -> None:
    """The torchrun flags the trainers share (ignored in a single process)."""
    g.add_argument("--ddp_sharding_level", type=int, choices=(0, 2, 3), default=2,
                   help="under torchrun: 0 DDP, 2 shard gradients and optimizer state, 3 shard everything")
    g.add_argument("--collective_timeout", type=positive_float, default=10.0,
                   help="under torchrun: minutes a collective waits for a rank, after the first step, before all stop")


def model_config(args, vocabulary_size: int) -> GPTConfig:
    """The GPTConfig the architecture flags describe; a shape GPTConfig rejects is a user error."""
    try:
        return GPTConfig(vocabulary_size=vocabulary_size, **{k: getattr(args, k) for k in ARCHITECTURE_FLAGS})
    except ValueError as e:
        raise UserError(str(e)) from None


def run_main(main: Callable, parse_args: Callable, argv=None) -> None:
    """Entry point for every script: user errors and interrupts end with one line, never a traceback."""
    try:
        main(parse_args(argv))
    except UserError as e:
        if not e.everywhere or is_main_process():
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:  # raised by every rank at the same step
        if is_main_process():
            print(str(e), file=sys.stderr)
        sys.exit(e.exit_code)
    except Stopped as e:
        if not e.everywhere or is_main_process():
            print(str(e), file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # whoever read our output left (`| head`): stop quietly, as Unix tools do
        with contextlib.suppress(OSError, ValueError):  # and let no exit-time flush raise again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + signal.SIGPIPE)


# ----------------------------------------------------------------------------- devices and precision


def resolve_device(name: str) -> torch.device:
    """Turn --device into a torch.device, or explain in one line why it cannot be used here."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device name; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    elif device.type != "cpu":
        raise UserError(f"--device {name!r} is not supported; use cpu, cuda, cuda:N or mps")
    return device


def bf16_supported(device: torch.device) -> bool:
    """Whether to compute in bf16 on `device`: only on CUDA devices that run it natively. The CPU (and
    MPS) would emulate it, slower than fp32, so there everything stays fp32. The one place this is decided."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def autocast(device: torch.device):
    """bf16 autocast where bf16_supported(device); full fp32 elsewhere."""
    if bf16_supported(device):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compile_enabled(choice: str, device: torch.device) -> bool:
    """--compile on/off, or auto: compile on CUDA, where it pays; eager elsewhere."""
    return choice == "on" or (choice == "auto" and device.type == "cuda")


def precision_name(device: torch.device) -> str:
    return "bf16" if bf16_supported(device) else "fp32"


def check_memory(needed_bytes: int, device: torch.device, what: str) -> None:
    """Refuse up front, in one line, an allocation the device cannot hold (on the CPU a huge allocation
    can succeed lazily and be killed later, on a GPU it fails mid-way): `what` names the flags."""
    if device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[0]
    else:
        available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if needed_bytes > available:
        raise UserError(f"{what} needs {needed_bytes / 2**30:,.1f} GiB, more than the "
                        f"{available / 2**30:,.1f} GiB this {device.type} has; lower it")


@contextlib.contextmanager
def out_of_memory_is_one_line(what: str, remedy: str):
    """An allocation that fails inside (torch.OutOfMemoryError on a GPU, the CPU allocator's RuntimeError)
    becomes one line, "out of memory <what>: <remedy>", where the remedy names the flags to change."""
    try:
        yield
    except RuntimeError as e:  # torch.OutOfMemoryError is one
        text = str(e)
        if not (isinstance(e, torch.OutOfMemoryError)
                or any(s in text for s in ("can't allocate memory", "not enough memory", "out of memory"))):
            raise
        raise UserError(f"out of memory {what}: {remedy}") from None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- distributed
# torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them everything runs as one process and
# these helpers are no-ops. Printing and file writing go through rank 0.


@dataclass
class Distributed:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    control_group: object = None  # a gloo group for small CPU messages (stop flags, errors)
    probe_group: object = None  # a gloo group left idle, to find out who still answers when a collective failed
    collective_timeout: timedelta = timedelta(minutes=10)  # what collectives wait after shorten_timeouts()

    @property
    def enabled(self) -> bool:
        return dist.is_available() and dist.is_initialized()


# The other ranks wait on the gloo control group while each node's first process downloads and
# tokenizes the corpus, which can take far longer than gloo's 30-minute default. shorten_timeouts()
# brings it down to --collective_timeout once training is under way.
CONTROL_TIMEOUT = timedelta(hours=6)


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def setup_distributed(device_name: str, collective_timeout: timedelta = timedelta(minutes=10)
                      ) -> tuple[Distributed, torch.device]:
    """Join the process group torchrun prepared (NCCL on CUDA, gloo on the CPU), one device per local
    rank. Returns the rank layout and this process's device; collective_timeout is for shorten_timeouts()."""
    device = resolve_device(device_name)
    if not launched_by_torchrun():
        return Distributed(), device
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} has no GPU: this node shows {torch.cuda.device_count()}; "
                            f"lower --nproc-per-node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    elif device.type == "cpu":
        dist.init_process_group("gloo", timeout=CONTROL_TIMEOUT)
        control = dist.group.WORLD
    else:
        raise UserError(f"--device {device_name}: distributed training runs on cuda (NCCL) or cpu (gloo)")
    probe = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return Distributed(rank, local_rank, world, control, probe, collective_timeout), device


def silent_ranks(ctx: Distributed) -> list[int]:
    """After a collective failed: the ranks that do not answer within collective_timeout. Rank 0 collects
    an answer from every rank and sends the list to those that answered; when rank 0 is silent, the others
    name it. It runs on the probe group, which nothing else uses, so no half-done operation of the failed
    collective is in its way."""
    group, seconds = ctx.probe_group, ctx.collective_timeout.total_seconds()
    deadline = time.monotonic() + seconds

    def arrives(work) -> bool:
        try:
            return work.wait(timeout=timedelta(seconds=max(deadline - time.monotonic(), 0.001))) is not False
        except RuntimeError:  # gloo: "Timed out waiting ... for recv operation to complete"
            return False

    verdict = torch.zeros(ctx.world_size)  # 1 marks a silent rank
    if ctx.rank == 0:
        answers = {r: dist.irecv(torch.zeros(1), src=r, group=group) for r in range(1, ctx.world_size)}
        for r, work in answers.items():
            verdict[r] = not arrives(work)
        for r in range(1, ctx.world_size):
            if not verdict[r]:
                dist.send(verdict, dst=r, group=group)
        return verdict.nonzero().flatten().tolist()
    hello = dist.isend(torch.zeros(1), dst=0, group=group)  # not waited on: rank 0 may be the silent one
    deadline += seconds  # rank 0 waits up to one timeout for the others before it answers
    if not arrives(dist.irecv(verdict, src=0, group=group)):
        return [0]
    return verdict.nonzero().flatten().tolist()


def lost_rank(error: BaseException) -> bool:
    """Whether a collective failed because another rank stopped answering or went away."""
    text = str(error)
    return isinstance(error, dist.DistError) or any(
        s in text for s in ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer"))


def shorten_timeouts(ctx: Distributed, device: torch.device) -> None:
    """Every rank calls this after its first optimizer step: from here on every collective (the default
    group's, the control group's) waits at most collective_timeout for the other ranks. Set-up, the first
    evaluation and the first step (tokenizing, building and compiling) keep the long timeouts, as
    torchtitan does. The barrier comes first, under the long timeout, so that no rank waits with the
    short one for a peer still finishing its first step."""
    if not ctx.enabled:
        return
    from torch.distributed.distributed_c10d import _set_pg_timeout  # private; torchtitan's way to do it

    synchronize(device)
    dist.barrier(group=ctx.control_group)
    for group in (None, ctx.control_group):  # None: the default group
        _set_pg_timeout(ctx.collective_timeout, group)


@contextlib.contextmanager
def lost_rank_is_one_line(ctx: Distributed):
    """A collective that fails because a rank stopped answering (a timeout) or went away becomes one line
    naming that rank, on every rank still running (UserError, exit status 2), instead of a traceback. On
    GPUs NCCL's watchdog may end the process first, after the same timeout (torchrun sets
    TORCH_NCCL_ASYNC_ERROR_HANDLING=1)."""
    try:
        yield
    except RuntimeError as e:  # gloo and NCCL raise RuntimeErrors (DistError among them)
        if not (ctx.enabled and lost_rank(e)):
            raise
        silent = [r for r in silent_ranks(ctx) if r != ctx.rank]
        limit = f"--collective_timeout {ctx.collective_timeout.total_seconds() / 60:g} minutes"
        if not silent:
            raise UserError(f"a collective failed in training: {first_line(e)} ({limit})") from None
        ranks = f"rank {silent[0]}" if len(silent) == 1 else f"ranks {', '.join(map(str, silent))}"
        raise UserError(f"{ranks} stopped answering in training (no reply within {limit}); every rank stops, "
                        f"saving nothing: continue from the last checkpoint with --resume") from None


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def print0(*args, **kwargs) -> None:
    if is_main_process():
        print(*args, **kwargs, flush=True)


def agree(ctx: Distributed, work: Callable, who: str = "all"):
    """Run `work` on the ranks named by `who` ("all", "rank0" or "local0"), and make a UserError on any
    of them a UserError on every rank, so all ranks stop together with the same one-line message
    instead of some waiting forever. With who="rank0" the result is broadcast to every rank."""
    if not ctx.enabled:
        return work()
    runs_here = who == "all" or (who == "rank0" and ctx.rank == 0) or (who == "local0" and ctx.local_rank == 0)
    result, error = None, None
    if runs_here:
        try:
            result = work()
        except UserError as e:
            error = str(e)
    errors = [None] * ctx.world_size
    dist.all_gather_object(errors, error, group=ctx.control_group)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise UserError(first, everywhere=True)
    if who == "rank0":
        box = [result]
        dist.broadcast_object_list(box, src=0, group=ctx.control_group)
        result = box[0]
    return result


# ----------------------------------------------------------------------------- files


def current_umask() -> int:
    """The process umask. Reading it means setting it, so it is set straight back."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path beside `path`; on success it is renamed over `path`, on any failure it
    is removed, so `path` only ever holds a complete file (the old one or the new one). The file gets
    the mode open() gives a new file (0666 less the umask), not mkstemp's private 0600."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    try:
        yield tmp
        fsync_path(tmp)  # the data is on the disk before the name points at it: after a power cut the
        os.replace(tmp, path)  # old file or the whole new one, never an empty "new" one
        fsync_path(directory, folder=True)  # and the rename itself is on the disk
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def fsync_path(path: str, folder: bool = False) -> None:
    """Flush a file's (or a folder's entries') writes to the disk. A folder on a file system that cannot
    sync one (EINVAL) is let be."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if folder else 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if not folder or e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def os_reason(error: OSError) -> str:
    """An OSError's cause in a few words: "no space left on device", "permission denied"."""
    return os.strerror(error.errno).lower() if error.errno else first_line(error)


def check_writable(folder: str, flag: str) -> None:
    """Make `folder` and write, sync and remove a small file in it, so that an output folder a run cannot
    use (a file in the way, permissions, a read-only or full disk) stops it before any work, not at the
    first save after an epoch of it."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".lightgpt-probe-")
        try:
            os.write(fd, b"LightGPT checks that it can write here\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as e:
        raise UserError(f"{flag}: cannot write to {folder} ({os_reason(e)})") from None


def remove_stale_temporaries(path: str, before: float) -> tuple[int, int]:
    """Remove the temporary files atomic_path(path) left when a run died while saving (kill -9, a power
    cut, a launcher's SIGKILL after its grace period), written before `before`: the time this run took the
    path's CheckpointLock, so whoever wrote them is gone. Returns how many files and bytes were removed."""
    folder, name = os.path.split(os.path.abspath(path))
    pattern = re.compile(re.escape(name) + r"\.[a-z0-9_]{8}\.tmp")  # atomic_path's names: mkstemp's 8 letters
    count = size = 0
    for entry in os.scandir(folder):
        if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            st = entry.stat(follow_symlinks=False)
            if st.st_mtime < before:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(entry.path)
                    count, size = count + 1, size + st.st_size
    return count, size


# ----------------------------------------------------------------------------- checkpoints


class CheckpointLock:
    """One run per checkpoint: an exclusive flock on `<checkpoint>.lock`, beside it, held for the life of
    a run and naming its holder (pid, host, start), so that a second run stops at once and says who has
    it. The kernel drops a flock when its holder dies, kill -9 included, so a crashed run leaves nothing
    stuck; a clean release removes the file. A context manager, or acquire() and release()."""

    def __init__(self, path: str, flag: str = "--checkpoint_path"):
        self.path, self.flag = path, flag
        self.lock_path = path + ".lock"
        self.fd: int | None = None
        self.since: float | None = None  # when this process took the lock

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise UserError(f"{self.flag}: cannot create the lock file {self.lock_path} ({os_reason(e)})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process that is starting"
                os.close(fd)
                raise UserError(f"{self.flag}: {self.path} is in use by another run ({holder}); wait for it to end, "
                                f"or choose another {self.flag}") from None
            except OSError as e:  # a file system without locks: go on unguarded, and say so
                os.close(fd)
                print0(f"warning: cannot lock {self.lock_path} ({os_reason(e)}); nothing stops a second run from "
                       f"writing {self.path} at the same time")
                return
            try:  # a holder that was releasing removed the file after we opened it: lock the one there now
                if os.path.samestat(os.fstat(fd), os.stat(self.lock_path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self.fd, self.since = fd, time.time()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.remove(self.lock_path)  # while still held: no one can have locked this file meanwhile
        os.close(self.fd)  # drops the lock
        self.fd = None

    def __enter__(self) -> "CheckpointLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def state_digest(state: dict) -> str:
    """sha256 of a checkpoint's contents in a fixed order: every entry's key, every tensor's dtype, shape
    and bytes, every other value's type and repr. Stored at save and checked at load, so that a flipped
    bit (torch.load reads one without a word, and a resumed run would then overwrite the file) or an edit
    is refused. torch's zip records carry CRC32s too, but torch.load does not check them and
    torch.serialization.set_crc32_options(False) writes none."""
    h = hashlib.sha256()

    def visit(value) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"tensor {t.dtype} {tuple(t.shape)}:".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, dict):
            h.update(f"dict {len(value)}:".encode())
            for key in sorted(value, key=repr):
                h.update(f"{key!r}=".encode())
                visit(value[key])
        elif isinstance(value, (list, tuple)):
            h.update(f"{type(value).__name__} {len(value)}:".encode())
            for item in value:
                visit(item)
        else:
            h.update(f"{type(value).__name__} {value!r};".encode())

    visit(state)
    return h.hexdigest()


class _RecordingWriter:
    """The file torch.save writes through, keeping the OSError of a failed write: torch reports one only as
    "unexpected pos 704 vs 598", and its cause (a full disk, a quota) is what the user needs to hear."""

    def __init__(self):
        self.file, self.error = None, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as e:
            self.error = e
            raise


def save_checkpoint(state: dict, path: str, flag: str = "--checkpoint_path") -> None:
    """Write a checkpoint with the sha256 of its contents (rank 0 only): to a temporary file, synced and
    renamed, so an interrupted save never corrupts the last one. A failed write (a full disk) is one line."""
    if not is_main_process():
        return
    state = {"version": CHECKPOINT_VERSION, **state}
    state["sha256"] = state_digest(state)
    writer = _RecordingWriter()
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as writer.file:
            torch.save(state, writer)
    except (OSError, RuntimeError) as e:
        error = writer.error or e
        if not isinstance(error, OSError):
            raise  # not the disk: a bug, which deserves its traceback
        step = f" step {state['step']:,}" if isinstance(state.get("step"), int) else ""
        kept = "the checkpoint already there is intact" if os.path.exists(path) else "no checkpoint was written"
        raise UserError(f"{flag}: cannot save{step} to {path} ({os_reason(error)}); {kept}") from None


def unloadable_reason(path: str, error: Exception) -> str:
    """Why torch.load could not read `path`, in a few words of our own. A PyTorch file is a zip archive
    whose first entry is <name>/data.pkl (that local header survives when the file is cut short), or in
    the legacy format a pickle, which starts with its protocol opcode."""
    with open(path, "rb") as f:
        head = f.read(256)
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        name_length = int.from_bytes(head[26:28], "little")
        if not head[30 : 30 + name_length].endswith(b"data.pkl"):
            return "a zip archive, not a PyTorch file"
    elif not head.startswith(b"\x80"):
        return "not a PyTorch file"
    if isinstance(error, pickle.UnpicklingError) and "weights only" in str(error).lower():
        return "it holds Python objects other than tensors and plain data"
    return "a truncated or damaged PyTorch file"


# The checkpoint's schema: what each entry holds, as (type, check or None, the words for both). A script
# names the entries it needs (required=); whatever is present is checked.
CHECKPOINT_ENTRIES = {
    "kind": (str, None, "a string"),
    "config": (dict, None, "a dict of GPTConfig fields"),
    "model": (dict, None, "a dict of weights"),
    "token_encoding": (str, None, "a string"),
    "eot_id": (int, lambda v: v >= 0, "an integer >= 0"),
    "optimizer": (dict, None, "torch.optim's state dict"),
    "step": (int, lambda v: v >= 0, "an integer >= 0"),
    "steps_per_epoch": (int, lambda v: v >= 1, "a positive integer"),
    "sampler": (dict, lambda v: isinstance(v.get("generator"), torch.Tensor)
                and isinstance(v.get("samples_drawn"), int),
                "a dict with a generator state and samples_drawn"),
    "rng": (list, lambda v: v and all(isinstance(r, dict) and isinstance(r.get("torch"), torch.Tensor) for r in v),
            "a list of RNG states, one per process"),
    "seed": (int, lambda v: 0 <= v < 2**63, "an integer in [0, 2**63)"),
    "world_size": (int, lambda v: v >= 1, "a positive integer"),
    "dataset": (str, None, "a string"),
    "args": (dict, None, "a dict of flags"),
    # LoRA checkpoints (instruction-tune.py): the trained weights only, and the base they adapt
    "adapters": (dict, None, "a dict of adapter weights"),
    "lora": (dict, lambda v: _is(v.get("rank"), int) and v["rank"] >= 1 and _is(v.get("alpha"), float)
             and _is(v.get("dropout"), float) and 0 <= v["dropout"] < 1,
             "a dict of rank (>= 1), alpha and dropout (in [0, 1))"),
    "base": (dict, lambda v: isinstance(v.get("sha256"), str) and _is(v.get("vocabulary_size"), int),
             "a dict of the base checkpoint's sha256 and vocabulary_size"),
    # chat models (LoRA checkpoints and merged ones): the ChatML special tokens after the base vocabulary
    "special_tokens": (list, lambda v: v and all(isinstance(t, str) for t in v), "a list of token strings"),
}  # and "version" and "sha256", checked by load_checkpoint before the rest
MODEL_ENTRIES = ("config", "model", "token_encoding", "eot_id")  # enough to generate
TRAINING_ENTRIES = ("optimizer", "step", "sampler", "rng", "seed")
RESUME_ENTRIES = (*MODEL_ENTRIES, *TRAINING_ENTRIES)  # enough to continue training
LORA_ENTRIES = ("config", "adapters", "lora", "base", "special_tokens", "token_encoding", "eot_id")  # enough to chat


def _shown(value) -> str:
    if isinstance(value, (str, int, float, bool, type(None))):
        text = repr(value)
        return text if len(text) <= 40 else text[:36] + " ..."
    return f"a {type(value).__name__}" if not isinstance(value, (list, dict)) or value else repr(value)


def _is(value, kind) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


LATER_CONFIG_FIELDS = ("position_encoding",)  # GPTConfig fields older checkpoints lack; they mean the default


def checkpoint_problem(state: dict, required: tuple[str, ...] = ()) -> str | None:
    """What is wrong with a loaded LightGPT checkpoint (kind and version already checked), in words that
    follow "its file is not usable: ", or None. The one place the checkpoint's schema is checked."""
    for key in required:
        if key not in state:
            return f"it has no {key!r} entry"
    for key, (kind, check, words) in CHECKPOINT_ENTRIES.items():
        if key in state and not (_is(state[key], kind) and (check is None or check(state[key]))):
            return f"its {key!r} is {_shown(state[key])}, expected {words}"
    if "config" not in state:
        return None
    config = state["config"]
    for f in fields(GPTConfig):
        if f.name not in config:
            if f.name in LATER_CONFIG_FIELDS:
                continue  # a checkpoint from before the field: from_dict takes its default
            return f"its config has no {f.name!r}"
        kind = type(f.default)
        if not _is(config[f.name], kind):
            words = {int: "an integer", float: "a number", str: "a string"}[kind]
            return f"its config's {f.name!r} is {_shown(config[f.name])}, expected {words}"
    try:
        config = GPTConfig.from_dict(config)
    except ValueError as e:
        return f"its config is invalid ({e})"
    if "eot_id" in state and state["eot_id"] >= config.vocabulary_size:
        return f"its 'eot_id' {state['eot_id']} is not in its vocabulary of {config.vocabulary_size}"
    with torch.device("meta"):  # shapes without memory, whatever the model's size
        model = GPT(config)
    if "model" in state:
        weights, expected = state["model"], model.state_dict()
        for name, like in expected.items():
            if name not in weights:
                return f"weight {name!r} is missing"
            w = weights[name]
            if not isinstance(w, torch.Tensor) or not w.is_floating_point():
                return f"weight {name!r} is {_shown(w) if not isinstance(w, torch.Tensor) else w.dtype}, " \
                       f"expected floating-point numbers"
            if w.shape != like.shape:
                return f"weight {name!r} has shape {tuple(w.shape)}; its config needs {tuple(like.shape)}"
        for name in weights:
            if name not in expected:
                return f"unexpected weight {name!r}"
    if "special_tokens" in state and "base" in state:
        expected = state["base"]["vocabulary_size"] + len(state["special_tokens"])
        if config.vocabulary_size != expected:
            return (f"its vocabulary of {config.vocabulary_size} is not the base's {state['base']['vocabulary_size']} "
                    f"plus its {len(state['special_tokens'])} special tokens")
    if "adapters" in state:
        return _adapters_problem(state, model)
    if "optimizer" in state:
        return _optimizer_problem(state["optimizer"], list(model.parameters()))
    return None


def _adapters_problem(state: dict, model: GPT) -> str | None:
    """A LoRA checkpoint's adapters and optimizer state against the adapted model's trainable weights."""
    if "lora" not in state or "base" not in state or "special_tokens" not in state:
        return "it has adapters but not the 'lora', 'base' and 'special_tokens' entries that describe them"
    lora = state["lora"]
    add_lora(model, lora["rank"], lora["alpha"], lora["dropout"],
             (state["base"]["vocabulary_size"], len(state["special_tokens"])))
    expected = lora_state_dict(model)
    for name, like in expected.items():
        w = state["adapters"].get(name)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.shape != like.shape:
            found = "missing" if w is None else f"{tuple(w.shape)}" if isinstance(w, torch.Tensor) else _shown(w)
            return f"adapter weight {name!r} is {found}; rank {lora['rank']} needs {tuple(like.shape)}"
    for name in state["adapters"]:
        if name not in expected:
            return f"unexpected adapter weight {name!r}"
    if "optimizer" in state:
        return _optimizer_problem(state["optimizer"], sum(trainable_by_kind(model).values(), []))
    return None


def _optimizer_problem(optimizer: dict, params: list) -> str | None:
    """Adafactor's state in torch.optim.Adafactor's format against the parameters, in the optimizer's order."""
    state, groups = optimizer.get("state"), optimizer.get("param_groups")
    if not isinstance(state, dict) or not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        return "its optimizer state is not in torch.optim's format (a dict of 'state' and 'param_groups')"
    covered = sum(len(g.get("params", ())) for g in groups)
    if covered != len(params):
        return f"its optimizer state covers {covered} parameters; its model has {len(params)}"
    for index, entry in state.items():
        if not _is(index, int) or not 0 <= index < len(params) or not isinstance(entry, dict):
            return f"its optimizer state names a parameter {_shown(index)} of {len(params)}"
        shape = tuple(params[index].shape)
        expected = {"row_var": (*shape[:-1], 1), "col_var": (*shape[:-2], 1, *shape[-1:]), "variance": shape}
        for key, value in entry.items():
            if key in expected and (not isinstance(value, torch.Tensor) or tuple(value.shape) != expected[key]):
                found = tuple(value.shape) if isinstance(value, torch.Tensor) else _shown(value)
                return f"optimizer state {key!r} of parameter {index} has shape {found}; expected {expected[key]}"
    return None


def load_checkpoint(path: str, kind: str, flag: str = "--checkpoint_path", required: tuple[str, ...] = ()) -> dict:
    """Load a checkpoint onto the CPU (weights only) and check it: a LightGPT checkpoint of `kind`, whole
    (its sha256, where it has one: checkpoints from before checksums load unverified), holding the
    `required` entries, every entry well-formed, weights and optimizer state of its config's shapes."""
    if not os.path.exists(path):
        raise UserError(f"{flag}: no checkpoint at {path}")
    if os.path.isdir(path):
        raise UserError(f"{flag}: {path} is a directory, not a checkpoint file")
    try:
        with warnings.catch_warnings():  # torch warns about some pickles on stderr, under the one-line error
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types, with messages pages long, for a foreign or cut file
        raise UserError(f"{flag}: {path} is not a LightGPT checkpoint ({unloadable_reason(path, e)})") from None
    if not isinstance(state, dict) or "kind" not in state or "version" not in state:
        raise UserError(f"{flag}: {path} is not a LightGPT checkpoint (it loads, but LightGPT did not write it)")
    if state["kind"] != kind:
        raise UserError(f"{flag}: {path} is a {state['kind']!r} checkpoint, expected a {kind!r} checkpoint")
    version = state["version"]
    if not _is(version, int) or version < 1:
        raise UserError(f"{flag}: {path} is not a usable {kind} checkpoint: its format version {_shown(version)} "
                        f"is not a positive integer")
    if version > CHECKPOINT_VERSION:
        raise UserError(f"{flag}: {path} was written by a newer LightGPT (format {version})")
    digest = state.pop("sha256", None)
    if digest is not None and digest != state_digest(state):
        raise UserError(f"{flag}: {path} is damaged: its contents do not match the checksum saved with them (a "
                        f"changed bit on the disk or in a copy); use another copy")
    problem = checkpoint_problem(state, required)
    if problem:
        raise UserError(f"{flag}: {path} is not a usable {kind} checkpoint: {problem}")
    state["sha256"] = digest or state_digest(state)  # its identity: a LoRA checkpoint names its base by it
    return state


def model_from_checkpoint(state: dict) -> GPT:
    """The model a checkpoint holds, on the CPU, from a state load_checkpoint has checked."""
    model = GPT(GPTConfig.from_dict(state["config"]))
    model.load_state_dict(state["model"])
    return model


def check_base(lora: dict, lora_path: str, base: dict, base_path: str, base_flag: str) -> None:
    """A LoRA checkpoint only fits the exact base it was trained on: the same weights, named by the
    base checkpoint's content hash."""
    if lora["base"]["sha256"] != base["sha256"]:
        raise UserError(f"{lora_path} adapts another base model than {base_flag} {base_path} (sha256 "
                        f"{lora['base']['sha256'][:12]}..., this one {base['sha256'][:12]}...); pass the base "
                        f"checkpoint it was trained on")


def lora_model(base: dict, rank: int, alpha: float, dropout: float, new_tokens: int) -> GPT:
    """The base checkpoint's model, its vocabulary grown by `new_tokens` (the chat special tokens), with
    fresh adapters (add_lora) that train together with the new rows."""
    model = grow_vocabulary(model_from_checkpoint(base), new_tokens)
    return add_lora(model, rank, alpha, dropout, (base["config"]["vocabulary_size"], new_tokens))


def adapted_model(base: dict, lora: dict) -> GPT:
    """The base checkpoint's model with a LoRA checkpoint's adapters (not merged; merge_lora folds them
    in). Both states checked by load_checkpoint, the pair by check_base."""
    settings = lora["lora"]
    model = lora_model(base, settings["rank"], settings["alpha"], settings["dropout"], len(lora["special_tokens"]))
    missing = set(model.load_state_dict(lora["adapters"], strict=False).missing_keys)
    assert not missing & set(lora_state_dict(model)), "load_checkpoint checked the adapters"
    return model


# ----------------------------------------------------------------------------- exported models
# An exported folder (export.py, GPT.save_pretrained) holds model.safetensors, the weights alone (safetensors:
# a JSON header and raw tensor bytes, nothing to unpickle), config.json and a README.md model card. config.json
# has the GPTConfig fields at its top level (as huggingface_hub's PyTorchModelHubMixin writes a config), the sha256 of
# model.safetensors (sha256sum's, and the Hub's LFS hash) and the records inference and evaluation read.

EXPORT_FORMAT = 1
WEIGHTS_FILE, CONFIG_FILE, CARD_FILE = "model.safetensors", "config.json", "README.md"
EXPORT_KEYS = ("lightgpt_format", "weights_sha256")  # config.json's own entries, besides the architecture and records


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**24):
            h.update(chunk)
    return h.hexdigest()


def save_exported(model: GPT, folder: str) -> None:
    """Write model.safetensors and config.json (the architecture, the weights' sha256, model.export_info)
    into an existing folder. The output layer is the embedding table (tied), so it is stored once."""
    from safetensors.torch import save_file

    weights = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    if any(name.endswith((".lora_a", ".lora_b", ".base.weight", "token_embeddings.new")) for name in weights):
        raise ValueError("an exported model holds plain weights: merge_lora(model) first")
    path = os.path.join(folder, WEIGHTS_FILE)
    save_file(weights, path, metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~current_umask())  # safetensors makes it private (0600); a shared model is not
    config = {**model.config.to_dict(), "lightgpt_format": EXPORT_FORMAT, **model.export_info,
              "weights_sha256": file_sha256(path)}
    with open(os.path.join(folder, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def is_hub_id(name: str) -> bool:
    """Whether a --checkpoint_path that names no local file could be a HuggingFace Hub model id (owner/name)."""
    if name.count("/") != 1 or name.endswith(".pt") or name.startswith((".", "~")):
        return False
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:  # no hub library (training and decoding need none): a local path then
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def is_exported(path: str) -> bool:
    """Whether --checkpoint_path names an exported folder (or its hub id) rather than a checkpoint file."""
    return os.path.isdir(path) or (not os.path.exists(path) and is_hub_id(path))


def hub_download(repo_id: str, flag: str, revision: str | None = None) -> str:
    """The local folder of a hub model's config.json and model.safetensors: from the HuggingFace cache
    when offline or when the hub cannot be reached, else downloaded (and cached)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    from data import HUB_TIMEOUT, _hub_offline, hub_reachable

    files = dict(repo_id=repo_id, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE], revision=revision)
    offline = _hub_offline(("HF_HUB_OFFLINE",))
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    if offline is None and not hub_reachable(endpoint, HUB_TIMEOUT):  # seconds, not minutes of retries
        offline = f"{endpoint} cannot be reached"
    try:
        folder = snapshot_download(**files, local_files_only=offline is not None)
        # Said, so that a mistyped local folder of the shape owner/name never loads a hub model silently.
        print(f"{flag}: no local file or folder {repo_id}: the HuggingFace Hub model {repo_id} "
              f"({'from the cache' if offline else 'downloaded or cached'})", file=sys.stderr, flush=True)
        return folder
    except RepositoryNotFoundError:
        raise UserError(f"{flag}: no local file or folder {repo_id}, and no model {repo_id} on the HuggingFace Hub "
                        f"(a private or gated one needs a login: hf auth login, or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise UserError(f"{flag}: {repo_id} has no revision {revision} on the HuggingFace Hub") from None
    except Exception as e:
        if offline is not None:
            why = f"{offline} is set" if offline.startswith("HF_") else offline
            raise UserError(f"{flag}: no network: cannot download {repo_id} from the HuggingFace Hub ({why}), the "
                            f"HuggingFace cache has no copy and no local file or folder has that name; pass an exported "
                            f"folder, or connect and retry") from None
        raise UserError(f"{flag}: cannot download {repo_id} from the HuggingFace Hub ({first_line(e)})") from None


def load_exported(name: str, flag: str = "--checkpoint_path", required: tuple[str, ...] = MODEL_ENTRIES,
                  revision: str | None = None) -> dict:
    """An exported folder, or a hub id's (hub_download), as a state like load_checkpoint's: "config",
    "model" (the tensors), "token_encoding", "eot_id", "special_tokens" for a chat model, "args" (the
    training records evaluate.py reads), "sha256" (its identity: the checkpoint it was exported from,
    when no LoRA was merged in, so that the checkpoint's LoRA fits it too; else its weights' hash) and
    "export_info" (config.json's records). Checked as load_checkpoint checks: the weights' sha256, the
    safetensors file, the config, every weight's shape; any fault is one line naming the file."""
    if os.path.isdir(name):
        folder = name
    elif os.path.exists(name):
        raise UserError(f"{flag}: {name} is a file, not an exported folder")
    elif is_hub_id(name):
        folder = hub_download(name, flag, revision)
    else:
        raise UserError(f"{flag}: no exported folder at {name}")
    config_path, weights_path = os.path.join(name, CONFIG_FILE), os.path.join(name, WEIGHTS_FILE)
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        if not os.path.isfile(os.path.join(folder, file)):
            raise UserError(f"{flag}: {name} has no {file}: an exported folder (export.py) holds {WEIGHTS_FILE} "
                            f"and {CONFIG_FILE}")
    try:
        with open(os.path.join(folder, CONFIG_FILE), encoding="utf-8") as f:
            config = json.load(f)
        weights_digest = file_sha256(os.path.join(folder, WEIGHTS_FILE))
    except OSError as e:
        raise UserError(f"{flag}: cannot read {name} ({os_reason(e)})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{flag}: {config_path} is not valid JSON ({first_line(e)})") from None
    if not isinstance(config, dict) or "lightgpt_format" not in config:
        raise UserError(f"{flag}: {config_path} does not describe a LightGPT model (no 'lightgpt_format' entry)")
    version = config["lightgpt_format"]
    if not _is(version, int) or version < 1:
        raise UserError(f"{flag}: {config_path}: its 'lightgpt_format' {_shown(version)} is not a positive integer")
    if version > EXPORT_FORMAT:
        raise UserError(f"{flag}: {name} was exported by a newer LightGPT (format {version})")
    digest = config.get("weights_sha256")
    if not isinstance(digest, str):
        raise UserError(f"{flag}: {config_path} has no 'weights_sha256' string to check {WEIGHTS_FILE} against")
    if weights_digest != digest:
        raise UserError(f"{flag}: {weights_path} is damaged: its sha256 is not the one {CONFIG_FILE} records (a "
                        f"changed or truncated file); export or download it again")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        weights = load_file(os.path.join(folder, WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{flag}: {weights_path} is not a readable safetensors file ({first_line(e)})") from None
    architecture = {f.name for f in fields(GPTConfig)}
    records = {k: v for k, v in config.items() if k not in architecture and k not in EXPORT_KEYS}
    state = {"kind": "pretrain", "config": {k: v for k, v in config.items() if k in architecture}, "model": weights}
    state.update({k: records[k] for k in ("token_encoding", "eot_id", "special_tokens") if k in records})
    problem = checkpoint_problem(state, ("config", "model", *required))
    for key in ("pretraining", "instruction_tuning"):
        if problem is None and not isinstance(records.get(key, {}), dict):
            problem = f"its {key!r} is {_shown(records[key])}, expected a dict"
    if problem:
        raise UserError(f"{flag}: {name} is not a usable exported model: {problem}")
    state["args"] = dict(records.get("pretraining", {}))  # what evaluate.py reads of a checkpoint's "args"
    tuning = records.get("instruction_tuning", {})
    if "max_tokens_per_sample" in tuning:
        state["args"]["max_tokens_per_sample"] = tuning["max_tokens_per_sample"]
    source = records.get("checkpoint_sha256")
    state["sha256"] = source if isinstance(source, str) and "lora_sha256" not in records else digest
    state["export_info"] = records
    return state


def load_model_state(path: str, flag: str = "--checkpoint_path") -> dict:
    """A pretrained (or merged) model's checked state: from a checkpoint file, an exported folder or a hub id."""
    if is_exported(path):
        return load_exported(path, flag)
    return load_checkpoint(path, "pretrain", flag, required=MODEL_ENTRIES)  # checked: config, weights, ...


def inference_model(checkpoint_path: str, device: torch.device,
                    lora_path: str | None = None) -> tuple[GPT, dict, dict | None]:
    """The model of a checkpoint or an exported folder, or of a base with a LoRA checkpoint's adapters merged
    in (so it runs as fast as any model), in eval mode on the device with bf16 weights where bf16 is native;
    and the checkpoint states (the LoRA's None without one)."""
    state = load_model_state(checkpoint_path)
    lora = None
    if lora_path is not None:
        if state.get("special_tokens"):
            raise UserError(f"--lora_path: --checkpoint_path {checkpoint_path} is already a merged chat model; "
                            f"use it alone, or pass the base checkpoint the LoRA was trained on")
        lora = load_checkpoint(lora_path, "lora", flag="--lora_path", required=LORA_ENTRIES)
        check_base(lora, lora_path, state, checkpoint_path, "--checkpoint_path")
        model = merge_lora(adapted_model(state, lora))
    else:
        model = model_from_checkpoint(state)
    if bf16_supported(device):
        model = model.to(torch.bfloat16)
    return model.to(device).eval(), state, lora


def rng_state() -> dict:
    """This process's RNG state: the CPU generator and its own GPU's (not every visible GPU's, so a
    checkpoint resumes on machines with another number of GPUs)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------- interrupts


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
