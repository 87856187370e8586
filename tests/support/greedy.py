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
