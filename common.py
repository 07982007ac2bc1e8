"""What every LightGPT script shares: one-line errors, the arguments (number types, the shared flag groups,
the entry point that turns errors into one line), and devices and precision (which device,
bf16 or fp32, memory checks). Rank 0 alone prints (print0). Everything else has its own module: files.py,
checkpoint.py, hub.py, lora.py, parallel.py, training.py."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from dataclasses import fields
from typing import Callable

import torch

from model import POSITION_ENCODINGS, GPTConfig

# ----------------------------------------------------------------------------- errors


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



# torchrun sets RANK in every process it starts; rank 0 alone prints and writes files.


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def print0(*args, **kwargs) -> None:
    if is_main_process():
        print(*args, **kwargs, flush=True)


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

    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=HelpFormatter, **kwargs)

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


def add_model_args(g) -> None:
    """The architecture flags pretrain.py and bench.py share (the Small shape by default), one per
    ARCHITECTURE_FLAGS entry (run_config.add_config_args adds --model, a named shape)."""
    g.add_argument("--embedding_dimensions", type=positive_int, default=1024, help="model width")
    g.add_argument("--num_attention_heads", type=positive_int, default=16, help="attention heads per block")
    g.add_argument("--num_hidden_layers", type=positive_int, default=24, help="Transformer blocks")
    g.add_argument("--feed_forward_ratio", type=int, choices=(1, 2, 4), default=4,
                   help="MLP hidden width / model width")
    g.add_argument("--dropout", type=probability, default=0.1, help="dropout probability")
    g.add_argument("--position_encoding", choices=POSITION_ENCODINGS, default="none",
                   help="an ablation switch: rope or alibi add positions to attention, learned adds a trained "
                        "embedding per position (GPT-2's); none (NoPE) is LightGPT's design")
    g.add_argument("--max_position_embeddings", type=positive_int, default=1024,
                   help="--position_encoding learned only: the longest sequence the positions cover")


def add_system_args(g, compile_help: str | None = "torch.compile the model (auto: on for CUDA)",
                    seed_default: int | None = None, seed_help: str | None = "random seed",
                    cpu_kernels: bool = False) -> None:
    """--device, --compile and --seed, which the scripts share. compile_help=None leaves --compile out
    (a script that never compiles), seed_help=None leaves --seed out (a deterministic one); each
    script says what its seed and compilation cover. cpu_kernels adds --cpu_kernels (the trainers)."""
    g.add_argument("--device", default="cuda", help="cpu, cuda, cuda:N or mps")
    if compile_help is not None:
        g.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help=compile_help)
    if cpu_kernels:
        g.add_argument("--cpu_kernels", choices=("auto", "on", "off"), default="auto",
                       help="eager fp32 training on the CPU through the compiled kernels of cpu_kernels.py (RMSNorm, "
                            "Adafactor): auto uses them once built (python cpu_kernels.py), on builds them if needed")
    if seed_help is not None:
        g.add_argument("--seed", type=seed_int, default=seed_default, help=seed_help)


def add_optimizer_args(g, warmup_steps: int, low_memory_names: tuple = ("--low_memory_optimizer",),
                       momentum: float = 0.0) -> None:
    """The learning-rate schedule, Adafactor and clipping flags the trainers share (each its own warmup and
    momentum; the card names the low-memory flag differently for instruction tuning, so both names are
    taken there)."""
    g.add_argument("--warmup_steps", type=non_negative_int, default=warmup_steps,
                   help="optimizer steps of linear learning-rate warmup")
    g.add_argument("--lr_schedule", choices=("cosine", "linear", "constant"), default="cosine",
                   help="learning-rate decay after warmup")
    g.add_argument("--min_lr_ratio", type=probability, default=0.1,
                   help="final learning rate as a fraction of the peak (cosine/linear)")
    g.add_argument("--rms_decay", type=non_positive_float, default=-0.8,
                   help="Adafactor's decay exponent of the second-moment (RMS) average; at most 0")
    g.add_argument("--momentum", type=probability, default=momentum,
                   help="Adafactor's first-moment decay (beta1) on its clipped updates; 0: none, torch's "
                   "Adafactor and the least memory (a first moment costs 4 bytes per trained weight)")
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
                   help="under torchrun: minutes a collective or a silent rank is waited for, before all stop")


def check_learned_positions(config: GPTConfig, length: int, flag: str) -> None:
    """Learned positions (an ablation switch) cover max_position_embeddings tokens and no more: a longer
    training sample is one line naming `flag`."""
    limit = config.max_position_embeddings
    if config.position_encoding == "learned" and length > limit:
        raise UserError(f"{flag} {length}: the model's learned positions stop at {limit} tokens "
                        f"(--max_position_embeddings)")


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
