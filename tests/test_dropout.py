"""The CPU dropout (dropout.py): the positions it draws drop each element independently with probability p, its
output and gradient are the input and the gradient times 1 / (1 - p) with those positions zeroed, it draws from
torch's seeded generator, it saves only the positions (as the memory plan's probe counts them), and a CPU training
run's adapter dropout uses it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support.planning import config_for, cpu_activations_with_and_without
from support.runs import tiny_config
from support.tiny import toy_chat_records, write_jsonl
from torch import nn

from tunelab import dropout
from tunelab.dropout import CpuDropout, drop_positions, use_cpu_dropout
from tunelab.training import train

COUNT = 1_000_000


def _dropped(count: int, p: float) -> torch.Tensor:
    """The 0/1 float mask of the positions ``drop_positions`` draws, after checking they are valid indices."""
    positions = drop_positions(count, p)
    assert positions.dtype == torch.int64
    if positions.numel():
        assert int(positions[0]) >= 0 and int(positions[-1]) < count
        assert bool((positions[1:] > positions[:-1]).all())  # increasing: no position twice
    mask = torch.zeros(count)
    mask[positions] = 1
    return mask


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_each_element_drops_with_probability_p(p: float) -> None:
    torch.manual_seed(0)
    share = float(_dropped(COUNT, p).mean())
    assert abs(share - p) < 5 * (p * (1 - p) / COUNT) ** 0.5, (share, p)  # five standard deviations


def test_gaps_are_geometric_and_neighbours_independent() -> None:
    """P(gap = 1) = p and P(gap = 2) = (1 - p) p, and two neighbours are both dropped with probability p^2."""
    torch.manual_seed(1)
    p = 0.3
    mask = _dropped(COUNT, p)
    gaps = torch.diff(mask.nonzero().flatten())
    for k, expected in ((1, p), (2, (1 - p) * p)):
        share = float((gaps == k).float().mean())
        assert abs(share - expected) < 5 * (expected * (1 - expected) / gaps.numel()) ** 0.5, (k, share, expected)
    both = float((mask[1:] * mask[:-1]).mean())
    assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / COUNT) ** 0.5


def test_the_number_dropped_varies_as_a_binomial() -> None:
    """Independent draws: over repeats, the count's variance is n p (1 - p) (a sampler of a fixed number, or of
    correlated positions, would not give it)."""
    torch.manual_seed(2)
    n, p, repeats = 2000, 0.2, 400
    counts = torch.tensor([float(drop_positions(n, p).numel()) for _ in range(repeats)])
    assert abs(float(counts.mean()) - n * p) < 5 * (n * p * (1 - p) / repeats) ** 0.5
    assert 0.75 < float(counts.var()) / (n * p * (1 - p)) < 1.3  # the sample variance of 400 is within 25% of it


def test_a_short_draw_is_continued(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the gaps drawn fall short of the end, more are drawn from where they stopped: the positions stay
    valid and the rate p."""
    monkeypatch.setattr(dropout, "gaps_to_draw", lambda left, p: max(1, int(left * p / 7)))
    torch.manual_seed(3)
    share = float(_dropped(COUNT, 0.05).mean())
    assert abs(share - 0.05) < 5 * (0.05 * 0.95 / COUNT) ** 0.5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_output_and_gradient_are_bit_for_bit_the_kept_input_times_the_scale(dtype: torch.dtype) -> None:
    """The scale 1 / (1 - p) is applied in float32 and rounded once: in bfloat16 a mask pre-multiplied by the scale
    would round the scale to 8 bits and bias the expectation."""
    layer = CpuDropout(0.05).train()
    x = torch.randn(4, 64, 96, dtype=dtype, requires_grad=True)
    torch.manual_seed(4)
    out = layer(x)
    torch.manual_seed(4)
    keep = _dropped(x.numel(), 0.05).view(x.shape) == 0  # the same draws
    scale = 1 / (1 - 0.05)
    assert out.dtype == dtype and torch.equal(out, torch.where(keep, x.detach(), 0) * scale)
    grad = torch.randn(4, 64, 96, dtype=dtype)
    out.backward(grad)
    assert x.grad.dtype == dtype and torch.equal(x.grad, torch.where(keep, grad, 0) * scale)


def test_output_keeps_the_expectation() -> None:
    torch.manual_seed(5)
    out = CpuDropout(0.1).train()(torch.ones(1000, 1000))
    assert abs(float(out.mean()) - 1.0) < 0.003


def test_it_draws_from_torchs_seeded_generator_and_is_off_in_eval_mode() -> None:
    layer = CpuDropout(0.2).train()
    x = torch.randn(64, 64)
    torch.manual_seed(6)
    first = layer(x)
    torch.manual_seed(6)
    assert torch.equal(layer(x), first)
    assert not torch.equal(layer(x), first)  # the generator moved on
    assert torch.equal(layer.eval()(x), x)


def _saved(layer: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
        layer(x)
    return saved


def test_it_saves_the_positions_only_as_the_memory_plans_probe_counts_them() -> None:
    """A real forward saves about n p int64 positions (8 p bytes an element, not nn.Dropout's byte), and the meta
    forward the memory plan runs saves n p of them."""
    layer = CpuDropout(0.05).train()
    shape = (4, 256, 576)
    n = 4 * 256 * 576
    torch.manual_seed(7)
    (real,) = _saved(layer, torch.randn(shape, dtype=torch.bfloat16, requires_grad=True))
    (meta,) = _saved(layer, torch.empty(shape, dtype=torch.bfloat16, device="meta", requires_grad=True))
    assert real.dtype == meta.dtype == torch.int64 and meta.is_meta
    assert meta.numel() == round(n * 0.05)
    assert abs(real.numel() - meta.numel()) < 5 * (n * 0.05 * 0.95) ** 0.5


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


def test_a_cpu_plan_counts_the_positions_not_a_mask(tiny_model_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory plan's meta probe swaps the dropout as a CPU run does: an adapted layer's input dropout saves
    round(n p) int64 positions where nn.Dropout saves a mask in x's dtype (4 n bytes in float32). Only the second
    layer's dropouts save anything: the first layer's input descends from the frozen embeddings, so no gradient
    flows back through its dropouts."""
    config = config_for(tiny_model_dir, tmp_path, {"name": "lora", "r": 4, "dropout": 0.05,
                                                   "target_modules": ["q_proj", "v_proj"]})
    swapped, unswapped = cpu_activations_with_and_without(config, "use_cpu_dropout", monkeypatch)
    n = 2 * 32 * 64  # (micro-batch, length, hidden) of support.tiny's model
    sites = 2  # q_proj and v_proj of the second layer
    assert unswapped - swapped == sites * (4 * n - 8 * round(n * 0.05))
