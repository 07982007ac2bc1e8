"""The documentation agrees with the code. README.md is a front door that links every page of docs/ and every
relative link reaches its file; every flag of every script is in exactly one argument table of that script,
with its real default (the convention is in docs/testing.md); the vocabularies agree with tiktoken and the
parameter counts with the model."""

import argparse
import functools
import importlib
import os
import re
from dataclasses import dataclass

import torch

from conftest import ROOT
from data import NAMED_ENCODINGS
from helpers import PAGES, model_shapes, read_text, section, table, tiktoken_vocabulary
from model import GPT, GPTConfig

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


def tokenizer_vocabularies() -> dict[str, int]:
    """The tokenizer table: encoding name -> vocabulary (the row for a local file has none)."""
    rows = table(section("## Tokenizers"))
    return {row[0].split("`")[1]: int(row[1].replace(",", ""))  # `name` (default)
            for row in rows if row[1][0].isdigit()}


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
    script = read_text(os.path.join(ROOT, "experiments", "length_generalisation.sh"))

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


# ----------------------------------------------------------------------------- the front door and the links


def test_the_readme_is_a_front_door():
    lines = README.splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; the manual belongs in docs/"
    top = "\n".join(lines[:30])
    assert "bash quickstart.sh" in top and "bash .ci/run" in top
    linked = {os.path.normpath(target) for target, _ in links("README.md")}
    unlinked = [page for page in PAGES if page.startswith("docs/") and page not in linked]
    assert not unlinked, f"README.md links no {unlinked}"


def links(page: str) -> list[tuple[str, str]]:
    """(path from the root, anchor) of every relative link and image of a page, outside code."""
    text = re.sub(r"```.*?```", "", PAGES[page], flags=re.DOTALL)
    text = re.sub(r"`[^`\n]*`", "", text)
    found = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        path = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        found.append((path, fragment))
    return found


def test_every_relative_link_reaches_a_file_and_its_heading():
    broken = []
    for page in PAGES:
        for path, fragment in links(page):
            if not os.path.exists(os.path.join(ROOT, path)):
                broken.append(f"{page}: {path} does not exist")
            elif fragment and path in PAGES and fragment not in {anchor(t) for _, _, t in headings(PAGES[path])}:
                broken.append(f"{page}: {path} has no heading #{fragment}")
    assert not broken, "\n".join(broken)


# ----------------------------------------------------------------------------- argument tables


@dataclass
class Row:
    page: str
    heading: str
    scripts: tuple[str, ...]  # the scripts its heading names, without .py
    flags: tuple[str, ...]  # the flag and its aliases, from the first cell
    default: str | None  # the Default cell, when the table has one


def argument_rows() -> tuple[list[Row], list[str]]:
    """Every table row that starts with a flag, with the scripts its heading attributes it to, and the rows
    under no "... arguments" heading that names a script."""
    rows, strays = [], []
    for page, text in PAGES.items():
        heading, scripts, header, fenced = "", (), None, False
        for line in text.splitlines():
            if line.startswith("```"):
                fenced = not fenced
            if fenced:
                continue
            if m := re.match(r"#{1,6} (.+)", line):
                heading = m.group(1).strip()
                scripts = tuple(re.findall(r"([\w-]+)\.py\b", heading)) if heading.endswith("arguments") else ()
            if not line.startswith("|"):
                header = None
                continue
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if header is None:
                header = [cell.lower() for cell in cells]
                continue
            if not re.match(r"--[A-Za-z]", cells[0]):
                continue  # the rule under the header, or a table of values (corpora, tokenizers, levels)
            if not scripts:
                strays.append(f"{page}: {line[:60]} (under '{heading}')")
                continue
            default = cells[header.index("default")] if "default" in header else None
            rows.append(Row(page, heading, scripts, tuple(re.findall(r"--[A-Za-z0-9][\w-]*", cells[0])), default))
    return rows, strays


def scripts() -> list[str]:
    """The top-level scripts with a command line: a parse_args and a __main__ block."""
    found = []
    for name in sorted(os.listdir(ROOT)):
        if name.endswith(".py"):
            text = read_text(os.path.join(ROOT, name))
            if "def parse_args(" in text and "__main__" in text:
                found.append(name[:-3])
    return found


class _Built(Exception):
    pass


@functools.cache
def parser(script: str) -> argparse.ArgumentParser:
    """The parser a script's parse_args builds, caught as it starts to parse (nothing is parsed or run)."""
    module = importlib.import_module(script)
    original = argparse.ArgumentParser.parse_known_args

    def caught(self, *args, **kwargs):
        raise _Built(self)

    argparse.ArgumentParser.parse_known_args = caught
    try:
        module.parse_args([])
    except _Built as built:
        return built.args[0]
    finally:
        argparse.ArgumentParser.parse_known_args = original
    raise AssertionError(f"{script}.parse_args returned without parsing")


def options(script: str) -> list[argparse.Action]:
    """The script's flags (its positional arguments and --help aside)."""
    return [a for a in parser(script)._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def test_the_scripts_with_a_command_line_are_found():
    assert {"pretrain", "instruction-tune", "generate", "beam_search", "evaluate", "serve", "export",
            "bench"} <= set(scripts())


def test_every_flag_of_every_script_is_in_exactly_one_table_of_that_script():
    rows, _ = argument_rows()
    problems = []
    for script in scripts():
        mine = [row for row in rows if script in row.scripts]
        for action in options(script):
            where = [f"{row.page} '{row.heading}'" for row in mine if set(action.option_strings) & set(row.flags)]
            if len(where) != 1:
                problems.append(f"{script}.py {action.option_strings[0]}: in {len(where)} tables {where}")
    assert not problems, "\n".join(problems)


def test_every_documented_flag_is_one_the_scripts_of_its_table_take():
    rows, strays = argument_rows()
    assert not strays, "flag rows under no '<script>.py arguments' heading:\n" + "\n".join(strays)
    known, problems = set(scripts()), []
    for row in rows:
        for script in row.scripts:
            if script not in known:
                problems.append(f"{row.page} '{row.heading}': no script {script}.py")
                continue
            actions = {a for a in options(script) if set(a.option_strings) & set(row.flags)}
            if len(actions) != 1 or not set(row.flags) <= set(next(iter(actions)).option_strings):
                problems.append(f"{row.page} '{row.heading}': {script}.py does not take {', '.join(row.flags)} "
                                "(as one flag)")
    assert not problems, "\n".join(problems)


def matches(action: argparse.Action, cell: str) -> bool:
    """Whether a Default cell states the parser's default. The value is the cell's first `code` span, else
    its first word; a switch's is `off`. A default the code works out (None: 'none', "the checkpoint's")
    and one read from an environment variable (`$NAME`) are not compared."""
    if isinstance(action, argparse._StoreTrueAction):
        return cell == "off"
    code = re.match(r"`([^`]*)`", cell)
    text = code.group(1) if code else (cell.split() or [""])[0]
    default = action.default
    if default is None or text.startswith("$"):
        return True
    try:
        if isinstance(default, (tuple, list)):
            values = text.split(",")
            return len(values) == len(default) and all(type(d)(v) == d for d, v in zip(default, values))
        if isinstance(default, bool):
            return text == str(default)
        return type(default)(text) == default
    except ValueError:
        return False


def test_every_documented_default_is_the_parsers():
    rows, _ = argument_rows()
    problems = []
    for row in rows:
        if row.default is None:
            continue
        for script in row.scripts:
            for action in options(script):
                if set(action.option_strings) & set(row.flags) and not matches(action, row.default):
                    problems.append(f"{row.page} '{row.heading}': {row.flags[0]} documents {row.default!r}; "
                                    f"{script}.py's default is {action.default!r}")
    assert not problems, "\n".join(problems)
