"""One training run from start to end: ``train(config)``.

Reading order: ``train`` claims the run folder (a new run, or a resume checked by ``resume``), ``_set_up`` builds
the tokenizer, data, model, base evaluation, technique, optimizer and schedule (then loads the checkpoint when
resuming), ``run_loop`` trains, and the end of the run restores the best weights if asked, evaluates them against
the base (``tunelab.eval.before_after``), saves the result and writes status.json, run_info.json and the card.
A failure leaves the folder resumable, and status.json says what happened.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import yaml
from safetensors.torch import save_file
from transformers import set_seed
from transformers.utils import logging as hf_logging

from tunelab import checkpoint as ckpt
from tunelab import distributed, fs
from tunelab.card import write_card
from tunelab.config import ConfigError, TunelabConfig
from tunelab.data import PreparedData
from tunelab.data.prepare import records_fingerprint, tokenizer_fingerprint
from tunelab.eval.before_after import BaseFiguresCache, base_evaluation, base_figures_cache, compare_with_base, forgetting_after
from tunelab.errors import error_text
from tunelab.eval.training import OverfittingSignal
from tunelab.generation import sample_prompts
from tunelab.models import (cache_root, default_device, fixed_mmap_threshold, glibc_tcache_on, load_model,
                            load_tokenizer, meta_twin, model_fingerprint, model_skeleton, write_head_config)
from tunelab.dropout import use_cpu_dropout
from tunelab.norms import use_cpu_rms_norm
from tunelab.objectives import check_records, check_rewards, prepare_objective_data
from tunelab.objectives.base import attach_own_module, without_own_module
from tunelab.objectives.reference import copies_the_base, live_reference, same_model
from tunelab.plan import heap_policy, plan_memory, resident_bytes, shape_of
from tunelab.plan.memory import (BOUNDED_ONEDNN_CACHE, BOUNDED_ONEDNN_CACHE_BY, NO_TCACHE, RESTARTED_WITHOUT_TCACHE,
                                 onednn_cache_capacity)
from tunelab.plan.planner import context_length, onednn_cache_bound, onednn_note, tcache_notes
from tunelab.precision import adapters_compute_in_autocast_dtype, keep_trainable_in_float32
from tunelab.fs import read_json, write_entry_json
from tunelab.schedule import make_scheduler
from tunelab.techniques import TECHNIQUES, RunContext, TechniqueError, count_parameters, virtual_tokens
from tunelab.tracking import Trackers
from tunelab.training.context import LoopState, TrainingContext, run_precision
from tunelab.training.attention import attention_in_use, attention_per_packed_example, kv_heads_shared_in_kernel
from tunelab.training.loop import run_loop
from tunelab.training.plan import make_plan
from tunelab.training.rollout import Rollouts
from tunelab.rewards import build_rewards
from tunelab.training.resume import check_same_data, prepare_run_dir, truncate_metrics

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    status: str  # completed, early_stopped, interrupted
    step: int
    evaluation: dict[str, Any] | None = None


def train(config: TunelabConfig, resume: bool = False, progress: bool = True) -> RunResult:
    """Fine-tune ``config.model`` on ``config.data`` with ``config.technique``; see the module docstring."""
    device = default_device()
    with _library_progress_bars(progress), kv_heads_shared_in_kernel(device), attention_per_packed_example(device):
        return _train(config, resume, progress)


@contextmanager
def _library_progress_bars(enabled: bool) -> Iterator[None]:
    """progress=False (a script, a test) also quiets transformers' own bars ("Loading weights"), then restores them."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            hf_logging.enable_progress_bar()


def _train(config: TunelabConfig, resume: bool, progress: bool) -> RunResult:
    run_precision(config)  # a refusal (float16 on a CPU) before any folder exists
    created = not Path(config.output.dir or "runs/run").exists()
    run_dir = distributed.main_decides(lambda: prepare_run_dir(config, resume))  # one process claims the folder
    threshold = heap_policy(config, default_device())  # what the plan assumed: from the model's load on
    try:
        with fixed_mmap_threshold(threshold) as taken:
            return _train_in(config, run_dir, resume, progress, created, threshold if taken else None)
    finally:
        fs.release_lock(run_dir)


def _train_in(config: TunelabConfig, run_dir: Path, resume: bool, progress: bool, created: bool,
              heap_threshold: int | None = None) -> RunResult:
    distributed.quiet_other_processes()
    chosen = run_precision(config)
    if chosen.note:
        log.warning(chosen.note)
    log.info("precision: %s", chosen.reason)
    if config.training.distributed == "fsdp" and distributed.process_state().num_processes == 1:
        log.info("training.distributed: fsdp with one process: nothing to shard, the whole model trains here")
    if resume:
        distributed.check_world_size((read_json(run_dir / "status.json") or {}).get("world_size"),
                                     distributed.process_state().num_processes, run_dir)
    ctx = TrainingContext(config, run_dir, progress)
    if resume:  # the sessions the run already spent count in its run_info.json
        ctx.info.continue_from(read_json(run_dir / "run_info.json"))
    _record_heap_policy(ctx, heap_threshold)
    state, phase = LoopState(), "set-up"
    try:
        if not resume:
            ctx.write_status("starting", state)
        with ctx.info.phase("set-up"):
            state, base, samples = _set_up(ctx, resume)
        if resume and ctx.is_main:  # only now, once the checkpoint, data and config all fit: a refused resume
            # changes nothing. One writer: two processes renaming the same temporary file race (one finds it gone).
            fs.write_entry_text(run_dir, "config.yaml", config.to_yaml())
        ctx.write_status("running", state)
        phase, tokens_before, steps_before = "loop", state.tokens_seen, state.step
        with ctx.info.phase("training"):
            status = run_loop(ctx, state)
        ctx.info.figures["training_tokens_this_session"] = state.tokens_seen - tokens_before
        _record_step_time(ctx, state.step - steps_before)
        if status == "interrupted":
            ctx.write_status(status, state)
            _finish_tracking(ctx, state, status)
            return RunResult(run_dir, status, state.step)
        phase = "trained"
        if _best_is_restored(ctx, state):
            phase = "best restored"
            ckpt.load_trainable(run_dir / "checkpoints" / ckpt.checkpoint_name(state.best_step),
                                ctx.accelerator.unwrap_model(ctx.model),
                                distributed.load_full_weights if ctx.sharded else None)
            best = config.training.best_metric
            log.info("restored the best weights (step %d, %s %.4f)", state.best_step, best, state.best_eval[best])
        with ctx.info.phase("final evaluation"):
            evaluation = _final_evaluation(ctx, state, base, samples)
            evaluation.update(ctx.technique_evaluation())
        with distributed.full_weights_on_main(ctx.model) if ctx.sharded else nullcontext():  # gathered on every process
            if ctx.is_main:
                with ctx.info.phase("saving"):
                    _save_result(ctx)
                write_entry_json(run_dir, "eval.json", evaluation)
    except BaseException as exc:
        _record_failure(ctx, state, phase, resume, exc, created)
        raise
    ctx.write_status(status, state)
    _finish_tracking(ctx, state, status)
    if ctx.is_main:  # after status.json: the card states the final status
        write_card(run_dir, run_dir / ctx.technique.result_dir_name)
    return RunResult(run_dir, status, state.step, evaluation)


# ---------------------------------------------------------------- set-up


def _set_up(ctx: TrainingContext, resume: bool) -> tuple[LoopState, dict[str, Any] | None, list[dict[str, str]]]:
    """Tokenizer, data, model, base evaluation, technique, optimizer; then the checkpoint when resuming."""
    config, run_dir = ctx.config, ctx.run_dir
    set_seed(config.training.seed)
    ctx.tokenizer, ctx.data = distributed.main_decides(lambda: _tokenizer_and_data(config))  # tokenized once
    ctx.pad_id = ctx.tokenizer.pad_token_id
    if resume:
        check_same_data(run_dir, ctx.data.report)
    if ctx.is_main:
        write_entry_json(run_dir, "data_report.json", ctx.data.report)
    if config.training.eval_every and not ctx.data.validation:
        raise ConfigError("training.eval_every needs validation data, and there is none: set data.val_size above 0 "
                          "or give data.validation (or leave eval_every unset)")
    check_records(ctx.config.objective, ctx.data, ctx.config.data.train)
    check_rewards(ctx.config.objective, ctx.data)  # before minutes of loading and base evaluation, as plan refuses
    _announce_plan(ctx)
    on_main = _weights_on_main_only(ctx)
    ctx.model = _load_base(ctx, on_main)
    if ctx.head_size is not None:  # a score head pools the last token that is not padding
        ctx.model.config.pad_token_id = ctx.pad_id
    if ctx.data.classes:  # the class names travel with the model: config.id2label, as transformers reads them
        ctx.model.config.id2label = dict(enumerate(ctx.data.classes))
        ctx.model.config.label2id = {name: i for i, name in enumerate(ctx.data.classes)}
    _check_technique_fits(ctx)  # seconds, on a weightless copy: before the minutes of base evaluation
    ctx.objective = ctx.objective_kind.bind(config.objective, same_model)  # the base is its own reference
    if ctx.objective_kind.prepare is not None:  # an online objective samples its batches and scores them
        ctx.rollouts = Rollouts(config.objective, ctx.tokenizer, build_rewards(config.objective.rewards, ctx.device),
                                config.training.grad_accum, config.training.seed, ctx.info, ctx.accelerator.autocast,
                                ctx.accelerator.num_processes, config.training.micro_batch_size)
    samples = sample_prompts(ctx.tokenizer, ctx.data.validation_examples, config.eval.num_samples)
    ctx.samples = samples
    with ctx.info.phase("base evaluation"):
        # with the weights on the main only, the main measures and the others receive the figures
        base = base_evaluation(run_dir, config.eval, bool(ctx.data.validation),
                               _measured_by(ctx.validation_loss, on_main),
                               _measured_by(lambda: ctx.greedy_samples(ctx.inner_model), on_main),
                               _measured_by(ctx.heldout_loss, on_main),
                               write=ctx.is_main, cache=distributed.main_decides(lambda: _base_figures_cache(ctx)))
    if config.training.gradient_checkpointing:
        enable_activation_checkpointing(ctx.model)
    if ctx.objective_kind.precompute is not None and config.objective.reference == "precomputed":
        with ctx.info.phase("reference log-probs"):  # the base, before the technique changes it, is the reference
            ctx.data.train, ctx.data.validation = _measured_by(lambda: ctx.objective_kind.precompute(
                ctx.model, {"train": ctx.data.train, "validation": ctx.data.validation}, ctx.pad_id,
                config.eval.batch_size, ctx.device, run_dir, ctx.is_main), on_main)().values()
    ctx.plan = make_plan(config, ctx.data, ctx.accelerator.process_index, ctx.accelerator.num_processes)
    set_seed(config.training.seed)  # the technique's initialisation does not depend on whether base eval ran
    reference = live_reference(ctx.objective_kind, config.objective, ctx.technique.disabled_view, ctx.model)
    # a technique that measures the data through the model (routing's calibration) does so on the real weights;
    # what it measures arrives with them (receive_shards)
    ctx.model = ctx.technique.apply(ctx.model, config.technique, RunContext(
        total_steps=ctx.plan.total_steps, tasks=tuple(ctx.data.tasks), task_type=ctx.objective_kind.task_type,
        examples=ctx.data.train if ctx.is_main or not on_main else (), pad_id=ctx.pad_id))
    ctx.objective = ctx.objective_kind.bind(config.objective, reference)
    # a module the objective trains beside the model (PPO's value head): optimized, checkpointed, resumed with it
    attach_own_module(ctx.objective_kind.own_module, ctx.model, config.objective)
    if keep_trainable_in_float32(ctx.model):  # mixed precision: float32 master weights, half-precision autocast
        log.info("trainable weights kept in float32; autocast computes in %s", ctx.precision.load_dtype)
    if ctx.precision.mixed_precision != "no":  # autocast: adapter inputs stay in the half-precision dtype
        adapters_compute_in_autocast_dtype(ctx.model)
    if ctx.accelerator.device.type == "cpu" and (switched := use_cpu_dropout(ctx.model)):
        ctx.info.figures["dropout"] = f"{switched} dropout layers draw the positions they drop, not a mask " \
                                      "(CPU; each element still dropped with probability p)"
        log.info("dropout: %s", ctx.info.figures["dropout"])
    if ctx.accelerator.device.type == "cpu" and (switched := use_cpu_rms_norm(ctx.model)):
        ctx.info.figures["rms_norm"] = f"{switched} RMSNorm layers with frozen weights run in fewer passes (CPU; " \
                                       "the same values bit for bit)"
        log.info("rms_norm: %s", ctx.info.figures["rms_norm"])
    if ctx.accelerator.device.type == "cpu":  # which attention trained: it changes bf16 rounding (docs/performance.md)
        ctx.info.figures["attention"] = attention_in_use()
        log.info("attention: %s", ctx.info.figures["attention"])
    if ctx.sharded:  # after the technique and the dtypes are set: FSDP2 shards the parameters as they are then
        _shard(ctx, on_main)
    trainable, total = count_parameters(ctx.model)
    ctx.info.figures.update(trainable_parameters=trainable, total_parameters=total)
    log.info("technique %s: %s of %s parameters trainable (%.3f%%)", config.technique.name, f"{trainable:,}",
             f"{total:,}", 100 * trainable / total)
    ctx.optimizer = make_optimizer(ctx.model, config)
    ctx.scheduler = make_scheduler(ctx.optimizer, config.training.schedule, config.training.warmup_ratio,
                                   ctx.plan.total_steps)
    if not ctx.sharded:  # prepare() would wrap a sharded model in DDP on CPU (see distributed.py)
        ctx.model, ctx.optimizer = ctx.accelerator.prepare(ctx.model, ctx.optimizer)
    ctx.model.train()
    state = _resume_from_checkpoint(ctx) if resume else LoopState()
    if config.training.report_to and ctx.is_main:
        ctx.trackers = Trackers(config.training.report_to, run_dir, yaml.safe_load(config.to_yaml()), resume)
    return state, base, samples


def _weights_on_main_only(ctx: TrainingContext) -> bool:
    """Sharded, only the main process reads the base weights; the others build it on the meta device and receive
    their shards (distributed.py). Except where the objective keeps a frozen copy of the whole base on every
    process (full fine-tuning scored against a live reference): each then needs all of it anyway."""
    if not ctx.sharded:
        return False
    if copies_the_base(ctx.objective_kind, ctx.config.objective, ctx.technique.disabled_view):
        log.info("fsdp: every process loads the whole base: objective %s keeps a frozen copy of it as its reference "
                 "on each (objective.reference: precomputed keeps none)", ctx.config.objective.name)
        return False
    return True


def _load_base(ctx: TrainingContext, on_main: bool) -> torch.nn.Module:
    """The base model as the technique and objective want it loaded; with ``on_main``, read by the main process
    only, the others get its meta-device twin (built from the main's config: the same modules and dtypes)."""
    config = ctx.config
    base_load = ctx.technique.base_load(config.technique, ctx.device, ctx.head_size)
    load = lambda: load_model(config.model, ctx.device, base_load, num_labels=ctx.head_size,  # noqa: E731
                              dtype=ctx.precision.load_dtype)
    if not on_main:
        return load()
    loaded: list[torch.nn.Module] = []

    def load_and_describe() -> tuple[Any, Any, dict[str, torch.dtype]]:
        loaded.append(load())
        model = loaded[0]
        return model.config, getattr(model, "generation_config", None), {n: p.dtype for n, p in model.named_parameters()}

    described = distributed.main_decides(load_and_describe)  # a failed load raises on every process
    return loaded[0] if ctx.is_main else meta_twin(*described, num_labels=ctx.head_size)


def _measured_by(measure: Callable[[], Any], on_main: bool) -> Callable[[], Any]:
    """``measure`` as is, or (``on_main``: the other processes hold no weights yet) run by the main process and
    its result handed to every process."""
    if not on_main:
        return measure
    return lambda: distributed.main_decides(measure)


def _shard(ctx: TrainingContext, on_main: bool) -> None:
    """Shard the model over the processes (FSDP2); with its weights on the main only, the others receive their
    shards from it. (A technique initialised on the meta device draws from the random stream as it does on real
    weights, so every process's dropout stream is the one it has under DDP: test_sharded_dropout_draws_as_ddp.)"""
    if on_main:
        distributed.check_same_structure(ctx.model)
    full = ctx.model.state_dict() if on_main and ctx.is_main else None  # the main's whole weights, for receive_shards
    half = ctx.precision.load_dtype if ctx.precision.mixed_precision != "no" else None
    ctx.info.figures["fsdp_units"] = distributed.shard_model(ctx.model, half)  # run_info.json says it sharded
    if on_main:
        distributed.receive_shards(ctx.model, full)
    ctx.info.figures["fsdp_loaded_by"] = "main process" if on_main else "every process"


def _record_heap_policy(ctx: TrainingContext, threshold: int | None) -> None:
    """Say which allocator policy this run trains under (docs/choosing.md, the heap policy): the log and
    run_info.json's ``heap_policy``."""
    if threshold is None:
        policy = "glibc's dynamic mmap threshold (freed chunks under 32 MiB stay in the heap)"
    else:
        policy = (f"mmap threshold fixed at {threshold // 2**20} MiB (training.return_freed_memory; by default "
                  "checkpointing or a quantized load on a CPU): freed chunks from that size on go back to the system")
    ctx.info.figures["heap_policy"] = {"mmap_threshold": threshold, "policy": policy, "tcache": _tcache_record(ctx),
                                       "onednn_primitive_cache": _onednn_record(ctx)}
    log.info("heap policy: %s", policy)


def _onednn_record(ctx: TrainingContext) -> dict[str, Any]:
    """oneDNN's primitive cache in this process: its capacity (None: oneDNN's default, 1024) and who set it
    (`tunelab train`, with its reason, or the environment); a warning where a run that needs it bounded keeps the
    default (the Python API: oneDNN reads its variable once, at its first primitive, so tunelab sets it only in
    a process that runs nothing else)."""
    capacity, bounded_by = onednn_cache_capacity(), os.environ.get(BOUNDED_ONEDNN_CACHE_BY)
    record = {"capacity": capacity,
              "set_by": None if capacity is None else f"tunelab train ({bounded_by})" if bounded_by else "the environment"}
    reason = onednn_cache_bound(ctx.config, ctx.device.type)
    if reason and (capacity is None or capacity > BOUNDED_ONEDNN_CACHE):
        log.warning(onednn_note(capacity, reason, by_tunelab=False))
    return record


def _tcache_record(ctx: TrainingContext) -> dict[str, Any]:
    """glibc's per-thread cache in this process (the tunables glibc read when it started): off or on, who turned
    it off (`tunelab train`'s restart, with its reason, or the environment), and a warning in the log where a run
    that needs it off keeps it (the Python API, training.glibc_tcache_off: false, the user's own tcache_count)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    restarted = os.environ.get(RESTARTED_WITHOUT_TCACHE)
    on = glibc_tcache_on()  # measured: what glibc does, whatever the environment says
    off = NO_TCACHE in tunables.split(":") if on is None else not on
    record = {"glibc_tunables": tunables or None, "off": off,
              "set_by": (f"tunelab train (restarted: {restarted})" if restarted else "the environment") if off else None}
    if off:
        log.info("glibc's per-thread cache: off (GLIBC_TUNABLES=%s, set by %s)", tunables, record["set_by"])
    for note in tcache_notes(ctx.config, ctx.device.type, tunables):
        log.warning(note)
    return record


def _announce_plan(ctx: TrainingContext) -> None:
    """The memory plan's figure before any weight is read (this process's resident memory is its runtime term);
    run_info.json records it beside the measured peak, so every run checks the planner. The main process's only
    (it writes run_info.json): the others need not see the model's files."""
    if not ctx.is_main:
        return
    try:
        plan = plan_memory(ctx.config, ctx.device.type, shape_of(ctx.config, ctx.data), runtime=resident_bytes(),
                           processes=ctx.accelerator.num_processes, tunables=os.environ.get("GLIBC_TUNABLES", ""))
    except Exception as exc:  # a plan is advice: a planner that cannot model this run never stops training
        log.warning("memory plan unavailable (%s: %s)", type(exc).__name__, exc)
        return
    ctx.info.figures["planned_peak"] = {"bytes": plan.peak_bytes, "gib": round(plan.peak_bytes / 2**30, 3),
                                        "phase": plan.phase}
    log.info("memory plan: peak %.2f GiB (%s, at the %s; tunelab plan for the terms)", plan.peak_bytes / 2**30,
             "RSS" if plan.device == "cpu" else "allocated + context", plan.phase)


def _base_figures_cache(ctx: TrainingContext) -> BaseFiguresCache | None:
    """Where the untouched model's figures may be reused from: keyed on everything they depend on (the model's
    files and how they are loaded, the tokenizer and template, the validation records and sample prompts, the
    objective's settings; eval adds its settings and the versions). None when they may not be reused."""
    config = ctx.config
    if ctx.objective_kind.base_figures_uncached:
        log.info("base figures not cached: objective %s: %s", config.objective.name, ctx.objective_kind.base_figures_uncached)
        return None
    model = model_fingerprint(config.model)
    if model is None:
        return None
    base_load = ctx.technique.base_load(config.technique, ctx.device, ctx.head_size)
    quantization = base_load.quantization_config
    load = {"dtype": str(ctx.precision.load_dtype), "autocast": ctx.precision.mixed_precision,
            "base_dtype": str(base_load.dtype), "head": ctx.head_size, "device": ctx.device.type,
            "quantization": quantization.to_dict() if hasattr(quantization, "to_dict") else repr(quantization),
            "attn_implementation": config.model.attn_implementation, "processes": ctx.accelerator.num_processes}
    identity = {"model": model, "load": load, "tokenizer": tokenizer_fingerprint(ctx.tokenizer),
                "validation": records_fingerprint(ctx.data.validation[: config.eval.max_examples]),
                "samples": ctx.samples, "objective": config.objective.model_dump(mode="json")}
    return base_figures_cache(cache_root(), identity, config.eval)


def _tokenizer_and_data(config: TunelabConfig) -> tuple[Any, PreparedData]:
    tokenizer = load_tokenizer(config.model)
    return tokenizer, prepare_objective_data(config.objective, config.data, tokenizer, cache_root() / "data")



def _check_technique_fits(ctx: TrainingContext) -> None:
    """Apply the technique to a weightless (meta-device) copy of the model, so a setting that does not fit it
    (a layer index, a module name) is reported at once, not after minutes of base evaluation."""
    base_load = ctx.technique.base_load(ctx.config.technique, ctx.device, ctx.head_size)
    skeleton = model_skeleton(ctx.model.config, base_load, num_labels=ctx.head_size)  # the same module types as the loaded base
    try:
        prepared = ctx.technique.apply(skeleton, ctx.config.technique,
                                       RunContext(tasks=tuple(ctx.data.tasks), task_type=ctx.objective_kind.task_type))
    except TechniqueError as exc:
        raise TechniqueError(f"{exc} (model {ctx.config.model.name})") from None
    check_rows_fit_context(ctx.config, ctx.data, ctx.objective_kind, context_length(ctx.model.config),
                           virtual_tokens(prepared))


def check_rows_fit_context(config: TunelabConfig, data: PreparedData, objective: Any, context: int | None,
                           virtual: int) -> None:
    """Refuse rows longer than the model's context (its config's max_position_embeddings): the longest example the
    run trains on plus the virtual tokens a prompt-learning technique puts before every row. Past the context a
    model with learned positions fails in its first forward, and one with rotary positions trains on positions it
    never saw. The data's own longest example, not data.max_length: a cap the rows never reach (the default 1024 on
    a short data set) takes no position, and packed rows count positions per example (each starts at 0), so a
    packed row longer than the context uses none past it."""
    if context is None:
        return
    limit = config.data.max_length
    longest = max((max(objective.rows_of(record, config.objective), default=0) for record in data.train), default=0)
    if longest + virtual <= context:
        return
    rows = f"the longest row of this data, {longest} tokens (data.max_length {limit})"
    added = f" plus the {virtual} virtual tokens of technique.num_virtual_tokens, {longest + virtual} positions," if virtual else ""
    raise ConfigError(
        f"{rows}{added} is past the model's context: {context} positions (max_position_embeddings in the config.json "
        f"of model.name {config.model.name}). Set data.max_length to at most {context - virtual}"
        + (" or lower technique.num_virtual_tokens" if virtual else "") + ".")


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each layer's activations in backward (transformers 5 renamed gradient_ to activation_)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def make_optimizer(model: torch.nn.Module, config: TunelabConfig) -> torch.optim.Optimizer:
    """AdamW over the technique's parameter groups (by default: weight decay on matrices only)."""
    technique = TECHNIQUES[config.technique.name]
    groups = technique.param_groups(model, config.technique, config.learning_rate, config.training.weight_decay)
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=config.training.adam_betas)


def _resume_from_checkpoint(ctx: TrainingContext) -> LoopState:
    """Load the latest checkpoint into the prepared model, optimizer and schedule: weights, moments, counters, the
    technique's own state and every process's random stream, so the run continues as if never stopped."""
    run_dir = ctx.run_dir
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    state = LoopState(**ckpt.load_checkpoint(latest, ctx.accelerator.unwrap_model(ctx.model), ctx.optimizer,
                                             ctx.scheduler, ctx.sharded_io))
    saved_technique_state = ckpt.load_technique_state(latest)
    if saved_technique_state is not None and ctx.technique.state is not None:
        ctx.technique.state.load(ctx.accelerator.unwrap_model(ctx.model), *saved_technique_state)
    if ctx.accelerator.num_processes > 1:  # load_checkpoint restored the main's RNG; each rank gets its own
        saved = ckpt.load_rng(latest)
        ckpt.restore_rng(distributed.rank_rng_state(saved, ctx.accelerator.process_index))
    state.history.append(f"resumed from {latest.name}")
    if ctx.rollouts is not None:  # rollouts the next steps reuse (num_iterations > 1) come back from the checkpoint
        ctx.rollouts.restore(state.rollout, ctx.plan, ctx.device)
    if state.step > ctx.plan.total_steps:
        raise ConfigError(f"--resume: the checkpoint is at step {state.step}, past the {ctx.plan.total_steps} steps "
                          "this config plans; raise training.max_steps (or epochs)")
    if ctx.is_main:
        truncate_metrics(run_dir, state.step)
    ctx.overfitting = OverfittingSignal(state.gaps, train_losses=state.train_losses)
    return state


# ---------------------------------------------------------------- the end of a run


def _best_is_restored(ctx: TrainingContext, state: LoopState) -> bool:
    return ctx.config.training.restore_best and state.best_step is not None and state.best_step != state.step


def _final_evaluation(ctx: TrainingContext, state: LoopState, base: dict[str, Any] | None,
                      samples: list[dict[str, str]]) -> dict[str, Any]:
    """Before/after figures of the weights being saved: the restored best ones, or the last ones."""
    forgetting = forgetting_after(ctx.config.eval, base, ctx.heldout_loss)
    best_restored = _best_is_restored(ctx, state)
    tuned = _tuned_figures(ctx, state, best_restored) if ctx.data.validation else None
    generate = ctx.sample_outputs if ctx.is_main or ctx.sharded else None  # sharded: every process generates
    comparison = compare_with_base(ctx.config.eval, base, tuned, samples, generate, ctx.config.training.seed)
    return {"step": state.step, "weights_from_step": state.best_step if best_restored else state.step, **comparison,
            **({"forgetting": forgetting} if forgetting else {})}


def _tuned_figures(ctx: TrainingContext, state: LoopState, best_restored: bool) -> dict[str, Any]:
    """Validation figures of the weights being saved: measured already when they are the best or the last
    evaluation's, else measured now."""
    if best_restored:
        tuned = state.best_eval
    elif state.last_eval and state.last_eval["step"] == state.step:
        tuned = state.last_eval
    else:
        tuned = ctx.validation_loss()
    return {k: v for k, v in tuned.items() if k != "step"}


def _save_result(ctx: TrainingContext) -> Path:
    """Write the adapter or model (atomically: into a temporary folder, then renamed) and the tokenizer."""
    model = ctx.accelerator.unwrap_model(ctx.model)
    name = ctx.technique.result_dir_name
    own = ctx.objective_kind.own_module
    with fs.new_entry_folder(ctx.run_dir, name) as tmp, without_own_module(own, model) as own_weights:
        written = ctx.technique.save(model, tmp)  # a technique saves into <folder>/<result_dir_name>
        if name == "model":
            ctx.tokenizer.save_pretrained(written)  # a full model folder is self-contained
        if ctx.head_size is not None and not (written / "config.json").is_file():  # an adapter: no config holds
            write_head_config(written, model)  # the class names and pad id of its score head
        for item in list(written.iterdir()):  # lift it into the entry's own temporary folder
            item.rename(tmp / item.name)
        written.rmdir()
    with fs.new_entry_folder(ctx.run_dir, "tokenizer") as tmp:
        ctx.tokenizer.save_pretrained(tmp)
    if own is not None and own_weights is not None:  # beside the result, which opens without it
        with fs.atomic_file(fs.own_entry(ctx.run_dir, own.file_name)) as tmp_file:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in own_weights.state_dict().items()}, str(tmp_file))
    return ctx.run_dir / name


def _record_step_time(ctx: TrainingContext, steps: int) -> None:
    """run_info.json: the objective, its units, and the wall time per optimizer step of this session's training
    (evaluations during training included), beside the peak memory run_info records for every run."""
    ctx.info.figures.update(objective=ctx.config.objective.name, objective_units=ctx.objective_kind.units)
    if steps:  # an online objective's sampling and scoring are phases of their own, within the steps
        spent = sum(ctx.info.phases.get(phase, 0.0) for phase in ("training", "generation", "rewards"))
        ctx.info.figures["seconds_per_step"] = round(spent / steps, 4)


def _finish_tracking(ctx: TrainingContext, state: LoopState, status: str) -> None:
    """run_info.json, and the end of the TensorBoard/MLflow logs."""
    if not ctx.is_main:
        return
    tokens = ctx.info.figures.pop("training_tokens_this_session", 0)
    write_entry_json(ctx.run_dir, "run_info.json",
                   {"step": state.step, **ctx.info.as_dict(status, tokens, ctx.accelerator.num_processes)})
    if ctx.trackers is not None:
        ctx.trackers.close("FINISHED" if status in ("completed", "early_stopped") else "KILLED")


def _record_failure(ctx: TrainingContext, state: LoopState, phase: str, resume: bool, exc: BaseException,
                    created: bool) -> None:
    """Leave the run folder resumable and say what happened in status.json."""
    if resume and phase == "set-up":  # a refused or failed resume: the run stays as it was, still resumable
        return
    if phase == "set-up":  # a pre-flight error: the run never started, so it leaves nothing behind
        if ctx.is_main:
            fs.release(ctx.run_dir, created)
        return
    interrupted = isinstance(exc, KeyboardInterrupt)
    if interrupted and phase == "trained":  # Ctrl-C during the final evaluation: keep the trained steps
        ctx.save_checkpoint(state)
    ctx.write_status("interrupted" if interrupted else "failed", state, error_text(exc))
    try:
        _finish_tracking(ctx, state, "interrupted" if interrupted else "failed")
    except Exception as secondary:  # the run's own error is the one to report
        log.warning("could not write run_info.json: %s", secondary)
