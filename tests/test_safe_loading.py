"""YAML and JSON from a user are parsed as data, never as code: a `!!python/...` tag in a `--set` value or in a run
folder's config.yaml is refused with the file (or --set item) named, and the command it carries never runs.
(The config file itself: tests/test_config.py::test_python_tag_is_refused_and_not_executed.)"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunelab.cli import app

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})


def _tag(marker: Path) -> str:
    return f'!!python/object/apply:os.system ["touch {marker}"]'


def test_a_python_tag_in_set_is_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    config = ROOT / "examples" / "beginner" / "quickstart-lora.yaml"
    result = runner.invoke(app, ["config", "show", str(config), "--set", f"model.name={_tag(marker)}"])
    assert result.exit_code == 2, result.output
    assert "--set 'model.name=" in result.output and "safe_load" in result.output and "python/object" in result.output
    assert not marker.exists()


def test_a_python_tag_in_a_run_folders_config_is_refused_by_every_reader(tmp_path: Path) -> None:
    """A run folder from someone else (a download, a shared drive): every command that reads its config.yaml
    refuses the tag, names the file and line, and runs nothing."""
    marker = tmp_path / "executed"
    run = tmp_path / "runs" / "shared"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"model:\n  name: {_tag(marker)}\n")
    (run / "status.json").write_text(json.dumps({"status": "finished"}))
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "completion": "there"}) + "\n")
    for command in (["runs", "show", str(run)], ["generate", str(run), "--prompt", "hi"], ["merge", str(run)],
                    ["eval", str(run), "--data", str(data)], ["quantize", str(run)]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, (command, result.output)
        assert f"{run / 'config.yaml'}:2" in result.output and "safe_load" in result.output, (command, result.output)
    listing = runner.invoke(app, ["runs", str(tmp_path / "runs")])  # one damaged run is listed, not fatal
    assert listing.exit_code == 0 and "unreadable" in listing.output, listing.output
    assert not marker.exists()


UNSAFE_YAML = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all"}
SAFE_LOADERS = {"SafeLoader", "CSafeLoader"}


def test_no_source_file_reads_yaml_unsafely() -> None:
    """Every YAML read in src/ goes through safe_load (or a SafeLoader): a new yaml.load would be caught here."""
    found = []
    for path in sorted((ROOT / "src").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in UNSAFE_YAML and getattr(func.value, "id", None) == "yaml":
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: yaml.{func.attr}")
            for keyword in node.keywords:
                loader = keyword.value
                name = getattr(loader, "attr", None) or getattr(loader, "id", None)
                if keyword.arg == "Loader" and name not in SAFE_LOADERS:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: Loader={name}")
    assert not found, found


@pytest.mark.parametrize("source", ['yaml.load(text, Loader=yaml.Loader)', "yaml.unsafe_load(text)",
                                    "yaml.compose(text, Loader=yaml.FullLoader)"])
def test_the_source_scan_sees_an_unsafe_read(tmp_path: Path, source: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control of the scan above: it finds each unsafe form in a planted source file."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "planted.py").write_text(f"import yaml\n\ndef read(text):\n    return {source}\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="planted.py:4"):
        test_no_source_file_reads_yaml_unsafely()
