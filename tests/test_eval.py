"""Generation for evaluation: it stops at the model's own end-of-turn token, not only the tokenizer's EOS."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.generation import GenerationRequest, Sampling, encode, generate_batch, stop_token_ids


def test_stop_tokens_include_the_models_end_of_turn(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config.eos_token_id = [end_of_text, tokenizer.eos_token_id]
    assert stop_token_ids(model, tokenizer) == [tokenizer.eos_token_id, end_of_text]
    model.generation_config.eos_token_id = None
    assert stop_token_ids(model, tokenizer) == [tokenizer.eos_token_id]


def test_generation_stops_at_a_configured_end_token(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompt = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        first = int(model(ids).logits[0, -1].argmax())  # the greedy first token
    free = generate_batch(model, tokenizer, [GenerationRequest(encode(tokenizer, prompt), Sampling(8))])[0]
    assert free.token_ids[0] == first and len(free.token_ids) > 1  # control: unstopped, it goes on past that token
    model.generation_config.eos_token_id = first  # now the model's first greedy token ends the turn
    stopped = generate_batch(model, tokenizer, [GenerationRequest(encode(tokenizer, prompt), Sampling(8))])[0]
    assert stopped.token_ids == [] and stopped.text == "" and stopped.finish_reason == "stop"
