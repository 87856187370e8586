"""Adapter routing: gates, causal sequence gating, LoRA experts equal PEFT's, the two-task routing experiment,
joint mode, gate logging, the per-task split in eval.json, round trip, refusals at config time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from support.runs import tiny_config_dict

import tunelab
from support.tiny import fresh_model, write_jsonl
from tunelab.config import ConfigError, build_config
from tunelab.techniques import TechniqueError
from tunelab.techniques import routing as rt
from tunelab.techniques.attach import adapters_disabled, remove_adapters

ANIMALS = ["cat", "dog", "fox", "owl", "cow", "bee"]
NUMBERS = ["one", "two", "three", "four", "five"]


def task_a(n: int) -> list[dict]:
    """'say cat 3' -> 'cat cat cat'."""
    return [{"messages": [{"role": "user", "content": f"say {ANIMALS[i % 6]} {i}"},
                          {"role": "assistant", "content": " ".join([ANIMALS[i % 6]] * 3)}], "task": "animals"}
            for i in range(n)]


def task_b(n: int) -> list[dict]:
    """'count to three 7' -> 'one two three'."""
    return [{"messages": [{"role": "user", "content": f"count to {NUMBERS[2 + i % 3]} {i}"},
                          {"role": "assistant", "content": " ".join(NUMBERS[: 3 + i % 3])}], "task": "count"}
            for i in range(n)]


# ---------------------------------------------------------------- the router on its own


@pytest.mark.parametrize("gating", ["token", "sequence", "prompt"])
@pytest.mark.parametrize("top_k", [None, 1, 2])
def test_gates_sum_to_one_and_top_k_keeps_exactly_k(gating: str, top_k: int | None) -> None:
    torch.manual_seed(0)
    router = rt.Router(16, 4, gating, top_k, temperature=0.5, layer=0)
    router.proj.weight.data.normal_(0, 30.0)  # logits hundreds apart: a chosen weight underflows without the guard
    hidden = torch.randn(3, 10, 16) * 5
    gates = router.gates(hidden, torch.arange(10).expand(3, 10))  # (B, T, E)
    assert torch.allclose(gates.sum(-1), torch.ones(3, 10), atol=1e-6)
    assert (gates >= 0).all()
    if top_k is not None:
        assert ((gates > 0).sum(-1) == top_k).all()


def test_top_k_passes_a_gradient_to_the_router() -> None:
    router = rt.Router(8, 3, "token", 1, 1.0, 0)
    gates = router.gates(torch.randn(2, 5, 8))
    (gates * torch.randn_like(gates)).sum().backward()
    assert router.proj.weight.grad.abs().sum() > 0


def test_logged_gates_pool_every_process_forwards(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under two processes the logged mean gate is over both processes' forwards, not the main's alone; the hook
    makes its one collective also when this process saw no forward (every process must make the same ones)."""
    from types import SimpleNamespace

    layers = nn.ModuleList([rt.Router(8, 2, "token", None, 1.0, 0), rt.Router(8, 2, "token", None, 1.0, 1)])
    spec = SimpleNamespace(experts=[SimpleNamespace(name="a"), SimpleNamespace(name="b")])
    other = [0.0, 4.0, 4.0, 0.0, 4.0, 4.0]  # rank 1: every gate on b, 4 positions at each layer
    calls: list[list[float]] = []
    monkeypatch.setattr(rt.distributed, "sum_over_processes",
                        lambda values: calls.append(values) or [a + b for a, b in zip(values, other)])
    for router, mass in zip(layers, ([3.0, 1.0], [2.0, 2.0])):  # rank 0: 4 positions at each layer
        router.stat_sum, router.stat_count = torch.tensor(mass), 4
    # layer 0: (3, 5) / 8, layer 1: (2, 6) / 8; their mean (rank 0's alone: 0.625, 0.375)
    assert rt.gate_means(layers, spec) == {"a": 0.3125, "b": 0.6875}
    monkeypatch.setattr(rt.distributed, "sum_over_processes", lambda values: calls.append(values) or values)
    assert rt.gate_means(layers, spec) is None and len(calls) == 2  # nothing since: reset, and still collective


def test_sequence_gating_is_causal_and_restarts_per_example() -> None:
    torch.manual_seed(0)
    router = rt.Router(8, 3, "sequence", None, 1.0, 0).eval()
    a, b = torch.randn(1, 4, 8), torch.randn(1, 6, 8)
    alone_a = router.gates(a, torch.arange(4)[None])
    alone_b = router.gates(b, torch.arange(6)[None])
    packed = router.gates(torch.cat([a, b], 1), torch.cat([torch.arange(4), torch.arange(6)])[None])
    assert torch.allclose(packed[:, :4], alone_a, atol=1e-6) and torch.allclose(packed[:, 4:], alone_b, atol=1e-6)
    changed_future = torch.cat([a[:, :2], torch.randn(1, 2, 8)], 1)
    assert torch.allclose(router.gates(changed_future, torch.arange(4)[None])[:, :2], alone_a[:, :2], atol=1e-6)
    # decoding with a KV cache: one token at a time continues the prefix mean from the previous call
    router.gates(b[:, :5], torch.arange(5)[None])
    step = router.gates(b[:, 5:], torch.tensor([[5]]))
    assert torch.allclose(step, alone_b[:, 5:], atol=1e-6)
    # per token, the gate at t is the softmax of the mean router logit so far
    logits = router.proj(a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-6))
    expected = torch.softmax(logits.cumsum(1) / torch.arange(1, 5).view(1, 4, 1), -1)
    assert torch.allclose(alone_a, expected, atol=1e-6)


# ---------------------------------------------------------------- trained experts (shared by the tests below)


def _config(tiny_model_dir: Path, data: list[Path], technique: dict, out: Path, steps: int, lr: float, **data_options) -> dict:
    return tiny_config_dict(
        tiny_model_dir,
        data={"train": [str(p) for p in data], "val_size": 0.2, "max_length": 64, **data_options},
        technique=technique,
        training={"max_steps": steps, "micro_batch_size": 8, "learning_rate": lr, "warmup_ratio": 0.0},
        eval={"num_samples": 0, "max_examples": 64}, output={"dir": str(out)},
    )


@pytest.fixture(scope="module")
def experiment(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Adapter 'animals' (bottleneck, Houlsby) trained on task A; adapter 'count' (LoRA) on task B; data files for
    each task and for both together (multi-task)."""
    root = tmp_path_factory.mktemp("routing")
    files = {"animals": write_jsonl(root / "animals.jsonl", task_a(60)),
             "count": write_jsonl(root / "count.jsonl", task_b(60))}
    files["both"] = write_jsonl(root / "both.jsonl", task_a(60) + task_b(60))
    runs = {}
    techniques = {"animals": {"name": "adapter", "placement": "houlsby", "reduction_factor": 4},
                  "count": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0}}
    for name, technique in techniques.items():
        config = build_config(_config(tiny_model_dir, [files[name]], technique, root / name, 60, 1e-2))
        runs[name] = tunelab.train(config, progress=False).run_dir
    return {"root": root, "files": files, "runs": runs}


def _task_losses(model: torch.nn.Module, tokenizer, files: dict[str, Path]) -> dict[str, float]:
    """Token-mean loss on held-out examples of each task (ids 1000+, never trained on)."""
    from tunelab.data import Example, collate, tokenize_example
    from tunelab.objectives.sft import sft_loss_sum

    out = {}
    for name, records in (("animals", task_a(90)[60:]), ("count", task_b(90)[60:])):
        rows = [[tokenize_example(tokenizer, Example("messages", "x", tuple((m["role"], m["content"]) for m in r["messages"])))]
                for r in records]
        with torch.no_grad():
            result = sft_loss_sum(model.eval(), collate(rows, tokenizer.pad_token_id))
        out[name] = result.loss_sum.item() / result.num_units
    out["both"] = (out["animals"] + out["count"]) / 2
    return out


@pytest.fixture(scope="module")
def routed(experiment: dict, tiny_model_dir: Path) -> Path:
    config = build_config(_config(
        tiny_model_dir, [experiment["files"]["both"]],
        {"name": "adapter_routing", "adapters": {k: str(v) for k, v in experiment["runs"].items()}, "gating": "prompt", "temperature": 0.3},
        experiment["root"] / "routed", 150, 5e-2))
    return tunelab.train(config, progress=False).run_dir


def test_lora_expert_equals_peft(experiment: dict, tiny_model_dir: Path) -> None:
    """The LoRA expert loader computes what PEFT computes for the same adapter (scale, weights, modules)."""
    folder = experiment["runs"]["count"] / "adapter"
    peft_model = tunelab.load_adapter(fresh_model(tiny_model_dir), folder)
    ours = fresh_model(tiny_model_dir)
    _, weights = rt.lora_weights(folder, "test")
    rt.add_lora_expert(ours, "count", weights, "test")  # no router: the plain sum, i.e. this one expert
    ids = torch.randint(3, 300, (2, 12))
    assert torch.allclose(ours(ids).logits, peft_model(ids).logits, atol=1e-5)


def test_router_sends_each_task_to_its_own_adapter(routed: Path, experiment: dict, tiny_model_dir: Path, tiny_tokenizer) -> None:
    """The issue's routing claims, strictly: each task goes mostly to its own adapter, the routed model is at least
    as good as the better single adapter on each task and better than either on both tasks together."""
    evaluation = json.loads((routed / "eval.json").read_text())
    split = evaluation["routing"]["mean_gate"]
    share_a, share_b = split["animals"]["animals"], split["count"]["count"]
    print(f"routing share: animals -> animals {share_a:.4f}, count -> count {share_b:.4f}")
    # measured with prompt gating: animals -> animals 1.0000, count -> count 0.9977 (every token, prompt included;
    # the causal 'sequence' gate gave count -> count 0.77 on the prompt's tokens: the shared chat-template prefix
    # comes before the task shows)
    assert share_a >= 0.95 and share_b >= 0.95, split

    losses = {name: _task_losses(tunelab.load_run(run, device="cpu").model, tiny_tokenizer, experiment["files"])
              for name, run in {**experiment["runs"], "routed": routed}.items()}
    print("held-out losses:", json.dumps(losses, indent=1))
    for task in ("animals", "count"):
        # measured: animals 2.13849 routed vs 2.13850 for its own adapter; count 0.75205 vs 0.75197 (the other
        # adapter's gate, 2e-3, moves the loss by 8e-5); the causal gate gave count 0.771, 2.5% worse
        best_single = min(losses["animals"][task], losses["count"][task])
        assert losses["routed"][task] <= best_single + 1e-4, losses
    assert losses["routed"]["both"] < min(losses["animals"]["both"], losses["count"]["both"]), losses


# A system prompt both tasks share: its tokens come first and are the same in every prompt, so are their hidden
# states (the model is causal), and they are most of each prompt, as SmolLM2's default system prompt and chat
# header are (24 of 43 tokens on the shipped tasks, issue 19).
SHARED_SYSTEM = ("You are a helpful assistant. Read the request below with care, then answer it in as few words as "
                 "the request needs and say nothing else at all.")


def _behind_a_shared_prefix(records: list[dict]) -> list[dict]:
    return [{**r, "messages": [{"role": "system", "content": SHARED_SYSTEM}, *r["messages"]]} for r in records]


def test_tasks_that_differ_only_after_a_long_shared_prefix_are_routed_apart(experiment: dict, tiny_model_dir: Path) -> None:
    """Issue 19 on the tiny model: a router-only, prompt-gated run over the two adapters, on prompts that are
    mostly a shared system prompt. The prompt gate's mean input is then mostly one vector for every example,
    which moved an uncentred router's logits alike for both tasks (measured: 0.50 / 0.50 of each task to its
    adapter after these 40 steps); centred on the training data's mean input, the router sends each task to its
    own adapter (measured: 0.87 / 0.97)."""
    both = write_jsonl(experiment["root"] / "both-behind-a-prefix.jsonl",
                       _behind_a_shared_prefix(task_a(60) + task_b(60)))
    config = build_config(_config(
        tiny_model_dir, [both], {"name": "adapter_routing", "adapters": {k: str(v) for k, v in experiment["runs"].items()},
                                 "gating": "prompt", "temperature": 0.3},
        experiment["root"] / "routed-behind-a-prefix", 40, 5e-2, max_length=160))  # the system prompt: 95 tokens
    run = tunelab.train(config, progress=False).run_dir
    split = json.loads((run / "eval.json").read_text())["routing"]["mean_gate"]
    print("behind a shared prefix:", split)
    assert split["animals"]["animals"] >= 0.8 and split["count"]["count"] >= 0.8, split
    # the centre is saved with the router: the result routes as the run did, without the training data
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert saved["format_version"] == 2 and saved["router"]["centred_on"] == 96  # every training example
    reopened = rt.routers(tunelab.load_run(run, device="cpu").model)
    assert reopened and all(r.centre.abs().sum() > 0 for r in reopened)


def test_router_input_is_centred_on_the_training_data(experiment: dict, tiny_model_dir: Path, tiny_tokenizer) -> None:
    """What the prompt gate reads, each example's mean router input over its prompt, has mean 0 in every dimension
    over the training examples it was measured on; measuring again gives the same centre (a resumed run prepares
    the same router)."""
    from tunelab.config import DataConfig
    from tunelab.data import collate, prepare_data
    from tunelab.techniques import RunContext
    from tunelab.techniques.adapter_routing import AdapterRoutingSettings, prepare

    records = _behind_a_shared_prefix(task_a(30) + task_b(30))
    data = prepare_data(DataConfig(train=[str(write_jsonl(experiment["root"] / "calibration.jsonl", records))],
                                   val_size=0, cache=False, packing=False), tiny_tokenizer)
    pad = tiny_tokenizer.pad_token_id
    settings = AdapterRoutingSettings(adapters={k: str(v) for k, v in experiment["runs"].items()}, gating="prompt")
    model = prepare(fresh_model(tiny_model_dir), settings, RunContext(examples=data.train, pad_id=pad)).eval()
    layers = rt.routers(model)
    measured = [r.centre.clone() for r in layers]
    for router in layers:
        router.calibrating = []  # record what each gate pools (every expert weighted the same, as when measured)
    batch = collate([[e] for e in data.train], pad)
    with torch.no_grad():
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], targets=batch["targets"], use_cache=False)
    for router in layers:
        pooled = router.calibrating[0][:, 0]  # (N, H): each example's prompt mean, centred
        router.calibrating = None
        assert router.centre.abs().max() > 0.1  # there was a shared part to take away
        assert pooled.mean(0).abs().max() < 1e-4, pooled.mean(0)
    assert rt.calibrate(model, data.train, pad) == 60
    for router, centre in zip(layers, measured):
        assert torch.allclose(router.centre, centre, atol=1e-6)


def test_a_resumed_routing_run_equals_an_uninterrupted_one(experiment: dict, tiny_model_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The centre is not in the checkpoint: a resumed run measures it again on the same training examples, so it
    trains exactly as an uninterrupted run (losses and the saved router, centre included, bit for bit)."""
    from safetensors.torch import load_file
    from support.ddp_driver import StopAfter

    from tunelab.runs import read_metrics
    from tunelab.training import loop, session

    both = write_jsonl(tmp_path / "both.jsonl", _behind_a_shared_prefix(task_a(20) + task_b(20)))
    technique = {"name": "adapter_routing", "adapters": {k: str(v) for k, v in experiment["runs"].items()}, "gating": "prompt"}

    def config(name: str) -> Any:
        settings = _config(tiny_model_dir, [both], technique, tmp_path / name, 6, 1e-2, max_length=160)
        settings["training"]["save_every"] = 3
        settings["eval"]["before_after"] = False
        return build_config(settings)

    assert session.train(config("straight"), progress=False).step == 6
    with monkeypatch.context() as patch:
        patch.setattr(loop, "_StopRequest", StopAfter(3))
        assert session.train(config("split"), progress=False).status == "interrupted"
    assert session.train(config("split"), resume=True, progress=False).status == "completed"
    losses = {run: [m["loss"] for m in read_metrics(tmp_path / run) if m["kind"] == "train"] for run in ("straight", "split")}
    assert losses["straight"] == losses["split"] and len(losses["split"]) == 6, losses
    a, b = (load_file(str(tmp_path / run / "adapter" / "adapter_model.safetensors")) for run in ("straight", "split"))
    assert a.keys() == b.keys() and any(k.endswith(".centre") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_router_saved_before_the_centring_loads_unchanged(routed: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    """A format-1 result (no centre in its weights) reads its input as it was trained to: uncentred."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(routed / "adapter", tmp_path / "old")
    weights = load_file(str(folder / "adapter_model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.endswith(".centre")}, str(folder / "adapter_model.safetensors"))
    config = json.loads((folder / "adapter_config.json").read_text())
    config["format_version"] = 1
    del config["router"]["centred_on"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    layers = rt.routers(tunelab.load_adapter(fresh_model(tiny_model_dir), folder))
    assert layers and all(r.centre.abs().sum() == 0 for r in layers)


def test_prompt_gate_is_the_prompts_for_every_token_of_the_example() -> None:
    """Prompt gating: one gate per example from its prompt's tokens (those before the first supervised one),
    the same whether the example is packed, carries its answer and targets (training), or is a bare prompt
    followed by decoding steps (generation)."""
    torch.manual_seed(0)
    router = rt.Router(8, 3, "prompt", None, 1.0, 0).eval()
    prompt_a, answer_a = torch.randn(1, 4, 8), torch.randn(1, 3, 8)
    prompt_b, answer_b = torch.randn(1, 5, 8), torch.randn(1, 2, 8)
    ignore = rt.IGNORE

    def targets(prompt_len: int, answer_len: int) -> torch.Tensor:  # shifted: position t predicts token t+1
        return torch.tensor([[ignore] * (prompt_len - 1) + [7] * answer_len + [ignore]])

    def rms(x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    router.targets = targets(4, 3)
    alone_a = router.gates(torch.cat([prompt_a, answer_a], 1), torch.arange(7)[None])  # (1, 7, 3)
    expected = torch.softmax(router.proj(rms(prompt_a)).mean(1), -1)  # (1, 3): the prompt's mean logit
    assert torch.allclose(alone_a, expected.unsqueeze(1).expand(1, 7, 3), atol=1e-6)
    # the answer does not move the gate, not even the prompt's own tokens' gates
    router.targets = targets(4, 3)
    other_answer = router.gates(torch.cat([prompt_a, torch.randn(1, 3, 8)], 1), torch.arange(7)[None])
    assert torch.allclose(other_answer, alone_a, atol=1e-6)
    # packed with another example: each keeps its own prompt's gate
    router.targets = targets(5, 2)
    alone_b = router.gates(torch.cat([prompt_b, answer_b], 1), torch.arange(7)[None])
    router.targets = torch.cat([targets(4, 3), targets(5, 2)], 1)
    packed = router.gates(torch.cat([prompt_a, answer_a, prompt_b, answer_b], 1), torch.cat([torch.arange(7)] * 2)[None])
    assert torch.allclose(packed, torch.cat([alone_a, alone_b], 1), atol=1e-6)
    # generation: the bare prompt (no targets) gets the training gate, and decoding steps keep it
    router.targets = None
    prefill = router.gates(prompt_a, torch.arange(4)[None])
    step = router.gates(answer_a[:, :1], torch.tensor([[4]]))
    assert torch.allclose(prefill, alone_a[:, :4], atol=1e-6) and torch.allclose(step, alone_a[:, 4:5], atol=1e-6)


def test_routed_model_decodes_with_the_gates_it_trained_with(routed: Path) -> None:
    """Generation (the bare prompt, then one cached token at a time) gives the logits of the training forward
    (prompt and answer at once, with the targets that mark where the prompt ends)."""
    from tunelab.data import Example, collate, tokenize_example

    opened = tunelab.load_run(routed, device="cpu")
    model, tokenizer = opened.model.eval(), opened.tokenizer
    record = task_b(61)[60]
    example = tokenize_example(tokenizer, Example("messages", "x", tuple((m["role"], m["content"]) for m in record["messages"])))
    batch = collate([[example]], tokenizer.pad_token_id)
    ids = batch["input_ids"]  # (1, T)
    prompt = next(i for i, label in enumerate(example.labels) if label != rt.IGNORE)  # the answer's first token
    with torch.no_grad():
        trained = model(input_ids=ids, position_ids=batch["position_ids"], targets=batch["targets"], use_cache=False).logits
        out = model(input_ids=ids[:, :prompt], use_cache=True)
        decoded = [out.logits[:, -1]]
        for t in range(prompt, ids.shape[1] - 1):
            out = model(input_ids=ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            decoded.append(out.logits[:, -1])
    assert torch.allclose(torch.stack(decoded, 1), trained[:, prompt - 1 : -1], atol=1e-4)
    # `tunelab eval`'s per-example losses route by the prompt too (the targets reach the router), as training did
    from tunelab.eval.loss import example_losses
    from tunelab.objectives.sft import sft_loss_sum

    loss_sum, tokens = next(example_losses(model, [example], tokenizer.pad_token_id, 1, torch.device("cpu")))
    seen = rt.routers(model)[0].targets  # what the router was told about the last forward
    assert seen is not None and torch.equal(seen, batch["targets"])
    with torch.no_grad():
        trained_loss = sft_loss_sum(model, batch)
    assert tokens == trained_loss.num_units and abs(loss_sum - trained_loss.loss_sum.item()) < 1e-4


def test_each_adapter_alone_is_measured_beside_the_router(routed: Path, experiment: dict, tiny_tokenizer) -> None:
    """The routing figures hold each task's loss with each adapter alone, equal to that adapter's own run on the same
    records (so a user can tell whether the experts differ at all), and the routed model's; the tiny experiment's
    experts differ, so the verdict says routing can help and that the router learned it."""
    from dataclasses import replace

    from tunelab.data import Example, tokenize_example
    from tunelab.techniques.adapter_routing import routing_split

    records = {"animals": task_a(90)[60:], "count": task_b(90)[60:]}  # held out, as _task_losses reads them
    examples = [replace(tokenize_example(tiny_tokenizer, Example("messages", "x", tuple((m["role"], m["content"])
                                                                                    for m in r["messages"]))), task_id=i)
                for i, task in enumerate(records) for r in records[task]]
    model = tunelab.load_run(routed, device="cpu").model
    split = routing_split(model, examples, list(records), tiny_tokenizer.pad_token_id, torch.device("cpu"))
    own = {name: _task_losses(tunelab.load_run(run, device="cpu").model, tiny_tokenizer, experiment["files"])
           for name, run in experiment["runs"].items()}
    own["routed"] = _task_losses(model, tiny_tokenizer, experiment["files"])
    print("per-task losses:", split["loss"], "\nverdict:", split["verdict"])
    for task in records:
        for system in ("animals", "count", "routed"):
            assert split["loss"][task][system] == pytest.approx(own[system][task], rel=1e-4), (task, system, split["loss"])
    assert split["loss"]["animals"]["animals"] < split["loss"]["animals"]["count"]  # each task has its own best
    assert split["loss"]["count"]["count"] < split["loss"]["count"]["animals"]
    assert split["verdict"].startswith("the adapters differ") and "under 80%" not in split["verdict"], split["verdict"]


def test_the_routing_verdict_says_when_routing_cannot_help() -> None:
    from tunelab.techniques.adapter_routing import routing_verdict

    names = ["a", "b"]
    learned = {"x": {"a": 0.9, "b": 0.1}, "y": {"a": 0.15, "b": 0.85}}
    differ = {"x": {"routed": 1.0, "a": 1.0, "b": 1.5}, "y": {"routed": 2.0, "a": 2.6, "b": 2.0}}
    assert routing_verdict(differ, learned, names) == (
        "the adapters differ on these tasks (each task's best adapter is better by 30% or more), so routing can "
        "help; the router sends x 90% to a, y 85% to b")
    unlearned = {"x": {"a": 0.9, "b": 0.1}, "y": {"a": 0.46, "b": 0.54}}
    assert routing_verdict(differ, unlearned, names).endswith(
        "y 54% to b: under 80% somewhere: the router has not learned the tasks yet, train it longer")
    alike = {"x": {"routed": 1.0, "a": 1.0, "b": 1.5}, "y": {"routed": 2.0, "a": 2.03, "b": 2.0}}  # y: 1.5% apart
    assert routing_verdict(alike, learned, names).startswith(
        "routing cannot help on y: the adapters' losses alone there are within 2% of each other (y 1.5%)")
    one_best = {"x": {"routed": 1.0, "a": 1.0, "b": 1.5}, "y": {"routed": 2.0, "a": 2.0, "b": 2.6}}
    assert routing_verdict(one_best, learned, names).startswith(
        "routing cannot help: adapter a alone is the best on every task")
    assert routing_verdict({"all": {"routed": 1.0, "a": 1.0, "b": 1.2}}, {}, names) == ""  # no tasks: no verdict


def test_tunelab_eval_reports_the_router_split_of_each_task(routed: Path, tmp_path: Path) -> None:
    """`tunelab eval RUN --data FILE` on a routed run: the share of gate weight each adapter gets over each task's
    tokens of that data, printed and saved in the report's eval.json."""
    from typer.testing import CliRunner

    from tunelab.cli import app

    held_out = write_jsonl(tmp_path / "held_out.jsonl", task_a(72)[60:] + task_b(72)[60:])  # never trained on
    result = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"}).invoke(app, [
        "eval", str(routed), "--data", str(held_out), "--metric", "exact_match", "--max-new-tokens", "4",
        "--resamples", "10", "--output", str(tmp_path / "report"), "--no-progress"])
    assert result.exit_code == 0, result.output
    routing = json.loads((tmp_path / "report" / "eval.json").read_text())["technique"]["routing"]
    assert routing["split"] == "the evaluation data" and routing["adapters"] == ["animals", "count"]
    assert routing["tokens"]["animals"] > 0 and routing["tokens"]["count"] > 0
    share = routing["mean_gate"]
    print("tunelab eval split:", share)
    assert share["animals"]["animals"] >= 0.95 and share["count"]["count"] >= 0.95, share  # as in training's eval.json
    split_table, loss_table = result.output.rsplit("┃ routed ┃", 1)  # the loss table's header (the last one)
    printed = [line.replace("│", " ").split() for line in split_table.splitlines()]  # the split table's rows
    rows = {line[0]: line[1:3] for line in printed if len(line) == 4 and line[0] in ("animals", "count")}
    assert rows == {task: [f"{share[task]['animals']:.3f}", f"{share[task]['count']:.3f}"] for task in ("animals", "count")}, result.output
    losses = routing["loss"]  # and each task's loss routed and with each adapter alone, then the verdict under it
    printed = [line.replace("│", " ").split() for line in loss_table.splitlines()]
    rows = {line[0]: line[1:] for line in printed if len(line) == 4 and line[0] in ("animals", "count")}
    assert rows == {task: [f"{losses[task][s]:.4f}" for s in ("routed", "animals", "count")] for task in ("animals", "count")}
    assert routing["verdict"].startswith("the adapters differ") and routing["verdict"] in " ".join(result.output.split())


def test_gates_are_logged_and_only_the_router_trains(routed: Path, experiment: dict) -> None:
    lines = [json.loads(line) for line in (routed / "metrics.jsonl").read_text().splitlines()]
    gates = [line["gates"] for line in lines if line["kind"] == "train"]
    assert len(gates) == 150 and set(gates[0]) == {"animals", "count"}
    assert all(abs(sum(g.values()) - 1) < 1e-3 for g in gates)
    from safetensors.torch import load_file

    saved = load_file(str(routed / "adapter" / "adapter_model.safetensors"))
    source = load_file(str(experiment["runs"]["animals"] / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(saved[f"experts.animals.{k}"], v) for k, v in source.items())  # router-only: frozen


def test_routed_round_trip(routed: Path, tiny_model_dir: Path) -> None:
    opened = tunelab.load_run(routed, device="cpu").model
    attached = tunelab.load_adapter(fresh_model(tiny_model_dir), routed)
    ids, base = torch.randint(3, 300, (2, 12)), fresh_model(tiny_model_dir)
    assert torch.equal(opened(ids).logits, attached(ids).logits)
    with adapters_disabled(attached):
        assert torch.equal(attached(ids).logits, base(ids).logits)
    remove_adapters(attached)
    assert torch.equal(attached(ids).logits, base(ids).logits)
    assert [n for n, _ in attached.named_parameters()] == [n for n, _ in base.named_parameters()]


def test_joint_mode_lowers_the_loss_on_both_tasks(experiment: dict, tiny_model_dir: Path, tiny_tokenizer) -> None:
    """Poly style: two new adapters and the router trained together from zero, per-sequence gates, top-1."""
    config = build_config(_config(
        tiny_model_dir, [experiment["files"]["both"]],
        {"name": "adapter_routing", "mode": "joint", "new_adapters": ["s1", "s2"], "gating": "sequence", "top_k": 1,
         "new_adapter": {"placement": "parallel", "reduction_factor": 4}},
        experiment["root"] / "joint", 60, 1e-2))
    run = tunelab.train(config, progress=False).run_dir
    model = tunelab.load_run(run, device="cpu").model
    after = _task_losses(model, tiny_tokenizer, experiment["files"])
    with adapters_disabled(model):
        before = _task_losses(model, tiny_tokenizer, experiment["files"])
    print("joint mode, held-out loss before -> after:", before, after)
    assert after["animals"] < 0.6 * before["animals"] and after["count"] < 0.6 * before["count"]


def test_config_time_refusals() -> None:
    def refused(technique: dict, match: str) -> None:
        with pytest.raises(ConfigError, match=match):
            build_config({"technique": {"name": "adapter_routing", **technique}})

    refused({"adapters": {"a": "x"}}, "at least two adapters")
    refused({"adapters": {"a": "x", "b": "y"}, "top_k": 3}, "top_k=3 is more than the 2 adapters")
    refused({"adapters": {"a": "x"}, "new_adapters": ["b"]}, "new_adapters need mode 'joint'")
    refused({"adapters": {"a.b": "x", "c": "y"}}, "letters, digits")
    refused({"adapters": {"a": "x"}, "new_adapters": ["a"], "mode": "joint"}, "unique")
    config = build_config({"technique": {"name": "adapter_routing", "adapters": {"a": "x", "b": "y"}}})
    from tunelab.techniques import TECHNIQUES

    assert "router" in TECHNIQUES["adapter_routing"].refusal("merge")


def test_missing_or_wrong_runs_are_clear_errors(tmp_path: Path, tiny_model_dir: Path, experiment: dict) -> None:
    from tunelab.techniques.adapter_routing import AdapterRoutingSettings, prepare

    settings = AdapterRoutingSettings(adapters={"a": str(tmp_path / "nope"), "b": str(experiment["runs"]["count"])})
    with pytest.raises(TechniqueError, match="technique.adapters.a: .*nope does not exist"):
        prepare(fresh_model(tiny_model_dir), settings)
    (tmp_path / "empty").mkdir()
    settings = AdapterRoutingSettings(adapters={"a": str(tmp_path / "empty"), "b": str(experiment["runs"]["count"])})
    with pytest.raises(TechniqueError, match="holds no adapter"):
        prepare(fresh_model(tiny_model_dir), settings)


# ---------------------------------------------------------------- PEFT's own routers, where they fit


def _two_peft_loras(tiny_model_dir: Path, root: Path) -> dict[str, str]:
    from peft import LoraConfig, get_peft_model

    paths = {}
    for seed, name in enumerate(("a", "b")):
        torch.manual_seed(seed)
        model = get_peft_model(fresh_model(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                   init_lora_weights=False))
        model.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


@pytest.mark.xfail(strict=True, raises=KeyError, reason="PEFT 0.21.2's X-LoRA (checked with transformers 5.24) fails its "
                   "first forward pass: its pre-hook calls disable_adapter_layers, which looks up peft_config['a'] "
                   "(tuners_utils.py:558) and raises KeyError: 'a'; strict, so a PEFT that fixes it turns this red")
def test_peft_xlora_on_this_stack(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import XLoraConfig, get_peft_model

    base = fresh_model(tiny_model_dir)
    base.config.use_cache = False  # X-LoRA refuses a model that caches
    model = get_peft_model(base, XLoraConfig(task_type="CAUSAL_LM", hidden_size=64, xlora_depth=1,
                                             adapters=_two_peft_loras(tiny_model_dir, tmp_path)))
    model(input_ids=torch.randint(3, 300, (2, 8)))


def test_peft_poly_reads_tunelabs_task_ids(tiny_model_dir: Path, tiny_tokenizer, tmp_path: Path) -> None:
    """PEFT's Poly (task-id routing over LoRA skills trained from scratch) takes the task_ids (B,) that tunelab's
    multi-task batches carry: each task gets its own mixture of skills."""
    from peft import PolyConfig, get_peft_model

    from tunelab.config import DataConfig
    from tunelab.data import collate, prepare_data

    path = write_jsonl(tmp_path / "both.jsonl", task_a(4) + task_b(4))
    data = prepare_data(DataConfig(train=[str(path)], val_size=0, cache=False, packing=False), tiny_tokenizer)
    a = next(e for e in data.train if e.task == "animals")
    batch = collate([[a], [a.__class__(a.input_ids, a.labels, a.source, task="count", task_id=1)]], 0)
    torch.manual_seed(0)
    model = get_peft_model(fresh_model(tiny_model_dir), PolyConfig(task_type="CAUSAL_LM", r=4, n_tasks=2, n_skills=2,
                                                              n_splits=1, target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():  # non-zero skills and distinct task logits, as after training
        if "poly_" in name:
            torch.nn.init.normal_(param, std=0.5)
    logits = model(input_ids=batch["input_ids"], task_ids=batch["task_ids"]).logits  # same tokens, two tasks
    assert batch["task_ids"].tolist() == [0, 1]
    assert not torch.allclose(logits[0], logits[1])
