"""Corpora, tokenizers, token files and batches.

- Corpora: HuggingFace FineWeb (default) or any hub dataset with a `text` column, local .txt /
  .jsonl / .json / .parquet files (read through `datasets`' own builders), or `builtin`: the English
  documentation every CPython carries in `pydoc_data`, so a first run needs no download.
- Tokenizers: tiktoken encodings by name, a local .tiktoken file, or `bytes` (256 bytes + end-of-text).
- Token files: every document tokenized with end-of-text appended, split by documents into train and
  test, written as flat uint16 (when every id fits) or uint32 arrays with a JSON metadata file that
  holds each file's content hash and largest token id. Written atomically under a lock; a second run
  checks them against their metadata and reuses them, or makes them again.
- Batches: windows of tokens_per_sample + 1 tokens drawn from the token file by a seeded sampler
  whose state goes into checkpoints; evaluation uses a fixed set of non-overlapping windows.

`datasets` is imported only where a corpus needs it, so the rest runs where it is not installed.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import signal
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import tiktoken
import torch

from common import Stopped, UserError, first_line, print0
from files import FileLock, atomic_path, remove_stale_temporaries
from hub import HUB_TIMEOUT, hub_endpoint, hub_offline, hub_reachable

FINEWEB = "HuggingFaceFW/fineweb"
FINEWEB_SUBSETS = ("sample-10BT", "sample-100BT", "sample-350BT", "all")  # the first is the default
NAMED_ENCODINGS = ("r50k_base", "p50k_base", "cl100k_base", "o200k_base")
VOCABULARY_SIZES = {"r50k_base": 50_257, "p50k_base": 50_281, "cl100k_base": 100_277, "o200k_base": 200_019,
                    "bytes": 257}  # each encoding's tokens, end-of-text included (tests check them against tiktoken)
ENDOFTEXT = "<|endoftext|>"
LOCAL_EXTENSIONS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TOKEN_FILE_FORMAT = 2  # 2: each split's content hash, sample-block hash and largest id; skipped rows
FULL_HASH_BYTES = 1 << 30  # token files up to this size are hashed whole at every reuse (about 1 s per GiB)
SAMPLE_BLOCKS, SAMPLE_BLOCK_BYTES = 64, 1 << 20  # larger ones: these fixed blocks, and a scan for the largest id
DOCUMENTS_PER_BATCH = 1024  # documents read from a corpus at a time
DOCUMENTS_PER_TASK = 64  # documents one tokenizer thread takes at a time

# ----------------------------------------------------------------------------- tokenizers


def byte_encoding() -> tiktoken.Encoding:
    """A byte-level tiktoken encoding: ids 0-255 are the bytes, 256 is end-of-text. No download."""
    return tiktoken.Encoding(
        name="bytes",
        pat_str=r"\S+|\s+",  # any split works: with no merges every piece becomes its bytes
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={ENDOFTEXT: 256},
    )


def _file_slug(path: str, contents: bytes) -> str:
    """tiktoken-<file stem>-<content hash>: a local encoding's name and the name of its token files."""
    return f"tiktoken-{_safe(os.path.splitext(os.path.basename(path))[0])}-{hashlib.sha256(contents).hexdigest()[:10]}"


def _file_encoding(path: str) -> tiktoken.Encoding:
    """A local .tiktoken file ("<base64 token> <rank>" per line), read and parsed here: tiktoken's own
    loader caches a file under a hash of its path, so a file edited in place kept its old vocabulary."""
    try:
        with open(path, "rb") as f:
            contents = f.read()
    except OSError as e:
        raise UserError(f"--token_encoding: cannot read {path} ({e.strerror})") from None
    ranks = {}
    for number, line in enumerate(contents.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:  # a wrong field count, bad base64 (binascii.Error) or a rank that is no integer
            raise UserError(f"--token_encoding: line {number} of {path} is not '<base64 token> <rank>'") from None
    if not ranks:
        raise UserError(f"--token_encoding: {path} holds no tokens")
    from tiktoken_ext.openai_public import r50k_pat_str

    return tiktoken.Encoding(
        name=_file_slug(path, contents),
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: max(ranks.values()) + 1},
    )


def load_encoding(spec: str) -> tiktoken.Encoding:
    """The tokenizer named by --token_encoding, or one clear error saying why it cannot be had."""
    if spec == "bytes":
        return byte_encoding()
    if spec in NAMED_ENCODINGS:
        try:
            return tiktoken.get_encoding(spec)
        except Exception as e:
            raise UserError(
                f"cannot load the tiktoken encoding {spec!r} ({type(e).__name__}: it is downloaded on first "
                f"use and the download failed); pass a local .tiktoken file, point TIKTOKEN_CACHE_DIR at a "
                f"cache that holds it, or use --token_encoding bytes"
            ) from None
    if spec.endswith(".tiktoken") or os.path.sep in spec:
        if not os.path.isfile(spec):
            raise UserError(f"--token_encoding: no .tiktoken file at {spec}")
        return _file_encoding(spec)
    raise UserError(
        f"--token_encoding {spec!r} is unknown; use one of {', '.join(NAMED_ENCODINGS)}, bytes, "
        f"or a path to a .tiktoken file"
    )


def encoding_slug(spec: str) -> str:
    """A file-name-safe name for an encoding; a local file is named by its content hash."""
    if spec in NAMED_ENCODINGS or spec == "bytes":
        return spec
    with open(spec, "rb") as f:
        return _file_slug(spec, f.read())


def eot_id(encoding: tiktoken.Encoding) -> int:
    return encoding.encode_single_token(ENDOFTEXT)


def token_dtype(vocabulary_size: int) -> np.dtype:
    """uint16 only while every id fits in it."""
    return np.dtype(np.uint16) if vocabulary_size <= 2**16 else np.dtype(np.uint32)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "corpus"


# ----------------------------------------------------------------------------- corpora


@dataclass
class Corpus:
    slug: str  # part of the token files' names
    source: str  # for the metadata file
    test_every: int  # every test_every-th document (0, k, 2k, ...) goes to the test split
    load: Callable[[int], tuple[int | None, Iterator[list[str]]]]  # processes -> (documents, text batches)


def builtin_documents() -> list[str]:
    """The CPython documentation topics (pydoc_data), one document per topic, in a fixed order."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise UserError("--dataset builtin needs Python's pydoc_data module, which this Python lacks") from None
    return [topics[key] for key in sorted(topics)]


def _batched(items: list[str]) -> Iterator[list[str]]:
    for i in range(0, len(items), DOCUMENTS_PER_BATCH):
        yield items[i : i + DOCUMENTS_PER_BATCH]


def _hf_batches(dataset, what: str) -> tuple[int, Iterator[list[str]]]:
    if "text" not in dataset.column_names:
        raise UserError(f"{what} has no 'text' column (columns: {', '.join(dataset.column_names)})")
    texts = dataset.select_columns(["text"])
    return len(texts), (batch["text"] for batch in texts.iter(batch_size=DOCUMENTS_PER_BATCH))


@contextlib.contextmanager
def _quiet_hub():
    """huggingface_hub logs every retry of a failing request and both libraries warn on stderr: about ten
    lines before a one-line error. Errors still come through; download progress bars stay."""
    from datasets.utils import logging as datasets_logging
    from huggingface_hub.utils import logging as hub_logging

    levels = datasets_logging.get_verbosity(), hub_logging.get_verbosity()
    datasets_logging.set_verbosity_error()
    hub_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        datasets_logging.set_verbosity(levels[0])
        hub_logging.set_verbosity(levels[1])


_loading = False  # while datasets may fork worker processes (num_proc > 1)


def _quiet_worker() -> None:
    """In a process forked while a corpus loads: the trainer's SIGINT/SIGTERM handlers (StopFlag) came
    along, so the worker datasets ends with SIGTERM when the load fails raised Stopped and printed a
    traceback. Such a worker dies quietly on SIGTERM and leaves Ctrl-C to its parent, which stops the run."""
    if _loading:
        with contextlib.suppress(ValueError):  # not forked from the main thread: nothing was inherited
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_IGN)


os.register_at_fork(after_in_child=_quiet_worker)


@contextlib.contextmanager
def _forking_workers():
    global _loading
    _loading = True
    try:
        yield
    finally:
        _loading = False


_WRAPPERS = ("DatasetGenerationError",)  # datasets' "An error occurred while generating the dataset"


def error_cause(error: BaseException) -> str:
    """The first line of the error that explains `error`, type first. datasets wraps the real one (a JSON
    parse error, a bad Parquet footer) in a DatasetGenerationError that says only "An error occurred while
    generating the dataset", and from a worker process (num_proc > 1) passes it on as the text of a
    RemoteTraceback, whose exception lines ("pyarrow.lib.ArrowInvalid: ...") come innermost first."""
    seen, e = set(), error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__name__ == "RemoteTraceback":
            raised = [m for m in re.finditer(r"^([A-Za-z_][\w.]*)(?:: (.*))?$", str(e), re.MULTILINE)
                      if m.group(1).rsplit(".", 1)[-1] not in _WRAPPERS and m.group(1) != "Traceback"]
            if raised:
                name, message = raised[-1].group(1).rsplit(".", 1)[-1], raised[-1].group(2)
                return first_line(Exception(f"{name}: {message}" if message else name))
        elif type(e).__name__ not in _WRAPPERS:
            return first_line(e, with_type=True)
        e = e.__cause__ or e.__context__
    return first_line(error, with_type=True)


@contextlib.contextmanager
def _datasets_error_log():
    """Collects what datasets logs at ERROR level while it reads files, instead of printing it above the
    one-line error: its line names the file it failed on ("Failed to load JSON from file '...'"), which its
    exception does not. A temporary file rather than a list, because with num_proc > 1 forked workers
    log, through the handler they inherit."""
    import logging
    import tempfile

    logger = logging.getLogger("datasets")
    shown = list(logger.handlers)
    below_error = lambda record: record.levelno < logging.ERROR  # noqa: E731
    lines: list[str] = []
    with tempfile.TemporaryFile("w+") as sink:
        capture = logging.StreamHandler(sink)
        capture.setLevel(logging.ERROR)
        for handler in shown:
            handler.addFilter(below_error)
        logger.addHandler(capture)
        try:
            yield lines
        finally:
            logger.removeHandler(capture)
            for handler in shown:
                handler.removeFilter(below_error)
            sink.flush()
            sink.seek(0)
            lines.extend(sink.read().splitlines())


def hub_what(name: str, subset: str | None) -> str:
    """How messages name a hub dataset: "dataset <name> (<subset>)"."""
    return f"dataset {name}" + (f" ({subset})" if subset else "")


def load_hub_dataset(name: str, subset: str | None, processes: int, split: str | None = "train",
                     streaming: bool = False):
    """A HuggingFace hub dataset's split (all its splits, a DatasetDict, when split is None; an
    IterableDataset read as it goes with streaming), or one clear error: the hub unreachable, offline
    without a cached copy, or a download that failed."""
    try:
        import datasets
    except ImportError:
        raise UserError("loading a HuggingFace dataset needs the `datasets` package: pip install datasets") from None
    what = hub_what(name, subset)
    ways_out = "or use --dataset builtin or a local file"
    offline = hub_offline()
    if offline is None:  # fail in seconds, not after half a minute of retries
        endpoint = hub_endpoint()
        if not hub_reachable(endpoint, HUB_TIMEOUT):
            raise UserError(f"cannot reach the HuggingFace hub at {endpoint} to download {what}; check the "
                            f"network (or HF_ENDPOINT), set HF_HUB_OFFLINE=1 to use a copy in the HuggingFace cache, "
                            f"{ways_out}")
    try:
        with _quiet_hub(), _forking_workers():
            workers = {"streaming": True} if streaming else {"num_proc": processes}
            dataset = datasets.load_dataset(name, name=subset, split=split, **workers)
    except Exception as e:
        if offline and isinstance(e, ConnectionError):  # what datasets raises offline for a dataset not cached
            raise UserError(f"{what} is not in the HuggingFace cache and {offline} is set, so it is not "
                            f"downloaded; unset {offline} to download it, {ways_out}") from None
        raise UserError(
            f"could not load {what} from the HuggingFace hub ({error_cause(e)}); check the name "
            f"and your network, {ways_out}"
        ) from None
    return dataset


def _load_hub(name: str, subset: str | None, processes: int):
    return _hf_batches(load_hub_dataset(name, subset, processes), hub_what(name, subset))


def local_what(files: list[str]) -> str:
    """How messages name local corpus files: the file, or how many there are."""
    return files[0] if len(files) == 1 else f"the {len(files)} files"


def load_local_dataset(files: list[str], builder: str, processes: int):
    """Local files read by one of datasets' builders (json, parquet, text) as one dataset, or one clear
    error naming the file that could not be read."""
    try:
        import datasets
    except ImportError:
        raise UserError("reading local corpora needs the `datasets` package: pip install datasets") from None
    # A .txt corpus is split into documents at blank lines, so one file can still be split by document.
    options = {"sample_by": "paragraph"} if builder == "text" else {}
    failure = None
    with _datasets_error_log() as logged, _forking_workers():
        try:
            # datasets splits work by file: more processes than files only earns a warning on stderr
            workers = min(processes, len(files))
            dataset = datasets.load_dataset(builder, data_files=files, split="train",
                                            num_proc=workers if workers > 1 else None, **options)
        except Exception as e:
            failure = e
    if failure is not None:  # name the file datasets failed on, where it logged one
        named = [f for f in files if any(f"'{os.path.abspath(f)}'" in line or f"'{os.path.realpath(f)}'" in line
                                         for line in logged)]
        where = named[0] if named else files[0] + (" and others" if len(files) > 1 else "")
        raise UserError(f"could not read {where} ({error_cause(failure)})") from None
    return dataset


def _load_local(files: list[str], builder: str, processes: int):
    return _hf_batches(load_local_dataset(files, builder, processes), local_what(files))


def local_files(pattern: str) -> list[str] | None:
    """The corpus files a local --dataset names (a file, a folder or a glob), or None if it is no path."""
    if os.path.isdir(pattern):
        files = [
            os.path.join(root, f)
            for root, _, names in os.walk(pattern)
            for f in names
            if os.path.splitext(f)[1].lower() in LOCAL_EXTENSIONS
        ]
        if not files:
            raise UserError(f"--dataset: folder {pattern} holds no {'/'.join(LOCAL_EXTENSIONS)} files")
        return sorted(files)
    if os.path.isfile(pattern):
        return [pattern]
    if glob.has_magic(pattern):
        files = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
        if not files:
            raise UserError(f"--dataset: no files match {pattern}")
        return files
    if pattern.startswith((".", "/", "~")) or os.path.splitext(pattern)[1].lower() in LOCAL_EXTENSIONS:
        raise UserError(f"--dataset: no such file or folder: {pattern}")
    return None


def corpus_subset(dataset: str | None, subset: str | None) -> str | None:
    """The subset a run reads: FineWeb's default one, none for the builtin corpus or local files (they
    have no subsets), a hub dataset's as given."""
    if dataset == FINEWEB:
        return subset or FINEWEB_SUBSETS[0]
    if dataset == "builtin" or (dataset and (os.path.exists(dataset) or glob.has_magic(dataset))):
        return None
    return subset


def resolve_corpus(dataset: str, subset: str | None) -> Corpus:
    """What --dataset (and --dataset_subset) name: builtin, local files, or a HuggingFace hub dataset."""
    if dataset == "builtin":
        docs = builtin_documents
        return Corpus("builtin", "builtin: CPython pydoc_data topics", 10, lambda p: (len(docs()), _batched(docs())))

    files = local_files(dataset)
    if files is not None:
        kinds = {LOCAL_EXTENSIONS.get(os.path.splitext(f)[1].lower()) for f in files}
        if None in kinds:
            bad = next(f for f in files if os.path.splitext(f)[1].lower() not in LOCAL_EXTENSIONS)
            raise UserError(f"--dataset: {bad} is not a {'/'.join(LOCAL_EXTENSIONS)} file")
        if len(kinds) > 1:
            raise UserError(f"--dataset: {dataset} mixes file types ({', '.join(sorted(kinds))}); use one kind")
        builder = kinds.pop()
        fingerprint = hashlib.sha256()
        for f in files:  # a changed file gives new token files instead of stale ones
            st = os.stat(f)
            fingerprint.update(f"{os.path.abspath(f)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        stem = _safe(os.path.splitext(os.path.basename(dataset.rstrip("/*")))[0])
        return Corpus(
            f"local-{stem}-{fingerprint.hexdigest()[:10]}",
            f"local {builder}: {dataset} ({len(files)} file{'s' if len(files) > 1 else ''})",
            10,
            lambda p: _load_local(files, builder, p),
        )

    if dataset == FINEWEB and subset not in FINEWEB_SUBSETS:
        raise UserError(f"--dataset_subset {subset!r} is not a FineWeb subset; use one of {', '.join(FINEWEB_SUBSETS)}")
    config = None if subset in (None, "all") and dataset != FINEWEB else subset
    if dataset == FINEWEB and subset == "all":
        config = "default"
    slug = _safe(dataset.split("/")[-1]) + (f"-{_safe(subset)}" if subset else "")
    source = f"hub: {dataset}" + (f" ({subset})" if subset else "")
    return Corpus(slug, source, 200, lambda p: _load_hub(dataset, config, p))


# ----------------------------------------------------------------------------- token files


@dataclass
class TokenFiles:
    train: str
    test: str
    meta: dict


def token_file_paths(dataset_path: str, corpus: Corpus, encoding_spec: str) -> tuple[str, str, str]:
    stem = os.path.join(dataset_path, f"{corpus.slug}-{encoding_slug(encoding_spec)}")
    return f"{stem}.train.bin", f"{stem}.test.bin", f"{stem}.json"


def _tokenize_batch(encoding, eot: int, dtype, first_index: int, test_every: int, texts: list):
    """Tokenize one batch of documents and return the train and test token arrays, their document counts
    and the number of rows skipped because their text is null or not a string (a row keeps its place in
    the split order either way). Runs in worker threads: tiktoken releases the GIL while it encodes, and
    encode_to_numpy hands back its buffer without building Python ints. Special-token text in a document
    is encoded as ordinary text (disallowed_special=()), as encode_ordinary does."""
    end = np.array([eot], dtype=np.uint32)
    train, test, skipped = [], [], 0
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            skipped += 1
            continue
        ids = encoding.encode_to_numpy(text, disallowed_special=())
        (test if (first_index + i) % test_every == 0 else train).extend((ids, end))
    join = lambda parts: np.concatenate(parts).astype(dtype, copy=False) if parts else np.empty(0, dtype)
    return join(train), join(test), len(train) // 2, len(test) // 2, skipped


def write_token_files(
    batches: Iterator[list[str]],
    encoding: tiktoken.Encoding,
    train_path: str,
    test_path: str,
    test_every: int,
    num_threads: int,
    total_documents: int | None = None,
) -> dict:
    """Tokenize every document with end-of-text appended and write the two splits, atomically. Returns
    each split's token and document counts, the SHA-256 of its bytes (hashed as they are written) and its
    largest token id, and the number of rows skipped as not text."""
    from tqdm import tqdm

    dtype = token_dtype(encoding.n_vocab)
    eot = eot_id(encoding)
    counts = {split: {"tokens": 0, "documents": 0, "max_id": 0} for split in ("train", "test")}
    digests = {split: hashlib.sha256() for split in counts}
    skipped = 0
    with (
        atomic_path(train_path) as train_tmp,
        atomic_path(test_path) as test_tmp,
        open(train_tmp, "wb") as train_out,
        open(test_tmp, "wb") as test_out,
        ThreadPoolExecutor(max_workers=num_threads) as pool,
        tqdm(total=total_documents, unit="doc", desc="tokenizing", disable=None) as progress,
    ):
        pending, first = [], 0
        def drain(limit):
            nonlocal skipped
            while len(pending) > limit:
                train, test, n_train, n_test, n_skipped = pending.pop(0).result()
                for split, tokens, documents, out in (("train", train, n_train, train_out),
                                                      ("test", test, n_test, test_out)):
                    if len(tokens):
                        digests[split].update(tokens)  # hashlib releases the GIL: the tokenizers keep going
                        out.write(memoryview(tokens).cast("B"))
                        counts[split]["max_id"] = max(counts[split]["max_id"], int(tokens.max()))
                    counts[split]["tokens"] += len(tokens)
                    counts[split]["documents"] += documents
                skipped += n_skipped
                progress.update(n_train + n_test + n_skipped)

        for batch in batches:
            for i in range(0, len(batch), DOCUMENTS_PER_TASK):  # small tasks keep every thread busy
                texts = batch[i : i + DOCUMENTS_PER_TASK]
                pending.append(pool.submit(_tokenize_batch, encoding, eot, dtype, first, test_every, texts))
                first += len(texts)
                drain(4 * num_threads)  # bounded look-ahead keeps memory flat and the order fixed
        drain(0)
    for split in counts:
        counts[split]["sha256"] = digests[split].hexdigest()
    return {**counts, "skipped": skipped}


# Checking token files. A file no larger than FULL_HASH_BYTES is hashed whole (SHA-256 runs at about
# 1 GB/s on one core); a larger one is checked by its size, the hash of SAMPLE_BLOCKS fixed blocks spread
# over it, and its largest token id (a numpy scan at disk speed), so a restart costs seconds, not minutes.


def _file_digest(path: str, blocks: list[tuple[int, int]] | None = None) -> str:
    """SHA-256 of a file, or of the (offset, length) blocks of it, read in 8 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for offset, length in blocks or [(0, os.path.getsize(path))]:
            f.seek(offset)
            while length > 0:
                piece = f.read(min(length, 8 << 20))
                if not piece:
                    break
                digest.update(piece)
                length -= len(piece)
    return digest.hexdigest()


def _sample_blocks(size: int) -> list[tuple[int, int]]:
    """The fixed (offset, length) blocks hashed of a file of `size` bytes: SAMPLE_BLOCKS blocks spread
    evenly from its first byte to its last, or the whole file when it is no larger than they are."""
    if size <= SAMPLE_BLOCKS * SAMPLE_BLOCK_BYTES:
        return [(0, size)]
    return [(i * (size - SAMPLE_BLOCK_BYTES) // (SAMPLE_BLOCKS - 1), SAMPLE_BLOCK_BYTES) for i in range(SAMPLE_BLOCKS)]


def _largest_id(path: str, dtype: np.dtype) -> int:
    tokens = np.memmap(path, dtype=dtype, mode="r")
    step = 1 << 26
    return max((int(tokens[i : i + step].max()) for i in range(0, len(tokens), step)), default=0)


def _mismatch(path: str, split: dict, dtype: np.dtype) -> str | None:
    """Why a token file does not hold what its metadata says it does, or None when it does."""
    try:
        size = os.path.getsize(path)
        if size != split["tokens"] * dtype.itemsize:
            return f"it holds {size:,} bytes, not {split['tokens'] * dtype.itemsize:,}"
        if size <= FULL_HASH_BYTES:
            return None if _file_digest(path) == split["sha256"] else "its content hash differs"
        if _file_digest(path, _sample_blocks(size)) != split["sample_sha256"]:
            return "the content hash of its sample blocks differs"
        largest = _largest_id(path, dtype)
        return None if largest == split["max_id"] else f"its largest token id is {largest}, not {split['max_id']}"
    except FileNotFoundError:
        return "it is missing"
    except OSError as e:
        return f"it cannot be read: {first_line(e)}"


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _meta_problem(meta, encoding: tiktoken.Encoding) -> str | None:
    """What makes token-file metadata unusable with this encoding ("<meta file> ..."), or None. Missing or
    mangled keys make the files count as absent, never a KeyError."""
    if not isinstance(meta, dict):
        return "is damaged (not a JSON object)"
    if meta.get("format") != TOKEN_FILE_FORMAT:
        return (f"was written in token file format {meta.get('format')!r} (this LightGPT writes format "
                f"{TOKEN_FILE_FORMAT}, with content hashes)")
    expected = {"vocabulary_size": encoding.n_vocab, "eot_id": eot_id(encoding),
                "dtype": token_dtype(encoding.n_vocab).name}
    for key, value in expected.items():
        if meta.get(key) != value:
            return f"is damaged ({key} is {meta.get(key)!r}, not {value!r})"
    if not isinstance(meta.get("source"), str) or not _count(meta.get("skipped_documents")):
        return "is damaged (no source or skipped_documents)"
    splits = meta.get("splits")
    for name in ("train", "test"):
        split = splits.get(name) if isinstance(splits, dict) else None
        if not (isinstance(split, dict) and all(_count(split.get(k)) for k in ("tokens", "documents", "max_id"))
                and split["max_id"] < encoding.n_vocab
                and all(isinstance(split.get(k), str) and len(split[k]) == 64 for k in ("sha256", "sample_sha256"))):
            return f"is damaged (no valid '{name}' split)"
    return None


def read_meta(meta_path: str) -> dict | None:
    """Token files' metadata as written, or None when there is none."""
    try:
        with open(meta_path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _check_token_files(paths: tuple[str, str, str], encoding: tiktoken.Encoding) -> tuple[dict | None, str | None]:
    """(the metadata, None) when the token files hold what it says; otherwise (None, why not), the reason
    None when there is no metadata at all (a first run, or an interrupted one)."""
    train_path, test_path, meta_path = paths
    try:
        meta = read_meta(meta_path)
    except (OSError, ValueError) as e:  # ValueError: JSON or UTF-8 that does not decode
        return None, f"{meta_path} is damaged ({'not valid JSON' if isinstance(e, ValueError) else first_line(e)})"
    if meta is None:
        return None, None
    problem = _meta_problem(meta, encoding)
    if problem:
        return None, f"{meta_path} {problem}"
    dtype = np.dtype(meta["dtype"])
    for name, path in (("train", train_path), ("test", test_path)):
        mismatch = _mismatch(path, meta["splits"][name], dtype)
        if mismatch:
            return None, f"{path} does not match its metadata ({mismatch})"
    return meta, None


# ----------------------------------------------------------------------------- preparing token files


class PreparationLock(FileLock):
    """The FileLock of prepared files (token files, chat data): shared while a run checks them, exclusive
    while one writes them, so a second run preparing the same files waits for the first (saying so, once)
    and then reuses its work. In a folder where no lock file can be made (a read-only one) prepared files
    can still be read, unlocked; writing them fails there anyway."""

    def __init__(self, path: str):
        super().__init__(path)
        self.told = False

    def claim(self, exclusive: bool, paths: tuple[str, ...], dataset_path: str) -> None:
        """Take the lock; then remove the temporary files (atomic_path's) of `paths` that a killed run left,
        which no other run can be writing while we hold it."""

        def wait(holder: str) -> None:
            if not self.told:
                print0(f"waiting for another run preparing these token files to finish (it holds {self.path})")
                self.told = True

        try:
            if not self.acquire(exclusive, when_held=wait):
                return
        except OSError:
            return
        removed = freed = 0
        for path in paths:
            count, size = remove_stale_temporaries(path, self.since)
            removed, freed = removed + count, freed + size
        if removed:
            print0(f"removed {removed} stale temporary file{'s' if removed > 1 else ''} ({freed / 1e6:.1f} MB) "
                   f"that an interrupted run left in {dataset_path}")


_WRITE_ERRORS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied: read-only for this user",
    errno.EPERM: "permission denied: read-only for this user",
}


def _write_error(dataset_path: str, error: OSError) -> UserError:
    if error.errno == errno.ENOTDIR:
        return UserError(f"--dataset_path {dataset_path} is not a folder (a file stands in its path)")
    cause = _WRITE_ERRORS.get(error.errno) or first_line(error)
    return UserError(f"--dataset_path {dataset_path}: cannot write the token files ({cause})")


def _ensure_folder(dataset_path: str) -> None:
    if os.path.exists(dataset_path) and not os.path.isdir(dataset_path):
        raise UserError(f"--dataset_path {dataset_path} is not a folder (it is a file)")
    try:
        os.makedirs(dataset_path, exist_ok=True)
    except OSError as e:
        raise _write_error(dataset_path, e) from None


def _read_batches(batches: Iterator[list], source: str) -> Iterator[list]:
    """The corpus's batches; an error while reading them names the corpus and its cause, so that it is not
    taken for an error writing the token files."""
    iterator = iter(batches)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"could not read {source} ({error_cause(e)})") from None
        yield batch


def prepare_token_files(
    dataset: str, subset: str | None, encoding_spec: str, dataset_path: str, num_processes: int
) -> TokenFiles:
    """Make (or reuse) the train and test token files of a corpus under an encoding. Files that do not hold
    what their metadata says (or whose metadata is damaged or older) are made again, with a note."""
    corpus = resolve_corpus(dataset, subset)
    encoding = load_encoding(encoding_spec)
    _ensure_folder(dataset_path)
    paths = token_file_paths(dataset_path, corpus, encoding_spec)
    train_path, test_path, meta_path = paths
    lock = PreparationLock(os.path.splitext(meta_path)[0] + ".lock")
    try:
        for exclusive in (False, True):  # checked again once exclusive: another run may have made them meanwhile
            lock.claim(exclusive, paths, dataset_path)
            meta, why = _check_token_files(paths, encoding)
            if meta is not None:
                print0(f"reusing token files {train_path} and {test_path}")
                return TokenFiles(train_path, test_path, meta)
        if why:
            print0(f"note: {why}; tokenizing again")
        print0(f"preparing {corpus.source} with {encoding_spec} into {dataset_path}")
        meta = _make_token_files(corpus, encoding, paths, dataset, subset, encoding_spec, dataset_path, num_processes)
    finally:
        lock.release()
    return TokenFiles(train_path, test_path, meta)


def _make_token_files(corpus: Corpus, encoding: tiktoken.Encoding, paths: tuple[str, str, str], dataset: str,
                      subset: str | None, encoding_spec: str, dataset_path: str, num_processes: int) -> dict:
    """Tokenize the corpus into the token files and write their metadata last. On any failure none of the
    three is left behind: token files without metadata are of no use, and a full disk wants its space."""
    train_path, test_path, meta_path = paths
    try:
        for path in paths:  # the metadata first: it must never vouch for files being replaced
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        total, batches = corpus.load(num_processes)
        counts = write_token_files(_read_batches(batches, corpus.source), encoding, train_path, test_path,
                                   corpus.test_every, num_processes, total)
        documents = counts["train"]["documents"] + counts["test"]["documents"]
        if counts["train"]["tokens"] + counts["test"]["tokens"] == documents:  # end-of-text tokens only
            rows = documents + counts["skipped"]
            raise UserError(f"--dataset {dataset}: no document holds any text (all {rows:,} are empty, null or "
                            f"not strings)" if rows else f"--dataset {dataset} holds no documents")
        for split in ("train", "test"):
            if counts[split]["documents"] == 0:
                raise UserError(f"--dataset {dataset}: the corpus has too few documents to fill a {split} split")
        for split, path in (("train", train_path), ("test", test_path)):
            counts[split]["sample_sha256"] = _file_digest(path, _sample_blocks(os.path.getsize(path)))
        meta = {
            "format": TOKEN_FILE_FORMAT,
            "source": corpus.source,
            "dataset": dataset,
            "dataset_subset": subset,
            "token_encoding": encoding_spec,
            "vocabulary_size": encoding.n_vocab,
            "eot_id": eot_id(encoding),
            "dtype": token_dtype(encoding.n_vocab).name,
            "test_every": corpus.test_every,
            "skipped_documents": counts["skipped"],
            "splits": {split: counts[split] for split in ("train", "test")},
        }
        with atomic_path(meta_path) as tmp, open(tmp, "w") as f:
            json.dump(meta, f, indent=2)
    except BaseException as e:
        for path in (train_path, test_path):
            with contextlib.suppress(OSError):
                os.remove(path)
        if isinstance(e, KeyboardInterrupt):  # Ctrl-C, or a StopFlag's Stopped
            raise Stopped(getattr(e, "signal_number", signal.SIGINT), "while tokenizing; the token files were not "
                          "written") from None
        if isinstance(e, OSError):  # the corpus is read by _read_batches: this is writing
            raise _write_error(dataset_path, e) from None
        raise
    skipped = f"; skipped {counts['skipped']:,} rows whose text is null or not a string" if counts["skipped"] else ""
    print0(
        f"wrote {counts['train']['tokens']:,} train tokens ({counts['train']['documents']:,} documents) and "
        f"{counts['test']['tokens']:,} test tokens ({counts['test']['documents']:,} documents){skipped}"
    )
    return meta


def open_tokens(path: str, meta: dict) -> np.ndarray:
    return np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")


# ----------------------------------------------------------------------------- batches


class WindowSampler:
    """Draws batches of random windows (tokens_per_sample + 1 tokens: inputs and targets shifted by one)
    from a token array with its own seeded generator, so its state can be saved and restored. A length
    curriculum: windows of short_tokens tokens until short_samples samples (global) have been drawn, then
    of tokens_per_sample; a function of the samples drawn, so a resumed run continues it exactly."""

    def __init__(self, tokens: np.ndarray, tokens_per_sample: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, start_token: int | None = None,
                 short_tokens: int = 0, short_samples: int = 0):
        if len(tokens) < tokens_per_sample + 1:
            raise UserError(
                f"--tokens_per_sample {tokens_per_sample}: the train split holds only {len(tokens)} tokens; "
                f"use a shorter sample or a larger corpus"
            )
        self.tokens = tokens
        self.tokens_per_sample = tokens_per_sample
        self.batch_size = batch_size
        self.start_token = start_token  # window_batch's
        self.short_tokens, self.short_samples = short_tokens, short_samples
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.samples_drawn = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's batch: every rank draws the same world_size x batch_size starts from the shared
        generator and keeps its own slice, so the global batch is the same for any world size."""
        T, B = self.window(), self.batch_size
        starts = torch.randint(0, len(self.tokens) - T, (self.world_size * B,), generator=self.generator)
        mine = starts[self.rank * B : (self.rank + 1) * B].tolist()
        self.samples_drawn += self.world_size * B
        return window_batch(self.tokens, mine, T, self.start_token)

    def window(self) -> int:
        """The length of the next batch's windows."""
        short = self.short_tokens and self.samples_drawn < self.short_samples
        return self.short_tokens if short else self.tokens_per_sample

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "samples_drawn": self.samples_drawn}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.samples_drawn = state["samples_drawn"]


class RowSampler:
    """Batches of whole rows of a row source (chat.Packed: len() rows, batch(rows) -> their tensors), one
    seeded permutation of the rows per epoch. An epoch is rows_per_epoch rows (the permutation's
    first ones); every rank draws the same permutation and takes its own slice of each round, so the
    global batch does not depend on the world size. Its state is the generator at the start of the
    current epoch and the rows drawn so far."""

    def __init__(self, rows, batch_size: int, rows_per_epoch: int, seed: int, rank: int = 0, world_size: int = 1):
        self.rows, self.batch_size, self.rows_per_epoch = rows, batch_size, rows_per_epoch
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.samples_drawn = 0
        self._start_epoch()

    def _start_epoch(self) -> None:
        self._epoch_start_state = self.generator.get_state()
        self._order = torch.randperm(len(self.rows), generator=self.generator)

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        B, W = self.batch_size, self.world_size
        into = self.samples_drawn % self.rows_per_epoch
        if self.samples_drawn and into == 0:
            self._start_epoch()
        mine = self._order[into + self.rank * B : into + (self.rank + 1) * B]  # this rank's slice of the round
        self.samples_drawn += W * B
        return self.rows.batch(mine.tolist())

    def state_dict(self) -> dict:
        return {"generator": self._epoch_start_state, "samples_drawn": self.samples_drawn}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.samples_drawn = state["samples_drawn"]
        self._start_epoch()  # the current epoch's permutation again; the next one follows from the generator


class BatchPrefetcher:
    """Keeps the next batch on its way to the device while the current one is computed. Its state is
    the sampler's state before the held batch, so a resumed run draws that batch again."""

    def __init__(self, sampler: WindowSampler, device: torch.device):
        self.sampler = sampler
        self.device = device
        self._fetch()

    def _fetch(self) -> None:
        self._state = self.sampler.state_dict()
        self._batch = to_device(self.sampler.next_batch(), self.device)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self._batch
        self._fetch()
        return batch

    def state_dict(self) -> dict:
        return self._state

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self._fetch()


def eval_windows(tokens: np.ndarray, tokens_per_sample: int, max_samples: int) -> list[int]:
    """Start offsets of up to max_samples non-overlapping windows spread evenly over the test tokens:
    the same windows at every evaluation, so perplexities are comparable."""
    T = tokens_per_sample
    available = (len(tokens) - 1) // T
    if available < 1:
        raise UserError(
            f"--tokens_per_sample {T}: the test split holds only {len(tokens)} tokens; "
            f"use a shorter sample or a larger corpus"
        )
    chosen = np.linspace(0, available - 1, num=min(max_samples, available)).round().astype(np.int64)
    return (np.unique(chosen) * T).tolist()


def window_batch(tokens: np.ndarray, starts: list[int], tokens_per_sample: int,
                 start_token: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (B, T) of the windows at `starts`. With start_token, it replaces each window's
    first input: a fixed token at position 0 that a NoPE model's attention can count from (windows start
    at random offsets, mid-document); the targets are unchanged."""
    T = tokens_per_sample
    windows = torch.from_numpy(np.stack([tokens[s : s + T + 1] for s in starts]).astype(np.int64))
    inputs = windows[:, :-1]
    if start_token is not None:
        inputs = inputs.clone()
        inputs[:, 0] = start_token
    return inputs, windows[:, 1:]


def to_device(batch: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Pinned, non-blocking copies on CUDA so the copy overlaps the work already queued."""
    if device.type == "cuda":  # contiguous first: pinning keeps strides, and a strided copy is not async
        return tuple(t.contiguous().pin_memory().to(device, non_blocking=True) for t in batch)
    return tuple(t.to(device) for t in batch)
