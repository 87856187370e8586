"""Multitask prompt tuning: one soft prompt shared by all tasks, modulated per task by a low-rank matrix (Wang et
al. 2023, "Multitask Prompt Tuning Enables Parameter-Efficient Transfer Learning", https://arxiv.org/abs/2303.02861).

With a shared prompt P* (n, d) and, for task k, factors u_k (n, r) and v_k (r, d):
    P_k = P* ⊙ (u_k v_k)          the model reads [P_k; E(x)] for an example of task k
Trainable: n d + K r (n + d). Each example's ``task`` field (tunelab's multi-task data) picks k: the batches carry
``task_ids`` (B,), which the loss passes to the model. Rows never mix tasks: prompt-learning methods do not pack.
Without a task id (free generation), the prompt of ``generation_task`` is used, and the log says so. The task
names are saved with the adapter (``tunelab_tasks.json``), so a reloaded adapter maps names to the same rows.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from tunelab.errors import TechniqueError
from tunelab.techniques.base import (RunContext, Technique, attach_peft_adapter, load_peft_adapter, peft_disabled_view,
                                      peft_task_type, save_peft_adapter)
from tunelab.techniques.lora import wrap
from tunelab.techniques.prompt_learning import REFUSES, VirtualTokens, model_path

log = logging.getLogger(__name__)
TASKS_FILE = "tunelab_tasks.json"


class MultitaskPromptTuningSettings(VirtualTokens):
    name: Literal["multitask_prompt_tuning"] = Field(
        "multitask_prompt_tuning", description="A soft prompt shared across tasks with a low-rank per-task factor "
        "(PEFT multitask prompt tuning); needs multi-task data (a 'task' field on every record).")
    num_ranks: int = Field(1, gt=0, description="Rank r of each task's factor u_k v_k.")
    init: Literal["random", "text"] = Field("random", description="Start the shared prompt randomly or from `init_text`.")
    init_text: str | None = Field(None, description="With init: text, the text whose embeddings start the shared prompt.")
    generation_task: str | None = Field(
        None, description="Task whose prompt is used when no task id is given (sample generations, free "
        "generation). None: the first task in sorted order.")

    @model_validator(mode="after")
    def _text_for_text_init(self) -> "MultitaskPromptTuningSettings":
        if self.init == "text" and not (self.init_text or "").strip():
            raise ValueError("init: text needs init_text, the text whose embeddings start the shared prompt")
        return self


def _default_task(settings: MultitaskPromptTuningSettings, tasks: list[str]) -> int:
    if settings.generation_task is None:
        return 0
    if settings.generation_task not in tasks:
        raise TechniqueError(f"technique.generation_task: {settings.generation_task!r} is not a task of the data "
                             f"(tasks: {', '.join(tasks)})")
    return tasks.index(settings.generation_task)


def _use_default_task_when_none(model: nn.Module, tasks: list[str], default: int) -> None:
    """PEFT needs a task id on every call; a call without one (generation) gets the default task's prompt."""
    told = []

    def fill(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        indices = args[0] if args else kwargs["indices"]  # (B, n) virtual token indices
        task_ids = args[1] if len(args) > 1 else kwargs.get("task_ids")
        if task_ids is not None:
            return None
        if not told:
            log.info("multitask prompt tuning: no task id given, using the prompt of task %r", tasks[default])
            told.append(True)
        filled = torch.full((indices.shape[0],), default, dtype=torch.long, device=indices.device)
        return (indices, filled), {}

    for encoder in model.prompt_encoder.values():
        encoder.register_forward_pre_hook(fill, with_kwargs=True)
    model.tunelab_forward_inputs = ("task_ids",)  # the loss passes each batch's task ids to the forward
    model.tunelab_tasks = list(tasks)


def prepare(model: nn.Module, settings: MultitaskPromptTuningSettings, context: RunContext | None = None) -> nn.Module:
    from peft import MultitaskPromptTuningConfig

    on_meta = any(p.is_meta for p in model.parameters())
    known = context.tasks if context is not None else None
    tasks = list(known or [])
    if not tasks:
        if known is not None or not on_meta:  # a run whose data has no tasks
            raise TechniqueError("technique 'multitask_prompt_tuning' needs multi-task data: give every training "
                                 "record a 'task' field (see docs/techniques/multitask_prompt_tuning.md)")
        tasks = [settings.generation_task or "task"]  # a weightless skeleton (parameter counts): one task's share
    text = settings.init == "text" and not on_meta
    config = MultitaskPromptTuningConfig(
        num_virtual_tokens=settings.num_virtual_tokens, num_tasks=len(tasks), num_ranks=settings.num_ranks,
        task_type=peft_task_type(context), prompt_tuning_init="TEXT" if text else "RANDOM",
        prompt_tuning_init_text=settings.init_text if text else None,
        tokenizer_name_or_path=model_path(model) if text else None,
    )
    peft_model = wrap(model, config)
    _use_default_task_when_none(peft_model, tasks, _default_task(settings, tasks))
    return peft_model


def save(model: nn.Module, run_dir: Path) -> Path:
    out = save_peft_adapter(model, run_dir)
    (out / TASKS_FILE).write_text(json.dumps({"tasks": model.tunelab_tasks}, indent=2) + "\n")
    return out


def load_result(config: Any, folder: Path, device: torch.device) -> nn.Module:
    model = load_peft_adapter(config, folder, device)
    tasks = json.loads((folder / TASKS_FILE).read_text())["tasks"]
    _use_default_task_when_none(model, tasks, _default_task(config.technique, tasks))
    return model


def attach(model: nn.Module, folder: Path) -> nn.Module:
    """The adapter folder alone, without its run's settings: a call without a task id gets the first task's prompt."""
    peft_model = attach_peft_adapter(model, folder)
    _use_default_task_when_none(peft_model, json.loads((folder / TASKS_FILE).read_text())["tasks"], 0)
    return peft_model


TECHNIQUE = Technique(
    name="multitask_prompt_tuning",
    config_class=MultitaskPromptTuningSettings,
    prepare=prepare,
    save=save,
    disabled_view=peft_disabled_view,
    result_dir_name="adapter",
    adapter_types=("MULTITASK_PROMPT_TUNING",),  # PEFT's peft_type
    default_learning_rate=3e-2,
    summary="a soft prompt shared across tasks, modulated per task (needs a 'task' field; not mergeable, no packing)",
    refuses=REFUSES,
    load_result=load_result,
    attach=attach,
)
