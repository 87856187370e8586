"""Full fine-tuning: every weight is trained.

Update rule (AdamW, Loshchilov & Hutter 2019, https://arxiv.org/abs/1711.05101):
    theta <- theta - lr * ( m_hat / (sqrt(v_hat) + eps) + wd * theta )
Memory is the largest of all techniques: weights + gradients + two AdamW moments, i.e. about
16 bytes per parameter in fp32, before activations.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from tunelab.settings import Settings
from tunelab.techniques.base import STANDALONE, TRAINS_BASE_WEIGHTS, Technique, save_full_model


class FullSettings(Settings):
    name: Literal["full"] = Field("full", description="Train every parameter of the model.")


def prepare(model: nn.Module, settings: FullSettings) -> nn.Module:
    for param in model.parameters():
        param.requires_grad_(True)
    return model


TECHNIQUE = Technique(
    name="full",
    config_class=FullSettings,
    prepare=prepare,
    save=save_full_model,
    result_dir_name="model",
    default_learning_rate=2e-5,
    refuses={"merge": STANDALONE, "quantized_base": TRAINS_BASE_WEIGHTS},
    summary="train all weights (most memory, most capacity)",
)
