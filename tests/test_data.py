import base64
import errno
import io
import json
import os

import numpy as np
import pytest
import tiktoken
import torch

import data
from common import UserError
from data import (
    BatchPrefetcher,
    WindowSampler,
    builtin_documents,
    eval_windows,
    load_encoding,
    open_tokens,
    prepare_token_files,
    token_dtype,
    window_batch,
    write_token_files,
)

DOCS = [f"Document number {i}: the quick brown fox jumps over the lazy dog {i * 7}." for i in range(25)]


def expected_splits(encoding, docs, test_every=10):
    eot = data.eot_id(encoding)
    train, test = [], []
    for i, d in enumerate(docs):
        (test if i % test_every == 0 else train).extend(encoding.encode_ordinary(d) + [eot])
    return train, test


# ----------------------------------------------------------------------------- tokenizers


def test_bytes_encoding_round_trips_and_has_end_of_text():
    enc = load_encoding("bytes")
    text = "héllo wörld ✓\n"
    ids = enc.encode_ordinary(text)
    assert ids == list(text.encode("utf-8"))
    assert enc.decode(ids) == text
    assert data.eot_id(enc) == 256 and enc.n_vocab == 257


def write_tiktoken(path, merges):
    """A .tiktoken file: the 256 bytes, then `merges` ranked in order."""
    ranks = [bytes([i]) for i in range(256)] + merges
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)))


def test_local_tiktoken_file(tmp_path):
    path = tmp_path / "tiny.tiktoken"
    write_tiktoken(path, [b"th", b"the"])
    enc = load_encoding(str(path))
    assert enc.encode_ordinary("the") == [257]
    assert data.eot_id(enc) == 258
    assert data.encoding_slug(str(path)).startswith("tiktoken-tiny-")


def test_a_tiktoken_file_edited_in_place_loads_its_new_vocabulary(tmp_path):
    """tiktoken's own loader caches a local file under a hash of its path, so an edit went unseen."""
    path = tmp_path / "tiny.tiktoken"
    write_tiktoken(path, [b"th", b"the"])
    before = load_encoding(str(path))
    assert before.encode_ordinary("then") == [257, ord("n")] and before.n_vocab == 259
    slug = data.encoding_slug(str(path))
    write_tiktoken(path, [b"he", b"en", b"hen", b"then"])
    after = load_encoding(str(path))
    assert after.encode_ordinary("then") == [259] and after.n_vocab == 261 and data.eot_id(after) == 260
    assert data.encoding_slug(str(path)) != slug  # new token files, not the old vocabulary's
    # The loaded encoding is named like the token files it writes, from the same contents.
    assert (before.name, after.name) == (slug, data.encoding_slug(str(path)))


def test_a_malformed_tiktoken_file_is_one_clear_error(tmp_path):
    path = tmp_path / "bad.tiktoken"
    write_tiktoken(path, [b"th"])
    path.write_text(path.read_text() + "dGhl\n")  # a token without its rank
    with pytest.raises(UserError, match=r"line 258 of .*bad.tiktoken is not '<base64 token> <rank>'"):
        load_encoding(str(path))
    path.write_text("")
    with pytest.raises(UserError, match="holds no tokens"):
        load_encoding(str(path))


def test_unreachable_named_encoding_is_one_clear_error(offline_tiktoken):
    with pytest.raises(UserError) as e:
        load_encoding("cl100k_base")
    message = str(e.value)
    assert ("cl100k_base" in message and "TIKTOKEN_CACHE_DIR" in message and "bytes" in message
            and ".tiktoken" in message)
    assert "\n" not in message


def test_unknown_encoding_and_missing_file():
    with pytest.raises(UserError, match="unknown"):
        load_encoding("gpt5_base")
    with pytest.raises(UserError, match="no .tiktoken file"):
        load_encoding("/nowhere/x.tiktoken")


# ----------------------------------------------------------------------------- token files


def test_dtype_is_uint16_only_while_every_id_fits():
    assert token_dtype(257) == np.uint16
    assert token_dtype(50_257) == np.uint16
    assert token_dtype(65_536) == np.uint16  # ids 0..65535
    assert token_dtype(65_537) == np.uint32
    assert token_dtype(200_019) == np.uint32


def test_ids_above_65535_are_stored_without_overflow(tmp_path):
    enc = tiktoken.Encoding(
        name="wide", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={"<|endoftext|>": 100_000},
    )
    train_path, test_path = str(tmp_path / "train.bin"), str(tmp_path / "test.bin")
    counts = write_token_files(iter([DOCS]), enc, train_path, test_path, test_every=10, num_threads=2)
    train = np.fromfile(train_path, dtype=np.uint32)
    expected_train, expected_test = expected_splits(enc, DOCS)
    assert train.tolist() == expected_train
    assert np.fromfile(test_path, dtype=np.uint32).tolist() == expected_test
    assert (train == 100_000).sum() == counts["train"]["documents"] == 22
    assert counts["test"]["documents"] == 3  # documents 0, 10 and 20


def test_interrupted_tokenizing_leaves_no_file_behind(tmp_path):
    enc = load_encoding("bytes")
    train_path, test_path = str(tmp_path / "train.bin"), str(tmp_path / "test.bin")

    def batches():
        yield DOCS[:5]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_token_files(batches(), enc, train_path, test_path, test_every=10, num_threads=2)
    assert os.listdir(tmp_path) == []


def test_interrupted_rebuild_keeps_no_stale_metadata(tmp_path, monkeypatch):
    path = str(tmp_path)
    files = prepare_token_files("builtin", None, "bytes", path, 2)
    os.truncate(files.train, 10)  # the token file no longer matches its metadata: it is rebuilt

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "write_token_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_token_files("builtin", None, "bytes", path, 2)
    assert not os.path.exists(files.train.replace(".train.bin", ".json"))
    assert not any(name.endswith(".tmp") for name in os.listdir(path))


def test_token_files_get_the_mode_the_umask_gives(tmp_path):
    """Not mkstemp's 0600: another user of a shared machine may read a corpus the umask lets them read."""
    previous = os.umask(0o022)
    try:
        files = prepare_token_files("builtin", None, "bytes", str(tmp_path), 2)
    finally:
        os.umask(previous)
    for path in (files.train, files.test, files.train.replace(".train.bin", ".json")):
        assert os.stat(path).st_mode & 0o777 == 0o644, path


def test_builtin_corpus_is_large_enough_and_reused(builtin_data, monkeypatch):
    assert sum(len(d) for d in builtin_documents()) >= 400_000
    monkeypatch.setattr(data, "write_token_files", lambda *a, **k: pytest.fail("token files were rebuilt"))
    files = prepare_token_files("builtin", None, "bytes", builtin_data, 2)
    meta = files.meta
    assert meta["dtype"] == "uint16" and meta["token_encoding"] == "bytes" and meta["vocabulary_size"] == 257
    train = open_tokens(files.train, meta)
    assert len(train) == meta["splits"]["train"]["tokens"] > 400_000
    assert meta["splits"]["test"]["documents"] >= 5
    assert (np.asarray(train) == 256).sum() == meta["splits"]["train"]["documents"]


def write_local(tmp_path, kind):
    if kind == "txt":
        path = tmp_path / "corpus.txt"
        path.write_text("\n\n".join(DOCS))
    elif kind == "jsonl":
        path = tmp_path / "corpus.jsonl"
        path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "corpus.parquet"
        pq.write_table(pa.table({"text": DOCS, "id": list(range(len(DOCS)))}), path)
    return str(path)


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_local_corpora_through_datasets(tmp_path, kind):
    source = write_local(tmp_path, kind)
    files = prepare_token_files(source, None, "bytes", str(tmp_path / "tokens"), 1)
    enc = load_encoding("bytes")
    expected_train, expected_test = expected_splits(enc, DOCS)
    assert open_tokens(files.train, files.meta).tolist() == expected_train
    assert open_tokens(files.test, files.meta).tolist() == expected_test
    assert files.meta["splits"]["train"]["documents"] == 22


def test_local_corpus_errors(tmp_path):
    with pytest.raises(UserError, match="no such file or folder"):
        prepare_token_files(str(tmp_path / "missing.jsonl"), None, "bytes", str(tmp_path), 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no"):
        prepare_token_files(str(tmp_path / "empty"), None, "bytes", str(tmp_path), 1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "no text column"}\n')
    with pytest.raises(UserError, match="no 'text' column"):
        prepare_token_files(str(bad), None, "bytes", str(tmp_path / "tokens"), 1)


def test_fineweb_subset_is_checked(tmp_path):
    with pytest.raises(UserError, match="not a FineWeb subset"):
        prepare_token_files("HuggingFaceFW/fineweb", "sample-1BT", "bytes", str(tmp_path), 1)


# ----------------------------------------------------------------------------- batches


def test_targets_are_inputs_shifted_by_one():
    tokens = np.arange(1000, dtype=np.uint16)
    sampler = WindowSampler(tokens, tokens_per_sample=16, batch_size=4, seed=0)
    x, y = sampler.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y - x, torch.ones_like(x))
    xs, ys = window_batch(tokens, [0, 100], 8)
    assert xs[1].tolist() == list(range(100, 108)) and ys[1].tolist() == list(range(101, 109))


def test_a_length_curriculum_draws_short_windows_first_and_resumes_where_it_was():
    tokens = np.arange(5000, dtype=np.uint16)
    sampler = WindowSampler(tokens, 16, 2, seed=0, world_size=2, short_tokens=4, short_samples=8)
    lengths = [sampler.next_batch()[0].size(1) for _ in range(3)]  # 4 samples (2 ranks x 2) a draw
    state = sampler.state_dict()
    later = [sampler.next_batch() for _ in range(2)]
    assert lengths == [4, 4, 16] and [x.size(1) for x, _ in later] == [16, 16]
    restored = WindowSampler(tokens, 16, 2, seed=5, world_size=2, short_tokens=4, short_samples=8)
    restored.load_state_dict(state)
    for (x, y), (rx, ry) in zip(later, [restored.next_batch() for _ in range(2)]):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_a_start_token_replaces_the_first_input_of_every_window():
    tokens = np.arange(1000, dtype=np.uint16)
    xs, ys = window_batch(tokens, [0, 100], 8, start_token=999)
    assert xs[1].tolist() == [999] + list(range(101, 108)) and ys[1].tolist() == list(range(101, 109))
    plain, with_start = (WindowSampler(tokens, 16, 4, seed=0, start_token=s) for s in (None, 7))
    (x, y), (sx, sy) = plain.next_batch(), with_start.next_batch()
    assert torch.equal(y, sy) and torch.equal(x[:, 1:], sx[:, 1:])  # the same windows and targets
    assert (sx[:, 0] == 7).all() and (x[:, 0] != 7).all()


def test_sampler_state_restores_the_same_batches():
    tokens = np.arange(5000, dtype=np.uint16)
    prefetch = BatchPrefetcher(WindowSampler(tokens, 8, 2, seed=3), torch.device("cpu"))
    prefetch.next()
    state = prefetch.state_dict()
    expected = [prefetch.next() for _ in range(3)]
    restored = BatchPrefetcher(WindowSampler(tokens, 8, 2, seed=99), torch.device("cpu"))
    restored.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, [restored.next() for _ in range(3)]):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_eval_windows_are_fixed_and_disjoint():
    tokens = np.zeros(10_001, dtype=np.uint16)
    starts = eval_windows(tokens, 100, 30)
    assert starts == eval_windows(tokens, 100, 30)
    assert len(starts) == 30 and all(b - a >= 100 for a, b in zip(starts, starts[1:]))
    assert starts[-1] + 101 <= len(tokens)
    assert len(eval_windows(tokens, 100, 10_000)) == 100  # capped by what the split holds
    with pytest.raises(UserError, match="test split holds only"):
        eval_windows(tokens[:50], 100, 4)


def test_too_short_train_split_is_a_clear_error():
    with pytest.raises(UserError, match="--tokens_per_sample 64"):
        WindowSampler(np.zeros(10, dtype=np.uint16), 64, 1, seed=0)


# ----------------------------------------------------------------------------- hub datasets without a network


def no_download(*args, **kwargs):
    pytest.fail("datasets.load_dataset was called: huggingface_hub would retry for half a minute")


def test_offline_mode_names_the_dataset_and_the_ways_out(tmp_path):
    """The tests run with HF_HUB_OFFLINE=1 (conftest): datasets looks in its cache only, and fails fast."""
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(UserError) as e:
        prepare_token_files("someone/not-cached", None, "bytes", str(tmp_path), 1)
    message = str(e.value)
    for fragment in ("someone/not-cached", "HF_HUB_OFFLINE", "--dataset builtin", "local file"):
        assert fragment in message, message
    assert "\n" not in message and os.listdir(tmp_path) == []


@pytest.fixture
def online(monkeypatch):
    """As on a machine where HuggingFace's offline mode is not set."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")


def test_an_unreachable_hub_stops_at_once(tmp_path, monkeypatch, online):
    import datasets

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens, refused at once
    monkeypatch.setattr(datasets, "load_dataset", no_download)
    with pytest.raises(UserError) as e:
        prepare_token_files("someone/corpus", "en", "bytes", str(tmp_path), 1)
    message = str(e.value)
    for fragment in ("someone/corpus (en)", "http://127.0.0.1:9", "--dataset builtin", "local file",
                     "HF_HUB_OFFLINE=1"):
        assert fragment in message, message


def test_the_reachability_check_honours_hf_endpoint(tmp_path, monkeypatch, online):
    import datasets

    asked = []
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.org/")
    monkeypatch.setattr(data, "hub_reachable", lambda endpoint, timeout: asked.append((endpoint, timeout)))
    monkeypatch.setattr(datasets, "load_dataset", no_download)
    with pytest.raises(UserError, match="cannot reach the HuggingFace hub at https://hub.example.org"):
        prepare_token_files("someone/corpus", None, "bytes", str(tmp_path), 1)
    assert asked == [("https://hub.example.org", 3.0)]


def test_a_reachable_hub_keeps_the_download_path_and_its_noise_down(tmp_path, monkeypatch, recwarn, online):
    """huggingface_hub logs every retry (about ten lines offline) and the libraries warn on stderr; while the
    download runs, neither reaches the user, so its error stays one line."""
    import logging
    import warnings

    import datasets

    heard = []

    def failing_download(path, **kwargs):
        for logger in ("huggingface_hub.utils._http", "datasets.load"):
            heard.append(logging.getLogger(logger).isEnabledFor(logging.WARNING))
        warnings.warn("a library warning")
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(data, "hub_reachable", lambda endpoint, timeout: True)
    monkeypatch.setattr(datasets, "load_dataset", failing_download)
    with pytest.raises(UserError, match="could not load dataset someone/corpus from the HuggingFace hub"):
        prepare_token_files("someone/corpus", None, "bytes", str(tmp_path), 1)
    assert heard == [False, False]
    assert [str(w.message) for w in recwarn] == []


# ----------------------------------------------------------------------------- corpus errors


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_malformed_json_file_is_named_with_the_cause_datasets_hides(tmp_path, capfd, processes):
    """datasets says only "An error occurred while generating the dataset" and logs the cause on stderr."""
    import datasets
    from conftest import fails_with_one_line, tiny_pretrain_args

    import pretrain

    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"text": d} for d in DOCS])
    (folder / "b.jsonl").write_text('{"text": "fine"}\n{"text": "no closing brace"\n')
    argv = tiny_pretrain_args(str(tmp_path / "t"), str(tmp_path / "run"), "--num_dataset_processes", str(processes))
    argv[argv.index("builtin")] = str(folder)
    datasets.disable_progress_bars()  # its bars share stderr with the error line (\r counts as a line break)
    try:
        err = fails_with_one_line(capfd, pretrain, argv, f"could not read {folder / 'b.jsonl'} (",
                                  "ArrowInvalid: JSON parse error")
    finally:
        datasets.enable_progress_bars()
    assert "An error occurred while generating the dataset" not in err



def test_a_worker_that_datasets_forks_ends_quietly_when_its_pool_is_terminated(tmp_path, monkeypatch):
    """datasets ends its worker pool with SIGTERM when a load fails; the workers had inherited pretrain's
    StopFlag handler, raised Stopped and printed a traceback ("Process ForkPoolWorker-1: ...") under the
    one-line error."""
    import signal
    import time

    import datasets

    from training import StopFlag

    endings = []

    def load_dataset_with_a_worker(*args, **kwargs):
        pid = os.fork()
        if pid == 0:  # the worker, terminated as Pool.terminate() does
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            finally:
                os._exit(3)  # only if SIGTERM did not end it
        endings.append(os.waitpid(pid, 0)[1])
        raise ValueError("a file that does not parse")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset_with_a_worker)
    source = write_jsonl(tmp_path / "corpus.jsonl", [{"text": d} for d in DOCS])
    with StopFlag(), pytest.raises(UserError, match="could not read .*corpus.jsonl .ValueError: a file that"):
        prepare_token_files(source, None, "bytes", str(tmp_path / "t"), 2)
    (status,) = endings
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM


# ----------------------------------------------------------------------------- damaged token files


def fresh_builtin(path, capsys=None):
    """The builtin corpus's byte-level token files in a folder of the test's own, ready to damage."""
    files = prepare_token_files("builtin", None, "bytes", str(path), 2)
    if capsys is not None:
        capsys.readouterr()
    return files, files.train.replace(".train.bin", ".json")


def tokens_of(files):
    return open_tokens(files.train, files.meta).tolist(), open_tokens(files.test, files.meta).tolist()


@pytest.mark.parametrize("damage", ["zeros", "garbage"])
def test_a_damaged_token_file_of_the_right_size_is_noticed_and_made_again(tmp_path, capsys, damage):
    """Token files used to be trusted by their size: zeros trained silently, ids past the vocabulary crashed
    the run mid-way with an IndexError."""
    files, _ = fresh_builtin(tmp_path, capsys)
    expected = tokens_of(files)
    size = os.path.getsize(files.train)
    if damage == "zeros":
        contents = bytes(size)
    else:
        contents = np.random.default_rng(0).integers(0, 2**16, size // 2, dtype=np.uint16).tobytes()
    with open(files.train, "wb") as f:
        f.write(contents)
    again = prepare_token_files("builtin", None, "bytes", str(tmp_path), 2)
    out = capsys.readouterr().out
    assert f"note: {files.train} does not match its metadata (its content hash differs); tokenizing again" in out
    assert tokens_of(again) == expected


def test_large_token_files_are_checked_by_sample_blocks_and_their_largest_id(tmp_path, capsys, monkeypatch):
    """Above FULL_HASH_BYTES a file is not hashed whole at every start: its size, the hash of fixed sample
    blocks and the largest token id in it are checked instead."""
    monkeypatch.setattr(data, "FULL_HASH_BYTES", 0, raising=False)
    monkeypatch.setattr(data, "SAMPLE_BLOCKS", 4, raising=False)
    monkeypatch.setattr(data, "SAMPLE_BLOCK_BYTES", 1024, raising=False)
    files, _ = fresh_builtin(tmp_path, capsys)
    expected = tokens_of(files)
    with open(files.train, "r+b") as f:  # the first block is always sampled
        f.write(bytes(1024))
    prepare_token_files("builtin", None, "bytes", str(tmp_path), 2)
    assert (f"note: {files.train} does not match its metadata (the content hash of its sample blocks differs); "
            f"tokenizing again") in capsys.readouterr().out

    # A token id past the vocabulary between the sample blocks (at 0, 1/3, 2/3 and the end of the file): the
    # blocks still match, the largest id does not.
    tokens = np.memmap(files.train, dtype=np.uint16, mode="r+")
    tokens[len(tokens) // 5] = 300
    tokens.flush()
    del tokens
    again = prepare_token_files("builtin", None, "bytes", str(tmp_path), 2)
    assert (f"note: {files.train} does not match its metadata (its largest token id is 300, not 256); "
            f"tokenizing again") in capsys.readouterr().out
    assert tokens_of(again) == expected


@pytest.mark.parametrize("damage", ["no splits", "tokens not a number", "wrong dtype", "not an object",
                                    "not JSON", "older format"])
def test_metadata_with_missing_or_invalid_keys_is_made_again(tmp_path, capsys, damage):
    files, meta_path = fresh_builtin(tmp_path, capsys)
    expected = tokens_of(files)
    with open(meta_path) as f:
        meta = json.load(f)
    if damage == "no splits":
        del meta["splits"]
    elif damage == "tokens not a number":
        meta["splits"]["train"]["tokens"] = "many"
    elif damage == "wrong dtype":
        meta["dtype"] = "float64"
    elif damage == "not an object":
        meta = [meta]
    elif damage == "older format":  # format 1: what LightGPT wrote before content hashes
        meta = {k: v for k, v in meta.items() if k != "skipped_documents"}
        meta["format"] = 1
        meta["splits"] = {s: {"tokens": c["tokens"], "documents": c["documents"]} for s, c in meta["splits"].items()}
    with open(meta_path, "w") as f:
        f.write("{not json" if damage == "not JSON" else json.dumps(meta))
    again = prepare_token_files("builtin", None, "bytes", str(tmp_path), 2)
    out = capsys.readouterr().out
    note = next((line for line in out.splitlines() if line.startswith("note: ")), "")
    assert note.startswith(f"note: {meta_path} ") and note.endswith("; tokenizing again"), out
    if damage == "older format":
        assert "token file format 1" in note, note
    assert again.meta["format"] == data.TOKEN_FILE_FORMAT and tokens_of(again) == expected


@pytest.mark.slow
def test_pretraining_on_a_garbled_token_file_tokenizes_again_instead_of_crashing(tmp_path, capsys):
    """The run that found ids past the vocabulary died mid-way with a traceback (IndexError in the embedding)."""
    from conftest import tiny_pretrain_args

    import pretrain

    files, _ = fresh_builtin(tmp_path / "tokens", capsys)
    tokens = np.memmap(files.train, dtype=np.uint16, mode="r+")
    tokens[:] = np.random.default_rng(0).integers(257, 2**16, len(tokens), dtype=np.uint16)
    tokens.flush()
    del tokens
    history = pretrain.main(pretrain.parse_args(tiny_pretrain_args(str(tmp_path / "tokens"), str(tmp_path))))
    assert history and "tokenizing again" in capsys.readouterr().out


# ----------------------------------------------------------------------------- temporary files and the lock


def test_stale_temporary_files_of_the_token_files_are_removed(tmp_path, capsys):
    """kill -9 while tokenizing left <token file>.<random>.tmp files of 47-97 MB behind, run after run."""
    files, meta_path = fresh_builtin(tmp_path, capsys)
    stale = [files.train + ".k2j4x8qz.tmp", files.test + ".p0a9w1ee.tmp", meta_path + ".zz81mn3c.tmp"]
    for path in stale:
        with open(path, "wb") as f:
            f.write(bytes(1000))
    others = [str(tmp_path / "download.tmp"), str(tmp_path / "other-corpus.train.bin.abcdefgh.tmp")]
    for path in others:  # not ours, or another corpus's: left alone
        open(path, "w").close()
    prepare_token_files("builtin", None, "bytes", str(tmp_path), 2)
    out = capsys.readouterr().out
    assert f"removed 3 stale temporary files (0.0 MB) that an interrupted run left in {tmp_path}" in out
    assert not any(os.path.exists(path) for path in stale)
    assert all(os.path.exists(path) for path in others)


def test_a_second_preparation_waits_for_the_run_that_holds_the_lock(tmp_path, monkeypatch):
    """A run tokenizing the same corpus into the same folder holds the lock; its temporary file is no orphan."""
    import fcntl
    import threading
    import time

    heard = []
    monkeypatch.setattr(data, "print0", lambda *args, **kwargs: heard.append(" ".join(map(str, args))))
    files, _ = fresh_builtin(tmp_path)
    lock_path = files.train.replace(".train.bin", ".lock")
    live = files.train + ".live1234.tmp"
    open(live, "w").close()
    holder = open(lock_path, "w")
    fcntl.flock(holder, fcntl.LOCK_EX)  # as the other run does while it writes
    outcome = []
    waiter = threading.Thread(
        target=lambda: outcome.append(prepare_token_files("builtin", None, "bytes", str(tmp_path), 2)))
    waiter.start()
    try:
        deadline = time.monotonic() + 30
        while waiter.is_alive() and not any(line.startswith("waiting for") for line in heard):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert waiter.is_alive(), f"it did not wait for the lock: {heard}"
        assert f"waiting for another run preparing these token files to finish (it holds {lock_path})" in heard
        time.sleep(0.2)
        assert os.path.exists(live)  # a temporary file under a held lock is being written, not stale
    finally:
        holder.close()  # the other run ends (even kill -9 releases an flock)
        waiter.join(30)
    assert outcome and outcome[0].train == files.train
    assert not os.path.exists(live)  # now nobody holds the lock: it was stale


@pytest.mark.slow
def test_temporary_files_of_a_run_killed_while_tokenizing_are_removed_by_the_next(tmp_path, capsys):
    import subprocess
    import sys
    import time

    from conftest import ROOT

    script = (
        "import sys, time\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import data\n"
        "data.DOCUMENTS_PER_TASK = 1\n"
        "def stall(documents):\n"
        "    yield documents\n"
        "    time.sleep(600)\n"
        "data._batched = stall\n"
        f"data.prepare_token_files('builtin', None, 'bytes', {str(tmp_path)!r}, 1)\n"
    )
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while sum(os.path.getsize(tmp_path / n) for n in os.listdir(tmp_path) if n.endswith(".tmp")) < 100_000:
            assert run.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        run.kill()  # SIGKILL: no clean-up runs
        run.wait()
    left = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert len(left) == 2
    files = prepare_token_files("builtin", None, "bytes", str(tmp_path), 2)
    assert "removed 2 stale temporary files" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == sorted(
        os.path.basename(p) for p in (files.train, files.test, files.train.replace(".train.bin", ".json")))


# ----------------------------------------------------------------------------- a full or read-only disk


def _leftovers(path):
    return sorted(os.listdir(path))


class FullDiskFile(io.FileIO):
    """A file on a disk with no space left: every write fails as the kernel's would."""

    def write(self, b):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("which", ["token file", "metadata"])
def test_a_full_disk_is_one_line_and_leaves_no_files(tmp_path, monkeypatch, which):
    import builtins

    def full_open(path, mode="r", *args, **kwargs):
        if str(path).endswith(".tmp") and "w" in mode and (mode == "wb") == (which == "token file"):
            raw = FullDiskFile(path, "w")
            return raw if "b" in mode else io.TextIOWrapper(raw)
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(data, "open", full_open, raising=False)  # data.py's own open(); numpy and the rest unaffected
    folder = tmp_path / "tokens"
    with pytest.raises(UserError) as e:
        prepare_token_files("builtin", None, "bytes", str(folder), 2)
    assert str(e.value) == f"--dataset_path {folder}: cannot write the token files (no space left on device)"
    assert _leftovers(folder) == []


@pytest.fixture
def mount():
    """mount(args..., target): a mount that lasts for the test (root only; skips where mounting is impossible)."""
    import shutil
    import subprocess

    mounted = []

    def do(*args):
        if os.geteuid() != 0 or not shutil.which("mount"):
            pytest.skip("mounting needs root and mount(8)")
        result = subprocess.run(["mount", *args], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount here: {result.stderr.strip()}")
        mounted.append(args[-1])

    yield do
    for target in reversed(mounted):
        subprocess.run(["umount", target], check=True)


def test_a_small_tmpfs_fills_up_with_one_line_and_no_files_left(tmp_path, mount):
    folder = tmp_path / "small"
    folder.mkdir()
    mount("-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder))  # the builtin corpus needs about 1 MB
    with pytest.raises(UserError) as e:
        prepare_token_files("builtin", None, "bytes", str(folder), 2)
    assert str(e.value) == f"--dataset_path {folder}: cannot write the token files (no space left on device)"
    assert _leftovers(folder) == []


def test_a_read_only_dataset_path_is_one_line_but_its_token_files_still_serve(tmp_path, mount, capsys):
    empty, made = tmp_path / "empty", tmp_path / "made"
    empty.mkdir()
    fresh_builtin(made, capsys)
    for folder in (empty, made):
        mount("--bind", "-o", "ro", str(folder), str(folder))
    with pytest.raises(UserError) as e:
        prepare_token_files("builtin", None, "bytes", str(empty), 2)
    assert str(e.value) == f"--dataset_path {empty}: cannot write the token files (read-only file system)"
    assert _leftovers(empty) == []
    files = prepare_token_files("builtin", None, "bytes", str(made), 2)  # reading needs no write access
    assert "reusing token files" in capsys.readouterr().out and files.meta["splits"]["train"]["tokens"] > 0


def test_a_dataset_path_without_write_permission_is_one_line(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        try:
            open(folder / "probe", "w").close()
        except PermissionError:
            pass
        else:
            pytest.skip("permission bits do not bind here (root; the read-only mount test covers it)")
        with pytest.raises(UserError) as e:
            prepare_token_files("builtin", None, "bytes", str(folder), 2)
    finally:
        folder.chmod(0o755)
    assert str(e.value) == (f"--dataset_path {folder}: cannot write the token files "
                            f"(permission denied: read-only for this user)")
    assert _leftovers(folder) == []


def test_a_dataset_path_that_is_a_file_is_one_line(tmp_path, capsys):
    from conftest import fails_with_one_line, tiny_pretrain_args

    import pretrain

    path = tmp_path / "datasets"
    path.write_text("not a folder")
    fails_with_one_line(capsys, pretrain, tiny_pretrain_args(str(path), str(tmp_path / "run")),
                        f"--dataset_path {path} is not a folder")
    fails_with_one_line(capsys, pretrain, tiny_pretrain_args(str(path / "below"), str(tmp_path / "run")),
                        f"--dataset_path {path / 'below'} is not a folder")
    assert path.read_text() == "not a folder"


# ----------------------------------------------------------------------------- rows that are not text


def test_rows_whose_text_is_null_or_a_number_are_skipped_and_counted(tmp_path, capsys):
    rows = [{"text": d} for d in DOCS]
    rows[3]["text"], rows[7]["text"], rows[15]["text"] = None, 12345, None
    files = prepare_token_files(write_jsonl(tmp_path / "corpus.jsonl", rows), None, "bytes", str(tmp_path / "t"), 1)
    out = capsys.readouterr().out
    assert "; skipped 3 rows whose text is null or not a string" in out.splitlines()[-1]
    kept = [d if i not in (3, 7, 15) else None for i, d in enumerate(DOCS)]
    enc = load_encoding("bytes")
    train, test = [], []
    for i, d in enumerate(kept):  # a skipped row keeps its place in the split order
        if d is not None:
            (test if i % 10 == 0 else train).extend(enc.encode_ordinary(d) + [256])
    assert tokens_of(files) == (train, test)
    assert files.meta["skipped_documents"] == 3 and files.meta["splits"]["train"]["documents"] == 19


@pytest.mark.parametrize("text", ["", None, 7], ids=["empty", "null", "number"])
def test_a_corpus_with_no_text_at_all_is_one_clear_line(tmp_path, text):
    source = write_jsonl(tmp_path / "corpus.jsonl", [{"text": text}] * 30)
    with pytest.raises(UserError) as e:
        prepare_token_files(source, None, "bytes", str(tmp_path / "t"), 1)
    assert str(e.value) == (f"--dataset {source}: no document holds any text (all 30 are empty, null or not "
                            f"strings)")
    assert _leftovers(tmp_path / "t") == []
