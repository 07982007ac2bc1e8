"""One training step of LightGPT against one of nanoGPT at nanoGPT's documented CPU recipe shape (4 layers,
4 heads, width 128, 64-token windows, batch 12, byte vocabulary), interleaved in one process so that both
see the same machine at the same moments; prints each one's median step time and the ratio.

nanoGPT's model code is public but not part of LightGPT: point --nanogpt_path at a checkout of it (its
model.py is imported from there, for this measurement only).

    python experiments/step_vs_nanogpt.py --nanogpt_path ../nanoGPT
    python experiments/step_vs_nanogpt.py --nanogpt_path ../nanoGPT --profile   # where LightGPT's step goes
    python experiments/step_vs_nanogpt.py --nanogpt_path ../nanoGPT --also before=old_model.py

--also NAME=FILE steps the GPT of another copy of model.py (an older commit's, an edited one) beside the two
(its own code throughout: the compiled norm is switched on in this repository's model.py only, so an edited
norm is what it times; the optimizer's kernel applies as to the LightGPT row),
so that a change to the model is timed against the same moments of the machine; with several runners the
order of each round is shuffled. Run to run the ratio moves by about 2% on a shared machine: compare
changes inside one run. --compile compiles every model's forward and backward (torch.compile, inductor's CPU
backend: it needs a C++ compiler) and times the compiled steps after a warm-up that pays the compilation;
nanoGPT's CPU recipe itself runs eager (--compile=False).

A step is what each trainer does per optimizer step: forward with the loss, backward, clip the gradient
norm at 1, the optimizer's step (LightGPT: its Adafactor; nanoGPT: AdamW as its train.py configures it),
zero the gradients. Both models run fp32, eager, without dropout, one thread per --threads. LightGPT's is
pretrain.py's default: Adafactor with momentum 0.9 (--momentum 0 for torch's Adafactor), with the compiled CPU
kernels (cpu_kernels.py: built here first if needed, as pretrain.py --cpu_kernels on does); a second LightGPT row,
"LightGPT, Python", steps the same model and optimizer through the Python path (--cpu_kernels off: that row only).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import cpu_kernels  # noqa: E402
from adafactor import Adafactor  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

LAYERS, HEADS, WIDTH, WINDOW, BATCH, VOCABULARY = 4, 4, 128, 64, 12, 257


def import_file(path: str, name: str):
    """The module a Python file defines, imported under `name` (registered: dataclasses look it up)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def nanogpt(path: str):
    if not os.path.isfile(os.path.join(path, "model.py")):
        raise SystemExit(f"--nanogpt_path: {path!r} holds no model.py (a checkout of karpathy/nanoGPT)")
    module = import_file(os.path.join(path, "model.py"), "nanogpt_model")
    config = module.GPTConfig(block_size=WINDOW, vocab_size=VOCABULARY, n_layer=LAYERS, n_head=HEADS, n_embd=WIDTH,
                              dropout=0.0, bias=False)
    model = module.GPT(config)
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    return model, optimizer, lambda x, y: model(x, y)[1]


def lightgpt(momentum: float = 0.9, module=None):
    """pretrain.py's model and optimizer, as it builds them by default (Adafactor with momentum); the
    model from `module` (another copy of model.py) if given."""
    gpt, config = (GPT, GPTConfig) if module is None else (module.GPT, module.GPTConfig)
    model = gpt(config(vocabulary_size=VOCABULARY, embedding_dimensions=WIDTH, num_attention_heads=HEADS,
                       num_hidden_layers=LAYERS, dropout=0.0), init="zero_proj")
    return model, Adafactor(model.parameters(), lr=3e-2, beta1=momentum), lambda x, y: model(x, y)


def model_file(spec: str):
    """NAME=FILE -> (NAME, the module FILE defines), imported under a name of its own."""
    name, _, path = spec.partition("=")
    if not name or not os.path.isfile(path):
        raise SystemExit(f"--also: expected NAME=FILE with an existing model.py copy, got {spec!r}")
    return name, import_file(path, f"lightgpt_model_{name}")


def step(model, optimizer, loss_of, x, y, kernels: str = "off") -> float:
    """One training step, timed; LightGPT's inside cpu_kernels.for_training(kernels) (entered before the clock)."""
    with cpu_kernels.for_training(kernels, x.device, compiled=False):
        started = time.perf_counter()
        loss = loss_of(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nanogpt_path", required=True, help="a checkout of karpathy/nanoGPT (its model.py is read)")
    p.add_argument("--steps", type=int, default=300, help="timed steps of each, interleaved (after 20 warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--momentum", type=float, default=0.9, help="LightGPT's Adafactor momentum (pretrain.py's default)")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's table of LightGPT's step")
    p.add_argument("--also", action="append", default=[], metavar="NAME=FILE",
                   help="also step the GPT of another copy of model.py (repeatable)")
    p.add_argument("--compile", action="store_true", help="compile every model (torch.compile) and time compiled steps")
    p.add_argument("--cpu_kernels", choices=("on", "off"), default="on",
                   help="LightGPT's compiled CPU kernels (cpu_kernels.py), built if needed; off: the Python path only")
    args = p.parse_args(argv)
    extra = [model_file(spec) for spec in args.also]
    torch.set_num_threads(args.threads)
    if args.cpu_kernels == "on" and not args.compile and (problem := cpu_kernels.load()) is not None:
        raise SystemExit(f"--cpu_kernels on: {problem}")
    torch.manual_seed(0)
    runners = {"nanoGPT": nanogpt(args.nanogpt_path), "LightGPT": lightgpt(args.momentum)}
    kernels = {name: "off" for name in runners}
    if args.cpu_kernels == "on" and not args.compile:  # the same model and optimizer, the Python path beside
        runners["LightGPT, Python"] = runners["LightGPT"]
        kernels["LightGPT"], kernels["LightGPT, Python"] = "on", "off"
    for name, module in extra:
        torch.manual_seed(0)
        runners[name] = lightgpt(args.momentum, module)
        kernels[name] = kernels["LightGPT"]
    if args.compile:  # the same modules' weights and optimizers, called through their compiled forward
        for name, (model, optimizer, loss_of) in runners.items():
            compiled = torch.compile(model)
            runners[name] = (model, optimizer, (lambda x, y, c=compiled: c(x, y)[1]) if name == "nanoGPT"
                             else (lambda x, y, c=compiled: c(x, y)))
    times = {name: [] for name in runners}
    generator, shuffle = torch.Generator().manual_seed(0), random.Random(0)
    for i in range(20 + args.steps):
        x = torch.randint(0, VOCABULARY, (BATCH, WINDOW), generator=generator)
        y = torch.randint(0, VOCABULARY, (BATCH, WINDOW), generator=generator)
        order = list(runners.items()) if i % 2 else list(reversed(runners.items()))  # none always goes first
        if len(order) > 2:
            shuffle.shuffle(order)
        for name, runner in order:
            seconds = step(*runner, x, y, kernels[name])
            if i >= 20:
                times[name].append(seconds)
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, median in medians.items():
        print(f"{name}: {1000 * median:.2f} ms per step (median of {args.steps})")
    for name in runners:
        if name != "nanoGPT":
            print(f"{name} / nanoGPT step time: {medians[name] / medians['nanoGPT']:.3f}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        model, optimizer, loss_of = runners["LightGPT"]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(20):
                step(model, optimizer, loss_of, x, y, kernels["LightGPT"])
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
