"""Shared pieces of the PEFT-backed weight-adapter techniques (IA3, LoHa, LoKr, VeRA, AdaLoRA): building the
PEFT config from tunelab's settings and checking the target names against the model first."""

from __future__ import annotations

from typing import Any

from torch import nn

from tunelab.techniques.lora import AdapterTargets, check_targets, wrap


def wrap_checked(model: nn.Module, settings: AdapterTargets, peft_config: Any) -> nn.Module:
    check_targets(model, settings)
    return wrap(model, peft_config)
