"""The memory plan's probe against real forwards: attention saves what its kernel saves on the target device (not
what torch's math path saves on meta tensors), and the tensors the forward makes and frees, whose share glibc's heap
keeps under its dynamic mmap threshold (``heap_holes``)."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from support.planning import config_for
from tunelab.models import PACKED_ATTENTION_SWITCH, load_model_config, model_skeleton
from tunelab.plan import Shape, plan_memory
from tunelab.plan import memory
from tunelab.training.attention import kv_heads_shared_in_kernel
from tunelab.techniques import TECHNIQUES, RunContext
from tunelab.plan.memory import HEAP_HOLES_SHARE, MMAP_THRESHOLD_MAX, decoder_layers, heap_holes_bytes, saved_for_backward

CPU = torch.device("cpu")


def real_saved_per_layer(model: torch.nn.Module, length: int, padded: bool = False) -> list[int]:
    """Bytes autograd saves in each decoder layer during a real CPU forward of one row of ``length`` tokens (two rows,
    the second left-padded by 10 tokens, when ``padded``), counted by storage as the probe counts them (parameters
    left out)."""
    parameters = {p.untyped_storage()._cdata for p in model.parameters()}
    layers = decoder_layers(model)
    saved: dict[int, tuple[int, int]] = {}
    where = [-1]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in parameters and storage._cdata not in saved:
            saved[storage._cdata] = (storage.nbytes(), where[0])
        return tensor

    handles = [layer.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__(0, i)) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(lambda m, a, o: where.__setitem__(0, -1)) for layer in layers]
    ids = torch.randint(3, 100, (2 if padded else 1, length))
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[1, :10] = 0
    try:
        with kv_heads_shared_in_kernel(CPU), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    assert logits.grad_fn is not None
    per_layer = [0] * len(layers)
    for size, index in saved.values():
        if index >= 0:
            per_layer[index] += size
    return per_layer


def probe_per_layer(tiny_model_dir, tmp_path, length: int, device_type: str = "cpu",  # noqa: ANN001
                    padded: bool = False) -> list[int]:
    config = config_for(tiny_model_dir, tmp_path, "full")
    skeleton = model_skeleton(load_model_config(config.model))
    shape = Shape(2, length, padded=True) if padded else Shape(1, length)
    return saved_for_backward(skeleton, shape, decoder_layers(skeleton), device_type).layers


def test_the_probe_saves_what_a_cpu_forward_saves(tiny_model_dir, tmp_path):
    """Byte for byte, per layer: the meta forward's attention is torch's CPU flash kernel (query, key and value with
    the key/value heads shared, the output, a float32 logsumexp), as a real CPU training forward runs it."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    for length in (64, 256):
        assert probe_per_layer(tiny_model_dir, tmp_path, length) == real_saved_per_layer(model, length)


def test_padded_rows_save_a_mask_a_layer_as_a_real_forward_does(tiny_model_dir, tmp_path):
    """Rows padded to the longest: SDPA converts the (B, 1, T, T) mask to the compute dtype at every layer and the
    kernel saves it. The probe (whose rows are all real tokens) counts it when the shape says the rows are padded,
    byte for byte as the real forward; unpadded, each layer saves B * T * T * 4 bytes less."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    real = real_saved_per_layer(model, 128, padded=True)
    assert probe_per_layer(tiny_model_dir, tmp_path, 128, padded=True) == real
    skeleton = model_skeleton(load_model_config(config_for(tiny_model_dir, tmp_path, "full").model))
    unpadded = saved_for_backward(skeleton, Shape(2, 128), decoder_layers(skeleton)).layers
    assert [r - u for r, u in zip(real, unpadded)] == [2 * 128 * 128 * 4] * len(real)


def test_packed_rows_save_the_packings_mask_except_on_a_cpu(tiny_model_dir, tmp_path, monkeypatch):
    """Packed rows: a CPU attends per example without a mask (training/attention.py), so its plan saves none; on
    CUDA transformers' SDPA gets the packing's (B, 1, T, T) mask, which each layer's kernel saves (checked on meta
    tensors only: no GPU here). A CPU run with TUNELAB_PACKED_ATTENTION=0 keeps transformers' attention on that
    mask, which its CPU kernel saves in the query's dtype: B * T * T * 4 bytes a layer in float32."""
    skeleton = model_skeleton(load_model_config(config_for(tiny_model_dir, tmp_path, "full").model))
    layers = decoder_layers(skeleton)

    def per_layer(device_type: str, **flags: bool) -> list[int]:
        return saved_for_backward(skeleton, Shape(2, 128, **flags), layers, device_type).layers

    assert per_layer("cpu", packed=True) == per_layer("cpu")
    # the mask at least (the memory-efficient kernel a mask needs keeps more than the flash kernel besides)
    assert all(p - u >= 2 * 128 * 128 * 4 for p, u in zip(per_layer("cuda", packed=True), per_layer("cuda")))
    monkeypatch.setenv(PACKED_ATTENTION_SWITCH, "0")
    assert [p - u for p, u in zip(per_layer("cpu", packed=True), per_layer("cpu"))] == [2 * 128 * 128 * 4] * len(layers)


def test_the_shape_says_whether_rows_are_padded_or_packed(tiny_model_dir, tmp_path):
    """Unpacked rows of different lengths are padded; packed ones are not (their mask is the packing's)."""
    from support.tiny import toy_chat_records, write_jsonl
    from tunelab.plan import data_shape

    data = write_jsonl(tmp_path / "train.jsonl", toy_chat_records(8))
    for packing in (False, True):
        config = config_for(tiny_model_dir, tmp_path, "full").model_copy(deep=True)
        config = config.model_copy(update={"data": config.data.model_copy(update={"train": [str(data)], "packing": packing})})
        shape = data_shape(config)
        assert (shape.padded, shape.packed) == (not packing, packing)


def test_without_the_kernels_the_probe_counts_the_math_paths_attention_weights(tiny_model_dir, tmp_path, monkeypatch):
    """The negative control: torch's SDPA on meta tensors takes its math path, which saves (B, H, T, T) float32
    attention weights; the real forward does not."""
    monkeypatch.setattr(memory, "_attention_as_on", lambda *args: nullcontext())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    math_path = probe_per_layer(tiny_model_dir, tmp_path, 256)
    real = real_saved_per_layer(model, 256)
    heads = model.config.num_attention_heads
    assert all(m - r >= heads * 256 * 256 * 4 for m, r in zip(math_path, real))


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_the_probes_attention_grows_linearly_with_length(tiny_model_dir, tmp_path, device_type):
    """The fused kernels (a CPU's flash kernel; CUDA's flash kernel without a mask) save O(T) per layer: doubling
    the length doubles every layer's saves, where the math path's (T, T) weights would quadruple their share."""
    short = probe_per_layer(tiny_model_dir, tmp_path, 128, device_type)
    long = probe_per_layer(tiny_model_dir, tmp_path, 256, device_type)
    assert all(2 * s - 64 <= l <= 2 * s + 64 for s, l in zip(short, long))  # within CUDA's seed and offset


def test_the_probe_records_the_tensors_the_forward_frees():
    """Outputs that alias no input are counted once each; those still alive when the forward ends (saved by autograd
    or returned) are not freed. y = 2x and z = y + 1 are freed (exp saves its result, not its input); views are not
    allocations."""
    x = torch.empty(4, 4, device="meta", requires_grad=True)
    allocations = memory._Allocations()
    with allocations:
        y = x * 2
        z = (y + 1).view(16)
        del y
        w = z.exp()
        del z
    assert allocations.freed() == [4 * 4 * 4, 4 * 4 * 4]
    assert [size for size, _ in allocations.made] == [64, 64, 64]
    assert w.grad_fn is not None


def test_the_heaps_holes_count_under_the_dynamic_threshold_only(tiny_model_dir, tmp_path, monkeypatch):
    """Under glibc's dynamic threshold the plan's top of backward holds ``HEAP_HOLES_SHARE`` of the forward's freed
    tensors besides what is alive; under the heap policy's fixed 1 MiB threshold, none (measured: 0.01)."""
    from tunelab.plan import planner

    config = config_for(tiny_model_dir, tmp_path, "lora")
    shape = Shape(4, 128)
    skeleton = model_skeleton(load_model_config(config.model))
    saved = saved_for_backward(skeleton, shape, decoder_layers(skeleton))
    assert saved.transients and heap_holes_bytes(saved, 2**20) == 0
    assert heap_holes_bytes(saved, None) == int(HEAP_HOLES_SHARE * sum(s for s in saved.transients if s < MMAP_THRESHOLD_MAX))
    dynamic = plan_memory(config, "cpu", shape, runtime=0)
    monkeypatch.setattr(planner, "heap_mmap_threshold", lambda *args: 2**20)
    fixed = plan_memory(config, "cpu", shape, runtime=0)
    holes = dynamic.components["heap_holes"]
    assert holes > 0 and fixed.components["heap_holes"] == 0
    assert dynamic.phases["loss"] - fixed.phases["loss"] == holes + dynamic.components["freed_gradients_kept"]
    assert plan_memory(config, "cuda", shape, runtime=0).components["heap_holes"] == 0  # CUDA's allocator caches


def test_freed_gradients_smaller_than_the_activations_stay_free_at_the_next_forward(tiny_model_dir, tmp_path,
                                                                                    monkeypatch):
    """Full fine-tuning frees every float32 gradient before the forward; those in chunks smaller than the largest
    saved tensor count beside the activations at the top of backward (``freed_gradients_kept``), under glibc's
    dynamic threshold only, and not at the end of backward (the new gradients reuse them)."""
    from tunelab.plan import planner
    from tunelab.plan.memory import gradients_not_reused_bytes, unique_parameters

    config = config_for(tiny_model_dir, tmp_path, "full")
    shape = Shape(1, 48)  # the largest saved tensor (1, 48, 128) float32: 24 KiB, between the layers' weights' sizes
    skeleton = model_skeleton(load_model_config(config.model))
    saved = saved_for_backward(skeleton, shape, decoder_layers(skeleton))
    largest = max(size for size, _ in saved.chunks)
    expected = sum(4 * p.numel() for p in unique_parameters(skeleton) if p.requires_grad and 4 * p.numel() < largest)
    assert 0 < expected < sum(4 * p.numel() for p in unique_parameters(skeleton))  # the embedding's is larger
    assert gradients_not_reused_bytes(skeleton, saved, None) == expected
    assert gradients_not_reused_bytes(skeleton, saved, 2**20) == 0
    dynamic = plan_memory(config, "cpu", shape, runtime=0)
    assert dynamic.components["freed_gradients_kept"] == expected
    monkeypatch.setattr(planner, "gradients_not_reused_bytes", lambda *args: 0)
    without = plan_memory(config, "cpu", shape, runtime=0)
    assert dynamic.phases["loss"] - without.phases["loss"] == expected
    assert dynamic.phases["backward"] == without.phases["backward"]


def saved_by_dropout(x: torch.Tensor, device_type: str) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    """What autograd saves for one training dropout of ``x`` (p = 0.1) while the probe's dropout stands in."""
    saved: list[tuple[torch.dtype, tuple[int, ...]]] = []
    with memory._dropout_as_on(device_type), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append((t.dtype, tuple(t.shape))) or t, lambda t: t):
        torch.nn.functional.dropout(x, 0.1, training=True)
    return saved


def test_the_probes_dropout_saves_what_the_devices_kernel_saves():
    """On CUDA torch runs the fused ``native_dropout``, whose backward keeps a one-byte bool mask; on meta tensors
    (and on a CPU) it multiplies by a noise tensor of x's dtype and keeps that. The probe's CPU dropout is a real CPU
    forward's; off the CPU it is the bool mask."""
    meta = torch.empty(2, 8, 16, dtype=torch.bfloat16, device="meta", requires_grad=True)
    real = torch.randn(2, 8, 16, dtype=torch.bfloat16, requires_grad=True)
    assert saved_by_dropout(meta, "cpu") == saved_by_dropout(real, "cpu") == [(torch.bfloat16, (2, 8, 16))]
    assert saved_by_dropout(meta, "cuda") == [(torch.bool, (2, 8, 16))]


def test_a_cuda_plan_counts_a_byte_an_element_of_loras_dropout(tiny_model_dir, tmp_path, monkeypatch):
    """LoRA's input dropout in a float32 CUDA plan: each adapted layer's mask is one byte an element of its input
    (B, T, in_features), 3 bytes an element less than meta's float32 noise (the negative control). The first
    layer's q, k and v take the frozen embeddings through a frozen norm: that input needs no gradient, so their
    dropout saves nothing either way."""
    config = config_for(tiny_model_dir, tmp_path, {"name": "lora", "dropout": 0.1})
    shape = Shape(micro_batch_size=2, length=32)
    fused = plan_memory(config, "cuda", shape, runtime=0).components["activations"]
    monkeypatch.setattr(memory, "_dropout_as_on", lambda device_type: nullcontext())
    noise = plan_memory(config, "cuda", shape, runtime=0).components["activations"]
    skeleton = model_skeleton(load_model_config(config.model))
    adapted = TECHNIQUES["lora"].apply(skeleton, config.technique, RunContext(task_type="CAUSAL_LM"))
    first = decoder_layers(adapted)[0].self_attn
    inputs = sum(m.in_features for m in adapted.modules() if isinstance(m, LoraLayer)
                 and m not in (first.q_proj, first.k_proj, first.v_proj))
    assert inputs > 0
    assert noise - fused == 3 * 2 * 32 * inputs
