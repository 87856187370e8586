"""`load_run` opens a finished run's result for any technique, with the logits training ended with."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.runs import tiny_run_config

from tunelab.training import session
from tunelab.config import ConfigError
from tunelab.result import load_run


@pytest.mark.parametrize("technique", [{"name": "lora", "r": 4, "dropout": 0.0}, {"name": "full"}], ids=["lora", "full"])
def test_load_run_gives_the_logits_training_ended_with(tiny_model_dir: Path, tmp_path: Path, technique: dict,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    probe = torch.tensor([[5, 17, 42, 99, 7, 3]])
    seen: dict[str, torch.Tensor] = {}
    save = session._save_result

    def save_and_probe(ctx):  # noqa: ANN001, ANN202 - the trainer's own context
        model = ctx.accelerator.unwrap_model(ctx.model).eval()
        with torch.no_grad():
            seen["logits"] = model(input_ids=probe).logits
        return save(ctx)

    monkeypatch.setattr(session, "_save_result", save_and_probe)
    config = tiny_run_config(tiny_model_dir, tmp_path, technique=technique, training={"max_steps": 4})
    result = session.train(config, progress=False)
    loaded = load_run(result.run_dir, device="cpu")
    with torch.no_grad():
        logits = loaded.model(input_ids=probe).logits
    torch.testing.assert_close(logits, seen["logits"], rtol=1e-5, atol=1e-5)
    assert loaded.tokenizer.chat_template  # the run's tokenizer, chat template included
    # Negative control: the untouched base gives other logits, so the comparison above can fail.
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=probe).logits
    assert not torch.allclose(base_logits, seen["logits"], atol=1e-4)


def test_load_run_refuses_what_is_not_a_finished_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a tunelab run folder"):
        load_run(tmp_path)
    # a path that does not exist is named as such, not as a folder of the wrong kind
    with pytest.raises(ConfigError, match=r"runs/nonexistent: no such folder \(a run folder"):
        load_run(tmp_path / "runs" / "nonexistent")
