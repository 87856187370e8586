"""QLoRA: the base's linear layers really are 4-bit (or 8-bit) bitsandbytes layers, their weights take 1/8 to 1/4
of the memory of fp32, and training on top lowers the loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.runs import tiny_config

from tunelab.config import build_config
from tunelab.models import load_model
from tunelab.techniques import TECHNIQUES, count_parameters

CPU = torch.device("cpu")


def quantized_base(tiny_model_dir: Path, **settings):  # noqa: ANN201, ANN003
    config = tiny_config(tiny_model_dir, technique={"name": "qlora", **settings})
    return config, load_model(config.model, CPU, TECHNIQUES["qlora"].base_load(config.technique, CPU))


def decoder_linears(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for n, m in model.named_modules() if ".layers." in n and n.rsplit(".", 1)[-1].endswith("proj")]


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes that hold a linear layer's weight: the packed data plus the quantization scales."""
    weight = module.weight
    total = weight.numel() * weight.element_size()
    state = getattr(weight, "quant_state", None)
    if state is not None:  # 4-bit: absmax per block (and, nested, the scales of the scales)
        total += state.absmax.numel() * state.absmax.element_size()
        if state.nested:
            total += state.state2.absmax.numel() * state.state2.absmax.element_size() + state.state2.code.numel() * 4
    scales = getattr(weight, "SCB", None)
    if scales is not None:  # 8-bit: one scale per output row
        total += scales.numel() * scales.element_size()
    return total


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_four_bit_layers_are_really_four_bit(tiny_model_dir: Path, quant_type: str) -> None:
    import bitsandbytes as bnb

    _, model = quantized_base(tiny_model_dir, bits=4, quant_type=quant_type, double_quant=True)
    layers = decoder_linears(model)
    assert layers and all(isinstance(m, bnb.nn.Linear4bit) for m in layers)
    for layer in layers:
        assert layer.weight.dtype == torch.uint8 and layer.weight.quant_state.quant_type == quant_type
        assert layer.weight.quant_state.nested  # double quantization
        assert layer.weight.numel() * 2 == layer.in_features * layer.out_features  # two 4-bit values per byte
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)  # the output head stays in full precision


def test_eight_bit_layers_are_really_eight_bit(tiny_model_dir: Path) -> None:
    import bitsandbytes as bnb

    _, model = quantized_base(tiny_model_dir, bits=8)
    layers = decoder_linears(model)
    assert layers and all(isinstance(m, bnb.nn.Linear8bitLt) for m in layers)
    assert all(m.weight.dtype == torch.int8 for m in layers)


@pytest.mark.parametrize("bits, low, high", [(4, 1 / 8, 1 / 4), (8, 1 / 4, 0.3)])
def test_base_weight_memory_is_a_fraction_of_fp32(tiny_model_dir: Path, bits: int, low: float, high: float) -> None:
    """Measured bytes of the quantized linear weights against 4 bytes per weight. 8-bit is 1/4 plus one fp32 scale
    per row (4/in_features bytes per weight: 0.06 on this 64-wide model, 0.007 on SmolLM2)."""
    _, model = quantized_base(tiny_model_dir, bits=bits)
    layers = decoder_linears(model)
    fp32 = sum(m.in_features * m.out_features * 4 for m in layers)
    ratio = sum(weight_bytes(m) for m in layers) / fp32
    assert low <= ratio <= high, ratio


def test_the_quantized_settings_reach_bitsandbytes(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tunelab import precision

    # bfloat16 compute on a CPU is kept only where the CPU has it natively (else float32): say it has, on every host
    monkeypatch.setattr(precision, "detect_cpu_bf16", lambda: precision.CpuBf16(True, "test: native"))
    _, model = quantized_base(tiny_model_dir, bits=4, quant_type="fp4", double_quant=False, compute_dtype="bfloat16",
                              storage_dtype="bfloat16")
    layer = decoder_linears(model)[0]
    assert layer.weight.quant_state.quant_type == "fp4" and not layer.weight.quant_state.nested
    assert layer.compute_dtype == torch.bfloat16 and layer.weight.dtype == torch.bfloat16  # storage container


def test_eight_bit_training_lowers_the_loss(tiny_model_dir: Path) -> None:
    from support.batches import loss, toy_batch
    from transformers import AutoTokenizer

    from tunelab.training.session import make_optimizer

    config, model = quantized_base(tiny_model_dir, bits=8, r=4, dropout=0.0)
    config = build_config({**config.model_dump(mode="json"), "training": {"learning_rate": 1e-2}})
    model = TECHNIQUES["qlora"].apply(model, config.technique)
    trainable, _ = count_parameters(model)
    assert 0 < trainable < 100_000
    batch = toy_batch(AutoTokenizer.from_pretrained(tiny_model_dir))
    optimizer = make_optimizer(model, config)
    start = loss(model, batch)
    from tunelab.objectives import OBJECTIVES

    for _ in range(3):
        result = OBJECTIVES["sft"].loss_sum(model, batch)
        (result.loss_sum / result.num_units).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss(model, batch) < start - 1e-3


def test_settings_that_do_not_fit_a_quantized_base_are_refused() -> None:
    from tunelab.config import ConfigError

    with pytest.raises(ConfigError, match="rewrites the base weights"):
        build_config({"technique": {"name": "qlora", "init": "pissa"}})
    with pytest.raises(ConfigError, match="bits: 4 only"):
        build_config({"technique": {"name": "qlora", "bits": 8, "quant_type": "fp4"}})


def anonymous_resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc/self/status (Linux)")
def test_a_quantized_load_gives_the_heap_it_freed_back(tiny_model_dir, monkeypatch):
    """bitsandbytes' quantization leaves a heap that varies from load to load; the loader trims it once, after a
    quantized load only, and the trim really returns freed heap pages (64 KiB tensors: heap chunks, not mmaps)."""
    import tunelab.models as models

    trims: list[bool] = []
    monkeypatch.setattr(models, "release_freed_heap", lambda: trims.append(True) or True)
    quantized_base(tiny_model_dir)
    assert trims == [True]
    config = tiny_config(tiny_model_dir, technique={"name": "lora"})
    load_model(config.model, CPU, TECHNIQUES["lora"].base_load(config.technique, CPU))
    assert trims == [True]  # an ordinary load is not trimmed
    monkeypatch.undo()
    chunks = [torch.ones(16384) for _ in range(2048)]  # 128 MiB in 64 KiB tensors
    pin = torch.ones(16384)  # keeps the heap's top in use, so free() alone cannot shrink it
    del chunks
    before = anonymous_resident_bytes()
    if not models.release_freed_heap():
        pytest.skip("no glibc malloc_trim here")
    assert before - anonymous_resident_bytes() >= 64 * 2**20
    del pin


def score_head_weights(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if ".score." in f".{n}" and p.requires_grad]


@pytest.mark.parametrize("bits", [4, 8])
def test_a_new_score_head_stays_full_precision_and_trains(tiny_model_dir: Path, bits: int) -> None:
    """A classifier's (or reward model's) new score head is left out of quantization: PEFT copies it to train it
    (modules_to_save), which a 4/8-bit weight refused ('incompatible tensor type'), and it takes a gradient."""
    from tunelab.techniques import RunContext

    config = tiny_config(tiny_model_dir, technique={"name": "qlora", "bits": bits, "r": 4})
    technique = TECHNIQUES["qlora"]
    model = load_model(config.model, CPU, technique.base_load(config.technique, CPU, 3), num_labels=3)
    model = technique.apply(model, config.technique, RunContext(task_type="SEQ_CLS"))
    heads = score_head_weights(model)
    assert heads and all(type(p) is torch.nn.Parameter and p.dtype == torch.float32 for _, p in heads), heads
    model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in heads)



def prepared_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter as loaded and prepared, 4-bit blocks with their scales (test_plan's measure)."""
    from tunelab.plan.memory import unique_parameters

    total = 0
    for tensor in unique_parameters(model):
        total += tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            if state.state2 is not None:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return total


def test_qlora_classification_trains_and_plans_its_head_as_held(tiny_model_dir: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end: a qlora classifier trains, and `tunelab plan`'s weights term is the prepared model's bytes
    exactly, its head counted as the run holds it: the frozen original and PEFT's trainable copy in float32, not
    4-bit blocks. (A bfloat16 base, so that no frozen weight is a view of the float32 checkpoint: every byte is
    in the weights term.)"""
    from support.labeled import classification_config

    from tunelab import precision
    from tunelab.plan import data_shape, plan_memory
    from tunelab.precision import keep_trainable_in_float32
    from tunelab.techniques import RunContext
    from tunelab.training import train

    config = classification_config(tiny_model_dir, tmp_path, technique={"name": "qlora", "r": 4},
                                   training={"max_steps": 2})
    assert train(config, progress=False).status == "completed"
    monkeypatch.setattr(precision, "native_cpu_bf16", lambda: True)
    config = config.model_copy(update={"model": config.model.model_copy(update={"dtype": "bfloat16"})})
    shape = data_shape(config)
    plan = plan_memory(config, "cpu", shape, runtime=0)
    technique = TECHNIQUES["qlora"]
    model = load_model(config.model, CPU, technique.base_load(config.technique, CPU, shape.head_size),
                       num_labels=shape.head_size, dtype=torch.bfloat16)
    model = technique.apply(model, config.technique, RunContext(task_type="SEQ_CLS"))
    keep_trainable_in_float32(model)
    assert len(score_head_weights(model)) == 1
    assert plan.components["weights"] == prepared_bytes(model)
