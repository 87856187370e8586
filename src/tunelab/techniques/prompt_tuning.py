"""Prompt tuning: learn the embeddings of a few virtual tokens prepended to every input (Lester et al. 2021, "The
Power of Scale for Parameter-Efficient Prompt Tuning", https://arxiv.org/abs/2104.08691).

With input embeddings X (T, d) and learned prompt P (n, d), the frozen model reads [P; X]:
    h = f_θ([P; X])           only P trains: n * d parameters (e.g. 20 x 576 = 11,520 for SmolLM2-135M)
P starts from random embeddings or from the embeddings of an initial text (e.g. a task description), which
converges faster. Nothing is merged: the result is the prompt, kept as a PEFT adapter. Examples are not packed
(PEFT drops per-example position ids for these methods).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from torch import nn

from tunelab.techniques.base import RunContext, Technique, peft_disabled_view, peft_task_type, save_peft_adapter
from tunelab.techniques.lora import wrap
from tunelab.techniques.prompt_learning import REFUSES, VirtualTokens, model_path


class PromptTuningSettings(VirtualTokens):
    name: Literal["prompt_tuning"] = Field("prompt_tuning", description="Learned soft prompt embeddings (PEFT prompt tuning).")
    init: Literal["random", "text"] = Field(
        "random", description="Start the prompt from random embeddings, or from the embeddings of `init_text`.")
    init_text: str | None = Field(
        None, description="With init: text, the text whose token embeddings start the prompt (repeated or cut to "
        "num_virtual_tokens), e.g. 'Answer the Python question concisely:'.")

    @model_validator(mode="after")
    def _text_for_text_init(self) -> "PromptTuningSettings":
        if self.init == "text" and not (self.init_text or "").strip():
            raise ValueError("init: text needs init_text, the text whose embeddings start the prompt")
        if self.init == "random" and self.init_text is not None:
            raise ValueError("init_text is only read with init: text")
        return self


def prepare(model: nn.Module, settings: PromptTuningSettings, context: RunContext | None = None) -> nn.Module:
    from peft import PromptTuningConfig

    text = settings.init == "text" and not any(p.is_meta for p in model.parameters())  # no embeddings on meta
    config = PromptTuningConfig(
        num_virtual_tokens=settings.num_virtual_tokens, task_type=peft_task_type(context),
        prompt_tuning_init="TEXT" if text else "RANDOM",
        prompt_tuning_init_text=settings.init_text if text else None,
        tokenizer_name_or_path=model_path(model) if text else None,
    )
    return wrap(model, config)


TECHNIQUE = Technique(
    name="prompt_tuning",
    config_class=PromptTuningSettings,
    prepare=prepare,
    save=save_peft_adapter,
    disabled_view=peft_disabled_view,
    result_dir_name="adapter",
    adapter_types=("PROMPT_TUNING",),  # PEFT's peft_type
    default_learning_rate=3e-2,
    summary="a learned soft prompt of virtual token embeddings (fewest parameters; not mergeable, no packing)",
    refuses=REFUSES,
)
