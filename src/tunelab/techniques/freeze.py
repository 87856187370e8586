"""Partial fine-tuning ("freeze"): train only chosen decoder layers and modules, freeze the rest.

With theta = (theta_frozen, theta_train), only theta_train receives updates:
    theta_train <- AdamW(theta_train, dL/dtheta_train)
Training the top layers is the classic transfer-learning recipe (Howard & Ruder 2018, ULMFiT,
https://arxiv.org/abs/1801.06146; Lee et al. 2019, "What would Elsa do? Freezing layers during transformer
fine-tuning", https://arxiv.org/abs/1911.03090). Gradients and optimizer state exist only for the trained part,
and backward stops at the lowest trained layer.
"""

from __future__ import annotations

import fnmatch
from typing import Literal

from pydantic import Field
from torch import nn

from tunelab.errors import TechniqueError
from tunelab.settings import Settings
from tunelab.techniques.base import STANDALONE, TRAINS_BASE_WEIGHTS, RunContext, Technique, peft_task_type, save_full_model


class FreezeSettings(Settings):
    name: Literal["freeze"] = Field("freeze", description="Train only chosen layers/modules; freeze everything else.")
    layers: list[int] = Field(
        default_factory=lambda: [-2, -1],
        description="Indices of decoder layers to train; negative indices count from the top (-1 is the last layer).",
    )
    modules: list[str] = Field(
        default_factory=list,
        description="Extra parameter-name patterns to train (fnmatch), e.g. ['model.norm.*', 'lm_head.*'].",
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks: the longest ModuleList in the model (works across architectures)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise TechniqueError("technique 'freeze': this model has no list of layers to choose from")
    return max(lists, key=len)


def new_head(model: nn.Module) -> nn.Module:
    """A sequence classifier's head: the module beside the base model (Llama-style ``score``)."""
    prefix = getattr(model, "base_model_prefix", "model")
    heads = [module for name, module in model.named_children() if name != prefix]
    if len(heads) != 1:
        raise TechniqueError(f"technique 'freeze': cannot tell this model's score head among {[n for n, _ in model.named_children()]}")
    return heads[0]


def prepare(model: nn.Module, settings: FreezeSettings, context: RunContext | None = None) -> nn.Module:
    layers = decoder_layers(model)
    n = len(layers)
    for index in settings.layers:
        if not -n <= index < n:
            raise TechniqueError(f"technique.layers: index {index} is out of range for a model with {n} layers")
    chosen = {index % n for index in settings.layers}
    for param in model.parameters():
        param.requires_grad_(False)
    for index in chosen:
        for param in layers[index].parameters():
            param.requires_grad_(True)
    if peft_task_type(context) == "SEQ_CLS":  # a new score head starts untrained: it always trains
        for param in new_head(model).parameters():
            param.requires_grad_(True)
    matched = set()
    # remove_duplicate=False: a tied weight answers to every name it has (lm_head.weight is embed_tokens.weight).
    for name, param in model.named_parameters(remove_duplicate=False):
        for pattern in settings.modules:
            if fnmatch.fnmatchcase(name, pattern):
                param.requires_grad_(True)
                matched.add(pattern)
    missing = [p for p in settings.modules if p not in matched]
    if missing:
        names = [name for name, _ in model.named_parameters()][:8]
        raise TechniqueError(f"technique.modules: {missing} match no parameter name (names look like {names} ...)")
    if not any(p.requires_grad for p in model.parameters()):
        raise TechniqueError("technique 'freeze': nothing left to train; choose layers or modules")
    return model


TECHNIQUE = Technique(
    name="freeze",
    config_class=FreezeSettings,
    prepare=prepare,
    save=save_full_model,
    result_dir_name="model",
    default_learning_rate=5e-5,
    refuses={"merge": STANDALONE, "quantized_base": TRAINS_BASE_WEIGHTS},
    summary="train chosen top layers only (less memory, keeps lower layers intact)",
)
