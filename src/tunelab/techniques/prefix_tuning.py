"""Prefix tuning: learn key/value vectors prepended at every attention layer (Li & Liang 2021, "Prefix-Tuning:
Optimizing Continuous Prompts for Generation", https://arxiv.org/abs/2101.00190).

At layer l, attention reads learned prefixes P_K^l, P_V^l (n, d_kv) before the sequence's keys and values:
    head = softmax(q [P_K^l; K]^T / sqrt(d)) [P_V^l; V]
Trainable parameters: n * layers * 2 * d_kv (or, with prefix_projection, an MLP that produces them, which trains
more stably; only the prefixes are needed at inference). Nothing is merged; examples are not packed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from tunelab.techniques.base import RunContext, Technique, peft_disabled_view, peft_task_type, save_peft_adapter
from tunelab.techniques.lora import wrap
from tunelab.techniques.prompt_learning import REFUSES, VirtualTokens


class PrefixTuningSettings(VirtualTokens):
    name: Literal["prefix_tuning"] = Field("prefix_tuning", description="Learned key/value prefixes at every layer (PEFT prefix tuning).")
    prefix_projection: bool = Field(False, description="Produce the prefixes with a two-layer MLP (reparameterisation).")
    projection_hidden_size: int = Field(512, gt=0, description="Hidden size of that MLP (prefix_projection only).")


def prepare(model: nn.Module, settings: PrefixTuningSettings, context: RunContext | None = None) -> nn.Module:
    from peft import PrefixTuningConfig

    config = PrefixTuningConfig(num_virtual_tokens=settings.num_virtual_tokens, prefix_projection=settings.prefix_projection,
                                encoder_hidden_size=settings.projection_hidden_size, task_type=peft_task_type(context))
    return wrap(model, config)


TECHNIQUE = Technique(
    name="prefix_tuning",
    config_class=PrefixTuningSettings,
    prepare=prepare,
    save=save_peft_adapter,
    disabled_view=peft_disabled_view,
    result_dir_name="adapter",
    adapter_types=("PREFIX_TUNING",),  # PEFT's peft_type
    default_learning_rate=1e-2,
    summary="learned key/value prefixes at every attention layer (not mergeable, no packing)",
    refuses={**REFUSES, "gradient_checkpointing": "PEFT refuses it: the learned prefix is passed as a key/value cache, "
                                                 "which recomputing activations in backward cannot use",
             "score_head": "PEFT passes the learned prefix to a sequence classifier as past_key_values, which "
                           "transformers' classifiers no longer accept (PEFT's ValueError in the first forward); "
                           "use lora or full"},
)
