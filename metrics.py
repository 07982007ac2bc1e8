"""What a training run reports: a line on standard output every log interval, TensorBoard scalars, text
and hparams, optionally the same in Weights & Biases, and sampled continuations of fixed prompts.

RunLog is written by rank 0 alone; every rank calls its methods at the same points (sample_texts runs a
forward on every rank, a collective under FSDP). A failure to write the events (a full disk) is kept and
raised by check() in one line.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Callable

import torch

from common import UserError, autocast, first_line
from files import os_reason
from model import peak_tflops as model_peak_tflops

# ----------------------------------------------------------------------------- the run's log


class RunLog:
    """Where a run reports: a progress bar and lines on standard output (rank 0), TensorBoard scalars
    (rank 0 writes them) and the history of test perplexities that train() returns. A failure to write
    the events (a full disk) is kept and raised by check(), which every rank calls at the same points."""

    def __init__(self, run_dir: str, rank: int, peak_tflops: float | None = None, wandb_project: str | None = None):
        self.rank, self.run_dir, self.peak_tflops = rank, run_dir, peak_tflops
        self.wandb_project, self.wandb = wandb_project if rank == 0 else None, None
        self.writer, self.error = None, None
        self.progress = None
        self.history: list[tuple[int, float]] = []  # (step, test perplexity)
        if rank == 0:
            from torch.utils.tensorboard import (
                SummaryWriter,  # slow to import, and only training needs it
            )

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
                self._write(lambda name=name, value=value: self.writer.add_scalar(f"{prefix}/{name}", value, step))
        if self.wandb:
            self.wandb.log({f"{prefix}/{name}": value for name, value in values.items()}, step=step)

    def write(self, text: str) -> None:
        """A line on standard output (rank 0) that leaves the progress bar whole."""
        if self.rank != 0:
            return
        if self.progress is not None and not self.progress.disable:
            self.progress.write(text)
        else:
            print(text, flush=True)

    def line(self, step: int, values: dict) -> None:
        """A log interval's metrics as one line."""
        parts = [f"step {step:,}:"]
        if "cross_entropy" in values:
            parts.append(f"loss {values['cross_entropy']:.4f}, gradient norm {values['gradient_norm']:.3f},")
        parts.append(f"lr {values['learning_rate']:.2e}, {values['tokens_per_s']:,.0f} tokens/s")
        if "mfu" in values:
            parts[-1] += f", MFU {values['mfu']:.1%}"
        if values.get("data_wait", 0) >= 0.01:
            parts[-1] += f", {values['data_wait']:.0%} waiting for data"
        if "peak_memory_gib" in values:
            parts[-1] += f", peak memory {values['peak_memory_gib']:.2f} GiB"
        if "skipped_steps" in values:
            parts[-1] += f", {steps_text(values['skipped_steps'])} skipped (non-finite)"
        self.write(" ".join(parts))

    def perplexity(self, step: int, value: float) -> None:
        self.scalars(step, "test", perplexity=value)
        self.history.append((step, value))
        self.write(f"step {step:,}: test perplexity {value:.3f}")

    def samples(self, step: int, make: Callable[[], list[tuple[str, str]]] | None) -> None:
        """Sampled continuations of the fixed prompts as TensorBoard text (every rank samples: under FSDP
        every forward is a collective)."""
        if make is None:
            return
        pairs = make()
        if self.wandb:
            import wandb

            table = wandb.Table(columns=["prompt", "continuation"], data=[list(pair) for pair in pairs])
            self.wandb.log({"samples": table}, step=step)
        if self.writer:
            text = "\n\n".join(f"**{_markdown(prompt)}**{_markdown(continuation)}" for prompt, continuation in pairs)
            self._write(lambda: self.writer.add_text("samples", text, step))

    def settings(self, settings: dict) -> None:
        """The run's resolved flags: TensorBoard's hparams (the HParams tab compares runs by them) and text;
        with --wandb, a W&B run of them (its config)."""
        if self.wandb_project:
            self.wandb = start_wandb(self.wandb_project, self.run_dir, settings)
        if not self.writer or not settings:
            return
        from torch.utils.tensorboard.summary import hparams

        plain = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in settings.items()}
        experiment, start, end = hparams(plain, {"test/perplexity": 0.0})
        lines = "\n".join(f"    {k}: {json.dumps(v)}" for k, v in settings.items())

        def write() -> None:
            for summary in (experiment, start, end):
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("config", lines, 0)

        self._write(write)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.wandb:
            self.wandb.finish()
            self.wandb = None
        if self.writer:
            self._write(self.writer.close)
            self.writer = None


WANDB_INSTALL = "pip install wandb"


def check_wandb(project: str | None) -> None:
    """--wandb needs the optional wandb package: one line naming the install, before any work."""
    import importlib.util

    if project and importlib.util.find_spec("wandb") is None:
        raise UserError(f"--wandb {project} needs the wandb package: {WANDB_INSTALL}")


def start_wandb(project: str, run_dir: str, settings: dict):
    """A W&B run named after the TensorBoard folder, its files beside the events; WANDB_MODE=offline keeps
    it on the disk (`wandb sync` uploads it later)."""
    import wandb

    try:
        return wandb.init(project=project, name=os.path.basename(os.path.normpath(run_dir)), dir=run_dir,
                          config=settings, reinit="finish_previous")
    except Exception as e:
        raise UserError(f"--wandb {project}: could not start a W&B run ({first_line(e)}); run `wandb login`, or set "
                        f"WANDB_MODE=offline to log to the disk") from None


def steps_text(n: int) -> str:
    return f"{n} step{'s' if n != 1 else ''}"


def _markdown(text: str) -> str:
    """Text shown as itself in TensorBoard's markdown: special characters escaped, line breaks kept."""
    for c in "\\`*_{}[]<>()#+-.!|":
        text = text.replace(c, "\\" + c)
    return text.replace("\n", "  \n")


def peak_tflops(device: torch.device, given: float | None = None) -> float | None:
    """MFU's denominator: `given` (--peak_tflops), else a known GPU's data-sheet dense bf16 peak (model.GPUS),
    else on the CPU the fp32 matrix-product rate measured here (cpu_matmul_tflops), else None (no MFU)."""
    if given:
        return given
    if device.type == "cuda":
        return model_peak_tflops(torch.cuda.get_device_name(device))
    return cpu_matmul_tflops() if device.type == "cpu" else None


def cpu_matmul_tflops(size: int = 512, seconds: float = 0.2) -> float:
    """The best fp32 matrix-product rate of this CPU with torch's threads (TFLOP/s), from `seconds` of
    size x size products: a CPU has no data-sheet figure to divide by, so its MFU is against what its BLAS
    reaches. Constant inputs: no random number is drawn, so a run's samples do not depend on it."""
    import time

    a = torch.full((size, size), 0.5)
    b = torch.full((size, size), 0.25)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - started) / 1e12)
    return best


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


# ----------------------------------------------------------------------------- sample texts


@torch.no_grad()
def sample_texts(model: torch.nn.Module, prompts: list[tuple[str, list[int]]], decode: Callable[[list[int]], str],
                 device: torch.device, new_tokens: int = 32, stop_id: int | None = None) -> list[tuple[str, str]]:
    """(prompt, continuation) of each (text, token ids) prompt, sampled at temperature 0.8 from the top 50
    tokens by one generator seeded alike at every call (so evaluations compare like with like). Every row is
    padded to one length so the model sees one shape; causal attention keeps the padding from touching what
    comes before it. No KV cache: a few dozen short forwards, on every rank (under FSDP each is a collective)."""
    P = len(prompts)
    ends = torch.tensor([len(ids) for _, ids in prompts], device=device)
    idx = torch.zeros((P, int(ends.max()) + new_tokens), dtype=torch.long, device=device)
    for row, (_, ids) in enumerate(prompts):
        idx[row, : len(ids)] = torch.tensor(ids, device=device)
    rows = torch.arange(P, device=device)
    generator = torch.Generator(device).manual_seed(0)
    was_training = model.training
    model.eval()
    for _ in range(new_tokens):
        with autocast(device):
            logits = model(idx)[rows, ends - 1].float() / 0.8  # (P, vocabulary)
        if not bool(torch.isfinite(logits).all()):
            model.train(was_training)
            return [(text, " (no sample: the logits are not finite)") for text, _ in prompts]
        top, choices = logits.topk(min(50, logits.size(-1)), dim=-1)
        picked = torch.multinomial(top.softmax(-1), 1, generator=generator).squeeze(1)  # (P,)
        idx[rows, ends] = choices[rows, picked]
        ends += 1
    model.train(was_training)
    texts = []
    for row, (text, ids) in enumerate(prompts):
        new = idx[row, len(ids) : int(ends[row])].tolist()
        if stop_id is not None and stop_id in new:
            new = new[: new.index(stop_id)]
        texts.append((text, decode(new)))
    return texts
