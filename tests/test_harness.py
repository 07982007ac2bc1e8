"""lm-evaluation-harness on LightGPT models (harness.py, evaluate.py --tasks) on local task files the tests
write (a multiple-choice task and a rolling-perplexity task, lm-eval's --include_path): the three routes,
LightGPT's own model class, `--model hf` on the export and `--model local-completions` against serve.py,
give the same per-request log-likelihoods and the same scores, and the rolling log-likelihood is
evaluate.py's own loss on the same text."""

import json
import os
import sys

import pytest
import torch
from conftest import fails_with_one_line

import evaluate
import export
import harness
import serve
from engine import Engine
from generate import load_for_inference

QUESTIONS = [("The sky is", ["blue", "green"], 0), ("Water is", ["wet", "dry"], 0), ("Fire is", ["cold", "hot"], 1),
             ("Two plus two is", ["four", "five", "six"], 0), ("Ice is", ["warm", "cold"], 1),
             ("The sun rises in the", ["east", "west"], 0)]
DOCUMENTS = ["The quick brown fox jumps over the lazy dog.", "def f(x):\n    return x * 2\n",
             "A journey of a thousand miles begins with a single step. Naïve café 🙂"]
MAX_LENGTH = 16  # tokens per request: the documents are cut into several rolling windows


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A folder of two lm-eval tasks over local JSONL files (no download)."""
    folder = tmp_path_factory.mktemp("tasks")
    with open(folder / "mc.jsonl", "w") as f:
        for question, choices, answer in QUESTIONS:
            f.write(json.dumps({"question": question, "choices": choices, "answer": answer}) + "\n")
    with open(folder / "docs.jsonl", "w") as f:
        for text in DOCUMENTS:
            f.write(json.dumps({"text": text}) + "\n")
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (folder / "tiny_ppl.yaml").write_text(
        f"task: tiny_ppl\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n"
        "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    return str(folder)


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    return export.main(export.parse_args(["--checkpoint_path", checkpoint,
                                          "--output_path", str(tmp_path_factory.mktemp("harness") / "tiny")]))


def run(model: str, model_args: str, tasks: str) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    harness.model_class()  # registers "lightgpt"
    return simple_evaluate(model=model, model_args=model_args, tasks=["tiny_mc", "tiny_ppl"], device="cpu",
                           task_manager=TaskManager(include_path=tasks), log_samples=True, bootstrap_iters=0)


def loglikelihoods(results: dict, task: str) -> list[float]:
    out = []
    for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"]):
        for resp in sample["resps"]:
            value = resp[0]
            out.append(value[0] if isinstance(value, (tuple, list)) else value)
    return out


@pytest.mark.slow
def test_the_three_routes_agree(exported, tasks, monkeypatch):
    """LightGPT's class, transformers through lm-eval's hf model, and serve.py through local-completions
    (tokenizing through the server's /tokenize): every request's log-likelihood within 1e-4, the same
    accuracy and perplexities; and a rolling log-likelihood is minus evaluate.py's summed loss over the
    same windows."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    args = f"max_length={MAX_LENGTH}"
    loaded = load_for_inference(exported, torch.device("cpu"))
    results = {"lightgpt": run("lightgpt", f"pretrained={exported},{args}", tasks),
               "hf": run("hf", f"pretrained={exported},trust_remote_code=True,dtype=float32,{args}", tasks)}
    with Engine(loaded, context_length=64, max_batch=4) as engine:
        with serve.BackgroundServer(serve.create_app(engine, loaded, serve.Settings("tiny"))) as server:
            # lm-eval's API models count in max_length the token they generate and the first token sent, which
            # nothing predicts: two more give the same windows as the other routes' max_length
            results["api"] = run("local-completions", f"base_url={server.url}/v1/completions,model=tiny,"
                                                      f"max_length={MAX_LENGTH + 2},num_concurrent=1,max_retries=1",
                                 tasks)
    ours = results["lightgpt"]
    assert len(loglikelihoods(ours, "tiny_mc")) == sum(len(q[1]) for q in QUESTIONS)
    for name in ("hf", "api"):
        for task in ("tiny_mc", "tiny_ppl"):
            theirs = loglikelihoods(results[name], task)
            assert len(theirs) == len(loglikelihoods(ours, task))
            assert max(abs(a - b) for a, b in zip(theirs, loglikelihoods(ours, task))) <= 1e-4, (name, task)
        assert results[name]["results"]["tiny_mc"]["acc,none"] == ours["results"]["tiny_mc"]["acc,none"]
        for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
            assert results[name]["results"]["tiny_ppl"][metric] == pytest.approx(ours["results"]["tiny_ppl"][metric],
                                                                                 rel=1e-5)
    # rolling: windows of MAX_LENGTH targets, each read after end-of-text or the tokens before it (lm-eval's)
    for text, value in zip(DOCUMENTS, loglikelihoods(ours, "tiny_ppl")):
        ids = [loaded.eot] + loaded.encoding.encode_ordinary(text)
        total = 0.0
        for start in range(1, len(ids), MAX_LENGTH):  # targets start .. start + MAX_LENGTH - 1
            end = min(len(ids), start + MAX_LENGTH)
            first = max(0, end - 1 - MAX_LENGTH)  # the window's inputs: MAX_LENGTH tokens ending before `end`
            x, y = torch.tensor([ids[first : end - 1]]), torch.tensor([ids[first + 1 : end]])
            with torch.no_grad():
                losses = evaluate.token_losses(loaded.model, x, y, torch.device("cpu"))[0]
            total += losses[start - 1 - first :].sum().item()
        assert value == pytest.approx(-total, abs=1e-4)


@pytest.mark.slow
def test_evaluate_tasks_writes_the_scores_and_their_scalars(exported, tasks, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "eval"
    scores = evaluate.main(evaluate.parse_args(["--checkpoint_path", exported, "--tasks", "tiny_mc,tiny_ppl",
                                                "--include_path", tasks, "--device", "cpu", "--output_path", str(out),
                                                "--max_length", str(MAX_LENGTH), "--limit", "4"]))
    record = json.load(open(out / "lm_eval_results.json"))
    assert record["scores"] == scores and set(scores) == {"tiny_mc", "tiny_ppl"}
    assert record["n_samples"]["tiny_mc"]["effective"] == 4 and record["max_length"] == MAX_LENGTH
    assert 0 <= scores["tiny_mc"]["acc"] <= 1 and scores["tiny_ppl"]["byte_perplexity"] > 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out))
    events.Reload()
    assert events.Scalars("lm_eval/tiny_mc/acc")[0].value == pytest.approx(scores["tiny_mc"]["acc"])
    assert "tiny_mc" in capsys.readouterr().out


@pytest.mark.slow  # lm-eval indexes its thousands of task files first (about 8 s)
def test_task_and_install_mistakes_are_one_line(exported, tasks, tmp_path, monkeypatch, capsys):
    """An unknown task (with the nearest names), a missing --include_path, lm-eval not installed, a bad
    model_args value: one line each."""
    base = ["--checkpoint_path", exported, "--device", "cpu", "--output_path", str(tmp_path / "out")]
    fails_with_one_line(capsys, evaluate, [*base, "--tasks", "tiny_mcq", "--include_path", tasks],
                        "--tasks: lm-eval has no task 'tiny_mcq'", "tiny_mc")
    fails_with_one_line(capsys, evaluate, [*base, "--tasks", "x", "--include_path", str(tmp_path / "nowhere")],
                        "--include_path", "not a folder")
    fails_with_one_line(capsys, evaluate, [*base, "--tasks", ","], "--tasks")
    with pytest.raises(Exception, match="batch_size must be a positive integer"):
        harness.model_class()(pretrained=exported, batch_size="auto")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if it were not installed
    fails_with_one_line(capsys, evaluate, [*base, "--tasks", "tiny_mc"], "pip install lm-eval")
    assert not os.path.exists(tmp_path / "out" / "lm_eval_results.json")


@pytest.mark.slow  # imports lm-eval (seconds)
def test_generate_until_stops_at_the_until_string(exported):
    """generate_until: greedy decoding of LightGPT's decoder, cut before the first `until` string."""
    from lm_eval.api.instance import Instance

    lm = harness.model_class()(pretrained=exported, max_length=64)
    request = Instance("generate_until", {}, ("Hello", {"until": ["e"], "max_gen_toks": 8}), 0)
    free = lm.generate_until([Instance("generate_until", {}, ("Hello", {"until": [], "max_gen_toks": 8}), 0)])[0]
    (cut,) = lm.generate_until([request])
    assert "e" not in cut and free.startswith(cut) and (cut == free or free[len(cut)] == "e")
