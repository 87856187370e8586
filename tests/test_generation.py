"""The one generation module: a left-padded, KV-cached batch gives each row what plain unbatched, uncached greedy
decoding gives it alone, and each row stops on its own (end of turn, stop string, budget) while the others go on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.generation import GenerationRequest, Sampling, encode, generate_batch, generate_texts, stop_token_ids

QUESTIONS = ["hello", "what is the capital of france? tell me in one word please", "count from one to five"]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir: Path) -> tuple:
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def prompts(tokenizer) -> list[str]:  # noqa: ANN001
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in QUESTIONS]


def plain_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:  # noqa: ANN001
    """One prompt alone, no padding, no KV cache, cut before the first end-of-turn token."""
    ids = torch.tensor([encode(tokenizer, prompt)])
    stops = stop_token_ids(model, tokenizer)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id, use_cache=False)
    new = out[0, ids.shape[1]:].tolist()
    return next((new[:i] for i, t in enumerate(new) if t in stops), new)


def rows(tokenizer, texts: list[str], sampling: Sampling) -> list[GenerationRequest]:  # noqa: ANN001
    return [GenerationRequest(encode(tokenizer, t), sampling) for t in texts]


def test_a_left_padded_batch_equals_unbatched_uncached_greedy(model_and_tokenizer: tuple) -> None:
    model, tokenizer = model_and_tokenizer
    texts = prompts(tokenizer)
    assert len({len(encode(tokenizer, t)) for t in texts}) == len(texts)  # unequal lengths: rows are padded
    expected = [plain_greedy(model, tokenizer, t, 12) for t in texts]
    batch = generate_batch(model, tokenizer, rows(tokenizer, texts, Sampling(12)))
    assert [r.token_ids for r in batch] == expected
    assert [r.text for r in batch] == [tokenizer.decode(e, skip_special_tokens=True) for e in expected]
    assert sum(len(e) for e in expected) > 12  # the comparison is not between empty outputs
    assert generate_texts(model, tokenizer, texts, Sampling(12), batch_size=2) == [r.text.strip() for r in batch]


def test_each_row_stops_on_its_own(model_and_tokenizer: tuple) -> None:
    model, tokenizer = model_and_tokenizer
    texts = prompts(tokenizer)
    free = [r.token_ids for r in generate_batch(model, tokenizer, rows(tokenizer, texts, Sampling(12)))]
    # An end-of-turn token that row 2 reaches after a few tokens and that row 0 never emits
    position, end = next((i, t) for i, t in enumerate(free[2]) if i > 0 and t not in free[0] and t not in free[2][:i])
    free_text = tokenizer.decode(free[1], skip_special_tokens=True)
    stop = free_text[len(free_text) // 2:][:3]  # a stop string from the middle of row 1's answer
    assert stop.strip()
    sampling = [Sampling(12), Sampling(12, stop=(stop,)), Sampling(12)]
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = end
    try:
        batch = generate_batch(model, tokenizer, [GenerationRequest(encode(tokenizer, t), s) for t, s in zip(texts, sampling)])
    finally:
        model.generation_config.eos_token_id = original
    assert batch[0].token_ids == free[0] and batch[0].finish_reason == "length"  # the others go on
    assert batch[1].text == free_text[:free_text.find(stop)] and batch[1].finish_reason == "stop"
    assert batch[2].token_ids == free[2][:position] and batch[2].finish_reason == "stop"


def test_rows_with_other_sampling_settings_do_not_share_a_batch(model_and_tokenizer: tuple) -> None:
    model, tokenizer = model_and_tokenizer
    texts = prompts(tokenizer)[:2]
    with pytest.raises(ValueError, match="same sampling settings"):
        generate_batch(model, tokenizer, [GenerationRequest(encode(tokenizer, texts[0]), Sampling(4)),
                                          GenerationRequest(encode(tokenizer, texts[1]), Sampling(4, temperature=0.7))])


def test_seeded_sampling_repeats(model_and_tokenizer: tuple) -> None:
    model, tokenizer = model_and_tokenizer
    texts = prompts(tokenizer) * 2  # several completions of one prompt are rows with the same prompt
    sampled = Sampling(10, temperature=1.0, top_p=0.9, top_k=20, seed=3)
    first = [r.token_ids for r in generate_batch(model, tokenizer, rows(tokenizer, texts, sampled))]
    again = [r.token_ids for r in generate_batch(model, tokenizer, rows(tokenizer, texts, sampled))]
    assert first == again and first[0] != first[len(QUESTIONS)]  # repeatable, yet rows of one prompt differ


def test_min_new_tokens_holds_off_the_end_of_turn(model_and_tokenizer: tuple) -> None:
    """What the GGUF check and the quantize comparison rely on: exactly max_new_tokens tokens to compare."""
    model, tokenizer = model_and_tokenizer
    texts = prompts(tokenizer)
    greedy = generate_batch(model, tokenizer, rows(tokenizer, texts[:1], Sampling(10)))[0].token_ids
    end = greedy[1]  # the second greedy token, made the end of turn
    assert end != greedy[0]
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = end
    try:
        fixed = generate_batch(model, tokenizer, rows(tokenizer, texts[:1], Sampling(10, min_new_tokens=10)))[0]
        ended = generate_batch(model, tokenizer, rows(tokenizer, texts[:1], Sampling(10)))[0]
    finally:
        model.generation_config.eos_token_id = original
    assert len(fixed.token_ids) == 10 and end not in fixed.token_ids and fixed.finish_reason == "length"
    assert ended.token_ids == greedy[:1] and ended.finish_reason == "stop"  # control: without min_new_tokens it ends
