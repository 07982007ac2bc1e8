"""LightGPT in EleutherAI's lm-evaluation-harness (the `lm-eval` package): a model class of lm-eval's,
registered as `lightgpt`, that scores requests through LightGPT's own forward and decodes through its own
decoder, so that any of the harness's tasks (HellaSwag, ARC, PIQA, LAMBADA, MMLU, ...) runs on a checkpoint,
an exported folder or a hub id, with a LoRA or without. evaluate.py --tasks runs it, and

    python harness.py --model lightgpt --model_args pretrained=./checkpoints/quickstart.pt --tasks hellaswag

is lm-eval's own command line (every flag of `lm_eval run`) with the class registered: lm-eval finds no
model classes outside its package, so a bare `lm_eval --model lightgpt` cannot see it.

Scoring is the harness's: it splits each context from its continuation (TemplateLM), this class returns
log P(continuation | context) summed over the continuation's tokens and whether greedy decoding would have
produced it, one right-padded forward per batch (causal attention: padding after a row changes none of its
logits). Rolling log-likelihoods (perplexity tasks) cut a document into the harness's disjoint windows of
max_length tokens, each read after end-of-text, as lm-eval's hf model does; so the three routes (this class,
`--model hf` on the export, `--model local-completions` against serve.py) score the same tokens.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from common import UserError, resolve_device
from generate import Decoder, Sampler, Sampling, decode_text, generate, load_for_inference

LM_EVAL_INSTALL = "pip install lm-eval"
NAME = "lightgpt"  # the model name lm-eval's --model takes


class UntilReached(Exception):
    """A generated text reached one of the request's `until` strings."""


def require_lm_eval() -> None:
    """lm-eval is an optional extra: its absence is one line naming the install."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(f"--tasks needs lm-evaluation-harness, which is not installed: {LM_EVAL_INSTALL}") from None


def model_class():
    """The lm-eval model class (built on first use: lm_eval is imported only here), registered as `lightgpt`."""
    global LightGPTLM
    if "LightGPTLM" in globals():
        return LightGPTLM
    require_lm_eval()
    import lm_eval.models  # noqa: F401  (the registry's own models first: a non-empty registry skips them)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model

    class LightGPTLM(TemplateLM):
        """model_args: pretrained (a checkpoint, exported folder or hub id), lora_path, device, batch_size,
        max_length (tokens a request is scored in; default 1024, what lm-eval's hf model reads from an export's
        config.json)."""

        def __init__(self, pretrained: str = "./checkpoints/checkpoint.pt", lora_path: str | None = None,
                     device: str | None = None, batch_size: int | str = 8, max_length: int | str = 1024,
                     loaded=None, **kwargs):
            super().__init__()
            self._device = resolve_device(device or "cpu")
            self.loaded = loaded or load_for_inference(pretrained, self._device, lora_path)
            self.batch_size = int(batch_size) if str(batch_size).isdigit() else 0
            self.max_length = int(max_length) if str(max_length).isdigit() else 0
            if self.batch_size < 1 or self.max_length < 2:
                raise UserError(f"lightgpt model_args: batch_size must be a positive integer and max_length an "
                                f"integer above 1, got batch_size={batch_size!r}, max_length={max_length!r}")

        @property
        def eot_token_id(self) -> int:
            return self.loaded.eot

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            return self.loaded.encoding.encode_ordinary(string)  # text is text: a typed <|im_end|> is bytes

        def tok_decode(self, tokens: list[int]) -> str:
            return decode_text(self.loaded.encoding, tokens)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
            return score(self.loaded.model, [(c, x) for _, c, x in requests], self.max_length,
                         override_bs or self.batch_size, self.eot_token_id, disable_tqdm)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            return rolling_loglikelihoods(self, [r.args[0] for r in requests], disable_tqdm)

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            return [generate_until_one(self, *r.args) for r in requests]

    register_model(NAME)(LightGPTLM)
    return LightGPTLM


def rolling_loglikelihoods(lm, texts: list[str], disable_tqdm: bool) -> list[float]:
    """Each text's log-likelihood over lm-eval's disjoint windows of lm.max_length tokens, the first read
    after end-of-text (lm-eval's hf model cuts them so); all windows of all texts scored in batches."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    windows, owner = [], []
    for i, text in enumerate(texts):
        for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                lm.tok_encode(text), lm.prefix_token_id, lm.max_length, context_len=1)):
            windows.append((context, continuation))
            owner.append(i)
    totals = [0.0] * len(texts)
    for i, (logprob, _) in zip(owner, score(lm.loaded.model, windows, lm.max_length, lm.batch_size,
                                            lm.eot_token_id, disable_tqdm)):
        totals[i] += logprob
    return totals


def generate_until_one(lm, context: str, gen_kwargs: dict) -> str:
    """Greedy (or, with do_sample, sampled at the temperature) decoding through LightGPT's decoder, up to
    max_gen_toks tokens or the first `until` string, which is cut off."""
    kwargs = dict(gen_kwargs)
    until = kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    max_tokens = int(kwargs.pop("max_gen_toks", 256))
    temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
    sampling = Sampling(temperature=temperature, top_k=500, top_p=1.0)
    prompt = lm.tok_encode(context)[-max(1, lm.max_length - max_tokens):] or [lm.eot_token_id]
    decoder = Decoder(lm.loaded.model, len(prompt) + max_tokens, 1, sampling, Sampler(lm.device, 0), use_compile=False)
    text = []

    def stop_at_until(token: int) -> None:
        text.append(token)
        if any(u in lm.tok_decode(text) for u in until):
            raise UntilReached

    try:
        generate(decoder, prompt, set(lm.loaded.stop), max_tokens, on_token=stop_at_until)
    except UntilReached:
        pass
    out = lm.tok_decode(text)
    for u in until:
        out = out.split(u)[0]
    return out


@torch.inference_mode()
def score(model, pairs: list[tuple[list[int], list[int]]], max_length: int, batch_size: int, pad: int,
          disable_tqdm: bool = True) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): the summed log-probability of the continuation after the
    context and whether it is the greedy one, over the last max_length + 1 tokens of the pair. Longest
    first, so that each batch pads little; answered in the order asked."""
    from tqdm import tqdm

    device = model.token_embeddings.weight.device
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    for start in tqdm(range(0, len(order), batch_size), disable=disable_tqdm or None, desc="scoring"):
        batch = order[start : start + batch_size]
        rows = [(pairs[i][0] + pairs[i][1])[-(max_length + 1):][:-1] for i in batch]  # inputs; targets shifted
        T = max(map(len, rows))
        x = torch.full((len(rows), T), pad, dtype=torch.long)
        for r, row in enumerate(rows):
            x[r, : len(row)] = torch.tensor(row)
        logprobs = F.log_softmax(model(x.to(device)).float(), dim=-1)  # (B, T, V)
        for r, i in enumerate(batch):
            end = len(rows[r])
            n = min(len(pairs[i][1]), end)  # a continuation longer than max_length: its last max_length tokens
            target = torch.tensor(pairs[i][1][-n:], device=device)
            span = logprobs[r, end - n : end]  # (n, V): the predictions of the continuation's tokens
            results[i] = (span.gather(1, target[:, None]).sum().item(), bool((span.argmax(-1) == target).all()))
    return results


def task_manager(include_path: str | None):
    """lm-eval's TaskManager, with the task YAMLs of a local folder (--include_path) besides its own."""
    import os

    if include_path is not None and not os.path.isdir(include_path):
        raise UserError(f"--include_path: {include_path} is not a folder of lm-eval task files")
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def check_tasks(manager, tasks: list[str]) -> None:
    """Every --tasks name is a task, group or tag lm-eval knows: an unknown one is one line with its
    nearest names."""
    import difflib

    known = set(manager.all_tasks)
    for name in tasks:
        if name not in known:
            near = difflib.get_close_matches(name, sorted(known), n=3)
            raise UserError(f"--tasks: lm-eval has no task {name!r}" + (f"; did you mean {', '.join(near)}?" if near
                            else " (python harness.py ls tasks lists them; --include_path adds a folder of yours)"))


def run_tasks(loaded, tasks: list[str], *, num_fewshot: int | None, limit: int | None, include_path: str | None,
              batch_size: int, max_length: int, seed: int, device) -> dict:
    """lm-eval's simple_evaluate on the loaded model: its results dict (results, configs, versions, n-shot)."""
    cls = model_class()
    manager = task_manager(include_path)
    check_tasks(manager, tasks)
    from lm_eval import simple_evaluate

    model = cls(loaded=loaded, device=str(device), batch_size=batch_size, max_length=max_length)
    return simple_evaluate(model=model, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                           log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                           fewshot_random_seed=seed, bootstrap_iters=0)


def task_scores(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of a results dict, numbers only (no standard errors, no aliases)."""
    return {task: {k.split(",")[0]: v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and "stderr" not in k}
            for task, metrics in results["results"].items()}


def main(argv=None) -> None:
    """lm-eval's command line with the lightgpt model class registered."""
    model_class()
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
