"""Prefix tuning's initialisation (techniques/prefix_tuning.py): with init: text the untrained prefix is the base
model's key/value cache of the text, so the model computes what the base computes with the text before the input;
init: zero is PEFT's zero prefix; the settings refuse the combinations that cannot work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from support.tiny import fresh_model

from tunelab.errors import TechniqueError
from tunelab.techniques import TECHNIQUES
from tunelab.techniques.prefix_tuning import DEFAULT_INIT_TEXT

PREFIX = TECHNIQUES["prefix_tuning"]
INPUT = "hello world the cat"


def _settings(**values):  # noqa: ANN003, ANN202
    return PREFIX.config_class(name="prefix_tuning", **values)


def _logits_after_prefix(model_dir: Path, settings) -> torch.Tensor:  # noqa: ANN001
    model = PREFIX.apply(fresh_model(model_dir), settings).eval()
    ids = _ids(model_dir, INPUT)
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits  # (1, T, V)


def _ids(model_dir: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)(text, add_special_tokens=False)["input_ids"]


def _base_logits_with(model_dir: Path, prefix_ids: list[int]) -> torch.Tensor:
    ids = prefix_ids + _ids(model_dir, INPUT)
    with torch.no_grad():
        return fresh_model(model_dir)(input_ids=torch.tensor([ids])).logits[:, len(prefix_ids):]  # (1, T, V)


@pytest.mark.parametrize("text, tokens", [(None, 6), ("the cat", 13)], ids=["default-text", "repeated-text"])
def test_text_init_makes_the_untrained_prefix_the_texts_cache(tiny_model_dir: Path, text: str | None,
                                                               tokens: int) -> None:
    """The model with the untrained prefix gives the base's logits for the input after the text (its tokens
    repeated or cut to num_virtual_tokens); a random prefix does not (the negative control)."""
    settings = _settings(num_virtual_tokens=tokens, **({"init_text": text} if text else {}))
    assert settings.init == "text"
    text_ids = _ids(tiny_model_dir, text or DEFAULT_INIT_TEXT)
    prefix_ids = (text_ids * (tokens // len(text_ids) + 1))[:tokens]
    expected = _base_logits_with(tiny_model_dir, prefix_ids)
    torch.testing.assert_close(_logits_after_prefix(tiny_model_dir, settings), expected, rtol=1e-4, atol=1e-4)
    torch.manual_seed(0)
    random = _logits_after_prefix(tiny_model_dir, _settings(num_virtual_tokens=tokens, init="random"))
    assert (random - expected).abs().max() > 0.1


def test_zero_init_is_pefts_zero_prefix(tiny_model_dir: Path) -> None:
    model = PREFIX.apply(fresh_model(tiny_model_dir), _settings(num_virtual_tokens=4, init="zero"))
    weight = model.prompt_encoder[model.active_adapter].embedding.weight
    assert weight.requires_grad and not weight.any()


def test_settings_refuse_what_cannot_work() -> None:
    assert _settings(prefix_projection=True).init == "random"  # the MLP makes the prefixes: no cache to set
    assert _settings(prefix_projection=True, init="zero").init == "zero"
    for bad, says in (({"prefix_projection": True, "init": "text"}, "prefix_projection"),
                      ({"init": "random", "init_text": "x"}, "only read with init: text"),
                      ({"init_text": "  "}, "init_text is empty")):
        with pytest.raises(ValidationError, match=says):
            _settings(**bad)


def test_text_init_leaves_the_models_mode_and_refuses_a_text_without_tokens(tiny_model_dir: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The text's cache is computed in eval mode and the model goes back to training; a text the tokenizer turns
    into no tokens is refused by name (there is nothing to repeat into the prefix)."""
    model = PREFIX.apply(fresh_model(tiny_model_dir).train(), _settings(num_virtual_tokens=4))
    assert model.base_model.training
    import transformers

    class NoTokens:
        def __call__(self, text: str, **kwargs: object) -> dict[str, list[int]]:
            return {"input_ids": []}

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *args, **kwargs: NoTokens())
    with pytest.raises(TechniqueError, match="has no tokens"):
        PREFIX.apply(fresh_model(tiny_model_dir), _settings(num_virtual_tokens=4, init_text="x"))
