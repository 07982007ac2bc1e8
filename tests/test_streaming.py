"""pretrain.py --streaming: a corpus shaped like FineWeb (parquet shards with a `text` column) read through
datasets' streaming from local files, offline: ranks take disjoint documents, the test stream never meets
the training stream, a killed and resumed run equals an uninterrupted one, and a resume at another world
size goes on."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, fails_with_one_line, tiny_pretrain_args
from helpers import check, launch, whole

import pretrain
import streaming
from checkpoint import load_checkpoint
from data import builtin_documents, load_encoding

pa = pytest.importorskip("pyarrow")  # datasets' own dependency
pq = pytest.importorskip("pyarrow.parquet")


def write_shards(folder, shards=3, per_shard=120) -> list[str]:
    """Parquet shards like FineWeb's: `text` with other columns beside it, several row groups each. Every
    document is unique (its shard and row lead it)."""
    os.makedirs(folder, exist_ok=True)
    topics, texts = builtin_documents(), []
    for s in range(shards):
        rows = [f"<{s}:{i}> " + topics[(7 * s + i) % len(topics)][:1500] for i in range(per_shard)]
        texts += rows
        table = pa.table({"text": rows, "id": [f"{s}-{i}" for i in range(per_shard)], "score": [0.5] * per_shard})
        pq.write_table(table, os.path.join(folder, f"000_0000{s}.parquet"), row_group_size=40)
    return texts


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fineweb-like") / "data"
    return str(folder), write_shards(folder)


def stream_args(folder, run, *extra):
    return tiny_pretrain_args(folder, str(run), "--dataset", folder, "--streaming", "--dataset_path",
                              str(run / "none"), "--shuffle_buffer_tokens", "4096", "--num_dataset_processes", "2",
                              *extra)


def rank_documents(source, rank, world_size) -> list[str]:
    return [text for texts, _ in streaming._chunks(source, None, rank, world_size) for text in texts]


def test_ranks_take_disjoint_documents_and_the_test_stream_is_held_out(shards):
    folder, texts = shards
    source = streaming.open_source(folder, None)
    assert source.test_every == 10
    test = [t for i, t in enumerate(texts) if i % 10 == 0]
    train = [t for i, t in enumerate(texts) if i % 10]
    ranks = [rank_documents(source, r, 2) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1])  # disjoint
    assert sorted(ranks[0] + ranks[1]) == sorted(train) == sorted(rank_documents(source, 0, 1))
    assert abs(len(ranks[0]) - len(ranks[1])) <= 1
    assert not set(train) & set(test)
    encoding = load_encoding("bytes")
    held_out = streaming.test_tokens(source, encoding, 10**9)  # all of them
    expected = b"".join(t.encode() + b"\0" for t in test)  # bytes; end-of-text (256) shown as a stand-in
    assert len(held_out) == len(expected)
    text = bytes(int(t) if t < 256 else 0 for t in held_out)
    for document in train:
        assert document.encode() not in text  # no training document in the test tokens


def test_the_state_before_a_batch_draws_it_again(shards, monkeypatch):
    folder, _ = shards
    monkeypatch.setattr(streaming.StreamSampler, "ANCHOR_EVERY", 3)  # restore from an anchor plus batches since
    source, encoding = streaming.open_source(folder, None), load_encoding("bytes")
    sampler = streaming.StreamSampler(source, encoding, 32, 4, seed=5, buffer_tokens=2048, workers=2)
    try:
        for _ in range(7):
            sampler.next_batch()
        state = sampler.state_dict()
        assert state["skip"] == 1
        ahead = [sampler.next_batch() for _ in range(6)]
        sampler.load_state_dict(state)
        again = [sampler.next_batch() for _ in range(6)]
    finally:
        sampler.close()
    for (a, b), (c, d) in zip(ahead, again):
        assert torch.equal(a, c) and torch.equal(b, d)


@pytest.mark.slow
def test_a_streamed_run_resumed_equals_an_uninterrupted_one(shards, tmp_path):
    folder, _ = shards
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ("--dropout", "0.1", "--lr_schedule", "constant")  # a schedule that does not depend on the length
    pretrain.main(pretrain.parse_args(stream_args(folder, straight, *common)))
    pretrain.main(pretrain.parse_args(stream_args(folder, split, *common, "--num_epochs", "2")))
    pretrain.main(pretrain.parse_args(stream_args(folder, split, *common, "--resume")))
    a, b = load_checkpoint(str(straight / "checkpoint.pt"), "pretrain"), load_checkpoint(str(split / "checkpoint.pt"), "pretrain")
    assert a["step"] == b["step"] == 8
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    assert not os.path.exists(straight / "none")  # no token files


@pytest.mark.slow
def test_a_streamed_run_killed_mid_run_resumes_bit_for_bit(shards, tmp_path):
    """SIGTERM while it trains (a checkpoint at the step it stopped), then --resume: the weights of a run
    that never stopped."""
    folder, _ = shards
    extra = ("--num_epochs", "40", "--checkpoint_interval", "1000")
    check(launch(1, stream_args(folder, tmp_path / "straight", *extra)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "pretrain.py", *stream_args(folder, tmp_path / "split", *extra)],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if "step 10:" in line:  # training, well past the first batches
            process.send_signal(signal.SIGTERM)
            break
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 128 + signal.SIGTERM, output
    stopped = load_checkpoint(str(tmp_path / "split" / "checkpoint.pt"), "pretrain")["step"]
    assert 10 <= stopped < 80
    check(launch(1, stream_args(folder, tmp_path / "split", *extra, "--resume")))
    a = load_checkpoint(str(tmp_path / "straight" / "checkpoint.pt"), "pretrain")
    b = load_checkpoint(str(tmp_path / "split" / "checkpoint.pt"), "pretrain")
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name


@pytest.mark.slow
def test_two_ranks_stream_resume_exactly_and_reshard_to_one(shards, tmp_path):
    folder, _ = shards
    common = ("--ddp_sharding_level", "2", "--embedding_dimensions", "27", "--num_attention_heads", "3",
              "--lr_schedule", "constant")
    check(launch(2, stream_args(folder, tmp_path / "straight", *common)))
    check(launch(2, stream_args(folder, tmp_path / "split", *common, "--num_epochs", "2")))
    saved = load_checkpoint(str(tmp_path / "split" / "checkpoint.pt"), "pretrain", required=())
    assert len(saved["sampler"]) == 2  # each rank's own stream
    check(launch(2, stream_args(folder, tmp_path / "split", *common, "--resume")))
    a, b = whole(tmp_path / "straight" / "checkpoint.pt"), whole(tmp_path / "split" / "checkpoint.pt")
    for name, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][name], rtol=0, atol=1e-7, msg=name)
    check(launch(2, stream_args(folder, tmp_path / "other", *common, "--num_epochs", "2")))
    resumed = check(launch(1, stream_args(folder, tmp_path / "other", *common, "--resume")))
    assert "written by 2 process(es), now 1" in resumed.stdout
    assert load_checkpoint(str(tmp_path / "other" / "checkpoint.pt"), "pretrain", required=())["step"] == 8


def test_a_stream_that_ends_is_one_line(tmp_path, capsys):
    folder = tmp_path / "small"
    write_shards(folder, shards=1, per_shard=4)  # 3 training documents, about 4,500 bytes: fewer than 40 steps take
    argv = stream_args(str(folder), tmp_path, "--shuffle_buffer_tokens", "64", "--num_epochs", "20")
    fails_with_one_line(capsys, pretrain, argv, "the stream of", "ended", "fewer steps")


def test_streaming_and_token_files_do_not_resume_each_other(shards, builtin_data, tmp_path, capsys):
    folder, _ = shards
    pretrain.main(pretrain.parse_args(tiny_pretrain_args(builtin_data, str(tmp_path), "--num_epochs", "1")))
    argv = tiny_pretrain_args(builtin_data, str(tmp_path), "--streaming", "--resume")
    fails_with_one_line(capsys, pretrain, argv, "--streaming", "differs from the checkpoint")


def test_a_stream_without_text_is_one_line(tmp_path, capsys):
    folder = tmp_path / "notext"
    os.makedirs(folder)
    pq.write_table(pa.table({"body": ["a", "b"]}), str(folder / "x.parquet"))
    fails_with_one_line(capsys, pretrain, stream_args(str(folder), tmp_path), "no 'text' column", "body")
