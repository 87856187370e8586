"""The technique interface: the compatibility matrix (config validation, the generated docs table), optimizer
parameter groups, per-step hooks, how the base is loaded, and the meta-device skeleton."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunelab.config import ConfigError, build_config
from tunelab.techniques import TECHNIQUES
from tunelab.techniques import compat
from tunelab.trainer import make_optimizer


def test_docs_compatibility_table_equals_the_declarations() -> None:
    text = compat.DOCS_TABLE.read_text()
    assert compat.render_docs(text) == text, "run: python -m tunelab.techniques.compat --write"
    for name in TECHNIQUES:
        assert f"| `{name}` |" in text


def test_every_refusal_names_a_known_feature_with_a_reason() -> None:
    matrix = compat.matrix()
    assert set(matrix) == set(TECHNIQUES)
    for name, cells in matrix.items():
        for feature, reason in cells.items():
            assert reason is None or len(reason) > 20, (name, feature)
            if feature == "merge":
                assert (reason is None) == (TECHNIQUES[name].merge is not None)


def test_a_refusal_of_an_unknown_feature_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    bad = dataclasses.replace(TECHNIQUES["lora"], refuses={"packnig": "typo"})
    monkeypatch.setitem(TECHNIQUES, "lora", bad)
    with pytest.raises(RuntimeError, match="packnig"):
        compat.matrix()


def test_loraplus_gives_b_matrices_the_ratio_times_the_rate(tiny_model_dir: Path) -> None:
    config = build_config({"technique": {"name": "lora", "r": 4, "loraplus_lr_ratio": 16},
                           "training": {"learning_rate": 1e-3}})
    model = TECHNIQUES["lora"].apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config.technique)
    optimizer = make_optimizer(model, config)
    rate_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    names = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_B" in n for n, _ in names) and any("lora_A" in n for n, _ in names)
    for name, param in names:
        assert rate_of[id(param)] == pytest.approx(1.6e-2 if "lora_B" in name else 1e-3), name
    plain = make_optimizer(model, build_config({"technique": {"name": "lora", "r": 4}, "training": {"learning_rate": 1e-3}}))
    assert {g["lr"] for g in plain.param_groups} == {1e-3}


def test_the_skeleton_has_no_weights_and_the_same_modules(tiny_model_dir: Path) -> None:
    from tunelab.models import model_skeleton

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    skeleton = model_skeleton(model.config)
    assert all(p.is_meta for p in skeleton.parameters())
    assert [n for n, _ in skeleton.named_parameters()] == [n for n, _ in model.named_parameters()]
