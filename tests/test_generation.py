"""The one generation module: a left-padded, KV-cached batch gives each row what plain unbatched, uncached greedy
decoding gives it alone, and each row stops on its own (end of turn, stop string, budget) while the others go on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.generation import (ContinuousBatch, GenerationRequest, Sampling, adjusted_scores, encode, generate_batch,
                                generate_texts, stop_token_ids)

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


# ---------------------------------------------------------------- continuous batching (tunelab serve's scheduler)


def alone(model, tokenizer, text: str, sampling: Sampling) -> GenerationRequest:  # noqa: ANN001
    return generate_batch(model, tokenizer, [GenerationRequest(encode(tokenizer, text), sampling)])[0]


def run_to_the_end(batch: ContinuousBatch) -> list[GenerationRequest]:
    finished = []
    while not batch.idle:
        finished += batch.step()
    return finished


def test_requests_that_join_and_leave_a_running_batch_get_what_they_get_alone(model_and_tokenizer: tuple) -> None:
    """Rows join at different steps, with their own lengths, budgets and settings, and leave when they finish;
    each gets exactly what generate_batch gives it alone (itself equal to unbatched, uncached greedy)."""
    model, tokenizer = model_and_tokenizer
    texts = prompts(tokenizer) + [prompts(tokenizer)[0] + "again " * 7]
    free = alone(model, tokenizer, texts[1], Sampling(12)).text
    settings = [Sampling(12), Sampling(12, stop=(free[len(free) // 2:][:3],)), Sampling(16, repetition_penalty=3.0),
                Sampling(9, min_new_tokens=9)]
    expected = [alone(model, tokenizer, t, s) for t, s in zip(texts, settings)]
    requests = [GenerationRequest(encode(tokenizer, t), s) for t, s in zip(texts, settings)]
    batch = ContinuousBatch(model, tokenizer, max_rows=3)
    batch.add(requests[0])
    batch.step(), batch.step()
    for request in requests[1:]:  # three more arrive mid-decode; one waits for a free row
        batch.add(request)
    batch.step()
    assert len(batch.running) == 3 and len(batch.waiting) == 1
    finished = run_to_the_end(batch)
    assert sorted(map(id, finished)) == sorted(map(id, requests))  # each reported finished once
    assert [r.token_ids for r in requests] == [e.token_ids for e in expected]
    assert [r.text for r in requests] == [e.text for e in expected]
    assert [r.finish_reason for r in requests] == [e.finish_reason for e in expected]
    assert requests[1].finish_reason == "stop" and sum(len(e.token_ids) for e in expected) > 30  # not vacuous


def test_a_request_joining_mid_decode_gets_its_first_token_before_the_running_ones_finish(model_and_tokenizer: tuple) -> None:
    model, tokenizer = model_and_tokenizer
    texts = prompts(tokenizer)
    first, second = GenerationRequest(encode(tokenizer, texts[0]), Sampling(30, min_new_tokens=30)), \
        GenerationRequest(encode(tokenizer, texts[1]), Sampling(8, min_new_tokens=8))
    batch = ContinuousBatch(model, tokenizer)
    batch.add(first)
    for _ in range(3):
        batch.step()
    batch.add(second)
    batch.step()  # the step it joins at: its prefill gives its first token, and has priority over decoding
    assert len(second.token_ids) == 1 and not first.done and len(first.token_ids) == 3
    batch.step()  # then both decode together
    assert len(second.token_ids) == 2 and len(first.token_ids) == 4
    run_to_the_end(batch)
    assert second.token_ids == alone(model, tokenizer, texts[1], second.sampling).token_ids
    assert first.token_ids == alone(model, tokenizer, texts[0], first.sampling).token_ids


def test_a_row_that_leaves_takes_its_cache_columns_along(model_and_tokenizer: tuple) -> None:
    model, tokenizer = model_and_tokenizer
    short, long = encode(tokenizer, prompts(tokenizer)[0]), encode(tokenizer, prompts(tokenizer)[1])
    assert len(long) > len(short) + 5
    batch = ContinuousBatch(model, tokenizer)
    keep = GenerationRequest(short, Sampling(12, min_new_tokens=12))
    batch.add(keep), batch.add(GenerationRequest(long, Sampling(1)))
    batch.step()  # the long prompt's row ends at its first token
    assert batch.running == [keep]
    assert batch.mask.shape[1] == len(short) + len(keep.token_ids) - 1 == batch.cache.layers[0].keys.shape[2]


def test_prefill_per_step_is_bounded(model_and_tokenizer: tuple) -> None:
    """Prompts join within ``prefill_tokens`` per forward pass (a burst's first requests get their first token
    after the first slice, not after the whole burst), one at least; slices follow each other with no decoding
    step in between while requests wait."""
    model, tokenizer = model_and_tokenizer
    batch = ContinuousBatch(model, tokenizer, prefill_tokens=1)
    requests = [GenerationRequest(encode(tokenizer, text), Sampling(8, min_new_tokens=8)) for text in prompts(tokenizer)]
    for request in requests:
        batch.add(request)
    batch.step()
    assert len(batch.running) == 1 and len(batch.waiting) == 2
    batch.step()
    assert len(batch.running) == 2 and [len(r.token_ids) for r in requests] == [1, 1, 0]
    batch.step()
    assert [len(r.token_ids) for r in requests] == [1, 1, 1] and not batch.waiting
    batch.step()
    assert [len(r.token_ids) for r in requests] == [2, 2, 2]  # all admitted: decoding resumes


def test_a_seeded_row_repeats_whatever_shares_its_batch(model_and_tokenizer: tuple) -> None:
    model, tokenizer = model_and_tokenizer
    texts = prompts(tokenizer)
    sampled = Sampling(12, temperature=1.0, top_p=0.95, top_k=50, seed=7)

    def seeded_row(company: list[str], global_seed: int) -> list[int]:
        torch.manual_seed(global_seed)  # the global generator is not what a seeded row draws from
        batch = ContinuousBatch(model, tokenizer)
        row = GenerationRequest(encode(tokenizer, texts[0]), sampled)
        for text in company:
            batch.add(GenerationRequest(encode(tokenizer, text), Sampling(12, temperature=1.0)))
        batch.step()
        batch.add(row)
        run_to_the_end(batch)
        return row.token_ids

    first = seeded_row([], 0)
    assert seeded_row(texts[1:], 1) == first and len(first) > 3
    assert seeded_row([], 2) == first


@pytest.mark.parametrize("settings", [Sampling(temperature=0.7, top_k=5), Sampling(temperature=1.3, top_p=0.8),
                                      Sampling(temperature=0.9, top_k=40, top_p=0.6, repetition_penalty=1.5),
                                      Sampling(repetition_penalty=2.0, min_new_tokens=3)])
def test_per_row_settings_adjust_the_logits_as_transformers_does(settings: Sampling) -> None:
    from transformers import LogitsProcessorList
    from transformers.generation.logits_process import (MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=generator)
    request = GenerationRequest([3, 4, 4, 9], settings, token_ids=[11, 3])
    stops = [1, 2]
    processors = LogitsProcessorList()
    if settings.repetition_penalty:
        processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    processors.append(MinNewTokensLengthLogitsProcessor(4, settings.min_new_tokens, stops))
    if not settings.greedy:
        processors += [TemperatureLogitsWarper(settings.temperature)] + \
            ([TopKLogitsWarper(settings.top_k)] if settings.top_k else []) + \
            ([TopPLogitsWarper(settings.top_p)] if settings.top_p < 1 else [])
    expected = processors(torch.tensor([[3, 4, 4, 9, 11, 3]]), logits[None].clone())[0]
    ours = adjusted_scores(logits, request, settings.repetition_penalty, stops)
    kept = int((~torch.isinf(ours)).sum())
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    assert 1 < kept < 50 - (0 if settings.greedy else 5)  # a few tokens removed, yet a choice left
    assert torch.allclose(ours[~torch.isinf(ours)], expected[~torch.isinf(expected)])


def test_without_continuous_batching_a_request_waits_for_the_running_batch_to_end(model_and_tokenizer: tuple) -> None:
    """The comparison point of benchmarks/serve.py (the scheduling tunelab serve had before): whole batches."""
    model, tokenizer = model_and_tokenizer
    texts = prompts(tokenizer)
    batch = ContinuousBatch(model, tokenizer)
    batch.continuous = False
    first = GenerationRequest(encode(tokenizer, texts[0]), Sampling(10, min_new_tokens=10))
    batch.add(first)
    assert batch.step() == [first] and len(first.token_ids) == 10  # one step runs the batch to its end
    together = [GenerationRequest(encode(tokenizer, t), Sampling(6)) for t in texts[1:]]
    for request in together:
        batch.add(request)
    assert batch.step() == together and batch.idle
    assert [r.token_ids for r in together] == [alone(model, tokenizer, t, Sampling(6)).token_ids for t in texts[1:]]
