"""Streamed corpora (pretrain.py --streaming): a corpus read as it trains, never downloaded or tokenized whole.

    documents (datasets' streaming: the hub, local parquet/jsonl/txt; or the builtin list)
      -> this rank's training documents (every test_every-th document of the stream is held out for testing;
         of the rest, rank r takes every r-th of world_size)
      -> tokenized by worker threads (tiktoken releases the GIL), end-of-text after each document
      -> packed into windows of tokens_per_sample + 1 tokens, each starting where the last one's inputs end
      -> a bounded shuffle buffer, from which a seeded generator draws the batches.

A producer thread runs the whole pipeline ahead of training into a short queue, so the trainer only waits
when the stream cannot keep up (StreamSampler.waited counts it). Every batch carries the state the pipeline
had before it: the source's position (datasets' own IterableDataset.state_dict), the tokens not yet packed,
the shuffle buffer and its generator. A checkpoint records it, so a resumed run (same world size) continues
with the same next batch; at another world size every rank restarts from the earliest position any rank had
reached, with empty buffers: nothing is skipped, and what repeats is at most what the ranks held in their
buffers.
"""

from __future__ import annotations

import copy
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import tiktoken
import torch

from common import UserError
from data import (
    FINEWEB,
    FINEWEB_SUBSETS,
    LOCAL_EXTENSIONS,
    builtin_documents,
    corpus_subset,
    eot_id,
    error_cause,
    hub_what,
    load_hub_dataset,
    local_files,
    local_what,
)

DOCUMENTS_PER_CHUNK = 64  # documents read, tokenized and recorded as one unit
QUEUED_BATCHES = 8  # batches the producer keeps ready ahead of training


# ----------------------------------------------------------------------------- sources


@dataclass
class Source:
    """A corpus as a stream: open(state) gives a Reader from the start, or from a Reader's state()."""
    what: str  # in messages
    test_every: int
    open: Callable[[dict | None], "Reader"]


class Reader:
    """Texts in the stream's order (rows that are not text included: they keep their place in the split)
    and, between two of them, the position after the last one read."""

    def __iter__(self) -> Iterator[object]:
        raise NotImplementedError

    def state(self) -> dict:
        raise NotImplementedError


def open_source(dataset: str, subset: str | None) -> Source:
    """--dataset as a stream: builtin, local files through datasets' streaming builders, or a hub dataset."""
    if dataset == "builtin":
        documents = builtin_documents()
        return Source("the builtin corpus", 10, lambda state: _ListReader(documents, state))
    files = local_files(dataset)
    if files is not None:
        kinds = {LOCAL_EXTENSIONS.get(os.path.splitext(f)[1].lower()) for f in files}
        if None in kinds or len(kinds) > 1:
            raise UserError(f"--dataset {dataset}: --streaming reads one kind of {'/'.join(LOCAL_EXTENSIONS)} file")
        builder = kinds.pop()
        options = {"sample_by": "paragraph"} if builder == "text" else {}
        what = local_what(files)
        return Source(what, 10, lambda state: _DatasetReader(
            lambda: _load_streaming(builder, what, data_files=files, **options), what, state))
    subset = corpus_subset(dataset, subset)
    if dataset == FINEWEB and subset not in FINEWEB_SUBSETS:
        raise UserError(f"--dataset_subset {subset!r} is not a FineWeb subset; use one of {', '.join(FINEWEB_SUBSETS)}")
    config = "default" if dataset == FINEWEB and subset == "all" else subset
    what = hub_what(dataset, subset)
    return Source(what, 200, lambda state: _DatasetReader(
        lambda: load_hub_dataset(dataset, config, 1, streaming=True), what, state))


def _load_streaming(builder: str, what: str, **options):
    try:
        import datasets
    except ImportError:
        raise UserError("--streaming needs the `datasets` package: pip install datasets") from None
    try:
        return datasets.load_dataset(builder, split="train", streaming=True, **options)
    except Exception as e:
        raise UserError(f"could not open {what} as a stream ({error_cause(e)})") from None


class _ListReader(Reader):
    def __init__(self, documents: list[str], state: dict | None):
        self.documents, self.next = documents, state["next"] if state else 0

    def __iter__(self):
        while self.next < len(self.documents):
            self.next += 1
            yield self.documents[self.next - 1]

    def state(self) -> dict:
        return {"next": self.next}


class _DatasetReader(Reader):
    """A datasets IterableDataset's texts; its state is the dataset's own (IterableDataset.state_dict), which
    load_state_dict resumes exactly, skipping whole files and row groups instead of reading them again."""

    def __init__(self, make: Callable, what: str, state: dict | None):
        self.what = what
        dataset = make()
        if dataset.column_names is not None and "text" not in dataset.column_names:
            raise UserError(f"{what} has no 'text' column (columns: {', '.join(dataset.column_names)})")
        self.dataset = dataset.select_columns(["text"])
        if state:
            self.dataset.load_state_dict(state)

    def __iter__(self):
        iterator = iter(self.dataset)
        while True:
            try:
                example = next(iterator)
            except StopIteration:
                return
            except UserError:
                raise
            except Exception as e:
                raise UserError(f"could not read {self.what} ({error_cause(e)})") from None
            yield example["text"]

    def state(self) -> dict:
        return copy.deepcopy(self.dataset.state_dict())


# ----------------------------------------------------------------------------- documents to tokens


def _chunks(source: Source, position: dict | None, rank: int, world_size: int) -> Iterator[tuple[list[str], dict]]:
    """This rank's training documents, DOCUMENTS_PER_CHUNK at a time, each chunk with the position after
    it: the reader's state and the count of documents read, which decides the splits. Document i of the
    stream is a test document when i % test_every == 0; the others are numbered 0, 1, 2, ... and rank r
    takes those whose number is r modulo world_size."""
    read = position["documents"] if position else 0
    reader = source.open(position["source"] if position else None)
    k, texts = source.test_every, []
    for text in reader:
        index, read = read, read + 1
        if index % k and (index - index // k - 1) % world_size == rank and isinstance(text, str) and text:
            texts.append(text)
            if len(texts) == DOCUMENTS_PER_CHUNK:
                yield texts, {"source": reader.state(), "documents": read}
                texts = []
    if texts:
        yield texts, {"source": reader.state(), "documents": read}


def _tokenize(encoding: tiktoken.Encoding, eot: int, texts: list[str]) -> np.ndarray:
    end = np.array([eot], dtype=np.uint32)
    return np.concatenate([part for text in texts for part in (encoding.encode_to_numpy(text, disallowed_special=()),
                                                               end)]).astype(np.int64)


def test_tokens(source: Source, encoding: tiktoken.Encoding, wanted: int) -> np.ndarray:
    """The held-out test tokens: the stream's first test documents (every test_every-th, none of which the
    training stream ever takes) until `wanted` tokens, or as many as the stream holds."""
    eot, parts, count = eot_id(encoding), [], 0
    for index, text in enumerate(source.open(None)):
        if index % source.test_every == 0 and isinstance(text, str) and text:
            parts.append(_tokenize(encoding, eot, [text]))
            count += len(parts[-1])
            if count >= wanted:
                break
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


# ----------------------------------------------------------------------------- the sampler


class _Buffer:
    """The shuffle buffer: windows in one preallocated array, the first `count` rows filled. A draw takes
    row i and moves the last filled row into its place; no draw or top-up allocates."""

    def __init__(self, width: int, capacity: int, windows: np.ndarray | None = None):
        self.width, self.capacity, self.count = width, capacity, 0
        self.array = np.empty((capacity, width), np.int32)
        if windows is not None and len(windows):
            self.add(windows)

    def windows(self) -> np.ndarray:
        return self.array[: self.count]

    def add(self, windows: np.ndarray) -> None:
        self.array[self.count : self.count + len(windows)] = windows
        self.count += len(windows)

    def draw(self, i: int) -> np.ndarray:
        row = self.array[i].copy()
        self.count -= 1
        self.array[i] = self.array[self.count]
        return row


@dataclass
class _Ready:
    state: dict  # the pipeline before this batch: an anchor and the batches drawn since it
    batch: tuple[torch.Tensor, torch.Tensor] | None  # None: the stream ended
    error: BaseException | None = None


class StreamSampler:
    """Batches of windows from a stream, as WindowSampler draws them from a token file (next_batch,
    state_dict, load_state_dict), with the same length curriculum (short windows until short_samples
    samples have been drawn over all ranks; the shuffle buffer is refilled at the switch).

    Its state before a batch is an anchor, a whole snapshot of the pipeline that the producer takes every
    ANCHOR_EVERY batches (the source's position, the tokens not yet packed, the shuffle buffer, the
    generator, the samples drawn), and the number of batches drawn since it, which a restored pipeline
    draws again and drops: a snapshot per batch would copy the whole buffer at every micro-batch."""

    ANCHOR_EVERY = 256

    def __init__(self, source: Source, encoding: tiktoken.Encoding, tokens_per_sample: int, batch_size: int,
                 seed: int, rank: int = 0, world_size: int = 1, start_token: int | None = None,
                 short_tokens: int = 0, short_samples: int = 0, buffer_tokens: int = 1 << 20, workers: int = 4):
        self.source, self.encoding, self.eot = source, encoding, eot_id(encoding)
        self.tokens_per_sample, self.batch_size, self.start_token = tokens_per_sample, batch_size, start_token
        self.short_tokens, self.short_samples = short_tokens, short_samples
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.buffer_tokens, self.workers = buffer_tokens, workers
        self.waited = 0.0  # seconds the trainer has waited for batches
        self._queue: queue.Queue | None = None
        self._held: _Ready | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._start({"anchor": self._fresh_anchor(), "skip": 0})

    # --------------------------------------------------------------- state

    def _fresh_anchor(self, position: dict | None = None, samples_drawn: int = 0) -> dict:
        generator = np.random.default_rng([self.seed, self.rank])
        return {"position": position, "pending": torch.empty(0, dtype=torch.int64),
                "buffer": torch.empty((0, 0), dtype=torch.int32), "generator": generator.bit_generator.state,
                "samples_drawn": samples_drawn}

    def state_dict(self) -> dict:
        """The pipeline's state before the next batch (that batch is drawn again after load_state_dict):
        plain types and tensors, as a checkpoint holds them."""
        return self._peek().state

    def load_state_dict(self, state: dict) -> None:
        self._restart(state)

    def resharded(self, states: list[dict]) -> None:
        """Continue from the states another world size saved: from the earliest source position any rank's
        anchor had reached (nothing skipped), with empty buffers, and the global count of samples drawn."""
        positions = [s["anchor"]["position"] for s in states if s["anchor"]["position"] is not None]
        earliest = min(positions, key=lambda p: p["documents"]) if positions else None
        drawn = max(s["anchor"]["samples_drawn"] + s["skip"] * s["world_size"] * s["batch_size"] for s in states)
        self._restart({"anchor": self._fresh_anchor(earliest, drawn), "skip": 0})

    # --------------------------------------------------------------- batches

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        ready = self._peek()
        self._held = None
        if ready.error is not None:
            raise ready.error
        if ready.batch is None:
            raise UserError(f"--dataset: the stream of {self.source.what} ended (rank {self.rank} has read every "
                            f"document it takes); train for fewer steps, or on a larger corpus")
        return ready.batch

    def _peek(self) -> _Ready:
        if self._held is None:
            started = time.perf_counter()
            self._held = self._queue.get()
            self.waited += time.perf_counter() - started
        return self._held

    def close(self) -> None:
        """Stop the producer (the tokenizer threads finish their chunk)."""
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
                self._thread.join(timeout=0.05)
        self._thread = None

    def _restart(self, state: dict) -> None:
        self.close()
        self._held = None
        self._start(state)

    def _start(self, state: dict) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=QUEUED_BATCHES)
        self._thread = threading.Thread(target=self._produce, args=(state, self._queue, self._stop),
                                        daemon=True, name="stream")
        self._thread.start()

    def _capacity(self, width: int) -> int:
        return max(self.batch_size, self.buffer_tokens // max(1, width))

    def _window(self, samples_drawn: int) -> int:
        short = self.short_tokens and samples_drawn < self.short_samples
        return self.short_tokens if short else self.tokens_per_sample

    def _produce(self, state: dict, out: queue.Queue, stop: threading.Event) -> None:
        """The pipeline, in its own thread: every batch goes into `out` with the state before it."""
        try:
            anchor, skip = state["anchor"], state["skip"]
            generator = np.random.default_rng()
            generator.bit_generator.state = copy.deepcopy(anchor["generator"])
            pending, drawn, position = anchor["pending"].numpy().copy(), anchor["samples_drawn"], anchor["position"]
            saved = anchor["buffer"].numpy()
            buffer = _Buffer(saved.shape[1], self._capacity(saved.shape[1]), saved)
            tokens = self._tokens(position, stop)
            since = 0  # batches drawn since the anchor
            while not stop.is_set():
                if since == self.ANCHOR_EVERY:
                    anchor = {"position": position, "pending": torch.from_numpy(pending.copy()),
                              "buffer": torch.from_numpy(buffer.windows().copy()),
                              "generator": copy.deepcopy(generator.bit_generator.state), "samples_drawn": drawn}
                    since = 0
                before = {"anchor": anchor, "skip": since, "world_size": self.world_size, "batch_size": self.batch_size}
                T = self._window(drawn)
                if buffer.width != T + 1:  # the first batch, or the curriculum's switch: a buffer of the new length
                    buffer = _Buffer(T + 1, self._capacity(T + 1))
                rows = []
                while len(rows) < self.batch_size:
                    pending, position = self._fill(tokens, pending, buffer, position, T)
                    if not buffer.count:
                        out.put(_Ready(before, None))
                        return
                    rows.append(buffer.draw(int(generator.integers(buffer.count))))
                drawn += self.world_size * self.batch_size
                since += 1
                if skip:  # drawn before the state this pipeline was restored to: drawn again, dropped
                    skip -= 1
                    continue
                windows = torch.from_numpy(np.stack(rows).astype(np.int64))
                inputs = windows[:, :-1].clone()
                if self.start_token is not None:
                    inputs[:, 0] = self.start_token
                out.put(_Ready(before, (inputs, windows[:, 1:])))
        except BaseException as e:  # handed to the trainer, which raises it in its own thread
            out.put(_Ready({}, None, e))

    def _fill(self, tokens, pending: np.ndarray, buffer: "_Buffer", position, T: int):
        """Top the shuffle buffer up toward its capacity with windows cut from the stream: each window is
        T + 1 tokens and the next one starts at its last (the last target is the next window's first input).
        Once it holds a batch, at most two top-ups per draw: an empty buffer (the first batch, the
        curriculum's switch) fills over the next batches instead of stalling training while it fills."""
        top_ups = 0
        while buffer.count < buffer.capacity and (buffer.count < self.batch_size or top_ups < 2):
            top_ups += 1
            while len(pending) < T + 1:
                chunk = next(tokens, None)
                if chunk is None:
                    return pending, position
                more, position = chunk
                pending = np.concatenate([pending, more])
            count = min((len(pending) - 1) // T, buffer.capacity - buffer.count)
            buffer.add(pending[(np.arange(count) * T)[:, None] + np.arange(T + 1)])
            pending = pending[count * T :]
        return pending, position

    def _tokens(self, position: dict | None, stop: threading.Event) -> Iterator[tuple[np.ndarray, dict]]:
        """This rank's tokens chunk by chunk, tokenized `workers` chunks ahead, in order."""
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            ahead = []
            for texts, after in _chunks(self.source, position, self.rank, self.world_size):
                if stop.is_set():
                    return
                ahead.append((pool.submit(_tokenize, self.encoding, self.eot, texts), after))
                if len(ahead) > 2 * self.workers:
                    future, at = ahead.pop(0)
                    yield future.result(), at
            for future, at in ahead:
                yield future.result(), at
