"""One unit convention: sizes are computed in binary units (bytes / 2**20) and labelled MiB/GiB wherever tunelab
prints or writes them; a decimal label (MB, GB) on a binary figure read 513.2 "MB" for a 538,090,408-byte file."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import tunelab

DECIMAL_LABEL = re.compile(r"\b[KMGT]B\b")
ROOT = Path(tunelab.__file__).resolve().parent


def _decimal_labels(folder: Path) -> list[str]:
    found = []
    for file in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and DECIMAL_LABEL.search(node.value):
                found.append(f"{file.relative_to(folder.parent)}:{node.lineno}: {node.value.strip()[:80]!r}")
    return found


def test_no_printed_or_written_label_uses_decimal_units() -> None:
    """Every string in the package and the benchmarks (labels, table headers, messages) says MiB/GiB."""
    assert _decimal_labels(ROOT) == []
    assert _decimal_labels(ROOT.parent.parent / "benchmarks") == []


def test_the_web_page_labels_sizes_mib() -> None:
    page = (ROOT / "serve" / "static" / "index.html").read_text()
    assert "size MiB" in page and not DECIMAL_LABEL.search(page)


def test_the_quantize_tables_label_their_binary_sizes_mib() -> None:
    from tunelab.eval.report import QUANTIZE_COLUMNS

    assert [label for label, key, _ in QUANTIZE_COLUMNS if key.endswith("_mb")] == ["size MiB", "memory MiB"]
