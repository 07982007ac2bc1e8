"""Where things live stays readable: the network imports nothing of ours, imports run one way (no circle,
late imports inside functions included), common.py stays small, and no function outgrows a screen."""

import ast
import glob
import os

from conftest import ROOT

MODULES = {os.path.splitext(os.path.basename(p))[0]: p for p in glob.glob(os.path.join(ROOT, "*.py"))}
LONGEST_FUNCTION = 60  # lines, decorators left out
COMMON_LINES = 400


def parsed(path: str) -> ast.Module:
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), path)


def imports_of_ours(name: str) -> set[str]:
    """The modules of ours `name` imports anywhere in it (at the top or late, inside a function)."""
    found = set()
    for node in ast.walk(parsed(MODULES[name])):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return (found & set(MODULES)) - {name}


def test_the_network_imports_nothing_of_ours():
    assert imports_of_ours("model") == set()


def test_imports_run_one_way():
    graph = {name: imports_of_ours(name) for name in MODULES}
    done, on_path = set(), []

    def visit(name: str) -> None:
        if name in on_path:
            circle = on_path[on_path.index(name):] + [name]
            raise AssertionError(f"import circle: {' -> '.join(circle)}")
        if name in done:
            return
        on_path.append(name)
        for other in sorted(graph[name]):
            visit(other)
        on_path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    assert {"common", "files", "checkpoint", "hub", "lora", "parallel", "training"} <= set(MODULES)


def test_common_stays_small_and_no_function_outgrows_a_screen():
    with open(MODULES["common"], encoding="utf-8") as f:
        assert len(f.read().splitlines()) <= COMMON_LINES
    long = []
    for path in sorted([*MODULES.values(), *glob.glob(os.path.join(ROOT, "tests", "*.py"))]):
        for node in ast.walk(parsed(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONGEST_FUNCTION:
                    long.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over 60 lines: " + ", ".join(long)
