"""Nothing outside ``techniques/`` names a technique, and nothing outside ``objectives/`` names an objective: the
rest of the code asks the registries (what a result is, how it opens, whether it mixes in serve, what its card
and console show) instead of testing names.

The check reads the source, not the running code: a string literal that is exactly a registered name (``== "full"``,
``"lora"`` as a default, ``f"adapter{i}"``), or an import of a technique's or objective's own module, is a leak.
Prose that merely mentions a name (a docstring, help text built from the registry) is not."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tunelab.objectives import OBJECTIVES
from tunelab.techniques import TECHNIQUES

SRC = Path(__file__).resolve().parents[1] / "src" / "tunelab"
# registry -> (the package that owns the names, the names)
OWNERS = {"technique": ("techniques", set(TECHNIQUES)), "objective": ("objectives", set(OBJECTIVES))}
# Words of another layer that happen to equal a registered name, each with why it is not that name:
# (file under src/tunelab, word) -> reason. The test fails when an entry no longer occurs, so the list stays true.
OTHER_MEANINGS = {
    ("data/prepare.py", "sft"): "the data layer's kind of SFT-format records (formats.RECORD_KINDS, PreparedData.records), "
                                "which objectives declare they read; data sits below objectives, so it names its own "
                                "record kinds",
    ("eval/report.py", "classification"): "the section of tunelab eval's report for label scoring (eval.json's key), "
                                          "older than the classification objective",
}


def name_leaks(source: str, owner: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, what) for every place in ``source`` that names one of ``names`` outside the ``owner`` package: a
    registered name as a string where code tells techniques (or objectives) apart or chooses one, or an import of
    one's own module. A string elsewhere (a dict key, a list of words, an f-string's text) is another meaning."""
    tree = ast.parse(source)
    leaks = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            base = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            modules = base + [".".join(base + [alias.name]) for alias in node.names]
            owned = [m for m in modules if _owned_module(m, owner, names)]
            if owned:
                leaks.append((node.lineno, f"import {owned[0]}"))
        leaks += [(value.lineno, repr(value.value)) for value in _choosing(node) if _is_name(value, names)]
    return sorted(set(leaks))


def _choosing(node: ast.AST) -> list[ast.AST]:
    """The expressions of ``node`` that pick or test an identity: compared values (==, !=, in), an assigned or
    default value, a ``.get(key, default)`` default, a ``name`` entry or keyword, a registry's subscript."""
    if isinstance(node, ast.Compare):
        return [node.left, *node.comparators]
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        return [node.value] if node.value is not None else []
    if isinstance(node, ast.arguments):
        return [*node.defaults, *(d for d in node.kw_defaults if d is not None)]
    if isinstance(node, ast.Call):
        found = [k.value for k in node.keywords if k.arg == "name"]
        if isinstance(node.func, ast.Attribute) and node.func.attr == "get" and len(node.args) == 2:
            found.append(node.args[1])
        return found
    if isinstance(node, ast.Dict):
        return [v for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant) and k.value == "name"]
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id.isupper():
        return [node.slice]  # TECHNIQUES["lora"], OBJECTIVES["sft"]
    return []


def _is_name(node: ast.AST, names: set[str]) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names


def _owned_module(module: str, owner: str, names: set[str]) -> bool:
    parts = module.split(".")
    return parts[:2] == ["tunelab", owner] and len(parts) > 2 and parts[2] in names


def test_the_scanner_sees_names_and_ignores_prose() -> None:
    names = {"full", "lora"}
    leaky = ('if technique.get("name") != "full":\n    pass\n'
             'default = "lora"\n'
             'spec = TECHNIQUES["lora"]\n'
             "from tunelab.techniques import lora\n"
             "from tunelab.techniques.full import prepare\n"
             "import tunelab.techniques.lora\n"
             'chosen = section.get("name", "lora")\n'
             'config = {"name": "full"}\n'
             'def build(name="lora"): pass\n')
    assert [line for line, _ in name_leaks(leaky, "techniques", names)] == [1, 3, 4, 5, 6, 7, 8, 9, 10]
    prose = ('"""Techniques such as full or lora are listed by the registry."""\n'
             'HELP = f"one of {\', \'.join(TECHNIQUES)}"\n'
             'note = "a full fine-tune"\n'
             'request = {"full": 1, "target": 2}\n'
             'keys = ("target", "lora")\n'
             'key = f"lora{1}"\n'
             'value = report["full"]\n'
             "from tunelab.techniques import TECHNIQUES, base\n")
    assert name_leaks(prose, "techniques", names) == []


@pytest.mark.parametrize("kind", OWNERS)
def test_no_name_outside_its_package(kind: str) -> None:
    owner, names = OWNERS[kind]
    found, other_meanings = [], set()
    for path in sorted(SRC.rglob("*.py")):
        relative = path.relative_to(SRC)
        if relative.parts[0] == owner:
            continue
        for line, what in name_leaks(path.read_text(), owner, names):
            if (relative.as_posix(), what.strip("'")) in OTHER_MEANINGS:
                other_meanings.add((relative.as_posix(), what.strip("'")))
            else:
                found.append(f"src/tunelab/{relative}:{line}: {what}")
    assert not found, (f"these name a {kind} outside {owner}/; ask the registry for what the {kind} declares "
                       "instead:\n" + "\n".join(found))
    stale = {key for key in OTHER_MEANINGS if key[1] in names} - other_meanings
    assert not stale, f"OTHER_MEANINGS lists words no longer there: {sorted(stale)}"
