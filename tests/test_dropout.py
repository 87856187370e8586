"""The CPU dropout (training/dropout.py): its masks drop at the rounded rate in every one of the four fields a draw
is cut into, its output keeps the input's expectation, its gradient is the same masked scaling, it draws from torch's
seeded generator, and a CPU training run's adapter dropout uses it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support.runs import tiny_config
from support.tiny import toy_chat_records, write_jsonl
from torch import nn

from tunelab.training import train
from tunelab.training.dropout import FIELD_VALUES, CpuDropout, keep_mask, use_cpu_dropout


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_every_field_of_a_draw_drops_at_the_rounded_rate(p: float) -> None:
    torch.manual_seed(0)
    keep = keep_mask(torch.Size([4 * 250_000]), p).view(-1, 4)  # (draws, 4 fields)
    rate = round(p * FIELD_VALUES) / FIELD_VALUES
    assert abs(rate - p) <= 0.5 / FIELD_VALUES
    dropped = 1 - keep.float().mean(dim=0)  # (4,) one rate per field position
    spread = 5 * (rate * (1 - rate) / 250_000) ** 0.5  # five standard deviations of a binomial share
    assert torch.all((dropped - rate).abs() < spread), (dropped, rate)


def test_masks_of_neighbouring_fields_are_independent() -> None:
    torch.manual_seed(1)
    keep = keep_mask(torch.Size([4 * 250_000]), 0.5).view(-1, 4).float()
    both = (keep[:, 0] * keep[:, 1]).mean()
    assert abs(float(both) - 0.25) < 0.005  # P(both kept) = P(kept)^2 when the fields are independent


def test_output_keeps_the_expectation_and_the_gradient_is_the_same_masked_scale() -> None:
    torch.manual_seed(2)
    layer = CpuDropout(0.1).train()
    x = torch.ones(1000, 1000, requires_grad=True)
    out = layer(x)
    kept = out != 0
    scale = FIELD_VALUES / (FIELD_VALUES - round(0.1 * FIELD_VALUES))
    assert torch.equal(out[kept], torch.full_like(out[kept], scale))
    assert abs(float(out.detach().mean()) - 1.0) < 0.003
    grad = torch.randn(1000, 1000)
    out.backward(grad)
    assert torch.equal(x.grad, torch.where(kept, grad * scale, 0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_output_and_gradient_are_bit_for_bit_the_masked_input_times_the_scale(dtype: torch.dtype) -> None:
    """The 0/1 uint8 mask gives what a bool mask and one multiplication by the float scale give: in bfloat16 a
    mask pre-multiplied by the scale would round the scale to 8 bits and bias the expectation."""
    layer = CpuDropout(0.05).train()
    x = torch.randn(4, 64, 96, dtype=dtype, requires_grad=True)
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    keep = keep_mask(x.shape, 0.05).bool()  # the same draws, as a bool mask
    assert keep_mask(x.shape, 0.05).element_size() == 1  # a byte per element, as nn.Dropout's (the memory plan's)
    scale = FIELD_VALUES / (FIELD_VALUES - round(0.05 * FIELD_VALUES))
    assert out.dtype == dtype and torch.equal(out, torch.where(keep, x.detach(), 0) * scale)
    grad = torch.randn(4, 64, 96, dtype=dtype)
    out.backward(grad)
    assert x.grad.dtype == dtype and torch.equal(x.grad, torch.where(keep, grad, 0) * scale)


def test_it_draws_from_torchs_seeded_generator_and_is_off_in_eval_mode() -> None:
    layer = CpuDropout(0.2).train()
    x = torch.randn(64, 64)
    torch.manual_seed(5)
    first = layer(x)
    torch.manual_seed(5)
    assert torch.equal(layer(x), first)
    assert not torch.equal(layer(x), first)  # the generator moved on
    assert torch.equal(layer.eval()(x), x)


def test_a_cpu_training_run_swaps_the_adapters_dropout_in_place(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", toy_chat_records(8))
    config = tiny_config(tiny_model_dir, data={"train": [str(data)], "val_size": 0, "max_length": 64},
                         technique={"name": "lora", "r": 4, "dropout": 0.1}, training={"max_steps": 1},
                         eval={"before_after": False}, output={"dir": str(tmp_path / "run")})
    seen: list[nn.Module] = []
    from tunelab.training import session

    swap = session.use_cpu_dropout
    session.use_cpu_dropout = lambda model: (seen.append(model), swap(model))[1]
    try:
        train(config, progress=False)
    finally:
        session.use_cpu_dropout = swap
    layers = [m for m in seen[0].modules() if isinstance(m, nn.Dropout) and m.p > 0]
    assert layers and all(type(m) is CpuDropout for m in layers)
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["dropout"].startswith(f"{len(layers)} dropout layers")


def test_zero_rate_layers_are_left_alone() -> None:
    model = nn.Sequential(nn.Dropout(0.0), nn.Dropout(0.1))
    assert use_cpu_dropout(model) == 1 and type(model[0]) is nn.Dropout and type(model[1]) is CpuDropout
