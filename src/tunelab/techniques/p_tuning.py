"""P-tuning: virtual token embeddings produced by a small prompt encoder (Liu et al. 2021, "GPT Understands, Too",
https://arxiv.org/abs/2103.10385).

Learned seeds E (n, d) pass through an encoder g (an MLP or LSTM) and the result is prepended to the input:
    h = f_θ([g(E); X])
The encoder couples the virtual tokens, which trains more stably than free prompt embeddings. Trainable: E plus the
encoder. Nothing is merged; examples are not packed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from tunelab.techniques.base import RunContext, Technique, peft_disabled_view, peft_task_type, save_peft_adapter
from tunelab.techniques.lora import wrap
from tunelab.techniques.prompt_learning import REFUSES, VirtualTokens


class PTuningSettings(VirtualTokens):
    name: Literal["p_tuning"] = Field("p_tuning", description="Virtual tokens from a learned prompt encoder (PEFT p-tuning).")
    encoder: Literal["mlp", "lstm"] = Field("mlp", description="Prompt encoder: a two-layer MLP or a bidirectional LSTM.")
    encoder_hidden_size: int = Field(256, gt=0, description="Hidden size of the prompt encoder.")
    encoder_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout inside the prompt encoder.")


def prepare(model: nn.Module, settings: PTuningSettings, context: RunContext | None = None) -> nn.Module:
    from peft import PromptEncoderConfig

    config = PromptEncoderConfig(num_virtual_tokens=settings.num_virtual_tokens, task_type=peft_task_type(context),
                                 encoder_reparameterization_type=settings.encoder.upper(),
                                 encoder_hidden_size=settings.encoder_hidden_size, encoder_dropout=settings.encoder_dropout)
    return wrap(model, config)


TECHNIQUE = Technique(
    name="p_tuning",
    config_class=PTuningSettings,
    prepare=prepare,
    save=save_peft_adapter,
    disabled_view=peft_disabled_view,
    result_dir_name="adapter",
    adapter_types=("P_TUNING",),  # PEFT's peft_type
    default_learning_rate=1e-2,
    summary="virtual tokens produced by a small prompt encoder (not mergeable, no packing)",
    refuses=REFUSES,
)
