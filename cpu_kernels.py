"""LightGPT's compiled CPU kernels: csrc/cpu_kernels.cpp, built on this machine by torch.utils.cpp_extension
and cached in torch's extension folder ($TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions).

    python cpu_kernels.py     # build them (once: about 15 s on 2 cores), check them against torch, time them

What they hold: lightgpt::rms_norm, RMSNorm's forward and backward as one op with a C++ autograd node, and
lightgpt::adafactor_step_, adafactor.Adafactor's step over whole fp32 parameters in three row loops each. Eager
training on the CPU otherwise pays a crossing into Python in the forward and in the backward of each of the
model's norms (model._RMSNormFunction, torch 2.13 having no fused CPU RMSNorm) and about fifteen passes per
matrix in the optimizer: the gap between LightGPT's step and nanoGPT's (docs/nope-at-small-scale.md).

Who uses them: pretrain.py, instruction-tune.py and bench.py train when they train on the CPU, eagerly, in
fp32, as --cpu_kernels says: auto (the default) takes them when they are built (quickstart.sh builds them; a
changed source is rebuilt), on builds them when needed and stops with one line if it cannot, off never. They
need a C++ compiler and ninja (`pip install ninja`); without them training takes the Python path, a little
slower and otherwise the same. CUDA, compiled and bf16 runs never use them.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import re
import shutil
import sys
import sysconfig
import time

import torch

import adafactor
import model
from common import ArgumentParser, UserError, positive_int, run_main

NAME = "lightgpt_cpu_kernels"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "cpu_kernels.cpp")
BUILD_HINT = "python cpu_kernels.py builds them"

_loaded: str | None = None  # "" once loaded in this process, else why the last try failed (None: not tried)


def _build_dir() -> str:
    """Where torch.utils.cpp_extension builds them: its root, then a folder per Python and CUDA version (the
    path only: torch's own helper would create it)."""
    from torch.utils.cpp_extension import get_default_build_root

    cuda = "cpu" if torch.version.cuda is None else "cu" + torch.version.cuda.replace(".", "")
    return os.path.join(get_default_build_root(), f"py{sys.version_info.major}{sys.version_info.minor}_{cuda}", NAME)


def built() -> bool:
    """Whether a build of the kernels is in torch's extension folder (it may predate the source: load()
    then rebuilds it). A folder that cannot be read counts as no build."""
    try:
        return any(glob.glob(os.path.join(_build_dir(), f"{NAME}*{suffix}")) for suffix in (".so", ".pyd", ".dylib"))
    except OSError:
        return False


@contextlib.contextmanager
def _build_tools_on_path():
    """pip's ninja sits in the environment's scripts folder, which is on PATH only once the environment is
    activated: put it there for the build only."""
    scripts, path = sysconfig.get_path("scripts"), os.environ.get("PATH", "")
    if scripts and shutil.which("ninja") is None and shutil.which("ninja", path=scripts) is not None:
        os.environ["PATH"] = scripts + os.pathsep + path
        try:
            yield
        finally:
            os.environ["PATH"] = path
    else:
        yield


def missing_tools() -> str | None:
    """What the build needs and this machine lacks, in a few words; None when nothing is missing (call it
    inside _build_tools_on_path)."""
    from torch.utils.cpp_extension import is_ninja_available

    compiler = os.environ.get("CXX", "cl" if os.name == "nt" else "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler} is not on PATH)"
    if not is_ninja_available():
        return "no ninja (pip install ninja)"
    return None


def build_failure(e: Exception) -> str:
    """A failed build's reason in one line: the compiler's first error where it printed one (torch's message
    starts with the whole compile command), else the message's last line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"(^|: )(fatal )?error( [A-Z]+\d+)?:", line)]
    reason = (errors or lines[-1:] or [type(e).__name__])[0]
    return reason if len(reason) <= 300 else reason[:297] + "..."


def load() -> str | None:
    """Build the kernels if needed and load them into this process (once; later calls are free). Returns
    None when torch.ops.lightgpt holds them, else why not in one line."""
    global _loaded
    if _loaded is None:
        with _build_tools_on_path():
            _loaded = missing_tools() or ""
            if not _loaded:
                from torch.utils.cpp_extension import load as load_extension

                flags = ["/O2"] if os.name == "nt" else ["-O3", "-fopenmp-simd"]
                try:
                    load_extension(NAME, [SOURCE], extra_cflags=flags, is_python_module=False, verbose=False)
                except Exception as e:  # a compiler error, a missing header, a library that fails to load
                    _loaded = f"building {SOURCE} failed: {build_failure(e)}"
    return _loaded or None


def forget_build() -> None:
    """Remove the cached build (a build that failed its check must not be taken by --cpu_kernels auto)."""
    shutil.rmtree(_build_dir(), ignore_errors=True)


def eligible(device: torch.device, compiled: bool) -> bool:
    """Whether a training run takes the CPU kernels' path at all: eager fp32 on the CPU (the CPU trains in
    fp32: common.bf16_supported)."""
    return device.type == "cpu" and not compiled


@contextlib.contextmanager
def for_training(choice: str, device: torch.device, compiled: bool):
    """The CPU kernels as --cpu_kernels says, for the block: yields a few words for the run's summary line
    ("" where they do not apply). `on` that cannot build them is a UserError naming the reason."""
    if not eligible(device, compiled):
        yield ""
        return
    if choice == "off":
        yield "the Python path (--cpu_kernels off)"
        return
    if choice == "auto" and _loaded is None and not built():
        yield f"the Python path (not built yet: {BUILD_HINT} once)"
        return
    problem = load()
    if problem is not None:
        if choice == "on":
            raise UserError(f"--cpu_kernels on: {problem}; --cpu_kernels auto trains without them")
        yield f"the Python path ({problem})"
        return
    with model.cpu_norm_kernel(torch.ops.lightgpt.rms_norm), adafactor.cpu_step_kernel(torch.ops.lightgpt.adafactor_step_):
        yield "compiled (RMSNorm, Adafactor)"


# ----------------------------------------------------------------------------- the command


def check(threads: int) -> list[str]:
    """The compiled norm against torch.nn.RMSNorm in float64 (forward and both gradients) and the compiled
    Adafactor step against the Python one, each timed against the Python path at a small model's shapes (nanoGPT's
    CPU recipe); the lines to print."""
    torch.manual_seed(0)
    lines = []
    for shape in ((12, 64, 128), (3, 5, 1000), (1, 7), (4, 0, 16)):
        x = torch.randn(shape, dtype=torch.float64) * 3
        weight = torch.randn(shape[-1], dtype=torch.float64)
        grad = torch.randn(shape, dtype=torch.float64)
        reference = torch.nn.functional.rms_norm(x.requires_grad_(), shape[-1:], weight.requires_grad_(),
                                                 torch.finfo(torch.float32).eps)
        reference.backward(grad)
        xs, ws = x.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
        y = torch.ops.lightgpt.rms_norm(xs, ws, torch.finfo(torch.float32).eps)
        y.backward(grad.float())
        errors = [(a.double() - b).abs().max().item() / max(1.0, b.abs().max().item()) if b.numel() else 0.0
                  for a, b in ((y, reference), (xs.grad, x.grad), (ws.grad, weight.grad))]
        if max(errors) > 1e-4:
            raise UserError(f"rms_norm on {tuple(shape)} differs from torch's by {max(errors):.2e}")
        lines.append(f"rms_norm {tuple(shape)}: matches torch.nn.RMSNorm (largest relative error {max(errors):.1e})")
    torch.set_num_threads(threads)
    x0, grad = torch.randn(12, 64, 128), torch.randn(12, 64, 128)
    norm = model.RMSNorm(128)
    times = {}
    for name, op in (("Python", None), ("compiled", torch.ops.lightgpt.rms_norm)):
        with model.cpu_norm_kernel(op):
            samples = []
            for i in range(300):
                x = x0.clone().requires_grad_()
                started = time.perf_counter()
                norm(x).backward(grad)
                samples.append(time.perf_counter() - started)
        times[name] = sorted(samples)[len(samples) // 2]
    lines.append(f"RMSNorm forward + backward on (12, 64, 128), {threads} thread(s), median of 300: Python path "
                 f"{1e6 * times['Python']:.0f} us, compiled {1e6 * times['compiled']:.0f} us")
    # Adafactor with momentum on a small model's shapes: the same weights and states as the Python step, then its time
    shapes = [(320, 128)] + [(384, 128), (128, 128), (512, 128), (128, 512)] * 4 + [(128,)] * 9
    steps = {}
    for name, op in (("Python", None), ("compiled", torch.ops.lightgpt.adafactor_step_)):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
        optimizer = adafactor.Adafactor(params, lr=3e-2, beta1=0.9)
        samples = []
        with adafactor.cpu_step_kernel(op):
            for i in range(100):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(i))
                started = time.perf_counter()
                optimizer.step()
                samples.append(time.perf_counter() - started)
        steps[name] = (params, sorted(samples)[len(samples) // 2])
    worst = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(steps["compiled"][0], steps["Python"][0]))
    if worst > 1e-4:
        raise UserError(f"adafactor_step_ differs from the Python step by {worst:.2e} after 100 steps")
    lines.append(f"adafactor_step_: after 100 steps the weights match the Python step's (largest relative error "
                 f"{worst:.1e}); a step over {sum(p.numel() for p in steps['Python'][0]):,} parameters, median of 100: "
                 f"Python {1e6 * steps['Python'][1]:.0f} us, compiled {1e6 * steps['compiled'][1]:.0f} us")
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description="Build LightGPT's compiled CPU kernels (csrc/cpu_kernels.cpp), check them against "
                                   "torch and the Python path, and time them.")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads for the timings")
    return p.parse_args(argv)


def main(args) -> None:
    started = time.perf_counter()
    was_built = built()
    problem = load()
    if problem is not None:
        raise UserError(problem)
    how = "loaded (rebuilt if csrc/cpu_kernels.cpp changed)" if was_built else "built and loaded"
    print(f"{NAME}: {how} from {_build_dir()} in {time.perf_counter() - started:.1f} s")
    try:
        lines = check(args.threads)
    except UserError as e:  # a wrong kernel is never taken: without its build, auto trains on the Python path
        forget_build()
        raise UserError(f"{e}; removed the build, so training takes the Python path") from None
    for line in lines:
        print(line)


if __name__ == "__main__":
    run_main(main, parse_args)
