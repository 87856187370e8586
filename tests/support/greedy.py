"""The reference a served model must match: greedy generation with plain transformers, no server in between."""

from __future__ import annotations

from typing import Any

import torch


def offline_greedy(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, special: bool = False,
                   repetition_penalty: float | None = None) -> str:
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=special)["input_ids"]])
    extra = {"repetition_penalty": repetition_penalty} if repetition_penalty is not None else {}
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
                             **extra)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def tokens_alone_offline_and_joining(model: Any, tokenizer: Any, prompts: list[list[int]], sampling: Any,
                                     first: int, **batch_options: Any) -> tuple[list, list, list, Any]:
    """Greedy token ids of each prompt alone (``generate_batch`` of one), of all prompts in one left-padded
    ``generate_batch``, and through a ``ContinuousBatch`` where ``first`` requests start and the rest join two
    steps later; and that batch."""
    from tunelab.generation import ContinuousBatch, GenerationRequest, generate_batch

    alone = []
    for prompt in prompts:
        request = GenerationRequest(list(prompt), sampling)
        generate_batch(model, tokenizer, [request])
        alone.append(request.token_ids)
    offline = [GenerationRequest(list(p), sampling) for p in prompts]
    generate_batch(model, tokenizer, offline)
    batch = ContinuousBatch(model, tokenizer, **batch_options)
    joining = [GenerationRequest(list(p), sampling) for p in prompts]
    for request in joining[:first]:
        batch.add(request)
    batch.step()
    batch.step()
    for request in joining[first:]:
        batch.add(request)
    while not batch.idle:
        batch.step()
    return alone, [r.token_ids for r in offline], [r.token_ids for r in joining], batch
