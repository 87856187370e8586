"""The tiny world the fast tier runs in: a byte-level BPE tokenizer and a 2-layer Llama built in-process (no
network), a fresh copy of that model, and a learnable toy chat task."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "what is the capital of france? the capital of france is paris.",
    "python is a programming language. json.dumps serialises an object to a string.",
    "count from one to five: one two three four five",
    "hello, how are you? i am fine, thank you.",
    "system user assistant answer question reply",
] * 20

ANIMALS = ["cat", "dog", "fox", "owl", "cow", "bee"]


def build_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a tiny corpus, with ChatML special tokens and template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML
    fast.save_pretrained(path)
    return fast


def build_model(path: Path, vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=2, pad_token_id=0,
        bos_token_id=None,
        # 0.1 rather than transformers' 0.02: with a frozen random output head of std 0.02 and hidden size 64,
        # logits cannot spread by more than ~1.3, so adapter-only techniques could not fit even a toy task.
        initializer_range=0.1,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    return model


def fresh_model(model_dir: Path) -> torch.nn.Module:
    """A new copy of the saved tiny model, in eval mode (no dropout: outputs compare exactly)."""
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def toy_chat_records(n: int = 48) -> list[dict]:
    """A learnable toy task: 'say <animal>' -> '<animal> <animal>'."""
    out = []
    for i in range(n):
        animal = ANIMALS[i % len(ANIMALS)]
        out.append({"messages": [
            {"role": "user", "content": f"say {animal} {i}"},
            {"role": "assistant", "content": f"{animal} {animal} {animal}"},
        ]})
    return out


def write_csv(path: Path, records: list[dict]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    import datasets

    datasets.Dataset.from_list(records).to_parquet(str(path))
    return path
