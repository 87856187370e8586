"""Bottleneck adapters (the "adapter layers" technique): small trained bottlenecks inside a frozen model.

Each adapted sub-layer F (attention or MLP) of the chosen decoder layers gets
    a(h) = s * W_up f(W_down LN(h)),   W_down (m, H), W_up (H, m), m = H / reduction_factor
    sequential:  y = F(x) + a(F(x))     houlsby: after attention and after the MLP; pfeiffer: after the MLP only
    parallel:    y = F(x) + a(x)        beside the MLP (or attention), scaled by s (4 by default)
with W_up = 0 at the start, so training starts from the base model. Only the adapters train: 2 H m + H + m
parameters per site (plus 2 H with the layer norm, plus 1 with a learned scale).
Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", https://arxiv.org/abs/1902.00751;
Pfeiffer et al. 2021, "AdapterFusion", https://arxiv.org/abs/2005.00247 (the after-MLP-only placement);
He et al. 2021, "Towards a Unified View of Parameter-Efficient Transfer Learning", https://arxiv.org/abs/2110.04366
(parallel adapters). The modules and the file format are in ``tunelab.techniques.bottleneck``; the result is
``adapter/adapter_config.json`` (type ``tunelab-bottleneck``) + ``adapter/adapter_model.safetensors``, which
``tunelab.load_adapter(base_model, folder)`` attaches to a plain transformers model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from torch import nn

from tunelab.errors import TechniqueError
from tunelab.settings import Settings
from tunelab.techniques import bottleneck as bn
from tunelab.techniques.base import NO_SCORE_HEAD, NOT_QUANTIZED, TUNELAB_ADAPTER_CARD, RunContext, Technique

MERGE_REFUSAL = ("a bottleneck adapter is not linear (W_up f(W_down h) has a non-linearity in the middle), so it "
                 "cannot be folded into the base weights, and no single model (merged safetensors, a quantized "
                 "model or a GGUF file) holds it; serve the run as it is with `tunelab serve RUN`, which puts the "
                 "adapter on the base")
SPEC_ATTRIBUTE = "_tunelab_bottleneck_spec"  # the spec travels with the model from prepare to save


class BottleneckOptions(Settings):
    """The settings of a bottleneck adapter, without a technique name (routing reuses them for new adapters)."""

    placement: Literal["houlsby", "pfeiffer", "parallel"] = Field(
        "pfeiffer", description="Where adapters go: 'houlsby' after attention and after the MLP (sequential), "
        "'pfeiffer' after the MLP only (sequential; half the parameters, about the same quality), 'parallel' beside "
        "the sub-layers of `locations`, scaled (He et al. 2021).",
    )
    locations: list[Literal["attention", "mlp"]] | None = Field(
        None, description="For placement 'parallel' only: the sub-layers the adapter runs beside (default ['mlp']).",
    )
    reduction_factor: float = Field(16, gt=0, description="Bottleneck size m = hidden size / reduction_factor "
                                    "(16 is the usual start; 8 or 4 add capacity).")
    bottleneck_size: int | None = Field(None, gt=0, description="Bottleneck size m itself; overrides reduction_factor.")
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = Field("relu", description="f between the projections.")
    scaling: float | Literal["learned"] | None = Field(
        None, description="s, the factor on the adapter's output: a number, or 'learned' (a trained scalar starting at "
        "1). None: 1 for sequential placements, 4 for parallel (He et al. 2021).",
    )
    layer_norm: bool = Field(False, description="A layer norm on the adapter's input (starts as the identity).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout inside the bottleneck, after f.")
    layers: list[int] | None = Field(
        None, description="Decoder layers that get adapters (negative counts from the top); None: every layer.",
    )

    @model_validator(mode="after")
    def _locations_only_for_parallel(self) -> "BottleneckOptions":
        if self.locations is not None and self.placement != "parallel":
            fixed = ", ".join(bn.PLACEMENTS[self.placement][1])
            raise ValueError(f"locations: placement '{self.placement}' always adapts {fixed}; locations choose the "
                             "sub-layers of placement 'parallel' only")
        if self.locations is not None and not self.locations:
            raise ValueError("locations: give at least one of 'attention', 'mlp'")
        return self

    def spec(self, model: nn.Module) -> bn.BottleneckSpec:
        return bn.plan_spec(model, self.placement, self.locations, self.layers, self.reduction_factor,
                            self.bottleneck_size, non_linearity=self.non_linearity, scaling=self.scaling,
                            layer_norm=self.layer_norm, dropout=self.dropout)


class AdapterSettings(BottleneckOptions):
    name: Literal["adapter"] = Field("adapter", description="Bottleneck adapter layers (Houlsby, Pfeiffer or parallel).")


def prepare(model: nn.Module, settings: AdapterSettings, context: RunContext | None = None) -> nn.Module:
    spec = settings.spec(model)
    bn.add_adapter(model, spec)
    bn.freeze_all_but_adapters(model)
    setattr(model, SPEC_ATTRIBUTE, spec)
    return model


def save(model: nn.Module, run_dir: Path) -> Path:
    spec = getattr(model, SPEC_ATTRIBUTE, None)
    if spec is None:
        raise TechniqueError("this model has no bottleneck adapter to save (it was not prepared by technique 'adapter')")
    return bn.save_adapter(model, spec, run_dir / "adapter")


def attach(model: nn.Module, folder: Path) -> nn.Module:
    """The saved adapter attached to ``model`` in place (its base weights untouched)."""
    setattr(model, SPEC_ATTRIBUTE, bn.load_bottleneck(model, folder))
    return model


TECHNIQUE = Technique(
    name="adapter",
    config_class=AdapterSettings,
    prepare=prepare,
    save=save,
    result_dir_name="adapter",
    default_learning_rate=1e-3,
    summary="bottleneck adapter layers inside the frozen model (Houlsby, Pfeiffer or parallel; not mergeable)",
    refuses={"merge": MERGE_REFUSAL, "quantized_base": NOT_QUANTIZED, "score_head": NO_SCORE_HEAD},
    variant_names={"bottleneck": {}, "bottleneck_adapter": {}, "houlsby": {"placement": "houlsby"},
                   "pfeiffer": {"placement": "pfeiffer"}, "parallel_adapter": {"placement": "parallel"}},
    variant_label=lambda settings: settings.placement,
    adapter_types=(bn.BOTTLENECK_TYPE,),
    attach=attach,
    card=TUNELAB_ADAPTER_CARD,
)
