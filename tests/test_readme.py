"""The documentation's numbers agree with the code: vocabularies with tiktoken, parameter counts with the model."""

import functools
import os
import re

import torch

from conftest import ROOT
from data import NAMED_ENCODINGS
from model import GPT, GPTConfig

DOCS = os.path.join(ROOT, "docs")


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


# Every page of the documentation by its path from the root: README.md first, then docs/*.md in order.
PAGES = {"README.md": _read(os.path.join(ROOT, "README.md"))} | {
    f"docs/{name}": _read(os.path.join(DOCS, name)) for name in sorted(os.listdir(DOCS)) if name.endswith(".md")}
README = PAGES["README.md"]

# ----------------------------------------------------------------------------- reading Markdown


def headings(text: str):
    """(line number, level, title) of each heading outside code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines()):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"(#{1,6}) (.+)", line)):
            yield number, len(m.group(1)), m.group(2).strip()


def section(heading: str) -> str:
    """From the heading that starts with `heading` to the next heading, on the first page that has it."""
    for text in PAGES.values():
        start = re.search(rf"^{re.escape(heading)}.*\n", text, re.MULTILINE)
        if start:
            end = re.compile(r"^#", re.MULTILINE).search(text, start.end())
            return text[start.start() : end.start() if end else None]
    raise AssertionError(f"no page has a heading {heading!r}")


def table(text: str) -> list[list[str]]:
    """The body rows of the first Markdown table in text, as lists of cell strings."""
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row] for row in rows[2:]]  # past the header and the rule


def anchor(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


# ----------------------------------------------------------------------------- the numbers


def quick_start_config() -> GPTConfig:
    """The shape the quick start's command trains (byte tokens: 257 ids)."""
    text = section("# Quick start")
    assert "--token_encoding bytes" in text
    flags = ("embedding_dimensions", "num_attention_heads", "num_hidden_layers")
    return GPTConfig(vocabulary_size=257, **{f: int(re.search(rf"--{f} (\d+)", text).group(1)) for f in flags})


def rounded(parameters: int) -> str:
    """How the documentation writes a parameter count: one decimal, in millions below a billion."""
    return f"{parameters / 1e9:.1f}B" if parameters >= 1e9 else f"{parameters / 1e6:.1f}M"


@functools.cache
def num_parameters(config: GPTConfig) -> int:
    with torch.device("meta"):  # shapes only: even the 104.7B model allocates nothing
        return GPT(config).num_parameters()


def tiktoken_vocabulary(name: str, monkeypatch) -> int:
    """An encoding's vocabulary as tiktoken declares it, without downloading its rank file."""
    import tiktoken_ext.openai_public as public

    monkeypatch.setattr(public, "load_tiktoken_bpe", lambda *args, **kwargs: {})
    spec = getattr(public, name)()
    return spec.get("explicit_n_vocab") or max(spec["special_tokens"].values()) + 1


def tokenizer_vocabularies() -> dict[str, int]:
    """The tokenizer table: encoding name -> vocabulary (the row for a local file has none)."""
    rows = table(section("## Tokenizers"))
    return {row[0].split("`")[1]: int(row[1].replace(",", ""))  # `name` (default)
            for row in rows if row[1][0].isdigit()}


def model_shapes() -> list[tuple[str, GPTConfig, str, str]]:
    """The suggested shapes: name, the config the row describes, its written parameter count and its --model
    name."""
    shapes = []
    for name, vocabulary, width, heads, layers, parameters, _, flag in table(section("## Suggested model shapes")):
        config = GPTConfig(vocabulary_size=int(vocabulary.replace(",", "")), embedding_dimensions=int(width),
                           num_attention_heads=int(heads), num_hidden_layers=int(layers))
        shapes.append((name, config, parameters, flag.strip("`")))
    return shapes


def test_tokenizer_table_matches_tiktoken(monkeypatch):
    vocabularies = tokenizer_vocabularies()
    for name in NAMED_ENCODINGS:
        assert vocabularies[name] == tiktoken_vocabulary(name, monkeypatch), name
    assert vocabularies["bytes"] == 257


def test_model_shapes_use_real_vocabularies_and_exact_parameter_counts():
    shapes = model_shapes()
    assert [name for name, _, _, _ in shapes] == ["Small", "Medium", "Large", "X-large", "XX-large", "XXX-large"]
    assert shapes[0][1] == GPTConfig()  # Small is the default shape
    vocabularies = set(tokenizer_vocabularies().values())
    for name, config, _, _ in shapes:
        assert config.vocabulary_size in vocabularies, (f"{name}: vocabulary {config.vocabulary_size:,} "
                                                        "is no tokenizer's")
    for name, config, parameters, _ in shapes:
        assert parameters == rounded(num_parameters(config)), name


def length_experiment_config() -> GPTConfig:
    """The shape experiments/length_generalisation.sh trains (byte tokens: a vocabulary of 257)."""
    script = _read(os.path.join(ROOT, "experiments", "length_generalisation.sh"))

    def flag(name: str) -> int:
        return int(re.search(rf"--{name} (\d+)", script).group(1))

    return GPTConfig(vocabulary_size=257, embedding_dimensions=flag("embedding_dimensions"),
                     num_attention_heads=flag("num_attention_heads"), num_hidden_layers=flag("num_hidden_layers"))


def test_every_parameter_count_in_the_documentation_is_a_real_one():
    counts = {name: rounded(num_parameters(config)) for name, config, _, _ in model_shapes()}
    known = {*counts.values(), rounded(num_parameters(quick_start_config())),
             rounded(num_parameters(length_experiment_config()))}
    mentions = [(page, mention) for page, text in PAGES.items()
                for mention in re.findall(r"(\d[\d.]*[MB])(?:[- ]parameter| Small\b)", text)]
    assert len(mentions) >= 4  # the model card, the quick start, generation and the sharding section
    for page, mention in mentions:
        assert mention in known, f"{page} mentions {mention} parameters; the models have {sorted(known)}"
    assert f"{counts['Small']} parameters" in section("## The model")  # the model card
