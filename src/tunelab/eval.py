"""Evaluation: validation loss and perplexity, and greedy sample generations, for the before/after report.

The loss is a token-weighted mean over the whole validation set (sum of token losses / supervised tokens), and
logits are only computed at supervised positions and never accumulated across batches, so evaluation needs no
more memory than one training micro-batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from tunelab.data.batching import collate
from tunelab.data.formats import Example
from tunelab.data.tokenize import TokenizedExample, prompt_for_generation
from tunelab.objectives import Objective


@torch.no_grad()
def validation_loss(
    model: nn.Module, examples: list[TokenizedExample], objective: Objective, pad_id: int, batch_size: int,
    device: torch.device, accelerator: Any = None,
) -> dict[str, float]:
    """Token-weighted validation loss and perplexity. Each process takes every world_size-th batch."""
    was_training = model.training
    model.eval()
    ordered = sorted(examples, key=lambda e: len(e.input_ids))  # similar lengths per batch: little padding
    batches = [ordered[s : s + batch_size] for s in range(0, len(ordered), batch_size)]
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    for batch in batches[rank::world]:
        tensors = {k: v.to(device) for k, v in collate([[e] for e in batch], pad_id).items()}
        result = objective(model, tensors)
        loss_sum += result.loss_sum.double()
        tokens += result.num_units
    if accelerator is not None and world > 1:
        loss_sum, tokens = accelerator.reduce(loss_sum, "sum"), accelerator.reduce(tokens, "sum")
    model.train(was_training)
    loss = (loss_sum / tokens.clamp(min=1)).item()
    return {"loss": round(loss, 6), "perplexity": round(math.exp(min(loss, 50.0)), 4), "tokens": int(tokens.item())}


@torch.no_grad()
def generate(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int, device: torch.device,
    add_special_tokens: bool = False,
) -> str:
    """Greedy continuation of one prompt, decoded without special tokens."""
    was_training = model.training
    model.eval()
    encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens).to(device)
    output = model.generate(
        **encoded, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_token_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    model.train(was_training)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def stop_token_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's EOS and the model's own end tokens (a chat model may end turns with a token, such as
    <|im_end|> or <|eot_id|>, that is not the tokenizer's EOS)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(i for i in [tokenizer.eos_token_id, *configured] if i is not None))


def sample_prompts(tokenizer: PreTrainedTokenizerBase, examples: list[Example], count: int) -> list[dict[str, str]]:
    """The first `count` validation examples as (prompt, reference) pairs; the same ones for base and tuned."""
    samples = []
    for example in examples[:count]:
        prompt, reference = prompt_for_generation(tokenizer, example)
        samples.append({"source": example.source, "prompt": prompt, "reference": reference})
    return samples


def generate_samples(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, samples: list[dict[str, str]], max_new_tokens: int,
    device: torch.device, plain_text: bool = False,
) -> list[str]:
    return [generate(model, tokenizer, s["prompt"], max_new_tokens, device, add_special_tokens=plain_text) for s in samples]
