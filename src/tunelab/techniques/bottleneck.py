"""Bottleneck adapter layers: the modules, where they attach, and their plain file format.

A bottleneck adapter maps a hidden state h (..., H) through a small bottleneck of size m << H:
    a(h) = s * W_up f(W_down LN(h))        W_down (m, H), W_up (H, m), f a non-linearity, LN optional
and is attached to a transformer sub-layer F (attention or MLP) in one of two ways:
    sequential:  y = F(x) + a(F(x))        (Houlsby et al. 2019: after attention and after the MLP;
                                            Pfeiffer et al. 2021: after the MLP only)
    parallel:    y = F(x) + a(x)           (He et al. 2021: a scaled bottleneck beside the sub-layer)
W_up starts at zero, so a(.) = 0 and the model is exactly the base model at step 0.

Why tunelab writes this itself: AdapterHub's ``adapters`` 1.3 pins transformers 4.57, and PEFT's registry only
accepts names from its closed ``PeftType`` enum. The design follows PEFT's: the adapters are child modules whose
parameter names all contain ``ADAPTER_MARKER``, which is what freezing, saving and loading go by; the base
modules are never replaced (a forward hook adds the adapter's output), so ``remove`` gives back the base model
exactly, with its original parameter names.

Several named adapters can sit at one site; the active ones are summed, or weighted per token by a router
(``tunelab.techniques.routing``) when the site has a gate source.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from tunelab.errors import TechniqueError
from tunelab.techniques.base import ADAPTER_CONFIG

ADAPTER_MARKER = "bottleneck_adapters"  # the attribute holding a site's adapters: in every adapter parameter name
CONFIG_NAME = ADAPTER_CONFIG
WEIGHTS_NAME = "adapter_model.safetensors"
BOTTLENECK_TYPE = "tunelab-bottleneck"
FORMAT_VERSION = 1
PLACEMENTS = {  # placement -> (mode, default locations)
    "houlsby": ("sequential", ("attention", "mlp")),
    "pfeiffer": ("sequential", ("mlp",)),
    "parallel": ("parallel", ("mlp",)),
}
DEFAULT_SCALING = {"sequential": 1.0, "parallel": 4.0}  # He et al. 2021 scale the parallel adapter by s = 4
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


@dataclass
class BottleneckSpec:
    """Everything needed to rebuild a bottleneck adapter on a base model (saved as adapter_config.json)."""

    placement: str
    locations: list[str]
    layers: list[int]  # resolved decoder layer indices
    hidden_size: int
    bottleneck_size: int
    non_linearity: str = "relu"
    scaling: float | str = 1.0  # a number, or "learned" (a trained scalar starting at 1)
    layer_norm: bool = False
    dropout: float = 0.0
    attention_module: str = ""  # the child names found in each decoder layer, for the record
    mlp_module: str = ""
    type: str = BOTTLENECK_TYPE
    format_version: int = FORMAT_VERSION
    base_model_name_or_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return PLACEMENTS[self.placement][0]

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> "BottleneckSpec":
        if data.get("type") != BOTTLENECK_TYPE:
            raise TechniqueError(f"{where}: type is {data.get('type')!r}, not a tunelab bottleneck adapter ({BOTTLENECK_TYPE!r})")
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise TechniqueError(f"{where}: format_version {data['format_version']} is newer than this tunelab reads "
                                 f"({FORMAT_VERSION}); update tunelab")
        known = set(cls.__dataclass_fields__)
        try:
            spec = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise TechniqueError(f"{where}: {exc}") from None
        if spec.placement not in PLACEMENTS or spec.non_linearity not in ACTIVATIONS:
            raise TechniqueError(f"{where}: unknown placement {spec.placement!r} or non_linearity {spec.non_linearity!r}")
        return spec


class Bottleneck(nn.Module):
    """One adapter at one site: s * up(f(down(LN(h)))), parameters in float32 whatever the base's dtype."""

    def __init__(self, spec: BottleneckSpec) -> None:
        super().__init__()
        hidden, size = spec.hidden_size, spec.bottleneck_size
        self.norm = nn.LayerNorm(hidden) if spec.layer_norm else nn.Identity()  # starts as the identity map
        self.down = nn.Linear(hidden, size)  # PyTorch's default (Kaiming-uniform) init
        self.act = ACTIVATIONS[spec.non_linearity]()
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout else nn.Identity()
        self.up = nn.Linear(size, hidden)
        nn.init.zeros_(self.up.weight)  # zero output at step 0: the adapted model starts as the base model
        nn.init.zeros_(self.up.bias)
        if spec.scaling == "learned":
            self.scale = nn.Parameter(torch.ones(()))
        else:
            self.register_buffer("scale", torch.tensor(float(spec.scaling)), persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (..., H) -> (..., H)
        x = hidden.to(self.down.weight.dtype)
        return self.scale * self.up(self.dropout(self.act(self.down(self.norm(x)))))


class Site(nn.Module):
    """The adapters at one sub-layer, and the forward hook that adds their output to the sub-layer's.

    Each adapter has its mode: a sequential one reads the sub-layer's output F(x), a parallel one its input x;
    both read the sub-layer's own values, so adapters of both modes can share a site (routing over a Pfeiffer
    and a parallel adapter) and each computes what it computed in its own run. ``gate`` (set by routing)
    returns the current gates (B, T, E) and ``gate_index`` maps an adapter name to its column; without a gate,
    the active adapters are summed (PEFT's behaviour for several active adapters)."""

    def __init__(self, layer: int, location: str) -> None:
        super().__init__()
        self.layer, self.location = layer, location
        self.adapters = nn.ModuleDict()
        self.modes: dict[str, str] = {}  # adapter name -> "sequential" | "parallel"
        self.enabled = True
        self.active: list[str] = []
        self.gate: Callable[[], torch.Tensor | None] | None = None
        self.gate_index: dict[str, int] = {}
        self.handle: Any = None

    def add(self, name: str, adapter: Bottleneck, mode: str, activate: bool = True) -> None:
        self.adapters[name] = adapter
        self.modes[name] = mode
        if activate:
            self.active.append(name)

    def delta(self, output: torch.Tensor, source: torch.Tensor) -> torch.Tensor | None:
        """sum_e g_e a_e(.) over the active adapters, (B, T, H); ``output`` F(x), ``source`` x."""
        names = [n for n in self.active if n in self.adapters]
        if not names:
            return None
        gates = self.gate() if self.gate is not None else None  # (B, T, E)
        total = None
        for name in names:
            out = self.adapters[name](output if self.modes[name] == "sequential" else source)
            if gates is not None:
                out = out * gates[..., self.gate_index[name]].unsqueeze(-1).to(out.dtype)
            total = out if total is None else total + out
        return total

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not self.enabled:
            return None  # None: the sub-layer's output is used unchanged
        hidden = output[0] if isinstance(output, tuple) else output  # (B, T, H)
        delta = self.delta(hidden, args[0] if args else kwargs.get("hidden_states", hidden))
        if delta is None:
            return None
        new = hidden + delta.to(hidden.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new


# ---------------------------------------------------------------- finding the sites


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks: the longest ModuleList (works across decoder architectures)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise TechniqueError("this model has no list of decoder layers to attach adapters to")
    return max(lists, key=len)


def hidden_size(model: nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise TechniqueError("cannot tell the model's hidden size (no hidden_size, n_embd or d_model in its config)")


def sublayer_name(layer: nn.Module, location: str) -> str:
    """The child of a decoder layer that is its attention (or MLP) block, by the names architectures use."""
    names = ATTENTION_NAMES if location == "attention" else MLP_NAMES
    children = [name for name, _ in layer.named_children()]
    found = next((n for n in names if n in children), None)
    if found is None:
        raise TechniqueError(f"no {location} block found in {type(layer).__name__} (looked for {', '.join(names)}; "
                             f"its children are {', '.join(children)})")
    return found


def resolve_layers(requested: list[int] | None, count: int, key: str = "technique.layers") -> list[int]:
    if requested is None:
        return list(range(count))
    bad = [i for i in requested if not -count <= i < count]
    if bad:
        raise TechniqueError(f"{key}: {bad} out of range for a model with {count} layers")
    return sorted({i % count for i in requested})


def model_base_path(model: nn.Module) -> str | None:
    return getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)


def plan_spec(model: nn.Module, placement: str, locations: list[str] | None, layers: list[int] | None,
              reduction_factor: float, bottleneck_size: int | None, **options: Any) -> BottleneckSpec:
    """The spec of a new adapter on ``model`` from user settings (checks that every site exists)."""
    stack = decoder_layers(model)
    mode, default_locations = PLACEMENTS[placement]
    where = list(locations or default_locations)
    size = hidden_size(model)
    chosen = resolve_layers(layers, len(stack))
    names = {loc: sublayer_name(stack[chosen[0]], loc) for loc in where} if chosen else {}
    scaling = options.pop("scaling", None)
    return BottleneckSpec(
        placement=placement, locations=where, layers=chosen, hidden_size=size,
        bottleneck_size=bottleneck_size or max(1, math.floor(size / reduction_factor)),
        scaling=DEFAULT_SCALING[mode] if scaling is None else scaling,
        attention_module=names.get("attention", ""), mlp_module=names.get("mlp", ""),
        base_model_name_or_path=model_base_path(model), **options,
    )


# ---------------------------------------------------------------- attach, enable, disable, remove


def sites(model: nn.Module) -> list[Site]:
    return [m for m in model.modules() if isinstance(m, Site)]


def add_adapter(model: nn.Module, spec: BottleneckSpec, name: str = "default", activate: bool = True) -> list[Site]:
    """Attach a new adapter called ``name`` at every site ``spec`` names; returns the sites it lives at."""
    stack = decoder_layers(model)
    if spec.hidden_size != hidden_size(model):
        raise TechniqueError(f"adapter {name!r} was made for hidden size {spec.hidden_size}, this model has {hidden_size(model)}")
    if spec.layers and max(spec.layers) >= len(stack):
        raise TechniqueError(f"adapter {name!r} uses layer {max(spec.layers)}, this model has {len(stack)} layers")
    out = []
    for index in spec.layers:
        for location in spec.locations:
            sublayer = getattr(stack[index], sublayer_name(stack[index], location))
            site = _site_of(sublayer, index, location)
            if name in site.adapters:
                raise TechniqueError(f"an adapter called {name!r} is already attached at layer {index} {location}")
            # created on the base's device, in float32: bf16 adapter weights would round away small updates
            device = next((p.device for p in sublayer.parameters()), torch.device("cpu"))
            site.add(name, Bottleneck(spec).to(device=device, dtype=torch.float32), spec.mode, activate)
            out.append(site)
    return out


def _site_of(sublayer: nn.Module, layer: int, location: str) -> Site:
    site = getattr(sublayer, ADAPTER_MARKER, None)
    if site is None:
        site = Site(layer, location)
        setattr(sublayer, ADAPTER_MARKER, site)  # a child module: its parameters carry the marker in their names
        site.handle = sublayer.register_forward_hook(site.hook, with_kwargs=True)
    return site


def set_enabled(model: nn.Module, enabled: bool) -> None:
    """Disable (or enable again) every adapter: disabled, the model computes exactly the base model's outputs."""
    for site in sites(model):
        site.enabled = enabled


def remove_adapters(model: nn.Module) -> nn.Module:
    """Detach every adapter and its hook: the model is the base model again, module for module."""
    for module in list(model.modules()):
        site = getattr(module, ADAPTER_MARKER, None)
        if isinstance(site, Site):
            site.handle.remove()
            delattr(module, ADAPTER_MARKER)
    return model


def is_adapter_parameter(name: str) -> bool:
    return f"{ADAPTER_MARKER}." in name


def freeze_all_but_adapters(model: nn.Module) -> None:
    """PEFT's rule: a parameter trains if and only if its name marks it as an adapter's."""
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_parameter(name))


# ---------------------------------------------------------------- the file format


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under architecture-neutral keys: ``layers.<i>.<location>.<param>``."""
    state = {}
    for site in sites(model):
        if name in site.adapters:
            for key, tensor in site.adapters[name].state_dict().items():
                state[f"layers.{site.layer}.{site.location}.{key}"] = tensor.detach().cpu().contiguous()
    return state


def _state_keys(model: nn.Module, name: str) -> set[str]:
    return {f"layers.{site.layer}.{site.location}.{key}" for site in sites(model) if name in site.adapters
            for key in site.adapters[name].state_dict()}


def load_adapter_state(model: nn.Module, name: str, state: dict[str, torch.Tensor], where: str) -> None:
    expected = _state_keys(model, name)  # names only: on a meta-device skeleton the tensors hold no data
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise TechniqueError(f"{where}: the weights do not match the adapter config (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    for site in sites(model):
        if name in site.adapters and not site.adapters[name].down.weight.is_meta:  # a skeleton holds no values
            prefix = f"layers.{site.layer}.{site.location}."
            own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            site.adapters[name].load_state_dict(own)


def save_adapter(model: nn.Module, spec: BottleneckSpec, folder: Path, name: str = "default") -> Path:
    """Write ``folder/adapter_config.json`` and ``folder/adapter_model.safetensors``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(model, name), str(folder / WEIGHTS_NAME), metadata={"format": "pt", "type": spec.type})
    (folder / CONFIG_NAME).write_text(json.dumps(asdict(spec), indent=2) + "\n")
    return folder


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise TechniqueError(f"{folder}: no {CONFIG_NAME}; expected a folder written by a tunelab adapter run")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TechniqueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise TechniqueError(f"{path}: expected a JSON object")
    return data


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise TechniqueError(f"{folder}: no {WEIGHTS_NAME}")
    return load_file(str(path))


def load_bottleneck(model: nn.Module, folder: Path, name: str = "default", activate: bool = True) -> BottleneckSpec:
    """Attach the adapter saved in ``folder`` to ``model`` (in place) and return its spec."""
    spec = BottleneckSpec.from_dict(read_config(folder), str(Path(folder) / CONFIG_NAME))
    add_adapter(model, spec, name, activate)
    load_adapter_state(model, name, read_weights(folder), str(folder))
    return spec
