"""Structured output by construction (structured.py, llguidance) behind serve.py, on the certain chat model
(tests/helpers.py: left alone it answers "yes."): JSON that parses and matches the schema for every seed,
tool calls in OpenAI's shape, langchain-openai's structured output and tools, and the one-line refusals."""

import json

import httpx
import jsonschema  # test dependencies (requirements-dev.txt), never skipped: a skip would hide the feature
import pytest
import torch
from pydantic import BaseModel, Field
from test_serve import client, healthy, started

import serve
from generate import load_for_inference

SCHEMA = {"type": "object", "properties": {
    "answer": {"type": "string", "enum": ["yes", "no", "maybe"]},
    "count": {"type": "integer", "minimum": 0, "maximum": 9},
    "sure": {"type": "boolean"},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2}},
    "required": ["answer", "count", "sure", "tags"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "enum": ["Paris", "Oslo"]},
                                                "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                                                "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 4}}, "required": ["zone"],
    "additionalProperties": False}}}
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def server(certain):
    loaded = load_for_inference(certain.base, torch.device("cpu"), certain.lora)
    engine, server = started(loaded, serve.Settings("tiny-chat", max_tokens=200))
    with engine, server:
        yield server


@pytest.mark.slow  # 20 seeded requests: the slow tier (CI runs it)
def test_json_schema_answers_parse_and_validate_for_every_seed(server):
    """20 seeded requests at temperature 1: each answer is JSON matching the schema (the model alone would
    say "yes."); json_object gives an object; the grammar ends the answer (finish_reason stop)."""
    c = client(server)
    fmt = {"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA, "strict": True}}
    answers = []
    for seed in range(20):
        done = c.chat.completions.create(model="x", messages=HI, response_format=fmt, seed=seed, temperature=1.0)
        assert done.choices[0].finish_reason == "stop"
        answers.append(json.loads(done.choices[0].message.content))
        jsonschema.validate(answers[-1], SCHEMA)
    assert len({json.dumps(a, sort_keys=True) for a in answers}) > 1  # sampled, not one fixed answer
    # json_object: any object. Its strings have no bound, and a model may never close one (this one would write
    # "yes" forever): then the answer stops at max_tokens, finish_reason "length", as OpenAI warns of JSON mode
    plain = c.chat.completions.create(model="x", messages=HI, response_format={"type": "json_object"}, seed=0,
                                      max_tokens=40).choices[0]
    assert plain.message.content.startswith("{")
    assert plain.finish_reason == "length" or isinstance(json.loads(plain.message.content), dict)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="x", messages=HI, response_format=fmt, seed=3, temperature=1.0, stream=True) if ch.choices)
    assert json.loads(streamed) == answers[3]


def test_a_required_tool_call_comes_back_in_openais_shape(server):
    c = client(server)
    for seed in range(5):
        done = c.chat.completions.create(model="x", messages=HI, tools=[WEATHER, TIME], tool_choice="required",
                                         seed=seed, temperature=1.0)
        choice = done.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        schema = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"]["parameters"]
        jsonschema.validate(json.loads(call.function.arguments), schema)
    chunks = list(c.chat.completions.create(model="x", messages=HI, tools=[WEATHER, TIME], tool_choice="required",
                                            seed=0, temperature=1.0, stream=True))
    calls = [d for ch in chunks if ch.choices for d in (ch.choices[0].delta.tool_calls or [])]
    whole = c.chat.completions.create(model="x", messages=HI, tools=[WEATHER, TIME], tool_choice="required", seed=0,
                                      temperature=1.0).choices[0].message.tool_calls[0]
    assert len(calls) == 1 and calls[0].function.name == whole.function.name  # streamed: the call in one delta
    assert calls[0].function.arguments == whole.function.arguments
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["tool_calls"]
    named = c.chat.completions.create(model="x", messages=HI, tools=[WEATHER, TIME], seed=1,
                                      tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert named.choices[0].message.tool_calls[0].function.name == "get_time"
    assert healthy(server)


def test_with_tool_choice_auto_the_model_chooses_text_or_a_call(server):
    """tool_choice auto (or left out): the grammar lets the model write text or a call; this model, left alone,
    answers in text ("yes."); pushed to open with "{" (logit_bias), it makes a valid call."""
    c = client(server)
    for choice in ("auto", None):
        kwargs = {"tool_choice": choice} if choice else {}
        text = c.chat.completions.create(model="x", messages=HI, tools=[WEATHER], seed=0, **kwargs).choices[0]
        assert text.message.content == "yes." and not text.message.tool_calls and text.finish_reason == "stop"
    forced = c.chat.completions.create(model="x", messages=HI, tools=[WEATHER], tool_choice="auto", seed=0,
                                       logit_bias={"123": 100}).choices[0]
    assert forced.finish_reason == "tool_calls" and forced.message.tool_calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(forced.message.tool_calls[0].function.arguments), WEATHER["function"]["parameters"])
    chunks = list(c.chat.completions.create(model="x", messages=HI, tools=[WEATHER], seed=0, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "yes."


class Reply(BaseModel):
    answer: str = Field(json_schema_extra={"enum": ["yes", "no"]})
    count: int = Field(ge=0, le=9)


def test_langchain_structured_output_and_tools_work_against_the_server(server):
    from langchain_openai import (
        ChatOpenAI,  # a test dependency (requirements-dev.txt): never skipped
    )

    llm = ChatOpenAI(base_url=server.url + "/v1", api_key="none", model="tiny-chat", max_retries=0, timeout=60,
                     temperature=0.0)
    for method in ("json_schema", "function_calling"):
        reply = llm.with_structured_output(Reply, method=method).invoke("Hi")
        assert isinstance(reply, Reply) and reply.answer in ("yes", "no") and 0 <= reply.count <= 9, method
    message = llm.bind_tools([WEATHER], tool_choice="required").invoke("What is the weather?")
    (call,) = message.tool_calls
    assert call["name"] == "get_weather" and call["args"]["city"] in ("Paris", "Oslo")
    chose = llm.bind_tools([WEATHER]).invoke("Hi")  # langchain's default: tool_choice left out, "auto"
    assert chose.content == "yes." and chose.tool_calls == []


def test_a_tool_result_goes_back_to_the_model(server):
    """The agent loop: the model's tool call and the tool's result sent back (an assistant message with
    tool_calls, a tool message answering its id) are rendered into the prompt as chat.py renders them, and the
    model answers; through langchain's messages too."""
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    from chat import render_prompt, tool_call_text

    llm = ChatOpenAI(base_url=server.url + "/v1", api_key="none", model="tiny-chat", max_retries=0, timeout=60,
                     temperature=0.0)
    question = HumanMessage("What is the weather?")
    called = llm.bind_tools([WEATHER], tool_choice="required").invoke([question])
    (call,) = called.tool_calls
    answer = llm.bind_tools([WEATHER]).invoke([question, called, ToolMessage("sunny", tool_call_id=call["id"])])
    assert answer.content == "yes." and answer.tool_calls == []
    arguments = json.dumps({"city": "Oslo", "days": 2})
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 4}, timeout=30)
    assert r.status_code == 200, r.text
    seen = [messages[0], {"role": "assistant", "content": tool_call_text("get_weather", arguments)},
            {"role": "tool", "content": "sunny"}]
    assert r.json()["usage"]["prompt_tokens"] == len(render_prompt(server.loaded.chat, seen))


@pytest.mark.parametrize("body, param, message", [
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "one of"),
    ({"tools": [{"name": "f"}], "tool_choice": "required"}, "tools", "a list of"),
    ({"response_format": {"type": "xml"}}, "response_format", "json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "frobnicate"}}}},
     "response_format", "schema"),
])
def test_structured_output_mistakes_are_400s_naming_the_field(server, body, param, message):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": HI, **body}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error


def test_without_llguidance_structured_output_is_a_400_naming_the_install(certain, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llguidance", None)
    monkeypatch.setitem(sys.modules, "llguidance.tiktoken", None)
    loaded = load_for_inference(certain.base, torch.device("cpu"), certain.lora)
    engine, server = started(loaded, serve.Settings("tiny-chat"))
    with engine, server:
        r = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                       json={"messages": HI, "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and "pip install llguidance" in r.json()["error"]["message"]
