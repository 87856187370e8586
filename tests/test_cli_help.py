"""Finding one's way in the CLI: `--version`, examples in every `--help` that really apply, `config show` with the
schema's field descriptions, `data inspect --index/--count`, and printed commands that can be pasted back."""

from __future__ import annotations

import re
import shlex
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from support.cli import invoke
from support.tiny import toy_chat_records, write_jsonl

from tunelab import cli
from tunelab.config import load_config
from tunelab.training import RunResult

ROOT = Path(__file__).parents[1]
COMMANDS = [["train"], ["quickstart"], ["runs"], ["config", "show"], ["data", "inspect"], ["generate"], ["chat"], ["serve"],
            ["quantize"], ["export"], ["ui"], ["compare"]]


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.strip() == f"tunelab {version('tunelab')}"


def _help_examples(command: list[str]) -> list[str]:
    text = invoke(*command, "--help").clean
    assert "Examples:" in text, f"tunelab {' '.join(command)} --help has no examples"
    block = text.split("Examples:", 1)[1]
    return [line.strip(" │") for line in block.splitlines() if line.strip(" │").startswith("tunelab ")]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_help_has_examples_that_apply(command: list[str]) -> None:
    examples = _help_examples(command)
    assert examples and all(e.startswith(f"tunelab {' '.join(command)}") for e in examples), examples
    for example in examples:
        words = shlex.split(example.split("#")[0])
        sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
        config = next((w for w in words if w.startswith("examples/")), None)
        if config:  # a shipped config, with its --set overrides, must load
            load_config(ROOT / config, sets)
        elif sets:
            load_config(ROOT / "examples" / "beginner" / "lora-own-chat-data.yaml", sets)
        if command == ["data", "inspect"]:  # no training.* override in an example of inspecting data
            assert all(s.startswith(("data.", "model.")) for s in sets), example
    assert "--set data." in invoke("data", "inspect", "--help").clean  # the option's own example, too


def test_help_examples_use_the_name_tunelab_was_invoked_by(tmp_path: Path) -> None:
    """Installed elsewhere (here: a copy of the console script in another folder, not on PATH), or run as
    `python -m tunelab`, the examples start with that command, so they paste back; and no flag shows a type as if
    it took a value (`--version <bool>`)."""
    import os
    import shutil
    import subprocess

    script = Path(sys.executable).parent / "tunelab"
    elsewhere = tmp_path / "tools" / "bin" / "tunelab"
    elsewhere.parent.mkdir(parents=True)
    shutil.copy(script, elsewhere)
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    for command, expected in (([str(elsewhere)], str(elsewhere)),
                              ([sys.executable, "-m", "tunelab"], f"{shlex.quote(sys.executable)} -m tunelab")):
        out = subprocess.run([*command, "runs", "--help"], env=env, capture_output=True, text=True, timeout=300).stdout
        examples = [line.strip(" │") for line in out.split("Examples:", 1)[1].splitlines() if "runs" in line]
        assert examples and all(e.startswith(f"{expected} runs") for e in examples), out
        assert ".venv/bin/tunelab" not in out and "<bool>" not in out, out
        assert re.search(r"--json\s+Print", out), out  # a flag: no type between it and its help
    top = subprocess.run([str(elsewhere), "--help"], env=env, capture_output=True, text=True, timeout=300).stdout
    assert f"Start with `{elsewhere} quickstart`" in top and "<bool>" not in top and re.search(r"--version\s+Print", top)


def test_config_show_puts_each_fields_description_above_it(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("technique: {name: lora, r: 16}\n")
    result = invoke("config", "show", config)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    r_line = lines.index("  r: 16")
    assert lines[r_line - 1].startswith("  # ") and "rank" in lines[r_line - 1].lower()
    trust = lines.index("  trust_remote_code: false")
    assert lines[trust - 1].startswith("  # Allow model code from the hub to run.")
    assert yaml.safe_load(result.output) == yaml.safe_load(load_config(config).to_yaml())  # still the same YAML
    plain = invoke("config", "show", config, "--no-descriptions")
    assert "#" not in plain.output and yaml.safe_load(plain.output) == yaml.safe_load(result.output)


def test_data_inspect_index_and_count(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(f"model: {{name: {tiny_model_dir}}}\n")
    data = write_jsonl(tmp_path / "chat.jsonl", toy_chat_records(6))
    result = invoke("data", "inspect", data, "--config", config, "--index", "2", "--count", "2")
    assert result.exit_code == 0, result.output
    shown = re.findall(r"Example \S+:(\d+) ", result.clean)
    assert shown == ["3", "4"]  # records 2 and 3 (0-based) are on lines 3 and 4
    assert "⟦fox fox fox" in result.clean and "⟦owl owl owl" in result.clean  # their own answers, supervised
    default = invoke("data", "inspect", data, "--config", config)
    assert re.findall(r"Example \S+:(\d+) ", default.clean) == ["1"]
    beyond = invoke("data", "inspect", data, "--config", config, "--index", "6")
    assert beyond.exit_code == 2 and "the data has 6 records, so the index goes from 0 to 5" in beyond.clean


@pytest.mark.parametrize("argv0, on_path, expected", [
    (".venv/bin/tunelab", None, ".venv/bin/tunelab"),
    ("/opt/env/bin/tunelab", "/opt/env/bin/tunelab", "tunelab"),
    ("/opt/env/bin/tunelab", "/usr/bin/tunelab", "/opt/env/bin/tunelab"),
    ("/x/site-packages/tunelab/__main__.py", None, f"{shlex.quote(sys.executable)} -m tunelab"),
])
def test_the_printed_command_is_the_one_that_was_typed(argv0: str, on_path: str | None, expected: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: on_path)
    assert cli.invoked_as(argv0) == expected


def test_the_resume_hint_uses_the_venv_path_the_user_typed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The defect: `tunelab train ... --resume` was printed, which is not on PATH in the `.venv/bin/tunelab` flow."""
    import tunelab.api

    config = tmp_path / "c.yaml"
    config.write_text("training: {max_steps: 3}\n")
    monkeypatch.setattr(sys, "argv", [".venv/bin/tunelab", "train", str(config)])
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.setattr(tunelab.api, "train", lambda cfg, resume, progress: RunResult(tmp_path, "interrupted", 2))
    result = invoke("train", config, "--set", "eval.num_samples=1")
    assert result.exit_code == 130
    assert f"Continue with: .venv/bin/tunelab train {config} --resume --set=eval.num_samples=1" in result.clean
