"""The technique interface: the compatibility matrix (config validation, the generated docs table), optimizer
parameter groups, per-step hooks, how the base is loaded, and the meta-device skeleton."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from support.ddp_driver import StopAfter
from support.runs import tiny_config, tiny_run_config
from support.tiny import toy_chat_records, write_jsonl
from transformers import AutoConfig, AutoModelForCausalLM

from tunelab.config import ConfigError, build_config
from tunelab.data import TokenizedExample, collate
from tunelab.objectives import OBJECTIVES
from tunelab.techniques import TECHNIQUES
from tunelab.config import compat
from tunelab.training.session import make_optimizer


def test_docs_compatibility_table_equals_the_declarations() -> None:
    text = compat.DOCS_TABLE.read_text()
    assert compat.render_docs(text) == text, "run: python -m tunelab.config.compat --write"
    for name in TECHNIQUES:
        assert f"| `{name}` |" in text


def test_every_refusal_names_a_known_feature_with_a_reason() -> None:
    matrix = compat.matrix()
    assert set(matrix) == set(TECHNIQUES)
    for name, cells in matrix.items():
        for feature, reason in cells.items():
            assert reason is None or len(reason) > 20, (name, feature)
            if feature == "merge":
                assert (reason is None) == (TECHNIQUES[name].merge is not None)


def test_a_refusal_of_an_unknown_feature_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    bad = dataclasses.replace(TECHNIQUES["lora"], refuses={"packnig": "typo"})
    monkeypatch.setitem(TECHNIQUES, "lora", bad)
    with pytest.raises(RuntimeError, match="packnig"):
        compat.matrix()


def test_loraplus_gives_b_matrices_the_ratio_times_the_rate(tiny_model_dir: Path) -> None:
    config = build_config({"technique": {"name": "lora", "r": 4, "loraplus_lr_ratio": 16},
                           "training": {"learning_rate": 1e-3}})
    model = TECHNIQUES["lora"].apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config.technique)
    optimizer = make_optimizer(model, config)
    rate_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    names = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_B" in n for n, _ in names) and any("lora_A" in n for n, _ in names)
    for name, param in names:
        assert rate_of[id(param)] == pytest.approx(1.6e-2 if "lora_B" in name else 1e-3), name
    plain = make_optimizer(model, build_config({"technique": {"name": "lora", "r": 4}, "training": {"learning_rate": 1e-3}}))
    assert {g["lr"] for g in plain.param_groups} == {1e-3}


def test_loraplus_rates_match_the_reference_implementation(tiny_model_dir: Path) -> None:
    """Every trainable parameter gets the rate PEFT's create_loraplus_optimizer (the paper's reference code) gives
    it, on a model with each kind: A and B matrices, DoRA's 1-d magnitudes and an adapted embedding layer."""
    from peft.optimizers import create_loraplus_optimizer

    config = build_config({"technique": {"name": "lora", "r": 4, "loraplus_lr_ratio": 16, "use_dora": True,
                                         "loraplus_lr_embedding": 3e-5,
                                         "target_modules": ["embed_tokens", "q_proj", "v_proj"]},
                           "training": {"learning_rate": 1e-3}})
    model = TECHNIQUES["lora"].apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config.technique)
    ours = {id(p): g["lr"] for g in make_optimizer(model, config).param_groups for p in g["params"]}
    reference = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                          loraplus_lr_embedding=3e-5)
    theirs = {id(p): g["lr"] for g in reference.param_groups for p in g["params"]}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    kinds = {"lora_magnitude_vector": 1.6e-2, "lora_embedding_A": 3e-5, "lora_A": 1e-3}
    for kind, rate in kinds.items():  # the premise: each kind is there, at its reference rate
        assert any(kind in n and theirs[id(p)] == pytest.approx(rate) for n, p in trainable.items()), kind
    assert {n: ours[id(p)] for n, p in trainable.items()} == pytest.approx({n: theirs[id(p)] for n, p in trainable.items()})


def test_the_skeleton_has_no_weights_and_the_same_modules(tiny_model_dir: Path) -> None:
    from tunelab.models import model_skeleton

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    skeleton = model_skeleton(model.config)
    assert all(p.is_meta for p in skeleton.parameters())
    assert [n for n, _ in skeleton.named_parameters()] == [n for n, _ in model.named_parameters()]


# ---------------------------------------------------------------- the matrix in config validation and in training

def _refusable(name: str) -> list[tuple[dict[str, Any], str]]:
    """(config sections that ask for a refused feature, the feature) for each refusal a config can express."""
    technique = TECHNIQUES[name]
    asks = []
    if technique.refusal("packing"):
        asks.append(({"data": {"packing": True}}, "packing"))
    if technique.refusal("gradient_checkpointing"):
        asks.append(({"training": {"gradient_checkpointing": True}}, "gradient_checkpointing"))
    for objective in OBJECTIVES:
        if technique.refusal(f"objective:{objective}"):
            asks.append(({"objective": {"name": objective}}, f"objective:{objective}"))
    return asks


REFUSED = [(name, sections, feature) for name in TECHNIQUES for sections, feature in _refusable(name)]


def test_some_refusals_are_expressible_in_a_config() -> None:
    assert {name for name, _, _ in REFUSED} >= {"prompt_tuning", "prefix_tuning", "p_tuning"}


@pytest.mark.parametrize("name, sections, feature", REFUSED, ids=[f"{n}-{f}" for n, _, f in REFUSED])
def test_every_refused_pair_is_refused_with_its_reason(name: str, sections: dict[str, Any], feature: str) -> None:
    with pytest.raises(ConfigError) as error:
        build_config({"technique": {"name": name}, **sections})
    assert TECHNIQUES[name].refusal(feature) in str(error.value)


def test_default_packing_is_turned_off_for_a_technique_that_cannot_pack(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO"):
        config = build_config({"technique": {"name": "prompt_tuning"}})
    assert config.data.packing is False and "cannot pack" in caplog.text
    assert "packing: false" in config.to_yaml()
    assert build_config({"technique": {"name": "lora"}}).data.packing is True


def _runs_with_defaults(name: str) -> bool:
    """False for a technique whose settings have no usable default (adapter_routing needs its adapters named)."""
    try:
        build_config({"technique": {"name": name}, "data": {"packing": False}})
    except ConfigError:
        return False
    return True


@pytest.mark.parametrize("name", [n for n in TECHNIQUES if _runs_with_defaults(n)])
def test_every_allowed_pair_runs_two_steps(name: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Each technique trains 2 steps with every feature it allows switched on together (packing, checkpointing)."""
    from tunelab.training import train

    technique = TECHNIQUES[name]
    small = {"lora": {"r": 2}, "qlora": {"r": 2}, "adalora": {"init_r": 2, "target_r": 1}, "vera": {"r": 8},
             "loha": {"r": 2}, "lokr": {"r": 2}, "prompt_tuning": {"num_virtual_tokens": 2},
             "prefix_tuning": {"num_virtual_tokens": 2}, "p_tuning": {"num_virtual_tokens": 2},
             "multitask_prompt_tuning": {"num_virtual_tokens": 2}}.get(name, {})
    records = toy_chat_records(12)
    for i, record in enumerate(records):  # multi-task data (only multitask prompt tuning needs it; others ignore it)
        record["task"] = "even" if i % 2 == 0 else "odd"
    data = write_jsonl(tmp_path / "train.jsonl", records)
    config = tiny_config(
        tiny_model_dir, technique={"name": name, **small},
        data={"train": [str(data)], "val_size": 2, "max_length": 64,
              "packing": technique.refusal("packing") is None},
        training={"max_steps": 2, "micro_batch_size": 2,
                  "gradient_checkpointing": technique.refusal("gradient_checkpointing") is None},
        eval={"before_after": False}, output={"dir": str(tmp_path / "run")},
    )
    result = train(config, progress=False)
    assert result.status == "completed" and result.step == 2
    assert (result.run_dir / technique.result_dir_name).is_dir()


@pytest.mark.parametrize("name", ["prompt_tuning", "prefix_tuning", "p_tuning", "lora"])
def test_rows_past_the_models_context_with_the_virtual_tokens_are_refused_before_the_base_evaluation(
        name: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    """A row takes data.max_length positions of the model's context (max_position_embeddings) plus the virtual
    tokens a prompt-learning technique puts before it: past the context, training is refused at set-up, with the
    keys and the numbers; exactly the context trains. LoRA adds none; its packed rows count positions per example,
    so a packed row as long as data.max_length is not refused for its length (tests/test_serve.py's full fine-tune
    packs 1024-token rows of short examples on this 512-position model)."""
    from tunelab.training import train

    context = AutoConfig.from_pretrained(tiny_model_dir).max_position_embeddings
    virtual = 8 if name != "lora" else 0
    long = [{"messages": [{"role": "user", "content": "say cat"}, {"role": "assistant", "content": "cat " * context}]}]
    data = write_jsonl(tmp_path / "long.jsonl", long * 4)  # each cut at data.max_length: rows of exactly that

    def config(max_length: int, out: str):  # noqa: ANN202
        technique = {"name": name, "num_virtual_tokens": virtual} if virtual else {"name": name, "r": 2}
        return tiny_config(tiny_model_dir, technique=technique,
                           data={"train": [str(data)], "val_size": 0, "max_length": max_length},
                           training={"max_steps": 1, "micro_batch_size": 1},
                           eval={"num_samples": 0, "before_after": False}, output={"dir": str(tmp_path / out)})

    over = context - virtual + 1
    with pytest.raises(ConfigError) as refused:
        train(config(over, "over"), progress=False)
    message = " ".join(str(refused.value).split())
    added = (f" plus the {virtual} virtual tokens of technique.num_virtual_tokens, {context + 1} positions,"
             if virtual else "")
    assert (f"the longest row of this data, {over} tokens (data.max_length {over}){added} is past the model's "
            f"context: {context} positions (max_position_embeddings in the config.json of model.name {tiny_model_dir})"
            ) in message, message
    tail = " or lower technique.num_virtual_tokens." if virtual else "."
    assert f"Set data.max_length to at most {context - virtual}{tail}" in message
    assert not (tmp_path / "over" / "base_eval.json").exists()  # at set-up, before the base evaluation
    result = train(config(context - virtual, "fits"), progress=False)  # max_length + virtual tokens == the context
    assert result.status == "completed" and result.step == 1


def test_a_cpu_run_through_the_python_api_shows_no_warning_of_pefts_deprecated_read(tiny_model_dir: Path,
                                                                                   tmp_path: Path) -> None:
    """PEFT reads transformers' deprecated ``is_gradient_checkpointing`` whenever it wraps a model (training's
    get_peft_model, load_run's PeftModel.from_pretrained): its FutureWarning, which nobody running tunelab can act
    on, was shown by every Python-API process (the CLI drops it). Silenced there only: a user's own read still
    warns."""
    import warnings

    import tunelab

    def alias_warnings() -> list[str]:
        return [str(w.message) for w in caught if "is_gradient_checkpointing" in str(w.message)]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = tunelab.train(tiny_run_config(tiny_model_dir, tmp_path), progress=False)
        tunelab.load_run(result.run_dir, device="cpu")
        assert result.status == "completed" and alias_warnings() == []
        assert AutoModelForCausalLM.from_pretrained(tiny_model_dir).is_gradient_checkpointing is False  # the user's
        assert len(alias_warnings()) == 1  # still warned, after tunelab's runs in this process


def _rows_loss(model: torch.nn.Module, rows: list[list[TokenizedExample]]) -> float:
    batch = collate(rows, 0)
    with torch.no_grad():
        result = OBJECTIVES["sft"].loss_sum(model, batch)
    return float(result.loss_sum) / result.num_units


@pytest.mark.parametrize("name, packing_changes_the_loss", [("prompt_tuning", True), ("lora", False)])
def test_packing_changes_the_loss_only_for_prompt_learning(tiny_model_dir: Path, name: str, packing_changes_the_loss: bool) -> None:
    """Why prompt-learning methods refuse packing: PEFT drops their position ids, so two examples packed in one
    row attend to each other and the loss changes. LoRA (positive control) keeps position ids: packing is exact."""
    torch.manual_seed(0)
    settings = build_config({"technique": {"name": name, **({"num_virtual_tokens": 3} if name != "lora" else {"r": 2, "init": "gaussian"})},
                             "data": {"packing": False}}).technique
    model = TECHNIQUES[name].apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir), settings).eval()
    a = TokenizedExample(list(range(5, 17)), list(range(5, 17)), "a")
    b = TokenizedExample(list(range(30, 40)), list(range(30, 40)), "b")
    separate = (_rows_loss(model, [[a]]) * 11 + _rows_loss(model, [[b]]) * 9) / 20  # token-weighted, as one batch
    packed = _rows_loss(model, [[a, b]])
    assert (abs(packed - separate) > 1e-3) == packing_changes_the_loss, (packed, separate)


# ---------------------------------------------------------------- LoRA initialisations and AdaLoRA's hook

@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_base_changing_init_saves_an_adapter_for_the_original_base(init: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    """PiSSA/OLoRA rewrite the frozen base at initialisation; the saved adapter is converted so that plain PEFT on
    the *original* base gives the trained model's logits."""
    from peft import PeftModel

    settings = build_config({"technique": {"name": "lora", "r": 4, "dropout": 0.0, "init": init}}).technique
    model = TECHNIQUES["lora"].apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir), settings).eval()
    with torch.no_grad():  # stand-in for training: move every adapter weight
        for param in (p for p in model.parameters() if p.requires_grad):
            param.add_(0.05 * torch.randn_like(param))
    folder = TECHNIQUES["lora"].save(model, tmp_path)
    assert not (tmp_path / "initial-adapter").exists()  # the temporary starting adapter is gone
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder).eval()
    with torch.no_grad():
        assert (plain(ids).logits - model(input_ids=ids).logits).abs().max() < 1e-4


@pytest.mark.parametrize("steps", [4, 1])  # 1: the first step is also the final allocation (PEFT raised KeyError)
def test_adalora_reallocates_its_rank_budget_during_training(tiny_model_dir: Path, tmp_path: Path, steps: int) -> None:
    """The loop's per-step hook runs AdaLoRA's allocator: the saved adapter has fewer ranks than it started with."""
    import json

    from tunelab.training import train

    data = write_jsonl(tmp_path / "train.jsonl", toy_chat_records(16))
    config = tiny_config(
        tiny_model_dir,
        technique={"name": "adalora", "init_r": 6, "target_r": 2, "warmup_ratio": 0.0, "final_ratio": 0.0},
        data={"train": [str(data)], "val_size": 2, "max_length": 64},
        training={"max_steps": steps, "micro_batch_size": 2, "learning_rate": 1e-2},
        eval={"before_after": False}, output={"dir": str(tmp_path / "run")},
    )
    run = train(config, progress=False).run_dir
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    ranks = list((saved.get("rank_pattern") or {}).values())
    assert ranks, "no allocation was recorded"
    kept = sum(sum(1 for keep in r if keep) if isinstance(r, list) else r for r in ranks)
    assert kept < 6 * len(ranks), ranks  # some singular triplets were pruned


# ---------------------------------------------------------------- AdaLoRA: orthogonality penalty, allocator state


def _adalora(tiny_model_dir: Path, **settings: Any) -> tuple[torch.nn.Module, Any]:
    from tunelab.techniques.base import RunContext

    config = tiny_config(tiny_model_dir, technique={"name": "adalora", "init_r": 4, "target_r": 2, **settings})
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = TECHNIQUES["adalora"].apply(base, config.technique, RunContext(total_steps=10)).eval()
    with torch.no_grad():  # move A and B away from PEFT's small init, so the penalty is far from its floor
        for name, param in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                param.add_(torch.randn_like(param) * 0.3)
    return model, config.technique


def test_adalora_penalty_is_the_one_peft_adds_to_its_own_loss(tiny_model_dir: Path) -> None:
    """tunelab adds AdaLoRA's orthogonality penalty itself; it equals what PEFT's forward adds to a labelled loss."""
    from tunelab.techniques.adalora import orthogonality_penalty

    model, settings = _adalora(tiny_model_dir, orth_reg_weight=0.7)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    peft_config = model.peft_config["default"]
    with torch.no_grad():
        with_penalty = model(input_ids=ids, labels=ids).loss
        peft_config.orth_reg_weight = 0.0
        without = model(input_ids=ids, labels=ids).loss
        ours = orthogonality_penalty(model, settings)
    assert float(ours) > 0.1  # not a vanishing term: the comparison below means something
    assert abs(float(with_penalty - without) - float(ours)) < 1e-5, (float(with_penalty - without), float(ours))
    assert orthogonality_penalty(model, settings.model_copy(update={"orth_reg_weight": 0.0})) is None


def test_the_loop_adds_the_technique_penalty_once_per_step(tiny_model_dir: Path) -> None:
    """Gradients of a window = gradients of (token loss / tokens + penalty), the penalty counted once, not per
    micro-batch; without the penalty they differ (negative control)."""
    from tunelab.distributed import make_accelerator

    from tunelab.techniques.adalora import orthogonality_penalty
    from tunelab.training.loop import accumulate_gradients

    model, settings = _adalora(tiny_model_dir, orth_reg_weight=0.5)
    spec = OBJECTIVES["sft"]
    rows = [[TokenizedExample(list(range(5, 5 + n)), [-100] * 2 + list(range(7, 5 + n)), f"x{n}")] for n in (9, 6, 12)]
    window = [collate([row], 0) for row in rows]  # three micro-batches of one row

    def grads(penalty: Any) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        _, units, value = accumulate_gradients(model, window, spec, make_accelerator("no"), penalty)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, units, value

    looped, units, value = grads(lambda: orthogonality_penalty(model, settings))
    model.zero_grad(set_to_none=True)
    total = sum(spec.loss_sum(model, batch).loss_sum for batch in window) / units
    (total + orthogonality_penalty(model, settings)).backward()
    by_hand = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert value is not None and value > 0
    assert looped.keys() == by_hand.keys()
    for name in by_hand:
        assert torch.allclose(looped[name], by_hand[name], atol=1e-6), name
    plain, _, none = grads(None)
    assert none is None
    assert any(not torch.allclose(plain[n], by_hand[n], atol=1e-6) for n in by_hand if ".lora_A." in n)


def _adalora_resume_pair(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    from tunelab.training import loop, session

    data = write_jsonl(tmp_path / "train.jsonl", toy_chat_records(24))
    technique = {"name": "adalora", "init_r": 4, "target_r": 2, "warmup_ratio": 0.0, "final_ratio": 0.2,
                 "dropout": 0.1}
    sections = {"technique": technique, "training": {"save_every": 5}, "eval": {"before_after": False}}
    straight = tiny_run_config(tiny_model_dir, tmp_path, data, output={"dir": str(tmp_path / "straight")}, **sections)
    assert session.train(straight, progress=False).step == 10
    split = tiny_run_config(tiny_model_dir, tmp_path, data, output={"dir": str(tmp_path / "split")}, **sections)
    with monkeypatch.context() as patch:
        patch.setattr(loop, "_StopRequest", StopAfter(5))
        assert session.train(split, progress=False).status == "interrupted"
    assert session.train(split, resume=True, progress=False).status == "completed"
    return straight.output.dir, split.output.dir


def test_adalora_resume_continues_its_allocation_exactly(tiny_model_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The allocator's statistics travel in the checkpoint: resumed = uninterrupted, losses and adapter bit for bit."""
    import json

    from safetensors.torch import load_file

    from tunelab.runs import read_metrics

    straight, split = _adalora_resume_pair(tiny_model_dir, tmp_path, monkeypatch)
    losses = lambda run: [m["loss"] for m in read_metrics(Path(run)) if m["kind"] == "train"]  # noqa: E731
    assert losses(straight) == losses(split) and len(losses(split)) == 10
    penalties = [m["penalty"] for m in read_metrics(Path(split)) if m["kind"] == "train"]
    assert len(penalties) == 10 and all(p > 0 for p in penalties)
    a = load_file(str(Path(straight) / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(Path(split) / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    pattern = lambda run: json.loads((Path(run) / "adapter" / "adapter_config.json").read_text())["rank_pattern"]  # noqa: E731
    assert pattern(straight) == pattern(split)
    from tunelab.checkpoint import load_technique_state

    _, extras = load_technique_state(Path(split) / "checkpoints" / "step-000010")  # after the final allocation
    stats = [load_technique_state(Path(run) / "checkpoints" / "step-000010")[0] for run in (straight, split)]
    assert stats[0].keys() == stats[1].keys() and all(torch.equal(stats[0][k], stats[1][k]) for k in stats[0])
    kept = extras["rank_pattern"]
    assert kept and all(len(mask) == 4 for mask in kept.values())
    assert sum(map(sum, kept.values())) < 4 * len(kept)  # pruned triplets: a real allocation was saved


def test_adalora_resume_without_the_allocator_state_differs(tiny_model_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: restarting the allocator's statistics on resume changes the run."""
    from safetensors.torch import load_file

    from tunelab import checkpoint

    monkeypatch.setattr(checkpoint, "load_technique_state", lambda path: None)
    straight, split = _adalora_resume_pair(tiny_model_dir, tmp_path, monkeypatch)
    a = load_file(str(Path(straight) / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(Path(split) / "adapter" / "adapter_model.safetensors"))
    assert any(not torch.equal(a[n], b[n]) for n in a)
