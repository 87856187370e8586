"""Grouped-query attention on a CPU shares the key/value heads inside torch's kernel during training
(training/attention.py): the forward is the same bit for bit and the gradients at least as close to float32, a CPU training run switches it on, and the switch is
restored when the run ends."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from support.runs import tiny_config
from support.tiny import toy_chat_records, write_jsonl
from transformers import AutoModelForCausalLM

from tunelab.training import train
from tunelab.models import PACKED_ATTENTION_SWITCH
from tunelab.training.attention import FORCE_GQA, kv_heads_shared_in_kernel

CPU = torch.device("cpu")


def _loss_and_grads(model: Any, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, list]:
    model.zero_grad()
    logits = model(input_ids=input_ids, position_ids=positions, use_cache=False).logits  # (B, T, V)
    logits.float().square().mean().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters()]


def test_shared_heads_give_the_same_forward_and_gradients_as_close_to_float32(tiny_model_dir: Path) -> None:
    """The forward is the same bit for bit; the key/value gradients are summed over their query heads inside the
    kernel (in float32) instead of after it (in bfloat16), so they may differ in the last bfloat16 bit, and are at
    least as close to a float32 model's."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    exact = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # the tiny model groups its heads
    torch.manual_seed(0)
    input_ids = torch.randint(3, 100, (2, 24))
    positions = torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1)  # (2, 24): two packed examples per row
    calls: list[bool] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(bool(kwargs.get("enable_gqa")))
        return sdpa(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        plain = _loss_and_grads(model, input_ids, positions)
        with kv_heads_shared_in_kernel(CPU) as switched:
            shared = _loss_and_grads(model, input_ids, positions)
    layers = model.config.num_hidden_layers
    assert switched and calls == [False] * layers + [True] * layers  # the control copies the heads; then shared
    assert torch.equal(plain[0], shared[0])
    reference = _loss_and_grads(exact, input_ids, positions)[1]
    plain_error = sum(float((a.float() - r).abs().sum()) for a, r in zip(plain[1], reference))
    shared_error = sum(float((b.float() - r).abs().sum()) for b, r in zip(shared[1], reference))
    assert shared_error <= plain_error, (shared_error, plain_error)
    for a, b in zip(plain[1], shared[1]):  # a few bfloat16 roundings (2^-8 each) of the largest gradient apart
        assert float((a.float() - b.float()).abs().max()) <= 2 ** -5 * float(a.float().abs().max()) + 1e-12


def test_a_cpu_run_shares_the_heads_and_restores_the_switch(tiny_model_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' SDPA on the packed rows (the per-example path off: it calls the kernel itself) gets
    ``enable_gqa`` in the training forwards; the memory plan's probe, which runs before them, calls no SDPA that
    reaches here (its meta attention is the kernel's, tunelab.plan.memory)."""
    monkeypatch.delenv(FORCE_GQA, raising=False)
    monkeypatch.setenv(PACKED_ATTENTION_SWITCH, "0")
    data = write_jsonl(tmp_path / "train.jsonl", toy_chat_records(8))
    config = tiny_config(tiny_model_dir, data={"train": [str(data)], "val_size": 0, "max_length": 64},
                         training={"max_steps": 1}, eval={"before_after": False}, output={"dir": str(tmp_path / "run")})
    seen: list[bool] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: (seen.append(bool(k.get("enable_gqa"))), sdpa(*a, **k))[1])
    train(config, progress=False)
    assert seen and all(seen)
    assert FORCE_GQA not in os.environ


def test_a_users_own_setting_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FORCE_GQA, "0")
    with kv_heads_shared_in_kernel(CPU) as switched:
        assert not switched and os.environ[FORCE_GQA] == "0"
    assert os.environ[FORCE_GQA] == "0"
    with kv_heads_shared_in_kernel(torch.device("meta")) as switched:
        assert not switched
