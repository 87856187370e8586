"""The reference a served model must match: greedy generation with plain transformers, no server in between."""

from __future__ import annotations

from typing import Any

import torch


def offline_greedy(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, special: bool = False) -> str:
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=special)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
