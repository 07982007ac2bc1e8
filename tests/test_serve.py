"""serve.py: the OpenAI-compatible server in this process on a free loopback port, talked to with the
official openai package and raw HTTP, on the certain model (tests/helpers.py): its chat LoRA answers
"yes." then <|im_end|>, its base writes free letters and never ends, so every token count and finish
reason below is what it is on any CPU."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

import generate
import serve
from conftest import fails_with_one_line
from data import load_encoding
from engine import Engine, EngineBusy, Request
from generate import Decoder, Sampler, Sampling, decode_text, load_for_inference
from helpers import CHAT_ANSWER
from test_engine import failing_on

openai = pytest.importorskip("openai")

CONTEXT = 256


def client(server, **kwargs):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0,
                         timeout=30, **kwargs)


def started(loaded, settings, **engine_args):
    """An engine and the app on it, serving on a free loopback port until the with block ends."""
    engine = Engine(loaded, **{"context_length": CONTEXT, "max_batch": 4, **engine_args})  # started by with
    server = serve.BackgroundServer(serve.create_app(engine, loaded, settings))
    server.engine, server.loaded = engine, loaded
    return engine, server


@pytest.fixture(scope="module")
def chat_server(certain):
    loaded = load_for_inference(certain.base, torch.device("cpu"), certain.lora)
    engine, server = started(loaded, serve.Settings("tiny-chat", max_tokens=64))
    server.checkpoints = (certain.base, certain.lora)
    with engine, server:
        yield server


@pytest.fixture(scope="module")
def base_server(certain):
    loaded = load_for_inference(certain.base, torch.device("cpu"))
    engine, server = started(loaded, serve.Settings("tiny-base", max_tokens=4000))
    with engine, server:
        yield server


def greedy(server, prompt: list[int], max_tokens: int = 64) -> str:
    """What generate.py's decoder answers to these prompt ids at temperature 0, on a copy of the model."""
    loaded = load_for_inference(server.checkpoints[0], torch.device("cpu"), server.checkpoints[1])
    decoder = Decoder(loaded.model, CONTEXT, 1, Sampling(temperature=0.0), Sampler(torch.device("cpu"), 0), False)
    tokens = generate.generate(decoder, prompt, loaded.stop, max_tokens)
    return decode_text(loaded.encoding, tokens[:-1] if tokens[-1] in loaded.stop else tokens)


def healthy(server, timeout=10.0) -> dict:
    """/health once the engine has no request left (a cancelled row leaves before the next step)."""
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(server.url + "/health", timeout=10).json()
        if (health["active"], health["waiting"]) == (0, 0) or time.monotonic() > deadline:
            assert health["status"] == "ok"
            return health
        time.sleep(0.02)


# ----------------------------------------------------------------------------- the API through the openai package


def test_chat_completion_plain_and_streamed(chat_server):
    c = client(chat_server)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say apple."}]
    done = c.chat.completions.create(model="tiny-chat", messages=messages, temperature=0)
    assert done.object == "chat.completion" and done.model == "tiny-chat"
    choice, prompt = done.choices[0], generate.render_prompt(chat_server.loaded.chat, messages)
    answer = greedy(chat_server, prompt)
    assert choice.message.role == "assistant" and choice.message.content == answer == CHAT_ANSWER
    assert choice.finish_reason == "stop"  # at <|im_end|>, which is not in the text
    assert done.usage.prompt_tokens == len(prompt) and done.usage.completion_tokens == len(answer)  # byte tokens
    assert done.usage.total_tokens == len(prompt) + len(answer)

    chunks = list(c.chat.completions.create(model="tiny-chat", messages=messages, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(chunk.object == "chat.completion.chunk" and chunk.id == chunks[0].id for chunk in chunks)
    pieces = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert pieces == list(answer)  # one chunk per (byte) token, as they are generated
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == done.usage.model_dump()
    assert [ch.usage for ch in chunks[:-1]] == [None] * (len(chunks) - 1)  # counted once, as OpenAI does
    plain = list(c.chat.completions.create(model="tiny-chat", messages=messages, temperature=0, stream=True))
    assert [ch.usage is not None for ch in plain] == [False] * (len(plain) - 1) + [True]  # on the finish chunk
    assert plain[-1].choices[0].finish_reason == "stop" and plain[-1].usage.model_dump() == done.usage.model_dump()


def test_multi_turn_and_content_parts(chat_server):
    c = client(chat_server)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "river."}]},
                {"role": "assistant", "content": "yes."}, {"role": "user", "content": "Again."}]
    done = c.chat.completions.create(model="x", messages=messages, temperature=0)
    rendered = [{"role": "user", "content": "Say river."}] + messages[1:]
    assert done.choices[0].message.content == greedy(chat_server, generate.render_prompt(chat_server.loaded.chat,
                                                                                         rendered))


def test_completion_models_and_the_page(base_server):
    c = client(base_server)
    done = c.completions.create(model="tiny-base", prompt="The ", max_tokens=12, temperature=0)
    assert done.object == "text_completion" and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 12 and done.usage.prompt_tokens == 1 + len("The ")  # end-of-text first
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny-base", prompt="The ", max_tokens=12, temperature=0, stream=True))
    assert streamed == done.choices[0].text and streamed
    assert [m.id for m in c.models.list().data] == ["tiny-base"]
    assert c.models.retrieve("tiny-base").id == "tiny-base"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.models.retrieve("gpt-4o")
    page = httpx.get(base_server.url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<title>LightGPT</title>" in page.text and "http" not in page.text.split("<script>")[1]  # nothing remote
    assert healthy(base_server)["chat"] is False


@pytest.mark.parametrize("chat", [False, True])
def test_a_seed_gives_generate_py_text(certain, base_server, chat_server, chat, capsys):
    """The same seed and sampling settings: the text generate.py --seed prints, token for token."""
    server = chat_server if chat else base_server
    base = certain.base
    extra = ["--lora_path", certain.lora] if chat else []
    prompt = "Say stone." if chat else "The "
    for seed in (1, 2):
        tokens = generate.main(generate.parse_args(["--checkpoint_path", base, *extra, "--device", "cpu",
                                                    "--prompt", prompt, "--max_tokens", "30", "--seed", str(seed),
                                                    "--temperature", "1.5", "--top_k", "40"]))[0]
        printed = capsys.readouterr().out
        expected = decode_text(server.loaded.encoding, tokens)
        assert printed == expected + "\n"
        settings = dict(model="x", max_tokens=30, seed=seed, temperature=1.5, extra_body={"top_k": 40})
        if chat:
            done = client(server).chat.completions.create(messages=[{"role": "user", "content": prompt}], **settings)
            text = done.choices[0].message.content
        else:
            done = client(server).completions.create(prompt=prompt, **settings)
            text = done.choices[0].text
        assert text == expected and done.usage.completion_tokens == len(tokens)


def test_stop_strings(base_server):
    c = client(base_server)
    settings = dict(model="x", prompt="The ", max_tokens=40, seed=3)
    full = c.completions.create(**settings).choices[0].text
    stop = full[12:14]
    cut = c.completions.create(**settings, stop=["\x00zz", stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 40
    streamed = c.completions.create(**settings, stop=stop, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == full[: full.index(stop)]


def test_answer_holds_back_what_may_begin_a_stop_string():
    encoding = load_encoding("bytes")
    answer = generate.TextStream(encoding, ("END", "é!"))
    out = [answer.add(t) for t in encoding.encode_ordinary("abE")]
    assert out == ["a", "b", ""]  # "E" may begin "END"
    assert answer.add(encoding.encode_ordinary("x")[0]) == "Ex"
    out = [answer.add(t) for t in "é!".encode()]  # two bytes of é: no character until the second
    assert out == ["", "", ""] and answer.stopped and answer.text == "abEx"
    answer = generate.TextStream(encoding, ("END",))
    assert [answer.add(t) for t in encoding.encode_ordinary("xEN")] == ["x", "", ""] and answer.finish() == "EN"


# ----------------------------------------------------------------------------- continuous batching


def test_batched_serving_equals_serving_one_at_a_time(base_server, chat_server):
    """Requests of different lengths arriving at different times, decoded together, get the tokens each
    gets alone: at temperature 0, and sampled with a seed of their own."""
    jobs = [("The ", 16, None), ("A class ", 5, 1), ("x", 24, None), ("The return statement ", 11, 2),
            ("import ", 14, 3), ("Say apple.", 12, None), ("Say tiger.", 9, 4)]

    def ask(job):
        prompt, n, seed = job
        settings = dict(model="x", max_tokens=n, temperature=0 if seed is None else 1.0, seed=seed)
        if prompt.startswith("Say"):
            done = client(chat_server).chat.completions.create(messages=[{"role": "user", "content": prompt}],
                                                               **settings)
            return done.choices[0].message.content, done.usage.completion_tokens
        done = client(base_server).completions.create(prompt=prompt, **settings)
        return done.choices[0].text, done.usage.completion_tokens

    alone = [ask(job) for job in jobs]
    assert healthy(base_server) and healthy(chat_server)

    def staggered(i):
        time.sleep(0.01 * i)
        return ask(jobs[i])

    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(staggered, range(len(jobs))))
    assert together == alone


# ----------------------------------------------------------------------------- errors and limits

GOOD = {"model": "x", "messages": [{"role": "user", "content": "Say apple."}]}
BAD_REQUESTS = [
    (b"{not json", None, "not valid JSON"),
    (b"[1, 2]", None, "not an object"),
    (b"", None, "not valid JSON"),
    ({**GOOD, "messages": []}, "messages", "at least one message"),
    ({"model": "x"}, "messages", "Field required"),
    ({**GOOD, "messages": "hi"}, "messages", "valid list"),
    ({**GOOD, "messages": [{"role": "user", "content": 5}]}, "messages[0].content", "valid string"),
    ({**GOOD, "messages": [{"role": "function", "content": "x"}]}, "messages[0].role", "not supported"),
    ({**GOOD, "messages": [{"role": "tool", "content": "x", "tool_call_id": "c1"}]}, "messages[0].tool_call_id",
     "answers a tool call of an earlier assistant message"),
    ({**GOOD, "messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls",
     "only an assistant message"),
    ({**GOOD, "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]}, "messages[1].tool_calls",
     "not the JSON text of an object"),
    ({**GOOD, "messages": [{"role": "user", "content": "x", "tool_call_id": "c1"}]}, "messages[0].tool_call_id",
     "only a tool message"),
    ({**GOOD, "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[" * 100_000 + "]" * 100_000}}]}]},
     "messages[1].tool_calls", "not the JSON text of an object"),  # nested past Python's recursion: a 400, not a 500
    ({**GOOD, "messages": [{"role": "user"}]}, "messages[0].content", "needs content"),
    ({**GOOD, "messages": [{"role": "user", "content": "x" * 400}]}, "messages", "no room for an answer"),
    ({**GOOD, "max_tokens": 0}, "max_tokens", "at least 1"),
    ({**GOOD, "max_completion_tokens": -5}, "max_completion_tokens", "at least 1"),
    ({**GOOD, "max_completion_tokens": 0, "max_tokens": 5}, "max_completion_tokens", "at least 1"),
    ({**GOOD, "max_tokens": "10"}, "max_tokens", "valid integer"),
    ({**GOOD, "temperature": "hot"}, "temperature", "valid number"),
    ({**GOOD, "temperature": 3}, "temperature", "less than or equal to 2"),
    ({**GOOD, "top_p": 0}, "top_p", "greater than 0"),
    ({**GOOD, "top_k": 0}, "top_k", "greater than or equal to 1"),
    ({**GOOD, "stream": "yes"}, "stream", "valid boolean"),
    ({**GOOD, "n": 0}, "n", "from 1 to 16"),
    ({**GOOD, "n": 17}, "n", "from 1 to 16"),
    ({**GOOD, "seed": -1}, "seed", "greater than or equal to 0"),
    ({**GOOD, "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({**GOOD, "stop": ""}, "stop", "must not be empty"),
    ({**GOOD, "top_logprobs": 3}, "top_logprobs", "with logprobs true"),
    ({**GOOD, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "from 0 to 20"),
    ({**GOOD, "logprobs": 2}, "logprobs", "true or false"),
]


def test_a_body_over_the_limit_is_refused_with_413(chat_server):
    huge = json.dumps({**GOOD, "messages": [{"role": "user", "content": "x" * serve.MAX_BODY}]}).encode()
    with httpx.Client(base_url=chat_server.url, timeout=30) as http:
        for content in (huge, iter([huge[i:i + 2**20] for i in range(0, len(huge), 2**20)])):  # sized, then chunked
            r = http.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
            assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert healthy(chat_server)


def test_on_loopback_only_loopback_host_names_are_answered(base_server):
    """A page elsewhere that rebinds its own name to 127.0.0.1 sends its own name as Host: refused."""
    app = serve.create_app(base_server.engine, base_server.loaded, serve.Settings("tiny", hosts=serve.LOOPBACK))
    with serve.BackgroundServer(app) as server:
        ok = httpx.get(server.url + "/health", timeout=10)
        for host in (f"localhost:{server.port}", "127.0.0.1", f"[::1]:{server.port}"):
            assert httpx.get(server.url + "/health", headers={"Host": host}, timeout=10).status_code == 200
        r = httpx.post(server.url + "/v1/completions", headers={"Host": f"evil.example:{server.port}"},
                       json={"prompt": "a", "max_tokens": 2}, timeout=10)
    assert ok.status_code == 200
    assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
    assert [serve.host_name(h) for h in ("127.0.0.1:80", "[::1]:8000", "localhost", "[::1]")] == \
        ["127.0.0.1", "::1", "localhost", "::1"]


def test_health_says_so_when_the_engine_does_not_run(certain):
    loaded = load_for_inference(certain.base, torch.device("cpu"))
    engine, server = started(loaded, serve.Settings("tiny-base"))
    with server:  # the engine never started
        r = httpx.get(server.url + "/health", timeout=10)
    assert r.status_code == 503 and r.json()["status"] == "error" and "not running" in r.json()["error"]


def test_bad_requests_get_openai_errors(chat_server):
    with httpx.Client(base_url=chat_server.url, timeout=10) as http:
        for body, param, message in BAD_REQUESTS:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = http.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (body, r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
            assert error["param"] == param and message in error["message"], (body, error)
    assert healthy(chat_server)


def test_more_errors_and_the_server_stays_healthy(base_server, chat_server):
    c = client(base_server)
    with pytest.raises(openai.BadRequestError, match="use /v1/completions"):
        c.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="no room for an answer"):
        c.completions.create(model="x", prompt="x" * CONTEXT)
    assert [c.index for c in c.completions.create(model="x", prompt=["a", "b"], max_tokens=2).choices] == [0, 1]
    r = httpx.get(base_server.url + "/v1/nothing", timeout=10)
    assert r.status_code == 404 and "Not Found" in r.json()["error"]["message"]
    assert httpx.get(base_server.url + "/v1/completions", timeout=10).status_code == 405
    assert c.completions.create(model="x", prompt=["The "], max_tokens=3, seed=0).usage.completion_tokens == 3
    assert healthy(base_server) and healthy(chat_server)


def cancels(engine, monkeypatch) -> list:
    """The tickets the server cancels on this engine, recorded as it does."""
    cancelled, real = [], engine.cancel
    monkeypatch.setattr(engine, "cancel", lambda ticket: (cancelled.append(ticket), real(ticket))[1])
    return cancelled


def test_a_client_that_leaves_mid_stream_frees_its_row(base_server, monkeypatch):
    cancelled = cancels(base_server.engine, monkeypatch)
    body = {"model": "x", "prompt": "The ", "max_tokens": 4000, "stream": True, "seed": 0}
    with httpx.Client(timeout=10) as http:
        with http.stream("POST", base_server.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            first = [next(lines) for _ in range(6)]  # three events, each a data line and a blank line
            assert all(json.loads(line[6:])["choices"][0]["finish_reason"] is None for line in first[::2])
            assert base_server.engine.active + base_server.engine.waiting == 1
    health = healthy(base_server)
    assert (health["active"], health["waiting"]) == (0, 0) and len(cancelled) == 1
    assert cancelled[0].generated < 4000


def test_a_client_that_leaves_before_a_plain_answer_frees_its_row(base_server, monkeypatch):
    cancelled = cancels(base_server.engine, monkeypatch)
    body = json.dumps({"model": "x", "prompt": "The ", "max_tokens": 4000, "seed": 0}).encode()
    with socket.create_connection(("127.0.0.1", base_server.port), timeout=10) as raw:
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 10
        while base_server.engine.active == 0 and time.monotonic() < deadline:
            time.sleep(0.005)  # until it decodes
    health = healthy(base_server)
    assert (health["active"], health["waiting"]) == (0, 0) and len(cancelled) == 1
    assert cancelled[0].generated < 4000


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_at_once_frees_its_row(base_server, monkeypatch, stream):
    """Gone before reading a byte of the answer."""
    cancelled = cancels(base_server.engine, monkeypatch)
    body = json.dumps({"model": "x", "prompt": "The ", "max_tokens": 4000, "seed": 0, "stream": stream}).encode()
    with socket.create_connection(("127.0.0.1", base_server.port), timeout=10) as raw:
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    health = healthy(base_server)
    assert (health["active"], health["waiting"]) == (0, 0) and len(cancelled) == 1
    assert cancelled[0].generated < 4000


def test_a_full_engine_answers_503(certain):
    loaded = load_for_inference(certain.base, torch.device("cpu"))
    engine, server = started(loaded, serve.Settings("tiny"), max_batch=1, max_waiting=1)
    with engine, server:
        tickets = []
        for _ in range(2):  # fill every row and the queue with requests that run for a while; again once the
            with pytest.raises(EngineBusy):  # engine has had time to move the first into its row
                for _ in range(4):
                    tickets.append(engine.submit(Request([loaded.eot], 4000), lambda event: None))
            time.sleep(0.2)
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "a"}, timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "server_error" and "busy" in r.json()["error"]["message"]
        for ticket in tickets:
            engine.cancel(ticket)
        assert healthy(server)
        assert client(server).completions.create(model="x", prompt="a", max_tokens=2, seed=0).usage.completion_tokens == 2


def test_an_api_key_guards_the_api_but_not_the_page(base_server):
    app = serve.create_app(base_server.engine, base_server.loaded, serve.Settings("tiny", api_key="s3cret"))
    with serve.BackgroundServer(app) as server:
        with pytest.raises(openai.AuthenticationError, match="Bearer"):
            client(server).models.list()
        with pytest.raises(openai.AuthenticationError):
            client(server, api_key="wrong").completions.create(model="x", prompt="a")
        assert client(server, api_key="s3cret").completions.create(model="x", prompt="a", max_tokens=2).choices
        assert httpx.get(server.url + "/", timeout=10).status_code == 200
        assert httpx.get(server.url + "/health", timeout=10).json()["auth"] is True


def test_command_line_errors_are_one_line(certain, capsys, monkeypatch):
    base = certain.base
    fails_with_one_line(capsys, serve, ["--port", "70000"], "--port", "expected a port in [0, 65535]")
    fails_with_one_line(capsys, serve, ["--max_batch", "0"], "--max_batch", "positive integer")
    fails_with_one_line(capsys, serve, ["--top_p", "1.5"], "--top_p")
    fails_with_one_line(capsys, serve, ["--checkpoint_path", "/nonexistent.pt", "--device", "cpu"], "/nonexistent.pt")
    fails_with_one_line(capsys, serve, ["--checkpoint_path", base, "--device", "cpu", "--api_key", ""], "--api_key")
    with serve.listening_socket("127.0.0.1", 0) as taken:
        port = str(taken.getsockname()[1])
        fails_with_one_line(capsys, serve, ["--checkpoint_path", base, "--device", "cpu", "--port", port],
                            f"--host 127.0.0.1 --port {port}: cannot listen there")
    monkeypatch.setenv(serve.API_KEY_ENV, "from-env")
    assert serve.parse_args([]).api_key == "from-env" and serve.parse_args([]).host == "127.0.0.1"
    assert "from-env" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- load


@pytest.mark.slow
def test_a_bounded_load_is_answered_or_refused_and_the_server_stays_healthy(certain):
    """200 requests from 16 clients (streaming and not, some malformed) on a small engine: each gets its
    answer, its 400 or a clean 503, and the server is healthy and idle afterwards."""
    loaded = load_for_inference(certain.base, torch.device("cpu"))
    engine, server = started(loaded, serve.Settings("tiny", max_tokens=24), max_batch=4, max_waiting=6)
    outcomes, lock = [], threading.Lock()

    def one(i):
        body = {"model": "x", "prompt": f"The {i} ", "max_tokens": 8 + i % 17, "stream": i % 2 == 0}
        if i % 10 == 9:
            body["max_tokens"] = 0
        with httpx.Client(timeout=30) as http:
            r = http.post(server.url + "/v1/completions", json=body)
            if r.status_code == 200 and body["stream"]:
                events = [line for line in r.text.split("\n\n") if line]
                last = json.loads(events[-2][6:])
                assert events[-1] == "data: [DONE]" and last["choices"][0]["finish_reason"] in ("stop", "length")
                assert 0 <= last["usage"]["completion_tokens"] <= body["max_tokens"]
            elif r.status_code == 200:
                assert 0 <= r.json()["usage"]["completion_tokens"] <= body["max_tokens"]
            else:
                assert r.json()["error"]["message"]
        with lock:
            outcomes.append(r.status_code)

    with engine, server:
        start = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(one, range(200)))
        assert time.monotonic() - start < 120
        assert len(outcomes) == 200 and set(outcomes) <= {200, 400, 503}
        assert outcomes.count(400) == 20 and outcomes.count(200) > 20
        health = healthy(server)
        assert (health["active"], health["waiting"]) == (0, 0)
        assert client(server).completions.create(model="x", prompt="a", max_tokens=2, seed=0).usage.completion_tokens == 2


# ----------------------------------------------------------------------------- log-probabilities (lm-eval's use)


def model_logprobs(server, ids: list[int]) -> torch.Tensor:
    """log_softmax of the served model's logits over `ids` in one plain forward, (len(ids), V)."""
    with torch.no_grad():
        return torch.log_softmax(server.loaded.model(torch.tensor([ids])).float()[0], dim=-1)


def test_echo_with_logprobs_scores_the_prompt_as_the_model_does(base_server):
    """echo + logprobs + max_tokens 0 (how lm-eval scores a text): every prompt token's log-probability after
    end-of-text and the ones before it, equal to one forward of the model; nothing generated."""
    encoding = base_server.loaded.encoding
    text = "The cat sat on the mat. 🙂"
    ids = encoding.encode_ordinary(text)
    r = httpx.post(base_server.url + "/v1/completions", timeout=30,
                   json={"prompt": text, "echo": True, "logprobs": 2, "max_tokens": 0}).json()
    (choice,) = r["choices"]
    assert choice["text"] == text and choice["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) and "".join(lp["tokens"][:-1]).startswith("The cat sat")
    expected = model_logprobs(base_server, [256] + ids)[:-1].gather(1, torch.tensor(ids)[:, None]).view(-1)
    assert torch.allclose(torch.tensor(lp["token_logprobs"]), expected, atol=1e-5)
    assert all(len(top) <= 2 and max(top.values()) >= v - 1e-6 for top, v in zip(lp["top_logprobs"], lp["token_logprobs"]))
    assert lp["text_offset"][:3] == [0, 1, 2]


def test_token_id_prompts_in_a_list_and_generated_logprobs(base_server):
    """A list of token-id prompts: one choice each, in order; the first token has no log-probability (nothing
    predicted it); the generated token follows with its own, the greedy one at temperature 0."""
    prompts = [[256, 84, 104, 101], [256, 65, 32, 98, 105, 114, 100]]
    r = httpx.post(base_server.url + "/v1/completions", timeout=30,
                   json={"prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1]
    for prompt, choice in zip(prompts, r["choices"]):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(prompt) + 1 and lp["token_logprobs"][0] is None
        full = model_logprobs(base_server, prompt)
        expected = full[:-1].gather(1, torch.tensor(prompt[1:])[:, None]).view(-1)
        assert torch.allclose(torch.tensor(lp["token_logprobs"][1:-1]), expected, atol=1e-5)
        assert abs(lp["token_logprobs"][-1] - full[-1].max().item()) <= 1e-5  # greedy: the likeliest
        assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())
    plain = httpx.post(base_server.url + "/v1/completions", timeout=30,
                       json={"prompt": "The", "logprobs": 0, "max_tokens": 3, "temperature": 0}).json()["choices"][0]
    assert len(plain["logprobs"]["tokens"]) == 3 and plain["logprobs"]["top_logprobs"] == [{}, {}, {}]
    stopped = plain["finish_reason"] == "stop"  # the stop token is listed (its text is not in the answer)
    assert "".join(plain["logprobs"]["tokens"]) == plain["text"] + ("<|endoftext|>" if stopped else "")
    assert healthy(base_server)


@pytest.mark.parametrize("body, param, message", [
    ({"prompt": "x", "logprobs": 6}, "logprobs", "from 0 to 5"),
    ({"prompt": "x", "logprobs": True}, "logprobs", "from 0 to 5"),
    ({"prompt": "x", "echo": True, "stream": True}, "stream", "not supported with echo"),
    ({"prompt": []}, "prompt", "an empty list"),
    ({"prompt": [[256, 1], []]}, "prompt[1]", "no token ids"),
    ({"prompt": [256, 99999]}, "prompt", "token ids must be in 0 .. 256"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "at least 1"),
    ({"prompt": ["x" * (CONTEXT - 1), "y"], "echo": True, "logprobs": 1, "max_tokens": 0}, None, None),
])
def test_bad_completion_bodies_get_openai_errors(base_server, body, param, message):
    r = httpx.post(base_server.url + "/v1/completions", json=body, timeout=30)
    if param is None:  # a prompt of the whole context is scored when nothing is generated (max_tokens 0)
        assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["tokens"]) == CONTEXT - 1
        return
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error


def test_the_tokenizer_endpoints_lm_eval_finds(base_server):
    """vLLM's /tokenizer_info, /tokenize and /detokenize: the encoding's ids (special-token text read as the
    token, as Hugging Face tokenizers read it) and back."""
    info = httpx.get(base_server.url + "/tokenizer_info", timeout=10).json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == CONTEXT
    tokens = httpx.post(base_server.url + "/tokenize", json={"prompt": "<|endoftext|>hé", "add_special_tokens": False},
                        timeout=10).json()["tokens"]
    assert tokens == [256, 104, 195, 169]
    assert httpx.post(base_server.url + "/detokenize", json={"tokens": tokens[1:]}, timeout=10).json()["prompt"] == "hé"
    r = httpx.post(base_server.url + "/detokenize", json={"tokens": [300]}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


# ----------------------------------------------------------------------------- every field honoured or refused

# OpenAI's parameters (API reference, chat completions and legacy completions), each with a value that asks
# for something: "honoured" fields are implemented (their effects are tested above and in test_engine.py),
# "harmless" ones are bookkeeping (accepted, unused), the rest must be refused with a 400 naming them.
CHAT_FIELDS = {
    "model": ("x", "honoured"), "max_tokens": (3, "honoured"), "max_completion_tokens": (3, "honoured"),
    "temperature": (0.5, "honoured"), "top_p": (0.5, "honoured"), "stop": ("x", "honoured"), "seed": (1, "honoured"),
    "n": (2, "honoured"), "stream": (True, "honoured"), "stream_options": ({"include_usage": True}, "honoured"),
    "user": ("u", "harmless"), "metadata": ({"k": "v"}, "harmless"), "store": (False, "harmless"),
    "service_tier": ("auto", "harmless"), "safety_identifier": ("u", "harmless"), "prompt_cache_key": ("k", "harmless"),
    "parallel_tool_calls": (False, "harmless"),
    "frequency_penalty": (0.5, "honoured"), "presence_penalty": (0.5, "honoured"), "logit_bias": ({"65": 5}, "honoured"),
    "logprobs": (True, "honoured"), "top_logprobs": (2, "honoured"),
    "response_format": ({"type": "json_object"}, "honoured"),
    "tools": ([{"type": "function", "function": {"name": "f", "parameters": {}}}], "honoured"),
    "tool_choice": ("required", "refused"),  # without tools: an error
    "functions": ([{"name": "f", "parameters": {}}], "refused"), "function_call": ({"name": "f"}, "refused"), "modalities": (["text", "audio"], "refused"),
    "audio": ({"voice": "alloy", "format": "wav"}, "refused"), "prediction": ({"type": "content", "content": "x"}, "refused"),
    "reasoning_effort": ("low", "refused"), "verbosity": ("low", "refused"), "web_search_options": ({}, "refused"),
}
COMPLETION_FIELDS = {
    "model": ("x", "honoured"), "max_tokens": (3, "honoured"), "temperature": (0.5, "honoured"), "top_p": (0.5, "honoured"),
    "stop": ("x", "honoured"), "seed": (1, "honoured"), "n": (2, "honoured"), "stream": (True, "honoured"),
    "stream_options": ({"include_usage": True}, "honoured"), "echo": (True, "honoured"), "logprobs": (1, "honoured"),
    "user": ("u", "harmless"),
    "frequency_penalty": (0.5, "honoured"), "presence_penalty": (0.5, "honoured"), "logit_bias": ({"65": 5}, "honoured"),
    "best_of": (2, "refused"), "suffix": ("x", "refused"),
}


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_every_openai_field_is_honoured_or_refused(chat_server, endpoint):
    """Walks OpenAI's parameter lists: a field this server does not implement is a 400 naming it, never a
    200 that ignored it; so is a field OpenAI does not have. The values that ask for nothing (a zero
    penalty, no tools, text output, ...) are accepted."""
    path, fields, base = (("/v1/chat/completions", CHAT_FIELDS, {"messages": [{"role": "user", "content": "hi"}]})
                          if endpoint == "chat" else ("/v1/completions", COMPLETION_FIELDS, {"prompt": "hi"}))
    with httpx.Client(base_url=chat_server.url, timeout=30) as http:
        for name, (value, kind) in fields.items():
            body = {**base, "max_tokens": 3, name: value}
            if name in ("stream_options", "top_logprobs"):  # each needs the other field on
                body[{"stream_options": "stream", "top_logprobs": "logprobs"}[name]] = True
            if name == "tools":
                body["tool_choice"] = "required"
            r = http.post(path, json=body)
            if kind == "refused":
                assert r.status_code == 400 and r.json()["error"]["param"] == name, (name, r.text)
            else:
                assert r.status_code == 200, (name, r.text)
        nothing = {"frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}}
        nothing |= {"tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "modalities": ["text"]
                    } if endpoint == "chat" else {"best_of": 1, "suffix": ""}
        assert http.post(path, json={**base, "max_tokens": 3, **nothing}).status_code == 200
        r = http.post(path, json={**base, "min_tokens": 4})  # vLLM's, not implemented here
        assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens"
        assert "unrecognized request argument" in r.json()["error"]["message"]
        if endpoint == "chat":
            r = http.post(path, json={"messages": [{"role": "user", "content": "hi", "name": "ann"}]})
            assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].name"
    assert healthy(chat_server)


def test_a_deeply_nested_body_is_the_clients_error(base_server, capfd):
    """JSON nested deeper than Python recurses (100,000 levels) is a 400, not a 500 with a traceback in the log."""
    capfd.readouterr()
    deep = "[" * 100_000 + "]" * 100_000
    for content in (deep, '{"prompt": "x", "metadata": ' + '{"a": ' * 100_000 + "1" + "}" * 100_000 + "}"):
        r = httpx.post(base_server.url + "/v1/completions", content=content.encode(), timeout=30,
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"], r.text
    assert healthy(base_server)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "RecursionError" not in err, err


def test_a_client_that_leaves_while_sending_is_one_log_line(base_server, capfd):
    """A body cut off by the client's close: one line in the log, no traceback, and the server serves on."""
    host, port = base_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
        time.sleep(0.3)  # the server is reading the body
    deadline = time.monotonic() + 10
    err = ""
    while "left while sending" not in err and time.monotonic() < deadline:
        time.sleep(0.05)
        err += capfd.readouterr().err
    assert err.count("the client left while sending its body") == 1 and "Traceback" not in err, err
    assert client(base_server).completions.create(model="x", prompt="The ", max_tokens=2).choices[0].text


@pytest.mark.slow  # waits out a 1-second read deadline: the slow tier (CI runs it)
def test_slow_clients_are_dropped_while_others_are_served(base_server, monkeypatch, capfd):
    """Connections that trickle a header line now and then, or declare a body they never send, are closed at
    the read deadline (uvicorn alone waits forever); requests sent whole are answered meanwhile."""
    monkeypatch.setattr(serve, "READ_TIMEOUT", 1.0)
    host, port = base_server.url.removeprefix("http://").split(":")
    slow = [socket.create_connection((host, int(port)), timeout=10) for _ in range(20)]
    for i, sock in enumerate(slow):
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n" +
                     (b"Content-Length: 100\r\n\r\n{" if i % 2 else b""))  # half: headers unfinished; half: body
    started = time.monotonic()
    answered = client(base_server).completions.create(model="x", prompt="The ", max_tokens=2)
    assert answered.choices[0].text and time.monotonic() - started < 1.0  # served while they wait
    closed = 0
    for sock in slow:
        try:
            sock.sendall(b"X-Trickle: 1\r\n")  # one more line, as a trickling client sends
            sock.settimeout(5)
            closed += sock.recv(1024) == b""  # the server closed it (no answer: it never had a request)
        except ConnectionResetError:  # reset by the server (a timeout is a failure: it was never closed)
            closed += 1
        finally:
            sock.close()
    assert closed == len(slow) and time.monotonic() - started < 8
    assert capfd.readouterr().err.count("no whole request within 1 s") == len(slow)
    assert healthy(base_server)


def test_connections_past_the_limit_are_answered_503_at_once(certain, monkeypatch):
    """With MAX_CONNECTIONS open (here 4: three clients holding half-sent requests and a fourth), a request is
    answered 503 at once, not queued behind them; once they go, requests are served again."""
    monkeypatch.setattr(serve, "MAX_CONNECTIONS", 4)
    engine, server = started(load_for_inference(certain.base, torch.device("cpu")), serve.Settings("tiny-base"))
    with engine, server:
        host, port = server.url.removeprefix("http://").split(":")
        held = [socket.create_connection((host, int(port)), timeout=10) for _ in range(3)]
        for sock in held:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers unfinished
        time.sleep(0.2)  # the server has accepted them
        body = {"prompt": "The ", "max_tokens": 2}
        assert httpx.post(server.url + "/v1/completions", json=body, timeout=10).status_code == 503
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 10
        while (r := httpx.post(server.url + "/v1/completions", json=body, timeout=10)).status_code == 503:
            assert time.monotonic() < deadline  # (the server notices the closes as it reads them)
            time.sleep(0.05)
        assert r.status_code == 200 and r.json()["choices"][0]["text"]


def test_penalties_and_logit_bias_reach_the_engine(base_server):
    """logit_bias pushes a token to certainty; the penalties and min-p are taken and checked."""
    c = client(base_server)
    forced = c.completions.create(model="x", prompt="The ", max_tokens=5, temperature=0, logit_bias={"120": 100})
    assert forced.choices[0].text == "xxxxx"
    free = c.completions.create(model="x", prompt="The ", max_tokens=12, temperature=0).choices[0].text
    assert len(set(free)) < len(free)  # the plain greedy answer repeats letters
    for penalty in ("presence_penalty", "frequency_penalty"):  # each pushes the answer to letters it has not used
        fresh = c.completions.create(model="x", prompt="The ", max_tokens=12, temperature=0,
                                     **{penalty: 2.0}).choices[0].text
        assert len(set(fresh)) > len(set(free)), (penalty, free, fresh)
    for body, param in (({"logit_bias": {"abc": 1}}, "logit_bias"), ({"logit_bias": {"65": 101}}, "logit_bias"),
                        ({"logit_bias": {"300": 1}}, "logit_bias"), ({"presence_penalty": 2.5}, "presence_penalty"),
                        ({"min_p": 1}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty")):
        r = httpx.post(base_server.url + "/v1/completions", json={"prompt": "x", **body}, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    assert healthy(base_server)


def sse_events(response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def test_n_choices_are_the_requests_with_the_derived_seeds(base_server, chat_server):
    """n=4 with seed s gives the four answers of requests seeded s, s+1, s+2, s+3, streamed or not; the usage
    counts the prompt once."""
    c = client(base_server)
    together = c.completions.create(model="x", prompt="The ", max_tokens=8, n=4, seed=7, temperature=1.0)
    alone = [c.completions.create(model="x", prompt="The ", max_tokens=8, seed=7 + i, temperature=1.0).choices[0].text
             for i in range(4)]
    assert [ch.index for ch in together.choices] == [0, 1, 2, 3] and [ch.text for ch in together.choices] == alone
    assert len(set(alone)) > 1 and together.usage.prompt_tokens == 5 and together.usage.completion_tokens == 32
    events = sse_events(httpx.post(base_server.url + "/v1/completions", timeout=30, json={
        "prompt": "The ", "max_tokens": 8, "n": 4, "seed": 7, "temperature": 1.0, "stream": True}))
    streamed = ["".join(e["choices"][0]["text"] for e in events if e["choices"][0]["index"] == i) for i in range(4)]
    assert streamed == alone and events[-1]["usage"]["completion_tokens"] == 32
    listed = c.completions.create(model="x", prompt=["The ", "A "], max_tokens=3, n=2, seed=1)
    assert [ch.text for ch in listed.choices][:2] == [ch.text for ch in c.completions.create(
        model="x", prompt="The ", max_tokens=3, n=2, seed=1).choices]  # by prompt, then by n
    chat = client(chat_server).chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}], n=3)
    assert [ch.message.content for ch in chat.choices] == [CHAT_ANSWER] * 3
    assert healthy(base_server) and healthy(chat_server)


def test_chat_logprobs_are_the_models_streamed_or_not(chat_server):
    """logprobs + top_logprobs on chat: each answer token's log-probability is log_softmax of the model's
    forward (<= 1e-5), the likeliest listed first; streamed chunks carry the same entries, in order."""
    body = {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True, "top_logprobs": 2, "temperature": 0}
    r = httpx.post(chat_server.url + "/v1/chat/completions", json=body, timeout=30).json()
    content = r["choices"][0]["logprobs"]["content"]
    chat = load_for_inference(*chat_server.checkpoints[:1], torch.device("cpu"), chat_server.checkpoints[1])
    prompt = generate.encode_prompt(chat, "Hi")
    answer = chat.encoding.encode_ordinary(CHAT_ANSWER)
    assert "".join(e["token"] for e in content) == CHAT_ANSWER and [e["bytes"] for e in content] == [[t] for t in answer]
    with torch.no_grad():
        logprobs = torch.log_softmax(chat.model(torch.tensor([prompt + answer])).float()[0], dim=-1)
    expected = logprobs[len(prompt) - 1 : -1].gather(1, torch.tensor(answer)[:, None]).view(-1)
    assert torch.allclose(torch.tensor([e["logprob"] for e in content]), expected, atol=1e-5)
    assert all(len(e["top_logprobs"]) == 2 and e["top_logprobs"][0]["logprob"] >= e["top_logprobs"][1]["logprob"]
               for e in content)
    events = sse_events(httpx.post(chat_server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=30))
    streamed = [e for ev in events for e in ((ev["choices"][0].get("logprobs") or {}).get("content") or [])]
    assert streamed == content
    plain = {k: v for k, v in body.items() if k not in ("logprobs", "top_logprobs")}
    done = httpx.post(chat_server.url + "/v1/chat/completions", json=plain, timeout=30).json()
    assert done["choices"][0]["logprobs"] is None


def test_streamed_completion_logprobs_are_the_whole_ones(base_server):
    body = {"prompt": "The ", "logprobs": 2, "max_tokens": 6, "temperature": 0}
    whole = httpx.post(base_server.url + "/v1/completions", json=body, timeout=30).json()["choices"][0]["logprobs"]
    events = sse_events(httpx.post(base_server.url + "/v1/completions", json={**body, "stream": True}, timeout=30))
    parts = [e["choices"][0]["logprobs"] for e in events if e["choices"][0]["logprobs"]]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for p in parts for x in p[key]] == whole[key]


def test_metrics_count_what_was_served_and_the_access_log_has_a_line_each(certain, capfd):
    """/metrics in Prometheus' format on a fresh server: requests by path and status, prompt and generated
    tokens, one first-token time per answer and one gap per later token; with access_log, one line per
    request on stderr."""
    from prometheus_client.parser import text_string_to_metric_families

    loaded = load_for_inference(certain.base, torch.device("cpu"))
    engine, server = started(loaded, serve.Settings("tiny-base", access_log=True))
    with engine, server:
        c = client(server)
        answers = [c.completions.create(model="x", prompt="The ", max_tokens=m, seed=0) for m in (3, 5)]
        assert httpx.post(server.url + "/v1/completions", json={"prompt": "x", "n": 0}, timeout=10).status_code == 400
        text = httpx.get(server.url + "/metrics", timeout=10)
    assert text.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text.text) for s in family.samples}
    assert samples[("lightgpt_requests_total", (("path", "/v1/completions"), ("status", "200")))] == 2
    assert samples[("lightgpt_requests_total", (("path", "/v1/completions"), ("status", "400")))] == 1
    generated = sum(a.usage.completion_tokens for a in answers)
    assert samples[("lightgpt_generated_tokens_total", ())] == generated == 8
    assert samples[("lightgpt_prompt_tokens_total", ())] == sum(a.usage.prompt_tokens for a in answers)
    assert samples[("lightgpt_time_to_first_token_seconds_count", ())] == 2
    assert samples[("lightgpt_inter_token_latency_seconds_count", ())] == generated - 2
    assert samples[("lightgpt_active_rows", ())] == 0 and samples[("lightgpt_decode_steps", ())] > 0
    assert samples[("lightgpt_waiting_requests", ())] == 0
    # the second answer's prompt was read from the first's row, all but its last token
    prompt = answers[1].usage.prompt_tokens
    assert samples[("lightgpt_prefix_cache_hit_tokens", ())] == engine.cached_tokens == prompt - 1 > 0
    assert samples[("lightgpt_prefix_cache_hit_ratio", ())] == pytest.approx((prompt - 1) / (2 * prompt))
    lines = [line for line in capfd.readouterr().err.splitlines() if "/v1/completions" in line]
    assert len(lines) == 3 and [line.split()[4] for line in lines] == ["200", "200", "400"], lines


def test_without_prometheus_client_metrics_say_how_to_install(certain, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    loaded = load_for_inference(certain.base, torch.device("cpu"))
    engine, server = started(loaded, serve.Settings("tiny-base"))
    with engine, server:
        r = httpx.get(server.url + "/metrics", timeout=10)
        assert client(server).completions.create(model="x", prompt="The ", max_tokens=2).choices[0].text
    assert r.status_code == 503 and "pip install prometheus-client" in r.json()["error"]["message"]


def test_review_defects_of_the_new_fields(base_server, certain, monkeypatch):
    """Found in review, each failed before its fix: a non-ASCII digit key in logit_bias (500), ids the tokenizer
    cannot decode (500), n>1 streams sending the usage once per choice, a failed choice leaving the others
    decoding, text_offset counting partial characters' labels, and echo with max_tokens 0 without logprobs."""
    url = base_server.url
    r = httpx.post(url + "/v1/completions", json={"prompt": "x", "logit_bias": {"²": 1}}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"
    events = sse_events(httpx.post(url + "/v1/completions", timeout=30, json={
        "prompt": "The ", "max_tokens": 5, "n": 4, "seed": 1, "stream": True}))
    assert sum("usage" in e for e in events) == 1 and events[-1]["usage"]["completion_tokens"] == 20
    lp = httpx.post(url + "/v1/completions", timeout=30, json={
        "prompt": "é, ok", "echo": True, "logprobs": 0, "max_tokens": 0}).json()["choices"][0]["logprobs"]
    assert lp["text_offset"] == [0, 0, 1, 2, 3, 4] and lp["tokens"][0] == "bytes:\\xc3"
    echo = httpx.post(url + "/v1/completions", json={"prompt": "Hello", "echo": True, "max_tokens": 0}, timeout=30)
    assert echo.status_code == 200 and echo.json()["choices"][0]["text"] == "Hello"
    holes = generate.Loaded(base_server.loaded.model, _Holed(base_server.loaded.encoding, {65}), 256).undecodable
    assert holes == {65}


class _Holed:
    """An encoding that cannot decode some ids, as cl100k_base cannot decode 100256 and 100261-100275."""

    def __init__(self, encoding, holes):
        self.encoding, self.holes = encoding, holes

    def decode_single_token_bytes(self, token):
        if token in self.holes:
            raise KeyError(token)
        return self.encoding.decode_single_token_bytes(token)

    def __getattr__(self, name):  # everything else is the encoding's
        return getattr(self.encoding, name)


def test_ids_the_tokenizer_lacks_are_refused_and_a_failed_choice_frees_the_others(certain, monkeypatch):
    loaded = load_for_inference(certain.base, torch.device("cpu"))
    loaded = generate.Loaded(loaded.model, _Holed(loaded.encoding, {65}), loaded.eot)
    engine, server = started(loaded, serve.Settings("holed"))
    with engine, server:
        for body, param in (({"prompt": [256, 65]}, "prompt"), ({"prompt": "x", "logit_bias": {"65": 1}}, "logit_bias")):
            r = httpx.post(server.url + "/v1/completions", json=body, timeout=10)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        r = httpx.post(server.url + "/detokenize", json={"tokens": [65]}, timeout=10)
        assert r.status_code == 400
        monkeypatch.setattr(engine, "_join", failing_on(3, engine._join, "simulated"))
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "The ", "n": 4, "max_tokens": 3000}, timeout=60)
        assert r.status_code in (500, 503)
        assert healthy(server, timeout=20)["active"] == 0  # the other choices were cancelled, not left decoding


def test_an_internal_error_is_counted_and_logged_as_a_500(certain, monkeypatch, capfd):
    from prometheus_client.parser import text_string_to_metric_families

    loaded = load_for_inference(certain.base, torch.device("cpu"))
    engine, server = started(loaded, serve.Settings("tiny-base", access_log=True))

    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(serve, "completion_prompts", broken)
    with engine, server:
        assert httpx.post(server.url + "/v1/completions", json={"prompt": "x"}, timeout=10).status_code == 500
        text = httpx.get(server.url + "/metrics", timeout=10).text
    counts = {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text)
              for s in f.samples if s.name == "lightgpt_requests_total"}
    assert counts[(("path", "/v1/completions"), ("status", "500"))] == 1
    assert any(line.endswith("s") and " 500 " in line for line in capfd.readouterr().err.splitlines())
