"""Real tier: the embedded SmolLM2-135M-Instruct, end to end (conversion, LoRA steps, adapter reload, generation).

Marked `real`; `make test` runs it too. The converted model is cached in ~/.cache/tunelab/models (or
$TUNELAB_MODEL_CACHE), so only the first run pays the ~20 s GGUF conversion.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tunelab.config import build_config
from tunelab.models import EMBEDDED_DEFAULT_MODEL, embedded_model_dir, load_model, load_tokenizer

pytestmark = pytest.mark.real

QUICKSTART_DATA = Path(__file__).parents[1] / "src" / "tunelab" / "assets" / "pydoc_qa" / "pydoc_qa.jsonl"


def test_embedded_model_converts_once_and_generates() -> None:
    from tunelab.config import ModelConfig

    directory = embedded_model_dir(EMBEDDED_DEFAULT_MODEL)
    assert (directory / "model.safetensors").is_file() and (directory / "config.json").is_file()
    tokenizer = load_tokenizer(ModelConfig())
    model = load_model(ModelConfig(), torch.device("cpu"))
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.dtype == torch.float32  # dtype auto is float32 on CPU
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**encoded, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_two_lora_steps_on_smollm2_and_adapter_reloads_in_plain_peft(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.training import train

    lines = QUICKSTART_DATA.read_text().splitlines()[:40]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    config = build_config({
        "data": {"train": [str(data)], "val_size": 4, "max_length": 128},
        "technique": {"name": "lora", "r": 8, "dropout": 0.0},
        "training": {"max_steps": 2, "micro_batch_size": 2, "learning_rate": 1e-3},
        "eval": {"num_samples": 1, "max_new_tokens": 16},
        "output": {"dir": str(tmp_path / "run")},
    })
    result = train(config, progress=False)
    assert result.status == "completed" and result.step == 2
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["kind"] == "train"] == [1, 2]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    evaluation = json.loads((result.run_dir / "eval.json").read_text())
    assert evaluation["samples"][0]["tuned"], "the tuned model generated nothing"

    adapter = result.run_dir / "adapter"
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    base_dir = Path(adapter_config["base_model_name_or_path"])
    assert base_dir == embedded_model_dir(EMBEDDED_DEFAULT_MODEL)  # plain transformers can load what it names
    tokenizer = AutoTokenizer.from_pretrained(result.run_dir / "tokenizer")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    ids = tokenizer("def hello(): return 'world'", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        tuned_logits, base_logits = model(ids).logits, base(ids).logits
    assert not torch.allclose(tuned_logits, base_logits), "the adapter changed nothing after 2 steps at lr 1e-3"


@pytest.mark.parametrize("technique", [{"name": "full"}, {"name": "freeze", "layers": [-1]}], ids=lambda t: t["name"])
def test_full_and_freeze_step_on_smollm2_and_reload_in_plain_transformers(technique: dict, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tunelab.training import train

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(QUICKSTART_DATA.read_text().splitlines()[:24]) + "\n")
    config = build_config({
        "data": {"train": [str(data)], "val_size": 4, "max_length": 128},
        "technique": technique,
        "training": {"max_steps": 1, "micro_batch_size": 2, "learning_rate": 1e-4},
        "eval": {"before_after": False},
        "output": {"dir": str(tmp_path / "run")},
    })
    result = train(config, progress=False)
    assert result.status == "completed" and result.step == 1
    model_dir = result.run_dir / "model"
    base_dir = embedded_model_dir(EMBEDDED_DEFAULT_MODEL)
    tuned = AutoModelForCausalLM.from_pretrained(model_dir).eval()  # plain transformers, no tunelab
    assert tuned.lm_head.weight.data_ptr() == tuned.model.embed_tokens.weight.data_ptr()  # tied weights stay tied
    before, after = load_file(str(base_dir / "model.safetensors")), load_file(str(model_dir / "model.safetensors"))
    assert set(before) == set(after)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    if technique["name"] == "freeze":
        assert changed and all(name.startswith("model.layers.29.") for name in changed), sorted(changed)[:5]
    else:
        assert any(name.startswith("model.layers.0.") for name in changed) and "model.embed_tokens.weight" in changed
