"""The one generation module: a left-padded, KV-cached batch gives each row what plain unbatched, uncached greedy
decoding gives it alone, and each row stops on its own (end of turn, stop string, budget) while the others go on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.generation import (BASE, ContinuousBatch, GenerationRequest, PrefixCache, Sampling, _Prefix, adjusted_scores,
                                common_prefix, encode, generate_batch, generate_texts, stop_token_ids)
from tunelab.techniques import TECHNIQUES, generation_view

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


# ---------------------------------------------------------------- the per-adapter prompt-prefix cache

SYSTEM = "you are a helpful assistant. answer the question in a few words, the quick brown fox says hello"


def system_prompts(tokenizer, questions: list[str]) -> list[str]:  # noqa: ANN001
    """Chat prompts that share a system prompt and the user turn's header: the prefix a server's requests share."""
    return [tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
                                          tokenize=False, add_generation_prompt=True) for q in questions]


def serve_rounds(batch: ContinuousBatch, model, tokenizer, texts: list[str]) -> list[list[int]]:  # noqa: ANN001
    """Two prompts one after the other (the second lets the batch learn the shared prefix), then all of them at
    once with one that does not start with the prefix (prefilled in full beside them), and one more joining
    mid-decode: the tokens of each request, in order."""
    requests = [GenerationRequest(encode(tokenizer, t), Sampling(10, min_new_tokens=10)) for t in round_texts(tokenizer, texts)]
    for request in requests[:2]:
        batch.add(request)
        run_to_the_end(batch)
    for request in requests[2:-1]:
        batch.add(request)
    batch.step(), batch.step()
    batch.add(requests[-1])
    run_to_the_end(batch)
    return [r.token_ids for r in requests]


def round_texts(tokenizer, texts: list[str]) -> list[str]:  # noqa: ANN001
    return texts[:2] + texts + prompts(tokenizer)[:1] + texts[1:2]


def test_a_cached_prompt_prefix_gives_the_tokens_a_full_prefill_gives(model_and_tokenizer: tuple) -> None:
    """Rows whose prompts start with the shared prefix prefill only the rest of it over the cached keys and values,
    joining an empty batch or a running one, and get exactly what the same batch without the cache gives and what
    each gets alone; the cached prefix is exactly what the prompts share (system prompt, user header and the
    question's common start)."""
    model, tokenizer = model_and_tokenizer
    texts = system_prompts(tokenizer, QUESTIONS)
    ids = [encode(tokenizer, t) for t in texts]
    shared = min(common_prefix(ids[0], other) for other in ids[1:])
    assert shared > 10 and all(len(i) > shared + 3 for i in ids)  # a prefix worth caching, a rest to prefill
    cached, full = ContinuousBatch(model, tokenizer), ContinuousBatch(model, tokenizer, prefix_tokens=0)
    with_cache = serve_rounds(cached, model, tokenizer, texts)
    without = serve_rounds(full, model, tokenizer, texts)
    expected = [alone(model, tokenizer, t, Sampling(10, min_new_tokens=10)).token_ids for t in round_texts(tokenizer, texts)]
    assert with_cache == without == expected
    assert full.prefixes is None
    entry = cached.prefixes.entries[BASE]  # a plain model's rows: the base
    assert entry.tokens == ids[0][:shared] and entry.keys[0].shape[1] == shared  # exactly the shared part
    assert cached.prefixes.reused_tokens == shared * 4  # the four prompts after the first two


def test_a_wrong_cached_prefix_is_caught(model_and_tokenizer: tuple) -> None:
    """Negative controls for the test above: a cached prefix holding another text's keys and values (a system
    prompt one word apart, as many tokens) gives other tokens, so equal tokens there mean right keys and values;
    and a prefix whose tensors do not hold exactly its tokens is refused."""
    model, tokenizer = model_and_tokenizer
    texts, other = system_prompts(tokenizer, QUESTIONS), system_prompts(tokenizer, QUESTIONS)
    other = [t.replace("fox says hello", "dog says hello") for t in other]
    batch, stale = ContinuousBatch(model, tokenizer), ContinuousBatch(model, tokenizer)
    serve_rounds(batch, model, tokenizer, texts[:2]), serve_rounds(stale, model, tokenizer, other[:2])
    entry, wrong = batch.prefixes.entries[BASE], stale.prefixes.entries[BASE]
    assert len(wrong.tokens) == len(entry.tokens) and wrong.tokens != entry.tokens
    batch.prefixes.entries[BASE] = _Prefix(entry.tokens, wrong.keys, wrong.values)
    requests = [GenerationRequest(encode(tokenizer, t), Sampling(10, min_new_tokens=10)) for t in texts]
    for request in requests:
        batch.add(request)
    run_to_the_end(batch)
    expected = [alone(model, tokenizer, t, Sampling(10, min_new_tokens=10)).token_ids for t in texts]
    assert batch.prefixes.reused_tokens > 0 and [r.token_ids for r in requests] != expected
    with pytest.raises(ValueError, match="holds keys/values of widths"):
        _Prefix(entry.tokens + [5], entry.keys, entry.values)


def test_admission_counts_only_the_prompt_tokens_a_row_prefills(model_and_tokenizer: tuple) -> None:
    """With the prefix cached, the prefill budget admits the rows whose uncached rest fits: more rows per pass."""
    model, tokenizer = model_and_tokenizer
    texts = system_prompts(tokenizer, QUESTIONS)
    longest = max(len(encode(tokenizer, t)) for t in texts)
    batch = ContinuousBatch(model, tokenizer, prefill_tokens=longest)
    serve_rounds(batch, model, tokenizer, texts[:2])  # learns the prefix
    for text in texts:
        batch.add(GenerationRequest(encode(tokenizer, text), Sampling(4)))
    batch.step()
    assert len(batch.running) == len(texts) and not batch.waiting  # all rests in one pass: one prompt's budget
    full = ContinuousBatch(model, tokenizer, prefill_tokens=longest, prefix_tokens=0)
    for text in texts:
        full.add(GenerationRequest(encode(tokenizer, text), Sampling(4)))
    full.step()
    assert len(full.running) == 1  # control: whole prompts, one per pass


def fake_prefix(tokens: list[int]) -> _Prefix:
    """Keys and values (1 head, P, 1 dim) whose value at a column is the position: cuts can be followed."""
    column = torch.arange(len(tokens), dtype=torch.float32)[None, :, None]
    return _Prefix(list(tokens), [column.clone()], [column.clone()])


def test_prefix_cache_learns_what_an_adapters_prompts_share_and_cuts_it_where_they_depart() -> None:
    cache = PrefixCache(max_tokens=6, min_tokens=2)
    assert cache.to_learn("a", [1, 2, 3, 4, 5]) == 0  # the first prompt: nothing to compare with
    assert cache.to_learn("b", [1, 2, 3, 9]) == 0  # another adapter's prompts do not count
    assert cache.to_learn("a", [1, 2, 3, 4, 7, 8]) == 4  # shares 4 tokens with the one before
    cache.store("a", fake_prefix([1, 2, 3, 4]))
    assert cache.to_learn("a", [1, 2, 3, 4, 7]) == 0  # learned once
    assert cache.covered("a", [1, 2, 3, 4, 5, 6]) == 4 and len(cache.lookup("a", [1, 2, 3, 4, 5, 6]).tokens) == 4
    short = cache.lookup("a", [1, 2, 3, 4])  # all of it but the last token: its logits give the first new token
    assert short.tokens == [1, 2, 3] and short.keys[0][0, :, 0].tolist() == [0, 1, 2]
    assert cache.entries["a"].tokens == [1, 2, 3, 4]  # a merely shorter prompt leaves the entry whole
    assert cache.lookup("a", [1, 9, 9, 9]) is None and cache.entries["a"].tokens == [1, 2, 3, 4]  # under min_tokens
    cut = cache.lookup("a", [1, 2, 3, 8, 8])  # departs after 3: the entry keeps what every prompt shares
    assert cut.tokens == [1, 2, 3] and cache.entries["a"].tokens == [1, 2, 3] and cut.keys[0].shape[1] == 3
    assert cache.reused_tokens == 4 + 3 + 3
    assert cache.to_learn("c", list(range(20))) == 0 and cache.to_learn("c", list(range(20))) == 6  # max_tokens
    assert cache.to_learn("d", [5, 6, 7]) == 0 and cache.to_learn("d", [5, 6, 7]) == 2  # the last one prefilled
    cache.store("c", fake_prefix(list(range(6))))
    assert cache.nbytes == (3 + 6) * 2 * 4  # float32 keys and values of 3 + 6 tokens
    cache.forget()
    assert not cache.entries and cache.lookup("a", [1, 2, 3, 4, 5]) is None and cache.to_learn("a", [1, 2, 3, 9]) == 0


def test_the_head_gets_a_contiguous_input_in_a_prefill(model_and_tokenizer: tuple) -> None:
    """transformers hands the head the last position as a strided view, which torch multiplies by a broadcast copy
    of the head's weight (a batched product, several times slower); the batch's forward passes hand it a
    contiguous one. Control: the plain model call does hand it a strided view."""
    model, tokenizer = model_and_tokenizer
    seen: list[bool] = []
    handle = model.get_output_embeddings().register_forward_hook(lambda module, args, out: seen.append(args[0].is_contiguous()))
    try:
        ids = torch.tensor([encode(tokenizer, t)[:5] for t in prompts(tokenizer)])  # (3, 5)
        with torch.no_grad():
            model(input_ids=ids, logits_to_keep=1)
        assert seen == [False]  # the control
        batch = ContinuousBatch(model, tokenizer)
        for text in prompts(tokenizer):
            batch.add(GenerationRequest(encode(tokenizer, text), Sampling(3, min_new_tokens=3)))
        run_to_the_end(batch)
    finally:
        handle.remove()
    assert len(seen) == 1 + 3 and all(seen[1:])  # a prefill of the three rows, then two decoding steps


def test_generate_batch_hands_the_head_a_contiguous_input(model_and_tokenizer: tuple) -> None:
    """``generate_batch`` (eval, samples, online objectives' rollouts) prefills through transformers' ``generate``,
    whose head gets the last position as a strided view: without gradients torch then copies the (V, H) weight once
    per row (a (B, H, V) tensor: +432 MiB of a GRPO rollout of 8 rows on SmolLM2). Every head call of the batch,
    the prefill's included, gets a contiguous input."""
    model, tokenizer = model_and_tokenizer
    seen: list[bool] = []
    handle = model.get_output_embeddings().register_forward_hook(lambda module, args, out: seen.append(args[0].is_contiguous()))
    try:
        generate_batch(model, tokenizer, rows(tokenizer, prompts(tokenizer), Sampling(3, min_new_tokens=3)))
    finally:
        handle.remove()
    assert len(seen) == 3 and all(seen)  # the prefill of the three rows, then two decoding steps


def test_decoding_steps_write_the_cache_in_place_and_compute_what_concatenation_computes(
        model_and_tokenizer: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoding step writes its token's keys and values into the room the cache layers keep (no copy of the
    cache: the same buffer from step to step, the views one column wider each time); rows that join or leave get
    new buffers. The logits at every step are bitwise those of transformers' DynamicLayer, which concatenates."""
    import tunelab.generation as generation

    model, tokenizer = model_and_tokenizer
    texts = prompts(tokenizer)

    def serve() -> tuple[list[list[int]], list[torch.Tensor], list[tuple[int, int, int]]]:
        batch = ContinuousBatch(model, tokenizer, prefix_tokens=0)
        logits, layers = [], []
        choose = batch._choose
        batch._choose = lambda scores, rows: (logits.append(scores.clone()), choose(scores, rows))[1]  # type: ignore[method-assign]
        requests = [GenerationRequest(encode(tokenizer, texts[0]), Sampling(14, min_new_tokens=14)),
                    GenerationRequest(encode(tokenizer, texts[1]), Sampling(6, min_new_tokens=6)),
                    GenerationRequest(encode(tokenizer, texts[2]), Sampling(5, min_new_tokens=5))]
        batch.add(requests[0]), batch.add(requests[1])
        for step in range(13):
            if step == 3:
                batch.add(requests[2])  # joins at the 4th step; the second row leaves after its 6th token
            batch.step()
            layer = batch.cache.layers[0]
            layers.append((getattr(layer, "key_room", layer.keys).data_ptr(), layer.keys.data_ptr(), layer.keys.shape[2]))
        run_to_the_end(batch)
        return [r.token_ids for r in requests], logits, layers

    tokens, logits, layers = serve()
    # steps 0-2: the first two rows' prefill and two decoding steps; 3: the third row joins (its prefill, merged by
    # concatenation); 4: the next decoding step takes new buffers; 6 and 7: rows leave; 8-12: the last row decodes
    for steady in (layers[0:3], layers[4:6], layers[8:13]):  # one buffer, the keys at its start, one column more a step
        assert len({room for room, _, _ in steady}) == 1 and all(room == keys for room, keys, _ in steady)
        assert [w for _, _, w in steady] == list(range(steady[0][2], steady[0][2] + len(steady)))
    assert layers[3][1] != layers[3][0] and layers[4][0] != layers[2][0]  # a row joined: new buffers
    monkeypatch.setattr(generation, "_new_cache", lambda model: generation.DynamicCache(config=model.config))
    plain_tokens, plain_logits, plain_layers = serve()
    # control: concatenation copies at every step (each step's keys are a new tensor made while the last is alive;
    # the allocator may hand a freed one's address out again two steps later, so only neighbours are compared)
    plain_keys = [keys for _, keys, _ in plain_layers[8:13]]
    assert all(a != b for a, b in zip(plain_keys, plain_keys[1:]))
    assert tokens == plain_tokens and len(logits) == len(plain_logits) >= 15
    assert all(torch.equal(a, b) for a, b in zip(logits, plain_logits))


# ---------------------------------------------------------------- prompt learning: generate computes the forward


@pytest.fixture(scope="module")
def prefix_model(tiny_model_dir: Path) -> torch.nn.Module:
    """The tiny model with a prefix-tuning adapter whose prefix is far from zero (4 virtual tokens, per layer keys
    and values drawn N(0, 1) by PEFT's embedding, scaled by 4 so that the tokens attend to them)."""
    technique = TECHNIQUES["prefix_tuning"]
    torch.manual_seed(0)
    model = technique.apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir), technique.config_class(num_virtual_tokens=4))
    with torch.no_grad():
        for parameter in model.prompt_encoder.parameters():
            parameter.mul_(4)
    return model.eval()


def forward_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:  # noqa: ANN001
    """Greedy decoding by repeated full forward passes of ``model`` over the prompt and the tokens so far (no
    cache, no padding): the argmax of the last position's logits, cut before the first end-of-turn token."""
    ids, stops, new = encode(tokenizer, prompt), stop_token_ids(model, tokenizer), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([ids + new]), use_cache=False).logits[0, -1].argmax())
            if token in stops:
                break
            new.append(token)
    return new


def test_prefix_tuning_generates_what_its_forward_computes(model_and_tokenizer: tuple, prefix_model: torch.nn.Module) -> None:
    """generate_batch (left-padded rows, KV-cached) and a ContinuousBatch (which runs a prompt-learning model's
    batches through generate_batch, and says so) give each row the tokens of a step-by-step greedy decode by the
    PEFT model's own forward; with the adapter disabled they are other tokens (the prefix matters)."""
    tokenizer = model_and_tokenizer[1]
    texts = prompts(tokenizer)
    expected = [forward_greedy(prefix_model, tokenizer, t, 10) for t in texts]
    assert all(len(e) >= 3 for e in expected)  # several tokens per row, not an early end of turn
    batch = generate_batch(prefix_model, tokenizer, rows(tokenizer, texts, Sampling(10)))
    assert [r.token_ids for r in batch] == expected
    continuous = ContinuousBatch(prefix_model, tokenizer)
    assert not continuous.stepping and "prompt-learning" in continuous.why_not
    for request in rows(tokenizer, texts, Sampling(10)):
        continuous.add(request)
    assert sorted(r.token_ids for r in run_to_the_end(continuous)) == sorted(expected)
    with prefix_model.disable_adapter():
        base = [r.token_ids for r in generate_batch(prefix_model, tokenizer, rows(tokenizer, texts, Sampling(10)))]
        assert base == [forward_greedy(prefix_model, tokenizer, t, 10) for t in texts]
    assert all(b != e for b, e in zip(base, expected))
    # generate without a cache: every step's forward reads the prefix alone, rebuilt by PEFT
    ids = torch.tensor([encode(tokenizer, texts[1])])
    with torch.no_grad(), generation_view(prefix_model):
        out = prefix_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(expected[1]),
                                    do_sample=False, pad_token_id=tokenizer.pad_token_id, use_cache=False)
    assert out[0, ids.shape[1]:].tolist() == expected[1]
