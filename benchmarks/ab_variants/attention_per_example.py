"""benchmarks/ab_step.py variants: transformers' SDPA attention on the packed rows' block-diagonal mask, against
causal attention per packed example, re-batched by length (``training/attention.py``, what a CPU run uses)."""

from __future__ import annotations

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from tunelab.training.attention import PACKED_SDPA, packed_sdpa_attention

VARIANTS = ["mask", "per_example"]


def use(name: str, model: torch.nn.Module) -> None:
    ALL_ATTENTION_FUNCTIONS._local_mapping.pop(PACKED_SDPA, None)
    if name == "per_example":
        ALL_ATTENTION_FUNCTIONS[PACKED_SDPA] = packed_sdpa_attention
