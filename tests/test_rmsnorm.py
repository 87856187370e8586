"""The CPU RMSNorm (norms.py): its output and input gradient equal transformers' Llama RMSNorm bit for
bit (the function alone: bfloat16 and float32; in a model: bfloat16, float32 keeps transformers'); a norm whose
weight trains, or a call without gradient, runs transformers' forward;
and a CPU training run swaps the frozen norms of the model it trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support.planning import config_for, cpu_activations_with_and_without
from support.runs import tiny_config
from support.tiny import toy_chat_records, write_jsonl
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tunelab.training import train
from tunelab.norms import _RmsNorm, use_cpu_rms_norm


def _norm(dtype: torch.dtype, width: int = 576) -> LlamaRMSNorm:
    torch.manual_seed(0)
    norm = LlamaRMSNorm(width, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(width) * 0.3 + 1)
    return norm.requires_grad_(False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 40.0])
def test_output_and_input_gradient_equal_transformers_bit_for_bit(dtype: torch.dtype, magnitude: float) -> None:
    norm = _norm(dtype)
    torch.manual_seed(1)
    # SmolLM2's width and the bench's micro-batch: a fused multiply-add in backward differs in a few of these 590k
    x = (torch.randn(4, 256, 576) * magnitude).to(dtype).requires_grad_()
    grad = torch.randn(4, 256, 576).to(dtype)
    expected = norm(x)  # transformers' forward, autograd's backward
    expected.backward(grad)
    expected_grad, x.grad = x.grad, None
    out = _RmsNorm.apply(x, norm.weight, norm.variance_epsilon)
    out.backward(grad)
    assert out.dtype == dtype and torch.equal(out, expected)
    assert x.grad.dtype == dtype and torch.equal(x.grad, expected_grad)


def test_swapped_norm_uses_it_only_with_a_frozen_weight_and_gradients() -> None:
    model = nn.Sequential(_norm(torch.bfloat16), _norm(torch.bfloat16).requires_grad_(True))
    assert use_cpu_rms_norm(model) == 1  # the trainable norm keeps transformers' class
    assert type(model[1]) is LlamaRMSNorm and isinstance(model[0], LlamaRMSNorm)
    assert model[0].state_dict().keys() == {"weight"}
    x = torch.randn(2, 8, 576, dtype=torch.bfloat16, requires_grad=True)
    assert model[0](x).grad_fn.name() == "_RmsNormBackward"
    with torch.no_grad():
        assert torch.equal(model[0](x), LlamaRMSNorm.forward(model[0], x))
    assert model[0](x.detach()).grad_fn is None
    x32 = x.detach().float().requires_grad_()  # float32: no island, transformers' forward (see norms.HALF)
    assert model[0](x32).grad_fn.name() != "_RmsNormBackward"


def test_a_cpu_training_run_swaps_the_frozen_norms(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", toy_chat_records(8))
    config = tiny_config(tiny_model_dir, data={"train": [str(data)], "val_size": 0, "max_length": 64},
                         technique={"name": "lora", "r": 4}, training={"max_steps": 1},
                         eval={"before_after": False}, output={"dir": str(tmp_path / "run")})
    seen: list[nn.Module] = []
    from tunelab.training import session

    swap = session.use_cpu_rms_norm
    session.use_cpu_rms_norm = lambda model: (seen.append(model), swap(model))[1]
    try:
        train(config, progress=False)
    finally:
        session.use_cpu_rms_norm = swap
    norms = [m for m in seen[0].modules() if isinstance(m, LlamaRMSNorm)]
    assert norms and all(type(m) is not LlamaRMSNorm for m in norms)
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["rms_norm"].startswith(f"{len(norms)} RMSNorm layers")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_lora_models_loss_and_gradients_are_unchanged_by_the_swap(tiny_model_dir: Path, dtype: torch.dtype) -> None:
    """The tiny Llama with LoRA adapters (their input needs the norms' gradient), frozen weights in ``dtype`` (bf16:
    float32 adapters under bf16 autocast, as a CPU bf16 run trains): the loss and every adapter gradient equal the
    unswapped model's bit for bit."""
    from peft import LoraConfig, get_peft_model
    from support.tiny import fresh_model

    results = []
    for swap in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(fresh_model(tiny_model_dir).to(dtype), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                                  init_lora_weights=False))
        if swap:
            assert use_cpu_rms_norm(model) == 5  # two per layer and the final one
        for param in model.parameters():  # a bf16 run's float32 master weights, under bf16 autocast
            if param.requires_grad:
                param.data = param.data.float()
        ids = torch.randint(3, 50, (2, 24))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys()
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)


def test_a_cpu_bf16_plan_counts_x_in_bf16_not_transformers_float32_copy(tiny_model_dir: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory plan's meta probe swaps the norms as a CPU run does: each norm that receives a gradient (all but
    the first layer's input norm: the frozen embeddings need none) saves x in bfloat16, 2 bytes an element less
    than transformers' float32 copy."""
    from tunelab import precision

    monkeypatch.setattr(precision, "detect_cpu_bf16", lambda: precision.CpuBf16(True, "tests: native bfloat16"))
    config = config_for(tiny_model_dir, tmp_path, "lora", dtype="auto")
    swapped, unswapped = cpu_activations_with_and_without(config, "use_cpu_rms_norm", monkeypatch)
    hidden, layers = 64, 2  # support.tiny's model
    assert unswapped - swapped == 2 * 2 * 32 * hidden * (2 * layers - 1 + 1)  # 2 per layer, minus the first, plus the final
