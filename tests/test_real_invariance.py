"""Real tier: SmolLM2-135M in bfloat16, made row-invariant (tunelab.invariance), gives every request of a
continuous batch, and every row of a left-padded offline batch, the tokens the same prompt gets alone. In plain
bfloat16 4-6 of 16 such answers departed after 5-22 tokens on the development host (docs/deployment.md)."""

from __future__ import annotations

import pytest
import torch
from support.greedy import tokens_alone_offline_and_joining
from transformers import AutoModelForCausalLM

from tunelab import invariance
from tunelab.generation import Sampling
from tunelab.models import EMBEDDED_DEFAULT_MODEL, embedded_model_dir, load_tokenizer, ModelConfig
from tunelab.result import row_invariant

pytestmark = pytest.mark.real

QUESTIONS = ["My chain keeps slipping. What should I check?", "How do I use `json.dumps`?",
             "What tyre pressure should I use?", "Explain `atexit.register`.", "How often should I oil my chain?",
             "What does `os.path.join` do?", "My brakes squeal. Why?", "How do I sort a list of tuples by the second item?"]


def test_smollm2_in_bfloat16_answers_each_request_of_a_batch_as_alone() -> None:
    path = embedded_model_dir(EMBEDDED_DEFAULT_MODEL)
    tokenizer = load_tokenizer(ModelConfig(name=str(path)))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    assert row_invariant(model, tokenizer) is None  # the probe: every product shape keeps its rows' bits
    questions = QUESTIONS + [q + " Please be brief." for q in QUESTIONS[:4]]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"] for q in questions]
    alone, offline, joining, batch = tokens_alone_offline_and_joining(model, tokenizer, prompts,
                                                                      Sampling(max_new_tokens=16), 3)  # prefix cache on
    assert joining == alone
    assert offline == alone
    assert batch.prefixes.reused_tokens > 0 and invariance.is_row_invariant(model)


def test_smollm2_with_float32_lora_adapters_keeps_its_rows_at_this_hosts_threads() -> None:
    """Served adapters keep float32 weights under a bfloat16 base (PEFT's default), and their products are the ones
    that rounded with the batch: at two threads a (9-11, 8) x (8, 576) float32 product gave its first rows other bits
    than each alone, so `tunelab serve` at torch's default threads fell back to float32. The probe runs at the real
    tier's threads (every core)."""
    from peft import LoraConfig, get_peft_model

    path = embedded_model_dir(EMBEDDED_DEFAULT_MODEL)
    tokenizer = load_tokenizer(ModelConfig(name=str(path)))
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False)).eval()
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    assert row_invariant(model, tokenizer) is None

