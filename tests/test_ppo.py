"""PPO: GAE, the clipped policy and value losses and the KL folded into the reward against hand-computed values,
the ratio of one epoch on fresh rollouts exactly 1, learning a toy verifiable task on the tiny model (and a
constant reward that teaches nothing), exact resume with the value head and mini-batches, the value head saved
beside a result that opens without it, and config errors."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from safetensors.torch import load_file
from support.ddp_driver import StopAfter
from support.online import toy_prompts_file
from support.runs import checkpoint_tensors, tiny_config
from support.tiny import fresh_model

from tunelab.config import build_config
from tunelab.data import IGNORE
from tunelab.errors import ConfigError
from tunelab.objectives import OBJECTIVES, ppo
from tunelab.objectives.base import attach_own_module
from tunelab.objectives.online import Rollout
from tunelab.objectives.ppo import PpoSettings, clipped_value_losses, explained_variance, gae, ppo_prepare, whiten
from tunelab.result import load_run
from tunelab.run_info import RunInfo
from tunelab.runs import read_metrics
from tunelab.training import loop, train
from tunelab.training.rollout import Rollouts

VOWEL = "support.online:starts_with_a_vowel"


def settings(**values: Any) -> PpoSettings:
    return PpoSettings(rewards=[VOWEL], **values)


# ---------------------------------------------------------------- closed forms

# Two completions: row 0 has 3 tokens (positions 1-3), row 1 has 2 (positions 1-2) then padding, whose value 9.0
# must never be read (the completion ends the episode: the value after its last token is 0).
MASK = torch.tensor([[False, True, True, True], [False, True, True, False]])
REWARDS = torch.tensor([[0.0, -0.1, 0.05, 1.0], [0.0, 0.2, -0.5, 0.0]])
VALUES = torch.tensor([[0.0, 0.5, 0.4, 0.8], [0.0, -0.3, 0.1, 9.0]])
# gamma 0.9, lam 0.8 (gamma lam = 0.72), by hand, last token first:
#   row 0: t3  delta = 1.0 - 0.8 = 0.2                          A = 0.2
#          t2  delta = 0.05 + 0.9 * 0.8 - 0.4 = 0.37            A = 0.37 + 0.72 * 0.2 = 0.514
#          t1  delta = -0.1 + 0.9 * 0.4 - 0.5 = -0.24           A = -0.24 + 0.72 * 0.514 = 0.13008
#   row 1: t2  delta = -0.5 - 0.1 = -0.6                         A = -0.6
#          t1  delta = 0.2 + 0.9 * 0.1 + 0.3 = 0.59              A = 0.59 - 0.72 * 0.6 = 0.158
GAE_TABLE = [[0.0, 0.13008, 0.514, 0.2], [0.0, 0.158, -0.6, 0.0]]


def test_gae_on_a_fixed_trajectory_equals_the_hand_computed_table() -> None:
    assert gae(REWARDS, VALUES, MASK, gamma=0.9, lam=0.8).tolist() == [pytest.approx(row, abs=1e-6) for row in GAE_TABLE]
    swapped = gae(REWARDS, VALUES, MASK, gamma=0.8, lam=0.9)  # negative control: the table tells them apart
    assert swapped.tolist() != [pytest.approx(row, abs=1e-6) for row in GAE_TABLE]
    # lam 1, gamma 1: the advantage is the return to the end minus the value (Monte Carlo)
    assert gae(REWARDS, VALUES, MASK, 1.0, 1.0)[0, 1].item() == pytest.approx(-0.1 + 0.05 + 1.0 - 0.5, abs=1e-6)


def test_whitening_and_explained_variance() -> None:
    white = whiten(torch.tensor(GAE_TABLE), MASK)
    assert white[MASK].mean().item() == pytest.approx(0, abs=1e-6) and white[MASK].std().item() == pytest.approx(1, abs=1e-6)
    assert white[~MASK].tolist() == [0.0, 0.0, 0.0]
    returns = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert explained_variance(returns, returns) == 1.0 and explained_variance(torch.zeros(4), returns) == 0.0
    assert explained_variance(torch.tensor([1.0, 2.0, 3.0, 5.0]), returns) == pytest.approx(1 - 0.25 / (5 / 3), abs=1e-6)


def test_clipped_value_losses_equal_hand_computed_values() -> None:
    values, old = torch.tensor([1.0, 0.0, 0.5, 0.9]), torch.full((4,), 0.5)
    returns = torch.tensor([2.0, 0.0, 0.6, 0.2])
    losses, clipped = clipped_value_losses(values, old, returns, clip=0.2)
    expected = [0.5 * 1.69,  # V clipped to 0.7: (0.7 - 2)^2 = 1.69 beats (1 - 2)^2 = 1
                0.5 * 0.09,  # V clipped to 0.3: (0.3 - 0)^2 = 0.09 beats (0 - 0)^2 = 0
                0.5 * 0.01,  # V did not move: both terms (0.5 - 0.6)^2
                0.5 * 0.49]  # V 0.9 clipped to 0.7: (0.9 - 0.2)^2 = 0.49 beats (0.7 - 0.2)^2 = 0.25, unclipped
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert clipped.tolist() == [True, True, False, False]


@contextmanager
def fixed_policy(logps: torch.Tensor, values: torch.Tensor, vocab: int = 4) -> Iterator[None]:
    """ppo's forward replaced: the token log-probs ``logps`` (N,), the entropy of uniform logits over ``vocab``,
    values (N,)."""
    original = ppo.policy_and_values
    ppo.policy_and_values = lambda model, batch, with_entropy=False: (logps, torch.full((len(logps),), math.log(vocab)),
                                                                      values)
    try:
        yield
    finally:
        ppo.policy_and_values = original


def _fixed_batch() -> dict[str, torch.Tensor]:
    """Two completions of a one-token prompt: 1 token and 3 tokens (targets shifted)."""
    return {"targets": torch.tensor([[7, IGNORE, IGNORE, IGNORE], [7, 8, 9, IGNORE]]),
            "old_logps": torch.tensor([[-1.0, 0, 0, 0], [-2.0, -1.0, -1.0, 0]]),
            "old_values": torch.tensor([[0.5, 0, 0, 0], [0.0, 0.2, 0.4, 0]]),
            "returns": torch.tensor([[1.0, 0, 0, 0], [-1.0, 0.2, 0.0, 0]]),
            "advantages": torch.tensor([[1.0, 0, 0, 0], [-1.0, 2.0, 0.5, 0]]),
            "kl": torch.tensor([[0.1, 0, 0, 0], [0.0, -0.2, 0.3, 0]]),
            "explained_variance": torch.tensor([0.25, 0.25])}


def test_the_loss_is_the_clipped_policy_loss_plus_the_weighted_clipped_value_loss() -> None:
    logps = torch.tensor([-0.7, -2.0, -1.3, -1.0])  # ratios e^.3 = 1.35, 1, e^-.3 = 0.74, 1
    values = torch.tensor([0.6, 0.5, 0.4, 0.0])
    with fixed_policy(logps, values):
        result = OBJECTIVES["ppo"].bind(settings(ppo_epochs=2, vf_coef=0.5)).loss_sum(None, _fixed_batch())
    policy = [-1.2 * 1.0,  # A > 0, ratio 1.35 above 1.2: the clip bound
              1.0,  # A < 0, ratio 1: -(1 * -1)
              -math.exp(-0.3) * 2.0,  # A > 0, ratio 0.74: the ratio (clipping only limits gains)
              -0.5]
    value = [0.5 * 0.4 ** 2,  # 0.6 against old 0.5: inside the clip range, (0.6 - 1)^2
             0.5 * 1.5 ** 2,  # 0.5 against old 0.0, clipped to 0.2: (0.2 + 1)^2 = 1.44 < (0.5 + 1)^2 = 2.25
             0.5 * 0.2 ** 2,  # 0.4 against old 0.2: at the edge of the range, (0.4 - 0.2)^2
             0.5 * 0.2 ** 2]  # 0.0 against old 0.4, clipped to 0.2: (0.2 - 0)^2 = 0.04 > (0 - 0)^2
    assert (result.loss_sum.item(), result.num_units) == (pytest.approx(sum(policy) + 0.5 * sum(value), abs=1e-6), 4)
    assert result.stats["clip_fraction"].item() == 1  # one token of four
    assert result.stats["value_loss"].item() == pytest.approx(sum(value), abs=1e-6)
    assert result.stats["value_clip_fraction"].item() == 1  # the last token
    assert result.stats["kl"].item() == pytest.approx(0.2, abs=1e-6)
    assert result.stats["explained_variance"].item() == pytest.approx(4 * 0.25, abs=1e-6)
    assert result.stats["entropy"].item() == pytest.approx(4 * math.log(4), abs=1e-6)


def test_with_one_epoch_on_fresh_rollouts_the_ratio_is_one_and_its_gradient_the_policy_gradient() -> None:
    logps = torch.tensor([-0.7, -2.0, -1.3, -1.0], requires_grad=True)  # far from old_logps: never read
    values = torch.tensor([0.5, 0.0, 0.2, 0.4], requires_grad=True)  # the rollout's values: no value loss beyond
    batch = _fixed_batch()
    with fixed_policy(logps, values):
        result = OBJECTIVES["ppo"].bind(settings(ppo_epochs=1, vf_coef=0.0)).loss_sum(None, batch)
    result.loss_sum.backward()
    assert result.stats["clip_fraction"].item() == 0
    assert logps.grad.tolist() == [-1.0, 1.0, -2.0, -0.5]  # -A per token: d/dlogp of -exp(logp - sg(logp)) A


def test_one_epoch_on_fresh_rollouts_of_the_tiny_model_has_ratio_exactly_one(tiny_model_dir: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    model = fresh_model(tiny_model_dir).train()
    attach_own_module(ppo.VALUE_HEAD, model, None)
    spec = OBJECTIVES["ppo"].bind(settings(ppo_epochs=1, beta=0.0))
    batch = spec.prepare(model, Rollout([[5, 6, 7], [5, 6, 8]], [[20, 21, 22], [30, 31]], torch.tensor([1.0, 0.0]), 1))
    ratios: list[torch.Tensor] = []
    original = ppo.clipped_token_losses
    monkeypatch.setattr(ppo, "clipped_token_losses",
                        lambda logps, old, *rest: ratios.append(torch.exp(logps - old)) or original(logps, old, *rest))
    result = spec.loss_sum(model, batch)
    assert torch.equal(ratios[0], torch.ones(5)) and result.stats["clip_fraction"].item() == 0


def test_the_kl_to_the_reference_is_subtracted_from_every_tokens_reward(tiny_model_dir: Path) -> None:
    model = fresh_model(tiny_model_dir)
    attach_own_module(ppo.VALUE_HEAD, model, None)  # zero at first: every value is 0
    reference = fresh_model(tiny_model_dir)
    with torch.no_grad():  # a reference that differs from the policy
        reference.get_output_embeddings().weight.mul_(1.5)

    @contextmanager
    def scorer(m: torch.nn.Module) -> Iterator[torch.nn.Module]:
        with torch.no_grad():
            yield reference
    rollout = Rollout([[5, 6, 7], [5, 6, 8]], [[20, 21, 22], [30, 31]], torch.tensor([1.0, -0.5]), 1)
    plain = ppo_prepare(model, rollout, settings(beta=0.0, gamma=1.0, lam=1.0, whiten_advantages=False), None)
    penalised = ppo_prepare(model, rollout, settings(beta=0.1, gamma=1.0, lam=1.0, whiten_advantages=False), scorer)
    keep = plain["targets"] != IGNORE
    # values 0, gamma = lam = 1: each token's return is the reward to the end, the KL penalties included
    kl = penalised["kl"]
    to_go = lambda grid: grid.flip(1).cumsum(1).flip(1)  # noqa: E731 - (R, T) sums from each token to the end
    last = torch.zeros_like(kl)
    for row, reward in enumerate([1.0, -0.5]):  # each row's last completion token: its reward
        last[row, keep[row].nonzero().max()] = reward
    assert torch.allclose(penalised["returns"][keep], to_go(last - 0.1 * kl)[keep], atol=1e-6)
    assert torch.allclose(plain["returns"][keep], to_go(last)[keep], atol=1e-6)
    assert kl[keep].abs().sum() > 0.1 and torch.equal(plain["kl"], torch.zeros_like(kl))


# ---------------------------------------------------------------- runs on the tiny model


def _config(model_dir: Path, tmp_path: Path, name: str, steps: int, objective: dict[str, Any] | None = None,
            technique: dict[str, Any] | None = None, **training: Any):  # noqa: ANN202
    return tiny_config(
        model_dir, output={"dir": str(tmp_path / name)},
        data={"train": [str(toy_prompts_file(tmp_path, 48))], "val_size": 8, "max_length": 64},
        technique=technique or {"name": "full"},
        objective={"name": "ppo", "rewards": [VOWEL], "num_generations": 8, "max_completion_length": 8,
                   "ppo_epochs": 2, "beta": 0.01, "lam": 1.0, **(objective or {})},
        training={"max_steps": steps, "micro_batch_size": 4, "grad_accum": 1, "log_every": 1, "learning_rate": 5e-3,
                  **training},
        eval={"num_samples": 1, "max_new_tokens": 4},
    )


def _figure(run_dir: Path, name: str) -> list[float]:
    return [m[name] for m in read_metrics(run_dir) if m["kind"] == "train"]


def test_ppo_learns_a_toy_verifiable_task_and_logs_its_figures(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = train(_config(tiny_model_dir, tmp_path, "run", 30), progress=False)
    rewards = _figure(result.run_dir, "reward")
    assert sum(rewards[-6:]) / 6 > sum(rewards[:6]) / 6 + 0.3, rewards  # ~0.2 untrained, ~0.85 after 30 steps
    line = read_metrics(result.run_dir)[0]
    assert {"reward", "reward_std", "kl", "clip_fraction", "entropy", "completion_length", "value_loss",
            "value_clip_fraction", "explained_variance", "generation_s"} <= set(line)
    assert result.evaluation["tuned"]["mean_reward"] == -result.evaluation["tuned"]["loss"]


def test_a_constant_reward_teaches_nothing(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The same run, rewarded a constant: the vowel reward, logged with weight 0, does not rise (PPO still moves
    the policy, by the value head's errors and the KL penalty, but not towards the task)."""
    constant = {"rewards": ["support.online:constant", {"function": VOWEL, "weight": 0}]}
    result = train(_config(tiny_model_dir, tmp_path, "constant", 30, constant), progress=False)
    assert set(_figure(result.run_dir, "reward_constant")) == {1.0}
    vowels = _figure(result.run_dir, "reward_starts_with_a_vowel")
    assert sum(vowels[-6:]) / 6 < sum(vowels[:6]) / 6 + 0.1, vowels


def test_resume_3_plus_3_equals_6_steps_value_head_and_mini_batches_included(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    objective = {"ppo_epochs": 2, "num_mini_batches": 2, "beta": 0.04}  # 4 steps per rollout: step 3 reuses one
    lora = {"name": "lora", "r": 4}
    straight = _config(tiny_model_dir, tmp_path, "straight", 6, objective, lora, save_every=3)
    assert train(straight, progress=False).step == 6
    halves = _config(tiny_model_dir, tmp_path, "halves", 6, objective, lora, save_every=3)
    with monkeypatch.context() as patch:
        patch.setattr(loop, "_StopRequest", StopAfter(3))
        assert train(halves, progress=False).step == 3
    assert train(halves, resume=True, progress=False).step == 6
    a, _ = checkpoint_tensors(Path(straight.output.dir), 6)
    b, _ = checkpoint_tensors(Path(halves.output.dir), 6)
    assert "value_head.weight" in a and a["value_head.weight"].abs().sum() > 0
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    for figure in ("reward", "value_loss", "clip_fraction"):
        assert _figure(Path(straight.output.dir), figure) == _figure(Path(halves.output.dir), figure)


def test_the_value_head_is_saved_beside_a_result_that_opens_without_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = train(_config(tiny_model_dir, tmp_path, "full", 2, save_every=2), progress=False)
    saved = ppo.load_value_head(result.run_dir)
    trained, _ = checkpoint_tensors(result.run_dir, 2)
    assert torch.equal(saved.weight, trained["value_head.weight"]) and saved.weight.abs().sum() > 0
    weights = load_file(str(result.run_dir / "model" / "model.safetensors"))
    assert not any("value_head" in name for name in weights)  # plain transformers finds no key it does not know
    assert not hasattr(load_run(result.run_dir, device="cpu", dtype="float32").model, "value_head")


def test_mini_batches_split_each_rollout_without_overlap(tiny_tokenizer: Any) -> None:
    config = settings(ppo_epochs=2, num_mini_batches=2)
    rollouts = Rollouts(config, tiny_tokenizer, [], 1, 0, RunInfo(), nullcontext, micro_batch_size=3)
    window = [{"targets": torch.arange(6)[:, None], "advantages": torch.arange(6).float()}]
    parts = [rollouts._part(window, step)[0]["targets"].flatten().tolist() for step in range(4)]
    assert sorted(parts[0] + parts[1]) == sorted(parts[2] + parts[3]) == list(range(6))
    assert all(len(p) == 3 for p in parts) and parts[0] != parts[2]  # each pass reshuffles
    assert rollouts._part(window, 1)[0]["targets"].flatten().tolist() == parts[1]  # a function of the step alone


def test_config_errors_name_the_key_and_what_was_expected(tiny_tokenizer: Any, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"objective\.gamma: Input should be less than or equal to 1"):
        build_config({"model": {"name": "x"}, "data": {"train": ["a.jsonl"]},
                      "objective": {"name": "ppo", "rewards": [VOWEL], "gamma": 1.5}})
    with pytest.raises(ConfigError, match="objective 'ppo' cannot be sharded with fsdp"):
        build_config({"model": {"name": "x"}, "data": {"train": ["a.jsonl"]},
                      "objective": {"name": "ppo", "rewards": [VOWEL]}, "training": {"distributed": "fsdp"}})
    with pytest.raises(ConfigError, match=r"objective.num_mini_batches: expected at most training.micro_batch_size x "
                                          r"objective.num_generations = 4 \(the completions of a micro-batch\), got 5"):
        Rollouts(settings(num_mini_batches=5, num_generations=2), tiny_tokenizer, [], 1, 0, RunInfo(), nullcontext,
                 micro_batch_size=2)
    with pytest.raises(ConfigError, match="objective.ppo_epochs x num_mini_batches above 1 trains in one process"):
        Rollouts(settings(), tiny_tokenizer, [], 1, 0, RunInfo(), nullcontext, processes=2)
