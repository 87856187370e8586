"""`tunelab export --format gguf`: the file loads back (transformers' own GGUF reader) and generates the float
model's greedy tokens (exactly in f32), carries the run's chat template, and refuses what it cannot write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.trained import adapter_runs
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.errors import ConfigError
from tunelab.export.gguf import check_type, export_gguf


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return adapter_runs(tmp_path_factory, tiny_model_dir)["dogs"]


def test_f32_export_loads_back_and_generates_the_same_tokens(run: Path) -> None:
    report = export_gguf(run, "f32")
    path = Path(report["file"])
    assert path == run / "exports" / "dogs-f32.gguf" and path.is_file()
    check = report["check"]
    assert check["passed"] and check["same_greedy_tokens"] == 1.0 and check["same_tokenization"] == 1.0
    assert check["chat_template_carried"]
    assert json.loads(path.with_suffix(".json").read_text()) == report


def test_the_file_carries_the_runs_chat_template_and_llama_metadata(run: Path) -> None:
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    path = Path(export_gguf(run, "q8_0", check=False)["file"])
    fields = GGUFReader(path).fields
    template = AutoTokenizer.from_pretrained(run / "tokenizer").chat_template
    assert fields["tokenizer.chat_template"].contents() == template
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"


def test_quantized_types_are_smaller_and_stay_within_their_tolerance(run: Path) -> None:
    sizes = {}
    for quant in ("f16", "q8_0", "q4_0"):
        report = export_gguf(run, quant)
        assert report["check"]["passed"], report
        sizes[quant] = Path(report["file"]).stat().st_size
    assert sizes["q4_0"] < sizes["q8_0"] < sizes["f16"]


def test_what_cannot_be_written_is_refused(run: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="llama-quantize"):
        check_type("q4_k_m")
    with pytest.raises(ConfigError, match="choose one of"):
        check_type("q3")
    mine = tmp_path / "mine.gguf"
    mine.write_text("the user's file")
    with pytest.raises(ConfigError, match="exists"):
        export_gguf(run, "f16", out=mine)
    assert mine.read_text() == "the user's file"


def test_cli_export(run: Path, tmp_path: Path) -> None:
    result = CliRunner(env={"COLUMNS": "300"}).invoke(app, ["export", str(run), "--quant", "f32", "--out", str(tmp_path / "m.gguf")])
    assert result.exit_code == 0, result.output
    assert "greedy tokens equal on 100%" in result.output and "chat template carried" in result.output
    # the check is saved beside the file with --out too (docs/deployment.md), and it is of this file
    assert json.loads((tmp_path / "m.json").read_text())["check"]["passed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "m.json"]  # nothing else in the user's folder
    result = CliRunner().invoke(app, ["export", str(run), "--quant", "q4_k_m"])
    assert result.exit_code == 2 and "llama-quantize" in result.output


def _failing_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """f32 held to more than every prompt: no file can pass its check."""
    from tunelab.export import gguf

    monkeypatch.setitem(gguf.TYPES, "f32", (*gguf.TYPES["f32"][:2], 1.01))


def test_a_file_that_fails_its_check_is_not_left_at_out(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed export leaves no file where it could be used by mistake; its check is saved beside where it was
    to be, and the error says the file was removed and where the check is."""
    _failing_check(monkeypatch)
    out = tmp_path / "deploy" / "m.gguf"
    result = CliRunner(env={"COLUMNS": "300"}).invoke(app, ["export", str(run), "--quant", "f32", "--out", str(out)])
    flat = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert "does not reproduce the model" in flat and "so it was removed" in flat and "m.json" in flat, flat
    assert "wrote" not in flat
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.json"]  # no file, no temporary
    report = json.loads((tmp_path / "deploy" / "m.json").read_text())
    assert report["kept"] is False and report["check"]["passed"] is False


def test_a_failed_export_in_the_run_replaces_the_earlier_one_by_nothing(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In RUN/exports/, an earlier export at the same name is not left beside a report saying the export failed."""
    path = Path(export_gguf(run, "f32", check=False)["file"])
    assert path.is_file()
    _failing_check(monkeypatch)
    report = export_gguf(run, "f32")
    assert not report["kept"] and not path.exists()
    assert json.loads(path.with_suffix(".json").read_text()) == report
    assert not list(path.parent.glob(".*.tmp"))


def test_a_users_check_file_at_out_is_never_replaced(run: Path, tmp_path: Path) -> None:
    mine = tmp_path / "m.json"
    mine.write_text("the user's notes")
    with pytest.raises(ConfigError, match="exists"):
        export_gguf(run, "f32", out=tmp_path / "m.gguf")
    assert mine.read_text() == "the user's notes" and not (tmp_path / "m.gguf").exists()
