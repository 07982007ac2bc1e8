"""Continuous batching: per-row cache positions, and batched serving equal to one request at a time."""

import copy
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from conftest import ROOT, TINY
from engine import Engine, EngineBusy, Event, Request
from generate import Decoder, Loaded, Sampler, Sampling, generate
from model import GPT, GPTConfig

EOT = 0


def tiny(encoding="none", seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**TINY, dropout=0.0, position_encoding=encoding)).eval()


def loaded(model):
    return Loaded(model, encoding=None, eot=EOT)


def prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, TINY["vocabulary_size"], (n,), generator=g).tolist() for n in lengths]


def one_at_a_time(model, request, context_length):
    """What generate.py gives for a request: a batch-1 decoder, the stop token left out."""
    decoder = Decoder(copy.deepcopy(model), context_length, 1, request.sampling, Sampler(torch.device("cpu"),
                      request.seed), use_compile=False)
    with torch.inference_mode():
        out = generate(decoder, request.prompt, set(request.stop_tokens), request.max_tokens)
    return out[:-1] if out[-1] in request.stop_tokens else out


@pytest.mark.parametrize("encoding", ["none", "rope", "alibi"])
def test_rows_at_their_own_positions_decode_as_if_alone(encoding):
    """Three rows holding sequences of different lengths (one past the ring's wrap) decoded in one step,
    each at its own position, give the logits each row gives decoded alone."""
    model, L = tiny(encoding), 16
    seqs = prompts([5, 11, 21])
    alone = []
    for s in seqs:
        model.setup_cache(1, L)
        with torch.inference_mode():
            for start in range(0, len(s), L):  # a prefill in chunks of at most the ring
                model(torch.tensor([s[start:start + L]]), input_pos=torch.arange(start, min(len(s), start + L)))
            alone.append(model(torch.tensor([[7]]), input_pos=torch.tensor([len(s)]))[0, -1])
    cache = model.setup_cache(3, L)
    with torch.inference_mode():
        for row, s in enumerate(seqs):
            cache.rows = slice(row, row + 1)
            for start in range(0, len(s), L):
                model(torch.tensor([s[start:start + L]]), input_pos=torch.arange(start, min(len(s), start + L)))
        cache.rows = None
        together = model(torch.tensor([[7]] * 3), input_pos=torch.tensor([[len(s)] for s in seqs]))[:, -1]
    for row in range(3):
        torch.testing.assert_close(together[row], alone[row], rtol=1e-5, atol=1e-5)


def test_a_prefill_into_one_row_leaves_the_others_alone():
    model = tiny()
    cache = model.setup_cache(2, 16)
    a, b = prompts([6, 9])
    with torch.inference_mode():
        cache.rows = slice(0, 1)
        model(torch.tensor([a]), input_pos=torch.arange(6))
        keys, slots = cache.layers[0].k[0].clone(), cache.slot_pos[0].clone()
        cache.rows = slice(1, 2)
        model(torch.tensor([b]), input_pos=torch.arange(9))
        model(torch.tensor([[3]]), input_pos=torch.tensor([0]))  # a one-token prompt: a new sequence in row 1 only
    cache.rows = None
    assert torch.equal(cache.layers[0].k[0], keys) and torch.equal(cache.slot_pos[0], slots)
    assert cache.slot_pos[1].tolist() == [0] + [-1] * 15


def staggered(engine, requests, gap_tokens=3, timeout=60):
    """Submit the requests one after another, each when the one before has produced gap_tokens tokens
    (or finished): requests of different lengths arriving while others are decoding."""
    outputs = [[] for _ in requests]
    reasons = [None] * len(requests)
    done = [threading.Event() for _ in requests]

    def submit(i):
        started = [False]

        def emit(event: Event):
            if event.token is not None:
                outputs[i].append(event.token)
            else:
                reasons[i] = event.finish_reason
                done[i].set()
            if i + 1 < len(requests) and not started[0] and (len(outputs[i]) >= gap_tokens or done[i].is_set()):
                started[0] = True
                submit(i + 1)  # from the engine's own thread, between steps

        engine.submit(requests[i], emit)

    submit(0)
    for d in done:
        assert d.wait(timeout)
    return outputs, reasons


def test_batched_greedy_equals_one_at_a_time():
    model, L = tiny(), 32
    plain = [Request(p, max_tokens=m, sampling=Sampling(temperature=0.0))
             for p, m in zip(prompts([3, 17, 1, 30, 8, 12]), [40, 9, 25, 6, 50, 1])]
    stop = frozenset({one_at_a_time(model, plain[0], L)[10]})  # a token the first answer meets mid-way
    requests = [Request(r.prompt, r.max_tokens, r.sampling, stop_tokens=stop) for r in plain]
    expected = [one_at_a_time(model, r, L) for r in requests]
    with Engine(loaded(model), context_length=L, max_batch=4) as engine:
        outputs, reasons = staggered(engine, requests)
        assert engine.steps > 0 and engine.active == 0 and engine.waiting == 0
    assert outputs == expected
    assert [len(o) for o in outputs] != [r.max_tokens for r in requests]  # some stopped early, some ran past L
    for out, r, reason in zip(outputs, requests, reasons):
        assert reason == ("length" if len(out) == r.max_tokens else "stop")


@pytest.mark.slow  # torch.compile: inductor builds C++ kernels
def test_compiled_batched_greedy_equals_one_at_a_time():
    model, L = tiny(), 32
    requests = [Request(p, max_tokens=m, sampling=Sampling(temperature=0.0))
                for p, m in zip(prompts([3, 17, 1, 30, 8]), [40, 9, 25, 6, 50])]
    expected = [one_at_a_time(model, r, L) for r in requests]
    with Engine(loaded(model), context_length=L, max_batch=4, use_compile=True) as engine:
        outputs, _ = staggered(engine, requests, timeout=600)
        assert engine.last_error is None
    assert outputs == expected


def test_seeded_sampling_gives_what_generate_gives():
    model, L = tiny(), 64
    settings = [Sampling(1.0, 50, 0.9), Sampling(1.0, 50, 0.9), Sampling(0.7, 500, 1.0), Sampling(1.3, 5, 0.5)]
    requests = [Request(p, max_tokens=20, sampling=s, seed=seed)
                for p, s, seed in zip(prompts([4, 9, 2, 6]), settings, [1, 2, 3, 4])]
    expected = [one_at_a_time(model, r, L) for r in requests]
    with Engine(loaded(model), context_length=L, max_batch=4) as engine:
        outputs, _ = staggered(engine, requests, gap_tokens=2)
        again = engine.generate(requests[0])[0]
    assert outputs == expected and again == expected[0]
    assert len({tuple(o) for o in outputs}) == 4


def test_more_requests_than_rows_wait_and_a_full_queue_refuses():
    model = tiny()
    requests = [Request(p, max_tokens=6, sampling=Sampling(0.0)) for p in prompts([2, 3, 4, 5, 6])]
    engine = Engine(loaded(model), context_length=32, max_batch=2, max_waiting=3)  # not started: nothing decodes
    events = [[] for _ in requests]
    for i, r in enumerate(requests):
        engine.submit(r, events[i].append)
    with pytest.raises(EngineBusy, match="2 batch rows and 3 waiting places"):
        engine.submit(requests[0], print)
    assert engine.waiting == 5
    engine.start()
    deadline = time.monotonic() + 60
    while not all(e and e[-1].token is None for e in events) and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.close()
    for i, r in enumerate(requests):
        assert [e.token for e in events[i][:-1]] == one_at_a_time(model, r, 32)
        assert events[i][-1] == Event(None, "length")


def test_cancel_frees_the_row_and_ends_with_cancelled():
    model = tiny()
    engine = Engine(loaded(model), context_length=32, max_batch=1).start()
    got, cancelled = [], threading.Event()

    def emit(event):
        got.append(event)
        if event.token is not None and len(got) == 3:
            engine.cancel(ticket)
        if event.finish_reason:
            cancelled.set()

    ticket = engine.submit(Request(prompts([4])[0], max_tokens=10_000, sampling=Sampling(0.0)), emit)
    assert cancelled.wait(60)
    assert got[-1] == Event(None, "cancelled") and len(got) <= 5
    tokens, reason = engine.generate(Request([1, 2], max_tokens=3, sampling=Sampling(0.0)), timeout=60)
    assert reason == "length" and len(tokens) == 3 and engine.active == 0
    engine.close()


def test_a_request_cancelled_while_it_waits_leaves_the_queue_at_once():
    model = tiny()
    engine = Engine(loaded(model), context_length=64, max_batch=1, max_waiting=1).start()
    long_events, waiting_events, first = [], [], threading.Event()

    def long_emit(event):
        long_events.append(event)
        first.set()

    busy = engine.submit(Request([1, 2], max_tokens=10_000, sampling=Sampling(0.0)), long_emit)
    assert first.wait(60)
    waiting = engine.submit(Request([3, 4], max_tokens=5), waiting_events.append)
    with pytest.raises(EngineBusy):
        engine.submit(Request([5], max_tokens=5), print)
    engine.cancel(waiting)
    deadline = time.monotonic() + 60
    while engine.waiting and time.monotonic() < deadline:
        time.sleep(0.01)
    assert waiting_events == [Event(None, "cancelled")] and engine.active == 1  # the long one still decodes
    engine.submit(Request([5], max_tokens=5), print)  # its waiting place is free again
    engine.cancel(busy)
    engine.close()


def test_generate_with_a_timeout_never_blocks_on_an_engine_that_does_not_run():
    engine = Engine(loaded(tiny()), context_length=32, max_batch=1)  # never started
    with pytest.raises(TimeoutError, match="not running"):
        engine.generate(Request([1, 2], max_tokens=3), timeout=0.1)


@pytest.mark.parametrize("prompt, max_tokens, message", [
    ([], 5, "the prompt is empty"),
    (list(range(1, 33)), 5, "32 tokens: no room to answer in a context of 32"),
    ([1, 2], 0, "max_tokens must be at least 1"),
    ([1, 999], 5, "outside the vocabulary"),
])
def test_bad_requests_are_refused_at_submit(prompt, max_tokens, message):
    engine = Engine(loaded(tiny()), context_length=32, max_batch=1)
    with pytest.raises(ValueError, match=message):
        engine.submit(Request(prompt, max_tokens=max_tokens), print)


def failing_on(call: int, real, message: str):
    """real, except that its call-th call raises RuntimeError(message)."""
    calls = []

    def flaky(*args):
        calls.append(1)
        if len(calls) == call:
            raise RuntimeError(message)
        return real(*args)

    return flaky


def test_a_failing_step_ends_its_requests_with_error_and_the_engine_goes_on(monkeypatch):
    model = tiny()
    with Engine(loaded(model), context_length=32, max_batch=2) as engine:
        engine._forward = failing_on(2, engine._forward, "CUDA out of memory (simulated)")
        tokens, reason = engine.generate(Request([1, 2, 3], max_tokens=5, sampling=Sampling(0.0)), timeout=60)
        assert reason == "error" and engine.last_error.startswith("RuntimeError: CUDA out of memory")
        tokens, reason = engine.generate(Request([1, 2, 3], max_tokens=5, sampling=Sampling(0.0)), timeout=60)
        assert reason == "length" and tokens == one_at_a_time(model, Request([1, 2, 3], 5, Sampling(0.0)), 32)


def test_close_cancels_what_is_left():
    engine = Engine(loaded(tiny()), context_length=32, max_batch=1)
    events = []
    engine.submit(Request([1, 2], max_tokens=3), events.append)
    engine.close()
    assert events == [Event(None, "cancelled")]
    with pytest.raises(EngineBusy, match="shutting down"):
        engine.submit(Request([1, 2], max_tokens=3), events.append)


@pytest.mark.parametrize("encoding,mixed", [("none", True), ("none", False), ("rope", True), ("alibi", True)])
def test_chunked_prefill_changes_no_token(encoding, mixed):
    """Prompts prefilled 8 tokens at a time while other rows decode give the tokens one-at-a-time decoding
    gives (greedy and seeded), and a prompt's scores those of a whole prefill: chunks inside the decode
    steps' own forward (mixed steps, the default model's) or as calls between the steps (mixed_prefill off,
    and the position encodings, which never mix)."""
    model, L = tiny(encoding), 64
    settings = [Sampling(temperature=0.0), Sampling(1.0, 50, 0.9), Sampling(temperature=0.0), Sampling(0.8, 20, 1.0)]
    requests = [Request(p, max_tokens=12, sampling=s, seed=i)
                for i, (p, s) in enumerate(zip(prompts([30, 5, 41, 17]), settings))]
    expected = [one_at_a_time(model, r, L) for r in requests]
    order = []
    with Engine(loaded(model), context_length=L, max_batch=3, prefill_chunk=8, mixed_prefill=mixed) as engine:
        assert engine.mixed_prefill == (mixed and encoding == "none")
        for name in ("_prefill_chunk", "_step"):
            method = getattr(engine, name)
            setattr(engine, name, lambda *a, method=method, name=name: (order.append((name, a)), method(*a))[1])
        outputs, _ = staggered(engine, requests, gap_tokens=2)
        scored = Request(prompts([29])[0], max_tokens=0, sampling=Sampling(0.0), logprobs=2, score_prompt=True)
        busy = Request(prompts([3], seed=5)[0], max_tokens=40, sampling=Sampling(0.0))
        events = []
        started = threading.Event()
        engine.submit(busy, lambda e: started.set())  # the scored prompt joins while a row decodes
        assert started.wait(30)
        engine.submit(scored, events.append)
        deadline = time.monotonic() + 30
        while not (events and events[-1].finish_reason) and time.monotonic() < deadline:
            time.sleep(0.01)
    assert outputs == expected
    if engine.mixed_prefill:  # every chunk of the 41- and 29-token prompts ran inside a decode step,
        mixed_chunks = [a[0][1] for name, a in order if name == "_step" and a and a[0] is not None]
        assert len(mixed_chunks) >= 8 and max(mixed_chunks) == 8
        assert 5 in mixed_chunks  # the 29-token prompt's last 5 too: a prompt that began in the steps ends there
    else:
        chunks = "".join("c" if name == "_prefill_chunk" else "s" for name, _ in order)
        assert "cscsc" in chunks  # a long prompt's chunks alternate with the other rows' decode steps
    with torch.no_grad():
        whole = torch.log_softmax(model(torch.tensor([scored.prompt])).float()[0], dim=-1)
    expected_scores = whole[:-1].gather(1, torch.tensor(scored.prompt[1:])[:, None]).view(-1)
    got = torch.tensor([lp for lp, _ in events[0].prompt])
    assert len(got) == len(scored.prompt) - 1 and torch.allclose(got, expected_scores, atol=1e-5)


def test_a_mixed_step_gives_a_decode_step_and_a_chunk_prefill():
    """The model's mixed step (rows 0 .. D-1 decode one token each while a prompt chunk continues, or starts,
    another row's sequence, in one forward) gives the logits, the keys and values and the slot positions
    that the decode step and then the chunk's prefill give as two calls."""
    model, L = tiny(), 64
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(1, TINY["vocabulary_size"], (n,), generator=g) for n in (5, 9, 3)]
    chunk = torch.randint(1, TINY["vocabulary_size"], (30,), generator=g)

    def cache_with(chunk_row_holds: int):
        cache = model.setup_cache(4, L)
        for row, tokens in enumerate(rows + [chunk[:chunk_row_holds]]):
            if len(tokens):
                cache.rows = slice(row, row + 1)
                model(tokens[None], input_pos=torch.arange(len(tokens)))
        cache.rows = None
        return cache

    tokens, positions = torch.tensor([[7], [8], [9]]), torch.tensor([[5], [9], [3]])
    for start, D in ((10, 4), (0, 3)):  # continue row 3 (a dummy for it inside the chunk), or start it
        with torch.inference_mode():
            cache = cache_with(start)
            cache.rows = slice(0, 3)
            decoded = model(tokens, input_pos=positions)[:, -1]
            cache.rows = slice(3, 4)
            prefilled = model(chunk[None, start : start + 12], input_pos=torch.arange(start, start + 12))
            cache.rows = None
            apart = [(kv.k.clone(), kv.v.clone()) for kv in cache.layers], cache.slot_pos.clone()

            cache = cache_with(start)
            cache.mixed = (D, 3)
            step = [7, 8, 9, 0][:D]
            idx = torch.cat([torch.tensor(step), chunk[start : start + 12]])[None]
            logits = model(idx, input_pos=torch.cat([torch.tensor([5, 9, 3, start][:D]), torch.arange(start, start + 12)]))
            cache.mixed = None
        assert torch.allclose(logits[0, :3], decoded, atol=1e-5)  # (the batch shapes differ: last bits may)
        assert torch.allclose(logits[0, D:], prefilled[0], atol=1e-5)
        assert torch.equal(cache.slot_pos, apart[1])
        for kv, (k, v) in zip(cache.layers, apart[0]):
            assert torch.allclose(kv.k, k, atol=1e-6) and torch.allclose(kv.v, v, atol=1e-6)


def test_without_the_prefix_cache_requests_one_after_another_take_the_lowest_row():
    """With nothing kept for reuse, a request takes the lowest free row, so an eager step (the rows up to the
    highest in use) stays one row wide; it used to walk up every row that had held something."""
    rows = []
    with Engine(loaded(tiny()), context_length=64, max_batch=4, prefix_cache=False) as engine:
        join = engine._join
        engine._join = lambda ticket: (rows.append(ticket.row), join(ticket))[1]
        for prompt in prompts([5, 7, 6, 9]):
            engine.generate(Request(prompt, max_tokens=3, sampling=Sampling(temperature=0.0)), timeout=30)
    assert rows == [0, 0, 0, 0]


def test_prefix_caching_reuses_rows_and_changes_no_token():
    """Prompts that share a system prefix, a chat's next turn (its prompt holds the last answer), and a
    request arriving while another with its prefix decodes (the keys copied from that busy row): the rows'
    kept keys are reused, and every answer (greedy, seeded) is what one-at-a-time decoding gives."""
    model, L = tiny(), 96
    system = prompts([40], seed=5)[0]
    first = Request(system + [3, 4, 5], max_tokens=10, sampling=Sampling(temperature=0.0))
    answer = one_at_a_time(model, first, L)
    follow_up = Request(system + [3, 4, 5] + answer + [7, 8], max_tokens=10, sampling=Sampling(temperature=0.0))
    shared = [Request(system + tail, max_tokens=12, sampling=s, seed=i)
              for i, (tail, s) in enumerate(zip(prompts([6, 1, 9, 3], seed=9),
                                                [Sampling(0.0), Sampling(1.0, 50, 0.9), Sampling(0.0), Sampling(0.7)]))]
    wrapping = Request(system, max_tokens=70, sampling=Sampling(temperature=0.0))  # 40 + 70 > 96: its ring wraps
    requests = [first, follow_up, *shared, wrapping, Request(system + [9], 5, Sampling(temperature=0.0))]
    expected = [one_at_a_time(model, r, L) for r in requests]
    with Engine(loaded(model), context_length=L, max_batch=2) as engine:
        sequential = [engine.generate(r)[0] for r in requests[:2]]
        # the follow-up read the first's row: its prompt and its answer but the last token (sampled, never fed)
        assert engine.cached_tokens == len(first.prompt) + len(answer) - 1
        outputs, _ = staggered(engine, requests[2:], gap_tokens=3)  # arriving while others decode
        cached = engine.cached_tokens
    assert sequential + outputs == expected
    assert cached >= len(first.prompt) + len(answer) - 1 + 4 * len(system)
    with Engine(loaded(model), context_length=L, max_batch=2, prefix_cache=False) as engine:
        assert [engine.generate(r)[0] for r in requests[:2]] == expected[:2] and engine.cached_tokens == 0


def test_a_prompts_short_last_chunk_leaves_the_chunk_size_alone():
    """The controller sizes the next mixed chunk from a step that ran the size it chose; a long prompt's last
    piece, cut short by the prompt's end, measures nothing (it would send the next long prompt back to 8)."""
    engine = Engine(loaded(tiny()), context_length=256, max_batch=2)
    engine._decode_step = lambda chunk: None  # a step that takes no time: the chunk could grow (at most 1.5x)
    engine._step_seconds, engine._mixed_next = 0.02, 96
    engine._step((None, 5))
    assert engine._mixed_next == 96
    engine._step((None, 96))
    assert engine._mixed_next == 144


def submitted_together(engine, requests, timeout=60):
    """Submit every request before the engine's thread looks (each Engine.submit from one callback, or before
    start()): they are admitted in one go. Returns a function that waits and gives their tokens."""
    outputs, done = [[] for _ in requests], [threading.Event() for _ in requests]
    for i, request in enumerate(requests):
        engine.submit(request, lambda e, i=i: outputs[i].append(e.token) if e.token is not None else done[i].set())

    def wait():
        assert all(d.wait(timeout) for d in done)
        return outputs
    return wait


def test_requests_arriving_together_share_one_prefill():
    """The n choices of one request (one prompt, seeds s, s + 1, ...) and a request whose prompt extends it,
    arriving together: the first prefills the prompt, the others wait for it and copy its keys (all but the
    last token, whose logits start each answer), also when the prompt joins in mixed steps beside a decoding
    row. Every answer is one-at-a-time decoding's."""
    model, L = tiny(), 96
    prompt = prompts([45], seed=3)[0]
    requests = [Request(prompt, 10, Sampling(1.0, 50, 0.9), seed=i) for i in range(4)]
    requests.append(Request(prompt + [5, 6], 8, Sampling(temperature=0.0)))
    expected = [one_at_a_time(model, r, L) for r in requests]
    engine = Engine(loaded(model), context_length=L, max_batch=5)
    wait = submitted_together(engine, requests)
    with engine:
        assert wait() == expected
    assert engine.prompt_tokens == 4 * 45 + 47 and engine.cached_tokens == 3 * 44 + 45  # 45 + 1 + 1 + 1 + 2 computed
    busy = Request(prompts([5], seed=8)[0], 30, Sampling(temperature=0.0))
    choices = requests[:3]
    with Engine(loaded(model), context_length=L, max_batch=4, prefill_chunk=8) as engine:
        waits = []
        arrived = threading.Event()

        def emit(event):
            if not arrived.is_set():  # the busy row's first token: the three choices arrive, from its callback
                arrived.set()
                waits.append(submitted_together(engine, choices))
        engine.submit(busy, emit)
        assert arrived.wait(30)
        assert waits[0]() == expected[:3]
        assert engine.cached_tokens == 2 * 44 and engine.mixed_prefill


def test_a_prefix_is_copied_from_a_busy_row():
    """A fresh engine: the second request's free row holds nothing, the first's busy row holds the shared
    prefix, whose keys are copied over; both answers are one-at-a-time decoding's."""
    model, L = tiny("rope"), 64
    system = prompts([30], seed=6)[0]
    requests = [Request(system + [1, 2], 20, Sampling(temperature=0.0)), Request(system + [4], 8, Sampling(1.0), seed=3)]
    expected = [one_at_a_time(model, r, L) for r in requests]
    with Engine(loaded(model), context_length=L, max_batch=2) as engine:
        outputs, _ = staggered(engine, requests, gap_tokens=4)
        assert engine.cached_tokens == len(system) and engine.prompt_tokens == 30 + 2 + 30 + 1
    assert outputs == expected


def test_a_failing_prefill_chunk_ends_its_request_and_the_engine_goes_on():
    """An error while prefilling a prompt (out of memory on a long one, say) ends that request with "error";
    the engine thread lives on and serves the next request."""
    model = tiny()
    with Engine(loaded(model), context_length=32, max_batch=2) as engine:
        engine._prefill_chunk = failing_on(1, engine._prefill_chunk, "out of memory (simulated)")
        assert engine.generate(Request([1, 2, 3], 5, Sampling(0.0)), timeout=60)[1] == "error"
        tokens, reason = engine.generate(Request([1, 2, 3], 5, Sampling(0.0)), timeout=60)
        assert engine.running and reason == "length"
        assert tokens == one_at_a_time(model, Request([1, 2, 3], 5, Sampling(0.0)), 32)


def test_forbidden_ids_are_never_sampled():
    """Ids the tokenizer cannot decode (cl100k_base's gaps) never come out, greedy or sampled."""
    model = tiny()
    plain = one_at_a_time(model, Request([1, 2, 3], 12, Sampling(0.0)), 32)
    banned = sorted(set(plain))[:2]
    with Engine(loaded(model), context_length=32, max_batch=2, forbidden=banned) as engine:
        for sampling, seed in ((Sampling(0.0), None), (Sampling(1.5, 500, 1.0), 3)):
            tokens = engine.generate(Request([1, 2, 3], 12, sampling, seed), timeout=60)[0]
            assert not set(tokens) & set(banned) and len(tokens) == 12


@pytest.mark.slow  # a fresh interpreter: over a second
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the OpenMP pause is called on Linux only")
def test_starting_an_engine_on_the_cpu_ends_the_callers_openmp_workers():
    """The caller's idle OpenMP team would make libgomp wake the engine's workers through the kernel (every CPU
    forward of the engine 1.5x slower on 2 cores): Engine.start() ends it. A fresh interpreter, so the count of
    its threads is its own."""
    script = textwrap.dedent("""
        import os, torch
        from engine import release_openmp_threads
        torch.set_num_threads(2)
        torch.ones(4_000_000).add_(1)  # a parallel kernel: the calling thread's team of two now exists
        before = len(os.listdir("/proc/self/task"))
        assert release_openmp_threads()
        print(before, len(os.listdir("/proc/self/task")))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, after = map(int, out.stdout.split())
    assert after == before - 1  # the one worker of the team of two has ended


def test_a_long_row_beside_short_ones_attends_over_its_own_span():
    """A decode step whose rows hold sequences of very different lengths splits them into two groups, each over
    its own span (KVCache.split): the logits are those of one span for all, and the engine's tokens those of
    one-at-a-time decoding."""
    model, L = tiny(), 512
    requests = [Request(p, max_tokens=10, sampling=Sampling(temperature=0.0)) for p in prompts([300, 5, 7])]
    expected = [one_at_a_time(model, r, L) for r in requests]
    splits = []
    with Engine(loaded(model), context_length=L, max_batch=3) as engine:
        split = engine._split
        engine._split = lambda rows, span: (splits.append(split(rows, span)), splits[-1])[1]
        outputs, _ = staggered(engine, requests, gap_tokens=1)
    assert outputs == expected
    assert (1, 512, 64) in splits  # row 0 over its 512 slots, rows 1 and 2 over 64

    with torch.inference_mode():  # the model alone: split or not, the same logits
        cache = model.setup_cache(3, L)
        for row, prompt in enumerate(prompts([300, 5, 7])):
            cache.rows = slice(row, row + 1)
            model(torch.tensor([prompt]), input_pos=torch.arange(len(prompt)))
        cache.rows, cache.span = None, 512
        step = torch.tensor([[3], [4], [5]]), torch.tensor([[300], [5], [7]])
        whole = model(step[0], input_pos=step[1])
        for row, position in enumerate((300, 5, 7)):
            cache.slot_pos[row, position] = -1  # undo the step's writes
        cache.split = (1, 512, 64)
        split_logits = model(step[0], input_pos=step[1])
    assert torch.allclose(whole, split_logits, atol=1e-5)
