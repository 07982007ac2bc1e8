"""Continuous batching: many requests decoded together, one forward pass per step.

    with Engine(load_for_inference(path, device), context_length=1024, max_batch=16) as engine:
        tokens, finish_reason = engine.generate(Request(prompt_ids, max_tokens=200, sampling=Sampling(0.7)))

The engine owns one KV cache of `max_batch` rows and a thread that decodes. Each request gets a row of
its own and keeps its own position in it (KVCache keeps per-row positions), so requests of any length,
arriving at any time, share one batched decode step. New requests join (their prompts are prefilled into
their rows while the other rows keep what they hold: whole when no row decodes, else a chunk at a time
inside the decode steps' own forward, KVCache.mixed) and finished or cancelled ones leave; requests wait
in a bounded queue while every row is busy.

Each request samples with its own settings and its own seeded generator, drawing its noise exactly as
generate.Decoder does, so a request with a seed gives the tokens `generate.py --seed` gives, and at
temperature 0 batched decoding gives the tokens one-at-a-time decoding gives. An eager step runs only the
rows up to the highest one in use (new requests take the lowest free row), so one request alone decodes
at batch size 1; a compiled step runs every row, so that its shapes stay few.

Tokens reach the caller through `emit`, called on the engine's thread: one Event per token, then one
final Event with the finish reason. It must not block (an asyncio server hands events to its loop with
call_soon_threadsafe).
"""

from __future__ import annotations

import collections
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from common import synchronize
from generate import Loaded, prefill, setup_kv_cache
from sampling import History, Sampler, Sampling, sample

MIXED_TARGET = 0.6  # a mixed step's chunk adds this much of a plain decode step's time (Engine._mixed_size)


def common_prefix(a, b) -> int:
    """How many first tokens two sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def mean_of(mean: float | None, value: float, weight: float = 0.1) -> float:
    """A running mean (exponential, the latest value weighing `weight`)."""
    return value if mean is None else (1 - weight) * mean + weight * value


@dataclass(frozen=True)
class Request:
    prompt: list[int]  # rendered prompt ids: generate.encode_prompt or chat.render_prompt
    max_tokens: int  # at least 1
    sampling: Sampling = Sampling()  # temperature 0 is greedy
    seed: int | None = None  # the request's own generator: the same seed gives generate.py --seed's tokens
    stop_tokens: frozenset[int] = frozenset()  # ids that end the answer; they are not emitted
    logprobs: int | None = None  # with a number n: each token's log-probability and the n likeliest
    score_prompt: bool = False  # the prompt's tokens' log-probabilities too (max_tokens may then be 0)
    constraint: Callable[[], object] | None = None  # makes the answer's grammar matcher (structured.Constraint)


Scored = tuple[float, tuple[tuple[int, float], ...]]  # a token's log-probability, and the likeliest (id, log p)


@dataclass(frozen=True)
class Event:
    token: int | None  # a generated token, or None on the final event
    finish_reason: str | None = None  # the final event's: "stop", "length", "cancelled" or "error"
    logprob: Scored | None = None  # with Request.logprobs: the token's (the stop token's, on a final "stop")
    stop_token: int | None = None  # the final event of a "stop": the token that ended the answer
    prompt: tuple[Scored, ...] | None = None  # with score_prompt, one event before any token: prompt[1:]'s


def scored(logits: torch.Tensor, tokens: torch.Tensor, n: int) -> list[Scored]:
    """Each row's log-probability of its token and its n likeliest tokens, from logits (N, V), in fp32."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, tokens.view(-1, 1)).view(-1).tolist()
    top_values, top_ids = logprobs.topk(n, dim=-1) if n else (logprobs[:, :0], tokens.new_zeros(len(tokens), 0))
    return [(c, tuple(zip(i, v))) for c, i, v in zip(chosen, top_ids.tolist(), top_values.tolist())]


def release_openmp_threads() -> bool:
    """Free the OpenMP worker threads of the calling thread (OpenMP 5's omp_pause_resource_all, in the libgomp
    that torch loads on Linux); False where there is none to call. The engine's thread runs the CPU kernels
    with a team of its own: while the caller's idle team lives too, libgomp sees more threads than cores,
    stops spinning and wakes each kernel's workers through the kernel (futex), which made every forward
    of the engine 1.5x slower than the same forward on the main thread (2 cores). The caller's team comes
    back by itself at its next parallel kernel."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        pause = ctypes.CDLL(None).omp_pause_resource_all
    except (AttributeError, OSError):
        return False
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    return pause(2) == 0  # omp_pause_hard: the threads end


class EngineBusy(Exception):
    """Every batch row is decoding and the waiting queue is full."""


@dataclass(eq=False)
class Ticket:
    """One submitted request and its progress; a handle for cancel()."""

    request: Request
    emit: Callable[[Event], None]
    sampling: Sampling  # the request's, top_k clamped to the vocabulary
    row: int | None = None  # its batch row while decoding
    position: int = 0  # where the next token goes in its row
    token: int = 0  # the last sampled token, the next step's input
    generated: int = 0  # tokens emitted
    cancelled: bool = False
    done: bool = False
    sampler: Sampler | None = field(default=None, repr=False)
    noise: torch.Tensor | None = field(default=None, repr=False)
    prefilled: int = 0  # prompt tokens in its row so far (chunked prefill)
    decoding: bool = False  # prefilled whole: its row takes part in the decode steps
    mixing: bool = False  # its prompt joins through mixed steps: once begun, to its end
    followers: list = field(default_factory=list, repr=False)  # requests waiting to copy its prompt's keys
    scores: list = field(default_factory=list, repr=False)  # score_prompt: the prompt's, chunk by chunk
    constraint: object | None = field(default=None, repr=False)  # its grammar matcher, if any


class Engine:
    def __init__(self, loaded: Loaded, context_length: int = 1024, max_batch: int = 16, max_waiting: int = 256,
                 use_compile: bool = False, prefill_chunk: int | None = None, prefix_cache: bool = True,
                 forbidden: list[int] | None = None, mixed_prefill: bool = True):  # forbidden: default loaded.undecodable
        if context_length < 2:
            raise ValueError("context_length must be at least 2: a prompt token and room to answer")
        if max_batch < 1 or max_waiting < 0:
            raise ValueError("max_batch must be at least 1 and max_waiting not negative")
        self.model = loaded.model
        self.context_length, self.max_batch, self.max_waiting = context_length, max_batch, max_waiting
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError("prefill_chunk must be at least 1 (None: sized to a decode step)")
        self.prefill_chunk = prefill_chunk  # None: sized to the decode step (_chunk_size, _mixed_size)
        # Mixed steps: a chunk of a joining prompt runs in the decode step's own forward (eager, NoPE model only)
        self.mixed_prefill = (mixed_prefill and not use_compile
                              and loaded.model.config.position_encoding == "none")
        self._step_seconds = self._token_seconds = None  # a plain step's time and a prompt token's, for chunk sizes
        self._recent_steps: collections.deque[float] = collections.deque(maxlen=32)  # plain steps' times
        self._mixed_next = 32  # the next mixed step's chunk (by default), sized from the last one's time
        self._prefilling: collections.deque[Ticket] = collections.deque()  # rows taken, prompts not yet whole
        # Prefix caching: the tokens whose keys and values each row holds at positions 0, 1, ... (None once its
        # ring has wrapped: the first ones are gone). A finished request's row keeps them; a new request whose
        # prompt starts with some of them reuses them instead of prefilling them again.
        self.prefix_cache = prefix_cache
        self._row_tokens: list[list[int] | None] = [[] for _ in range(max_batch)]
        self.prompt_tokens = 0  # prompt tokens admitted, and of those the ones read from the cache
        self.cached_tokens = 0
        self.device = self.model.token_embeddings.weight.device
        # ids never sampled: those the tokenizer cannot decode (cl100k_base and o200k_base leave gaps)
        forbidden = loaded.undecodable if forbidden is None else forbidden
        self.forbidden = torch.tensor(sorted(forbidden), device=self.device) if forbidden else None
        self.vocabulary_size = self.model.config.vocabulary_size
        self.cache = setup_kv_cache(self.model, max_batch, context_length,
                                    f"a KV cache of {max_batch} rows x {context_length} tokens")
        # Compiled, a step runs every row (the rows in use vary, and each count would be a new graph); the span
        # is the only shape that changes, through a few sizes (KVCache.spans). Eager, only the rows in use run.
        self.use_compile = use_compile
        self._forward = torch.compile(self._decode, dynamic=False) if use_compile else self._decode
        self._rows: list[Ticket | None] = [None] * max_batch
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self.history: History | None = None  # the penalties' history, made when a request first needs it
        self.steps = 0  # batched decode steps run
        self.last_error: str | None = None  # the latest failure of a step, for a health check

    # ------------------------------------------------------------------------- the callers' side

    @property
    def active(self) -> int:
        return sum(t is not None for t in self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "Engine":
        if self._thread is None:
            if self.device.type == "cpu":
                release_openmp_threads()
            self._thread = threading.Thread(target=self._run, name="lightgpt-engine", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop decoding; requests not finished yet end with "cancelled"."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
        for ticket in list(self._waiting) + [t for t in self._rows if t is not None]:
            self._finish(ticket, "cancelled")
        self._waiting.clear()

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def submit(self, request: Request, emit: Callable[[Event], None]) -> Ticket:
        """Queue a request; thread-safe. ValueError for a prompt that is empty or leaves no room to answer
        in the context, or a bad max_tokens; EngineBusy when every row and the queue are taken."""
        if not request.prompt:
            raise ValueError("the prompt is empty")
        if len(request.prompt) + (request.max_tokens > 0) > self.context_length:
            raise ValueError(f"the prompt has {len(request.prompt)} tokens: no room to answer in a context of "
                             f"{self.context_length} tokens")
        if request.max_tokens < (0 if request.score_prompt else 1):
            raise ValueError(f"max_tokens must be at least 1 (0 when only the prompt is scored), not {request.max_tokens}")
        if not all(0 <= t < self.vocabulary_size for t in request.prompt):
            raise ValueError(f"the prompt holds token ids outside the vocabulary (0 .. {self.vocabulary_size - 1})")
        ticket = Ticket(request, emit, request.sampling.clamped(self.vocabulary_size))
        with self._lock:
            if self._closing:
                raise EngineBusy("the engine is shutting down")
            if self.active + len(self._waiting) >= self.max_batch + self.max_waiting:
                raise EngineBusy(f"all {self.max_batch} batch rows and {self.max_waiting} waiting places are taken")
            self._waiting.append(ticket)
            self._lock.notify_all()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Stop a request; thread-safe. Its row (or its waiting place) is free before the next step; its final
        event is "cancelled" (unless it had already finished)."""
        with self._lock:
            ticket.cancelled = True
            self._lock.notify_all()

    def generate(self, request: Request, timeout: float | None = None) -> tuple[list[int], str]:
        """Submit a request and wait for it: (its tokens, stop tokens left out; its finish reason)."""
        tokens, finished = [], threading.Event()
        reason = []

        def emit(event: Event) -> None:
            if event.prompt is not None:  # a scored prompt's log-probabilities: not tokens
                return
            if event.token is not None:
                tokens.append(event.token)
            else:
                reason.append(event.finish_reason)
                finished.set()

        ticket = self.submit(request, emit)
        if not finished.wait(timeout):
            self.cancel(ticket)
            if not finished.wait(60 if self.running else 0):  # a cancel takes effect within a step
                raise TimeoutError("the engine did not answer: it is not running")
        return tokens, reason[0]

    # ------------------------------------------------------------------------- the engine's thread

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not self._closing and not self._waiting and not any(self._rows):
                        self._lock.wait()
                    # (cancel() notifies, so a request cancelled while it waits wakes the loop to remove it)
                    if self._closing:
                        return
                    joining = [t for t in self._waiting if t.cancelled]  # a cancelled request leaves the queue at once
                    for ticket in joining:
                        self._waiting.remove(ticket)
                    free = [row for row, t in enumerate(self._rows) if t is None]
                    while free and self._waiting:  # none of them is cancelled: cancel() takes this lock too
                        ticket = self._waiting.popleft()
                        ticket.row = self._choose_row(ticket, free)
                        free.remove(ticket.row)
                        self._rows[ticket.row] = ticket
                        joining.append(ticket)
                for ticket in joining:  # the cancelled finish outside the lock, the admitted prefill
                    if ticket.cancelled:
                        self._finish(ticket, "cancelled")
                    else:
                        self._guarded(self._join, ticket)
                for ticket in self._rows:
                    if ticket is not None and ticket.cancelled:
                        self._finish(ticket, "cancelled")
                chunk = self._mixed_chunk()  # a prompt chunk for the next step's own forward, or None
                budget = 0 if chunk else self._chunk_size()  # else prompt tokens to prefill before the step
                while self._prefilling and budget > 0:
                    ticket = self._prefilling[0]
                    n = min(budget, len(ticket.request.prompt) - ticket.prefilled)
                    self._guarded(self._prefill_chunk, ticket, n)
                    budget -= n
                if any(t is not None and t.decoding for t in self._rows):
                    self._guarded(self._step, chunk)  # (a failed mixed step ends every row's request)

    def _guarded(self, work: Callable, *args) -> None:
        """Run a prefill or a step; a failure (out of memory, say) ends the requests it touched with
        "error" and the engine goes on serving the others."""
        try:
            work(*args)
        except Exception as e:  # noqa: BLE001 - whatever failed, the server must stay up
            self.last_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            touched = [a for a in args if isinstance(a, Ticket)] or [t for t in self._rows if t is not None]
            for ticket in touched:
                self._finish(ticket, "error")

    def _choose_row(self, ticket: Ticket, free: list[int]) -> int:
        """The free row whose kept tokens start the prompt furthest; else the lowest free row that keeps nothing,
        else the lowest free row (rows in use near a prefix: an eager step runs the rows up to the highest in use)."""
        if not self.prefix_cache:
            return free[0]  # nothing kept is ever reused: the lowest row keeps an eager step smallest
        shared = self._shared(ticket)
        best = max(free, key=lambda row: (shared[row], -row))
        if shared[best] > 0:
            return best
        empty = [row for row in free if not self._row_tokens[row]]  # no hit: keep the rows that hold something
        return empty[0] if empty else free[0]

    def _shared(self, ticket: Ticket) -> list[int]:
        """Per row, how many of the request's first prompt tokens it holds (at most all but the last: its logits
        start the answer); none without the prefix cache, or for a request scoring its prompt (every position's
        logits are needed)."""
        if not self.prefix_cache or ticket.request.score_prompt:
            return [0] * self.max_batch
        return [common_prefix(kept or (), ticket.request.prompt[:-1]) for kept in self._row_tokens]

    def _reuse(self, ticket: Ticket) -> None:
        """Start the request's row: keep the prompt's prefix the row already holds (the best any row holds, copied
        from that row when it is another), forget the rest."""
        row, prompt = ticket.row, ticket.request.prompt
        shared = self._shared(ticket)
        n = shared[row]
        source = max(range(self.max_batch), key=shared.__getitem__)
        if shared[source] > n:  # another row, busy or free, holds more of it: copy its keys
            n = shared[source]
            for k, v in self.cache._buffers_by_layer:
                k[row, :, :n] = k[source, :, :n]
                v[row, :, :n] = v[source, :, :n]
        self.cache.slot_pos[row, n:] = -1  # (a row's kept tokens never wrapped: position p in slot p)
        self.cache.slot_pos[row, :n] = torch.arange(n, device=self.device)
        self._row_tokens[row] = list(prompt[:n])
        ticket.prefilled = n
        self.cached_tokens += n

    def _join(self, ticket: Ticket) -> None:
        """Admit a request to its row: its sampler, its noise and history, the prefix its row (or another)
        holds, then the rest of its prompt chunk by chunk; or, when a request still prefilling will hold more
        of its prompt than any row does now (the n choices of one request, identical prompts arriving together),
        wait for that prompt and copy its keys (prefix caching)."""
        request = ticket.request
        self.prompt_tokens += len(request.prompt)
        leader = self._leader(ticket)
        if leader is None:
            self._reuse(ticket)
        else:  # its row forgets what it kept (a step's dummy token goes to slot 1 of it meanwhile)
            self._row_tokens[ticket.row] = []
            self.cache.slot_pos[ticket.row] = -1
        ticket.constraint = request.constraint() if request.constraint is not None else None
        ticket.sampler = Sampler(self.device, request.seed)
        ticket.noise = torch.ones(1, ticket.sampling.top_k, device=self.device)
        if ticket.sampling.penalised:
            if self.history is None:
                self.history = History(self.max_batch, self.vocabulary_size, self.device)
            self.history.start(ticket.row, torch.tensor(request.prompt, device=self.device))
        if leader is None:
            self._prefilling.append(ticket)
        else:
            leader.followers.append(ticket)

    def _leader(self, ticket: Ticket) -> Ticket | None:
        """The request still prefilling whose prompt will give this one more of its prompt than any row holds
        now (at most all but its last token, as _shared counts), or None."""
        if not self.prefix_cache or ticket.request.score_prompt or not self._prefilling:
            return None
        prompt, best, leader = ticket.request.prompt, max(self._shared(ticket)), None
        for other in self._prefilling:
            common = common_prefix(other.request.prompt, prompt[:-1])
            if common > best and len(other.request.prompt) <= self.cache.length:  # (a wrapped ring keeps nothing)
                best, leader = common, other
        return leader

    def _release(self, leader: Ticket) -> None:
        """The leader's prompt is in its row (or it ended early): its followers copy what it holds and join."""
        followers, leader.followers = leader.followers, []
        for ticket in followers:
            if not ticket.done:  # (a follower cancelled while it waited has finished already)
                self._guarded(self._admit, ticket)  # (a failed copy ends that follower, not the others)

    def _admit(self, ticket: Ticket) -> None:
        self._reuse(ticket)
        self._prefilling.append(ticket)

    def _chunk_size(self) -> int:
        """Prompt tokens to prefill before the next decode step (several short prompts, or a chunk of a long
        one). With no row decoding nobody waits: every joining prompt whole. Else prefill_chunk, or by default as many tokens as prefill in about one
        decode step's time, at least 64 (measured as the engine runs; 64 until both are known), so that a
        long prompt arriving about doubles the gap between the running answers' tokens, no more."""
        if not any(t is not None and t.decoding for t in self._rows):
            return self.cache.length * self.max_batch
        if self.prefill_chunk is not None:
            return self.prefill_chunk
        if self._step_seconds is None or self._token_seconds is None:
            return 64
        return max(64, min(self.cache.length, int(self._step_seconds / self._token_seconds) // 16 * 16))

    def _mixed_chunk(self) -> tuple[Ticket, int] | None:
        """(the joining request, how many of its prompt tokens) for the next decode step to run in its own
        forward, as vLLM schedules a chunked prefill: the chunk shares the step's call, its weights' reads and
        its Python, so the running answers' next token waits for the chunk's arithmetic only. None when no row
        decodes (prompts are prefilled whole, nobody waits), when nothing is joining, when the first joining
        prompt fits one chunk (short prompts join between the steps, several in one budget: a mixed step carries
        one prompt's chunk, and a burst of short ones would join one a step), or where steps are not mixed
        (compiled steps, position encodings). A prompt that began in the steps ends in them: its rest, once it
        fits a chunk, prefilled whole between two steps would be the stall the chunks avoid."""
        if not self.mixed_prefill or not self._prefilling:
            return None
        if not any(t is not None and t.decoding for t in self._rows):
            return None
        ticket, size = self._prefilling[0], self._mixed_size()
        rest = len(ticket.request.prompt) - ticket.prefilled
        if not ticket.mixing and rest <= size:
            return None  # a short prompt's rest goes whole between the steps, with the other short ones joining
        if min(size, rest) < 2:
            return None  # (a chunk of one token is a decode step's shape: it goes between the steps)
        ticket.mixing = True  # a long prompt's last chunks stay in the steps, however small its rest
        return ticket, min(size, rest)

    def _mixed_size(self) -> int:
        """A mixed step's chunk: prefill_chunk, or by default as many tokens as add MIXED_TARGET of a plain
        step's time: 32 at first, then the last chunk scaled by how far its step's time was from that (at most
        1.5x larger, at least 8 tokens), so that the answers' gap between tokens grows by about 1.6x while a
        long prompt joins, as the chunks' cost grows with their position. (A mixed step costs about half a plain
        step more whatever its chunk's size at long positions, on a 2-core CPU: the chunk reads its row's whole
        cache; below 8 tokens a long prompt would take hundreds of steps to join.)"""
        if self.prefill_chunk is not None:
            return min(self.prefill_chunk, self.cache.length)
        return self._mixed_next

    def _prefill_chunk(self, ticket: Ticket, n: int) -> None:
        """Prefill the next n prompt tokens of a joining request into its row (the other rows keep what they
        hold); after its last chunk, sample its first token and let it decode."""
        request, start, began = ticket.request, ticket.prefilled, time.perf_counter()
        tokens = request.prompt[start : start + n]
        chunk = torch.tensor([tokens], device=self.device)

        def score(offset: int, logits: torch.Tensor) -> None:
            self._score(ticket, start + offset, logits)

        self.cache.rows = slice(ticket.row, ticket.row + 1)
        try:
            logits = prefill(self.model, chunk, position=start, on_logits=score if request.score_prompt else None)
        finally:
            self.cache.rows = None
        if len(tokens) >= 64:  # the time per prompt token (a smaller chunk's time is mostly a call's overhead)
            synchronize(self.device)
            self._token_seconds = mean_of(self._token_seconds, (time.perf_counter() - began) / len(tokens))
        self._chunk_done(ticket, tokens, logits)

    def _score(self, ticket: Ticket, position: int, logits: torch.Tensor) -> None:
        """A prompt-scoring request's chunk from `position`: logits (1, n, V), each predicting the next prompt token."""
        first = position + 1
        targets = torch.tensor(ticket.request.prompt[first : first + logits.size(1)], device=self.device)
        ticket.scores.extend(scored(logits[0, : len(targets)], targets, ticket.request.logprobs or 0))

    def _chunk_done(self, ticket: Ticket, tokens: list[int], logits: torch.Tensor) -> None:
        """After a chunk of the request's prompt ran into its row (logits (1, V) after its last token): note
        it, and after the prompt's last chunk sample the first token and let the request decode."""
        request = ticket.request
        ticket.prefilled += len(tokens)
        self._keep(ticket.row, tokens)
        prompt_end = len(request.prompt)
        if ticket.prefilled < prompt_end:
            return
        self._prefilling.remove(ticket)
        self._release(ticket)
        if request.score_prompt:
            self._emit(ticket, Event(None, prompt=tuple(ticket.scores)))
        if request.max_tokens == 0:
            self._finish(ticket, "length")
            return
        ticket.position, ticket.decoding = prompt_end, True
        self._advance([ticket], [self._sample([ticket], logits)], logits, [0])

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, input_pos=positions)[:, -1]  # (B, V)

    def _step(self, chunk: tuple[Ticket, int] | None = None) -> None:
        """One batched decode step for every row up to the highest in use, each at its own position, with a
        chunk of a joining prompt in the same forward if given (a mixed step)."""
        began = time.perf_counter()
        self._decode_step(chunk)
        seconds = time.perf_counter() - began  # (its tokens synced)
        if chunk is None:
            self._recent_steps.append(seconds)  # their median: one hiccup of the machine (a 30 ms step) moves
            self._step_seconds = statistics.median(self._recent_steps)  # a mean, and the chunks sized from it
        elif self._step_seconds is not None and chunk[1] >= self._mixed_next:  # (a prompt's short last piece: no)
            # scale the next chunk by what this one added against the target
            added = max(seconds - self._step_seconds, 0.01 * self._step_seconds)
            scale = min(1.5, MIXED_TARGET * self._step_seconds / added)  # (a chunk's cost grows with its position)
            self._mixed_next = max(8, min(self.cache.length, int(chunk[1] * scale)))

    def _decode_step(self, chunk: tuple[Ticket, int] | None = None) -> None:
        top = max(row for row, t in enumerate(self._rows) if t is not None) + 1
        if self.use_compile:
            top = self.max_batch
        rows = self._rows[:top]
        tokens = torch.tensor([[t.token if t else 0] for t in rows], device=self.device)  # (B, 1)
        dummies = {row: self._dummy_position(row, t) for row, t in enumerate(rows) if t is None or not t.decoding}
        positions = torch.tensor([[dummies[row] if row in dummies else t.position] for row, t in enumerate(rows)],
                                 device=self.device)  # (B, 1)
        # The span holds every decoding row's keys; a dummy written past it is simply not attended to (its
        # row's output is dropped), so a long prompt joining does not widen the other rows' attention.
        self.cache.span = self.cache.span_for(max(t.position for t in rows if t is not None and t.decoding))
        self.cache.split = None if self.use_compile else self._split(rows, self.cache.span)
        if chunk is not None:  # the chunk's row decodes a dummy inside its chunk, which the chunk overwrites
            ticket, n = chunk
            piece = ticket.request.prompt[ticket.prefilled : ticket.prefilled + n]
            tokens = torch.cat([tokens.view(1, -1), torch.tensor([piece], device=self.device)], dim=1)  # (1, D + n)
            positions = torch.cat([positions.view(-1), torch.arange(ticket.prefilled, ticket.prefilled + n,
                                                                    device=self.device)])  # (D + n,)
            self.cache.mixed = (top, ticket.row)
            del dummies[ticket.row]
        else:
            self.cache.rows = None if top == self.max_batch else slice(0, top)
        try:
            if chunk is None:
                logits = self._forward(tokens, positions)
            else:
                both = self.model(tokens, input_pos=positions)  # (1, D + n, V)
                logits, chunk_logits = both[0, :top], both[:, top:]
        finally:
            self.cache.rows, self.cache.span, self.cache.mixed, self.cache.split = None, None, None, None
            for row, position in dummies.items():  # the dummies' slots are empty again: nothing attends to them
                self.cache.slot_pos[row, position % self.cache.length] = -1
        active = [t for t in rows if t is not None and t.decoding]
        for t in active:
            self._keep(t.row, [t.token])
            t.position += 1
        self.steps += 1
        groups: dict[Sampling, list[Ticket]] = {}  # rows with the same settings sample in one call
        for t in active:
            groups.setdefault(t.sampling, []).append(t)
        tickets, next_tokens = [], []
        for group in groups.values():
            index = torch.tensor([t.row for t in group], device=self.device)
            tickets += group
            next_tokens.append(self._sample(group, logits.index_select(0, index)))
        self._advance(tickets, next_tokens, logits, [t.row for t in tickets])
        if chunk is not None:
            if ticket.request.score_prompt:
                self._score(ticket, ticket.prefilled, chunk_logits)
            self._chunk_done(ticket, piece, chunk_logits[:, -1])

    def _split(self, rows: list[Ticket | None], span: int) -> tuple[int, int, int] | None:
        """(n, a, b): the step's rows 0 .. n-1 attend over their first a slots and the others over b (KVCache.split),
        where that saves at least a quarter of the attention's work over every row attending the whole span (a
        long sequence decoding beside short ones); else None. Rows that do not decode attend anywhere (their
        output is dropped)."""
        need = [self.cache.span_for(t.position) if t is not None and t.decoding else 0 for t in rows]
        smallest, best = self.cache.spans()[0], None
        for n in range(1, len(rows)):
            a, b = max(max(need[:n]), smallest), max(max(need[n:]), smallest)
            cost = n * a + (len(rows) - n) * b
            if cost <= 0.75 * len(rows) * span and (best is None or cost < best[0]):
                best = (cost, (n, min(a, span), min(b, span)))
        return None if best is None else best[1]

    def _dummy_position(self, row: int, ticket: Ticket | None) -> int:
        """Where a row that is not decoding (free, or still prefilling) writes the step's dummy token: the
        first slot it does not hold (the slot is emptied after the step), never position 0, which would start
        a new sequence and forget what the row keeps."""
        if ticket is not None:
            return max(1, ticket.prefilled)  # its next chunk writes there first
        kept = self._row_tokens[row]
        if kept is None:
            return 1  # a wrapped row keeps nothing of use
        if len(kept) >= self.cache.length:  # full: give up its last token for the dummy's slot
            del kept[self.cache.length - 1:]
        return max(1, len(kept))

    def _keep(self, row: int, tokens: list[int]) -> None:
        """Note the tokens just written at the row's next positions (prefix caching)."""
        kept = self._row_tokens[row]
        if kept is not None:
            kept.extend(tokens)
            if len(kept) > self.cache.length:  # the ring wrapped: its first positions are overwritten
                self._row_tokens[row] = None

    def _sample(self, tickets: list[Ticket], logits: torch.Tensor) -> torch.Tensor:
        """The next tokens of requests with the same settings from their logits (N, V), each request's noise
        drawn from its own generator as generate.Decoder draws it."""
        sampling = tickets[0].sampling
        noise = None if sampling.greedy else torch.cat([t.sampler.fill(t.noise) for t in tickets])
        if self.forbidden is not None:
            logits.index_fill_(1, self.forbidden, float("-inf"))
        for i, t in enumerate(tickets):  # grammars: the tokens they forbid cannot be sampled
            if t.constraint is not None:
                t.constraint.mask(logits[i])
        if not sampling.penalised:
            return sample(logits, sampling, noise)
        rows = torch.tensor([t.row for t in tickets], device=self.device)
        tokens = sample(logits, sampling, noise, self.history.counts[rows], self.history.in_prompt[rows])
        self.history.add(rows, tokens)
        return tokens

    def _advance(self, tickets: list[Ticket], next_tokens: list[torch.Tensor], logits: torch.Tensor,
                 rows: list[int]) -> None:
        """Hand each request its new token (one host sync for all of them), with its log-probability where
        asked (from the logits (B, V) it was sampled from, ticket i's at rows[i]), and retire the finished."""
        tokens = torch.cat(next_tokens)
        wanted = [i for i, t in enumerate(tickets) if t.request.logprobs is not None]
        found = {}
        if wanted:
            n = max(tickets[i].request.logprobs for i in wanted)
            chosen = logits[torch.tensor([rows[i] for i in wanted], device=self.device)]
            found = {i: (lp, top[: tickets[i].request.logprobs]) for i, (lp, top) in
                     zip(wanted, scored(chosen, tokens[torch.tensor(wanted, device=self.device)], n))}
        for i, (ticket, token) in enumerate(zip(tickets, tokens.tolist())):
            if ticket.cancelled:
                self._finish(ticket, "cancelled")
            elif token in ticket.request.stop_tokens:
                self._finish(ticket, "stop", Event(None, "stop", found.get(i), token))
            else:
                ticket.token = token
                ticket.generated += 1
                self._emit(ticket, Event(token, logprob=found.get(i)))
                if ticket.constraint is not None:
                    ticket.constraint.accept(token)
                    if ticket.constraint.finished:  # the grammar is whole: nothing may follow
                        self._finish(ticket, "stop")
                        continue
                if ticket.generated == ticket.request.max_tokens:
                    self._finish(ticket, "length")

    def _finish(self, ticket: Ticket, reason: str, event: Event | None = None) -> None:
        if ticket.done:
            return
        ticket.done = True
        if ticket in self._prefilling:
            self._prefilling.remove(ticket)
        self._release(ticket)  # followers of a request that ended before its prompt was in prefill the rest
        with self._lock:
            if ticket.row is not None and self._rows[ticket.row] is ticket:
                self._rows[ticket.row] = None
        self._emit(ticket, event or Event(None, reason))

    @staticmethod
    def _emit(ticket: Ticket, event: Event) -> None:
        try:
            ticket.emit(event)
        except Exception:  # noqa: BLE001 - a caller's broken callback must not stop the other requests
            ticket.cancelled = True
