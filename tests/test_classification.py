"""The classification objective on the tiny model: it learns a separable toy set to 100%, resume is exact, gradient
accumulation equals the big batch, and the saved result opens in plain transformers/PEFT with the class names and
gives the validation loss training ended with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tunelab.distributed import make_accelerator
from support.ddp_driver import StopAfter
from support.labeled import CLASSES, classification_config, toy_labeled
from support.runs import TINY_RUN, checkpoint_tensors, tiny_config
from support.tiny import ANIMALS, toy_chat_records, write_jsonl
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from tunelab.config import ConfigError, DataConfig
from tunelab.data import prepare_data
from tunelab.objectives import OBJECTIVES, LossSum, ObjectiveSpec
from tunelab.objectives.classification import collate_labeled, macro_f1
from tunelab.result import load_run
from tunelab.runs import read_metrics
from tunelab.training import loop, train
from tunelab.training.loop import accumulate_gradients

def test_it_learns_a_separable_set_to_100_percent(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = classification_config(tiny_model_dir, tmp_path, training={"max_steps": 40, "learning_rate": 1e-2,
                                                                       "eval_every": 40})
    result = train(config, progress=False)
    assert result.status == "completed"
    final = [m for m in read_metrics(result.run_dir) if m["kind"] == "eval"][-1]
    assert final["accuracy"] == 1.0 and final["macro_f1"] == 1.0
    assert sum(final[f"confusion_{c}_{c}"] for c in range(3)) == pytest.approx(1.0)
    report = json.loads((result.run_dir / "data_report.json").read_text())
    assert report["classes"]["names"] == CLASSES


def test_the_objective_refuses_data_of_another_shape(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = classification_config(tiny_model_dir, tmp_path)
    chats = write_jsonl(tmp_path / "chats.jsonl", toy_chat_records(16))
    config = config.model_copy(update={"data": config.data.model_copy(update={"train": [str(chats)]})})
    with pytest.raises(ConfigError, match=r"objective.name=classification trains on labeled texts .* holds SFT records"):
        train(config, progress=False)


def test_resume_is_exact(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sections = {"training": {"save_every": 5}}
    straight = classification_config(tiny_model_dir, tmp_path, "straight", **sections)
    assert train(straight, progress=False).step == 10
    split = classification_config(tiny_model_dir, tmp_path, "split", **sections)
    with monkeypatch.context() as patch:
        patch.setattr(loop, "_StopRequest", StopAfter(5))
        assert train(split, progress=False).step == 5
    assert train(split, resume=True, progress=False).step == 10
    weights_a, _ = checkpoint_tensors(Path(straight.output.dir), 10)
    weights_b, _ = checkpoint_tensors(Path(split.output.dir), 10)
    assert weights_a.keys() == weights_b.keys() and any("score" in name for name in weights_a)  # the head trains
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name


def _grads(model: torch.nn.Module, window: list[dict[str, torch.Tensor]], spec: ObjectiveSpec) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    accumulate_gradients(model, window, spec, make_accelerator("no"))
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("weights", [None, {"dog": 3.0}])
def test_accumulation_equals_the_big_batch(tiny_model_dir: Path, tmp_path: Path, weights: dict | None) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = prepare_data(DataConfig(train=[str(write_jsonl(tmp_path / "c.jsonl", toy_labeled(6)))], val_size=0),
                        tokenizer)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3).eval()  # no dropout
    model.config.pad_token_id, model.config.id2label = tokenizer.pad_token_id, dict(enumerate(data.classes))
    objective = OBJECTIVES["classification"]
    spec = objective.bind(objective.config_class(class_weights=weights))
    rows, pad = data.train, tokenizer.pad_token_id
    big = _grads(model, [collate_labeled([[r] for r in rows], pad)], spec)
    uneven = _grads(model, [collate_labeled([[rows[0]]], pad), collate_labeled([[r] for r in rows[1:]], pad)], spec)
    for key in big:
        torch.testing.assert_close(uneven[key], big[key], rtol=1e-4, atol=1e-7)
    mean_of_means = ObjectiveSpec(lambda m, b: LossSum(spec.loss_sum(m, b).loss_sum / spec.count_units(b), 1),
                                  lambda b: 1)  # negative control: the lone sequence weighs five times too much
    naive = _grads(model, [collate_labeled([[rows[0]]], pad), collate_labeled([[r] for r in rows[1:]], pad)], mean_of_means)
    assert any(not torch.allclose(naive[k] / 2, big[k], rtol=1e-3, atol=1e-7) for k in big)


def test_class_weights_weigh_each_class_in_the_loss(tiny_model_dir: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = prepare_data(DataConfig(train=[str(write_jsonl(tmp_path / "c.jsonl", toy_labeled(6)))], val_size=0),
                        tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3).eval()
    model.config.pad_token_id, model.config.id2label = tokenizer.pad_token_id, dict(enumerate(data.classes))
    batch = collate_labeled([[r] for r in data.train], tokenizer.pad_token_id)
    objective = OBJECTIVES["classification"]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        weighted = objective.bind(objective.config_class(class_weights={"dog": 3.0})).loss_sum(model, batch)
    each = F.cross_entropy(logits, batch["class_ids"], reduction="none")
    factor = torch.where(batch["class_ids"] == data.classes.index("dog"), 3.0, 1.0)
    torch.testing.assert_close(weighted.loss_sum, (each * factor).sum(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="names bird, which are not classes of the data"):
        objective.bind(objective.config_class(class_weights={"bird": 2.0})).loss_sum(model, batch)


def test_macro_f1_from_confusion_shares() -> None:
    # truth 0 -> predicted 0 twice, truth 1 -> predicted 0 once, truth 1 -> predicted 1 once (shares of 4)
    figures = {"confusion_0_0": 0.5, "confusion_0_1": 0.0, "confusion_1_0": 0.25, "confusion_1_1": 0.25}
    f1_0, f1_1 = 2 * 2 / (2 * 2 + 1), 2 * 1 / (2 * 1 + 1)
    assert macro_f1(figures)["macro_f1"] == pytest.approx((f1_0 + f1_1) / 2, abs=1e-6)


@pytest.mark.parametrize("technique", [{"name": "lora", "r": 4}, {"name": "full"}])
def test_the_result_reloads_in_plain_transformers(tiny_model_dir: Path, tmp_path: Path, technique: dict) -> None:
    config = classification_config(tiny_model_dir, tmp_path, technique=technique,
                                   training={"max_steps": 6, "eval_every": 6, "learning_rate": 1e-2})
    result = train(config, progress=False)
    final = [m for m in read_metrics(result.run_dir) if m["kind"] == "eval"][-1]
    tokenizer = AutoTokenizer.from_pretrained(result.run_dir / "tokenizer")
    if technique["name"] == "lora":  # the class names and pad id travel in the adapter's head_config.json
        head = AutoConfig.from_pretrained(result.run_dir / "adapter" / "head_config.json")
        model = AutoModelForSequenceClassification.from_pretrained(result.run_dir / "adapter", config=head)
        assert model.config.pad_token_id == tokenizer.pad_token_id
        names = [model.config.id2label[i] for i in range(3)]
    else:
        model = AutoModelForSequenceClassification.from_pretrained(result.run_dir / "model")
        names = [model.config.id2label[i] for i in range(3)]
    assert names == CLASSES
    data = prepare_data(config.data, tokenizer)
    batch = collate_labeled([[r] for r in data.validation], tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model.eval()(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    loss = F.cross_entropy(logits.float(), batch["class_ids"]).item()
    assert loss == pytest.approx(final["loss"], abs=1e-5)
    assert (logits.argmax(-1) == batch["class_ids"]).float().mean().item() == pytest.approx(final["accuracy"])
    if technique["name"] == "lora":  # tunelab opens the adapter folder on its own with its head and class names
        loaded = load_run(shutil.copytree(result.run_dir / "adapter", tmp_path / "adapter-alone"), device="cpu")
        assert [loaded.model.config.id2label[i] for i in range(3)] == CLASSES
        with torch.no_grad():
            alone = loaded.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        torch.testing.assert_close(alone, logits)
        run = load_run(result.run_dir, device="cpu").model.config  # and the run folder, with the same names
        assert [run.id2label[i] for i in range(3)] == CLASSES


def test_no_perplexity_beside_a_classifiers_loss(tiny_model_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # exp of a cross-entropy over classes is no perplexity: the objective declares that only SFT's loss has one
    assert [name for name, objective in OBJECTIVES.items() if objective.perplexity] == ["sft"]
    config = classification_config(tiny_model_dir, tmp_path, training={"max_steps": 2, "eval_every": 2},
                                   eval={"before_after": True})
    result = train(config, progress=False)
    assert "loss" in result.evaluation["tuned"] and "loss" in result.evaluation["base"]
    assert "perplexity" not in result.evaluation["tuned"] and "perplexity" not in result.evaluation["base"]
    evals = [m for m in read_metrics(result.run_dir) if m["kind"] == "eval"]
    assert evals and all("perplexity" not in m for m in evals)
    card = (result.run_dir / "adapter" / "README.md").read_text()
    assert "- validation loss: " in card and "perplexity" not in card
    from tunelab.console import print_before_after

    print_before_after(result.evaluation)
    out = capsys.readouterr().out
    assert "│ loss" in out and "perplexity" not in out
    with pytest.raises(Exception, match=r"training.best_metric 'perplexity' is not computed"):
        classification_config(tiny_model_dir, tmp_path, training={"best_metric": "perplexity"})


def test_the_plan_builds_the_classifier_s_head_as_wide_as_the_data_s_classes(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A classifier's head has one output per class the data holds (Objective.head_size): the plan's skeleton is
    built with the data's 3 classes, so it counts the head's 3 x H trainable weights beside the same LoRA's, and
    builds no zero-width head (which printed torch's 'Initializing zero-element tensors is a no-op' warning in
    every classification `tunelab plan` and `train`)."""
    import warnings

    from tunelab.plan import data_shape, plan_memory

    config = classification_config(tiny_model_dir, tmp_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Initializing zero-element tensors")
        shape = data_shape(config)
        plan = plan_memory(config, "cpu", shape, runtime=0)
    assert shape.head_size == len(CLASSES)
    sft = tiny_config(tiny_model_dir, data={**config.data.model_dump(), "train": [str(write_jsonl(
        tmp_path / "chats.jsonl", toy_chat_records(24)))], "validation": []}, technique=TINY_RUN["technique"],
        training=TINY_RUN["training"])
    lm = plan_memory(sft, "cpu", shape.__class__(shape.micro_batch_size, shape.length), runtime=0)
    hidden = AutoConfig.from_pretrained(tiny_model_dir).hidden_size
    assert plan.trainable_parameters - lm.trainable_parameters == len(CLASSES) * hidden
