"""Corpora, tokenizers, token files and batches.

- Corpora: HuggingFace FineWeb (default) or any hub dataset with a `text` column, local .txt /
  .jsonl / .json / .parquet files (read through `datasets`' own builders), or `builtin`: the English
  documentation every CPython carries in `pydoc_data`, so a first run needs no download.
- Tokenizers: tiktoken encodings by name, a local .tiktoken file, or `bytes` (256 bytes + end-of-text).
- Token files: every document tokenized with end-of-text appended, split by documents into train and
  test, written as flat uint16 (when every id fits) or uint32 arrays with a JSON metadata file.
  Written atomically; a second run reuses them.
- Batches: windows of tokens_per_sample + 1 tokens drawn from the token file by a seeded sampler
  whose state goes into checkpoints; evaluation uses a fixed set of non-overlapping windows.

`datasets` is imported only where a corpus needs it, so the rest runs where it is not installed.
"""

from __future__ import annotations

import base64
import contextlib
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

from common import Stopped, UserError, atomic_path, first_line, print0

FINEWEB = "HuggingFaceFW/fineweb"
FINEWEB_SUBSETS = ("sample-10BT", "sample-100BT", "sample-350BT", "all")
NAMED_ENCODINGS = ("r50k_base", "p50k_base", "cl100k_base", "o200k_base")
ENDOFTEXT = "<|endoftext|>"
LOCAL_EXTENSIONS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TOKEN_FILE_FORMAT = 1
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


HUB_TIMEOUT = 3.0  # seconds the hub gets to answer before a download is given up


def hub_reachable(endpoint: str, timeout: float) -> bool:
    """Whether the hub answers at all (any HTTP status) within `timeout` seconds, through the proxies the
    environment names. In a thread, so a slow name lookup is cut off too."""
    import threading
    import urllib.error
    import urllib.request

    answered = []

    def probe():
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
            answered.append(True)
        except urllib.error.HTTPError:  # an answer, even if not a welcome one
            answered.append(True)
        except (OSError, ValueError):  # no route, refused, timed out, or no URL at all
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


def _hub_offline() -> str | None:
    """The variable that puts HuggingFace in offline mode, if one does (its truthy spellings)."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE"):
            return name
    return None


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


def _load_hub(name: str, subset: str | None, processes: int):
    try:
        import datasets
    except ImportError:
        raise UserError("loading a HuggingFace dataset needs the `datasets` package: pip install datasets") from None
    what = f"dataset {name}" + (f" ({subset})" if subset else "")
    ways_out = "or use --dataset builtin or a local file"
    offline = _hub_offline()
    if offline is None:  # fail in seconds, not after half a minute of retries
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        if not hub_reachable(endpoint, HUB_TIMEOUT):
            raise UserError(f"cannot reach the HuggingFace hub at {endpoint} to download {what}; check the "
                            f"network (or HF_ENDPOINT), set HF_HUB_OFFLINE=1 to use a copy in the HuggingFace cache, "
                            f"{ways_out}")
    try:
        with _quiet_hub():
            dataset = datasets.load_dataset(name, name=subset, split="train", num_proc=processes)
    except Exception as e:
        if offline and isinstance(e, ConnectionError):  # what datasets raises offline for a dataset not cached
            raise UserError(f"{what} is not in the HuggingFace cache and {offline} is set, so it is not "
                            f"downloaded; unset {offline} to download it, {ways_out}") from None
        raise UserError(
            f"could not load {what} from the HuggingFace hub ({first_line(e, with_type=True)}); check the name "
            f"and your network, {ways_out}"
        ) from None
    return _hf_batches(dataset, what)


def _load_local(files: list[str], builder: str, processes: int):
    try:
        import datasets
    except ImportError:
        raise UserError("reading local corpora needs the `datasets` package: pip install datasets") from None
    # A .txt corpus is split into documents at blank lines, so one file can still be split by document.
    options = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        dataset = datasets.load_dataset(builder, data_files=files, split="train", num_proc=processes, **options)
    except Exception as e:
        others = " and others" if len(files) > 1 else ""
        raise UserError(f"could not read {files[0]}{others} ({first_line(e, with_type=True)})") from None
    return _hf_batches(dataset, files[0] if len(files) == 1 else f"the {len(files)} files")


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


def _tokenize_batch(encoding, eot: int, dtype, first_index: int, test_every: int, texts: list[str]):
    """Tokenize one batch of documents and return the train and test token arrays with their document
    counts. Runs in worker threads: tiktoken releases the GIL while it encodes, and encode_to_numpy
    hands back its buffer without building Python ints. Special-token text in a document is encoded
    as ordinary text (disallowed_special=()), as encode_ordinary does."""
    end = np.array([eot], dtype=np.uint32)
    train, test = [], []
    for i, text in enumerate(texts):
        ids = encoding.encode_to_numpy(text, disallowed_special=())
        (test if (first_index + i) % test_every == 0 else train).extend((ids, end))
    join = lambda parts: np.concatenate(parts).astype(dtype, copy=False) if parts else np.empty(0, dtype)
    return join(train), join(test), len(train) // 2, len(test) // 2


def write_token_files(
    batches: Iterator[list[str]],
    encoding: tiktoken.Encoding,
    train_path: str,
    test_path: str,
    test_every: int,
    num_threads: int,
    total_documents: int | None = None,
) -> dict:
    """Tokenize every document with end-of-text appended and write the two splits, atomically."""
    from tqdm import tqdm

    dtype = token_dtype(encoding.n_vocab)
    eot = eot_id(encoding)
    counts = {"train": {"tokens": 0, "documents": 0}, "test": {"tokens": 0, "documents": 0}}
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
            while len(pending) > limit:
                train, test, n_train, n_test = pending.pop(0).result()
                train.tofile(train_out)
                test.tofile(test_out)
                counts["train"]["tokens"] += len(train)
                counts["test"]["tokens"] += len(test)
                counts["train"]["documents"] += n_train
                counts["test"]["documents"] += n_test
                progress.update(n_train + n_test)

        for batch in batches:
            for i in range(0, len(batch), DOCUMENTS_PER_TASK):  # small tasks keep every thread busy
                texts = batch[i : i + DOCUMENTS_PER_TASK]
                pending.append(pool.submit(_tokenize_batch, encoding, eot, dtype, first, test_every, texts))
                first += len(texts)
                drain(4 * num_threads)  # bounded look-ahead keeps memory flat and the order fixed
        drain(0)
    return counts


def prepare_token_files(
    dataset: str, subset: str | None, encoding_spec: str, dataset_path: str, num_processes: int
) -> TokenFiles:
    """Make (or reuse) the train and test token files of a corpus under an encoding."""
    corpus = resolve_corpus(dataset, subset)
    encoding = load_encoding(encoding_spec)
    train_path, test_path, meta_path = token_file_paths(dataset_path, corpus, encoding_spec)
    meta = read_meta(meta_path)
    if meta is not None and _files_match(meta, train_path, test_path):
        print0(f"reusing token files {train_path} and {test_path}")
        return TokenFiles(train_path, test_path, meta)

    print0(f"preparing {corpus.source} with {encoding_spec} into {dataset_path}")
    if os.path.exists(meta_path):
        os.remove(meta_path)  # the files change below: never leave metadata that vouches for old ones
    try:
        total, batches = corpus.load(num_processes)
        counts = write_token_files(batches, encoding, train_path, test_path, corpus.test_every, num_processes, total)
    except KeyboardInterrupt as e:  # Ctrl-C, or a StopFlag's Stopped: the temporary files are gone by now
        raise Stopped(getattr(e, "signal_number", signal.SIGINT), "while tokenizing; the token files were not written"
                      ) from None
    for split in ("train", "test"):
        if counts[split]["documents"] == 0:
            raise UserError(f"--dataset {dataset}: the corpus has too few documents to fill a {split} split")
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
        "splits": counts,
    }
    with atomic_path(meta_path) as tmp, open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    print0(
        f"wrote {counts['train']['tokens']:,} train tokens ({counts['train']['documents']:,} documents) and "
        f"{counts['test']['tokens']:,} test tokens ({counts['test']['documents']:,} documents)"
    )
    return TokenFiles(train_path, test_path, meta)


def read_meta(meta_path: str) -> dict | None:
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == TOKEN_FILE_FORMAT else None


def _files_match(meta: dict, train_path: str, test_path: str) -> bool:
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split, path in (("train", train_path), ("test", test_path)):
        if not os.path.isfile(path) or os.path.getsize(path) != meta["splits"][split]["tokens"] * itemsize:
            return False
    return True


def open_tokens(path: str, meta: dict) -> np.ndarray:
    return np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")


# ----------------------------------------------------------------------------- batches


class WindowSampler:
    """Draws batches of random windows (tokens_per_sample + 1 tokens: inputs and targets shifted by one)
    from a token array with its own seeded generator, so its state can be saved and restored."""

    def __init__(self, tokens: np.ndarray, tokens_per_sample: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if len(tokens) < tokens_per_sample + 1:
            raise UserError(
                f"--tokens_per_sample {tokens_per_sample}: the train split holds only {len(tokens)} tokens; "
                f"use a shorter sample or a larger corpus"
            )
        self.tokens = tokens
        self.tokens_per_sample = tokens_per_sample
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.samples_drawn = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's batch: every rank draws the same world_size x batch_size starts from the shared
        generator and keeps its own slice, so the global batch is the same for any world size."""
        T, B = self.tokens_per_sample, self.batch_size
        starts = torch.randint(0, len(self.tokens) - T, (self.world_size * B,), generator=self.generator)
        mine = starts[self.rank * B : (self.rank + 1) * B].tolist()
        windows = torch.from_numpy(np.stack([self.tokens[s : s + T + 1] for s in mine]).astype(np.int64))  # (B, T + 1)
        self.samples_drawn += self.world_size * B
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "samples_drawn": self.samples_drawn}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.samples_drawn = state["samples_drawn"]


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


def window_batch(tokens: np.ndarray, starts: list[int], tokens_per_sample: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = tokens_per_sample
    windows = torch.from_numpy(np.stack([tokens[s : s + T + 1] for s in starts]).astype(np.int64))
    return windows[:, :-1], windows[:, 1:]


def to_device(batch: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Pinned, non-blocking copies on CUDA so the copy overlaps the work already queued."""
    if device.type == "cuda":  # contiguous first: pinning keeps strides, and a strided copy is not async
        return tuple(t.contiguous().pin_memory().to(device, non_blocking=True) for t in batch)
    return tuple(t.to(device) for t in batch)
