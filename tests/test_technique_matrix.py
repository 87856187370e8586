"""Every registered technique on the tiny model: three steps lower the loss, only its own parameters change,
save + reload give the same logits (and plain PEFT loads the adapter), disabling the adapter gives the base
logits, and a mergeable result merges to the same logits. One trained model per technique is shared by the
module's tests."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from support.batches import TASKS, loss, toy_batch
from support.runs import tiny_config

from tunelab.models import load_model
from tunelab.objectives import OBJECTIVES
from tunelab.techniques import TECHNIQUES, RunContext
from tunelab.techniques.base import forward_inputs
from tunelab.training.session import make_optimizer

# Small settings per technique (the tiny model has hidden size 64, 2 layers) and a rate that moves it in 3 steps.
SETTINGS: dict[str, tuple[dict[str, Any], float]] = {
    "full": ({}, 3e-3),
    "freeze": ({"layers": [-1]}, 1e-2),
    "lora": ({"r": 4, "dropout": 0.0}, 1e-2),
    "qlora": ({"r": 4, "dropout": 0.0}, 1e-2),
    "adalora": ({"init_r": 4, "target_r": 2}, 1e-2),
    "ia3": ({}, 5e-2),
    "loha": ({"r": 4}, 1e-2),
    "lokr": ({"r": 4}, 1e-2),
    "vera": ({"r": 16}, 5e-2),
    "prompt_tuning": ({"num_virtual_tokens": 4}, 5e-2),
    "multitask_prompt_tuning": ({"num_virtual_tokens": 4, "num_ranks": 2}, 5e-2),
    "prefix_tuning": ({"num_virtual_tokens": 4}, 5e-2),
    "p_tuning": ({"num_virtual_tokens": 4}, 1e-2),
}
CPU = torch.device("cpu")


# Techniques whose result is not a PEFT adapter or a plain model, with their own test modules.
OWN_TESTS = {"adapter": "tests/test_adapter.py", "adapter_routing": "tests/test_adapter_routing.py"}


def test_every_registered_technique_is_in_the_matrix() -> None:
    assert set(SETTINGS) | set(OWN_TESTS) == set(TECHNIQUES)
    assert all((Path(__file__).parents[1] / path).is_file() for path in OWN_TESTS.values())


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], use_cache=False, **forward_inputs(model, batch))
        return out.logits[:, -batch["input_ids"].shape[1]:].float()


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in list(model.named_parameters()) + list(model.named_buffers())}


@dataclass
class Trained:
    config: Any
    model: torch.nn.Module
    before: dict[str, torch.Tensor]  # every tensor right after prepare (the technique's initial state)
    losses: list[float]
    base_logits: torch.Tensor
    folder: Path
    batch: dict[str, torch.Tensor]
    base_params: set[int]  # ids of the base model's own parameters


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Trained]:
    """Lazily trains each technique 3 steps on the toy batch (once per module)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = toy_batch(tokenizer)
    cache: dict[str, Trained] = {}

    class Lazy(dict):
        def __missing__(self, name: str) -> Trained:
            torch.set_num_threads(1)
            settings, lr = SETTINGS[name]
            config = tiny_config(tiny_model_dir, technique={"name": name, **settings},
                                 training={"learning_rate": lr}, data={"packing": False})
            technique = TECHNIQUES[name]
            torch.manual_seed(0)
            model = load_model(config.model, CPU, technique.base_load(config.technique, CPU))
            base_logits = logits(model, batch)
            base_params = {id(p) for p in model.parameters()}
            model = technique.apply(model, config.technique, RunContext(total_steps=3, tasks=TASKS))
            model.eval()  # dropout off: the comparisons below are exact
            before = snapshot(model)
            optimizer = make_optimizer(model, config)
            losses = [loss(model, batch)]
            for step in range(1, 4):
                result = OBJECTIVES["sft"].loss_sum(model, batch)
                (result.loss_sum / result.num_units).backward()
                optimizer.step()
                if technique.on_step is not None:
                    technique.on_step(model, config.technique, step)
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss(model, batch))
            folder = technique.save(model, tmp_path_factory.mktemp(name))
            self[name] = Trained(config, model, before, losses, base_logits, folder, batch, base_params)
            return self[name]

    return Lazy()


NAMES = list(SETTINGS)
ADAPTERS = [n for n in NAMES if TECHNIQUES[n].result_dir_name == "adapter"]
MERGEABLE = [n for n in NAMES if TECHNIQUES[n].refusal("merge") is None]


@pytest.mark.parametrize("name", NAMES)
def test_three_steps_lower_the_loss(trained: dict[str, Trained], name: str) -> None:
    losses = trained[name].losses
    assert losses[-1] < losses[0] - 1e-3, losses


@pytest.mark.parametrize("name", NAMES)
def test_only_the_techniques_own_parameters_change(trained: dict[str, Trained], name: str) -> None:
    t = trained[name]
    after = snapshot(t.model)
    trainable = {n for n, p in t.model.named_parameters() if p.requires_grad}
    assert trainable, "nothing trains"
    changed = {n for n in after if not torch.equal(after[n], t.before[n])}
    frozen_changed = changed - trainable
    # AdaLoRA's rank allocator writes its masks into the trained singular values only; buffers it updates are
    # its own bookkeeping (ranknum), never a base weight.
    frozen_changed = {n for n in frozen_changed if not n.endswith("ranknum.default")}
    assert not frozen_changed, sorted(frozen_changed)[:5]
    assert changed & trainable
    if TECHNIQUES[name].result_dir_name == "adapter":  # an adapter trains new tensors only, never a base weight
        trained_base = [n for n, p in t.model.named_parameters() if p.requires_grad and id(p) in t.base_params]
        assert not trained_base, trained_base[:5]


@pytest.mark.parametrize("name", NAMES)
def test_save_and_reload_give_identical_logits(trained: dict[str, Trained], name: str) -> None:
    t = trained[name]
    technique = TECHNIQUES[name]
    reloaded = technique.load_result(t.config, t.folder, CPU).eval()
    diff = (logits(reloaded, t.batch) - logits(t.model, t.batch)).abs().max()
    # AdaLoRA saves only the ranks its allocator kept (smaller matrices, another summation order): float rounding.
    assert diff <= (1e-5 if name == "adalora" else 0), diff


@pytest.mark.parametrize("name", ADAPTERS)
def test_the_adapter_loads_with_plain_peft(trained: dict[str, Trained], name: str, tiny_model_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t = trained[name]
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), t.folder).eval()
    if plain.active_peft_config.peft_type == "MULTITASK_PROMPT_TUNING":  # plain PEFT needs the task ids given
        plain.tunelab_forward_inputs = ("task_ids",)
    out = logits(plain, t.batch)
    if TECHNIQUES[name].base_load(t.config.technique, CPU).quantization_config is None:
        assert torch.allclose(out, logits(t.model, t.batch), atol=1e-5)
    else:  # the same adapter on the full-precision base: loads and runs (without the quantization error)
        assert out.shape == logits(t.model, t.batch).shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ADAPTERS)
def test_disabling_the_adapter_gives_the_base_logits(trained: dict[str, Trained], name: str) -> None:
    t = trained[name]
    with t.model.disable_adapter():
        assert torch.equal(logits(t.model, t.batch), t.base_logits)
    assert not torch.allclose(logits(t.model, t.batch), t.base_logits, atol=1e-4), "the adapter does nothing"


@pytest.mark.parametrize("name", MERGEABLE)
def test_merged_logits_equal_the_adapter_logits(trained: dict[str, Trained], name: str) -> None:
    t = trained[name]
    technique = TECHNIQUES[name]
    adapter_model = technique.load_result(t.config, t.folder, CPU).eval()
    merged = technique.merge(t.config, t.folder, CPU).model.eval()
    assert not any(".lora_" in n or "ia3_" in n or "hada_" in n or "lokr_" in n or "vera_" in n
                   for n, _ in merged.named_parameters()), "adapter modules left in the merged model"
    expected = logits(adapter_model, t.batch)
    assert not torch.allclose(expected, t.base_logits, atol=1e-4), "an identity adapter would merge trivially"
    assert (logits(merged, t.batch) - expected).abs().max() < 1e-5
