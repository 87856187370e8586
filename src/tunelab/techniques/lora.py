"""LoRA: low-rank adapters on frozen linear layers, through PEFT, with its main variants as options.

For a frozen weight W0 (d_out, d_in), LoRA learns B (d_out, r) and A (r, d_in) with r << min(d_in, d_out):
    h = W0 x + s * B A x,   s = alpha / r          (B starts at zero, so training starts from the base model)
Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", https://arxiv.org/abs/2106.09685.
Options:
- rsLoRA (Kalajdzievski 2023, https://arxiv.org/abs/2312.03732): s = alpha / sqrt(r), stable at high rank.
- DoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353): W = m * (W0 + s B A) / ||W0 + s B A||_c, a learned
  magnitude m (d_out,) per output row on top of the low-rank direction update.
- PiSSA (Meng et al. 2024, https://arxiv.org/abs/2404.02948): A, B start from the top-r singular vectors of W0 and
  the residual W0 - s B A stays frozen; OLoRA (Buyukakyuz 2024, https://arxiv.org/abs/2406.01775) starts from a
  QR decomposition. Both change the frozen base, so the saved adapter is converted (to rank 2r) so that it
  applies to the original base.
- LoRA+ (Hayou et al. 2024, https://arxiv.org/abs/2402.12354): B learns at `loraplus_lr_ratio` times A's rate
  (with the reference code's grouping, see ``loraplus_param_groups``).
Trainable parameters per adapted layer: r * (d_in + d_out) (+ d_out with DoRA). The result is a standard PEFT
adapter (adapter_config.json + adapter_model.safetensors) that loads with ``peft.PeftModel.from_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from torch import nn

from tunelab import invariance
from tunelab.errors import TechniqueError
from tunelab.settings import Settings
from tunelab.techniques.base import (ADAPTER_CONFIG, RunContext, Technique, decay_param_groups, peft_disabled_view,
                                     peft_task_type, peft_wrapping)
from tunelab.techniques.freeze import decoder_layers

INITS = {"default": True, "gaussian": "gaussian", "pissa": "pissa_niter_16", "olora": "olora"}
# PiSSA and OLoRA rewrite the frozen base weights at initialisation; the saved adapter must be converted.
BASE_CHANGING_INITS = ("pissa", "olora")


class AdapterTargets(Settings):
    """Which linear layers an adapter wraps (shared by every weight-adapter technique)."""

    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Linear layers to adapt: 'all-linear' (every linear layer except the output head) or module "
        "names such as ['q_proj', 'v_proj'] (a single name is a list of one). Every name must match a module.",
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full and saved with the adapter, e.g. ['lm_head'] for a new output format. "
        "Costs their full size in trainable parameters.",
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, value: Any) -> Any:
        # PEFT reads a plain string as a regex; here `--set technique.target_modules=q_proj` means that one module.
        return [value] if isinstance(value, str) and value != "all-linear" else value

    def peft_targets(self) -> dict[str, Any]:
        return {"target_modules": self.target_modules, "modules_to_save": self.modules_to_save or None}


class LayeredTargets(AdapterTargets):
    """Adapter targets that can also be limited to some decoder layers."""

    layers_to_transform: list[int] | None = Field(
        None, description="Only adapt these decoder layer indices (0 is the lowest); None adapts every layer.",
    )

    def peft_targets(self) -> dict[str, Any]:
        return {**super().peft_targets(), "layers_to_transform": self.layers_to_transform}


class LoraOptions(LayeredTargets):
    """LoRA's settings without its name, so that QLoRA can reuse them."""

    r: int = Field(16, gt=0, description="Rank of the update B A. 8-64 is typical; higher adds capacity and memory.")
    alpha: float = Field(32, gt=0, description="Scale numerator: the update is multiplied by alpha / r (alpha / "
                         "sqrt(r) with rslora).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    use_dora: bool = Field(False, description="DoRA: learn a per-row magnitude and a low-rank direction update.")
    use_rslora: bool = Field(False, description="rsLoRA: scale by alpha / sqrt(r) instead of alpha / r (stable at high r).")
    init: Literal["default", "gaussian", "pissa", "olora"] = Field(
        "default",
        description="Initialisation of A and B. 'default': Kaiming A, zero B (starts at the base model); 'gaussian': "
        "Gaussian A scaled by 1/r, zero B; 'pissa': principal singular vectors of W0 (faster convergence); 'olora': "
        "QR of W0. pissa/olora change the frozen base; the saved adapter is converted to apply to the original base.",
    )
    loraplus_lr_ratio: float | None = Field(
        None, gt=0, description="LoRA+: B matrices (and 1-d adapter parameters such as DoRA's magnitudes) learn at "
        "this many times the learning rate (16 is the paper's default); None trains everything at one rate.",
    )
    loraplus_lr_embedding: float = Field(
        1e-6, gt=0, description="LoRA+: the fixed learning rate of adapters on an embedding layer (when "
        "target_modules names one), as in the paper's code and PEFT's create_loraplus_optimizer.",
    )
    rank_pattern: dict[str, int] = Field(
        default_factory=dict, description="Per-module ranks overriding r, keyed by a module name or regex, e.g. "
        "{'down_proj': 32}.",
    )
    alpha_pattern: dict[str, float] = Field(
        default_factory=dict, description="Per-module alphas overriding alpha, keyed like rank_pattern.",
    )

    @model_validator(mode="after")
    def _conversion_supports_the_options(self) -> "LoraOptions":
        if self.init in BASE_CHANGING_INITS and self.use_dora:
            raise ValueError(f"init '{self.init}' cannot be combined with use_dora: the saved adapter could not be "
                             "converted back to the original base")
        return self


class LoraSettings(LoraOptions):
    name: Literal["lora"] = Field("lora", description="Low-rank adapters on frozen linear layers (PEFT LoRA).")


def check_target_modules(model: nn.Module, names: list[str]) -> None:
    """Every listed name must match some module (PEFT only fails when *none* does, so a typo would go unseen)."""
    module_names = [name for name, _ in model.named_modules()]
    missing = [t for t in names if not any(m == t or m.endswith("." + t) for m in module_names)]
    if missing:
        linear = sorted({m.rsplit(".", 1)[-1] for m, mod in model.named_modules() if isinstance(mod, nn.Linear)})
        raise TechniqueError(f"technique.target_modules: {missing} match no module of this model; its linear "
                             f"layers are named {linear} (or use 'all-linear')")


def check_targets(model: nn.Module, settings: AdapterTargets) -> None:
    if settings.target_modules != "all-linear":
        check_target_modules(model, settings.target_modules)
    if settings.modules_to_save:
        check_target_modules(model, settings.modules_to_save)
    if getattr(settings, "layers_to_transform", None) is not None:
        n = len(decoder_layers(model))
        bad = [i for i in settings.layers_to_transform if not 0 <= i < n]
        if bad:
            raise TechniqueError(f"technique.layers_to_transform: {bad} out of range for a model with {n} layers (0..{n - 1})")


def wrap(model: nn.Module, peft_config: Any) -> nn.Module:
    """get_peft_model, with PEFT's refusals as TechniqueErrors."""
    from peft import get_peft_model

    try:
        with peft_wrapping():
            return get_peft_model(model, peft_config)
    except (ValueError, TypeError, NotImplementedError) as exc:  # e.g. a module type PEFT cannot adapt
        raise TechniqueError(f"technique: {exc}") from exc


def lora_config(settings: LoraOptions, task_type: str) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, use_dora=settings.use_dora,
        use_rslora=settings.use_rslora, init_lora_weights=INITS[settings.init], rank_pattern=settings.rank_pattern,
        alpha_pattern=settings.alpha_pattern, task_type=task_type, **settings.peft_targets(),
    )


def prepare(model: nn.Module, settings: LoraOptions, context: RunContext | None = None) -> nn.Module:
    check_targets(model, settings)
    on_meta = any(p.is_meta for p in model.parameters())
    if on_meta and settings.init in BASE_CHANGING_INITS:  # an SVD/QR of weights that are not there: count with the default init
        settings = settings.model_copy(update={"init": "default"})
    peft_model = wrap(model, lora_config(settings, peft_task_type(context)))
    if settings.init in BASE_CHANGING_INITS:
        # Keep the starting adapter: at save time PEFT needs it to turn (residual base, A, B) into an adapter
        # on the original base (rank 2r). Kept on the model so that it travels with it.
        from peft import get_peft_model_state_dict

        peft_model._tunelab_initial_adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    return peft_model


def save(model: nn.Module, run_dir: Path) -> Path:
    out = run_dir / "adapter"
    initial = getattr(model, "_tunelab_initial_adapter", None)
    if initial is None:
        model.save_pretrained(out, safe_serialization=True)
        return out
    import shutil

    from safetensors.torch import save_file

    init_dir = run_dir / "initial-adapter"  # inside the technique's temporary save folder; removed below
    init_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in initial.items()}, init_dir / "adapter_model.safetensors")
    model.save_pretrained(out, safe_serialization=True, path_initial_model_for_weight_conversion=str(init_dir))
    shutil.rmtree(init_dir)
    return out


def loraplus_param_groups(model: nn.Module, settings: LoraOptions, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """LoRA+ rates as the paper's code gives them (PEFT's ``create_loraplus_optimizer`` is that reference):
    B matrices and every trainable 1-d parameter (DoRA magnitudes, biases) at ratio x lr; an embedding layer's A
    and B at the fixed ``loraplus_lr_embedding``; the rest (A matrices, modules_to_save weights) at lr.
    Weight decay follows tunelab's rule (matrices only)."""
    from peft.tuners.lora.layer import Embedding as LoraEmbedding  # here, not at import: peft loads slowly

    if settings.loraplus_lr_ratio is None:
        return decay_param_groups(model, settings, lr, weight_decay)
    embedding = {id(p) for module in model.modules() if isinstance(module, LoraEmbedding)
                 for p in [*module.lora_embedding_A.parameters(), *module.lora_embedding_B.parameters()]}
    a, b, embedding_adapters = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in embedding:
            embedding_adapters.append(param)
        elif "lora_B" in name or param.ndim == 1:
            b.append(param)
        else:
            a.append(param)
    fast = lr * settings.loraplus_lr_ratio
    groups = [
        {"params": a, "weight_decay": weight_decay, "lr": lr},
        {"params": [p for p in b if p.ndim >= 2], "weight_decay": weight_decay, "lr": fast},
        {"params": [p for p in b if p.ndim < 2], "weight_decay": 0.0, "lr": fast},
        {"params": [p for p in embedding_adapters if p.ndim >= 2], "weight_decay": weight_decay,
         "lr": settings.loraplus_lr_embedding},
        {"params": [p for p in embedding_adapters if p.ndim < 2], "weight_decay": 0.0, "lr": settings.loraplus_lr_embedding},
    ]
    return [g for g in groups if g["params"]]


# Names users reach for (other libraries call these variants techniques of their own) -> the settings here.
VARIANT_NAMES: dict[str, dict[str, Any]] = {
    "dora": {"use_dora": True}, "rslora": {"use_rslora": True}, "pissa": {"init": "pissa"}, "olora": {"init": "olora"},
    "loraplus": {"loraplus_lr_ratio": 16}, "lora_plus": {"loraplus_lr_ratio": 16}, "lora+": {"loraplus_lr_ratio": 16},
}


def variant_label(settings: LoraOptions) -> str | None:
    """The variants these settings choose, e.g. 'dora, lora+' (None: plain LoRA)."""
    chosen = [label for label, on in (("dora", settings.use_dora), ("rslora", settings.use_rslora),
                                      (settings.init, settings.init in BASE_CHANGING_INITS),
                                      ("lora+", settings.loraplus_lr_ratio is not None)) if on]
    return ", ".join(chosen) or None
# ---------------------------------------------------------------- mixed-adapter batches in tunelab serve


class _StackedRows:
    """Rows of different LoRA adapters in one forward pass, with every adapted layer's adapters stacked.

    PEFT's per-row path (``adapter_names``) splits a layer's input (B, T, d_in) into one sub-batch per adapter,
    runs each adapter's A and B on it and adds the result back row by row: 2 small matrix products, a gather and
    a scatter per adapter, in every adapted layer of every forward pass. Here a layer holds its adapters' A
    matrices stacked, A_s (R, d_in) with R = r_1 + ... + r_n, and their B matrices side by side, B_s (d_out, R);
    each row keeps only its own adapter's rank columns, M (B, 1, R) is 1 there and 0 elsewhere, and its scaling
    s (B, 1, 1) multiplies after B as PEFT's does:

        h = W0 x + s * ((x A_s^T) * M) B_s^T

    two matrix products over the whole batch, whatever its mix. The terms of the other adapters are exact zeros,
    and a row of the base ('__base__', M = 0, s = 0) adds exactly 0. Measured on SmolLM2-135M with two adapters
    and the base (``docs/deployment.md``): a mixed prefill costs what a one-adapter prefill costs."""

    def __init__(self, layers: list[nn.Module], names: list[str]) -> None:
        self.layers, self.names = layers, names  # names: one PEFT adapter per row, refilled before each pass
        self.stacks: dict[int, tuple[tuple[str, ...], Any, Any, dict[str, tuple[int, int, float]]]] = {}
        self.masks: dict[tuple[Any, ...], tuple[Any, Any] | None] = {}  # (layer layout, rows' names) -> (M, s)

    def __enter__(self) -> _StackedRows:
        for layer in self.layers:  # an instance attribute shadows the class's forward until __exit__
            layer.forward = lambda x, *args, _layer=layer, **kwargs: self.forward(_layer, x, *args, **kwargs)
        return self

    def __exit__(self, *exc: Any) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)

    def stack(self, layer: nn.Module) -> tuple[tuple[str, ...], Any, Any, dict[str, tuple[int, int, float]]]:
        """The layer's adapters (names in order), A_s (R, d_in), B_s (d_out, R), and per adapter its first rank
        column, rank and scaling; rebuilt when an adapter is loaded or deleted."""
        import torch  # here, not at import: the CLI's start-up time (techniques are imported by --help)

        adapters = tuple(layer.lora_A.keys())
        found = self.stacks.get(id(layer))
        if found is None or found[0] != adapters:
            columns, start = {}, 0
            for name in adapters:
                columns[name] = (start, layer.r[name], layer.scaling[name])
                start += layer.r[name]
            a = torch.cat([layer.lora_A[name].weight for name in adapters])  # (R, d_in)
            b = torch.cat([layer.lora_B[name].weight for name in adapters], dim=1)  # (d_out, R)
            found = self.stacks[id(layer)] = (adapters, a, b, columns)
        return found

    def mask(self, key: tuple[Any, ...], columns: dict[str, tuple[int, int, float]], a: Any) -> tuple[Any, Any] | None:
        """The rows' M (B, 1, R) and s (B, 1, 1) for this pass (None: no row has an adapter in this layer), built
        once per layout and mix of rows."""
        if key not in self.masks:
            if len(self.masks) > 256:  # mixes come and go with the rows: keep the dictionary small
                self.masks.clear()
            rows = [columns.get(name) for name in self.names]
            if all(row is None for row in rows):
                self.masks[key] = None
            else:
                keep = a.new_zeros((len(rows), 1, a.shape[0]))
                scale = a.new_zeros((len(rows), 1, 1))
                for index, row in enumerate(rows):
                    if row is not None:
                        start, rank, scaling = row
                        keep[index, :, start:start + rank] = 1
                        scale[index] = scaling
                self.masks[key] = (keep, scale)
        return self.masks[key]

    def forward(self, layer: nn.Module, x: Any, *args: Any, **kwargs: Any) -> Any:

        if layer.training or kwargs.get("adapter_names") is not None:  # dropout would apply: PEFT's own path
            return type(layer).forward(layer, x, *args, **{"adapter_names": list(self.names), **kwargs})
        if x.shape[0] != len(self.names):  # a row without its adapter name would take another row's
            raise ValueError(f"{x.shape[0]} rows in the batch but {len(self.names)} adapter names")
        for key in PEFT_ROW_KWARGS:
            kwargs.pop(key, None)
        result = layer.base_layer(x, *args, **kwargs)  # (B, T, d_out)
        if layer.disable_adapters:
            return result
        adapters, a, b, columns = self.stack(layer)
        rows = self.mask((id(layer), adapters, tuple(self.names)), columns, a)
        if rows is None:
            return result
        keep, scale = rows
        pad = invariance.min_rows(layer.base_layer)  # a row-invariant model's products: as many rows as alone
        low = invariance.linear(x.to(a.dtype), a, min_rows=pad) * keep  # (B, T, R): each row's own rank columns
        # added in the adapters' dtype and rounded once, as PEFT's one-adapter forward does (what a row alone, or
        # offline generation, computes): over a bfloat16 base, rounding the float32 term first gave other tokens
        return (result + invariance.linear(low, b, min_rows=pad) * scale).to(result.dtype)


# Keyword arguments PEFT's LoRA layers take besides the input, which the base layer must not get.
PEFT_ROW_KWARGS = ("alora_offsets",)


def stacked_rows(model: nn.Module, names: list[str]) -> _StackedRows | None:
    """The ``row_forward`` of LoRA: ``_StackedRows`` over every LoRA layer of ``model``, or None (PEFT's per-row
    path) when one of them is not a plain LoRA linear layer (DoRA and the other variants, a LoRA bias, a merged
    adapter, an embedding or a quantized layer)."""
    from peft.tuners.lora.layer import LoraLayer, Linear  # here, not at import: peft loads slowly

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    plain = all(type(m) is Linear and not m.merged and not m.lora_variant and not any(m.use_dora.values())
                and not getattr(m, "fan_in_fan_out", False)
                and all(m.lora_B[name].bias is None for name in m.lora_B) for m in layers)
    return _StackedRows(layers, names) if layers and plain else None


DORA_ALONE = ("a DoRA adapter: PEFT refuses adapter_names (one batch shared by several adapters) when DoRA is "
              "enabled, so it is served alone")


def mixed_batch(folder: Path) -> str | None:
    """LoRA adapters share one batch in ``tunelab serve`` (PEFT's adapter_names), DoRA ones cannot."""
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    return DORA_ALONE if config.get("use_dora") else None


TECHNIQUE = Technique(
    name="lora",
    config_class=LoraSettings,
    prepare=prepare,
    save=save,
    disabled_view=peft_disabled_view,
    result_dir_name="adapter",
    default_learning_rate=2e-4,
    summary="low-rank adapters on frozen weights (small, fast, mergeable); DoRA, rsLoRA, PiSSA, LoRA+ as options",
    refuses={"quantized_base": "a 4/8-bit base is what technique 'qlora' loads: use it for LoRA on a quantized base"},
    param_groups=loraplus_param_groups,
    variant_names=VARIANT_NAMES,
    variant_label=variant_label,
    adapter_types=("LORA",),  # PEFT's peft_type
    mixed_batch=mixed_batch,
    row_forward=stacked_rows,
)
