"""``plan_memory``: a config's peak memory (see ``tunelab.plan.memory`` for the terms), and the data shape it is
planned at: the longest micro-batch the run will train on, from the data's real lengths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tunelab.config import ConfigError, TunelabConfig, build_config, read_run_config
from tunelab.data import PreparedData
from tunelab.models import (ModelConfig, cache_root, load_model_config, load_tokenizer, model_skeleton, resolve_dtype,
                            resolve_model_path)
from tunelab.dropout import use_cpu_dropout
from tunelab.norms import use_cpu_rms_norm
from tunelab.objectives import OBJECTIVES, check_records, check_rewards, prepare_objective_data
from tunelab.objectives.base import attach_own_module
from tunelab.plan.memory import (BOUNDED_ONEDNN_CACHE, MMAP_THRESHOLD_MAX, NO_TCACHE, ONEDNN_CACHE_VARIABLES, MemoryPlan,
                                 Shape, activation_bytes, activations_returned_bytes, aligned_blocks_kept,
                                 autocast_copy_bytes, decoder_layers, heap_mmap_threshold, loaded_bytes, loss_bytes,
                                 mapped_views_bytes, master_cast_leftover_bytes, onednn_cache_capacity, phase_sums,
                                 gradients_not_reused_bytes, heap_holes_bytes, parameter_bytes, rollout_cache_bytes,
                                 sampling_bytes, saved_for_backward, tunables_without_tcache)
from tunelab.plan.runtime import runtime_bytes
from tunelab.precision import adapters_compute_in_autocast_dtype, technique_precision
from tunelab.techniques import TECHNIQUES, RunContext, virtual_tokens

ADAM_MOMENTS = 2  # AdamW keeps exp_avg and exp_avg_sq, float32, per trainable weight
# the terms held from the first step to the last, in every training phase
STATIC_TERMS = ("weights", "optimizer_state", "reference_model", "checkpoint_mapped", "master_cast_leftovers",
                "scoring_models")


def data_shape(config: TunelabConfig) -> Shape:
    """The longest micro-batch: packed rows are max_length long; otherwise the longest example (rows of a batch
    are padded to its longest). Tokenizes the data (cached) as the run will read it, and refuses, as the run
    does, data of another kind than its objective's records and rewards it could not compute; reads no weight."""
    data = prepare_objective_data(config.objective, config.data, load_tokenizer(config.model), cache_root() / "data")
    check_records(config.objective, data, config.data.train)
    check_rewards(config.objective, data)  # training's own check: a missing column, a user's reward that won't import
    return shape_of(config, data)


def shape_of(config: TunelabConfig, data: PreparedData) -> Shape:
    """``data_shape`` of data already prepared (``tunelab train`` has it). Each record becomes the rows its
    objective declares (``Objective.batch_rows``: a preference pair's two sides), padded to the longest row."""
    objective = OBJECTIVES[config.objective.name]
    rows = [objective.rows_of(record, config.objective) for record in data.train]
    longest = config.data.max_length if config.data.packing else max(max(lengths) for lengths in rows)
    per_record = max(len(r) for r in rows)
    share = data.report["train"].get("supervised_share", 1.0) or 1.0
    targets = [objective.targets_of(record, config.objective) for record in data.train]
    if targets and targets[0] is not None:  # the objective makes its targets (completions): N = records x targets
        share = min(1.0, max(t or 0 for t in targets) / (per_record * longest))
    lengths = [length for lengths in rows for length in lengths]
    padded = not config.data.packing and min(lengths) < max(lengths)  # equal rows: transformers drops the mask
    return Shape(config.training.micro_batch_size, longest, share, rows_per_record=per_record,
                 head_size=objective.head_size(data.classes), padded=padded, packed=config.data.packing)


def plan_memory(config: TunelabConfig, device: str = "cpu", shape: Shape | None = None,
                runtime: int | None = None, processes: int = 1, tunables: str | None = None) -> MemoryPlan:
    """Predict the peak memory of training ``config`` on ``device`` (CPU: the process's peak RSS; CUDA:
    max_memory_allocated plus the context), without loading weights. ``runtime``: the runtime term when the caller
    knows it (a training process before it loads the model: its own resident memory), else measured once.
    ``processes``: how many train together (torchrun); the plan is one process's, which with
    ``training.distributed: fsdp`` holds a share of the model (``sharded_terms``), and with DDP all of it.
    ``tunables``: the GLIBC_TUNABLES the run trains under (a training process: its own); None: those `tunelab
    train` starts it with (``tcache_off_reason``)."""
    target = torch.device(device)
    shape = shape or data_shape(config)
    technique = TECHNIQUES[config.technique.name]
    objective = OBJECTIVES[config.objective.name]
    # the head the run builds: a classifier's is as wide as the data's classes (Objective.head_size)
    num_labels = shape.head_size if shape.head_size is not None else objective.num_labels
    base_load = technique.base_load(config.technique, target, num_labels)  # loaded as training loads it, head included
    precision = technique_precision(config.model.dtype, target, base_load, technique.cpu_bf16_refusal)
    model_config = load_model_config(config.model)
    checkpoint_dtype = _checkpoint_dtype(model_config)  # before the skeleton: building it sets the config's dtype
    skeleton = model_skeleton(model_config, base_load, dtype=precision.load_dtype, num_labels=num_labels)
    double_quant = bool(getattr(base_load.quantization_config, "bnb_4bit_use_double_quant", False))
    loaded = loaded_bytes(skeleton, double_quant)  # before the technique: what from_pretrained materialises
    skeleton = technique.apply(skeleton, config.technique, RunContext(task_type=objective.task_type))
    # a module the objective trains beside the model (PPO's value head): its weights, gradients and moments
    attach_own_module(objective.own_module, skeleton, config.objective)
    if target.type == "cpu":  # as training on a CPU does: norms that save x in its dtype (not a float32 copy),
        use_cpu_rms_norm(skeleton)  # and a dropout that saves the positions it drops (not a one-byte mask)
        use_cpu_dropout(skeleton)
    weights, trainable_bytes, trainable, total = parameter_bytes(skeleton, double_quant)
    largest_trainable = max((4 * p.numel() for p in skeleton.parameters() if p.requires_grad), default=0)
    autocast = autocast_copy_bytes(skeleton) if precision.mixed_precision != "no" else 0
    if precision.mixed_precision != "no":
        _as_under_autocast(skeleton, precision.load_dtype)
    # the virtual tokens a prompt-learning technique prepends lengthen every row: the forward sees them
    saved = saved_for_backward(skeleton, shape, decoder_layers(skeleton), target.type)
    checkpointing = config.training.gradient_checkpointing
    activations = activation_bytes(saved, checkpointing)
    # the heap policy: glibc's mmap threshold, fixed (1 MiB: freed chunks from that size on go back to the system)
    # or dynamic (risen to 32 MiB: smaller freed chunks stay in the heap)
    fixed = heap_mmap_threshold(target.type, checkpointing, base_load.quantization_config is not None,
                                config.training.return_freed_memory)
    threshold = fixed or MMAP_THRESHOLD_MAX
    returned = activations_returned_bytes(saved, checkpointing, fixed) if fixed else 0
    # on a CPU the forward's freed tensors leave free chunks in the heap, resident when backward starts
    holes = heap_holes_bytes(saved, fixed) if target.type == "cpu" else 0
    # and the previous step's gradients, freed before the forward, stay free where its activations are larger
    unreused = gradients_not_reused_bytes(skeleton, saved, fixed) if target.type == "cpu" else 0
    # what the loss holds at once is the objective's own declaration (SFT's loss runs the head in chunks)
    loss, loss_returned = loss_bytes(objective.loss_memory(saved.head), threshold)
    checkpoint = checkpoint_file_bytes(config.model, total * checkpoint_dtype.itemsize)
    components = {
        "weights": weights,
        "gradients": trainable_bytes,
        "optimizer_state": ADAM_MOMENTS * trainable_bytes,
        # AdamW on a CPU updates one tensor at a time, making two temporaries of its size (sqrt(v) and its quotient)
        "optimizer_step_temporaries": 2 * largest_trainable,
        "activations": activations,
        "logits_and_loss": loss,
        "autocast_copies": autocast,
        "master_cast_leftovers": master_cast_leftover_bytes(skeleton, precision.load_dtype, threshold),
        "heap_holes": holes,
        "freed_gradients_kept": unreused,
    }
    views = mapped_views_bytes(skeleton, checkpoint_dtype) if precision.load_dtype == checkpoint_dtype else 0
    if target.type == "cpu" and base_load.quantization_config is not None and views:
        # a quantized load (a device map) reads every weight through the memory-mapped checkpoint and keeps the
        # frozen weights it does not convert as views of it: the whole file stays mapped, resident, for the run.
        # Host memory: on a GPU those weights are copied to the device (the weights term) and the file's pages are
        # not the GPU's (a CUDA plan of QLoRA on SmolLM2 counted the 0.5 GiB file in the GPU's peak)
        components["checkpoint_mapped"] = checkpoint
        components["weights"] -= views
    components.update(_reference(config, objective, components["weights"], trainable_bytes))
    scorers = [scoring_model_bytes(run, target) for run in objective.scoring_runs(config.objective)]
    if scorers:  # reward model runs, loaded after the policy and kept for the whole run
        components["scoring_models"] = sum(weights for weights, _ in scorers)
    sharded = config.training.distributed == "fsdp" and processes > 1
    if sharded:
        sharded_terms(components, skeleton, processes)
    # On a CPU, memory freed during backward stays in the process's heap (glibc keeps its arenas), so the second
    # step's backward holds weights, moments, gradients, activations and logits at once: their sum is the peak.
    # Each phase is kept as its terms, not only their sum, so that `tunelab plan` can show what makes the peak.
    static = {term: components[term] for term in STATIC_TERMS if term in components}
    gathered = {"fsdp_gathered": components["fsdp_gathered"]} if sharded else {}  # the units gathered in passes
    accumulated = components["gradients"] if config.training.grad_accum > 1 else 0
    autocast_copies = components["autocast_copies"]
    phase_terms = {
        # from_pretrained reads the memory-mapped checkpoint (its pages resident) into the weights it builds
        # (sharded: the main process only; the others receive their shards)
        "load": {"checkpoint_file": checkpoint, "loaded_weights": loaded},
        # the top of backward: the loss's (N, V) tensors, beside the gradients the window's earlier micro-batches
        # accumulated (none with one micro-batch a step: no weight's gradient exists yet)
        "loss": {**static, "activations": activations, "heap_holes": holes, "freed_gradients_kept": unreused,
                 "logits_and_loss": loss, "autocast_copies": autocast_copies, **gathered, "gradients": accumulated},
        # the end of backward: every gradient, the activations (freed into the heap, less those that went back
        # to the system under the heap policy) and the logits tensors small enough to stay in the heap
        "backward": {**static, "gradients": components["gradients"], "activations": activations,
                     "activations_returned": -returned, "heap_holes": holes,
                     "logits_and_loss": loss, "logits_returned": -loss_returned,
                     "autocast_copies": autocast_copies, **gathered},
        "optimizer step": {**static, "gradients": components["gradients"],
                           "optimizer_step_temporaries": components["optimizer_step_temporaries"]},
    }
    if scorers:
        # each scoring model is read (its checkpoint's pages resident) beside the policy's loaded weights and the
        # scoring models read before it; the optimizer state does not exist yet
        phase_terms["scoring model load"] = {"loaded_weights": loaded, "scoring_models_read": max(
            sum(weights for weights, _ in scorers[:i]) + reading for i, (_, reading) in enumerate(scorers))}
    if objective.prepare is not None:  # an online objective samples its batch, then trains on it
        components["rollout"] = rollout_bytes(skeleton, shape, saved, objective.rollout_memory_of(saved.head, config.objective))
        # the rollout runs before the step's loss, gradients freed (set to None), under autocast (its weight copies)
        phase_terms["generation"] = {**static, "autocast_copies": autocast_copies, "rollout": components["rollout"]}
    # a phase of its own (the model is not trained yet): not part of the sum
    components["loading"] = sum(phase_terms["load"].values())
    notes = []
    if target.type == "cpu":
        components["runtime"] = runtime if runtime is not None else runtime_bytes(
            cache_root() / "plan", config.model, lambda micro: plan_memory(build_config(micro), "cpu", runtime=0).peak_bytes)
    else:
        components["runtime"] = runtime if runtime is not None else cuda_context_bytes()
        notes.append("CUDA: the peak is max_memory_allocated plus the CUDA context (runtime)")
        if runtime is None and not torch.cuda.is_available():  # planned here for a GPU elsewhere: said, not hidden
            notes.append("no GPU is visible here, so the CUDA context is not measured and the runtime term is 0: the "
                         "peak leaves it out; plan on the GPU's machine to count it")
        phase_terms["load"] = {"loaded_weights": loaded}  # the checkpoint's pages are host memory, not the GPU's
    # a term a phase does not hold (0) is left out of it
    phase_terms = {name: {t: v for t, v in terms.items() if v} for name, terms in phase_terms.items()}
    phases = phase_sums(phase_terms)
    phase = max(phases, key=phases.__getitem__)
    if precision.note:
        notes.append(precision.note)
    if fixed:
        notes.append(f"heap policy: glibc's mmap threshold fixed at {fixed // 2**20} MiB (training.return_freed_memory, "
                     "by default on with checkpointing or a quantized load on a CPU): freed chunks from that size on go "
                     "back to the system, at a price in kernel time")
    notes.extend(tcache_notes(config, target.type, tunables))
    onednn_reason = onednn_cache_bound(config, target.type)
    if onednn_reason:
        notes.append(onednn_note(onednn_cache_capacity(), onednn_reason))
    if sharded:
        notes.append(f"fsdp over {processes} processes: each holds 1/{processes} of the weights, gradients and "
                     "optimizer state plus the units it gathers (fsdp_gathered); the main process alone loads the "
                     "whole base (the load phase). Not yet checked against a measured GPU run")
    return MemoryPlan(device=target.type, peak_bytes=components["runtime"] + phases[phase], components=components,
                      phase=phase, shape=shape, dtype=str(precision.load_dtype).removeprefix("torch."),
                      notes=notes, trainable_parameters=trainable, total_parameters=total,
                      heap_mmap_threshold=fixed, phase_terms=phase_terms, context_length=context_length(model_config),
                      virtual_tokens=virtual_tokens(skeleton))


def context_length(model_config: Any) -> int | None:
    """The longest row the model takes: its config's max_position_embeddings, None where it does not say one."""
    length = getattr(model_config, "max_position_embeddings", None)
    return length if isinstance(length, int) and length > 0 else None


def rollout_bytes(skeleton: torch.nn.Module, shape: Shape, saved: Any, scoring: tuple[int, ...]) -> int:
    """What an online objective's rollout of one micro-batch holds at once beyond the weights: one decoder layer's
    activations (a bound on what the prefill, without gradients, holds at once: the layer's saves for backward at the
    full rollout shape), and the larger of the sampling (the KV cache at the full rollout length, with one decoding
    step's (rows, V) logits and sampling tensors) and the objective's scoring passes (``Objective.rollout_memory``)."""
    layer = max(saved.layers, default=0)
    sampling = rollout_cache_bytes(skeleton, shape) + sampling_bytes(saved.head, shape.rows)
    return layer + max(sampling, sum(scoring))


def tcache_needed(config: TunelabConfig, device_type: str) -> str | None:
    """Why ``config`` is a run glibc's per-thread cache hurts (before 2.39: ``aligned_blocks_kept``): every training
    run on a CPU (None on a GPU, whose memory glibc does not manage). A quantized base's dequantized transients, an online
    objective's micro-batches of changing lengths, and an ordinary run's step after step: its loss rows and packed
    examples change shape, and the blocks freed by one step do not serve the next one's. The quickstart (LoRA, 40
    steps) grew from 2067 to 2461 MiB over 20 steps with the cache on, from 1898 to 1997 with it off and oneDNN's
    cache bounded (``onednn_cache_bound``), at no measured cost in time (docs/choosing.md, the heap policy)."""
    return _cpu_run_reason(config, device_type, quantized_base=True)


def onednn_cache_bound(config: TunelabConfig, device_type: str) -> str | None:
    """Why ``config`` trains with oneDNN's primitive cache bounded (``BOUNDED_ONEDNN_CACHE``), None where it keeps
    oneDNN's default: every training run on a CPU. An online objective's micro-batches change length at every step,
    and an ordinary run's loss rows (the supervised positions of a micro-batch) do too: each new shape is a
    primitive oneDNN's default keeps (1024 of them), and its memory grew by about 4 MiB a step on the quickstart
    (2 with the bound)."""
    return _cpu_run_reason(config, device_type, quantized_base=False)


def _cpu_run_reason(config: TunelabConfig, device_type: str, quantized_base: bool) -> str | None:
    """The reason both caches are bounded (``tcache_needed``, ``onednn_cache_bound``), in one place so that their
    words stay the same (the restart records it, the plan's notes and run_info.json quote it): None on a GPU; else
    the kind of CPU run: a quantized base first where it is a reason of its own (``quantized_base``: glibc's cache,
    for its dequantized transients), then an online objective, then any training."""
    if device_type != "cpu":
        return None
    if quantized_base and \
            TECHNIQUES[config.technique.name].base_load(config.technique, torch.device(device_type)).quantization_config:
        return "a quantized base on a CPU"
    if OBJECTIVES[config.objective.name].prepare is not None:
        return "an online objective on a CPU"
    return "training on a CPU"


def onednn_note(capacity: int | None, reason: str, by_tunelab: bool = True) -> str:
    """The plan's word on oneDNN's primitive cache for a run that needs it bounded (``onednn_cache_bound``):
    that `tunelab train` bounds it (``by_tunelab``: the environment leaves it to tunelab), that the environment's
    capacity is within the plan's bound, or that the cache is larger than the plan assumes."""
    if capacity is None and by_tunelab:
        return (f"tunelab train bounds oneDNN's primitive cache to {BOUNDED_ONEDNN_CACHE} primitives "
                f"({ONEDNN_CACHE_VARIABLES[0]}; {reason}: each new shape adds primitives), as this plan "
                "assumes; with oneDNN's default (1024) the peak measured up to 7% above it (docs/choosing.md)")
    if capacity is not None and capacity <= BOUNDED_ONEDNN_CACHE:
        return f"oneDNN's primitive cache: {capacity} primitives, as the environment sets, within this plan's bound"
    return (f"oneDNN's primitive cache keeps {capacity or 'its default 1024'} primitives in this process; this plan "
            f"assumes at most {BOUNDED_ONEDNN_CACHE} ({reason}), and with 1024 the peak measured up to 7% above "
            f"it: `tunelab train` bounds it, or set {ONEDNN_CACHE_VARIABLES[0]} before the process starts")


def tcache_off_reason(config: TunelabConfig, device_type: str) -> str | None:
    """Why ``config`` trains with glibc's per-thread cache off (`tunelab train` restarts itself with it where the C
    library keeps aligned blocks: ``tunables_without_tcache``), None where it keeps the cache:
    ``training.glibc_tcache_off`` (true: every CPU run, false: none), by default ``tcache_needed``."""
    requested = config.training.glibc_tcache_off
    if device_type != "cpu" or requested is False:
        return None
    return "training.glibc_tcache_off: true" if requested else tcache_needed(config, device_type)


def tcache_notes(config: TunelabConfig, device_type: str, tunables: str | None = None) -> list[str]:
    """The plan's word on glibc's per-thread cache: that `tunelab train` turns it off for this run, or, where the
    run keeps it and is one that needs it off (``tcache_needed``), that the peak has measured above the plan.
    ``tunables``: the run's GLIBC_TUNABLES; None: this process's, plus what `tunelab train` would add."""
    reason = tcache_off_reason(config, device_type)
    restarts_with = tunables_without_tcache() if tunables is None and reason else None
    if restarts_with:
        return [f"tunelab train restarts with GLIBC_TUNABLES={restarts_with} for this run ({reason}; "
                f"{aligned_blocks_kept()} keeps freed aligned blocks in its heap with the cache on: glibc bug 30723), "
                "as this plan assumes; training.glibc_tcache_off: false refuses it, and the peak has then measured "
                "up to 13% above this plan (docs/choosing.md)"]
    kept_by, needs = aligned_blocks_kept(tunables=tunables), tcache_needed(config, device_type)
    if kept_by and needs:
        return [f"{kept_by} keeps freed aligned blocks in its heap (glibc bug 30723, changed in 2.38-2.39) and this "
                f"run keeps glibc's per-thread cache on ({needs}): the peak has measured up to 13% above this plan; "
                f"`tunelab train` turns it off (GLIBC_TUNABLES={NO_TCACHE}) unless training.glibc_tcache_off is "
                "false or GLIBC_TUNABLES sets tcache_count (docs/choosing.md, the heap policy)"]
    return []


def scoring_model_bytes(run: str, target: torch.device) -> tuple[int, int]:
    """(weights, bytes while reading it) of a finished run loaded for inference as ``tunelab.load_run`` loads it
    (a reward model run): its base as its technique loads it, in its ``model.dtype`` for inference on ``target``,
    with its trained head and its technique's weights; reading adds its checkpoint file's mapped pages. Its
    scoring forward (no gradients, a few rows) holds one decoder layer's transients at a time: under the rollout's
    own per-layer bound when it is no wider than the policy, so not added."""
    if not (Path(run) / "config.yaml").is_file():  # as training refuses it (rewards.reward_model), before any work
        raise ConfigError(f"reward run {run}: not a tunelab run folder (no config.yaml); train the reward model first")
    run_config = build_config(read_run_config(Path(run)))
    technique = TECHNIQUES[run_config.technique.name]
    objective = OBJECTIVES[run_config.objective.name]
    if objective.num_labels != 1:
        raise ConfigError(f"reward run {run}: not a reward model (a run trained with a one-score head)")
    base_load = technique.base_load(run_config.technique, target, objective.num_labels)
    model_config = load_model_config(run_config.model)
    checkpoint_dtype = _checkpoint_dtype(model_config)  # before the skeleton: building it sets the config's dtype
    skeleton = model_skeleton(model_config, base_load, dtype=base_load.dtype or resolve_dtype(run_config.model.dtype, target),
                              num_labels=objective.num_labels)
    double_quant = bool(getattr(base_load.quantization_config, "bnb_4bit_use_double_quant", False))
    checkpoint = checkpoint_file_bytes(run_config.model, parameter_bytes(skeleton, double_quant)[3] * checkpoint_dtype.itemsize)
    skeleton = technique.apply(skeleton, run_config.technique, RunContext(task_type=objective.task_type))
    weights = loaded_bytes(skeleton, double_quant)  # frozen for inference: every weight in the dtype it loads in
    return weights, weights + checkpoint


def heap_policy(config: TunelabConfig, device: torch.device) -> int | None:
    """The fixed mmap threshold ``config`` trains under on ``device`` (the heap policy: ``heap_mmap_threshold``),
    None where glibc's dynamic one is left alone. Training applies what the plan assumed."""
    base_load = TECHNIQUES[config.technique.name].base_load(config.technique, device)
    return heap_mmap_threshold(device.type, config.training.gradient_checkpointing,
                               base_load.quantization_config is not None, config.training.return_freed_memory)


def sharded_terms(components: dict[str, int], skeleton: torch.nn.Module, processes: int) -> None:
    """``training.distributed: fsdp`` over ``processes``: each holds 1/N of the weights, gradients and optimizer
    state (AdamW's temporaries are of its shard of the largest tensor), plus what it gathers (``fsdp_gathered``):
    the root unit (embeddings, final norm, head: FSDP2 keeps it gathered from forward to backward), one decoder
    layer at a time (in the dtype it computes in), and that layer's whole gradient before it is reduce-scattered.
    ``skeleton`` is prepared as for the forward (under autocast its trainable weights already in half precision).
    DDP keeps all of it on every process: its plan is one process's."""
    layers = decoder_layers(skeleton)
    inside = {id(p) for layer in layers for p in layer.parameters()}
    # parameters() counts a tied weight once; buffers are not sharded, so nothing of them is gathered
    root = sum(p.numel() * p.element_size() for p in skeleton.parameters() if id(p) not in inside)
    layer_weights = max((sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in layers), default=0)
    layer_gradients = max((sum(4 * p.numel() for p in layer.parameters() if p.requires_grad) for layer in layers),
                          default=0)  # float32: gradients are reduced in float32 (shard_model's policy)
    for term in ("weights", "gradients", "optimizer_state", "optimizer_step_temporaries"):
        components[term] = -(-components[term] // processes)
    components["fsdp_gathered"] = root + layer_weights + layer_gradients


def _as_under_autocast(skeleton: torch.nn.Module, half: torch.dtype) -> None:
    """Make the meta forward save what an autocast forward saves: autocast has no meta kernels, so the trainable
    float32 weights are cast to the half dtype the matmuls run in (their copies are the ``autocast_copies`` term),
    and PEFT's adapters stop casting their input up to float32, as training sets them."""
    for param in skeleton.parameters():
        if param.dtype == torch.float32:
            param.data = param.data.to(half)
    adapters_compute_in_autocast_dtype(skeleton)


def _checkpoint_dtype(model_config: Any) -> torch.dtype:
    """The dtype the checkpoint's weights are stored in (config.json's dtype; float32 when it does not say)."""
    dtype = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def checkpoint_file_bytes(model: ModelConfig, fallback: int) -> int:
    """Bytes of the model's weight files where they are in a local folder (safetensors, else PyTorch .bin);
    ``fallback`` (the skeleton's weights in the checkpoint's dtype) for a hub model."""
    path = Path(resolve_model_path(model.name, model.looked_in))
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        if files:
            return sum(f.stat().st_size for f in files)
    return fallback


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
