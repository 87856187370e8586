"""Preference objectives through train() on the tiny model: step 0 at ln 2 (live and precomputed reference), exact
resume for dpo, and a reward model's result opened by plain transformers/PEFT giving the scores training ended with."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from support.ddp_driver import StopAfter  # Ctrl-C after N steps
from support.preference import toy_pair_texts
from support.runs import checkpoint_tensors, tiny_run_config
from support.tiny import write_jsonl

from tunelab.data import prepare_data
from tunelab.objectives.preference import REFERENCE_CACHE, collate_pairs, split
from tunelab.objectives.reward import scores
from tunelab.runs import read_metrics
from tunelab.training import loop, train


def _pairs_file(tmp_path: Path, n: int = 40) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in toy_pair_texts(0, n)])


def _train_losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir) if m["kind"] == "train"]


@pytest.mark.parametrize("reference", ["live", "precomputed"])
def test_a_dpo_run_starts_at_ln2(tiny_model_dir: Path, tmp_path: Path, reference: str) -> None:
    config = tiny_run_config(tiny_model_dir, tmp_path, _pairs_file(tmp_path), objective={"name": "dpo", "reference": reference},
                             training={"max_steps": 2, "grad_accum": 1, "log_every": 1})
    result = train(config, progress=False)
    assert _train_losses(result.run_dir)[0] == pytest.approx(math.log(2), abs=1e-4)
    assert (result.run_dir / REFERENCE_CACHE).is_file() == (reference == "precomputed")


def _resume_pair(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    data = _pairs_file(tmp_path)
    sections: dict[str, Any] = {"objective": {"name": "dpo"}, "training": {"save_every": 5}, "eval": {"before_after": False}}
    straight = tiny_run_config(model_dir, tmp_path, data, output={"dir": str(tmp_path / "straight")}, **sections)
    assert train(straight, progress=False).step == 10
    halves = tiny_run_config(model_dir, tmp_path, data, output={"dir": str(tmp_path / "halves")}, **sections)
    with monkeypatch.context() as patch:
        patch.setattr(loop, "_StopRequest", StopAfter(5))
        assert train(halves, progress=False).step == 5
    assert train(halves, resume=True, progress=False).step == 10
    return Path(straight.output.dir), Path(halves.output.dir)


def test_dpo_resume_equals_an_uninterrupted_run(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    straight, halves = _resume_pair(tiny_model_dir, tmp_path, monkeypatch)
    weights_a, _ = checkpoint_tensors(straight, 10)
    weights_b, _ = checkpoint_tensors(halves, 10)
    assert weights_a.keys() == weights_b.keys() and weights_a
    assert all(torch.equal(weights_a[name], weights_b[name]) for name in weights_a)
    assert _train_losses(straight) == _train_losses(halves) and len(_train_losses(halves)) == 10


def _validation_scores(model: torch.nn.Module, config: Any, run_dir: Path) -> tuple[float, float]:
    """Pairwise accuracy and mean score margin of ``model`` on the run's validation pairs."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    pairs = prepare_data(config.data, tokenizer).validation
    with torch.no_grad():
        chosen, rejected = split(scores(model.eval(), collate_pairs([[p] for p in pairs], tokenizer.pad_token_id)))
    return (chosen > rejected).float().mean().item(), (chosen - rejected).mean().item()


@pytest.mark.parametrize("technique", ["lora", "full"])
def test_a_reward_result_opens_in_plain_transformers_with_its_trained_scores(tiny_model_dir: Path, tmp_path: Path,
                                                                              technique: str) -> None:
    config = tiny_run_config(tiny_model_dir, tmp_path, _pairs_file(tmp_path), technique={"name": technique},
                             objective={"name": "reward"}, training={"max_steps": 4, "eval_every": 4},
                             eval={"num_samples": 0, "forgetting": False})
    run_dir = train(config, progress=False).run_dir
    final = [m for m in read_metrics(run_dir) if m["kind"] == "eval"][-1]
    if technique == "lora":
        from peft import AutoPeftModelForSequenceClassification

        model = AutoPeftModelForSequenceClassification.from_pretrained(run_dir / "adapter", num_labels=1)
    else:
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(run_dir / "model")
    accuracy, margin = _validation_scores(model, config, run_dir)
    assert accuracy == pytest.approx(final["pairwise_accuracy"], abs=1e-6)
    assert margin == pytest.approx(final["score_margin"], abs=1e-4)
    assert margin != 0.0


def test_tunelab_opens_a_reward_result_with_its_head(tiny_model_dir: Path, tmp_path: Path) -> None:
    import tunelab

    config = tiny_run_config(tiny_model_dir, tmp_path, _pairs_file(tmp_path), objective={"name": "reward"},
                             training={"max_steps": 2, "eval_every": 2}, eval={"num_samples": 0, "forgetting": False})
    run_dir = train(config, progress=False).run_dir
    final = [m for m in read_metrics(run_dir) if m["kind"] == "eval"][-1]
    accuracy, margin = _validation_scores(tunelab.load_run(run_dir).model, config, run_dir)
    assert (accuracy, margin) == pytest.approx((final["pairwise_accuracy"], final["score_margin"]), abs=1e-4)
