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
    assert not (tmp_path / "m.json").exists()  # nothing besides what was asked for in the user's folder
    result = CliRunner().invoke(app, ["export", str(run), "--quant", "q4_k_m"])
    assert result.exit_code == 2 and "llama-quantize" in result.output
