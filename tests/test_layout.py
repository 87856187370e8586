"""The test suite's own rules, read from the source (nothing is imported or run):
- one naming rule for the tiers: a file is `tests/test_real_*.py` exactly when its tests carry the `real` marker
  (module-wide, so `-m "not real"` leaves the whole file out);
- no test module imports another test module or conftest: shared helpers live in `tests/support/`;
- no test module spells the tiny model's config section by hand: `support.runs` builds tiny configs."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
TEST_FILES = sorted(TESTS.glob("test_*.py"))
HAND_TYPED_MODEL = re.compile(r'"name":\s*str\(\w*model_dir\)')  # a hand-typed model section on the tiny model


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _is_real_marker(node: ast.AST) -> bool:
    """`pytest.mark.real` (possibly inside a list of marks)."""
    return (isinstance(node, ast.Attribute) and node.attr == "real" and isinstance(node.value, ast.Attribute)
            and node.value.attr == "mark")


def _module_marks(tree: ast.Module) -> list[ast.AST]:
    """The marks assigned to `pytestmark` at module level: `pytestmark = pytest.mark.x` or `= [..]`."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            return list(node.value.elts) if isinstance(node.value, (ast.List, ast.Tuple)) else [node.value]
    return []


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: p.name)
def test_real_tier_files_are_named_test_real_and_carry_the_marker(path: Path) -> None:
    tree = _tree(path)
    module_wide = any(_is_real_marker(mark) for mark in _module_marks(tree))
    anywhere = any(_is_real_marker(node) for node in ast.walk(tree))
    if path.name.startswith("test_real_"):
        assert module_wide, f"{path.name}: a real-tier file needs `pytestmark = pytest.mark.real` at module level"
    else:
        assert not anywhere, (f"{path.name}: uses the `real` marker; real-model tests live in tests/test_real_*.py "
                              "(rename the file or move the test)")


def _imported_modules(tree: ast.Module) -> set[str]:
    """Top-level names of every module imported anywhere in the file (function-level imports too)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: p.name)
def test_no_test_module_imports_another_test_module(path: Path) -> None:
    test_modules = {p.stem for p in TEST_FILES} | {"conftest"}
    imported = sorted(_imported_modules(_tree(path)) & test_modules)
    assert not imported, f"{path.name} imports {imported}: move what it needs into tests/support/"


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: p.name)
def test_tiny_configs_come_from_support(path: Path) -> None:
    """A config on the tiny model goes through support.runs (tiny_config, tiny_config_dict, tiny_run_config)."""
    assert not HAND_TYPED_MODEL.search(path.read_text()), (
        f"{path.name} types a config on the tiny model by hand: use support.runs.tiny_config (any sections) or "
        "tiny_run_config (the tiny run, with overrides)")
