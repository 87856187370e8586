"""Every code block in docs/ (and the README's Python) runs, in file order, on the real embedded model.

```bash blocks run line by line with the venv's `tunelab`; ```python blocks run with this interpreter. Blocks of
one file share a working folder, so a later block can read the run an earlier one made.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCS = sorted((ROOT / "docs").rglob("*.md"))
BLOCK = re.compile(r"```(bash|python)\n(.*?)```", re.S)

pytestmark = pytest.mark.real


def code_blocks(path: Path) -> list[tuple[str, str]]:
    return BLOCK.findall(path.read_text())


def _sandbox(tmp_path: Path) -> Path:
    for name in ("examples", "src", "docs"):
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path


def _run(kind: str, code: str, cwd: Path) -> str | None:
    """Run one block; return a failure report, or None when every command exited 0."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    commands = [code] if kind == "python" else [line for line in code.splitlines() if line.strip() and not line.startswith("#")]
    for command in commands:
        argv = [sys.executable, "-c", command] if kind == "python" else ["bash", "-c", command]
        done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            return f"{kind} block failed:\n{command}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    return None


def test_docs_have_code_blocks() -> None:
    assert len(DOCS) >= 5
    assert sum(len(code_blocks(p)) for p in DOCS) >= 6


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_code_blocks_run(path: Path, tmp_path: Path) -> None:
    cwd = _sandbox(tmp_path)
    for kind, code in code_blocks(path):
        failure = _run(kind, code, cwd)
        assert failure is None, failure
    # What the docs promise beyond exit code 0: every run their commands start ends finished, with its result and
    # its before/after report (a run left failed or interrupted means a documented command does not work).
    for run_dir in sorted(p.parent for p in cwd.glob("runs/**/config.yaml") if (p.parent / "status.json").is_file()):
        status = json.loads((run_dir / "status.json").read_text())
        assert status["status"] in ("completed", "early_stopped"), f"{path.name}: {run_dir.name} ended {status}"
        assert (run_dir / "eval.json").is_file() and (run_dir / "tokenizer").is_dir(), f"{path.name}: {run_dir.name}"


def test_readme_python_runs(tmp_path: Path) -> None:
    blocks = [code for kind, code in code_blocks(ROOT / "README.md") if kind == "python"]
    assert blocks
    for code in blocks:
        failure = _run("python", code, _sandbox(tmp_path))
        assert failure is None, failure


def test_a_failing_block_is_reported(tmp_path: Path) -> None:
    # Negative control: the runner must not swallow a failing command.
    assert _run("bash", "true\nfalse", tmp_path) is not None
    assert _run("python", "raise SystemExit(3)", tmp_path) is not None
    assert _run("bash", "true", tmp_path) is None
