"""tunelab merge: a standalone model that plain transformers loads, a saved merge check, refusals with reasons,
and the user's folders left alone. And tunelab techniques: counts without loading weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support.runs import tiny_config
from support.tiny import toy_chat_records, write_jsonl
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.training import train

runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})


def trained_run(root: Path, model_dir: Path, technique: dict) -> Path:
    data = write_jsonl(root / "train.jsonl", toy_chat_records(16))
    config = tiny_config(
        model_dir, technique=technique,
        data={"train": [str(data)], "val_size": 4, "max_length": 64},
        training={"max_steps": 3, "micro_batch_size": 2, "learning_rate": 1e-2},
        eval={"before_after": False}, output={"dir": str(root / "run")},
    )
    return train(config, progress=False).run_dir


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_run(tmp_path_factory.mktemp("lora"), tiny_model_dir, {"name": "lora", "r": 4, "dropout": 0.0})


def test_merge_writes_a_standalone_checked_model(lora_run: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from tunelab.result import load_run

    out = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(lora_run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "max logit difference" in result.output and "mean KL" in result.output
    check = json.loads((out / "merge_check.json").read_text())
    assert check["max_logit_diff"] < 1e-4 and abs(check["mean_kl"]) < 1e-9 and check["tokens"] > 0
    assert check["source"] == "validation examples"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    adapter = load_run(lora_run, device="cpu").model
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        assert (merged(ids).logits - adapter(input_ids=ids).logits).abs().max() < 1e-4


def test_merge_defaults_into_the_run_folder_and_replaces_only_its_own_output(lora_run: Path, tmp_path: Path) -> None:
    assert runner.invoke(app, ["merge", str(lora_run)]).exit_code == 0
    assert (lora_run / "merged" / "merge_check.json").is_file()
    from tunelab.fs import owned_entries

    assert "merged" in owned_entries(lora_run)  # recorded in the run's ownership record, so clearing the run removes it
    assert runner.invoke(app, ["merge", str(lora_run)]).exit_code == 0  # its own earlier output: replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    result = runner.invoke(app, ["merge", str(lora_run), "--out", str(mine)])
    assert result.exit_code == 2 and "did not write" in result.output
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1


@pytest.mark.parametrize("technique, reason", [
    ({"name": "prompt_tuning", "num_virtual_tokens": 2}, "virtual tokens"),
    ({"name": "freeze", "layers": [-1]}, "already a standalone"),
])
def test_merge_refuses_with_the_reason(tiny_model_dir: Path, tmp_path: Path, technique: dict, reason: str) -> None:
    run = trained_run(tmp_path, tiny_model_dir, technique)
    result = runner.invoke(app, ["merge", str(run)])
    assert result.exit_code == 2 and "cannot be merged" in result.output and reason in result.output
    assert not (run / "merged").exists()


def test_qlora_merges_into_the_dequantized_base_and_says_so(tiny_model_dir: Path, tmp_path: Path) -> None:
    run = trained_run(tmp_path, tiny_model_dir, {"name": "qlora", "r": 4, "dropout": 0.0})
    result = runner.invoke(app, ["merge", str(run)])
    assert result.exit_code == 0, result.output
    check = json.loads((run / "merged" / "merge_check.json").read_text())
    assert "DEQUANTIZED" in check["note"] and "DEQUANTIZED" in result.output
    assert check["max_logit_diff"] < 1e-3
    config = json.loads((run / "merged" / "config.json").read_text())
    assert "quantization_config" not in config  # a plain full-precision model


def test_techniques_lists_counts_without_loading_weights(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    from tunelab.techniques import TECHNIQUES

    def no_weights(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("tunelab techniques must not load weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    result = runner.invoke(app, ["techniques", "--model", str(tiny_model_dir)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for name in TECHNIQUES:
        assert name in result.output
    # lora r=16 on all 7 linear layers of 2 layers of the tiny model: 16 * sum(d_in + d_out)
    per_layer = 16 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3)
    assert f"{2 * per_layer:,}" in result.output


def test_the_merge_check_sees_a_wrong_merge(lora_run: Path) -> None:
    """Negative control: a merged model whose weights are slightly off is reported as different."""
    from tunelab.export.merge import _check_batches, compare
    from tunelab.result import load_run

    loaded = load_run(lora_run, device="cpu")
    batches, source = _check_batches(loaded, 2, 2)
    wrong = load_run(lora_run, device="cpu").model.merge_and_unload()
    with torch.no_grad():
        for param in wrong.parameters():
            param.add_(0.01 * torch.randn_like(param))
    check = compare(loaded.model, wrong, batches, source, "a wrong merge")
    assert check.max_logit_diff > 1e-2 and check.mean_kl > 1e-6


def test_a_users_merged_folder_inside_the_run_is_never_written(tiny_model_dir: Path, tmp_path: Path) -> None:
    run = trained_run(tmp_path, tiny_model_dir, {"name": "lora", "r": 2})
    (run / "merged").mkdir()
    (run / "merged" / "mine.txt").write_text("keep me")
    result = runner.invoke(app, ["merge", str(run)])
    assert result.exit_code == 2 and "not created by tunelab" in result.output
    assert [p.name for p in (run / "merged").iterdir()] == ["mine.txt"]


def test_tunelab_merge_reports_a_wrong_merge_as_wrong(lora_run: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the command: a merge that comes out wrong must show up in merge_check.json. Guards what `tunelab
    merge` hands to the comparison (the adapter model as reference), not only the comparison itself."""
    import dataclasses

    from tunelab.techniques import TECHNIQUES

    lora = TECHNIQUES["lora"]
    right_merge = lora.merge

    def wrong_merge(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        merged = right_merge(*args, **kwargs)
        with torch.no_grad():
            head = merged.model.get_output_embeddings().weight  # a merge bug: the head is off, row by row
            head.add_(0.05 * torch.randn(head.shape, generator=torch.Generator().manual_seed(0)))
        return merged

    monkeypatch.setitem(TECHNIQUES, "lora", dataclasses.replace(lora, merge=wrong_merge))
    out = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(lora_run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    check = json.loads((out / "merge_check.json").read_text())
    assert check["tokens"] > 0
    assert check["max_logit_diff"] > 1e-2 and check["mean_kl"] > 1e-6, check


def test_a_bottleneck_run_gets_the_same_true_advice_from_merge_and_export(tiny_model_dir: Path, tmp_path: Path) -> None:
    """merge said "serve or export the base model with the adapter attached", then export refused it: the advice
    must name what works (serve) and both commands must say the same."""
    run = trained_run(tmp_path, tiny_model_dir, {"name": "adapter", "bottleneck_size": 4})
    merged = runner.invoke(app, ["merge", str(run)])
    exported = runner.invoke(app, ["export", str(run), "--quant", "f32"])
    for result in (merged, exported):
        flat = " ".join(result.output.split())
        assert result.exit_code == 2, result.output
        assert "tunelab serve RUN" in flat and "no single model" in flat, flat
        assert "export the base model" not in flat and "a adapter" not in flat, flat
    assert not (run / "merged").exists() and not (run / "exports").exists()


def _pairs_run(root: Path, model_dir: Path, objective: dict) -> Path:
    """A 2-step run of a pair objective (DPO, reward) on the toy pairs."""
    from support.preference import toy_pair_texts

    data = write_jsonl(root / "pairs.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in toy_pair_texts(0, 16)])
    config = tiny_config(
        model_dir, technique={"name": "lora", "r": 4, "dropout": 0.0}, objective=objective,
        data={"train": [str(data)], "val_size": 4, "max_length": 64},
        training={"max_steps": 2, "micro_batch_size": 2, "learning_rate": 1e-2},
        eval={"before_after": False, "num_samples": 0}, output={"dir": str(root / "run")},
    )
    return train(config, progress=False).run_dir


@pytest.fixture(scope="module")
def dpo_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _pairs_run(tmp_path_factory.mktemp("dpo"), tiny_model_dir, {"name": "dpo"})


@pytest.fixture(scope="module")
def classification_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from support.labeled import classification_config

    root = tmp_path_factory.mktemp("classification")
    config = classification_config(tiny_model_dir, root, technique={"name": "lora", "r": 4, "dropout": 0.0},
                                   training={"max_steps": 2}, data={"val_size": 4})
    return train(config, progress=False).run_dir


def _merged_check(run: Path, out: Path) -> dict:
    result = runner.invoke(app, ["merge", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "loss per unit: adapter" in result.output
    return json.loads((out / "merge_check.json").read_text())


def test_a_dpo_run_merges_checked_on_its_pairs(dpo_run: Path, tmp_path: Path) -> None:
    """A pair objective's merge is checked on its own pair batches: the merged model's token logits and DPO
    figures (against the base as reference) equal the adapter model's."""
    check = _merged_check(dpo_run, tmp_path / "merged")
    assert check["objective"] == "dpo" and check["source"] == "validation records" and check["tokens"] > 0
    assert check["max_logit_diff"] < 1e-4 and abs(check["mean_kl"]) < 1e-9
    adapter, merged = check["figures"]["adapter"], check["figures"]["merged"]
    assert adapter.keys() == merged.keys() >= {"loss", "reward_margin", "preference_accuracy"}
    assert check["max_figure_diff"] < 1e-4
    assert adapter["loss"] == pytest.approx(merged["loss"], abs=1e-4)
    assert adapter["reward_margin"] != 0  # scored against the base (adapter off), not against itself


def test_a_classification_run_merges_checked_on_its_labeled_texts(classification_run: Path, tmp_path: Path) -> None:
    """A class head's merge is checked on the labeled batches: its (rows, classes) outputs and loss per example."""
    from transformers import AutoModelForSequenceClassification

    check = _merged_check(classification_run, tmp_path / "merged")
    assert check["objective"] == "classification" and check["tokens"] == 4  # one output row per validation text
    assert check["max_logit_diff"] < 1e-4 and abs(check["mean_kl"]) < 1e-9 and check["max_figure_diff"] < 1e-4
    assert {"loss", "accuracy"} <= check["figures"]["merged"].keys()
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").config.num_labels == 3


def test_an_sft_merge_check_keeps_its_figures_only(lora_run: Path, tmp_path: Path) -> None:
    """An SFT run's merge_check.json holds what it always held: no objective figures beside them."""
    out = tmp_path / "merged"
    assert runner.invoke(app, ["merge", str(lora_run), "--out", str(out)]).exit_code == 0
    check = json.loads((out / "merge_check.json").read_text())
    assert set(check) == {"max_logit_diff", "mean_kl", "tokens", "batches", "source", "note"}


def test_a_reward_run_merges_checked_on_its_scores(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A one-score head: each row's score of the pair batches, and the Bradley-Terry loss per pair."""
    check = _merged_check(_pairs_run(tmp_path, tiny_model_dir, {"name": "reward"}), tmp_path / "merged")
    assert check["objective"] == "reward" and check["tokens"] == 8  # 4 validation pairs: 8 scored rows
    assert check["max_logit_diff"] < 1e-4 and check["max_figure_diff"] < 1e-4
    assert {"loss", "pairwise_accuracy", "score_margin"} <= check["figures"]["adapter"].keys()


@pytest.mark.parametrize("run_name", ["dpo_run", "classification_run"])
def test_the_objective_merge_check_sees_a_wrong_merge(run_name: str, request: pytest.FixtureRequest) -> None:
    """Negative control: a merged model whose weights are slightly off differs in its outputs and its figures."""
    from tunelab.export.merge import _objective_batches, compare_objective
    from tunelab.objectives import OBJECTIVES
    from tunelab.result import load_run

    run = request.getfixturevalue(run_name)
    loaded = load_run(run, device="cpu")
    objective = OBJECTIVES[loaded.config.objective.name]
    batches, source = _objective_batches(loaded, objective, 2, 2)
    wrong = load_run(run, device="cpu").model.merge_and_unload()
    with torch.no_grad():
        for param in wrong.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=torch.Generator().manual_seed(0)))
    check = compare_objective(loaded, objective, wrong, batches, source, "a wrong merge")
    assert check.max_logit_diff > 1e-2 and check.mean_kl > 1e-6 and check.max_figure_diff > 1e-3, check


def test_the_merge_check_says_why_its_figures_are_not_trainings(tmp_path: Path) -> None:
    """A DPO run trained with model.dtype auto on a CPU with native bfloat16 (frozen weights in bfloat16, bf16
    autocast) logged a final validation loss of 0.6736; its merge check, in float32, scored the same 4 pairs 0.6378
    (same loss, reference, beta and averaging: the rounding of the log-probabilities). The check now says so."""
    from tunelab.export.merge import figures_note

    info = tmp_path / "run_info.json"
    info.write_text(json.dumps({"precision": {"dtype": "bfloat16", "autocast": "bf16"}}))
    assert figures_note(tmp_path, torch.float32) == (
        "computed in float32; training's validation figures (bfloat16 weights, bf16 autocast) differ from these by "
        "that rounding, not by the merge")
    info.write_text(json.dumps({"precision": {"dtype": "float32", "autocast": "no"}}))
    assert figures_note(tmp_path, torch.float32) is None  # computed alike: nothing to explain
    info.unlink()
    assert figures_note(tmp_path, torch.float32) is None
