"""Causal attention per packed example, re-batched by length (training/attention.py): the same outputs and gradients
as transformers' SDPA attention on the packed rows' block-diagonal mask (float32 tolerance), used by every layer of a
CPU training run on packed rows, and only there; a plan that drops the per-example split attends across examples and
is caught."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from support.runs import tiny_config
from support.tiny import toy_chat_records, write_jsonl
from transformers import AutoModelForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from tunelab.models import PACKED_ATTENTION_SWITCH
from tunelab.training import attention, train

CPU = torch.device("cpu")
# (2, 24): row 0 holds three examples (10, 9, 5 tokens), row 1 two (7, 14) and a padding segment (3): every example
# restarts its positions at 0, as data/batching.py's collate lays them out
POSITIONS = torch.tensor([[*range(10), *range(9), *range(5)], [*range(7), *range(14), *range(3)]])


def _outputs(model: Any, input_ids: torch.Tensor, positions: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, list]:
    model.zero_grad()
    logits = model(input_ids=input_ids, position_ids=positions, use_cache=False, **kwargs).logits  # (B, T, V)
    logits.square().mean().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters()]


def _close(a: tuple[torch.Tensor, list], b: tuple[torch.Tensor, list]) -> bool:
    return torch.allclose(a[0], b[0], atol=1e-5, rtol=1e-4) and all(
        torch.allclose(x, y, atol=1e-6, rtol=1e-4) for x, y in zip(a[1], b[1]))


@pytest.fixture
def model(tiny_model_dir: Path) -> Any:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped heads are exercised
    return model


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = attention.attend_per_example
    monkeypatch.setattr(attention, "attend_per_example", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    return calls


@pytest.mark.parametrize("call_cost", [attention.CALL_COST, 0])  # one length group here; several (free calls)
def test_per_example_attention_equals_the_block_diagonal_mask(model: Any, counted: list[int], call_cost: int,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    groups = attention.length_groups
    monkeypatch.setattr(attention, "length_groups", lambda lengths: groups(lengths, call_cost=call_cost))
    assert len(attention.packed_plan(POSITIONS).groups) == (1 if call_cost else attention.MAX_GROUPS)
    input_ids = torch.randint(3, 100, POSITIONS.shape, generator=torch.Generator().manual_seed(0))
    masked = _outputs(model, input_ids, POSITIONS)
    with attention.attention_per_packed_example(CPU) as switched:
        per_example = _outputs(model, input_ids, POSITIONS)
    assert switched and len(counted) == model.config.num_hidden_layers  # every layer took the per-example path
    assert _close(masked, per_example)


def test_negative_control_a_plan_without_the_per_example_split_attends_across_examples(
        model: Any, counted: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole rows as the "examples": every token attends to the earlier examples of its row, which the mask forbids."""
    input_ids = torch.randint(3, 100, POSITIONS.shape, generator=torch.Generator().manual_seed(0))
    masked = _outputs(model, input_ids, POSITIONS)
    real = attention.packed_plan
    monkeypatch.setattr(attention, "packed_plan", lambda p: real(torch.arange(p.shape[1]).expand_as(p)))
    with attention.attention_per_packed_example(CPU):
        across = _outputs(model, input_ids, POSITIONS)
    assert counted and not _close(masked, across)


def test_other_calls_keep_transformers_attention(model: Any, counted: list[int]) -> None:
    """A padding mask given by the caller (not the examples' own block-diagonal causal mask) and rows of one sequence
    (no mask at all) run transformers' SDPA attention, so generation and scoring are unchanged."""
    input_ids = torch.randint(3, 100, POSITIONS.shape, generator=torch.Generator().manual_seed(0))
    padding = torch.ones(POSITIONS.shape, dtype=torch.long)
    padding[1, :3] = 0
    plain = torch.arange(POSITIONS.shape[1]).expand_as(POSITIONS)
    expected = [_outputs(model, input_ids, plain, attention_mask=padding), _outputs(model, input_ids, plain)]
    with attention.attention_per_packed_example(CPU):
        got = [_outputs(model, input_ids, plain, attention_mask=padding), _outputs(model, input_ids, plain)]
    assert not counted
    assert all(torch.equal(a[0], b[0]) for a, b in zip(expected, got))


def test_the_backward_matches_the_flash_kernels_and_float64() -> None:
    """The per-example attention's own backward against torch's flash kernel on the same causal examples (one per
    row, grouped heads): equal in float32, and in bfloat16 no further from float64 than the kernel's."""
    gen = torch.Generator().manual_seed(1)
    positions = torch.arange(37).expand(3, 37)  # (3, 37): one example per row, so one group of three
    plan = attention.packed_plan(positions)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, None)):
        q, k, v = (torch.randn(3, heads, 37, 16, generator=gen).to(dtype).requires_grad_() for heads in (6, 2, 2))
        grad = torch.randn(3, 6, 37, 16, generator=gen).to(dtype)
        ours = torch.autograd.grad(attention.attend_per_example(q, k, v, plan, None).transpose(1, 2), (q, k, v), grad)
        flash = torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True), (q, k, v), grad)
        exact = [x.detach().double().requires_grad_() for x in (q, k, v)]
        truth = torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(
            *exact, is_causal=True, enable_gqa=True), exact, grad.double())
        for a, b, t in zip(ours, flash, truth):
            if tol is not None:
                assert torch.allclose(a, b, atol=tol, rtol=tol)
            else:
                assert (a.double() - t).abs().max() <= (b.double() - t).abs().max() * 1.25 + 1e-3


def test_under_autocast_mixed_inputs_are_cast_as_sdpa_casts_them() -> None:
    """Full fine-tuning under bf16 autocast gives float32 q and k (rotary embedding in the float32 embeddings'
    dtype) and a bf16 v: the per-example kernel computes in autocast's dtype, as SDPA does, and the gradients
    reach the float32 inputs in float32."""
    gen = torch.Generator().manual_seed(2)
    positions = torch.arange(21).expand(2, 21)  # one example per row
    q, k = torch.randn(2, 4, 21, 8, generator=gen), torch.randn(2, 2, 21, 8, generator=gen)
    v = torch.randn(2, 2, 21, 8, generator=gen).bfloat16()
    inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    twins = [x.clone().requires_grad_() for x in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = attention.attend_per_example(*inputs, attention.packed_plan(positions), None).transpose(1, 2)
        sdpa = torch.nn.functional.scaled_dot_product_attention(*twins, is_causal=True, enable_gqa=True)
    assert ours.dtype == sdpa.dtype == torch.bfloat16
    assert torch.allclose(ours.float(), sdpa.float(), atol=2e-2)
    ours.float().sum().backward()
    sdpa.float().sum().backward()
    for mine, theirs in zip(inputs, twins):
        assert mine.grad.dtype == theirs.grad.dtype == mine.dtype
        assert torch.allclose(mine.grad.float(), theirs.grad.float(), atol=5e-2, rtol=5e-2)


def test_length_groups_cover_every_example_once_at_the_least_cost() -> None:
    def cost(groups: list[list[int]], lengths: list[int]) -> int:
        return sum(attention.CALL_COST + len(g) * max(lengths[i] for i in g) ** 2 for g in groups)

    for lengths in ([90, 80, 100, 20, 150, 95, 30], [256], [5, 5, 5, 5], [120, 10, 10, 10, 10, 10, 10, 10]):
        groups = attention.length_groups(lengths)
        assert 1 <= len(groups) <= attention.MAX_GROUPS
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        best = min(cost([[i for i, label in enumerate(split) if label == g] for g in set(split)], lengths)
                   for split in itertools.product(range(attention.MAX_GROUPS), repeat=len(lengths)))
        assert cost(groups, lengths) == best


def test_length_groups_of_a_long_context_batch_are_quick_and_complete() -> None:
    """Hundreds of examples (a long-context micro-batch): the groups are chosen among MAX_CUTS places, in well under
    a second, and still hold every example once, shortest to longest."""
    import random
    import time

    lengths = [random.Random(0).randint(1, 4096) for _ in range(5000)]
    started = time.process_time()
    groups = attention.length_groups(lengths)
    assert time.process_time() - started < 1.0
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(max(lengths[i] for i in a) <= min(lengths[i] for i in b) for a, b in zip(groups, groups[1:]))


def test_a_cpu_run_attends_per_example_and_restores_the_registry(tiny_model_dir: Path, tmp_path: Path,
                                                                 counted: list[int]) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", toy_chat_records(8))
    config = tiny_config(tiny_model_dir, data={"train": [str(data)], "val_size": 0, "max_length": 64, "packing": True},
                         training={"max_steps": 1}, eval={"before_after": False}, output={"dir": str(tmp_path / "run")})
    train(config, progress=False)
    assert counted
    assert attention.PACKED_SDPA not in ALL_ATTENTION_FUNCTIONS._local_mapping
    assert json.loads((tmp_path / "run" / "run_info.json").read_text())["attention"].startswith("causal per packed")
    assert attention.attention_in_use().startswith("transformers' SDPA")  # negative control: after the run


def test_the_switch_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PACKED_ATTENTION_SWITCH, "0")
    with attention.attention_per_packed_example(CPU) as switched:
        assert not switched and attention.PACKED_SDPA not in ALL_ATTENTION_FUNCTIONS._local_mapping
    monkeypatch.delenv(PACKED_ATTENTION_SWITCH)
    with attention.attention_per_packed_example(CPU) as switched:
        assert switched and ALL_ATTENTION_FUNCTIONS[attention.PACKED_SDPA] is attention.packed_sdpa_attention


def test_multi_axis_position_ids_keep_transformers_attention() -> None:
    """Position ids with one row per rotary axis (3, B, T: Qwen2-VL's mrope) say nothing this reads about examples."""
    q = k = torch.zeros(2, 1, POSITIONS.shape[1], 4)
    mask = attention.block_causal(POSITIONS)
    assert attention._plan_for(mask, POSITIONS, q, k) is not None
    assert attention._plan_for(mask, POSITIONS.expand(3, -1, -1), q, k) is None
