"""GRPO: its advantages and clipped loss against hand-computed values, rollouts through the one generation module
(KV-cached tokens equal uncached greedy decoding), no reference pass when beta = 0, gradient accumulation equal to
the big batch given the same rollouts, exact resume (rollouts included), learning a toy verifiable task on the
tiny model, and a constant reward that changes nothing."""

from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from support.ddp_driver import StopAfter
from support.online import ANIMALS, starts_with_a_vowel, toy_prompts_file, without_onednn_bound
from support.runs import checkpoint_tensors, tiny_config
from support.tiny import fresh_model, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.data import IGNORE
from tunelab.errors import ConfigError
from tunelab.distributed import make_accelerator
from tunelab.eval.online import rewarded_answers
from tunelab.eval.runner import EvalSettings, evaluate
from tunelab.objectives import OBJECTIVES
from tunelab.objectives import grpo
from tunelab.objectives.grpo import GrpoSettings, clipped_token_losses, group_advantages, grpo_prepare
from tunelab.objectives.online import Rollout
from tunelab.objectives.reference import live_reference
from tunelab.result import find_result
from tunelab.rewards import build_rewards
from tunelab.runs import read_metrics
from tunelab.training import loop, train
from tunelab.training.loop import accumulate_gradients
from tunelab.training.rollout import Rollouts
from tunelab.run_info import RunInfo

VOWEL = "support.online:starts_with_a_vowel"


def settings(**values: Any) -> GrpoSettings:
    return GrpoSettings(**{"rewards": [VOWEL], **values})


# ---------------------------------------------------------------- closed forms


def test_group_advantages_equal_hand_computed_values() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    std = math.sqrt(4 * 0.25 / 3)  # the unbiased deviation of (1, 0, 0, 1)
    expected = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4), 0, 0, 0, 0]
    assert group_advantages(rewards, 4, scale=True).tolist() == pytest.approx(expected, abs=1e-6)
    assert group_advantages(rewards, 4, scale=False).tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0], abs=1e-6)
    assert group_advantages(rewards, 2, scale=False).tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0], abs=1e-6)


def test_clipped_token_losses_equal_hand_computed_values() -> None:
    old = torch.zeros(5)
    logps = torch.tensor([0.3, -0.3, 0.1, -0.1, 0.24])
    advantages = torch.tensor([1.0, -1.0, -1.0, 2.0, 1.0])
    losses, clipped = clipped_token_losses(logps, old, advantages, eps_low=0.2, eps_high=0.28)
    expected = [-1.28,  # ratio e^.3 = 1.35 > 1.28 with A > 0: the clip bound
                0.8,  # ratio e^-.3 = 0.74 < 0.8 with A < 0: the clip bound, -(0.8 * -1)
                math.exp(0.1),  # ratio 1.105 with A < 0: the ratio itself (clipping only limits gains)
                -2 * math.exp(-0.1),  # ratio 0.905 with A > 0: the ratio
                -math.exp(0.24)]  # 1.271: above 1 + 0.2, but not clipped with eps_high 0.28 (clip-higher)
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert clipped.tolist() == [True, True, False, False, False]


@contextmanager
def fixed_logps(values: torch.Tensor, vocab: int = 4) -> Iterator[None]:
    """grpo's token log-probs replaced by ``values`` (N,) (with the entropy of uniform logits over ``vocab``), as if
    from a model."""
    original = grpo.token_logps
    grpo.token_logps = lambda model, batch, with_entropy=False: (values.clone().requires_grad_(True),
                                                                 torch.full((len(values),), math.log(vocab)))
    try:
        yield
    finally:
        grpo.token_logps = original


def _fixed_batch() -> dict[str, torch.Tensor]:
    """Two completions of one prompt: the first with 1 token, the second with 3 (targets shifted: the prompt is
    one token)."""
    targets = torch.tensor([[7, IGNORE, IGNORE, IGNORE], [7, 8, 9, IGNORE]])
    return {"targets": targets, "advantages": torch.tensor([1.0, -0.5]),
            "old_logps": torch.tensor([[-1.0, 0, 0, 0], [-2.0, -1.0, -1.0, 0]]),
            "ref_logps": torch.tensor([[-1.5, 0, 0, 0], [-2.0, -0.5, -1.0, 0]])}


def test_the_loss_is_normalised_over_tokens_or_sequences_with_the_k3_kl() -> None:
    logps = torch.tensor([-1.0, -2.0, -1.0, -1.0])  # the policy equals the old one: every ratio is 1
    batch = _fixed_batch()
    with fixed_logps(logps):
        tokens = OBJECTIVES["grpo"].bind(settings(beta=0.1)).loss_sum(None, batch)
        sequences = OBJECTIVES["grpo"].bind(settings(beta=0.1, loss_normalization="sequences")).loss_sum(None, batch)
    kl = [math.exp(d) - d - 1 for d in (-0.5, 0.0, 0.5, 0.0)]  # ref - logp per token
    per_token = [-1.0 + 0.1 * kl[0], 0.5 + 0.1 * kl[1], 0.5 + 0.1 * kl[2], 0.5 + 0.1 * kl[3]]
    assert (tokens.loss_sum.item(), tokens.num_units) == (pytest.approx(sum(per_token), abs=1e-6), 4)
    assert (sequences.loss_sum.item(), sequences.num_units) == (pytest.approx(per_token[0] + sum(per_token[1:]) / 3, abs=1e-6), 2)
    assert tokens.stats["kl"].item() == pytest.approx(sum(kl), abs=1e-6)
    assert tokens.stats["entropy"].item() == pytest.approx(4 * math.log(4), abs=1e-6)  # uniform over 4 tokens
    assert tokens.stats["clip_fraction"].item() == 0
    assert OBJECTIVES["grpo"].bind(settings(loss_normalization="sequences")).count_units(batch) == 2
    assert OBJECTIVES["grpo"].bind(settings()).count_units(batch) == 4


def test_with_one_iteration_the_ratio_is_one_and_its_gradient_is_the_policy_gradient() -> None:
    batch = {k: v for k, v in _fixed_batch().items() if k not in ("old_logps", "ref_logps")}
    logps = torch.tensor([-1.0, -2.0, -1.0, -1.0], requires_grad=True)
    original = grpo.token_logps
    grpo.token_logps = lambda model, b, with_entropy=False: (logps, torch.full((4,), math.log(4)))
    try:
        result = OBJECTIVES["grpo"].bind(settings()).loss_sum(None, batch)
    finally:
        grpo.token_logps = original
    result.loss_sum.backward()
    assert logps.grad.tolist() == [-1.0, 0.5, 0.5, 0.5]  # -A per token: d/dlogp of -exp(logp - sg(logp)) A


# ---------------------------------------------------------------- rollouts


def _rollouts(tokenizer: Any, **values: Any) -> Rollouts:
    config = settings(**values)
    return Rollouts(config, tokenizer, build_rewards(config.rewards, torch.device("cpu")), 1, 0, RunInfo(), nullcontext)


def _uncached_greedy(model: torch.nn.Module, ids: list[int], steps: int, stop: int) -> list[int]:
    out: list[int] = []
    for _ in range(steps):
        with torch.no_grad():
            token = int(model(input_ids=torch.tensor([ids + out]), use_cache=False).logits[0, -1].argmax())
        if token == stop:
            break
        out.append(token)
    return out


def test_kv_cached_greedy_answers_equal_uncached_greedy_decoding(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    """The validation answers (and `tunelab eval`'s) are one left-padded, KV-cached batch: the same tokens as a
    step-by-step decode that recomputes every position."""
    model = fresh_model(tiny_model_dir)
    prompts = [tiny_tokenizer("<|im_start|>user\nsay cat<|im_end|>\n<|im_start|>assistant\n")["input_ids"],
               tiny_tokenizer("hello, how are you? i am")["input_ids"]]
    records = [type("R", (), {"input_ids": p, "prompt": "p", "columns": {}, "source": f"x:{i}"})()
               for i, p in enumerate(prompts)]
    rewards = build_rewards(settings(rewards=[{"function": "length", "max_words": 3}]).rewards, torch.device("cpu"))
    scored, texts = rewarded_answers(model, tiny_tokenizer, records, rewards, 12, batch_size=2)
    for text, ids in zip(texts, prompts):
        expected = _uncached_greedy(model, ids, 12, tiny_tokenizer.eos_token_id)
        assert expected and text == tiny_tokenizer.decode(expected, skip_special_tokens=True)
    assert scored.total.shape == (2,) and set(scored.terms) == {"length"}


def test_seeded_rollouts_repeat_and_differ_within_a_group(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    model = fresh_model(tiny_model_dir)
    rollouts = _rollouts(tiny_tokenizer, num_generations=4, max_completion_length=6)
    records = [type("R", (), {"input_ids": tiny_tokenizer("say cat")["input_ids"]})()]
    first = [r.token_ids for r in rollouts.sample(model, records, 123)]
    assert first == [r.token_ids for r in rollouts.sample(model, records, 123)]
    assert len({tuple(t) for t in first}) > 1


def _rollout(n_prompts: int, group: int = 2, offset: int = 0) -> Rollout:
    """A fixed rollout: prompt i is (5, 6, i), completion j of it has 1 + (i + j) % 4 tokens, rewards uneven."""
    prompt_ids, completion_ids, rewards = [], [], []
    for i in range(offset, offset + n_prompts):
        for j in range(group):
            prompt_ids.append([5, 6, 10 + i])
            completion_ids.append([20 + (i * 3 + j * 7 + k) % 50 for k in range(1 + (i + j) % 4)])
            rewards.append(float((i * 7 + j * 3) % 5))
    return Rollout(prompt_ids, completion_ids, torch.tensor(rewards), group)


def test_beta_zero_runs_no_reference_pass_and_sets_none_up(tiny_model_dir: Path) -> None:
    model = fresh_model(tiny_model_dir)
    entered = []

    @contextmanager
    def counting(m: torch.nn.Module) -> Iterator[torch.nn.Module]:
        entered.append(1)
        with torch.no_grad():
            yield m

    batch = grpo_prepare(model, _rollout(2), settings(), counting)
    assert not entered and "ref_logps" not in batch
    batch = grpo_prepare(model, _rollout(2), settings(beta=0.04), counting)
    assert len(entered) == 1 and batch["ref_logps"].shape == batch["targets"].shape
    # no reference at all at set-up: no frozen copy of a fully trained model, no disabled view
    assert live_reference(OBJECTIVES["grpo"], settings(), None, model) is None
    assert live_reference(OBJECTIVES["grpo"], settings(beta=0.04), None, model) is not None


@pytest.mark.parametrize("normalization", ["tokens", "sequences"])
def test_accumulation_of_2x4_prompts_equals_one_step_of_8_given_the_same_rollouts(tiny_model_dir: Path, normalization: str) -> None:
    config = settings(beta=0.04, num_iterations=2, loss_normalization=normalization)
    spec = OBJECTIVES["grpo"].bind(config, _frozen_reference(tiny_model_dir))
    accelerator = make_accelerator("no")
    grads = []
    for window in ([_rollout(8)], [_rollout(4), _rollout(4, offset=4)]):
        model = fresh_model(tiny_model_dir).train()
        batches = [spec.prepare(model, rollout) for rollout in window]
        accumulate_gradients(model, batches, spec, accelerator)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5) for n in grads[0])
    assert any(grads[0][n].abs().sum() > 0 for n in grads[0])


def _frozen_reference(model_dir: Path) -> Any:
    frozen = fresh_model(model_dir)

    @contextmanager
    def reference(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        with torch.no_grad():
            yield frozen
    return reference


# ---------------------------------------------------------------- runs


def _config(model_dir: Path, tmp_path: Path, name: str, steps: int, objective: dict[str, Any] | None = None,
            **training: Any):  # noqa: ANN202
    return tiny_config(
        model_dir, output={"dir": str(tmp_path / name)},
        data={"train": [str(toy_prompts_file(tmp_path, 48))], "val_size": 8, "max_length": 64},
        technique={"name": "full"},
        objective={"name": "grpo", "rewards": [VOWEL], "num_generations": 8, "max_completion_length": 8,
                   **(objective or {})},
        training={"max_steps": steps, "micro_batch_size": 4, "grad_accum": 1, "log_every": 1, "learning_rate": 3e-3,
                  **training},
        eval={"num_samples": 1, "max_new_tokens": 4},
    )


def _rewards(run_dir: Path) -> list[float]:
    return [m["reward"] for m in read_metrics(run_dir) if m["kind"] == "train"]


def test_grpo_learns_a_toy_verifiable_task_and_times_generation_apart(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = train(_config(tiny_model_dir, tmp_path, "run", 30), progress=False)
    rewards = _rewards(result.run_dir)
    assert sum(rewards[-6:]) / 6 > sum(rewards[:6]) / 6 + 0.3, rewards  # ~0.25 untrained, ~0.8 after 30 steps
    line = read_metrics(result.run_dir)[0]
    assert {"reward_std", "reward_starts_with_a_vowel", "completion_length", "zero_variance_groups", "clip_fraction",
            "entropy", "generation_s", "rewards_s"} <= set(line)
    info = json.loads((result.run_dir / "run_info.json").read_text())
    assert info["phases_s"]["generation"] > 0 and info["phases_s"]["training"] > 0
    assert result.evaluation["tuned"]["mean_reward"] == -result.evaluation["tuned"]["loss"]

    # `tunelab eval RUN --against base` on held-out prompts: the run's rewards of each system's greedy answers
    held_out = write_jsonl(tmp_path / "heldout.jsonl", [{"prompt": f"say {a} {i}", "reference": a}
                                                         for i, a in enumerate(ANIMALS * 5, start=100)])
    report = evaluate(result.run_dir, [held_out], ["base"], output=tmp_path / "eval", settings=EvalSettings(resamples=200))
    assert report["primary_metric"] == "mean_reward" and report["objective"]["baseline"] is None
    scores = report["metrics"]["mean_reward"]["scores"]
    tuned, base = (s["name"] for s in report["systems"])
    assert set(report["metrics"]) == {"mean_reward", "reward_starts_with_a_vowel"}
    against = report["comparisons"][0]["metrics"]["mean_reward"]
    assert scores[tuned] > scores[base] + 0.3 and against["ci_low"] > 0 and against["verdict"] == "better"
    # each answer and its reward, against plain transformers' greedy decoding of the saved model and of the base
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for name, folder in ((tuned, find_result(result.run_dir).result_dir), (base, tiny_model_dir)):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        for row in rows[:4]:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                                return_dict=True)["input_ids"]
            answer = tokenizer.decode(_uncached_greedy(model, list(ids), 8, tokenizer.convert_tokens_to_ids("<|im_end|>")))
            assert row["outputs"][name].strip() == answer.strip()
            assert row["stats"][name]["mean_reward"][0] == starts_with_a_vowel([], [answer])[0]
    assert rows[0]["reference"] == "reference: cat"  # the prompt record's reference column, as the rewards read it


def test_a_constant_reward_changes_nothing(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = _config(tiny_model_dir, tmp_path, "constant", 3, {"rewards": ["support.online:constant"]}, save_every=3)
    train(config, progress=False)
    weights, _ = checkpoint_tensors(Path(config.output.dir), 3)
    base = dict(fresh_model(tiny_model_dir).named_parameters())
    assert weights and all(torch.equal(value, base[name].detach()) for name, value in weights.items())


@pytest.mark.parametrize("iterations", [1, 2])
def test_resume_3_plus_3_equals_6_steps_rollouts_included(tiny_model_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch, iterations: int) -> None:
    objective = {"num_iterations": iterations, "beta": 0.04}
    straight = _config(tiny_model_dir, tmp_path, "straight", 6, objective, save_every=3)
    assert train(straight, progress=False).step == 6
    halves = _config(tiny_model_dir, tmp_path, "halves", 6, objective, save_every=3)
    with monkeypatch.context() as patch:
        patch.setattr(loop, "_StopRequest", StopAfter(3))
        assert train(halves, progress=False).step == 3
    assert train(halves, resume=True, progress=False).step == 6
    a, _ = checkpoint_tensors(Path(straight.output.dir), 6)
    b, _ = checkpoint_tensors(Path(halves.output.dir), 6)
    assert a and all(torch.equal(a[name], b[name]) for name in a)
    assert _rewards(Path(straight.output.dir)) == _rewards(Path(halves.output.dir))



def test_reused_rollouts_train_in_one_process_only(tiny_tokenizer: Any) -> None:
    with pytest.raises(ConfigError, match="num_iterations above 1 trains in one process only"):
        Rollouts(settings(num_iterations=2), tiny_tokenizer, [], 1, 0, RunInfo(), nullcontext, processes=2)


def test_a_completion_that_stopped_keeps_its_end_of_turn_token_and_the_step_figures(tiny_tokenizer: Any) -> None:
    from tunelab.generation import GenerationRequest

    rollouts = _rollouts(tiny_tokenizer, num_generations=2)
    rollouts.sample = lambda model, records, seed: [  # type: ignore[method-assign]
        GenerationRequest([1, 2], token_ids=[5], text="a", finish_reason="stop", end_token=2),
        GenerationRequest([1, 2], token_ids=[5, 6, 7], text="abc", finish_reason="length")]
    record = type("Record", (), {"input_ids": [1, 2], "prompt": "q", "columns": {}, "source": "f:1"})()
    plan = type("Plan", (), {"rank": 0, "micro_batches": lambda self, start: iter([[[record]]] * 4)})()
    seen: list[Rollout] = []
    _, _, figures = rollouts.window(None, lambda model, rollout: seen.append(rollout) or {}, plan, 0)
    assert seen[0].completion_ids == [[5, 2], [5, 6, 7]]  # the policy learns when to stop
    assert figures["reward"] == 1.0 and figures["zero_variance_groups"] == 1.0 and figures["completion_length"] == 2.5


def test_the_step_figures_pool_every_process_rollouts(tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under two processes each samples its own prompts: the logged reward, its spread, the completion length and
    the share of zero-variance groups are over both processes' completions, not the main's alone (which were half
    the step's). Rank 1's sums are recorded, then rank 0's collective adds them to its own."""
    from tunelab.generation import GenerationRequest
    from tunelab.training import rollout as rollout_module

    record = type("Record", (), {"input_ids": [1, 2], "prompt": "q", "columns": {}, "source": "f:1"})()
    plan = type("Plan", (), {"rank": 0, "micro_batches": lambda self, start: iter([[[record]]] * 4)})()

    def window(texts: list[str], collective: Any) -> dict[str, float]:
        rollouts = _rollouts(tiny_tokenizer, num_generations=2)
        rollouts.sample = lambda model, records, seed: [  # type: ignore[method-assign]
            GenerationRequest([1, 2], token_ids=[5] * len(t), text=t, finish_reason="length") for t in texts]
        monkeypatch.setattr(rollout_module.distributed, "sum_over_processes", collective)
        return rollouts.window(None, lambda model, rollout: {}, plan, 0)[2]

    other: list[list[float]] = []
    window(["xyzzy", "azzzz"], lambda values: other.append(values) or values)  # rank 1: rewards 0, 1; length 5
    pooled = window(["a", "abc"], lambda values: [a + b for a, b in zip(values, other[0])])  # rank 0: rewards 1, 1
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0])
    assert pooled["reward"] == 0.75 and pooled["reward_starts_with_a_vowel"] == 0.75
    assert pooled["reward_std"] == pytest.approx(float(rewards.std()), abs=1e-6)
    assert pooled["completion_length"] == 3.5 and pooled["zero_variance_groups"] == 0.5  # rank 1's group differs
    alone = window(["a", "abc"], lambda values: values)  # one process: its own completions
    assert alone["reward"] == 1.0 and alone["reward_std"] == 0.0 and alone["completion_length"] == 2.0


def test_an_online_objective_refuses_fsdp_and_takes_ddp(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"training.distributed: objective 'grpo' cannot be sharded with fsdp \(rollouts"):
        _config(tiny_model_dir, tmp_path, "fsdp", 1, distributed="fsdp")
    assert _config(tiny_model_dir, tmp_path, "ddp", 1, distributed="ddp").training.distributed == "ddp"  # control


@pytest.mark.parametrize("return_freed_memory,trims", [(None, 4), (False, 0)])
def test_an_online_run_returns_its_heap_before_each_forward(tiny_model_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, return_freed_memory: bool | None,
                                                            trims: int) -> None:
    """On a CPU an online run gives the heap's free pages back before each micro-batch's forward (the activations a
    backward freed, which the next forward reused too little of: docs/choosing.md), unless
    training.return_freed_memory is false: 2 steps x 2 micro-batches, 4 trims."""
    calls: list[int] = []
    monkeypatch.setattr(loop, "release_freed_heap", lambda: calls.append(1) or True)
    config = _config(tiny_model_dir, tmp_path, "trim", 2, {"num_generations": 2}, grad_accum=2,
                     return_freed_memory=return_freed_memory)
    train(config.model_copy(update={"eval": config.eval.model_copy(update={"num_samples": 0})}), progress=False)
    assert len(calls) == trims


def test_a_run_that_samples_nothing_keeps_its_heap(tiny_model_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: an SFT run (its batches are the data) trims nothing between its micro-batches."""
    from support.tiny import toy_chat_records

    calls: list[int] = []
    monkeypatch.setattr(loop, "release_freed_heap", lambda: calls.append(1) or True)
    data = write_jsonl(tmp_path / "chat.jsonl", toy_chat_records(16))
    train(tiny_config(tiny_model_dir, output={"dir": str(tmp_path / "sft")}, technique={"name": "lora"},
                      data={"train": [str(data)], "val_size": 0, "max_length": 64},
                      training={"max_steps": 2, "micro_batch_size": 2, "grad_accum": 2},
                      eval={"num_samples": 0, "before_after": False, "forgetting": False}), progress=False)
    assert calls == []


@pytest.mark.parametrize("environment,record", [
    ({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "32", "TUNELAB_BOUNDED_ONEDNN_CACHE": "an online objective on a CPU"},
     {"capacity": 32, "set_by": "tunelab train (an online objective on a CPU)"}),
    ({"DNNL_PRIMITIVE_CACHE_CAPACITY": "16"}, {"capacity": 16, "set_by": "the environment"}),
    ({}, {"capacity": None, "set_by": None}),
])
def test_an_online_run_records_onednns_cache_bound_and_warns_without_it(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        environment: dict[str, str], record: dict[str, Any]) -> None:
    """run_info.json's heap_policy says the capacity of oneDNN's primitive cache the run had and who set it (`tunelab
    train`, or the environment: oneDNN's older variable too); where an online run keeps oneDNN's default (the
    Python API: only the command's own process may set it), the log warns that the peak measured above the plan."""
    without_onednn_bound(monkeypatch)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    config = _config(tiny_model_dir, tmp_path, "onednn", 1, {"num_generations": 2})
    with caplog.at_level(logging.WARNING, logger="tunelab"):
        train(config.model_copy(update={"eval": config.eval.model_copy(update={"num_samples": 0})}), progress=False)
    info = json.loads((Path(config.output.dir) / "run_info.json").read_text())
    assert info["heap_policy"]["onednn_primitive_cache"] == record
    warned = [r.getMessage() for r in caplog.records if "oneDNN's primitive cache keeps" in r.getMessage()]
    assert len(warned) == (0 if environment else 1)
