"""Chat data for instruction tuning: ChatML conversations rendered with real special tokens.

- ChatTokenizer: a base tiktoken encoding plus <|im_start|>, <|im_end|> and <|pad|> as real special
  tokens after its vocabulary. Text (a user's, a dataset's) is always encoded as ordinary text, so a
  typed "<|im_end|>" never becomes the special token.
- render_conversation / render_prompt: one renderer for training and for inference (nanochat's
  render_conversation): end-of-text, then per message <|im_start|>role\\ncontent<|im_end|>\\n, with a
  mask marking what the assistant says (its content and its <|im_end|>).
- Datasets: SmolTalk (the scripts' default) or any hub dataset with a `messages` column, local
  .jsonl / .json / .parquet files with one, or `builtin`: a few hundred conversations made here from
  CPython's pydoc_data topics, so a first run needs no download. Rendered and tokenized once into
  flat arrays under --dataset_path (atomically, under a lock, metadata last, checked on reuse).
- pack / padded: conversations into fixed-width rows of inputs, targets (the ignore index where nothing
  is learned) and per-position document ids, for a block-diagonal causal attention mask.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import tiktoken
import torch

import data
from common import Stopped, UserError, first_line, print0
from files import atomic_path
from model import IGNORE_INDEX

SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|pad|>")
ROLES = ("system", "user", "assistant")
TOOL_ROLE = "tool"  # a tool's result sent back after the assistant's tool call (serve.py); never in training data
SMOLTALK = "HuggingFaceTB/smoltalk"
CHAT_FORMAT = 1  # the renderer and the cache layout; part of the cache files' names
TEST_EVERY = 20  # without a hub test split, every 20th conversation (0, 20, 40, ...) is held out
CONVERSATIONS_PER_TASK = 64  # conversations one tokenizer thread renders at a time
SPLITS, ARRAYS = ("train", "test"), ("ids", "mask", "offsets")

# ----------------------------------------------------------------------------- tokenizer and renderer


class ChatTokenizer:
    """A base encoding (data.load_encoding's) plus the ChatML special tokens, ids base.n_vocab, +1, +2."""

    def __init__(self, base: tiktoken.Encoding):
        taken = [t for t in SPECIAL_TOKENS if t in base._special_tokens]
        if taken:
            raise ValueError(f"the encoding {base.name} already has {', '.join(taken)}")
        n = base.n_vocab
        self.base = base
        self.base_vocabulary_size = n
        self.vocabulary_size = n + len(SPECIAL_TOKENS)
        self.im_start, self.im_end, self.pad = n, n + 1, n + 2
        self.eot = data.eot_id(base)
        self.encoding = tiktoken.Encoding(
            name=f"{base.name}-chatml",
            pat_str=base._pat_str,
            mergeable_ranks=base._mergeable_ranks,
            special_tokens={**base._special_tokens, **{t: n + i for i, t in enumerate(SPECIAL_TOKENS)}},
        )
        self.newline = self.encode_text("\n")
        self.headers = {role: [self.im_start, *self.encode_text(f"{role}\n")] for role in (*ROLES, TOOL_ROLE)}

    def encode_text(self, text: str) -> list[int]:
        """Ordinary text only: special-token text in it is encoded as the characters it is."""
        return self.encoding.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.encoding.decode([int(i) for i in ids])


def render_conversation(tok: ChatTokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """The conversation's ids and, per id, whether it is the assistant's (content and <|im_end|>)."""
    ids, mask = [tok.eot], [False]  # every pretraining document started after an end-of-text
    for message in messages:
        header, content = tok.headers[message["role"]], tok.encode_text(message["content"])
        said = message["role"] == "assistant"
        ids += header + content + [tok.im_end] + tok.newline
        mask += [False] * len(header) + [said] * (len(content) + 1) + [False] * len(tok.newline)
    return ids, mask


def tool_call_text(name: str, arguments: str) -> str:
    """An assistant's tool call as the content it renders as: the JSON a tool call is decoded as
    (structured.tool_call_schema), arguments being OpenAI's JSON text of an object, kept as written."""
    return '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": ' + arguments + "}"


def render_prompt(tok: ChatTokenizer, messages: list[dict]) -> list[int]:
    """The conversation so far, then <|im_start|>assistant\\n: what the model continues to answer.
    render_conversation(messages + [reply]) starts with exactly these ids."""
    return render_conversation(tok, messages)[0] + tok.headers["assistant"]


def _shown(value) -> str:
    return "null" if value is None else f"a {type(value).__name__}"


def check_messages(messages, where: str) -> list[dict]:
    """One conversation checked: a list of {role, content} messages with at least one assistant message.
    Returns the messages with only those two keys; raises a one-line UserError naming `where`."""
    if not isinstance(messages, (list, tuple)):
        raise UserError(f"{where}: 'messages' is {_shown(messages)}, not a list of {{role, content}} messages")
    checked = []
    for i, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise UserError(f"{where}: message {i} is {_shown(message)}, not a {{role, content}} object")
        role, content = message.get("role"), message.get("content")
        if role is None:
            raise UserError(f"{where}: message {i} has no role")
        if not isinstance(role, str) or role not in ROLES:
            shown = repr(role) if len(repr(role)) <= 40 else repr(role)[:36] + " ..."
            raise UserError(f"{where}: message {i} has unknown role {shown}; expected system, user or assistant")
        if content is None:
            raise UserError(f"{where}: message {i} ({role}) has no content")
        if not isinstance(content, str):
            raise UserError(f"{where}: message {i} ({role}) has content that is {_shown(content)}, not text")
        checked.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in checked):
        raise UserError(f"{where}: no assistant message ({len(checked)} messages), so nothing to learn from")
    return checked


# ----------------------------------------------------------------------------- the builtin conversations
# Made from the CPython documentation topics (data.builtin_documents): a section's first paragraph answers
# a question about its title, later paragraphs answer follow-ups, a described method answers "what does it
# do", and code or grammar blocks answer requests for an example or the syntax. Deterministic: the same
# phrasings are taken in turn, so a given Python always gives the same set.

MAX_ANSWER = 160  # characters of prose in an answer, cut at a sentence: short enough for the quick start's model to end
MAX_CODE = 300  # characters of a code or grammar block in an answer
MAX_WITH_CODE = 600  # characters of a paragraph and the block it leads into
SYSTEM_PROMPTS = (
    "You are a helpful assistant who answers questions about the Python language.",
    "You are a concise Python tutor. Answer from the Python reference manual.",
    "Answer briefly and precisely.",
)
ASK = ("Tell me about {}.", "Explain {} in Python.", "What does the Python reference say about {}?",
       "Give me a short overview of {}.", "Can you summarize {} for me?", "Describe {} briefly.")
ASK_METHOD = ("What does {} do?", "Explain {}.", "How does {} work?", "What is {} for?")
FOLLOW_UP = ("Tell me more.", "What else should I know?", "Go on.", "Can you continue?")
ASK_EXAMPLE = ("Show me an example of {}.", "Can you give me an example involving {}?", "Show me {} in code.")
ASK_GRAMMAR = ("What is the grammar of {}?", "What is the syntax of {}?", "Show me the formal syntax of {}.")

_UNDERLINE = re.compile(r"([*=\-~^])\1{2,}")
_SIGNATURE = re.compile(r"[A-Za-z_][\w.]*\(.*\)")  # "str.zfill(width)", "object.__new__(cls[, ...])"
_SKIPPED = re.compile(r"(Changed in version|New in version|Added in version|Deprecated|Note:|See also|Warning:|"
                      r"Example|\* |\d+\. )")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"“(])")


def _paragraphs(document: str) -> list[tuple[str, int, str]]:
    """(kind, indent, text) per blank-line-separated block: kind heading, text, signature or code;
    text de-indented."""
    blocks = []
    for block in re.split(r"\n\s*\n", document):
        lines = block.rstrip().split("\n")
        if not block.strip():
            continue
        if len(lines) == 2 and _UNDERLINE.fullmatch(lines[1]) and len(lines[1]) == len(lines[0]):
            blocks.append(("heading", 0, lines[0].strip()))
            continue
        indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
        text = textwrap.dedent(block.rstrip("\n")).strip("\n")
        if len(lines) == 1 and _SIGNATURE.fullmatch(text):
            kind = "signature"
        elif "::=" in text or ">>>" in text or (indent and not text.rstrip().endswith((".", ":"))):
            kind = "code"
        else:
            kind = "text"
        blocks.append((kind, indent, text))
    return blocks


def _prose(text: str) -> str | None:
    """A paragraph unwrapped and cut after its last sentence within MAX_ANSWER characters; None when even
    its first sentence is longer, or it is a note, a list item or a version remark."""
    text = re.sub(r"\s+", " ", text).strip()
    if _SKIPPED.match(text):
        return None
    kept = ""
    for sentence in _SENTENCE_END.split(text):
        if len(kept) + len(sentence) + 1 > MAX_ANSWER:
            break
        kept = f"{kept} {sentence}".strip()
    return kept or None


_NAMES = {"None", "True", "False", "Python", "Unicode", "NotImplemented"}  # kept capitalized in a question


def _subject(title: str, topic: str | None = None) -> str:
    """A heading as it reads inside a question: 'Value Patterns' -> 'value patterns'. A one-word
    subsection is placed in its topic: 'Numbers in the standard type hierarchy'."""
    title = re.sub(r"\b[A-Z][a-z]+\b", lambda m: m[0] if m[0] in _NAMES else m[0].lower(), title)
    if topic is not None and " " not in title:
        title = f"{title} in {_subject(topic)}"
    return title


@dataclass
class _Section:
    subject: str
    blocks: list[tuple[str, int, str]]


def _sections(document: str) -> list[_Section]:
    """A topic's sections: the topic itself (its first heading) and each subsection."""
    sections, topic = [], None
    for kind, indent, text in _paragraphs(document):
        if kind == "heading":
            sections.append(_Section(_subject(text, topic), []))
            topic = topic or text
        elif sections:
            sections[-1].blocks.append((kind, indent, text))
    return sections


def _section_items(section: _Section) -> tuple[list[str], list[tuple[str, str]], str | None, str | None]:
    """What a section offers: its prose answers in order, (signature, description) pairs, an example
    (the paragraph leading into it, then the code) and its grammar."""
    answers, methods, example, grammar = [], [], None, None
    blocks = section.blocks
    for i, (kind, indent, text) in enumerate(blocks):
        following = blocks[i + 1] if i + 1 < len(blocks) else (None, 0, "")
        if kind == "signature" and following[0] == "text" and following[1] > indent:
            description = _prose(following[2])
            if description:
                methods.append((text, description))
        elif kind == "text" and indent == 0:
            answer = _prose(text)
            whole = answer == re.sub(r"\s+", " ", text).strip()
            if answer and whole and not answer.endswith((".", "?", "!", ")", '"')):  # a lead-in: the block
                code = following[2]  # it introduces ("... is equivalent to", "Syntax:") completes it
                if following[0] == "code" and len(code) <= MAX_CODE and len(answer) + len(code) <= MAX_WITH_CODE:
                    if "::=" in code:
                        grammar = grammar or code
                    elif example is None:
                        example = f"{answer}\n\n{code}"
                    answer = f"{answer}\n\n{code}"
                else:
                    answer = answer[:-1] + "." if answer.endswith(":") else None
            if answer:
                answers.append(answer)
        elif kind == "code" and len(text) <= MAX_CODE:
            if "::=" in text:
                grammar = grammar or text
            elif ">>>" in text and example is None:
                example = f"For example:\n\n{text}"
    return answers, methods, example, grammar


def builtin_conversations() -> list[list[dict]]:
    """Some 570 conversations about the Python language, built from data.builtin_documents() with no
    download: single questions, multi-turn follow-ups and, now and then, a system message."""
    conversations, seen = [], set()

    def add(*turns: str) -> None:
        n = len(conversations)
        messages = [{"role": "system", "content": SYSTEM_PROMPTS[n // 5 % len(SYSTEM_PROMPTS)]}] if n % 5 == 2 else []
        for i, turn in enumerate(turns):
            messages.append({"role": ROLES[1 + i % 2], "content": turn})
        key = json.dumps(messages)
        if key not in seen:  # a method documented twice, asked the same way: once is enough
            seen.add(key)
            conversations.append(messages)

    def pick(phrasings: tuple[str, ...], subject: str, shift: int = 0) -> str:
        return phrasings[(len(conversations) + shift) % len(phrasings)].format(subject)

    for document in data.builtin_documents():
        for section in _sections(document):
            answers, methods, example, grammar = _section_items(section)
            if answers:
                add(pick(ASK, section.subject), answers[0])
            if len(answers) >= 2:  # the same start asked another way, then follow-ups on the next paragraphs
                turns = [pick(ASK, section.subject, shift=len(ASK) // 2), answers[0]]
                for j, answer in enumerate(answers[1 : 2 + len(conversations) % 2]):
                    turns += [FOLLOW_UP[(len(conversations) + j) % len(FOLLOW_UP)], answer]
                add(*turns)
            for signature, description in methods:
                add(pick(ASK_METHOD, signature), description)
            if example:
                add(pick(ASK_EXAMPLE, section.subject), example)
            if grammar:
                add(pick(ASK_GRAMMAR, section.subject), f"In the reference's grammar notation:\n\n{grammar}")
    return conversations


# ----------------------------------------------------------------------------- chat datasets


@dataclass
class ChatData:
    train: list[tuple[np.ndarray, np.ndarray]]  # (ids, assistant mask) per conversation
    test: list[tuple[np.ndarray, np.ndarray]]
    meta: dict  # the cache's metadata: source, subsets, encoding, counts, file hashes


@dataclass
class _Part:
    """One table of conversations (a hub subset, the local files, the builtin set): a name for messages,
    the rows of each split it has ("train", and "test" where it has its own), and their messages in batches."""

    what: str
    rows: dict[str, int]
    batches: Callable[[str], Iterator[list]]


@dataclass
class _Source:
    slug: str  # part of the cache files' names
    source: str  # for the metadata
    subsets: list[str]  # a hub dataset's subsets, mixed
    parts: Callable[[int], list[_Part]]  # processes -> the tables


def _subsets(subset: str | None) -> list[str | None]:
    names = list(dict.fromkeys(s.strip() for s in (subset or "").split(",") if s.strip()))
    return names or [None]


def _table_part(what: str, tables: dict) -> _Part:
    """A part from datasets' tables ({"train": ..., maybe "test": ...}): their `messages` column, in batches."""
    for table in tables.values():
        if "messages" not in table.column_names:
            raise UserError(f"{what} has no 'messages' column (columns: {', '.join(table.column_names) or 'none'}); "
                            f"chat data needs a list of {{role, content}} messages per row")

    def batches(split):
        column = tables[split].select_columns(["messages"])
        return (batch["messages"] for batch in column.iter(batch_size=data.DOCUMENTS_PER_BATCH))

    return _Part(what, {split: len(table) for split, table in tables.items()}, batches)


def _hub_parts(name: str, subsets: list[str | None], processes: int) -> list[_Part]:
    parts = []
    for subset in subsets:
        what = data.hub_what(name, subset)
        splits = data.load_hub_dataset(name, subset, processes, split=None)
        if "train" not in splits:
            raise UserError(f"{what} has no train split (splits: {', '.join(splits)})")
        parts.append(_table_part(what, {s: splits[s] for s in SPLITS if s in splits}))
    return parts


def _builtin_part(conversations: list[list[dict]]) -> _Part:
    return _Part("the builtin conversations", {"train": len(conversations)}, lambda split: data._batched(conversations))


def resolve_chat_source(dataset: str, subset: str | None) -> _Source:
    """What --dataset (and --dataset_subset) name: builtin, local files, or hub datasets (subsets mixed)."""
    if dataset == "builtin":
        conversations = builtin_conversations()  # named by their hash: another Python gives other topics
        digest = hashlib.sha256(json.dumps(conversations).encode()).hexdigest()[:10]
        return _Source(f"builtin-{digest}", "builtin: conversations about CPython's pydoc_data topics", [],
                       lambda p: [_builtin_part(conversations)])
    files = data.local_files(dataset)
    if files is not None:
        corpus = data.resolve_corpus(dataset, None)  # checks the files' kinds; named by their sizes and times
        builder = data.LOCAL_EXTENSIONS[os.path.splitext(files[0])[1].lower()]
        if all(os.path.getsize(f) == 0 for f in files):
            raise UserError(f"--dataset {dataset} holds no conversations (empty file{'s' if len(files) > 1 else ''})")

        def load(processes):
            return [_table_part(data.local_what(files), {"train": data.load_local_dataset(files, builder, processes)})]

        return _Source(corpus.slug, corpus.source, [], load)
    subsets = _subsets(subset)
    names = "+".join(data._safe(s) for s in subsets if s)
    if len(names) > 80:
        names = hashlib.sha256(names.encode()).hexdigest()[:10]
    slug = data._safe(dataset.split("/")[-1]) + (f"-{names}" if names else "")
    source = f"hub: {dataset}" + (f" ({', '.join(subsets)})" if subsets != [None] else "")
    return _Source(slug, source, [s for s in subsets if s], lambda p: _hub_parts(dataset, subsets, p))


def chat_file_paths(dataset_path: str, slug: str, encoding_spec: str) -> dict[str, str]:
    """{"<split>.<array>": path, ..., "meta": path}: chat-<source>-<encoding>-v<format>.<split>.<array>.bin
    (ids, assistant mask, conversation offsets) and .json."""
    stem = os.path.join(dataset_path, f"chat-{slug}-{data.encoding_slug(encoding_spec)}-v{CHAT_FORMAT}")
    paths = {f"{split}.{array}": f"{stem}.{split}.{array}.bin" for split in SPLITS for array in ARRAYS}
    return {**paths, "meta": f"{stem}.json"}


def _array_dtypes(tok: ChatTokenizer) -> dict[str, np.dtype]:
    return {"ids": data.token_dtype(tok.vocabulary_size), "mask": np.dtype(np.bool_), "offsets": np.dtype(np.int64)}


def _render_task(tok: ChatTokenizer, what: str, split: str | None, first: int, rows: list) -> dict:
    """Check and render a run of rows (first is the index of the first). split None: held out by index.
    Runs in worker threads: tiktoken releases the GIL while it encodes."""
    out = {s: ([], [], []) for s in SPLITS}  # ids, mask, lengths
    for i, messages in enumerate(rows, first):
        ids, mask = render_conversation(tok, check_messages(messages, f"row {i + 1} of {what}"))
        ids_out, mask_out, lengths = out[split or ("test" if i % TEST_EVERY == 0 else "train")]
        ids_out += ids
        mask_out += mask
        lengths.append(len(ids))
    return out


def _write_chat_files(parts: list[_Part], tok: ChatTokenizer, paths: dict[str, str], num_threads: int,
                      dataset: str) -> tuple[dict, dict]:
    """Render every conversation into the six array files, atomically. Returns each split's counts with
    each file's entry ({tokens: element count, sha256, sample_sha256, max_id}, as data._mismatch reads it),
    and how each part's test split was chosen."""
    from tqdm import tqdm

    dtypes = _array_dtypes(tok)
    counts = {s: {"conversations": 0, "tokens": 0, "assistant_tokens": 0} for s in SPLITS}
    offsets = {s: [0] for s in SPLITS}
    total = sum(sum(part.rows.values()) for part in parts)
    with contextlib.ExitStack() as stack:
        tmp = {key: stack.enter_context(atomic_path(path)) for key, path in paths.items() if key != "meta"}
        out = {key: stack.enter_context(open(path, "wb")) for key, path in tmp.items() if not key.endswith("offsets")}
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=num_threads))
        progress = stack.enter_context(tqdm(total=total, unit="conversation", desc="rendering", disable=None))
        pending = []

        def drain(limit):
            while len(pending) > limit:
                for split, (ids, mask, lengths) in pending.pop(0).result().items():
                    out[f"{split}.ids"].write(np.asarray(ids, dtypes["ids"]).tobytes())
                    out[f"{split}.mask"].write(np.asarray(mask, np.bool_).tobytes())
                    offsets[split].extend((offsets[split][-1] + np.cumsum(lengths, dtype=np.int64)).tolist())
                    counts[split]["conversations"] += len(lengths)
                    counts[split]["assistant_tokens"] += sum(mask)
                    progress.update(len(lengths))

        for part in parts:
            own_test = "test" in part.rows
            for split in SPLITS if own_test else (None,):  # None: held out by index
                first, what = 0, f"{part.what}, {split} split" if own_test else part.what
                for batch in data._read_batches(part.batches(split or "train"), part.what):
                    for i in range(0, len(batch), CONVERSATIONS_PER_TASK):
                        rows = batch[i : i + CONVERSATIONS_PER_TASK]
                        pending.append(pool.submit(_render_task, tok, what, split, first, rows))
                        first += len(rows)
                        drain(4 * num_threads)  # bounded look-ahead keeps memory flat and the order fixed
        drain(0)
        for s in SPLITS:
            np.asarray(offsets[s], np.int64).tofile(tmp[f"{s}.offsets"])
            counts[s]["tokens"] = offsets[s][-1]
        for f in out.values():
            f.close()
        if total == 0:
            raise UserError(f"--dataset {dataset} holds no conversations")
        for s in SPLITS:
            if counts[s]["conversations"] == 0:
                raise UserError(f"--dataset {dataset}: {total} conversation{'s are' if total > 1 else ' is'} too few "
                                f"to fill a {s} split")
        files = {key: _file_entry(tmp[key], dtypes[key.split(".")[1]]) for key in tmp}
    held_out = {part.what: "its test split" if "test" in part.rows else f"every {TEST_EVERY}th conversation"
                for part in parts}
    return {s: {**counts[s], "files": {a: files[f"{s}.{a}"] for a in ARRAYS}} for s in SPLITS}, held_out


def _file_entry(path: str, dtype: np.dtype) -> dict:
    size = os.path.getsize(path)
    array = np.memmap(path, dtype=dtype, mode="r") if size else np.empty(0, dtype)
    return {"tokens": size // dtype.itemsize, "sha256": data._file_digest(path),
            "sample_sha256": data._file_digest(path, data._sample_blocks(size)),
            "max_id": int(array.max()) if len(array) else 0}


def _check_chat_files(paths: dict[str, str], tok: ChatTokenizer) -> tuple[dict | None, str | None]:
    """(the metadata, None) when the cache holds what it says; otherwise (None, why not), the reason None
    when there is no metadata at all."""
    meta_path = paths["meta"]
    try:
        meta = data.read_meta(meta_path)
    except (OSError, ValueError) as e:
        return None, f"{meta_path} is damaged ({'not valid JSON' if isinstance(e, ValueError) else first_line(e)})"
    if meta is None:
        return None, None
    dtypes = _array_dtypes(tok)
    try:
        if meta["format"] != CHAT_FORMAT or meta["vocabulary_size"] != tok.vocabulary_size:
            return None, f"{meta_path} was written for another format or vocabulary"
        for split in SPLITS:
            for array in ARRAYS:
                entry = meta["splits"][split]["files"][array]
                mismatch = data._mismatch(paths[f"{split}.{array}"], entry, dtypes[array])
                if mismatch:
                    return None, f"{paths[f'{split}.{array}']} does not match its metadata ({mismatch})"
    except (KeyError, TypeError):
        return None, f"{meta_path} is damaged (missing or mangled entries)"
    return meta, None


def _open_split(paths: dict[str, str], split: str, tok: ChatTokenizer) -> list[tuple[np.ndarray, np.ndarray]]:
    ids = np.memmap(paths[f"{split}.ids"], dtype=_array_dtypes(tok)["ids"], mode="r")
    mask = np.memmap(paths[f"{split}.mask"], dtype=np.bool_, mode="r")
    offsets = np.fromfile(paths[f"{split}.offsets"], dtype=np.int64).tolist()
    return [(ids[a:b], mask[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]


def prepare_chat_data(dataset: str, subset: str | None, encoding_spec: str, dataset_path: str,
                      num_processes: int) -> ChatData:
    """Render (or reuse) a chat dataset under an encoding: train and test conversations as (ids, assistant
    mask) arrays. The hub's test split where a dataset has one, else every TEST_EVERY-th conversation."""
    source = resolve_chat_source(dataset, subset)
    tok = ChatTokenizer(data.load_encoding(encoding_spec))
    data._ensure_folder(dataset_path)
    paths = chat_file_paths(dataset_path, source.slug, encoding_spec)
    stem = os.path.splitext(paths["meta"])[0]
    lock = data.PreparationLock(stem + ".lock")
    try:
        for exclusive in (False, True):  # checked again once exclusive: another run may have made them meanwhile
            lock.claim(exclusive, tuple(paths.values()), dataset_path)
            meta, why = _check_chat_files(paths, tok)
            if meta is not None:
                print0(f"reusing chat data {stem}.*")
                break
        else:
            if why:
                print0(f"note: {why}; rendering again")
            print0(f"preparing {source.source} with {encoding_spec} into {dataset_path}")
            meta = _make_chat_files(source, tok, paths, dataset, encoding_spec, dataset_path, num_processes)
        return ChatData(_open_split(paths, "train", tok), _open_split(paths, "test", tok), meta)
    finally:
        lock.release()


def _make_chat_files(source: _Source, tok: ChatTokenizer, paths: dict[str, str], dataset: str,
                     encoding_spec: str, dataset_path: str, num_processes: int) -> dict:
    """Render the dataset into its files and write the metadata last; on any failure none is left."""
    try:
        for key in ("meta", *(k for k in paths if k != "meta")):  # the metadata first: it must never vouch
            with contextlib.suppress(FileNotFoundError):  # for files being replaced
                os.remove(paths[key])
        splits, held_out = _write_chat_files(source.parts(num_processes), tok, paths, num_processes, dataset)
        meta = {
            "format": CHAT_FORMAT,
            "source": source.source,
            "dataset": dataset,
            "subsets": source.subsets,
            "token_encoding": encoding_spec,
            "encoding": tok.encoding.name,
            "base_vocabulary_size": tok.base_vocabulary_size,
            "vocabulary_size": tok.vocabulary_size,
            "special_tokens": {t: tok.encoding.encode_single_token(t) for t in SPECIAL_TOKENS},
            "eot_id": tok.eot,
            "dtype": _array_dtypes(tok)["ids"].name,
            "test_split": held_out,
            "splits": splits,
        }
        with atomic_path(paths["meta"]) as tmp, open(tmp, "w") as f:
            json.dump(meta, f, indent=2)
    except BaseException as e:
        for key in paths:
            with contextlib.suppress(OSError):
                os.remove(paths[key])
        if isinstance(e, KeyboardInterrupt):  # Ctrl-C, or a StopFlag's Stopped
            raise Stopped(getattr(e, "signal_number", signal.SIGINT), "while rendering chat data; nothing was "
                          "written") from None
        if isinstance(e, OSError):
            raise data._write_error(dataset_path, e) from None
        raise
    train, test = splits["train"], splits["test"]
    print0(f"wrote {train['conversations']:,} train conversations ({train['tokens']:,} tokens) and "
           f"{test['conversations']:,} test conversations ({test['tokens']:,} tokens)")
    return meta


# ----------------------------------------------------------------------------- packing


class Packed:
    """Conversations placed in rows of T positions: a plan (which conversation goes where), the rows
    built only when asked for (batch), from the conversations' own arrays (memory-mapped cache files),
    so a million conversations cost a few arrays of a million entries, not (rows x T) tensors.

    A row's tensors: inputs (the pad id after the last conversation), targets (IGNORE_INDEX where nothing
    is learned), documents (each position's conversation within its row; padding an id of its own)."""

    def __init__(self, conversations, max_tokens: int, mask_input: bool, pad_id: int, order, packed: bool):
        self.source, self.T, self.mask_input, self.pad_id = conversations, max_tokens, mask_input, pad_id
        T = max_tokens
        placed, lengths, row_of = [], [], []  # per placed conversation: its index, positions it fills, its row
        used = 0  # positions filled in the last row
        self.truncated = self.dropped = 0  # conversations cut to T + 1 tokens / left out with no target left
        for i in range(len(conversations)) if order is None else order:
            ids, mask = conversations[i]
            n = min(len(ids), T + 1) - 1  # positions it fills, after any cut
            if n < 1 or (mask_input and not np.any(mask[1 : n + 1])):  # a target is kept by its own mask
                self.dropped += 1
                continue
            self.truncated += len(ids) > T + 1
            if not packed or not row_of or used + n > T:  # greedy: a new row when this one does not fit
                row_of.append(len(row_of) and row_of[-1] + 1)
                used = 0
            else:
                row_of.append(row_of[-1])
            placed.append(i)
            lengths.append(n)
            used += n
        self.placed, self.lengths = np.asarray(placed, np.int64), np.asarray(lengths, np.int64)
        rows = np.asarray(row_of, np.int64)
        self.row_first = np.searchsorted(rows, np.arange((rows[-1] + 2) if len(rows) else 1))  # row r: placed[a:b]
        self.conversations = len(placed)

    def __len__(self) -> int:
        return len(self.row_first) - 1

    def batch(self, rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs, targets, documents), each (len(rows), T) long, of these rows."""
        rows = [int(r) for r in rows]
        B, T = len(rows), self.T
        inputs = np.full((B, T), self.pad_id, np.int64)
        targets = np.full((B, T), IGNORE_INDEX, np.int64)
        documents = np.empty((B, T), np.int64)
        for b, r in enumerate(rows):
            first, last = self.row_first[r], self.row_first[r + 1]
            documents[b] = last - first  # padding: an id no conversation in the row has
            at = 0
            for d, k in enumerate(range(first, last)):
                ids, mask = self.source[self.placed[k]]
                n = int(self.lengths[k])
                inputs[b, at : at + n] = ids[:n]
                kept = mask[1 : n + 1] if self.mask_input else True
                targets[b, at : at + n] = np.where(kept, ids[1 : n + 1].astype(np.int64), IGNORE_INDEX)
                documents[b, at : at + n] = d
                at += n
        return torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(documents)

    def _all(self, index: int) -> torch.Tensor:
        return self.batch(range(len(self)))[index]

    inputs = property(lambda self: self._all(0))  # every row at once: for tests and small sets
    targets = property(lambda self: self._all(1))
    documents = property(lambda self: self._all(2))

    def target_count(self) -> int:
        """Targets over every row (without building the rows)."""
        if not self.mask_input:
            return int(self.lengths.sum())
        return sum(int(np.count_nonzero(self.source[i][1][1 : n + 1])) for i, n in zip(self.placed, self.lengths))


def pack(conversations: list[tuple[np.ndarray, np.ndarray]], max_tokens: int, mask_input: bool, pad_id: int,
         order: list[int] | None = None) -> Packed:
    """Conversations (in `order`, default as given) packed greedily into rows of max_tokens positions. A
    conversation of n tokens gives n - 1 positions: inputs ids[:-1], targets ids[1:], a target kept where
    mask_input is False or where the target token is the assistant's. Longer than max_tokens + 1 tokens:
    cut to that many (truncated), or left out when no target survives (dropped)."""
    return Packed(conversations, max_tokens, mask_input, pad_id, order, packed=True)


def padded(conversations: list[tuple[np.ndarray, np.ndarray]], max_tokens: int, mask_input: bool, pad_id: int,
           order: list[int] | None = None) -> Packed:
    """The same conversations one per row, padded to max_tokens: to compare tokens/s with pack's rows."""
    return Packed(conversations, max_tokens, mask_input, pad_id, order, packed=False)
