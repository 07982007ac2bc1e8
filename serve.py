"""Serve a LightGPT model over HTTP with OpenAI's API, and a chat page.

    python serve.py --checkpoint_path ./checkpoints/base.pt --lora_path ./checkpoints/lora_instruction.pt
    python serve.py --checkpoint_path ./checkpoints/checkpoint.pt --device cpu --port 8080   # a base model
    LIGHTGPT_API_KEY=secret python serve.py --checkpoint_path ./checkpoints/chat.pt --host 0.0.0.0

Endpoints in OpenAI's shape: POST /v1/chat/completions (a chat model: the messages rendered in ChatML by
chat.render_prompt, the renderer training used), POST /v1/completions (text continued as generate.py
continues a prompt: end-of-text first), GET /v1/models, GET /health, and the chat page at / (web/chat.html).
`stream: true` sends server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.

Every request is a row of one batch (engine.py): a single decode step advances all of them, each at its
own position in the KV cache; new requests join and finished ones leave between steps (continuous
batching). Listens on 127.0.0.1 unless --host says otherwise; --api_key (or LIGHTGPT_API_KEY) makes
/v1/* ask for `Authorization: Bearer <key>`. A bad request gets OpenAI's error shape and a 4xx status.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import hmac
import json
import os
import socket
import sys
import threading
import time
import uuid
from functools import partial
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from fastapi import APIRouter, FastAPI, Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from chat import ROLES, TOOL_ROLE, render_prompt, tool_call_text
from common import (
    ArgumentParser,
    UserError,
    add_model_path_args,
    add_system_args,
    compile_enabled,
    non_negative_int,
    positive_int,
    resolve_device,
    run_main,
)
from engine import Engine, EngineBusy, Event, Request
from files import os_reason
from serving_metrics import METRICS_INSTALL, ServerMetrics, server_metrics
from structured import GrammarError, Grammars, tool_call_schema, tool_calls
from generate import Loaded, Sampling, TextStream, add_sampling_args, base_prompt, decode_text, load_for_inference
from run_config import add_config_args, parse_with_config

PAGE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web", "chat.html")
API_KEY_ENV = "LIGHTGPT_API_KEY"
MAX_STOPS = 4  # stop strings per request, as OpenAI allows
LOOPBACK = ("127.0.0.1", "localhost", "::1")
SHUTDOWN_GRACE = 5  # seconds open streams get to finish after Ctrl-C
MAX_BODY = 4 * 2**20  # bytes of a request body: far more than any context's prompt, far less than a memory's


# ----------------------------------------------------------------------------- settings and errors


@dataclass(frozen=True)
class Settings:
    """What the server answers with when a request leaves a field out, and its limits."""
    model_name: str
    max_tokens: int = 1000  # a request's default, and the most it may ask for
    sampling: Sampling = field(default_factory=Sampling)
    api_key: str | None = None
    hosts: tuple[str, ...] | None = None  # the Host names requests may carry (None: any); loopback names when
    # listening on loopback, so that a web page cannot reach the server by rebinding its own name to 127.0.0.1
    access_log: bool = False  # one line per request on stderr (main turns it on; tests and bench.py do not)


def host_name(header: str) -> str:
    """The name in a Host header, without its port: "127.0.0.1:8000" -> "127.0.0.1", "[::1]:8000" -> "::1"."""
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": error_body(self.message, self.kind, self.param, self.code)}, self.status,
                            headers=headers)


def error_body(message: str, kind: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"message": message, "type": kind, "param": param, "code": code}


# ----------------------------------------------------------------------------- request bodies
# Every field is honoured or refused: strict types ("stream": "yes" or "temperature": "0.5" is an error, not
# a guess), an unknown field is a 400 naming it (as OpenAI answers), and each OpenAI field this server does
# not implement is accepted only at the value that asks for nothing (REFUSED_UNLESS), else a 400 naming it.
# Bookkeeping fields change nothing OpenAI would do differently for the answer and are accepted (Common).


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # OpenAI's padding of stream chunks: nothing to pad here


class ContentPart(_Body):
    type: str
    text: str | None = None


class Message(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    name: Any = None  # refused (REFUSED_MESSAGE): the ChatML renderer has no participant names
    tool_calls: Any = None
    tool_call_id: Any = None
    refusal: Any = None
    audio: Any = None
    function_call: Any = None


class Common(_Body):
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)  # extensions (vLLM's names): OpenAI has no top-k, min-p or repetition penalty
    min_p: float | None = Field(None, ge=0, lt=1)
    repetition_penalty: float | None = Field(None, gt=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as a string, OpenAI's JSON) -> bias in [-100, 100]
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None
    # bookkeeping OpenAI keeps for the caller, nothing the answer depends on: accepted, unused
    user: str | None = None
    metadata: dict | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None


class ChatBody(Common):
    messages: list[Message]
    max_completion_tokens: int | None = None
    top_logprobs: int | None = None
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None  # an answer makes at most one tool call either way
    functions: Any = None
    function_call: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None


class CompletionBody(Common):
    prompt: str | list[str] | list[int] | list[list[int]]  # text, or token ids (lm-eval sends those)
    echo: bool | None = False
    best_of: Any = None
    suffix: Any = None


REFUSED_UNLESS = {  # field: (values that ask for nothing, what the 400 says is missing)
    "functions": (([],), "function calls are not implemented"),
    "function_call": (("none", "auto"), "function calls are not implemented"),
    "modalities": ((["text"],), "only text"),
    "audio": ((), "audio is not supported"),
    "prediction": ((), "predicted outputs are not supported"),
    "reasoning_effort": ((), "this is not a reasoning model"),
    "verbosity": ((), "not supported"),
    "web_search_options": ((), "web search is not supported"),
    "best_of": ((1,), "only best_of 1 (n candidates are not scored and ranked)"),
    "suffix": (("",), "insertion (a suffix after the completion) is not supported"),
}
REFUSED_MESSAGE = {"name": "participant names are not supported by the ChatML renderer",
                   "refusal": "not supported", "audio": "audio is not supported",
                   "function_call": "function calls are not implemented (tool_calls are)"}


def refuse_unhonoured(body: _Body) -> None:
    """A 400 naming the first field set to something this server does not do (REFUSED_UNLESS)."""
    for name, (nothing, why) in REFUSED_UNLESS.items():
        value = getattr(body, name, None)
        if value is not None and not any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in nothing):
            raise APIError(400, f"{name}: {why}; this server does not honour {value!r}", name)
    for i, message in enumerate(getattr(body, "messages", None) or []):
        for name, why in REFUSED_MESSAGE.items():
            if getattr(message, name) is not None:
                raise APIError(400, f"messages[{i}].{name}: {why}", f"messages[{i}].{name}")


def _param(loc) -> str:
    """A pydantic error location as OpenAI names a parameter: messages[0].content. Union members'
    tags (str, list[str], ...) are not parameters."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not any(c in part for c in "[]-") and part not in ("str", "int", "float", "bool", "none"):
            out += f".{part}" if out else part
    return out


async def parse_body(request: HTTPRequest, model: type[_Body]) -> _Body:
    declared = request.headers.get("content-length", "")
    too_large = APIError(413, f"the request body is over {MAX_BODY // 2**20} MiB", code="request_too_large")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise too_large  # refused before it is read
    raw = bytearray()
    try:
        async for part in request.stream():  # a body without a length (chunked) is counted as it comes
            raw += part
            if len(raw) > MAX_BODY:
                raise too_large
    except ClientDisconnect:  # the client left while sending: nobody to answer, one log line
        log_line(f"{request.method} {request.url.path}: the client left while sending its body")
        raise ClientGone from None
    try:
        data = json.loads(raw)
    except ValueError:  # also UnicodeDecodeError
        raise APIError(400, "the request body is not valid JSON") from None
    except RecursionError:  # the client's error, not the server's: JSON nested deeper than Python recurses
        raise APIError(400, "the request body is nested too deeply to read") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body is a JSON {type(data).__name__}, not an object")
    try:
        body = model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = _param(first["loc"])
        if first["type"] == "extra_forbidden":  # OpenAI's answer to a field it does not know
            raise APIError(400, f"{param}: unrecognized request argument (this server takes the OpenAI fields it "
                                f"implements; see docs/serving.md)", param) from None
        raise APIError(400, f"{param or 'body'}: {first['msg']}", param or None) from None
    refuse_unhonoured(body)
    return body


# ----------------------------------------------------------------------------- from a body to a Request


def sampling_of(body: Common, s: Served) -> Sampling:
    """The request's sampling: each field it leaves out takes the server's setting (--temperature, ...)."""
    d = s.settings.sampling
    chosen = {name: getattr(d, name) if getattr(body, name) is None else getattr(body, name)
              for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                           "frequency_penalty")}
    return Sampling(**chosen, logit_bias=logit_bias_of(body.logit_bias, s))


def logit_bias_of(bias: dict[str, float] | None, s: Served) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias, {"token id": bias in [-100, 100]}, as Sampling takes it (sorted pairs)."""
    out = {}
    for key, value in (bias or {}).items():
        if not (key.isascii() and key.isdigit() and is_token(s, int(key))):
            raise APIError(400, f"logit_bias: {key!r} is not a token id (0 .. {vocabulary(s) - 1})", "logit_bias")
        if not -100 <= value <= 100:
            raise APIError(400, f"logit_bias: the bias of {key} must be in [-100, 100], got {value}", "logit_bias")
        out[int(key)] = float(value)
    return tuple(sorted(out.items()))


def stops_of(body: Common) -> tuple[str, ...]:
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    if len(stop) > MAX_STOPS:
        raise APIError(400, f"stop: at most {MAX_STOPS} stop strings, got {len(stop)}", "stop")
    if any(s == "" for s in stop):
        raise APIError(400, "stop: a stop string must not be empty", "stop")
    return tuple(stop)


def max_tokens_of(requested: int | None, name: str, settings: Settings) -> int:
    if requested is None:
        return settings.max_tokens
    if requested <= 0:
        raise APIError(400, f"{name}: must be at least 1, got {requested}", name)
    return min(requested, settings.max_tokens)  # the server's --max_tokens caps every answer


MAX_LOGPROBS = 5  # the likeliest tokens a completion may ask for at each position, as OpenAI allows
MAX_TOP_LOGPROBS = 20  # the same for chat completions' top_logprobs


def check_common(body: Common) -> None:
    if isinstance(body, ChatBody):
        if body.logprobs is not None and not isinstance(body.logprobs, bool):
            raise APIError(400, f"logprobs: true or false for chat completions, got {body.logprobs!r}", "logprobs")
        if body.top_logprobs is not None and (not body.logprobs or not 0 <= body.top_logprobs <= MAX_TOP_LOGPROBS):
            raise APIError(400, f"top_logprobs: an integer from 0 to {MAX_TOP_LOGPROBS}, with logprobs true, got "
                                f"{body.top_logprobs!r}", "top_logprobs")
    if isinstance(body, CompletionBody) and body.logprobs is not None and (
            isinstance(body.logprobs, bool) or not 0 <= body.logprobs <= MAX_LOGPROBS):
        raise APIError(400, f"logprobs: an integer from 0 to {MAX_LOGPROBS} (the likeliest tokens to list at each "
                            f"position), got {body.logprobs!r}", "logprobs")


def completion_prompts(body: CompletionBody, s: Served) -> list[tuple[list[int], bool]]:
    """Each prompt's ids and whether it was text: text is read as generate.py reads a prompt (end-of-text
    first); token ids are taken as they are, each checked against the vocabulary."""
    prompt, single = body.prompt, isinstance(body.prompt, str) or (body.prompt and isinstance(body.prompt[0], int))
    if single:
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt: an empty list", "prompt")
    out = []
    for i, p in enumerate(prompt):
        where = "prompt" if single else f"prompt[{i}]"
        if isinstance(p, str):
            out.append((base_prompt(s.loaded, p), True))
            continue
        if not p:
            raise APIError(400, f"{where}: no token ids", where)
        if not all(is_token(s, t) for t in p):
            raise APIError(400, f"{where}: token ids must be in 0 .. {vocabulary(s) - 1}, and ids the tokenizer "
                                f"has (not {sorted(set(p) & s.loaded.undecodable)[:3] or 'out of range'})", where)
        out.append((list(p), False))
    return out


def chat_messages(body: ChatBody) -> list[dict]:
    """The messages as chat.render_prompt takes them: roles system (or OpenAI's developer), user, assistant
    or tool; content a string or a list of text parts. An assistant's tool_calls render as the JSON the model
    writes a call as (chat.tool_call_text), after its content if any; a tool message, the result of one of
    those calls (tool_call_id), as a turn of its own (<|im_start|>tool)."""
    if not body.messages:
        raise APIError(400, "messages: at least one message is needed", "messages")
    out, call_ids = [], []
    for i, m in enumerate(body.messages):
        role = "system" if m.role == "developer" else m.role
        if role not in (*ROLES, TOOL_ROLE):
            raise APIError(400, f"messages[{i}].role: {m.role!r} is not supported; use {', '.join(ROLES)} or "
                                f"{TOOL_ROLE}", f"messages[{i}].role")
        content = m.content
        if isinstance(content, list):
            if any(p.type != "text" or p.text is None for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p.text for p in content)
        if m.tool_calls is not None:
            calls = message_tool_calls(m.tool_calls, role, f"messages[{i}].tool_calls")
            call_ids += [ident for ident, _ in calls]
            content = "\n".join(([content] if content else []) + [text for _, text in calls])
        if role == TOOL_ROLE and m.tool_call_id not in call_ids:
            raise APIError(400, f"messages[{i}].tool_call_id: a tool message answers a tool call of an earlier "
                                f"assistant message ({', '.join(map(repr, call_ids)) or 'none made'}), not "
                                f"{m.tool_call_id!r}", f"messages[{i}].tool_call_id")
        if role != TOOL_ROLE and m.tool_call_id is not None:
            raise APIError(400, f"messages[{i}].tool_call_id: only a tool message answers a tool call",
                           f"messages[{i}].tool_call_id")
        if content is None:
            raise APIError(400, f"messages[{i}].content: a {role} message needs content", f"messages[{i}].content")
        out.append({"role": role, "content": content})
    return out


def message_tool_calls(calls, role: str, param: str) -> list[tuple[str, str]]:
    """An assistant message's tool_calls, OpenAI's shape checked: (id, the text the call renders as) each."""
    if role != "assistant":
        raise APIError(400, f"{param}: only an assistant message makes tool calls", param)
    shape = f'{param}: a list of {{"id": ..., "type": "function", "function": {{"name": ..., "arguments": "<JSON>"}}}}'
    if not isinstance(calls, list) or not calls:
        raise APIError(400, shape, param)
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(call, dict) and isinstance(call.get("id"), str) and call.get("type", "function") == "function"
                and isinstance(function, dict) and isinstance(function.get("name"), str)
                and isinstance(function.get("arguments"), str)):
            raise APIError(400, shape, param)
        try:
            arguments = json.loads(function["arguments"])
        except (ValueError, RecursionError):  # (JSON nested past Python's recursion limit)
            arguments = None
        if not isinstance(arguments, dict):
            raise APIError(400, f"{param}: the arguments of {function['name']!r} are not the JSON text of an "
                                f"object", param)
        out.append((call["id"], tool_call_text(function["name"], function["arguments"])))
    return out


def check_room(prompt: list[int], context_length: int, param: str, answer: bool = True) -> None:
    if len(prompt) + answer > context_length:
        raise APIError(400, f"{param}: the prompt is {len(prompt)} tokens and the context holds {context_length}, "
                            f"which leaves no room for an answer", param, "context_length_exceeded")


# ----------------------------------------------------------------------------- tokens to text


class Generation:
    """One request in the engine: the text pieces as they come, then finish_reason and usage; with the
    request's logprobs, each token's (and with score_prompt the prompt's) log-probabilities."""

    def __init__(self, engine: Engine, loaded: Loaded, request: Request, stops: tuple[str, ...],
                 metrics: ServerMetrics | None = None):
        self.engine, self.request = engine, request
        self.answer = TextStream(loaded.encoding, stops)
        self.prompt_scores: tuple | None = None  # Event.prompt: the prompt's tokens after the first
        self.scored: list[tuple[int, tuple]] = []  # (token, Event.logprob) of every token generated
        self.stop_scored: tuple[int, tuple] | None = None  # the stop token's, when one ended the answer
        self.finish_reason: str | None = None
        self.closed = False
        self.metrics = metrics  # what the tokens' times are observed in (None: nowhere)
        self.started, self.last_token = time.perf_counter(), None
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        try:
            self.ticket = engine.submit(request, self._emit)
        except EngineBusy:
            raise APIError(503, "the server is busy (every batch row and the waiting queue are taken); retry "
                                "later", code="server_busy", kind="server_error") from None
        except ValueError as e:  # what the engine refuses (the body's checks should have caught it)
            raise APIError(400, str(e)) from None

    def _emit(self, event: Event) -> None:  # on the engine's thread: hand over, never block
        with contextlib.suppress(RuntimeError):  # the event loop is closed: the server is shutting down
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    async def pieces(self) -> AsyncIterator[str]:
        """Text as it is generated; finish_reason is set once it is done. Leaving early (a client gone)
        cancels the request, which frees its batch row before the next step."""
        try:
            while True:
                event = await self.events.get()
                if event.prompt is not None:
                    self.prompt_scores = event.prompt
                    continue
                if event.logprob is not None and event.token is not None:
                    self.scored.append((event.token, event.logprob))
                elif event.logprob is not None:  # a "stop": the stop token's
                    self.stop_scored = (event.stop_token, event.logprob)
                if event.token is None:
                    reason = event.finish_reason
                    if reason not in ("stop", "length"):
                        raise APIError(503 if reason == "cancelled" else 500,
                                       f"generation ended early ({reason})", kind="server_error", code=reason)
                    self.finish_reason = reason
                    tail = self.answer.finish()
                    if tail:
                        yield tail
                    return
                self._observe()
                piece = self.answer.add(event.token)
                if self.answer.stopped:  # a stop string: its text is cut, the rest is not generated
                    self.finish_reason = "stop"
                    self.engine.cancel(self.ticket)
                if piece:
                    yield piece
                if self.finish_reason:
                    return
        finally:
            self.close()

    def _observe(self) -> None:
        """A token arrived: the time to the first, or since the one before, into the histograms."""
        now = time.perf_counter()
        if self.metrics is not None:
            if self.last_token is None:
                self.metrics.first_token.observe(now - self.started)
            else:
                self.metrics.token_gap.observe(now - self.last_token)
            self.metrics.generated_tokens.inc()
        self.last_token = now

    async def text(self) -> str:
        return "".join([piece async for piece in self.pieces()])

    @property
    def usage(self) -> dict:
        prompt, completion = len(self.request.prompt), self.answer.tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def close(self) -> None:
        """Cancel the request unless it finished: for a response that ends before reading it all."""
        if self.finish_reason is None and not self.closed:
            self.closed = True
            self.engine.cancel(self.ticket)


class EventStream(StreamingResponse):
    """Server-sent events of a Generation, whose request is cancelled once the response ends, however it
    ends: also if the response is cancelled before its generator starts, when no `finally` in the
    generator would run."""

    def __init__(self, content, generations: list[Generation]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.generations = generations

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for gen in self.generations:
                gen.close()


# ----------------------------------------------------------------------------- the app


def check_key(request: HTTPRequest, settings: Settings) -> None:
    if settings.api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
        raise APIError(401, "a valid API key is needed: send the header 'Authorization: Bearer <key>'",
                       code="invalid_api_key")


async def until_disconnected(request: HTTPRequest) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def sse(data) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


@dataclass
class Served:
    """What the handlers answer from, on app.state.served: the started engine, its model, the settings,
    the chat page and the time the server was made."""
    engine: Engine
    loaded: Loaded
    settings: Settings
    page: str
    created: int
    metrics: ServerMetrics | None = None  # None without prometheus-client
    grammars: Grammars | None = None  # structured output's tokenizer for llguidance, made on first use


def served(request: HTTPRequest) -> Served:
    return request.app.state.served


def vocabulary(s: Served) -> int:
    return s.loaded.model.config.vocabulary_size


def is_token(s: Served, token: int) -> bool:
    """An id of the vocabulary that the tokenizer decodes (Loaded.undecodable)."""
    return 0 <= token < vocabulary(s) and token not in s.loaded.undecodable


def create_app(engine: Engine, loaded: Loaded, settings: Settings) -> FastAPI:
    """The server's routes over a started engine. main runs it under uvicorn; tests and bench.py run it
    in a thread (BackgroundServer)."""
    app = FastAPI(title="LightGPT", docs_url=None, redoc_url=None, openapi_url=None)
    with open(PAGE_PATH, encoding="utf-8") as f:
        app.state.served = Served(engine, loaded, settings, f.read(), int(time.time()), server_metrics(engine))
    if settings.hosts is not None:
        app.middleware("http")(known_hosts_only)
    app.add_middleware(AccessLog, served=app.state.served)
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(ClientGone, client_gone)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, server_error)
    app.include_router(router)
    return app


class AccessLog:
    """ASGI middleware: each request counted by path and status in the metrics, and with settings.access_log
    one line on stderr once its response has ended (a stream's last chunk): client, method, path, status,
    seconds. A response that never started (the client left) counts as 499."""

    def __init__(self, app, served: Served):
        self.app, self.served = app, served

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status, logged = time.perf_counter(), [499], [False]

        def done() -> None:
            logged[0] = True
            path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
            if self.served.metrics is not None:
                self.served.metrics.requests.labels(path, str(status[0])).inc()
            if self.served.settings.access_log:
                client = scope.get("client") or ("-", 0)
                log_line(f"{client[0]} {scope['method']} {scope['path']} {status[0]} "
                         f"{time.perf_counter() - started:.3f} s")

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body") and not logged[0]:
                done()

        try:
            await self.app(scope, receive, sending)
        except BaseException as e:  # the server-error handler answers outside this middleware: a 500
            if status[0] == 499 and not isinstance(e, ClientGone):
                status[0] = 500
            raise
        finally:
            if not logged[0]:
                done()


KNOWN_PATHS = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions",
               "/tokenizer_info", "/tokenize", "/detokenize")  # metrics label these; any other path is "other"


async def known_hosts_only(request: HTTPRequest, call_next):
    hosts = served(request).settings.hosts
    name = host_name(request.headers.get("host", ""))
    if name not in hosts:
        return APIError(403, f"this server answers requests to {', '.join(hosts)} only, not to "
                             f"{name!r}", code="host_not_allowed").response()
    return await call_next(request)


async def api_error(request, e: APIError):
    return e.response({"Retry-After": "1"} if e.status == 503 else None)


async def http_error(request, e: HTTPException):  # 404, 405: in the same shape
    return JSONResponse({"error": error_body(f"{request.method} {request.url.path}: {e.detail}")}, e.status_code,
                        headers=getattr(e, "headers", None))


async def client_gone(request, e: Exception):
    return Response(status_code=499)  # no one reads it; handled here, so no traceback is logged


async def server_error(request, e: Exception):
    return JSONResponse({"error": error_body(f"internal error: {type(e).__name__}", "server_error")}, 500)


class ClientGone(Exception):
    """The client disconnected before its request was read whole."""


def log_line(text: str) -> None:
    print(f"serve.py: {text}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the routes

router = APIRouter()


@router.get("/", response_class=HTMLResponse)
async def chat_page(request: HTTPRequest):
    return HTMLResponse(served(request).page)


@router.get("/metrics")
async def metrics(request: HTTPRequest):
    """Prometheus' text format (open like /health: counts, no content)."""
    m = served(request).metrics
    if m is None:
        raise APIError(503, f"metrics need prometheus-client, which is not installed: {METRICS_INSTALL}",
                       code="metrics_unavailable", kind="server_error")
    body, content_type = m.exposition()
    return Response(body, media_type=content_type)


@router.get("/health")
async def health(request: HTTPRequest):
    s = served(request)
    engine, settings = s.engine, s.settings
    if not engine.running:  # the decode thread is gone: nothing would be answered
        return JSONResponse({"status": "error", "error": "the decoding engine is not running",
                             "last_error": engine.last_error}, 503)
    return {"status": "ok", "model": settings.model_name, "chat": s.loaded.chat is not None,
            "active": engine.active, "waiting": engine.waiting, "max_batch": engine.max_batch,
            "context_length": engine.context_length, "max_tokens": settings.max_tokens,
            "auth": settings.api_key is not None, "last_error": engine.last_error}


def model_object(s: Served) -> dict:
    return {"id": s.settings.model_name, "object": "model", "created": s.created, "owned_by": "lightgpt"}


@router.get("/v1/models")
async def models(request: HTTPRequest):
    s = served(request)
    check_key(request, s.settings)
    return {"object": "list", "data": [model_object(s)]}


@router.get("/v1/models/{model_id:path}")
async def model(request: HTTPRequest, model_id: str):
    """The one model, by its name (--model_name); any other name is OpenAI's 404."""
    s = served(request)
    check_key(request, s.settings)
    if model_id != s.settings.model_name:
        raise APIError(404, f"the model {model_id!r} does not exist; this server serves {s.settings.model_name!r}",
                       "model", "model_not_found")
    return model_object(s)


class TokenizeBody(_Body):
    model: str | None = None
    prompt: str
    add_special_tokens: bool | None = None  # accepted for vLLM's clients; nothing is ever added


class DetokenizeBody(_Body):
    tokens: list[int]


@router.get("/tokenizer_info")
async def tokenizer_info(request: HTTPRequest):
    """vLLM's tokenizer endpoints (this one, /tokenize, /detokenize): lm-eval's local-completions finds them
    and tokenizes through the server, so it needs no tokenizer files of its own."""
    s = served(request)
    check_key(request, s.settings)
    eot = token_text(s.loaded.encoding, s.loaded.eot)
    return {"tokenizer_class": "tiktoken", "eos_token": eot, "bos_token": eot, "pad_token": None,
            "model_max_length": s.engine.context_length, "vocab_size": vocabulary(s)}


@router.post("/tokenize")
async def tokenize(request: HTTPRequest):
    """A text's ids, special-token text read as the special token (as vLLM's and Hugging Face's do)."""
    s = served(request)
    check_key(request, s.settings)
    body = await parse_body(request, TokenizeBody)
    tokens = s.loaded.encoding.encode(body.prompt, allowed_special="all")
    return {"tokens": tokens, "count": len(tokens), "max_model_len": s.engine.context_length}


@router.post("/detokenize")
async def detokenize(request: HTTPRequest):
    s = served(request)
    check_key(request, s.settings)
    body = await parse_body(request, DetokenizeBody)
    if not all(is_token(s, t) for t in body.tokens):
        raise APIError(400, f"tokens: token ids must be in 0 .. {vocabulary(s) - 1}, and ids the tokenizer has",
                       "tokens")
    return {"prompt": decode_text(s.loaded.encoding, body.tokens)}


@router.post("/v1/chat/completions")
async def chat_completions(request: HTTPRequest):
    s = served(request)
    check_key(request, s.settings)
    body = await parse_body(request, ChatBody)
    if s.loaded.chat is None:
        raise APIError(400, "this is a base model with no chat template; use /v1/completions (or serve a chat "
                            "model: --lora_path, or a merged checkpoint)", "messages", "model_not_chat")
    check_common(body)
    messages = chat_messages(body)
    prompt = render_prompt(s.loaded.chat, messages)
    check_room(prompt, s.engine.context_length, "messages")
    name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    grammar = structured_grammar(s, body)
    constraint = partial(s.grammars.constraint, grammar) if grammar is not None else None
    settings = dict(max_tokens=max_tokens_of(requested, name, s.settings), sampling=sampling_of(body, s),
                    stop_tokens=frozenset(s.loaded.stop), logprobs=logprobs, constraint=constraint)
    requests = [Request(prompt, seed=seed, **settings) for seed in choice_seeds(body.seed, 1 if body.n is None else body.n)]
    return await respond(request, body, start(s, requests, stops_of(body)), chat=True)


def calls_tools(body: ChatBody) -> bool:
    """Whether the answer is a tool call: tools given and tool_choice "required" or a named function."""
    return bool(body.tools) and body.tool_choice not in (None, "none", "auto")


def may_call_tools(body: ChatBody) -> bool:
    """Whether the model chooses between text and a tool call: tools given, tool_choice "auto" or left out."""
    return bool(body.tools) and body.tool_choice in (None, "auto")


def structured_grammar(s: Served, body: ChatBody) -> str | None:
    """The grammar an answer is decoded under: a tool call's JSON, or response_format's JSON; None for text.
    A tool_choice this server cannot force, a schema that does not compile, llguidance missing: a 400."""
    tools, choice, fmt = body.tools, body.tool_choice, body.response_format
    if tools is not None and not (isinstance(tools, list) and all(
            isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools)):
        raise APIError(400, "tools: a list of {\"type\": \"function\", \"function\": {\"name\": ..., "
                            "\"parameters\": {...}}}", "tools")
    names = [t["function"]["name"] for t in tools or []]
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if choice is not None and not (choice in ("none", "auto", "required") or named in names):
        raise APIError(400, f"tool_choice: none, auto, required or {{\"type\": \"function\", \"function\": "
                            f"{{\"name\": one of {names}}}}}, got {choice!r}", "tool_choice")
    if not tools and choice not in (None, "none"):
        raise APIError(400, f"tool_choice: {choice!r} needs tools", "tool_choice")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") in ("text", "json_object", "json_schema")):
        raise APIError(400, "response_format: {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                            "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                       "response_format")
    schema, param = None, None
    if calls_tools(body) or may_call_tools(body):
        schema, param = tool_call_schema(tools, named), "tools"
    elif fmt is not None and fmt["type"] == "json_object":
        schema, param = {"type": "object"}, "response_format"
    elif fmt is not None and fmt["type"] == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise APIError(400, "response_format.json_schema: {\"name\": ..., \"schema\": {...}}",
                           "response_format")
        schema, param = spec.get("schema", {}), "response_format"
    if schema is None:
        return None
    try:
        if s.grammars is None:
            s.grammars = Grammars(s.loaded.encoding, sorted(s.loaded.stop), vocabulary(s))
        return s.grammars.text_or_call(schema) if may_call_tools(body) else s.grammars.json_schema(schema)
    except GrammarError as e:
        raise APIError(400, f"{param}: {e}", param) from None


@router.post("/v1/completions")
async def completions(request: HTTPRequest):
    s = served(request)
    check_key(request, s.settings)
    body = await parse_body(request, CompletionBody)
    check_common(body)
    prompts = completion_prompts(body, s)
    if body.stream and body.echo:
        raise APIError(400, "stream: not supported with echo; leave one of them out", "stream")
    score_only = body.echo and body.max_tokens == 0  # lm-eval's way to score a text: nothing is generated
    max_tokens = 0 if score_only else max_tokens_of(body.max_tokens, "max_tokens", s.settings)
    for i, (prompt, _) in enumerate(prompts):
        check_room(prompt, s.engine.context_length, "prompt" if len(prompts) == 1 else f"prompt[{i}]", not score_only)
    settings = dict(max_tokens=max_tokens, sampling=sampling_of(body, s),
                    stop_tokens=frozenset(s.loaded.stop), logprobs=body.logprobs,
                    score_prompt=bool(body.echo and (body.logprobs is not None or score_only)))
    seeds = choice_seeds(body.seed, 1 if body.n is None else body.n)
    requests = [Request(prompt, seed=seed, **settings) for prompt, _ in prompts for seed in seeds]
    shown = [prompt for prompt in prompts for _ in seeds]  # each choice's prompt: by prompt, then by n
    return await respond(request, body, start(s, requests, stops_of(body)), chat=False, prompts=shown)


MAX_N = 16  # choices per request (each takes a batch row)


def choice_seeds(seed: int | None, n: int) -> list[int | None]:
    """The seeds of n choices: choice i samples as a request with seed + i would (unseeded: each its own)."""
    if not 1 <= n <= MAX_N:
        raise APIError(400, f"n: from 1 to {MAX_N} choices, got {n}", "n")
    return [None] * n if seed is None else [(seed + i) % 2**63 for i in range(n)]


def start(s: Served, requests: list[Request], stops: tuple[str, ...]) -> list[Generation]:
    """The requests submitted to the engine, together or not at all."""
    generations = []
    try:
        for request_ in requests:
            generations.append(Generation(s.engine, s.loaded, request_, stops, s.metrics))
    except APIError:
        for gen in generations:
            gen.close()
        raise
    if s.metrics is not None:
        s.metrics.prompt_tokens.inc(sum(len(r.prompt) for r in {id(r.prompt): r for r in requests}.values()))
    return generations


# ----------------------------------------------------------------------------- responses


async def respond(request: HTTPRequest, body: Common, gens: list[Generation], chat: bool,
                  prompts: list[tuple[list[int], bool]] | None = None) -> Response:
    """The response to a request of one or more choices (n, or a completion's list of prompts), streamed or
    whole; a client that leaves cancels every choice's generation."""
    s = served(request)
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    head = {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": s.settings.model_name}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        tools = ("required" if calls_tools(body) else "auto" if may_call_tools(body) else None) if chat else None
        return EventStream(stream(gens, head, chat, include_usage, s.loaded.encoding, tools), gens)
    collect = asyncio.ensure_future(asyncio.gather(*(gen.text() for gen in gens)))
    gone = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not collect.done():  # the client left: stop generating for it
            collect.cancel()
        for gen in gens:  # and a choice that failed leaves none of the others decoding (a finished one: no-op)
            gen.close()
    if not collect.done() or collect.cancelled():
        return Response(status_code=499)
    choices = []
    for i, (gen, text) in enumerate(zip(gens, collect.result())):
        if chat:
            logprobs = {"content": chat_logprobs(s.loaded.encoding, gen.scored)} if body.logprobs else None
            message, finish = {"role": "assistant", "content": text}, gen.finish_reason
            called = calls_tools(body) or (may_call_tools(body) and text.startswith("{"))
            if called and finish == "stop":  # the grammar's JSON, whole: OpenAI's tool call
                message, finish = {"role": "assistant", "content": None,
                                   "tool_calls": tool_calls(text, f"call_{uuid.uuid4().hex[:24]}")}, "tool_calls"
            choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish})
            continue
        prompt, was_text = prompts[i]
        shown = prompt[1:] if was_text else prompt  # text: its own tokens, not the end-of-text put before them
        echoed = decode_text(s.loaded.encoding, shown) if body.echo else ""
        logprobs = None
        if body.logprobs is not None:
            logprobs = logprobs_of(s.loaded.encoding, shown if body.echo else [], gen.prompt_scores, gen.scored
                                   + ([gen.stop_scored] if gen.stop_scored else []))
        choices.append({"index": i, "text": echoed + text, "logprobs": logprobs, "finish_reason": gen.finish_reason})
    return JSONResponse({**head, "choices": choices, "usage": total_usage(gens)})


def total_usage(gens: list[Generation]) -> dict:
    """The usage of all choices: the prompt counted once per distinct prompt (n choices share one)."""
    prompts = {id(gen.request.prompt): len(gen.request.prompt) for gen in gens}
    completion = sum(gen.answer.tokens for gen in gens)
    return {"prompt_tokens": sum(prompts.values()), "completion_tokens": completion,
            "total_tokens": sum(prompts.values()) + completion}


def token_text(encoding, token: int) -> str:
    """A token as OpenAI's logprobs list it: its text, or bytes:\\x.. for bytes that are no whole character."""
    raw = encoding.decode_single_token_bytes(token)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class TextOffsets:
    """Where each token starts in the text (OpenAI's text_offset), token after token: a token that is part of a
    character adds nothing until the character is whole."""

    def __init__(self, encoding):
        self.encoding, self.offset = encoding, 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")

    def next(self, token: int) -> int:
        start = self.offset
        self.offset += len(self.decoder.decode(self.encoding.decode_single_token_bytes(token)))
        return start


def logprobs_of(encoding, shown: list[int], prompt_scores, generated: list[tuple[int, tuple]],
                offsets: TextOffsets | None = None) -> dict:
    """OpenAI's completion logprobs: tokens, token_logprobs, top_logprobs and text_offset, for the echoed
    prompt tokens `shown` (the first of a token-id prompt has none: nothing predicted it) and the generated."""
    entries = [(t, None) for t in shown]
    if prompt_scores is not None:
        scores = list(prompt_scores)[-len(shown):] if shown else []
        entries = [(t, None) for t in shown[: len(shown) - len(scores)]] + list(zip(shown[len(shown) - len(scores):], scores))
    entries += generated
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offsets = offsets or TextOffsets(encoding)
    for token, score in entries:
        out["tokens"].append(token_text(encoding, token))
        out["text_offset"].append(offsets.next(token))
        out["token_logprobs"].append(None if score is None else score[0])
        out["top_logprobs"].append(None if score is None else {token_text(encoding, i): v for i, v in score[1]})
    return out


def chat_logprobs(encoding, scored: list[tuple[int, tuple]]) -> list[dict]:
    """OpenAI's chat logprobs content: per token its text, log-probability, UTF-8 bytes and the likeliest."""
    def entry(token: int, logprob: float) -> dict:
        return {"token": token_text(encoding, token), "logprob": logprob,
                "bytes": list(encoding.decode_single_token_bytes(token))}

    return [{**entry(token, lp), "top_logprobs": [entry(i, v) for i, v in top]} for token, (lp, top) in scored]


async def stream(gens: list[Generation], head: dict, chat: bool, include_usage: bool, encoding,
                 tools: str | None = None):
    """Server-sent events: a chunk per piece of text of each choice (the first chat chunk of each names the
    role), each with the log-probabilities of the tokens it covers when asked; a chunk with each choice's
    finish reason, the last one with the usage, or with stream_options.include_usage the finish reasons alone
    and then OpenAI's usage chunk (no choices); then [DONE]. A tool call (tools) is sent whole, as one delta
    with its tool_calls, once its JSON is complete. A client that leaves cancels every generation."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    held = HeldCalls(tools, len(gens))
    sent = [0] * len(gens)  # per choice: the tokens whose log-probabilities were sent
    offsets = [TextOffsets(encoding) for _ in gens]  # per choice: a completion's text_offset goes on over chunks

    def chunk(i: int, piece: str | None, finish=None, role=False) -> dict:
        gen = gens[i]
        logprobs = None
        if gen.request.logprobs is not None:
            new = gen.scored[sent[i]:] + ([gen.stop_scored] if finish and gen.stop_scored and not chat else [])
            sent[i] = len(gen.scored)
            if chat:
                logprobs = {"content": chat_logprobs(encoding, new)}
            else:
                logprobs = logprobs_of(encoding, [], None, new, offsets[i])
        if chat:
            delta = ({"role": "assistant"} if role else {}) | ({} if piece is None else {"content": piece})
            return {**head, "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
        return {**head, "choices": [{"index": i, "text": piece or "", "logprobs": logprobs, "finish_reason": finish}]}

    if chat:
        for i in range(len(gens)):
            yield sse(chunk(i, "", role=True))
    finished = 0
    try:
        async for i, piece in merged(gens):
            finished += piece is None
            last = piece is None and finished == len(gens)
            if piece is not None and held.hold(i, piece):
                continue
            if piece is None:
                delta, text = held.release(i, gens[i])
                if delta:
                    yield sse({**head, "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}]})
                if text:
                    yield sse(chunk(i, text))
            if piece is not None:
                yield sse(chunk(i, piece))
            elif not last or include_usage:
                yield sse(chunk(i, None, gens[i].finish_reason))
            else:  # usage in every response all the same: on the last chunk, counted once
                yield sse({**chunk(i, None, gens[i].finish_reason), "usage": total_usage(gens)})
    except APIError as e:  # the status is sent already: say it in the stream, as OpenAI does
        yield sse({"error": error_body(e.message, e.kind, e.param, e.code)})
        yield sse("[DONE]")
        return
    if include_usage:  # OpenAI's way: usage in a chunk of its own (no choices), none on the others
        yield sse({**head, "choices": [], "usage": total_usage(gens)})
    yield sse("[DONE]")


class HeldCalls:
    """A stream's tool calls, held per choice until whole (tools: "required", "auto" or None; with auto an
    answer is a call when its text starts with "{")."""

    def __init__(self, tools: str | None, n: int):
        self.texts: list[list[str]] = [[] for _ in range(n)]
        self.calling = [tools == "required"] * n
        self.decided = [tools != "auto"] * n

    def hold(self, i: int, piece: str) -> bool:
        """Whether choice i's piece is held (part of a call) rather than sent as text."""
        if not self.decided[i]:
            self.decided[i], self.calling[i] = True, piece.startswith("{")
        if self.calling[i]:
            self.texts[i].append(piece)
        return self.calling[i]

    def release(self, i: int, gen: Generation) -> tuple[dict | None, str | None]:
        """At choice i's end: OpenAI's tool_calls delta when its JSON is whole (its finish_reason becomes
        tool_calls), or the text held when max_tokens cut it."""
        if not self.calling[i]:
            return None, None
        text = "".join(self.texts[i])
        if gen.finish_reason != "stop":
            return None, text or None
        gen.finish_reason = "tool_calls"
        call = tool_calls(text, f"call_{uuid.uuid4().hex[:24]}")[0]
        return {"tool_calls": [{"index": 0, **call}]}, None


async def merged(gens: list[Generation]) -> AsyncIterator[tuple[int, str | None]]:
    """(choice, piece) as each generation produces text, and (choice, None) when one finishes."""
    if len(gens) == 1:  # the common case, without tasks
        async for piece in gens[0].pieces():
            yield 0, piece
        yield 0, None
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, gen: Generation) -> None:
        try:
            async for piece in gen.pieces():
                await queue.put((i, piece, None))
            await queue.put((i, None, None))
        except APIError as e:
            await queue.put((i, None, e))

    tasks = [asyncio.ensure_future(pump(i, gen)) for i, gen in enumerate(gens)]
    try:
        for _ in range(len(gens)):
            while True:
                i, piece, error = await queue.get()
                if error is not None:
                    raise error
                yield i, piece
                if piece is None:
                    break
    finally:
        for task in tasks:
            task.cancel()


# ----------------------------------------------------------------------------- running it


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: a free one), or one line saying why it cannot be."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family)
    except OSError as e:
        raise UserError(f"--host {host} --port {port}: cannot listen there ({os_reason(e)})") from None
    # No Nagle delay on the connections it accepts (they inherit this): asyncio sets TCP_NODELAY only on
    # sockets it made itself, and without it every response written in two parts (headers, then body) and
    # every streamed chunk after the first waited 40 ms for the client's delayed ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


READ_TIMEOUT = 10.0  # seconds a client gets to send a whole request (headers and body)
MAX_CONNECTIONS = 1024  # open connections (and requests) beyond which uvicorn answers 503 at once


class ReadDeadlineProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for reading each request: a client that has not sent all of
    its request READ_TIMEOUT seconds after connecting (or after its previous answer) is disconnected, with one
    log line; uvicorn itself waits for headers and a declared body forever. A request read whole has no
    deadline: its answer may stream for minutes."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_read_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_read_deadline()

    def connection_lost(self, exc) -> None:
        if getattr(self, "_read_deadline", None) is not None:
            self._read_deadline.cancel()
        super().connection_lost(exc)

    def _arm_read_deadline(self) -> None:
        if getattr(self, "_read_deadline", None) is not None:
            self._read_deadline.cancel()
        self._read_deadline = self.loop.call_later(READ_TIMEOUT, self._read_timed_out)

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        cycle = self.cycle
        if cycle is None or cycle.response_complete or cycle.more_body:  # headers or body still incomplete
            if cycle is None or not cycle.response_complete:  # (an idle keep-alive is uvicorn's to close)
                log_line(f"dropped a connection from {self.client[0] if self.client else '?'}: no whole request "
                         f"within {READ_TIMEOUT:g} s")
            self.transport.close()


def server_config(app: FastAPI, **kwargs) -> uvicorn.Config:
    """uvicorn's settings: the read deadline, a bound on connections, and a grace for open streams at exit."""
    return uvicorn.Config(app, http=ReadDeadlineProtocol, limit_concurrency=MAX_CONNECTIONS,
                          timeout_graceful_shutdown=SHUTDOWN_GRACE, **kwargs)


class BackgroundServer:
    """The app under uvicorn in a thread of this process, on a loopback port of its own: for the tests and
    bench.py. A context manager: serving inside the with block."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        self.sock = listening_socket(host, port)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(server_config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def chunk_size(text: str) -> int | None:
    """--prefill_chunk: a positive number of tokens, or auto (None: the engine sizes it)."""
    if text == "auto":
        return None
    return positive_int(text)


chunk_size.__name__ = "auto or a positive integer"


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in [0, 65535] (0: any free port), got {text!r}")
    return value


def default_model_name(args) -> str:
    path = (args.lora_path or args.checkpoint_path).rstrip("/\\")
    name = os.path.basename(path)
    return name[:-3] if name.endswith(".pt") else name


def parse_args(argv=None):
    p = ArgumentParser(description="Serve a LightGPT model with OpenAI's API and a chat page.")
    add_model_path_args(p, "serve the chat model")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=port_number, default=8000, help="port to listen on (0: any free port)")
    p.add_argument("--model_name", default=None,
                   help="the model id /v1/models reports and responses name (default: the checkpoint's file name, "
                        "the LoRA's with --lora_path)")
    p.add_argument("--api_key", default=os.environ.get(API_KEY_ENV),
                   help=f"ask /v1/* for 'Authorization: Bearer <key>' (default: ${API_KEY_ENV}, else no key)")
    g = p.add_argument_group("decoding")
    g.add_argument("--context_length", type=positive_int, default=1024,
                   help="tokens each request's row of the KV cache holds; a longer prompt is refused")
    g.add_argument("--max_batch", type=positive_int, default=16, help="requests decoded together (batch rows)")
    g.add_argument("--max_waiting", type=non_negative_int, default=256,
                   help="requests queued for a free row; beyond that a request gets 503")
    g.add_argument("--max_tokens", type=positive_int, default=1000,
                   help="tokens per answer when a request does not say, and the most it may ask for")
    g.add_argument("--prefix_cache", choices=("on", "off"), default="on",
                   help="reuse the keys and values a row already holds for a prompt's first tokens (a shared "
                        "system prompt, a chat's earlier turns)")
    g.add_argument("--prefill_chunk", type=chunk_size, default=None, metavar="N|auto",
                   help="prompt tokens prefilled in each decode step's forward, so that a long prompt does not stall "
                        "the answers streaming meanwhile (default auto: sized to add about 0.6 of a step's time)")
    add_sampling_args(g)
    add_system_args(g, compile_help="compile the batched decode step (auto: on for CUDA)", seed_help=None)
    add_config_args(p)
    return parse_with_config(p, argv)  # --config fills the flags the command line leaves out


def main(args) -> None:
    if args.api_key == "":
        raise UserError(f"--api_key is empty (check ${API_KEY_ENV}); give a key, or leave both unset for none")
    device = resolve_device(args.device)
    loaded = load_for_inference(args.checkpoint_path, device, args.lora_path)
    sock = listening_socket(args.host, args.port)
    settings = Settings(args.model_name or default_model_name(args), args.max_tokens,
                        Sampling.from_args(args), args.api_key,
                        LOOPBACK if args.host in LOOPBACK else None, access_log=True)
    with Engine(loaded, args.context_length, args.max_batch, args.max_waiting,
                compile_enabled(args.compile, device), args.prefill_chunk, args.prefix_cache == "on") as engine:
        app = create_app(engine, loaded, settings)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        kind = "a chat model" if loaded.chat else "a base model (no chat template: /v1/completions only)"
        print(f"serving {settings.model_name}, {kind}, at http://{shown}:{port}/ : the chat page there, "
              f"the API under /v1; Ctrl-C stops", flush=True)
        if args.host not in LOOPBACK and not args.api_key:
            print(f"warning: --host {args.host} is reachable from other machines and no --api_key is set",
                  file=sys.stderr, flush=True)
        # Ctrl-C: streams still open get SHUTDOWN_GRACE seconds, then their requests are cancelled.
        uvicorn.Server(server_config(app, log_level="info", access_log=False)).run(sockets=[sock])  # AccessLog's


if __name__ == "__main__":
    run_main(main, parse_args)
