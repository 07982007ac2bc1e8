import base64
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
