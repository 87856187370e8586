"""The training loop's reliability properties, each with a negative control where one makes sense:
gradient accumulation equals the big batch, resume equals an uninterrupted run, checkpoints are atomic,
non-finite steps are skipped, every technique learns, early stopping restores the best weights."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tunelab.distributed import make_accelerator
from safetensors.torch import load_file
from support.ddp_driver import StopAfter  # Ctrl-C after N steps, shared with the torchrun driver
from support.runs import checkpoint_tensors, tiny_run_config
from support.tiny import toy_chat_records, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab import checkpoint as ckpt
from tunelab.config import ConfigError, build_config
from tunelab.data import IGNORE, TokenizedExample, collate
from tunelab.objectives import OBJECTIVES, LossSum, Objective, ObjectiveSpec
from tunelab.runs import list_runs, read_metrics
from tunelab.techniques import TECHNIQUES, TechniqueError
from tunelab.errors import TrainingAborted
from tunelab.training import context, loop, session, train
from tunelab.training.loop import accumulate_gradients


# ---------------------------------------------------------------- gradient accumulation


def _example(length: int, supervised: int, seed: int) -> TokenizedExample:
    ids = torch.randint(3, 300, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    labels = [IGNORE] * (length - supervised) + ids[length - supervised:]
    return TokenizedExample(ids, labels, f"synthetic:{seed}")


def _grads_after(model: torch.nn.Module, window: list[dict[str, torch.Tensor]], spec: ObjectiveSpec) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    accumulate_gradients(model, window, spec, make_accelerator("no"))
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_accumulation_equals_the_big_batch(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()  # eval: no dropout, same maths both ways
    examples = [_example(50, 40, 0), _example(12, 3, 1), _example(30, 25, 2), _example(8, 4, 3)]  # 40 vs 3 tokens
    spec = OBJECTIVES["sft"]
    big = _grads_after(model, [collate([[e] for e in examples], pad_id=0)], spec)
    accumulated = _grads_after(model, [collate([[e]], pad_id=0) for e in examples], spec)
    assert big.keys() == accumulated.keys() and big
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-5, atol=1e-7, msg=name)

    # Negative control: the naive mean of per-micro-batch means, (1/M) * sum_i mean_i (each micro-batch counts as
    # one unit, so the loop's 1/total scale is exactly 1/M), weights the 3-token batch like the 40-token one...
    def mean_of_means(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossSum:
        result = spec.loss_sum(model, batch)
        return LossSum(result.loss_sum / result.num_units, 1)

    naive_spec = ObjectiveSpec(mean_of_means, lambda b: 1)
    naive = _grads_after(model, [collate([[e]], pad_id=0) for e in examples], naive_spec)
    assert any(not torch.allclose(naive[n], big[n], rtol=1e-3) for n in big)
    # ... and equals the big batch when every micro-batch has the same number of supervised tokens: the control
    # is the true mean of means, different only where token counts differ.
    even = [_example(20, 10, 4), _example(35, 10, 5), _example(12, 10, 6), _example(28, 10, 7)]
    even_big = _grads_after(model, [collate([[e] for e in even], pad_id=0)], spec)
    even_naive = _grads_after(model, [collate([[e]], pad_id=0) for e in even], naive_spec)
    for name in even_big:
        torch.testing.assert_close(even_naive[name], even_big[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("technique", [{"name": "full"}, {"name": "lora", "r": 4, "dropout": 0.0}], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir: Path, technique: dict,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers.modeling_utils

    settings = build_config({"technique": technique}).technique
    window = [collate([[_example(40, 30, 0)], [_example(20, 5, 1)]], pad_id=0)]
    grads = {}
    for checkpointing in (False, True):
        calls: list[int] = []
        original = transformers.modeling_utils.checkpoint  # what enabling wraps: count the recomputed layers
        monkeypatch.setattr(transformers.modeling_utils, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
        torch.manual_seed(0)  # the same LoRA initialisation both times
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        if checkpointing:
            session.enable_activation_checkpointing(model)
        model = TECHNIQUES[settings.name].prepare(model, settings).train()  # train(): checkpointing only runs then
        grads[checkpointing] = _grads_after(model, window, OBJECTIVES["sft"])
        monkeypatch.undo()
        assert bool(calls) == checkpointing, "checkpointing must run exactly when enabled"
    assert grads[False].keys() == grads[True].keys() and grads[False]
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------- resume


def _assert_optimizer_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        for name, value in a["state"][key].items():
            assert torch.equal(value, b["state"][key][name]), f"optimizer state {key}.{name} differs"


def _resume_pair(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    data = write_jsonl(tmp_path / "train.jsonl", toy_chat_records(24))
    # evaluations at steps 4, 8 and 10: the stop after step 5 falls between two of them
    sections = {"training": {"save_every": 5, "eval_every": 4}, "eval": {"before_after": False}}
    straight = tiny_run_config(tiny_model_dir, tmp_path, data, output={"dir": str(tmp_path / "straight")}, **sections)
    assert train(straight, progress=False).step == 10
    split = tiny_run_config(tiny_model_dir, tmp_path, data, output={"dir": str(tmp_path / "split")}, **sections)
    with monkeypatch.context() as patch:
        patch.setattr(loop, "_StopRequest", StopAfter(5))
        first = train(split, progress=False)
    assert (first.status, first.step) == ("interrupted", 5)
    second = train(split, resume=True, progress=False)
    assert (second.status, second.step) == ("completed", 10)
    return straight.output.dir, split.output.dir


def test_resume_equals_an_uninterrupted_run(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    straight, split = _resume_pair(tiny_model_dir, tmp_path, monkeypatch)
    weights_a, optim_a = checkpoint_tensors(Path(straight), 10)
    weights_b, optim_b = checkpoint_tensors(Path(split), 10)
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name
    _assert_optimizer_equal(optim_a, optim_b)
    losses = lambda run: [m["loss"] for m in read_metrics(Path(run)) if m["kind"] == "train"]  # noqa: E731
    assert losses(straight) == losses(split) and len(losses(split)) == 10
    # the evaluation at step 8 compares with the mean training loss of steps 5-8, one of them before the stop
    evals = lambda run: [m for m in read_metrics(Path(run)) if m["kind"] == "eval"]  # noqa: E731
    assert evals(straight) == evals(split) and [m["step"] for m in evals(split)] == [4, 8, 10]


def test_same_seed_same_run_and_another_seed_another_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", toy_chat_records(24))
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        config = tiny_run_config(tiny_model_dir, tmp_path, data, training={"max_steps": 3, "seed": seed},
                             eval={"before_after": False}, output={"dir": str(tmp_path / name)})
        run_dir = train(config, progress=False).run_dir
        runs[name] = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(runs["a"][n], runs["b"][n]) for n in runs["a"])  # dropout, shuffling, LoRA init: seeded
    assert not all(torch.equal(runs["a"][n], runs["c"][n]) for n in runs["a"])  # control: the seed matters


def test_resume_without_rng_restore_differs(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: the LoRA dropout masks after resume depend on the restored RNG state."""
    monkeypatch.setattr(ckpt, "restore_rng", lambda state: torch.manual_seed(1234))
    straight, split = _resume_pair(tiny_model_dir, tmp_path, monkeypatch)
    weights_a, _ = checkpoint_tensors(Path(straight), 10)
    weights_b, _ = checkpoint_tensors(Path(split), 10)
    assert any(not torch.equal(weights_a[n], weights_b[n]) for n in weights_a)


# ---------------------------------------------------------------- atomic checkpoints


def test_crash_mid_save_keeps_the_previous_checkpoint_and_resume_uses_it(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_run_config(tiny_model_dir, tmp_path, training={"max_steps": 6, "save_every": 2}, eval={"before_after": False})
    real_save, calls = torch.save, {"n": 0}

    def failing_save(obj: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 4:  # the second checkpoint, after its weights were written
            raise OSError("disk full (injected)")
        real_save(obj, path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(ckpt.torch, "save", failing_save)
        with pytest.raises(OSError, match="injected"):
            train(config, progress=False)
    root = Path(config.output.dir) / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-000002"]
    assert not list(root.glob(".tmp-*")), "a failed save cleans up its temporary folder"
    assert json.loads((Path(config.output.dir) / "status.json").read_text())["status"] == "failed"

    # A hard kill leaves a half-written temporary folder: it is never taken for a checkpoint.
    (root / ".tmp-step-000004").mkdir()
    (root / ".tmp-step-000004" / "trainable.safetensors").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(root).name == "step-000002"
    assert ckpt.read_state(ckpt.latest_checkpoint(root))["step"] == 2

    result = train(config, resume=True, progress=False)
    assert (result.status, result.step) == ("completed", 6)
    steps = [m["step"] for m in read_metrics(Path(config.output.dir)) if m["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_rotation_keeps_the_latest_and_the_best(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(root, step, model, optimizer, scheduler, {"step": step}, ckpt.rng_state())
        ckpt.rotate(root, {step, 2})
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-000002", "step-000004"]


def test_checkpoints_sort_by_step_past_six_digits(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for name in ("step-999999", "step-1000000", "step-not-a-number"):
        (root / name).mkdir(parents=True)
        (root / name / ckpt.COMPLETE).touch()
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-999999", "step-1000000"]
    assert ckpt.latest_checkpoint(root).name == "step-1000000"


# ---------------------------------------------------------------- non-finite steps


def _nan_on_calls(calls_with_nan: set[int] | None) -> Objective:
    real, counter = OBJECTIVES["sft"], {"n": 0}

    def loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossSum:
        counter["n"] += 1
        result = real.loss_sum(model, batch)
        if calls_with_nan is None or counter["n"] in calls_with_nan:
            return LossSum(result.loss_sum * float("nan"), result.num_units)
        return result

    return dataclasses.replace(real, loss_sum=loss_sum)  # the registered objective with a faulty loss


def test_a_non_finite_step_is_skipped_and_counted(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(OBJECTIVES, "sft", _nan_on_calls({3}))
    config = tiny_run_config(tiny_model_dir, tmp_path, technique={"name": "full"},
                         training={"max_steps": 3, "grad_accum": 1, "save_every": 2, "learning_rate": 1e-3},
                         eval={"before_after": False})
    result = train(config, progress=False)
    run = Path(config.output.dir)
    assert result.status == "completed"
    metrics = [m for m in read_metrics(run) if m["kind"] == "train"]
    assert [m["skipped"] for m in metrics] == [False, False, True]
    assert json.loads((run / "status.json").read_text())["nonfinite_skipped"] == 1
    after_step_2, _ = checkpoint_tensors(run, 2)
    final = load_file(str(run / "model" / "model.safetensors"))
    for name, value in after_step_2.items():
        assert torch.equal(final[name], value), f"{name} changed during the skipped step"
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    assert any(not torch.equal(initial[n], after_step_2[n]) for n in after_step_2), "steps 1-2 must update weights"


def test_repeated_non_finite_steps_abort_with_a_clear_message(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(OBJECTIVES, "sft", _nan_on_calls(None))
    config = tiny_run_config(tiny_model_dir, tmp_path, training={"max_consecutive_nonfinite": 3}, eval={"before_after": False})
    with pytest.raises(TrainingAborted, match="3 steps in a row had a non-finite loss"):
        train(config, progress=False)
    status = json.loads((Path(config.output.dir) / "status.json").read_text())
    assert status["status"] == "failed" and status["nonfinite_skipped"] == 3


# ---------------------------------------------------------------- every technique learns


@pytest.mark.parametrize("technique, lr", [({"name": "full"}, 3e-3), ({"name": "freeze", "layers": [-1]}, 1e-2),
                                            ({"name": "lora", "r": 8, "dropout": 0.0}, 1e-2)])
def test_each_technique_drives_the_loss_down(tiny_model_dir: Path, tmp_path: Path, technique: dict, lr: float) -> None:
    config = tiny_run_config(tiny_model_dir, tmp_path, technique=technique,
                         training={"max_steps": 30, "grad_accum": 1, "learning_rate": lr, "warmup_ratio": 0.0})
    result = train(config, progress=False)
    losses = [m["loss"] for m in read_metrics(result.run_dir) if m["kind"] == "train"]
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses
    assert result.evaluation["tuned"]["loss"] < 0.7 * result.evaluation["base"]["loss"]
    assert (result.run_dir / TECHNIQUES[technique["name"]].result_dir_name).is_dir()


def test_lora_adapter_loads_in_plain_peft_with_identical_logits(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    config = tiny_run_config(tiny_model_dir, tmp_path, training={"max_steps": 4, "save_every": 4},
                         technique={"name": "lora", "r": 4, "dropout": 0.0}, eval={"before_after": False})
    result = train(config, progress=False)
    # Reference: tunelab's own model rebuilt from the checkpoint (the loop's weights, by parameter name).
    reference = TECHNIQUES["lora"].prepare(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config.technique)
    ckpt.load_trainable(result.run_dir / "checkpoints" / "step-000004", reference)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.run_dir / "adapter")
    ids = torch.tensor([[1, 5, 9, 42, 77, 2]])
    with torch.no_grad():
        expected, got = reference.eval()(ids).logits, plain.eval()(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(got, base, atol=1e-4), "the adapter must change the output"
    adapter_config = json.loads((result.run_dir / "adapter" / "adapter_config.json").read_text())
    assert Path(adapter_config["base_model_name_or_path"]) == tiny_model_dir


def test_full_and_freeze_results_load_in_plain_transformers(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = tiny_run_config(tiny_model_dir, tmp_path, technique={"name": "freeze", "layers": [-1]},
                         training={"max_steps": 3}, eval={"before_after": False})
    result = train(config, progress=False)
    model_dir = result.run_dir / "model"
    AutoModelForCausalLM.from_pretrained(model_dir)
    assert AutoTokenizer.from_pretrained(model_dir).chat_template
    before, after = load_file(str(tiny_model_dir / "model.safetensors")), load_file(str(model_dir / "model.safetensors"))
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == name.startswith("model.layers.1."), f"{name}: changed={changed}"


def test_registry_rejects_a_mismatched_name() -> None:
    from dataclasses import replace

    from tunelab.techniques import _check

    with pytest.raises(RuntimeError, match="Literal"):
        _check((replace(TECHNIQUES["lora"], name="lora2"),))
    with pytest.raises(RuntimeError, match="twice"):
        _check((TECHNIQUES["lora"], TECHNIQUES["lora"]))


# ---------------------------------------------------------------- early stopping, run folder


def test_early_stopping_restores_the_best_checkpoint(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scripted = iter([3.0, 2.0, 2.5, 2.6])  # evaluations at steps 2, 4, 6, 8: best at 4, patience 2 stops at 8

    def fake_loss(*args: Any, **kwargs: Any) -> dict[str, float]:
        return {"loss": next(scripted), "perplexity": 1.0, "tokens": 10}

    monkeypatch.setattr(context, "validation_loss", fake_loss)
    config = tiny_run_config(tiny_model_dir, tmp_path, training={"max_steps": 20, "eval_every": 2, "early_stopping_patience": 2},
                         technique={"name": "full"}, eval={"before_after": False})
    result = train(config, progress=False)
    assert (result.status, result.step) == ("early_stopped", 8)
    evaluation = json.loads((result.run_dir / "eval.json").read_text())
    assert evaluation["weights_from_step"] == 4 and evaluation["tuned"]["loss"] == 2.0
    best, _ = checkpoint_tensors(result.run_dir, 4)
    final = load_file(str(result.run_dir / "model" / "model.safetensors"))
    assert all(torch.equal(final[n], best[n]) for n in best)
    assert [p.name for p in ckpt.list_checkpoints(result.run_dir / "checkpoints")] == ["step-000004"]


def test_existing_run_folder_is_never_overwritten_by_accident(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = tiny_run_config(tiny_model_dir, tmp_path, training={"max_steps": 1}, eval={"before_after": False})
    train(config, progress=False)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(config, progress=False)
    with pytest.raises(ConfigError, match=r"already finished \(completed at step 1\); there is nothing to resume"):
        train(config, resume=True, progress=False)
    config.output.overwrite = True
    assert train(config, progress=False).status == "completed"
    [summary] = list_runs(tmp_path)
    assert summary["status"] == "completed" and summary["technique"] == "lora" and summary["step"] == 1


def test_a_folder_with_the_users_files_is_never_used_or_cleared(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = tiny_run_config(tiny_model_dir, tmp_path, training={"max_steps": 1}, eval={"before_after": False})
    run_dir = Path(config.output.dir)
    run_dir.mkdir(parents=True)
    (run_dir / "notes.txt").write_text("mine")
    (run_dir / "config.yaml").write_text("someone else's config")
    config.output.overwrite = True
    with pytest.raises(ConfigError, match="not a tunelab run folder.*notes.txt"):
        train(config, progress=False)
    assert (run_dir / "notes.txt").read_text() == "mine" and (run_dir / "config.yaml").read_text() == "someone else's config"
    (run_dir / "notes.txt").unlink()
    with pytest.raises(ConfigError, match="not a tunelab run folder.*config.yaml"):  # tunelab's name, not its file
        train(config, progress=False)
    assert (run_dir / "config.yaml").read_text() == "someone else's config"
    (run_dir / "config.yaml").unlink()
    assert train(config, progress=False).status == "completed"  # an empty folder is fine
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------- errors that must come early and clearly


def test_evaluation_without_validation_data_is_a_config_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Without this check an empty validation set scored loss 0.0, "best" forever: the step-1 weights were kept.
    config = tiny_run_config(tiny_model_dir, tmp_path, training={"eval_every": 1})
    config.data.val_size = 0
    with pytest.raises(ConfigError, match="eval_every needs validation data"):
        train(config, progress=False)


@pytest.mark.parametrize("technique, message", [
    ({"name": "lora", "target_modules": ["q_proj", "nope_proj"]}, r"\['nope_proj'\] match no module"),
    ({"name": "lora", "target_modules": "qproj"}, r"\['qproj'\] match no module.*q_proj"),
    ({"name": "freeze", "layers": [40]}, "index 40 is out of range"),
    ({"name": "freeze", "layers": [], "modules": ["norm.*"]}, "match no parameter name"),
], ids=["lora-one-typo", "lora-single-name", "freeze-layer", "freeze-module"])
def test_a_technique_that_does_not_fit_the_model_fails_before_the_base_evaluation(
    tiny_model_dir: Path, tmp_path: Path, technique: dict, message: str,
) -> None:
    config = tiny_run_config(tiny_model_dir, tmp_path, technique=technique)
    with pytest.raises(TechniqueError, match=message):
        train(config, progress=False)
    run_dir = Path(config.output.dir)
    assert not run_dir.exists(), "a run that never started leaves nothing behind"


def test_a_single_lora_module_name_means_that_module(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = tiny_run_config(tiny_model_dir, tmp_path, technique={"name": "lora", "r": 2, "target_modules": "q_proj"},
                         training={"max_steps": 1}, eval={"before_after": False})
    assert config.technique.target_modules == ["q_proj"]
    result = train(config, progress=False)
    adapter_config = json.loads((result.run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["target_modules"] == ["q_proj"]


def test_a_run_that_failed_before_its_first_checkpoint_can_simply_be_rerun(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = tiny_run_config(tiny_model_dir, tmp_path, technique={"name": "freeze", "layers": [40]})
    with pytest.raises(TechniqueError):
        train(config, progress=False)
    fixed = tiny_run_config(tiny_model_dir, tmp_path, technique={"name": "freeze", "layers": [-1]},
                        training={"max_steps": 1}, eval={"before_after": False})
    assert train(fixed, progress=False).status == "completed"  # no --resume, no overwrite needed
    # Control: a finished run is still never replaced by accident.
    with pytest.raises(ConfigError, match="already holds a run"):
        train(fixed, progress=False)


def test_resume_warns_about_changed_step_counts(tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = tiny_run_config(tiny_model_dir, tmp_path, training={"max_steps": 2, "save_every": 1}, eval={"before_after": False})
    train(config, progress=False)
    longer = tiny_run_config(tiny_model_dir, tmp_path, training={"max_steps": 3, "save_every": 1}, eval={"before_after": False})
    with caplog.at_level("WARNING", logger="tunelab.training.resume"):
        assert train(longer, resume=True, progress=False).step == 3
    assert "--resume changes training.max_steps: 2 -> 3" in caplog.text


def test_a_run_without_validation_data_says_so_in_eval_json(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = tiny_run_config(tiny_model_dir, tmp_path, training={"max_steps": 1})
    config.data.val_size = 0
    result = train(config, progress=False)
    evaluation = json.loads((result.run_dir / "eval.json").read_text())
    assert evaluation["tuned"] is None and "no validation data" in evaluation["note"]
    [summary] = list_runs(tmp_path)
    assert summary["status"] == "completed" and summary["tuned_val_loss"] is None


def test_resume_refuses_changed_data_and_a_step_count_below_the_checkpoint(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", toy_chat_records(24))
    config = tiny_run_config(tiny_model_dir, tmp_path, data, training={"max_steps": 6}, eval={"before_after": False})
    with monkeypatch.context() as patch:
        patch.setattr(loop, "_StopRequest", StopAfter(3))
        assert train(config, progress=False).status == "interrupted"
    shorter = tiny_run_config(tiny_model_dir, tmp_path, data, training={"max_steps": 2}, eval={"before_after": False})
    with pytest.raises(ConfigError, match="checkpoint is at step 3, past the 2 steps"):
        train(shorter, resume=True, progress=False)
    write_jsonl(data, toy_chat_records(24)[::-1])  # same records, another order: another run
    with pytest.raises(ConfigError, match="data files changed") as refused:
        train(config, resume=True, progress=False)
    assert f"({data}: content hash" in str(refused.value)  # the file that changed, named
    write_jsonl(data, toy_chat_records(24))  # control: the original data resumes
    assert train(config, resume=True, progress=False).step == 6


def test_a_finished_run_is_refused_without_suggesting_resume(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = tiny_run_config(tiny_model_dir, tmp_path, training={"max_steps": 1}, eval={"before_after": False})
    train(config, progress=False)
    with pytest.raises(ConfigError, match=r"already holds a run that is finished \(completed\), choose") as error:
        train(config, progress=False)
    assert "--resume" not in str(error.value)


def test_ctrl_c_during_the_final_evaluation_keeps_the_trained_steps(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = tiny_run_config(tiny_model_dir, tmp_path, training={"max_steps": 3})
    real_final_evaluation = session._final_evaluation

    def ctrl_c(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(session, "_final_evaluation", ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            train(config, progress=False)
    run_dir = Path(config.output.dir)
    assert json.loads((run_dir / "status.json").read_text())["status"] == "interrupted"
    assert ckpt.read_state(ckpt.latest_checkpoint(run_dir / "checkpoints"))["step"] == 3
    assert session._final_evaluation is real_final_evaluation
    result = train(config, resume=True, progress=False)  # nothing left to train: evaluate and save
    assert (result.status, result.step) == ("completed", 3) and (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert [m["step"] for m in read_metrics(run_dir) if m["kind"] == "train"] == [1, 2, 3]


def test_a_refused_resume_leaves_the_run_as_it_was(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_run_config(tiny_model_dir, tmp_path, training={"max_steps": 6}, eval={"before_after": False})
    with monkeypatch.context() as patch:
        patch.setattr(loop, "_StopRequest", StopAfter(3))
        train(config, progress=False)
    run_dir = Path(config.output.dir)
    saved_config, saved_status = (run_dir / "config.yaml").read_text(), (run_dir / "status.json").read_text()
    shorter = tiny_run_config(tiny_model_dir, tmp_path, training={"max_steps": 2}, eval={"before_after": False})
    with pytest.raises(ConfigError, match="past the 2 steps"):
        train(shorter, resume=True, progress=False)
    assert (run_dir / "config.yaml").read_text() == saved_config
    assert (run_dir / "status.json").read_text() == saved_status


def test_freeze_modules_match_a_tied_weight_by_either_name() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, tie_word_embeddings=True)
    settings = build_config({"technique": {"name": "freeze", "layers": [], "modules": ["lm_head.*"]}}).technique
    model = TECHNIQUES["freeze"].prepare(LlamaForCausalLM(config), settings)
    assert model.model.embed_tokens.weight.requires_grad  # the one tensor behind lm_head.weight
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["model.embed_tokens.weight"]


def test_progress_false_quiets_library_bars_and_restores_them(tiny_model_dir: Path, tmp_path: Path,
                                                              capfd: pytest.CaptureFixture[str]) -> None:
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()  # the in-process CLI tests turn the bars off
    hf_logging.enable_progress_bar()
    try:
        config = tiny_run_config(tiny_model_dir, tmp_path, training={"max_steps": 1}, eval={"before_after": False})
        train(config, progress=False)
        assert "Loading weights" not in capfd.readouterr().err
        assert hf_logging.is_progress_bar_enabled()  # a notebook's own later loads still show their bars
    finally:
        if not was_enabled:
            hf_logging.disable_progress_bar()
