"""Generation for evaluation: batched, deterministic and greedy by default, stopping at the end-of-turn token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from tunelab.data.formats import Example
from tunelab.data.tokenize import prompt_for_generation


@dataclass(frozen=True)
class Sampling:
    """Greedy unless ``do_sample``; with sampling, ``seed`` makes the outputs repeatable."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


GREEDY = Sampling()


@torch.no_grad()
def generate_batch(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int,
    device: torch.device, add_special_tokens: bool = False, sampling: Sampling = GREEDY,
) -> list[str]:
    """Continuations of several prompts in one left-padded batch, decoded without special tokens."""
    if not prompts:
        return []
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # decoder-only models continue from the right end of each row
    try:
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens).to(device)
    finally:
        tokenizer.padding_side = side
    options = {"do_sample": False}
    if sampling.do_sample:
        torch.manual_seed(sampling.seed)
        options = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
    output = model.generate(
        **encoded, max_new_tokens=max_new_tokens, eos_token_id=stop_token_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id, **options,
    )  # (B, prompt + new)
    model.train(was_training)
    new_tokens = output[:, encoded["input_ids"].shape[1]:]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def generate(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int, device: torch.device,
    add_special_tokens: bool = False,
) -> str:
    """Greedy continuation of one prompt, decoded without special tokens."""
    return generate_batch(model, tokenizer, [prompt], max_new_tokens, device, add_special_tokens)[0]


def generate_in_batches(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int,
    device: torch.device, batch_size: int, add_special_tokens: bool = False, sampling: Sampling = GREEDY,
) -> Iterator[str]:
    """One output per prompt, in order, ``batch_size`` prompts at a time (prompts of similar length together
    would pad less, but order-preserving batches keep outputs independent of the rest of the set)."""
    for start in range(0, len(prompts), batch_size):
        yield from generate_batch(model, tokenizer, prompts[start : start + batch_size], max_new_tokens, device,
                                  add_special_tokens, sampling)


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
    device: torch.device, plain_text: bool = False, batch_size: int = 8,
) -> list[str]:
    return list(generate_in_batches(model, tokenizer, [s["prompt"] for s in samples], max_new_tokens, device,
                                    batch_size, add_special_tokens=plain_text))
