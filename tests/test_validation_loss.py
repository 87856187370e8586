"""The validation loss that training logs (metrics.jsonl, eval.json; it drives best checkpoint, early stopping and
the quantize table) equals an independent token-weighted figure: sum of every supervised token's loss over the
number of supervised tokens, computed here one example at a time with a plain forward pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from support.runs import tiny_config_dict
from support.tiny import write_jsonl

from tunelab import train
from tunelab.data import prepare_data
from tunelab.data.tokenize import IGNORE
from tunelab.models import cache_root
from tunelab.result import load_run
from tunelab.runs import read_metrics

WORDS = "the quick brown fox jumps over the lazy dog and python counts from one to five".split()


def _records(answer_words: list[int]) -> list[dict[str, str]]:
    """Answers of the given word counts (a short prompt each), so that supervised tokens differ widely per example."""
    return [{"prompt": f"say {i}", "completion": " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n))}
            for i, n in enumerate(answer_words)]


def _independent_loss(model: torch.nn.Module, examples: list) -> tuple[float, int]:  # noqa: ANN001 - TokenizedExample
    """Token-weighted loss, one example per forward pass: no padding, no batching, no tunelab objective."""
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor([example.input_ids])  # (1, T)
            logits = model(input_ids=ids).logits[0, :-1].double()  # (T-1, V): position t predicts token t+1
            labels = torch.tensor(example.labels[1:])  # (T-1,)
            keep = labels != IGNORE
            loss_sum += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            tokens += int(keep.sum())
    return loss_sum / tokens, tokens


@pytest.mark.parametrize("eval_batch_size", [2, 3])
def test_validation_loss_is_token_weighted_over_unequal_examples(tiny_model_dir: Path, tmp_path: Path,
                                                                 eval_batch_size: int) -> None:
    train_file = write_jsonl(tmp_path / "train.jsonl", _records([3, 5, 4, 6] * 2))
    # 7 examples from 1 to 90 answer words: batches of 2 or 3 (sorted by length) split them unevenly
    val_file = write_jsonl(tmp_path / "val.jsonl", _records([1, 90, 2, 40, 1, 70, 3]))
    result = train(tiny_config_dict(
        tiny_model_dir,
        data={"train": [str(train_file)], "validation": [str(val_file)], "max_length": 256},
        technique={"name": "lora", "r": 4, "dropout": 0.0},
        training={"max_steps": 2, "micro_batch_size": 2, "learning_rate": 1e-2, "eval_every": 2},
        eval={"batch_size": eval_batch_size, "num_samples": 1, "max_new_tokens": 2, "forgetting": False},
        output={"dir": str(tmp_path / "run")},
    ), progress=False)

    loaded = load_run(result.run_dir, device="cpu")
    examples = prepare_data(loaded.config.data, loaded.tokenizer, cache_root() / "data").validation
    counts = sorted(sum(label != IGNORE for label in e.labels[1:]) for e in examples)
    assert len(examples) == 7 and counts[-1] > 10 * counts[0]  # the premise: very unequal examples
    expected, tokens = _independent_loss(loaded.model.eval(), examples)

    logged = [m for m in read_metrics(result.run_dir) if m["kind"] == "eval"]
    assert [m["step"] for m in logged] == [2]
    assert logged[0]["loss"] == pytest.approx(expected, rel=1e-5)
    tuned = json.loads((result.run_dir / "eval.json").read_text())["tuned"]
    assert tuned["loss"] == pytest.approx(expected, rel=1e-5) and tuned["tokens"] == tokens
