"""Technique variants are easy to find and visible afterwards: `--set technique.name=dora` (or bottleneck,
qlora4, ...) is refused with the settings that choose that variant, as the technique declares them, and
`tunelab runs` shows a run's variant next to its technique."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.runs import tiny_config_dict
from support.tiny import toy_chat_records, write_jsonl
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.config import build_config
from tunelab.techniques import TECHNIQUES

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})


@pytest.mark.parametrize("name, expected", [
    ("dora", "--set technique.name=lora --set technique.use_dora=true"),
    ("bottleneck", "--set technique.name=adapter"),
    ("qlora4", "--set technique.name=qlora --set technique.bits=4"),
    ("rslora", "--set technique.name=lora --set technique.use_rslora=true"),
    ("pissa", "--set technique.name=lora --set technique.init=pissa"),
    ("loraplus", "--set technique.name=lora --set technique.loraplus_lr_ratio=16"),
    ("lroa", "Did you mean 'lora'?"),
])
def test_a_variant_name_is_refused_with_the_settings_that_choose_it(name: str, expected: str) -> None:
    config = ROOT / "examples" / "beginner" / "quickstart-lora.yaml"
    result = runner.invoke(app, ["config", "show", str(config), "--set", f"technique.name={name}"])
    assert result.exit_code == 2
    assert f"(got '{name}')" in result.output and expected in " ".join(result.output.split()), result.output


def test_every_declared_variant_hint_is_a_valid_config() -> None:
    """The settings each technique suggests for a variant name exist and validate (a hint must never mislead)."""
    hints = [(t.name, alias, settings) for t in TECHNIQUES.values() for alias, settings in t.variant_names.items()]
    assert {"dora", "bottleneck", "qlora4", "rslora", "pissa", "loraplus"} <= {alias for _, alias, _ in hints}
    for name, alias, settings in hints:
        assert alias not in TECHNIQUES, alias  # a variant name never hides a registered technique
        build_config({"technique": {"name": name, **settings}})


def test_tunelab_runs_shows_the_variant(tiny_model_dir: Path, tmp_path: Path) -> None:
    from tunelab import train

    data = write_jsonl(tmp_path / "train.jsonl", toy_chat_records(8))
    for run, technique in (("plain", {"name": "lora", "r": 2}), ("dora", {"name": "lora", "r": 2, "use_dora": True})):
        train(tiny_config_dict(tiny_model_dir, technique=technique,
                               data={"train": [str(data)], "val_size": 2, "max_length": 64},
                               training={"max_steps": 1, "micro_batch_size": 2},
                               eval={"before_after": False, "forgetting": False},
                               output={"dir": str(tmp_path / "runs" / run)}), progress=False)
    result = runner.invoke(app, ["runs", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert result.output.count("lora (dora)") == 1 and result.output.count("lora (") == 1, result.output  # plain: 'lora'
    shown = runner.invoke(app, ["runs", "show", str(tmp_path / "runs" / "dora")])
    assert "lora (dora)" in shown.output, shown.output
