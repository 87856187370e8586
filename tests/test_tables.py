"""Tables never fold or cut an identifier, even piped at 80 columns (`tunelab techniques | grep NAME` finds it),
and each table command prints its data as JSON with --json."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.cli import invoke
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.techniques import TECHNIQUES

LONG_RUN = "multitask_prompt_tuning-on-the-support-chat-data-with-a-long-name"


def piped(*args: str) -> str:
    """The command's stdout through a pipe (not a terminal), at 80 columns, as `tunelab ... | grep` sees it."""
    result = subprocess.run([sys.executable, "-m", "tunelab", *args], env={**os.environ, "COLUMNS": "80"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def grep_w(name: str, text: str) -> list[str]:
    """The lines `grep -w NAME` prints."""
    return [line for line in text.splitlines() if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", line)]


@pytest.fixture
def runs_folder(tmp_path: Path) -> Path:
    """A folder with one run whose name, path and technique are longer than an 80-column table allows."""
    run = tmp_path / "runs" / LONG_RUN
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model:\n  name: HuggingFaceTB/SmolLM2-135M-Instruct\ntechnique:\n"
                                     "  name: multitask_prompt_tuning\ntraining:\n  learning_rate: 0.001\n")
    (run / "status.json").write_text(json.dumps({"status": "completed", "step": 10}))
    return run.parent


def test_techniques_piped_at_80_columns_keeps_every_name_whole(tiny_model_dir: Path) -> None:
    out = piped("techniques", "--model", str(tiny_model_dir))
    for name in TECHNIQUES:
        assert grep_w(name, out), f"{name} is folded:\n{out}"


def test_runs_at_80_columns_keeps_run_technique_and_model_whole(runs_folder: Path) -> None:
    # In-process (CliRunner's output is no terminal either, as a pipe): a second process start costs ~10 s.
    out = CliRunner(env={"COLUMNS": "80", "NO_COLOR": "1"}).invoke(app, ["runs", str(runs_folder)]).stdout
    [row] = grep_w(str(runs_folder / LONG_RUN), out)
    assert grep_w("multitask_prompt_tuning", row) and grep_w("HuggingFaceTB/SmolLM2-135M-Instruct", row), out


def test_table_commands_print_json(tiny_model_dir: Path, runs_folder: Path) -> None:
    techniques = json.loads(invoke("techniques", "--model", tiny_model_dir, "--json").stdout)
    assert [t["technique"] for t in techniques] == list(TECHNIQUES)
    lora = next(t for t in techniques if t["technique"] == "lora")
    assert lora["merges"] is True and lora["trainable"] > 0 and lora["why_not_merge"] is None
    listed = json.loads(invoke("runs", runs_folder, "--json").stdout)
    assert [(r["run"], r["technique"], r["step"]) for r in listed] == [(str(runs_folder / LONG_RUN), "multitask_prompt_tuning", 10)]
    shown = json.loads(invoke("runs", "show", runs_folder / LONG_RUN, "--json").stdout)
    assert shown["summary"]["status"] == "completed" and shown["config"]["technique"]["name"] == "multitask_prompt_tuning"
    for command in (["eval", "--help"], ["quantize", "--help"]):
        assert "--json" in invoke(*command).stdout, command
