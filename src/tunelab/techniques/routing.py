"""Routing over several adapters: a learned router per decoder layer that weights the adapters' outputs.

For a decoder layer with input hidden states h_t (t = 1..T) and E named adapters (experts), the router computes
    z_t = W_r x_t,  x_t = rms(h_t) - c                   W_r (E, H); rms(h) = h / sqrt(mean(h^2)) (scale-free)
                                                         c (H,): the mean input on the training data (``calibrate``)
    per token:     g_t = softmax(z_t / tau)
    per sequence:  g_t = softmax(zbar_t / tau),   zbar_t = mean_{s <= t, s in t's example} z_s
    per prompt:    g_t = softmax(zbar_P / tau),   zbar_P = mean_{s in P} z_s,  P = the prompt of t's example
    top-k:         the E - k smallest entries of z / tau are set to -inf before the softmax
and every adapted site in that layer adds sum_e g_{t,e} * delta_e instead of the plain sum. c is measured once on
the training data before the first step, over what the gate pools, and saved with the router: the raw input is
mostly a component every example shares, which steers a new router's first steps the same way for every task
(see ``calibrate``). Sequence gating
is causal (a prefix mean restarted at each example's first position), so packed rows and generation with a KV
cache see the same gates as training. Prompt gating gives every token of an example, the prompt's own tokens
included, the one gate of its prompt: the tokens before the example's first supervised token when the forward
carries the batch's shifted targets (training and loss evaluation), else every token of the call (generation's
first pass is the prompt); decoding steps keep the gate of their prompt. Measured on two toy tasks whose prompts
share a chat-template prefix, a causal gate routes that prefix before the task is known (count -> count 0.77 on
the prompt tokens, 0.99 on the answer), and the answer then reads keys and values its adapter never produced;
the prompt gate routes the whole example (see tests/test_adapter_routing.py). A bottleneck expert's delta_e is its adapter output; a LoRA expert's is
s_e B_e A_e x at each linear layer it adapts.

This is AdapterFusion's idea (Pfeiffer et al. 2021, https://arxiv.org/abs/2005.00247: a learned, per-layer
combination of frozen task adapters) with X-LoRA's mixture over frozen LoRA experts (Buehler & Buehler 2024,
https://arxiv.org/abs/2402.07148) and Polytropon's joint training of skills and routing (Ponti et al. 2023,
https://arxiv.org/abs/2202.13914). tunelab writes the router itself because it must mix bottleneck and LoRA
experts, and because PEFT's X-LoRA (LoRA only, a second full forward pass per step) and Poly (task-id routing over
skills trained from scratch, no named pre-trained adapters) each cover only one of the modes asked for here.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tunelab import distributed
from tunelab.data.batching import collate
from tunelab.data.tokenize import IGNORE, TokenizedExample
from tunelab.errors import TechniqueError
from tunelab.techniques import bottleneck as bn

ROUTER_MARKER = "adapter_router"  # attribute of a decoder layer holding its router
LORA_MARKER = "routed_lora"  # attribute of a linear layer holding its LoRA experts
ROUTING_TYPE = "tunelab-routing"
FORMAT_VERSION = 2  # 2: routers carry the centre of their input


# ---------------------------------------------------------------- the router


class Router(nn.Module):
    """Gates (B, T, E) for one decoder layer, computed by a forward pre-hook from the layer's input."""

    def __init__(self, hidden: int, experts: int, gating: str, top_k: int | None, temperature: float, layer: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, experts)
        # small random weights: near-uniform gates at the start, but no exact ties for top-k to break by index
        nn.init.normal_(self.proj.weight, std=0.1 / math.sqrt(hidden))
        nn.init.zeros_(self.proj.bias)
        self.gating, self.top_k, self.temperature, self.layer = gating, top_k, temperature, layer
        self.current: torch.Tensor | None = None  # (B, T, E), read by the layer's sites
        self.targets: torch.Tensor | None = None  # (B, T) shifted targets of this forward, set by the model's pre-hook
        self.carry: tuple[torch.Tensor, torch.Tensor] | None = None  # (sum (B, E), count (B,)) of the last segment
        self.recording: list[torch.Tensor] | None = None  # set by routing_split: every forward's gates
        self.forced: int | None = None  # set by routing_split: the whole gate on this expert (each expert alone)
        self.stat_sum = torch.zeros(experts)  # gate mass per expert over the training forwards since the last read
        self.stat_count = 0
        self.handle: Any = None
        # The router reads rms(h) - centre: the mean input ``calibrate`` measures on the training data before the
        # first step, saved with the router. Zero until then (and in results saved before it existed).
        self.register_buffer("centre", torch.zeros(hidden))  # (H,)
        self.calibrating: list[torch.Tensor] | None = None  # set by calibrate: the pooled inputs of every forward

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]  # (B, T, H)
        self.current = self.gates(hidden, kwargs.get("position_ids"))
        return None

    def gates(self, hidden: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.forced is not None:  # one expert alone: its gate is 1 at every token (B, T, E), nothing recorded
            one_hot = F.one_hot(torch.tensor(self.forced, device=hidden.device), self.proj.out_features)
            return one_hot.to(self.proj.weight.dtype).expand(*hidden.shape[:2], -1)
        x = self.features(hidden)  # (B, T, H)
        if self.calibrating is not None:  # measuring the inputs the gate pools; every expert weighs the same meanwhile
            self.calibrating.append(self._pooled(x, position_ids).detach().float())
            return torch.full((*hidden.shape[:2], self.proj.out_features), 1 / self.proj.out_features,
                              dtype=self.proj.weight.dtype, device=hidden.device)
        logits = self._pooled(self.proj(x), position_ids) / self.temperature  # (B, T, E)
        gates = F.softmax(logits, dim=-1)  # (B, T, E)
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            chosen = logits.topk(self.top_k, dim=-1).indices
            keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, chosen, True)
            sparse = F.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)
            # a chosen weight may underflow to 0: keep exactly k non-zero weights, summing to 1
            sparse = torch.where(keep, sparse.clamp_min(1e-12), torch.zeros_like(sparse))
            sparse = sparse / sparse.sum(-1, keepdim=True)
            # straight-through: the value is the sparse gate, the gradient the dense softmax's, so the router
            # still learns (with k = 1 the sparse gate is the constant 1 and would pass no gradient at all)
            gates = gates + (sparse - gates).detach()
        if self.training and torch.is_grad_enabled():
            self.stat_sum = self.stat_sum.to(gates.device) + gates.detach().sum(dim=(0, 1)).float()
            self.stat_count += gates.shape[0] * gates.shape[1]
        if self.recording is not None:
            self.recording.append(gates.detach().float().cpu())
        return gates

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        """The router's input (B, T, H): the layer input made scale-free (rms), then centred."""
        x = hidden.to(self.proj.weight.dtype)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x - self.centre

    def _pooled(self, values: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        """What each token's gate reads (B, T, D): its own values, or their mean over its example so far or over
        its prompt. The mean is linear, so pooling the logits equals the logits of the pooled input."""
        if self.gating == "sequence":
            return self._prefix_mean(values, position_ids)
        if self.gating == "prompt":
            return self._prompt_mean(values, position_ids)
        return values

    def _prefix_mean(self, logits: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        """Mean of the logits over each example's tokens so far (B, T, E); an example starts at position 0."""
        batch, length, _ = logits.shape
        index = torch.arange(length, device=logits.device).expand(batch, length)
        if position_ids is None:
            starts = index == 0
        else:
            starts = position_ids.expand(batch, length) == 0
        last_start = torch.where(starts, index, torch.full_like(index, -1)).cummax(dim=1).values  # (B, T)
        totals = logits.cumsum(dim=1)  # (B, T, E)
        before = totals - logits
        seg = last_start.clamp(min=0)
        offset = before.gather(1, seg.unsqueeze(-1).expand_as(logits))
        count = (index - seg + 1).to(logits.dtype).unsqueeze(-1)  # (B, T, 1)
        continued = (last_start < 0).unsqueeze(-1)  # tokens continuing the previous call's sequence (KV-cache decoding)
        carry = self.carry if self.carry is not None and self.carry[0].shape[0] == batch else None
        if carry is not None and bool(continued.any()):
            offset = torch.where(continued, -carry[0].to(logits.dtype).unsqueeze(1), offset)
            count = torch.where(continued, count + carry[1].to(logits.dtype).view(batch, 1, 1), count)
        mean = (totals - offset) / count
        if not self.training:  # remember the running sum for the next decoding step
            self.carry = (mean[:, -1] * count[:, -1], count[:, -1, 0])
        return mean

    def _prompt_mean(self, logits: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        """Every token gets the mean logit over its example's prompt (B, T, E). The prompt: the tokens up to and
        including the first one whose target is supervised (it predicts the answer's first token), or all of the
        example's tokens in this call when there are no targets. Tokens continuing the previous call's example
        (decoding with a KV cache) keep that example's prompt mean."""
        batch, length, _ = logits.shape
        index = torch.arange(length, device=logits.device).expand(batch, length)  # (B, T)
        starts = index == 0 if position_ids is None else position_ids.expand(batch, length) == 0
        last_start = torch.where(starts, index, torch.full_like(index, -1)).cummax(dim=1).values  # (B, T)
        continued = last_start < 0  # before this call's first example start: the previous call's example
        segment = last_start.clamp(min=0)  # (B, T): index of the token's example start (continued tokens: 0)
        if self.targets is None:
            in_prompt = torch.ones_like(index, dtype=torch.bool)
        else:
            supervised = (self.targets.to(logits.device) != IGNORE).long()  # (B, T)
            seen = supervised.cumsum(dim=1) - supervised  # supervised targets before t in the row
            in_prompt = (seen - seen.gather(1, segment)) == 0  # none yet in t's example
        weight = in_prompt.to(logits.dtype).unsqueeze(-1)  # (B, T, 1)
        sums = torch.zeros_like(logits).scatter_add(1, segment.unsqueeze(-1).expand_as(logits), logits * weight)
        counts = torch.zeros_like(weight).scatter_add(1, segment.unsqueeze(-1), weight)  # (B, T, 1) at starts
        mean = sums.gather(1, segment.unsqueeze(-1).expand_as(logits)) / counts.gather(1, segment.unsqueeze(-1)).clamp(min=1)
        carry = self.carry if self.carry is not None and self.carry[0].shape[0] == batch else None
        if carry is not None and bool(continued.any()):
            mean = torch.where(continued.unsqueeze(-1), carry[0].to(logits.dtype).unsqueeze(1), mean)
        if not self.training:  # the prompt's mean, kept for the decoding steps that follow
            self.carry = (mean[:, -1], torch.ones(batch, device=logits.device))
        return mean

    def take_stats(self) -> list[float]:
        """The gate mass per expert since the last take (E values), then the positions it is over; then reset."""
        taken = [*self.stat_sum.double().tolist(), float(self.stat_count)]
        self.stat_sum, self.stat_count = torch.zeros_like(self.stat_sum), 0
        return taken


# ---------------------------------------------------------------- LoRA experts


class LoraExperts(nn.Module):
    """LoRA experts at one linear layer: adds sum_e g_e * s_e * B_e A_e x to its output (x: the layer's input)."""

    def __init__(self, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.A = nn.ParameterDict()  # name -> (r, d_in)
        self.B = nn.ParameterDict()  # name -> (d_out, r)
        self.scales: dict[str, float] = {}
        self.gate: Any = None
        self.gate_index: dict[str, int] = {}
        self.enabled = True
        self.handle: Any = None

    def hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not self.enabled or not len(self.A):
            return None
        x = args[0]
        gates = self.gate() if self.gate is not None else None  # (B, T, E)
        total = None
        for name in self.A:
            a, b = self.A[name], self.B[name]
            out = F.linear(F.linear(x.to(a.dtype), a), b) * self.scales[name]  # (B, T, d_out)
            if gates is not None:
                out = out * gates[..., self.gate_index[name]].unsqueeze(-1).to(out.dtype)
            total = out if total is None else total + out
        return output + total.to(output.dtype)


def _alpha_for(module_path: str, config: dict[str, Any]) -> float:
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module_path):  # PEFT's rule: a name or a regex on the module path
            return float(alpha)
    return float(config["lora_alpha"])


LORA_REFUSALS = {
    "use_dora": "DoRA rescales each weight row by a learned magnitude, which a weighted sum of experts cannot split",
    "modules_to_save": "its fully trained module copies cannot be weighted per token",
    "fan_in_fan_out": "Conv1D-style (transposed) weights are not supported here",
    "lora_bias": "LoRA biases are not supported here",
}


def lora_weights(folder: Path, where: str) -> tuple[dict[str, Any], dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
    """A PEFT LoRA adapter folder -> (its config, {module path: (A (r, in), B (out, r), scale)})."""
    from safetensors.torch import load_file

    config = bn.read_config(folder)
    if config.get("peft_type") != "LORA":
        raise TechniqueError(f"{where}: a PEFT {config.get('peft_type')} adapter; routing takes LoRA adapters and "
                             "tunelab bottleneck adapters")
    for key, reason in LORA_REFUSALS.items():
        if config.get(key):
            raise TechniqueError(f"{where}: {key} is set; routing cannot use it ({reason})")
    weights_path = Path(folder) / bn.WEIGHTS_NAME
    if not weights_path.is_file():
        raise TechniqueError(f"{where}: no {bn.WEIGHTS_NAME}")
    state = load_file(str(weights_path))
    out = {}
    for key, a in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        path = key.removesuffix(".lora_A.weight").removeprefix("base_model.model.")
        b = state[key.replace(".lora_A.weight", ".lora_B.weight")]
        rank = a.shape[0]
        alpha = _alpha_for(path, config)
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        out[path] = (a, b, scale)
    if not out:
        raise TechniqueError(f"{where}: no LoRA weights found in {weights_path}")
    return config, out


def add_lora_expert(model: nn.Module, name: str, weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
                    where: str) -> list[LoraExperts]:
    layer_of = {id(layer): i for i, layer in enumerate(bn.decoder_layers(model))}
    modules = dict(model.named_modules())
    sites = []
    for path, (a, b, scale) in weights.items():
        linear = modules.get(path)
        if not isinstance(linear, nn.Module) or not hasattr(linear, "weight"):
            raise TechniqueError(f"{where}: the adapter adapts {path!r}, which this model does not have (another base model?)")
        if tuple(linear.weight.shape) != (b.shape[0], a.shape[1]):
            raise TechniqueError(f"{where}: {path} is {tuple(linear.weight.shape)} here, the adapter was trained on "
                                 f"{(b.shape[0], a.shape[1])} (another base model?)")
        layer = next((layer_of[id(m)] for p, m in modules.items() if id(m) in layer_of and path.startswith(p + ".")), None)
        if layer is None:
            raise TechniqueError(f"{where}: {path} is outside the decoder layers; routing gates decoder layers only")
        site = getattr(linear, LORA_MARKER, None)
        if site is None:
            site = LoraExperts(layer)
            setattr(linear, LORA_MARKER, site)
            site.handle = linear.register_forward_hook(site.hook)
        device = linear.weight.device
        site.A[name] = nn.Parameter(a.to(device=device, dtype=torch.float32).clone())
        site.B[name] = nn.Parameter(b.to(device=device, dtype=torch.float32).clone())
        site.scales[name] = scale
        sites.append(site)
    return sites


# ---------------------------------------------------------------- assembling a routed model


@dataclass
class Expert:
    name: str
    kind: str  # "bottleneck" or "lora"
    config: dict[str, Any]  # a bottleneck spec, or {"scales": {module path: s}} for LoRA
    source: str = ""  # the run folder it came from ("" for a new adapter)


@dataclass
class RoutingSpec:
    experts: list[Expert]
    gating: str = "token"
    top_k: int | None = None
    temperature: float = 1.0
    mode: str = "router_only"
    layers: list[int] = field(default_factory=list)  # decoder layers with a router
    hidden_size: int = 0
    base_model_name_or_path: str | None = None
    centred_on: int = 0  # training examples the routers' input centre was measured on (0: none)

    def to_json(self) -> dict[str, Any]:
        return {"type": ROUTING_TYPE, "format_version": FORMAT_VERSION,
                "base_model_name_or_path": self.base_model_name_or_path,
                "router": {"gating": self.gating, "top_k": self.top_k, "temperature": self.temperature,
                           "layers": self.layers, "hidden_size": self.hidden_size,
                           "centred_on": self.centred_on},
                "mode": self.mode,
                "experts": [{"name": e.name, "kind": e.kind, "source": e.source, "config": e.config} for e in self.experts]}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> "RoutingSpec":
        if data.get("type") != ROUTING_TYPE:
            raise TechniqueError(f"{where}: type is {data.get('type')!r}, not a tunelab routing adapter ({ROUTING_TYPE!r})")
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise TechniqueError(f"{where}: format_version {data['format_version']} is newer than this tunelab reads")
        try:
            router = data["router"]
            experts = [Expert(e["name"], e["kind"], e["config"], e.get("source", "")) for e in data["experts"]]
            return cls(experts, router["gating"], router["top_k"], router["temperature"], data.get("mode", "router_only"),
                       router["layers"], router["hidden_size"], data.get("base_model_name_or_path"),
                       router.get("centred_on", 0))
        except (KeyError, TypeError) as exc:
            raise TechniqueError(f"{where}: malformed routing config ({exc})") from None


@contextmanager
def expert_alone(model: nn.Module, index: int) -> Iterator[None]:
    """Within it, every router gives expert ``index`` the whole gate: the model computes that expert alone."""
    layers = routers(model)
    for router in layers:
        router.forced = index
    try:
        yield
    finally:
        for router in layers:
            router.forced = None


def routers(model: nn.Module) -> list[Router]:
    return [m for m in model.modules() if isinstance(m, Router)]


def expert_sites(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (bn.Site, LoraExperts))]


def attach_experts(model: nn.Module, spec: RoutingSpec, state: dict[str, torch.Tensor] | None, where: str) -> None:
    """Attach every expert of ``spec`` (with weights from ``state``: keys ``experts.<name>.<key>``)."""
    for expert in spec.experts:
        own = {k.removeprefix(f"experts.{expert.name}."): v for k, v in (state or {}).items()
               if k.startswith(f"experts.{expert.name}.")}
        if expert.kind == "bottleneck":
            bspec = bn.BottleneckSpec.from_dict(expert.config, f"{where}: expert {expert.name!r}")
            bn.add_adapter(model, bspec, expert.name)
            if state is not None:
                bn.load_adapter_state(model, expert.name, own, f"{where}: expert {expert.name!r}")
        elif expert.kind == "lora":
            scales = expert.config["scales"]
            weights = {path: (own[f"{path}.lora_A"], own[f"{path}.lora_B"], scale) for path, scale in scales.items()}
            add_lora_expert(model, expert.name, weights, f"{where}: expert {expert.name!r}")
        else:
            raise TechniqueError(f"{where}: expert {expert.name!r} has unknown kind {expert.kind!r}")


def attach_routers(model: nn.Module, spec: RoutingSpec) -> None:
    """One router per decoder layer that holds an expert, wired to every expert site in that layer."""
    stack = bn.decoder_layers(model)
    index = {e.name: i for i, e in enumerate(spec.experts)}
    layers = sorted({s.layer for s in expert_sites(model)})
    spec.layers, spec.hidden_size = layers, bn.hidden_size(model)
    device = next(model.parameters()).device
    by_layer = {}
    for i in layers:
        router = Router(spec.hidden_size, len(spec.experts), spec.gating, spec.top_k, spec.temperature, i).to(device)
        setattr(stack[i], ROUTER_MARKER, router)
        router.handle = stack[i].register_forward_pre_hook(router.pre_hook, with_kwargs=True)
        by_layer[i] = router
    for site in expert_sites(model):
        router = by_layer[site.layer]
        site.gate = _reader(router)
        site.gate_index = index
    if spec.gating == "prompt":
        _pass_targets_to(model, list(by_layer.values()))


TARGETS_HOOK = "_tunelab_routing_targets_hook"


def _pass_targets_to(model: nn.Module, layer_routers: list[Router]) -> None:
    """Prompt gating must know where each example's prompt ends: the loss passes the batch's shifted targets to
    the forward (``tunelab_forward_inputs``), and this pre-hook hands them to the routers before transformers
    sees the call (a forward without them, as in generation, gets None: the whole call is prompt)."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        targets = kwargs.pop("targets", None)
        for router in layer_routers:
            router.targets = targets
        return args, kwargs

    setattr(model, TARGETS_HOOK, model.register_forward_pre_hook(hook, with_kwargs=True))
    model.tunelab_forward_inputs = ("targets",)


def _reader(router: Router) -> Any:
    return lambda: router.current


def routing_state(model: nn.Module, spec: RoutingSpec) -> dict[str, torch.Tensor]:
    """Every expert's and router's tensors: ``experts.<name>.<key>`` and ``router.layers.<i>.<param>``."""
    state: dict[str, torch.Tensor] = {}
    for expert in spec.experts:
        if expert.kind == "bottleneck":
            for key, tensor in bn.adapter_state(model, expert.name).items():
                state[f"experts.{expert.name}.{key}"] = tensor
    for path, module in model.named_modules():
        site = getattr(module, LORA_MARKER, None)
        if isinstance(site, LoraExperts):
            for name in site.A:
                state[f"experts.{name}.{path}.lora_A"] = site.A[name].detach().cpu().contiguous()
                state[f"experts.{name}.{path}.lora_B"] = site.B[name].detach().cpu().contiguous()
    for router in routers(model):
        for key, tensor in router.state_dict().items():
            state[f"router.layers.{router.layer}.{key}"] = tensor.detach().cpu().contiguous()
    return state


def save_routing(model: nn.Module, spec: RoutingSpec, folder: Path) -> Path:
    """The whole routed adapter (experts included, so the result stands alone without the source runs)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(routing_state(model, spec), str(folder / bn.WEIGHTS_NAME), metadata={"format": "pt", "type": ROUTING_TYPE})
    (folder / bn.CONFIG_NAME).write_text(json.dumps(spec.to_json(), indent=2) + "\n")
    return folder


def load_routing(model: nn.Module, folder: Path) -> RoutingSpec:
    """Attach a saved routed adapter (experts and routers) to ``model`` in place."""
    where = str(Path(folder) / bn.CONFIG_NAME)
    spec = RoutingSpec.from_json(bn.read_config(folder), where)
    state = bn.read_weights(folder)
    attach_experts(model, spec, state, where)
    attach_routers(model, spec)
    for router in routers(model):
        prefix = f"router.layers.{router.layer}."
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        own = {"centre": router.centre, **own}  # a format-1 router has no centre: it reads its input as trained, uncentred
        try:
            router.load_state_dict(own)
        except RuntimeError as exc:
            raise TechniqueError(f"{folder}: router weights of layer {router.layer} do not fit ({exc})") from None
    return spec


CALIBRATION_EXAMPLES = 128  # training examples the routers' input centre is measured on


@torch.no_grad()
def calibrate(model: nn.Module, examples: Sequence[TokenizedExample], pad_id: int, batch_size: int = 8) -> int:
    """Centre every router's input, x = rms(h) - c, on the mean c (H,) of what its gate pools (prompt gating: each
    example's prompt mean; else every token's input) over up to CALIBRATION_EXAMPLES training examples, measured
    once before the first step with every expert weighted the same (as a new router nearly does). A resumed run
    measures the same examples again, so it gets the same centre.

    Why (issue 19): a layer's hidden states share a large component across examples, and a chat template's
    prefix is the same tokens in every prompt (SmolLM2's default system prompt and header are 24 of a 43-token
    prompt, and their hidden states are identical, the model being causal): on SmolLM2 over the two shipped
    tasks, 99.2% of the prompt gate's input energy is the mean over examples. A linear router's gradient is then
    mostly along that shared vector, so each step moves every example's logits alike, and the first steps sent
    both tasks to one adapter. Centred, the input is what tells examples apart. Dividing by each dimension's
    spread as well was tried and dropped: the spread between examples is small (0.01-0.04 of the rms scale on the
    tiny test model), so it magnified the change that the earlier layers' gates make to the input, and the tiny
    model's router then split examples by that instead of by task.
    Returns the number of examples measured (0: none given; the routers stay as they are)."""
    layers = routers(model)
    if not examples or not layers:
        return 0
    count = min(len(examples), CALIBRATION_EXAMPLES)
    picked = [examples[i * len(examples) // count] for i in range(count)]  # spread over the data: every task
    device = next(model.parameters()).device
    sums = {id(r): torch.zeros(r.centre.shape[0], dtype=torch.float64) for r in layers}  # (H,) per router
    measured_count = 0
    was_training = model.training
    model.eval()
    for router in layers:
        router.centre.zero_()  # measure the raw input, also when measuring again
        router.calibrating = []
    try:
        for start in range(0, count, batch_size):
            batch = picked[start : start + batch_size]
            tensors = collate([[e] for e in batch], pad_id)
            measured = _measured_positions(batch, tensors["input_ids"].shape[1], layers[0].gating)  # (B, T)
            extra = {"targets": tensors["targets"].to(device)} if hasattr(model, TARGETS_HOOK) else {}
            model(input_ids=tensors["input_ids"].to(device), position_ids=tensors["position_ids"].to(device),
                  use_cache=False, **extra)
            for router in layers:
                sums[id(router)] += router.calibrating[0].cpu()[measured].double().sum(0)  # (N, H) summed
                router.calibrating = []
            measured_count += int(measured.sum())
    finally:
        for router in layers:
            router.calibrating, router.carry = None, None
        model.train(was_training)
    for router in layers:
        router.centre.copy_(sums[id(router)] / measured_count)
    return count


def _measured_positions(batch: Sequence[TokenizedExample], width: int, gating: str) -> torch.Tensor:
    """(B, T): the positions whose pooled router input is measured: each example's first (prompt gating: its
    one gate, read by all its tokens), else every token of the example (not its padding)."""
    chosen = torch.zeros(len(batch), width, dtype=torch.bool)
    for row, example in enumerate(batch):
        chosen[row, : 1 if gating == "prompt" else len(example.input_ids)] = True
    return chosen


def set_routing_enabled(model: nn.Module, enabled: bool) -> None:
    """Disable (or enable) every expert: disabled, the model computes exactly the base model's outputs."""
    for site in expert_sites(model):
        site.enabled = enabled


def remove_routing(model: nn.Module) -> nn.Module:
    """Detach routers, experts and their hooks: the base model again, module for module."""
    hook = getattr(model, TARGETS_HOOK, None)
    if hook is not None:
        hook.remove()
        delattr(model, TARGETS_HOOK)
        del model.tunelab_forward_inputs
    for module in list(model.modules()):
        for marker, kind in ((ROUTER_MARKER, Router), (LORA_MARKER, LoraExperts)):
            site = getattr(module, marker, None)
            if isinstance(site, kind):
                site.handle.remove()
                delattr(module, marker)
    return bn.remove_adapters(model)


def is_router_parameter(name: str) -> bool:
    return f"{ROUTER_MARKER}." in name


def is_expert_parameter(name: str) -> bool:
    return bn.is_adapter_parameter(name) or f"{LORA_MARKER}." in name


def gate_means(model: nn.Module, spec: RoutingSpec) -> dict[str, float] | None:
    """Mean gate per expert over the training forwards since the last call (the mean over router layers), then
    reset. Under several processes, over every process's forwards (the main's alone are 1/world of the step's):
    a collective, which every process makes at each step (the training loop's technique hook)."""
    layers = routers(model)
    if not layers:
        return None
    taken = distributed.sum_over_processes([value for r in layers for value in r.take_stats()])
    pooled = torch.tensor(taken, dtype=torch.float64).view(len(layers), -1)  # (L, E + 1): gate mass, positions
    seen = pooled[:, -1] > 0
    if not seen.any():
        return None
    mean = (pooled[seen, :-1] / pooled[seen, -1:]).mean(0)  # (E,)
    return {e.name: round(float(v), 4) for e, v in zip(spec.experts, mean)}
