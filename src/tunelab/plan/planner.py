"""``plan_memory``: a config's peak memory (see ``tunelab.plan.memory`` for the terms), and the data shape it is
planned at: the longest micro-batch the run will train on, from the data's real lengths."""

from __future__ import annotations

from typing import Any

import torch

from tunelab.config import TunelabConfig, build_config
from tunelab.data import PreparedData, prepare_data
from tunelab.models import cache_root, load_model_config, load_tokenizer, model_skeleton
from tunelab.objectives import OBJECTIVES
from tunelab.plan.memory import (MemoryPlan, Shape, activation_bytes, decoder_layers, parameter_bytes,
                                 saved_for_backward)
from tunelab.plan.runtime import runtime_bytes
from tunelab.precision import training_precision
from tunelab.techniques import TECHNIQUES, RunContext

ADAM_MOMENTS = 2  # AdamW keeps exp_avg and exp_avg_sq, float32, per trainable weight


def data_shape(config: TunelabConfig) -> Shape:
    """The longest micro-batch: packed rows are max_length long; otherwise the longest example (rows of a batch
    are padded to its longest). Tokenizes the data (cached), reads no weight."""
    return shape_of(config, prepare_data(config.data, load_tokenizer(config.model), cache_root() / "data"))


def shape_of(config: TunelabConfig, data: PreparedData) -> Shape:
    """``data_shape`` of data already prepared (``tunelab train`` has it)."""
    lengths = [len(e.input_ids) for e in data.train]
    longest = config.data.max_length if config.data.packing else max(lengths)
    share = data.report["train"].get("supervised_share", 1.0) or 1.0
    return Shape(config.training.micro_batch_size, longest, share)


def plan_memory(config: TunelabConfig, device: str = "cpu", shape: Shape | None = None,
                runtime: int | None = None) -> MemoryPlan:
    """Predict the peak memory of training ``config`` on ``device`` (CPU: the process's peak RSS; CUDA:
    max_memory_allocated plus the context), without loading weights. ``runtime``: the runtime term when the caller
    knows it (a training process before it loads the model: its own resident memory), else measured once."""
    target = torch.device(device)
    shape = shape or data_shape(config)
    technique = TECHNIQUES[config.technique.name]
    objective = OBJECTIVES[config.objective.name]
    base_load = technique.base_load(config.technique, target)
    # the dtype the run really trains in: as training.context.run_precision asks tunelab.precision (auto is
    # bfloat16 on a CPU with native bfloat16, unless the technique loads its own base or declares why not)
    fixed = base_load.quantization_config is not None or base_load.dtype is not None
    why_float32 = technique.cpu_bf16_refusal or ((base_load.note or "quantized") if fixed else None)
    precision = training_precision(config.model.dtype, target, why_float32)
    model_config = load_model_config(config.model)
    skeleton = model_skeleton(model_config, base_load, dtype=precision.load_dtype, num_labels=objective.num_labels)
    skeleton = technique.apply(skeleton, config.technique, RunContext(task_type=objective.task_type))
    double_quant = bool(getattr(base_load.quantization_config, "bnb_4bit_use_double_quant", False))
    weights, trainable_bytes, trainable, total = parameter_bytes(skeleton, double_quant)
    largest_trainable = max((4 * p.numel() for p in skeleton.parameters() if p.requires_grad), default=0)
    # the virtual tokens a prompt-learning technique prepends lengthen every row: the forward sees them
    saved = saved_for_backward(skeleton, shape, decoder_layers(skeleton))
    activations = activation_bytes(saved, config.training.gradient_checkpointing)
    components = {
        "weights": weights,
        "gradients": trainable_bytes,
        "optimizer_state": ADAM_MOMENTS * trainable_bytes,
        "optimizer_step_temporaries": largest_trainable,  # AdamW on a CPU updates one tensor at a time
        "activations": activations,
        "logits_and_loss": saved.logits,
    }
    components.update(_reference(config, objective, weights, trainable_bytes))
    # On a CPU, memory freed during backward stays in the process's heap (glibc keeps its arenas), so the second
    # step's backward holds weights, moments, gradients, activations and logits at once: their sum is the peak.
    static = weights + components["optimizer_state"] + components.get("reference_model", 0)
    phases = {
        "backward": static + trainable_bytes + activations + saved.logits,
        "optimizer step": static + trainable_bytes + components["optimizer_step_temporaries"],
    }
    notes = []
    if target.type == "cpu":
        components["runtime"] = runtime if runtime is not None else runtime_bytes(
            cache_root() / "plan", config.model, lambda micro: plan_memory(build_config(micro), "cpu", runtime=0).peak_bytes)
    else:
        components["runtime"] = runtime if runtime is not None else cuda_context_bytes()
        notes.append("CUDA: the peak is max_memory_allocated plus the CUDA context (runtime)")
    phase = max(phases, key=phases.__getitem__)
    if precision.note:
        notes.append(precision.note)
    return MemoryPlan(device=target.type, peak_bytes=components["runtime"] + phases[phase], components=components,
                      phase=phase, shape=shape, dtype=str(precision.load_dtype).removeprefix("torch."),
                      notes=notes, trainable_parameters=trainable, total_parameters=total)


def _reference(config: TunelabConfig, objective: Any, weights: int, trainable_bytes: int) -> dict[str, int]:
    """A frozen copy of the model as the reference (an objective that needs one, with a technique that has no
    disabled view: full fine-tuning) costs the frozen weights once more."""
    needs = objective.wants_reference(config.objective)
    if needs and TECHNIQUES[config.technique.name].disabled_view is None and \
            getattr(config.objective, "reference", "live") != "precomputed":
        return {"reference_model": weights}
    return {}


def cuda_context_bytes() -> int:
    """The CUDA context's device memory: what the driver reports used after torch initialises CUDA, minus
    before (0 when no GPU is visible here)."""
    if not torch.cuda.is_available():
        return 0
    free_before, total = torch.cuda.mem_get_info()
    torch.zeros(1, device="cuda")
    free_after, _ = torch.cuda.mem_get_info()
    return max(0, free_before - free_after)
