"""evaluate.py on a tiny checkpoint: the files it writes, the windows it scores, its one-line errors."""

import csv
import glob
import importlib
import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import TINY, fails_with_one_line
from helpers import TRAINING_LENGTH

import evaluate
from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from data import open_tokens, prepare_token_files
from model import IGNORE_INDEX

tune = importlib.import_module("instruction-tune")


def run_eval(checkpoint, builtin_data, out, *extra):
    return evaluate.main(evaluate.parse_args([
        "--checkpoint_path", checkpoint, "--device", "cpu", "--dataset_path", builtin_data,
        "--output_path", str(out), "--windows", "6", "--batch_size", "4", *extra]))


@pytest.fixture(scope="module")
def evaluated(checkpoint, builtin_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluated")
    return out, run_eval(checkpoint, builtin_data, out, "--multiples", "0.5,1,2")


def test_default_lengths_are_multiples_of_the_training_length(evaluated):
    out, results = evaluated
    assert list(results) == [16, 32, 64]
    with open(out / "results.json") as f:
        record = json.load(f)
    assert record["training_length"] == TRAINING_LENGTH
    assert record["dataset"] == "builtin" and record["token_encoding"] == "bytes"  # the checkpoint's own
    args = evaluate.parse_args(["--checkpoint_path", "x"])
    assert evaluate.context_lengths(args, TRAINING_LENGTH) == [16, 32, 48, 64, 96, 128]  # 0.5, 1, 1.5, 2, 3, 4


def test_writes_csv_json_png_and_tensorboard(evaluated):
    out, results = evaluated
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["length"]) for r in rows] == [16, 32, 64]
    assert [float(r["multiple"]) for r in rows] == [0.5, 1.0, 2.0]
    for r in rows:
        assert int(r["windows"]) == 6 and int(r["tokens"]) == 6 * int(r["length"])
        assert math.isclose(float(r["perplexity"]), math.exp(float(r["loss"])), rel_tol=1e-6)
        assert 1 < float(r["perplexity"]) < 1000  # an untrained model: near the vocabulary of 257
    with open(out / "loss_by_position.csv") as f:
        positions = list(csv.DictReader(f))
    assert len(positions) == 16 + 32 + 64
    assert all(math.isfinite(float(p["loss"])) and float(p["loss"]) > 0 for p in positions)
    for L, r in results.items():  # the perplexity is exp of the mean of the per-position losses
        assert len(r["loss_by_position"]) == L
        assert math.isclose(r["perplexity"], math.exp(np.mean(r["loss_by_position"])), rel_tol=1e-9)
    for name in ("perplexity.png", "loss_by_position.png"):
        with open(out / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    events = glob.glob(str(out / "events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(events[0]).Reload()
    assert [e.step for e in scalars.Scalars("eval/perplexity")] == [16, 32, 64]
    assert len(scalars.Scalars("eval/loss_by_position/L64")) == 64
    assert not glob.glob(str(out / "*.tmp"))


def test_boundary_windows_start_documents_and_random_ones_are_seeded(builtin_data):
    files = prepare_token_files("builtin", None, "bytes", builtin_data, 1)
    tokens, eot = open_tokens(files.test, files.meta), files.meta["eot_id"]
    boundaries = np.concatenate([[0], np.flatnonzero(tokens == eot) + 1])
    draws = [evaluate.window_starts(tokens, boundaries, 100, 9, np.random.default_rng(s)) for s in (1, 1, 2)]
    boundary, random = draws[0]
    assert len(boundary) == 5 and len(random) == 4
    assert all((s == 0 or tokens[s - 1] == eot) and s + 101 <= len(tokens) for s in boundary)
    assert len(set(boundary)) == len(boundary)
    assert draws[0] == draws[1] and draws[0] != draws[2]


def test_scores_match_the_models_own_loss(checkpoint, builtin_data):
    """Windows of the training length: the per-token losses average to what forward(targets) computes."""
    model = model_from_checkpoint(load_checkpoint(checkpoint, "pretrain")).eval()
    files = prepare_token_files("builtin", None, "bytes", builtin_data, 1)
    tokens = open_tokens(files.test, files.meta)
    results = evaluate.evaluate_lengths(model, tokens, files.meta["eot_id"], [TRAINING_LENGTH], 4, 3,
                                        torch.device("cpu"), seed=5)
    r = results[TRAINING_LENGTH]
    starts = r["boundary_starts"] + r["random_starts"]
    w = torch.from_numpy(np.stack([tokens[s : s + TRAINING_LENGTH + 1] for s in starts]).astype(np.int64))
    with torch.no_grad():
        expected = model(w[:, :-1], w[:, 1:]).item()
    assert math.isclose(r["loss"], expected, rel_tol=1e-5)


def test_a_start_token_model_reads_each_window_after_an_end_of_text(checkpoint, builtin_data):
    """As pretrain.py --start_token eot trained it: each window scored after an end-of-text, L targets each."""
    model = model_from_checkpoint(load_checkpoint(checkpoint, "pretrain")).eval()
    files = prepare_token_files("builtin", None, "bytes", builtin_data, 1)
    tokens, eot = open_tokens(files.test, files.meta), files.meta["eot_id"]
    results = evaluate.evaluate_lengths(model, tokens, eot, [TRAINING_LENGTH], 4, 3, torch.device("cpu"), seed=5,
                                        start_token=True)
    r = results[TRAINING_LENGTH]
    starts = r["boundary_starts"] + r["random_starts"]
    w = torch.from_numpy(np.stack([tokens[s : s + TRAINING_LENGTH + 1] for s in starts]).astype(np.int64))
    x = torch.cat([torch.full((len(w), 1), eot), w[:, :-1]], dim=1)
    y = torch.cat([torch.full((len(w), 1), IGNORE_INDEX), w[:, 1:]], dim=1)  # the start's own prediction unscored
    with torch.no_grad():
        expected = model(x, y).item()
    assert math.isclose(r["loss"], expected, rel_tol=1e-5)
    plain = evaluate.evaluate_lengths(model, tokens, eot, [TRAINING_LENGTH], 4, 3, torch.device("cpu"), seed=5)
    assert plain[TRAINING_LENGTH]["loss"] != r["loss"]
    assert len(r["loss_by_position"]) == TRAINING_LENGTH


def test_bad_flags_and_files_are_one_line(checkpoint, builtin_data, tmp_path, capsys):
    base = ["--device", "cpu", "--dataset_path", builtin_data, "--output_path", str(tmp_path / "out")]
    state = load_checkpoint(checkpoint, "pretrain")
    del state["sha256"], state["args"]
    unrecorded = str(tmp_path / "unrecorded.pt")  # neither its corpus nor its training length
    save_checkpoint(state, unrecorded)
    learned = str(tmp_path / "learned.pt")  # GPT-2's positions, up to 2 x the training length
    positions = {"position_encoding": "learned", "max_position_embeddings": 2 * TRAINING_LENGTH}
    state = load_checkpoint(checkpoint, "pretrain")
    state["config"] = {**state["config"], **positions}
    state["model"]["position_embeddings.weight"] = torch.zeros(2 * TRAINING_LENGTH, TINY["embedding_dimensions"])
    del state["sha256"]
    save_checkpoint(state, learned)
    cases = [
        (["--checkpoint_path", learned], "--context_lengths", "learned positions, which stop at 64 tokens"),
        (["--context_lengths", "16,0"], "--context_lengths", "positive integers"),
        (["--context_lengths", "abc"], "--context_lengths"),
        (["--multiples", "1,-2"], "--multiples", "positive numbers"),
        (["--windows", "0"], "--windows", "positive integer"),
        (["--checkpoint_path", str(tmp_path / "none.pt")], "--checkpoint_path", "no checkpoint"),
        (["--checkpoint_path", checkpoint, "--lora_path", checkpoint], "--lora_path", "expected a 'lora' checkpoint"),
        (["--checkpoint_path", checkpoint, "--context_lengths", "100000"], "--context_lengths", "too few"),
        # a billion windows held 13.7 GB of start offsets before scoring anything; now one line, at once
        (["--checkpoint_path", checkpoint, "--context_lengths", "32", "--windows", "1000000000"], "--windows",
         "distinct windows of 32 + 1 tokens", "not 1,000,000,000"),
        (["--checkpoint_path", checkpoint, "--context_lengths", "8,100000", "--windows", "4"], "--context_lengths",
         "too few"),  # checked for every length before the first is scored
        (["--checkpoint_path", checkpoint, "--device", "nonsense"], "--device"),
        (["--checkpoint_path", unrecorded], "--context_lengths", "--training_length"),
        (["--checkpoint_path", unrecorded, "--training_length", "16"], "--dataset", "pass --dataset"),
        (["--checkpoint_path", checkpoint, "--output_path", checkpoint], "--output_path", "cannot write"),
    ]
    for argv, *fragments in cases:
        fails_with_one_line(capsys, evaluate, [*base, *argv], *fragments)


@pytest.mark.slow  # an instruction-tuning run: about 5 s
def test_lora_checkpoint_defaults_to_the_base_corpus(checkpoint, builtin_data, tmp_path):
    chats = tmp_path / "chats.jsonl"
    with open(chats, "w") as f:
        for i in range(40):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Say {i}."},
                                             {"role": "assistant", "content": "ok."}]}) + "\n")
    lora = tmp_path / "lora.pt"
    tune.main(tune.parse_args([
        "--base_model_path", checkpoint, "--dataset", str(chats), "--dataset_path", str(tmp_path / "datasets"),
        "--device", "cpu", "--max_tokens_per_sample", "48", "--batch_size", "4", "--gradient_accumulation_steps",
        "1", "--num_epochs", "1", "--warmup_steps", "1", "--rank", "2", "--eval_samples", "4",
        "--checkpoint_path", str(lora), "--run_dir_path", str(tmp_path / "runs"), "--seed", "3",
        "--num_dataset_processes", "1"]))
    out = tmp_path / "out"
    results = run_eval(checkpoint, builtin_data, out, "--lora_path", str(lora), "--multiples", "1")
    assert list(results) == [48]  # the instruction tuning's row length
    with open(out / "results.json") as f:
        assert json.load(f)["dataset"] == "builtin"
    assert os.path.exists(out / "results.csv")
