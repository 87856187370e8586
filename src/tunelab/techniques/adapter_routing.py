"""Routing over several named adapters with a learned router (AdapterFusion / X-LoRA / Polytropon style).

Per decoder layer, a router turns the layer's input into gates g (B, T, E) over E adapters (experts), and each
adapted site adds sum_e g_e * delta_e instead of one adapter's delta:
    g_t = softmax(W_r x_t / tau)                              per token
    g_t = softmax(mean_{s <= t} W_r x_s / tau)                per sequence (causal prefix mean within the example)
    g_t = softmax(mean_{s in prompt} W_r x_s / tau)           per prompt (one gate for the whole example)
    x_t = rms(h_t) - c                                        c: the mean input over training examples
    top-k: all but the k largest logits are dropped before the softmax, so exactly k experts are used per token.
Two modes: ``router_only`` trains W_r over frozen, already trained adapters (AdapterFusion, Pfeiffer et al. 2021,
https://arxiv.org/abs/2005.00247; X-LoRA, Buehler & Buehler 2024, https://arxiv.org/abs/2402.07148), and
``joint`` trains the adapters and the router together (Polytropon, Ponti et al. 2023,
https://arxiv.org/abs/2202.13914), optionally with new, zero-initialised bottleneck adapters.
Experts are LoRA runs (PEFT adapters) and bottleneck adapter runs, named ``{name: run folder}``. The result,
``adapter/`` (type ``tunelab-routing``), holds the experts' weights too, so it loads without the source runs.
The modules are in ``tunelab.techniques.routing``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import yaml
from pydantic import Field, model_validator
from torch import nn

from tunelab.data import collate
from tunelab.data.pairs import TokenizedPair
from tunelab.data.tokenize import IGNORE, TokenizedExample
from tunelab.errors import TechniqueError
from tunelab.models import same_base_model
from tunelab.settings import Settings
from tunelab.techniques import bottleneck as bn
from tunelab.techniques import routing as rt
from tunelab.techniques.adapter import BottleneckOptions
from tunelab.techniques.base import (NO_SCORE_HEAD, NOT_QUANTIZED, TUNELAB_ADAPTER_CARD, FigureTable, RunContext, Technique,
                                     forward_inputs)

log = logging.getLogger(__name__)
SPEC_ATTRIBUTE = "_tunelab_routing_spec"
NAME = re.compile(r"^[A-Za-z0-9_-]+$")
MERGE_REFUSAL = ("the router's weights change with every token, so no single weight matrix equals the routed "
                 "model; serve it as base + routed adapter")


class AdapterRoutingSettings(Settings):
    name: Literal["adapter_routing"] = Field(
        "adapter_routing", description="Several named adapters combined by a learned router.")
    adapters: dict[str, str] = Field(
        default_factory=dict, description="Trained adapters to route between, {name: run folder}: finished runs of "
        "technique 'lora' or 'adapter' on this run's model (or their adapter/ folders). Relative paths are "
        "relative to the working directory, like output.dir.",
    )
    new_adapters: list[str] = Field(
        default_factory=list, description="Names of new bottleneck adapters, trained from zero together with the "
        "router (mode 'joint' only), shaped by `new_adapter`.",
    )
    new_adapter: BottleneckOptions = Field(default_factory=BottleneckOptions,
                                           description="Placement and size of the new adapters.")
    mode: Literal["router_only", "joint"] = Field(
        "router_only", description="'router_only': train only the router over frozen adapters; 'joint': train the "
        "adapters and the router together.",
    )
    gating: Literal["token", "sequence", "prompt"] = Field(
        "token", description="'token': a gate per token; 'sequence': the gate of the mean router logit over the "
        "example so far (causal, so generation sees the gates training saw); 'prompt': one gate per example, from "
        "the mean router logit over its prompt (the tokens before the first supervised one; in generation, the "
        "prompt given), used for every token of the example, the prompt's own included.",
    )
    top_k: int | None = Field(None, gt=0, description="Use only the k highest-scoring adapters per token (None: all).")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of the gates: below 1 sharper, above 1 flatter.")

    @model_validator(mode="after")
    def _a_routable_set(self) -> "AdapterRoutingSettings":
        names = list(self.adapters) + list(self.new_adapters)
        bad = [n for n in names if not NAME.match(n)]
        if bad:
            raise ValueError(f"adapter names {bad}: use letters, digits, '_' and '-' only")
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names must be unique across adapters and new_adapters (got {names})")
        if len(names) < 2:
            raise ValueError(f"routing needs at least two adapters (adapters and new_adapters give {len(names)})")
        if self.new_adapters and self.mode != "joint":
            raise ValueError("new_adapters need mode 'joint': a new adapter starts at zero, and frozen it would stay zero")
        if self.top_k is not None and self.top_k > len(names):
            raise ValueError(f"top_k={self.top_k} is more than the {len(names)} adapters")
        return self


# ---------------------------------------------------------------- reading the expert runs


def adapter_folder(source: str, key: str) -> Path:
    """A run folder's adapter/ (or the adapter folder itself), checked to hold an adapter."""
    path = Path(source).expanduser()
    if not path.exists():
        raise TechniqueError(f"{key}: {source} does not exist; give a finished run folder of technique 'lora' or 'adapter'")
    folder = path / "adapter" if (path / "adapter").is_dir() else path
    if not (folder / bn.CONFIG_NAME).is_file():
        raise TechniqueError(f"{key}: {source} holds no adapter ({folder / bn.CONFIG_NAME} is missing); is the run "
                             "finished, and of technique 'lora' or 'adapter'?")
    return folder


def _expert(model: nn.Module, name: str, source: str) -> rt.Expert:
    key = f"technique.adapters.{name}"
    folder = adapter_folder(source, key)
    config = bn.read_config(folder)
    if config.get("type") == bn.BOTTLENECK_TYPE:
        spec = bn.BottleneckSpec.from_dict(config, str(folder / bn.CONFIG_NAME))
        bn.add_adapter(model, spec, name)
        bn.load_adapter_state(model, name, bn.read_weights(folder), key)
        return rt.Expert(name, "bottleneck", asdict(spec), str(source))
    if "peft_type" in config:
        _, weights = rt.lora_weights(folder, key)
        rt.add_lora_expert(model, name, weights, key)
        return rt.Expert(name, "lora", {"scales": {p: s for p, (_, _, s) in weights.items()}}, str(source))
    raise TechniqueError(f"{key}: {folder} holds a {config.get('type')!r} adapter; routing takes LoRA and bottleneck adapters")


def _check_same_model(model: nn.Module, settings: AdapterRoutingSettings) -> None:
    """An adapter trained on another base model would load only if shapes happen to agree: compare the runs'
    configured model names with this model's (the shape checks catch the rest)."""
    here = bn.model_base_path(model)
    for name, source in settings.adapters.items():
        run_config = Path(source) / "config.yaml"
        if not run_config.is_file() or here is None:
            continue
        try:  # safe_load: a Python tag in another run's config is refused, never run
            theirs = ((yaml.safe_load(run_config.read_text()) or {}).get("model") or {}).get("name")
        except yaml.YAMLError as exc:
            raise TechniqueError(f"technique.adapters.{name}: {run_config} is not a readable run config ({exc})") from None
        if theirs and not same_base_model(theirs, here):
            raise TechniqueError(f"technique.adapters.{name}: that run trained on model {theirs!r}, this run uses "
                                 f"{here!r}; routed adapters must share the base model")


# ---------------------------------------------------------------- the technique


def prepare(model: nn.Module, settings: AdapterRoutingSettings, context: RunContext | None = None) -> nn.Module:
    _check_same_model(model, settings)
    experts = [_expert(model, name, source) for name, source in settings.adapters.items()]
    if settings.new_adapters:
        spec = settings.new_adapter.spec(model)
        for name in settings.new_adapters:
            bn.add_adapter(model, spec, name)
            experts.append(rt.Expert(name, "bottleneck", asdict(spec)))
    routing = rt.RoutingSpec(experts, settings.gating, settings.top_k, settings.temperature, settings.mode,
                             base_model_name_or_path=bn.model_base_path(model))
    rt.attach_routers(model, routing)
    if context is not None and context.examples:  # the centre of the routers' input, from the training data
        routing.centred_on = rt.calibrate(model, [_sequence(e) for e in context.examples], context.pad_id)
        log.info("router input centred on %d training examples", routing.centred_on)
    for name, param in model.named_parameters():
        param.requires_grad_(rt.is_router_parameter(name) or (settings.mode == "joint" and rt.is_expert_parameter(name)))
    setattr(model, SPEC_ATTRIBUTE, routing)
    return model


def _sequence(item: Any) -> TokenizedExample:
    """The token sequence a training item lays out: the example itself, a wrapped one's, a pair's chosen side."""
    if isinstance(item, TokenizedExample):
        return item
    return item.chosen if isinstance(item, TokenizedPair) else item.example


def save(model: nn.Module, run_dir: Path) -> Path:
    return rt.save_routing(model, _spec(model), run_dir / "adapter")


def _spec(model: nn.Module) -> rt.RoutingSpec:
    spec = getattr(model, SPEC_ATTRIBUTE, None)
    if spec is None:
        raise TechniqueError("this model has no adapter routing (it was not prepared by technique 'adapter_routing')")
    return spec


def attach(model: nn.Module, folder: Path) -> nn.Module:
    """The saved routing (its experts and routers) attached to ``model`` in place."""
    setattr(model, SPEC_ATTRIBUTE, rt.load_routing(model, folder))
    return model


def on_step(model: nn.Module, settings: AdapterRoutingSettings, step: int) -> dict[str, Any] | None:
    """The mean gate per adapter over this step's forward passes, for metrics.jsonl."""
    means = rt.gate_means(model, _spec(model))
    return {"gates": means} if means else None


ALIKE = 0.02  # experts whose losses on a task differ by less than this share give a router nothing to choose between
OWN_SHARE = 0.8  # the share of a task a router that has learned it sends to that task's best expert


def _token_losses(model: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Cross-entropy of every supervised position (B, T), 0 elsewhere, for the model as its routers are set."""
    extra = {k: v.to(device) for k, v in forward_inputs(model, tensors).items()}  # prompt gating: the targets
    logits = model(input_ids=tensors["input_ids"].to(device), position_ids=tensors["position_ids"].to(device),
                   use_cache=False, **extra).logits  # (B, T, V)
    targets = tensors["targets"].to(device)  # (B, T), IGNORE where not supervised
    losses = F.cross_entropy(logits.float().transpose(1, 2), targets.clamp(min=0), reduction="none")  # (B, T)
    return torch.where(targets != IGNORE, losses, torch.zeros_like(losses)).cpu()


@torch.no_grad()
def routing_split(model: nn.Module, examples: list[Any], tasks: list[str], pad_id: int, device: torch.device,
                  batch_size: int = 8) -> dict[str, Any]:
    """How the router splits the tokens of each task: the mean gate per adapter over the task's tokens and every
    router layer ({"all": ...} as well, and only that for data without tasks); and the token-mean loss of each
    task with the router's gates ("routed") and with each adapter alone, which says whether routing can help
    (``routing_verdict``)."""
    spec, layers = _spec(model), rt.routers(model)
    names = [e.name for e in spec.experts]
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    loss_sums: dict[str, dict[str, float]] = {}
    supervised: dict[str, int] = {}
    try:
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            tensors = collate([[e] for e in batch], pad_id)
            real = torch.zeros_like(tensors["input_ids"], dtype=torch.bool)  # (B, T): not padding
            for row, example in enumerate(batch):
                real[row, : len(example.input_ids)] = True
            for router in layers:
                router.recording = []
            losses = {"routed": _token_losses(model, tensors, device)}  # (B, T) each
            gates = torch.stack([router.recording[0] for router in layers]).mean(0)  # (B, T, E) averaged over layers
            for router in layers:
                router.recording = None
            for index, name in enumerate(names):
                with rt.expert_alone(model, index):
                    losses[name] = _token_losses(model, tensors, device)
            task_ids = tensors.get("token_task_ids")
            groups = {"all": real}
            for index, task in enumerate(tasks):
                if task_ids is not None:
                    groups[task] = real & (task_ids == index)
            for group, mask in groups.items():
                sums[group] = sums.get(group, torch.zeros(gates.shape[-1])) + gates[mask].sum(0)
                counts[group] = counts.get(group, 0) + int(mask.sum())
                scored = mask & (tensors["targets"] != IGNORE)  # (B, T) supervised tokens of the group
                supervised[group] = supervised.get(group, 0) + int(scored.sum())
                for system, values in losses.items():
                    loss_sums.setdefault(group, {}).setdefault(system, 0.0)
                    loss_sums[group][system] += float(values[scored].double().sum())
    finally:
        for router in layers:
            router.recording = None
        model.train(was_training)
    split = {group: {n: round(float(v), 4) for n, v in zip(names, sums[group] / max(counts[group], 1))}
             for group in sums if counts[group]}
    loss = {group: {system: round(total / supervised[group], 5) for system, total in by_system.items()}
            for group, by_system in loss_sums.items() if supervised[group]}
    return {"adapters": names, "gating": spec.gating, "top_k": spec.top_k, "tokens": counts, "mean_gate": split,
            "loss": loss, "verdict": routing_verdict(loss, split, names)}


def routing_verdict(loss: dict[str, dict[str, float]], split: dict[str, dict[str, float]], names: list[str]) -> str:
    """Whether routing can help on these tasks, from each adapter's loss alone on each task: not when one adapter
    is the best on every task (a router can at best match it), nor on a task where the adapters' losses are
    within ALIKE of each other (the router gets almost no signal there, and its choice barely matters). Else it
    can, and the verdict says what share of each task the router sends to that task's best adapter."""
    tasks = [t for t in loss if t != "all" and all(n in loss[t] for n in names)]
    if not tasks:
        return ""
    best = {t: min(names, key=lambda n: loss[t][n]) for t in tasks}
    gap = {t: max(loss[t][n] for n in names) / loss[t][best[t]] - 1 if loss[t][best[t]] > 0 else 0.0 for t in tasks}
    alike = [t for t in tasks if gap[t] < ALIKE]
    if alike:
        spread = ", ".join(f"{t} {gap[t]:.1%}" for t in alike)
        return (f"routing cannot help on {', '.join(alike)}: the adapters' losses alone there are within {ALIKE:.0%} "
                f"of each other ({spread}), so the router has nothing to choose between; train the adapters longer "
                "or on more different tasks")
    if len(tasks) > 1 and len(set(best.values())) == 1:
        only = next(iter(best.values()))
        return (f"routing cannot help: adapter {only} alone is the best on every task, so a router can at best match "
                f"it; use {only} alone, or train adapters that differ")
    shares = ", ".join(f"{t} {split.get(t, {}).get(best[t], 0.0):.0%} to {best[t]}" for t in tasks)
    learned = all(split.get(t, {}).get(best[t], 0.0) >= OWN_SHARE for t in tasks)
    return (f"the adapters differ on these tasks (each task's best adapter is better by {min(gap.values()):.0%} or "
            f"more), so routing can help; the router sends {shares}"
            + ("" if learned else f": under {OWN_SHARE:.0%} somewhere: the router has not learned the tasks yet, train it longer"))


def evaluate(model: nn.Module, data: Any, pad_id: int, device: torch.device, max_examples: int | None) -> dict[str, Any]:
    """For eval.json: the routing split of the validation examples per task."""
    pool = data.validation or data.train
    examples = pool[:max_examples]
    if data.tasks and max_examples is not None:  # an equal share of each task, not the first task's examples only
        share = -(-max_examples // len(data.tasks))
        examples = [e for index in range(len(data.tasks)) for e in [x for x in pool if x.task_id == index][:share]]
    split = data.report.get("evaluated") or ("validation" if data.validation else "train")
    return {"routing": {"split": split, **routing_split(model, examples, data.tasks, pad_id, device)}}


def figure_tables(figures: dict[str, Any]) -> list[FigureTable]:
    """The router's mean gate per adapter over each task's tokens (rows: tasks, then all tokens)."""
    routing = figures.get("routing")
    if not routing:
        return []
    rows = [(group, *(f"{shares[name]:.3f}" for name in routing["adapters"]), str(routing["tokens"][group]))
            for group, shares in routing["mean_gate"].items()]
    tables = [FigureTable(f"router split ({routing['gating']} gating): mean gate per adapter over each task's tokens",
                          ("task", *routing["adapters"], "tokens"), rows)]
    losses = routing.get("loss")  # absent from the eval.json of runs before it was measured
    if losses:
        systems = ("routed", *routing["adapters"])
        tables.append(FigureTable("token-mean loss of each task: routed, and with each adapter alone",
                                  ("task", *(s if s == "routed" else f"{s} alone" for s in systems)),
                                  [(group, *(f"{by[s]:.4f}" for s in systems)) for group, by in losses.items()],
                                  note=routing.get("verdict", "")))
    return tables


TECHNIQUE = Technique(
    name="adapter_routing",
    config_class=AdapterRoutingSettings,
    prepare=prepare,
    save=save,
    result_dir_name="adapter",
    default_learning_rate=1e-3,
    summary="a learned router over several named adapters (LoRA or bottleneck runs), per token, sequence or prompt",
    refuses={"merge": MERGE_REFUSAL, "quantized_base": NOT_QUANTIZED, "score_head": NO_SCORE_HEAD},
    on_step=on_step,
    evaluate=evaluate,
    adapter_types=(rt.ROUTING_TYPE,),
    attach=attach,
    card=TUNELAB_ADAPTER_CARD,
    figure_tables=figure_tables,
    cpu_bf16_refusal="its frozen expert adapters would be stored in bfloat16 and saved rounded, no longer equal to "
                     "the runs they come from",
)
