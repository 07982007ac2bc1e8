import json
import os

import pytest

import bench
from common import run_main
from model import GPT, GPTConfig

TINY = ["--device", "cpu", "--vocabulary_size", "300", "--embedding_dimensions", "32", "--num_attention_heads", "4",
        "--num_hidden_layers", "2", "--iterations", "2", "--warmup_iterations", "1"]


def run(capsys, *argv):
    rows = bench.main(bench.parse_args(list(argv)))
    out = capsys.readouterr().out.splitlines()
    printed = [json.loads(line) for line in out if line.startswith("{")]
    assert printed == rows  # one JSON object per measurement, on its own line
    assert any(line.startswith("mode") for line in out)  # then the table
    return rows


def test_train_reports_throughput_memory_and_mfu(capsys):
    rows = run(capsys, "train", *TINY, "--batch_size", "2", "--tokens_per_sample", "16", "--peak_tflops", "1")
    (row,) = rows
    assert row["mode"] == "train" and row["system"] == "lightgpt"
    assert row["tokens_per_s"] > 0 and row["peak_memory_gib"] > 0 and row["ms_per_step"] > 0
    flops = GPT(GPTConfig(300, 32, 4, 2, 4, 0.1)).flops_per_token(16)
    assert row["model_tflops"] == pytest.approx(row["tokens_per_s"] * flops / 1e12, rel=1e-3)
    assert row["mfu"] == pytest.approx(row["model_tflops"] / 1.0, rel=1e-3)


def test_decode_reports_batch_one_and_a_larger_batch(capsys):
    rows = run(capsys, "decode", *TINY, "--max_tokens", "6", "--prompt_tokens", "3", "--decode_batch_size", "3",
               "--context_length", "8")
    assert [r["batch_size"] for r in rows] == [1, 3]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["ms_per_token"] > 0 and r["new_tokens"] == 6
        # a key and a value of width 32 in each of 2 layers, fp32 on the CPU, per token of the 8-token cache
        assert r["kv_cache_gib"] == pytest.approx(2 * 2 * 32 * 4 * r["batch_size"] * 8 / 2**30, rel=1e-3)


def test_tokenize_compares_the_pipeline_with_raw_tiktoken(capsys):
    rows = run(capsys, "tokenize", "--token_encoding", "bytes", "--num_dataset_processes", "2", "--iterations", "1")
    raw, pipeline = rows
    assert (raw["system"], pipeline["system"]) == ("tiktoken-batch", "lightgpt-pipeline")
    assert raw["tokens"] == pipeline["tokens"] >= 4_000_000  # the same text, repeated to 4M characters
    assert pipeline["fraction_of_raw"] == pytest.approx(pipeline["tokens_per_s"] / raw["tokens_per_s"], rel=0.01)


def test_flops_per_token_follows_the_palm_convention():
    config = GPTConfig(300, 32, 4, 2, 4, 0.0)
    C, L, T = 32, 2, 16
    assert GPT(config).flops_per_token(T) == 6 * (L * 12 * C * C + 300 * C) + 12 * L * C * T


def test_attention_backend_is_chosen_and_reported(capsys):
    rows = run(capsys, "train", *TINY, "--batch_size", "2", "--tokens_per_sample", "16", "--attention_backend", "math")
    assert rows[0]["attention_backend"] == "math"
    from conftest import fails_with_one_line

    fails_with_one_line(capsys, bench, ["train", *TINY, "--batch_size", "2", "--tokens_per_sample", "16",
                                        "--attention_backend", "cudnn"], "--attention_backend cudnn cannot run")


def test_train_times_pretrains_optimizer_and_torchs_needs_no_momentum(capsys):
    from conftest import fails_with_one_line

    base = ["train", *TINY, "--batch_size", "2", "--tokens_per_sample", "16", "--iterations", "1"]
    assert run(capsys, *base)[0]["optimizer"] == "lightgpt"  # with momentum 0.9, as pretrain.py
    assert run(capsys, *base, "--optimizer", "torch", "--momentum", "0")[0]["optimizer"] == "torch"
    fails_with_one_line(capsys, bench, base + ["--optimizer", "torch"], "--momentum 0.9", "torch.optim.Adafactor")


def test_tokenize_on_empty_documents_is_one_line(capsys, tmp_path):
    corpus = tmp_path / "empty.jsonl"
    corpus.write_text('{"text": ""}\n{"text": ""}\n')
    with pytest.raises(SystemExit) as stop:
        run_main(bench.main, bench.parse_args, ["tokenize", "--dataset", str(corpus), "--token_encoding", "bytes",
                                                "--num_dataset_processes", "1"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith("holds no text to tokenize (no documents, or only empty ones)")


@pytest.mark.slow
def test_tokenize_of_a_tiny_corpus_stays_small(capsys, tmp_path):
    """The defect: a 3-character corpus was repeated into 1.3 million documents and grew past 7.5 GB."""
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("abc")
    rows = run(capsys, "tokenize", "--dataset", str(corpus), "--token_encoding", "bytes",
               "--num_dataset_processes", "1", "--iterations", "1")
    assert rows[0]["documents"] == bench.TOKENIZE_DOCUMENTS and rows[0]["tokens"] == 3 * bench.TOKENIZE_DOCUMENTS


@pytest.mark.slow
def test_tokenize_leaves_out_rows_that_are_not_text(capsys, tmp_path):
    corpus = tmp_path / "mixed.jsonl"
    text = "some text " * 20_000  # long, so that few copies reach the 4M characters timed
    corpus.write_text(json.dumps({"text": text}) + '\n{"text": null}\n{"text": 42}\n')
    rows = run(capsys, "tokenize", "--dataset", str(corpus), "--token_encoding", "bytes",
               "--num_dataset_processes", "1", "--iterations", "1")
    assert rows[0]["tokens"] == len(text) * rows[0]["documents"]


@pytest.mark.slow
def test_pack_compares_packed_rows_with_padded_ones_on_the_same_conversations(capsys):
    rows = run(capsys, "pack", *TINY, "--token_encoding", "bytes", "--batch_size", "4", "--tokens_per_sample", "256",
               "--rank", "2")
    packed, padded = rows
    assert (packed["system"], padded["system"]) == ("packed", "padded")
    assert packed["conversations"] == padded["conversations"] > 300  # the same conversations, the builtin set
    assert packed["rows"] < padded["rows"] == padded["conversations"]  # one conversation a padded row
    assert padded["fill"] < packed["fill"] <= 1
    assert packed["tokens_per_s"] > 0 and packed["epoch_s"] > 0


@pytest.mark.parametrize("through", ["engine", pytest.param("http", marks=pytest.mark.slow)])
def test_serve_compares_batched_with_one_at_a_time(capsys, through):
    rows = run(capsys, "serve", *TINY, "--requests", "4", "--clients", "1,2", "--max_tokens", "5",
               "--prompt_tokens", "3", "--context_length", "16", "--max_batch", "4", "--through", through)
    assert [(r["system"], r["clients"]) for r in rows] == [("one-at-a-time", 1), ("one-at-a-time", 2),
                                                          ("batched", 1), ("batched", 2)]
    for r in rows:
        assert r["through"] == through and r["tokens_per_s"] > 0 and 0 < r["tokens"] <= 4 * 5
    for alone, batched in zip(rows[:2], rows[2:]):  # seeded requests: the same tokens either way
        assert batched["tokens"] == alone["tokens"]
        assert batched["speedup"] == pytest.approx(batched["tokens_per_s"] / alone["tokens_per_s"], abs=0.01)


@pytest.mark.slow  # a fresh interpreter imports every script: seconds
def test_the_gpu_machines_scripts_need_none_of_the_optional_libraries():
    """A GPU machine may have only torch, tiktoken, numpy, tqdm and tensorboard: training, decoding, serving's
    engine and the benchmark import without datasets, the hub, safetensors, the web stack or ONNX, and a
    missing checkpoint is still the plain one-line error."""
    import subprocess
    import sys

    code = ("import sys\n"
            "for m in ('datasets', 'huggingface_hub', 'safetensors', 'fastapi', 'uvicorn', 'onnx', 'onnxruntime'):\n"
            "    sys.modules[m] = None  # import m now raises ImportError\n"
            "import bench, generate, pretrain, engine, beam_search, evaluate, importlib\n"
            "importlib.import_module('instruction-tune')\n"
            "from common import UserError\n"
            "from generate import load_model_state\n"
            "try:\n"
            "    load_model_state('./checkpoints/none.pt')\n"
            "except UserError as e:\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "--checkpoint_path: no checkpoint at ./checkpoints/none.pt"


@pytest.mark.slow  # transformers' continuous batching starts a scheduler: seconds
def test_serve_times_transformers_continuous_batching_beside_ours(capsys):
    rows = run(capsys, "serve", *TINY, "--requests", "3", "--clients", "3", "--max_tokens", "4", "--prompt_tokens", "3",
               "--context_length", "16", "--max_batch", "4", "--through", "engine", "--compare_hf")
    peer = rows[-1]
    assert peer["system"] == "transformers generate_batch" and peer["tokens"] == 3 * 4 and peer["tokens_per_s"] > 0
    batched = next(r for r in rows if r["system"] == "batched")
    assert peer["lightgpt_batched_over_this"] == pytest.approx(batched["tokens_per_s"] / peer["tokens_per_s"], rel=0.1)


@pytest.mark.slow  # three engines, a long prompt each
@pytest.mark.parametrize("scenario", ["long-prompt", "shared-prefix"])
def test_the_latency_scenarios_report_their_percentiles(capsys, scenario):
    rows = run(capsys, "serve", *TINY, "--scenario", scenario, "--max_tokens", "24", "--requests", "4",
               "--prompt_tokens", "4", "--long_prompt_tokens", "100", "--system_tokens", "40", "--prefill_chunk", "16")
    systems = [r["system"] for r in rows]
    if scenario == "long-prompt":
        assert systems == ["no long prompt (the control)", "whole prefill", "auto chunks in the steps",
                           "auto chunks between the steps", "chunks of 16"]
        assert all(r["long_prompt_tokens"] == 100 for r in rows) and rows[0]["long_ttft_ms"] is None
        assert all(r["long_ttft_ms"] > 0 for r in rows[1:])
    else:
        assert systems == ["prefix cache off", "prefix cache on"] and rows[0]["cached_tokens"] == 0 < rows[1]["cached_tokens"]
    assert all(0 < r["itl_p50_ms"] <= r["itl_p99_ms"] <= r["itl_max_ms"] and r["ttft_p50_ms"] > 0 for r in rows)


def test_stream_counts_the_batches_a_streamed_run_would_draw(capsys):
    rows = run(capsys, "stream", "--token_encoding", "bytes", "--num_dataset_processes", "2", "--batch_size", "4",
               "--tokens_per_sample", "64", "--iterations", "20", "--warmup_iterations", "2")
    assert [r["threads"] for r in rows] == [1, 2]  # 1, 2, 4, ... up to --num_dataset_processes
    for r in rows:
        assert r["mode"] == "stream" and r["tokens"] == 20 * 4 * 64 and r["tokens_per_s"] > 0
