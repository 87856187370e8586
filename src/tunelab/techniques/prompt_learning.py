"""Shared pieces of the prompt-learning techniques (prompt tuning, multitask prompt tuning, prefix tuning,
p-tuning): they learn virtual tokens instead of changing weights, so none of them merges or packs."""

from __future__ import annotations

import warnings

from pydantic import Field

from tunelab.settings import Settings
from tunelab.techniques.base import NO_POSITION_IDS, NOT_QUANTIZED, OUTSIDE_THE_MODEL, VIRTUAL_TOKENS

REFUSES = {"packing": NO_POSITION_IDS, "merge": VIRTUAL_TOKENS, "quantized_base": NOT_QUANTIZED,
           "fsdp": OUTSIDE_THE_MODEL}

# PEFT warns on every forward that it ignores position ids. tunelab refuses packing for these methods, so an
# unpacked row's positions are 0..T-1 anyway and the warning says nothing the user can act on.
warnings.filterwarnings("ignore", message="Position ids are not supported for parameter efficient tuning")


class VirtualTokens(Settings):
    num_virtual_tokens: int = Field(20, gt=0, description="Learned virtual tokens prepended to every input.")


def model_path(model) -> str:  # noqa: ANN001 - a transformers model
    """The folder (or hub id) the base was loaded from: text initialisation tokenizes with its tokenizer."""
    return getattr(model, "name_or_path", None) or model.config._name_or_path
