"""Structured output by construction: an answer that must be JSON (OpenAI's response_format json_object or
json_schema) or a tool call (tools with tool_choice "required" or a named function) is decoded under a
grammar, so that even a tiny model returns JSON that parses and matches the schema. The grammar engine is
llguidance (Microsoft's, the one behind Guidance; Rust, with CPU wheels and no torch dependency, and its own
tiktoken support: LightGPT's encodings need no conversion). Chosen over xgrammar (needs torch kernels and a
Hugging Face tokenizer description) and outlines-core (regex-first; slower to compile JSON schemas into a
token index). Each constrained request has a matcher: before a token is sampled, the tokens it allows
mask the logits (the others go to -inf); the sampled token advances it; end-of-text is allowed only once
the JSON is whole. Requests without a grammar pay nothing. An optional extra: pip install llguidance."""

from __future__ import annotations

import json

import numpy as np
import torch

LLGUIDANCE_INSTALL = "pip install llguidance"
JSON_OPTIONS = {"whitespace_flexible": False}  # compact JSON: a model cannot stall in whitespace
MAX_COMPILED = 256  # schemas whose grammars are kept


class GrammarError(ValueError):
    """A schema llguidance cannot compile, or llguidance missing: the request's error (one line)."""


class Grammars:
    """The tokenizer llguidance matches against (built once per server), and the matchers of requests."""

    def __init__(self, encoding, stop_tokens: list[int], vocabulary_size: int):
        try:
            import llguidance.tiktoken
        except ImportError:
            raise GrammarError(f"structured output needs llguidance, which is not installed: {LLGUIDANCE_INSTALL}") from None
        self.vocabulary_size = vocabulary_size
        self.compiled: dict[str, str] = {}  # schema (as JSON) -> grammar: a client's repeated schema compiles once
        self.tokenizer = llguidance.tiktoken.lltokenizer_from_encoding(encoding, n_vocab=vocabulary_size,
                                                                        eos_token=sorted(stop_tokens))

    def json_schema(self, schema: dict) -> str:
        """The grammar of JSON matching a schema (closed: see closed())."""
        from llguidance import LLMatcher

        key = json.dumps(schema, sort_keys=True)
        if key in self.compiled:
            return self.compiled[key]
        try:
            grammar = LLMatcher.grammar_from_json_schema(closed(schema), overrides=JSON_OPTIONS)
        except ValueError as e:
            raise GrammarError(f"not a JSON schema llguidance can use ({str(e).splitlines()[0]})") from None
        self.check(grammar)
        if len(self.compiled) >= MAX_COMPILED:
            self.compiled.pop(next(iter(self.compiled)))  # the oldest
        self.compiled[key] = grammar
        return grammar

    def text_or_call(self, schema: dict) -> str:
        """tool_choice "auto": the grammar of either text (not starting with "{") or a tool call's JSON. The model
        chooses with its first token; the answer is a call when it starts with "{"."""
        from llguidance import LLMatcher

        key = "auto:" + json.dumps(schema, sort_keys=True)
        if key not in self.compiled:
            call = {**closed(schema), "x-guidance": JSON_OPTIONS}
            grammar = LLMatcher.grammar_from_lark(f"start: call | text\ncall: %json {json.dumps(call)}\n"
                                                   f"text: /[^{{][\\s\\S]*/\n")
            self.check(grammar)
            self.compiled[key] = grammar
        return self.compiled[key]

    def check(self, grammar: str) -> None:
        from llguidance import LLMatcher

        matcher = LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"the schema does not compile: {matcher.get_error().splitlines()[0]}")

    def constraint(self, grammar: str) -> "Constraint":
        return Constraint(self, grammar)


class Constraint:
    """One answer's matcher: the mask of the tokens it allows next, and the tokens sampled."""

    def __init__(self, grammars: Grammars, grammar: str):
        from llguidance import LLMatcher

        self.matcher = LLMatcher(grammars.tokenizer, grammar, log_level=0)
        self.vocabulary_size = grammars.vocabulary_size

    def allowed(self, device) -> torch.Tensor:
        """(V,) bool: the tokens the grammar allows next."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint32)  # one bit per token
        allowed = ((bits[:, None] >> np.arange(32, dtype=np.uint32)) & 1).reshape(-1)[: self.vocabulary_size]
        return torch.from_numpy(allowed.astype(bool)).to(device)

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits (V,) of the tokens the grammar forbids to -inf, in place."""
        logits.masked_fill_(~self.allowed(logits.device), float("-inf"))

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)

    @property
    def finished(self) -> bool:
        """The grammar is complete (after its end-of-text) or broken."""
        return self.matcher.is_stopped() or self.matcher.is_error()


def closed(schema):
    """The schema with every object that lists its properties taking no others, unless it says
    additionalProperties itself: OpenAI's strict mode's rule. An open object lets a model add keys forever,
    and a function's arguments are its parameters, no more."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def tool_call_schema(tools: list[dict], name: str | None) -> dict:
    """The JSON a tool call is decoded as: {"name": one of the tools (or the named one), "arguments": that
    tool's parameters}."""
    options = []
    for tool in tools:
        function = tool["function"]
        if name is not None and function["name"] != name:
            continue
        options.append({"type": "object", "properties": {
            "name": {"const": function["name"]},
            "arguments": function.get("parameters") or {"type": "object", "properties": {}}},
            "required": ["name", "arguments"], "additionalProperties": False})
    return options[0] if len(options) == 1 else {"anyOf": options}


def tool_calls(text: str, ident: str) -> list[dict]:
    """OpenAI's tool_calls from an answer decoded under tool_call_schema."""
    call = json.loads(text)
    return [{"id": ident, "type": "function",
             "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}]
