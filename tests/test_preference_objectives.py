"""The preference objectives (dpo, ipo, orpo, simpo, kto) and the reward model, on the tiny model in seconds:
closed forms, step-0 invariants, the reference without a copy, accumulation = big batch, and that they learn."""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from support.preference import toy_completions, toy_pairs
from transformers import AutoModelForSequenceClassification

from tunelab.data.pairs import TokenizedPair
from tunelab.objectives import OBJECTIVES, LossSum, ObjectiveSpec
from tunelab.objectives.dpo import dpo_losses
from tunelab.objectives.ipo import ipo_losses
from tunelab.objectives.kto import KtoSettings, kto_losses
from tunelab.objectives.orpo import orpo_losses
from tunelab.objectives.preference import attach_reference, collate_pairs, sequence_logps, split
from tunelab.objectives.reference import frozen_reference, reference_view
from tunelab.objectives.reward import bradley_terry_losses
from tunelab.techniques import TECHNIQUES, RunContext
from tunelab.training.loop import accumulate_gradients

PAIR_OBJECTIVES = ("dpo", "ipo", "orpo", "simpo", "reward")
LN2 = math.log(2)


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ---------------------------------------------------------------- closed forms on fixed log-probs

POLICY = (torch.tensor([-5.0, -9.0], dtype=torch.float64), torch.tensor([-7.0, -6.5], dtype=torch.float64))
REFERENCE = (torch.tensor([-6.0, -8.0], dtype=torch.float64), torch.tensor([-6.5, -7.0], dtype=torch.float64))
LENGTHS = (torch.tensor([4.0, 6.0], dtype=torch.float64), torch.tensor([5.0, 3.0], dtype=torch.float64))


def test_dpo_and_ipo_equal_their_closed_forms() -> None:
    beta, eps = 0.2, 0.1
    losses, chosen, rejected = dpo_losses(POLICY, REFERENCE, beta, eps)
    for i in range(2):
        h = beta * ((POLICY[0][i] - REFERENCE[0][i]) - (POLICY[1][i] - REFERENCE[1][i])).item()
        assert losses[i].item() == pytest.approx(-(1 - eps) * _logsig(h) - eps * _logsig(-h), abs=1e-6)
        assert (chosen[i] - rejected[i]).item() == pytest.approx(h, abs=1e-6)
    losses, _, _ = ipo_losses(POLICY, REFERENCE, LENGTHS, beta)
    for i in range(2):
        h = ((POLICY[0][i] - REFERENCE[0][i]) / LENGTHS[0][i] - (POLICY[1][i] - REFERENCE[1][i]) / LENGTHS[1][i]).item()
        assert losses[i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2, abs=1e-6)


def test_orpo_simpo_kto_and_bradley_terry_equal_their_closed_forms() -> None:
    from tunelab.objectives.simpo import simpo_losses

    mean_c, mean_r = torch.tensor([-0.7, -1.9], dtype=torch.float64), torch.tensor([-1.2, -0.4], dtype=torch.float64)
    lam = 0.25
    losses, _, _ = orpo_losses(mean_c, mean_r, lam)
    for i in range(2):
        c, r = mean_c[i].item(), mean_r[i].item()
        log_odds = (c - math.log(1 - math.exp(c))) - (r - math.log(1 - math.exp(r)))
        assert losses[i].item() == pytest.approx(-c - lam * _logsig(log_odds), abs=1e-6)
    beta, gamma = 2.0, 0.5
    losses, _, _ = simpo_losses(mean_c, mean_r, beta, gamma)
    for i in range(2):
        assert losses[i].item() == pytest.approx(-_logsig(beta * (mean_c[i] - mean_r[i]).item() - gamma), abs=1e-6)
    settings = KtoSettings(beta=0.3, desirable_weight=1.0, undesirable_weight=1.5)
    ratio, z0 = torch.tensor([0.8, -1.1, 0.3], dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64)
    desirable = torch.tensor([True, False, False])
    losses = kto_losses(ratio, desirable, z0, settings)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert losses[0].item() == pytest.approx(1.0 * (1 - sig(0.3 * (0.8 - 0.2))), abs=1e-6)
    assert losses[1].item() == pytest.approx(1.5 * (1 - sig(0.3 * (0.2 + 1.1))), abs=1e-6)
    assert losses[2].item() == pytest.approx(1.5 * (1 - sig(0.3 * (0.2 - 0.3))), abs=1e-6)
    scores_c, scores_r = torch.tensor([1.5, -0.2], dtype=torch.float64), torch.tensor([0.5, 0.3], dtype=torch.float64)
    losses = bradley_terry_losses(scores_c, scores_r, 0.4)
    for i in range(2):
        assert losses[i].item() == pytest.approx(-_logsig((scores_c[i] - scores_r[i]).item() - 0.4), abs=1e-6)


# ---------------------------------------------------------------- step 0 and the reference policy


def _lora(model: torch.nn.Module, task_type: str = "CAUSAL_LM", **settings: Any) -> torch.nn.Module:
    technique = TECHNIQUES["lora"]
    return technique.apply(model, technique.config_class(**settings), RunContext(task_type=task_type))


def _policy_and_reference(model_dir: Path, technique: str) -> tuple[torch.nn.Module, Any]:
    """The model as training prepares it, and its reference: the disabled adapter (lora) or a frozen copy (full)."""
    from support.tiny import fresh_model

    model = fresh_model(model_dir).train()
    spec = TECHNIQUES[technique]
    frozen = frozen_reference(model) if spec.disabled_view is None else None
    model = spec.apply(model, spec.config_class(), RunContext())
    return model, reference_view(spec.disabled_view, frozen)


@pytest.mark.parametrize("technique", ["lora", "full"])
def test_step_zero_dpo_loss_is_ln2(tiny_model_dir: Path, tiny_tokenizer: Any, technique: str) -> None:
    model, reference = _policy_and_reference(tiny_model_dir, technique)
    bound = OBJECTIVES["dpo"].bind(OBJECTIVES["dpo"].config_class(), reference)
    batch = collate_pairs([[p] for p in toy_pairs(tiny_tokenizer, n=6)], tiny_tokenizer.pad_token_id)
    result = bound.loss_sum(model, batch)
    assert result.num_units == 6
    assert result.loss_sum.item() / result.num_units == pytest.approx(LN2, abs=1e-4)
    # the policy is its reference: every pair is a tie, which counts half (chance), not wrong
    assert result.stats["preference_accuracy"].item() == 3.0


def test_preference_accuracy_counts_a_tie_half() -> None:
    """pair_stats on fixed rewards: chosen above rejected 1, a tie 0.5, below 0 (summed over pairs)."""
    from tunelab.objectives.preference import pair_stats

    stats = pair_stats(torch.tensor([1.0, 0.0, -1.0, 0.25]), torch.tensor([0.0, 0.0, 0.0, 0.25]))
    assert stats["preference_accuracy"].item() == 1.0 + 0.5 + 0.0 + 0.5
    assert stats["reward_margin"].item() == 0.0


def test_precomputed_and_live_reference_give_the_same_first_loss(tiny_model_dir: Path, tiny_tokenizer: Any,
                                                                    tmp_path: Path) -> None:
    from support.tiny import fresh_model

    base = fresh_model(tiny_model_dir)
    pairs = toy_pairs(tiny_tokenizer, n=6)
    attached = attach_reference(base, {"train": pairs}, tiny_tokenizer.pad_token_id, 4, torch.device("cpu"), tmp_path,
                                True)["train"]
    assert (tmp_path / "reference_logps.safetensors").is_file()
    model = _lora(base, init="gaussian")  # a policy away from the reference, so the loss is not just ln 2
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    live = OBJECTIVES["dpo"].bind(OBJECTIVES["dpo"].config_class(), reference_view(TECHNIQUES["lora"].disabled_view, None))
    settings = OBJECTIVES["dpo"].config_class(reference="precomputed")
    cached = OBJECTIVES["dpo"].bind(settings, None)
    pad = tiny_tokenizer.pad_token_id
    live_loss = live.loss_sum(model.eval(), collate_pairs([[p] for p in pairs], pad)).loss_sum.item()
    cached_batch = collate_pairs([[p] for p in attached], pad)
    assert "reference_logps" in cached_batch
    assert cached.loss_sum(model, cached_batch).loss_sum.item() == pytest.approx(live_loss, abs=1e-5)
    assert abs(live_loss / 6 - LN2) > 1e-3


@contextmanager
def _no_reference(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    raise AssertionError("the reference was used")
    yield model


@pytest.mark.parametrize("name", ["orpo", "simpo"])
def test_orpo_and_simpo_load_no_reference(tiny_model_dir: Path, tiny_tokenizer: Any, name: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from support.tiny import fresh_model

    from tunelab.objectives import reference as reference_module

    copies = []
    monkeypatch.setattr(reference_module, "frozen_reference", lambda model: copies.append(model) or model)
    objective = OBJECTIVES[name]
    # with `full` (no disabled view) a reference would be a frozen copy: none is made, and none is set up
    assert reference_module.live_reference(objective, objective.config_class(), None, fresh_model(tiny_model_dir)) is None
    assert copies == []
    dpo = OBJECTIVES["dpo"]  # control: dpo with `full` does make the copy
    assert reference_module.live_reference(dpo, dpo.config_class(), None, fresh_model(tiny_model_dir)) is not None
    assert len(copies) == 1
    batch = collate_pairs([[p] for p in toy_pairs(tiny_tokenizer, n=4)], tiny_tokenizer.pad_token_id)
    result = objective.bind(objective.config_class(), _no_reference).loss_sum(fresh_model(tiny_model_dir), batch)
    assert torch.isfinite(result.loss_sum) and result.num_units == 4


def test_the_disabled_adapter_is_exactly_the_frozen_base(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    from support.tiny import fresh_model

    model = _lora(fresh_model(tiny_model_dir))
    with torch.no_grad():  # a trained adapter: its B matrices away from zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    batch = collate_pairs([[p] for p in toy_pairs(tiny_tokenizer, n=6)], tiny_tokenizer.pad_token_id)
    with reference_view(TECHNIQUES["lora"].disabled_view, None)(model.train()) as scorer:
        disabled = sequence_logps(scorer, batch)[0]
    with torch.no_grad():
        base = sequence_logps(fresh_model(tiny_model_dir), batch)[0]
        adapted = sequence_logps(model.eval(), batch)[0]
    assert torch.equal(disabled, base)
    assert not torch.allclose(adapted, base)  # control: the adapter does change the log-probs


def test_with_full_the_frozen_copy_never_changes(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    model, reference = _policy_and_reference(tiny_model_dir, "full")
    with reference(model) as frozen:
        before = copy.deepcopy(frozen.state_dict())
    bound = OBJECTIVES["dpo"].bind(OBJECTIVES["dpo"].config_class(), reference)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pairs = toy_pairs(tiny_tokenizer, n=6)
    for _ in range(3):
        bound.loss_sum(model, collate_pairs([[p] for p in pairs], tiny_tokenizer.pad_token_id)).loss_sum.backward()
        optimizer.step()
        optimizer.zero_grad()
    with reference(model) as frozen:
        assert all(torch.equal(before[k], v) for k, v in frozen.state_dict().items())
    assert not torch.equal(before["lm_head.weight"], model.lm_head.weight)  # control: the policy did train


# ---------------------------------------------------------------- accumulation = big batch


def _setup(name: str, model_dir: Path) -> tuple[torch.nn.Module, ObjectiveSpec]:
    """A LoRA policy (a scalar head for the reward model) with its reference, the objective bound to it."""
    from support.tiny import fresh_model

    objective = OBJECTIVES[name]
    torch.manual_seed(0)
    if objective.num_labels is None:
        base = fresh_model(model_dir)
    else:
        base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=objective.num_labels).eval()
    settings = objective.config_class(**({"kl": "zero"} if name == "kto" else {}))
    model = _lora(base, objective.task_type, init="gaussian")
    with torch.no_grad():  # away from the reference, so every term of the loss has a gradient
        for pname, param in model.named_parameters():
            if "lora_B" in pname:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    return model, objective.bind(settings, reference_view(TECHNIQUES["lora"].disabled_view, None))


def _rows(name: str, tokenizer: Any) -> list[Any]:
    return toy_completions(tokenizer, n=6) if name == "kto" else toy_pairs(tokenizer, n=6)


def _grads(model: torch.nn.Module, window: list[dict[str, torch.Tensor]], spec: ObjectiveSpec) -> dict[str, torch.Tensor]:
    from tunelab.distributed import make_accelerator

    model.zero_grad(set_to_none=True)
    accumulate_gradients(model, window, spec, make_accelerator("no"))
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("name", [*PAIR_OBJECTIVES, "kto"])
def test_accumulation_equals_the_big_batch(tiny_model_dir: Path, tiny_tokenizer: Any, name: str) -> None:
    model, spec = _setup(name, tiny_model_dir)
    model.eval()  # no dropout: the same forward in both orders
    rows, pad = _rows(name, tiny_tokenizer), tiny_tokenizer.pad_token_id
    collate = OBJECTIVES[name].collate
    big = _grads(model, [collate([[r] for r in rows], pad)], spec)
    uneven = _grads(model, [collate([[rows[0]]], pad), collate([[r] for r in rows[1:]], pad)], spec)  # 1 + 5 units
    assert big.keys() == uneven.keys() and big
    for key in big:
        torch.testing.assert_close(uneven[key], big[key], rtol=1e-4, atol=1e-6)
    # negative control: each micro-batch's mean, averaged, weights the lone unit five times too much
    mean_of_means = ObjectiveSpec(lambda m, b: LossSum(spec.loss_sum(m, b).loss_sum / spec.count_units(b), 1),
                                  lambda b: 1)
    naive = _grads(model, [collate([[rows[0]]], pad), collate([[r] for r in rows[1:]], pad)], mean_of_means)
    assert any(not torch.allclose(naive[k] / 2, big[k], rtol=1e-3, atol=1e-6) for k in big)


# ---------------------------------------------------------------- they learn


def _train(model: torch.nn.Module, spec: ObjectiveSpec, rows: list[Any], pad: int, steps: int, lr: float) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        batch = spec.collate([[rows[(step * 4 + k) % len(rows)]] for k in range(4)], pad)
        result = spec.loss_sum(model, batch)
        (result.loss_sum / result.num_units).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def _margin(model: torch.nn.Module, pairs: list[TokenizedPair], pad: int) -> float:
    with torch.no_grad():
        chosen, rejected = split(sequence_logps(model, collate_pairs([[p] for p in pairs], pad))[0])
    return (chosen - rejected).mean().item()


def test_dpo_raises_the_held_out_margin(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    from support.tiny import fresh_model

    pad = tiny_tokenizer.pad_token_id
    train, held_out = toy_pairs(tiny_tokenizer, 0, 24), toy_pairs(tiny_tokenizer, 100, 12)
    model = _lora(fresh_model(tiny_model_dir))
    before = _margin(model, held_out, pad)
    spec = OBJECTIVES["dpo"].bind(OBJECTIVES["dpo"].config_class(beta=0.5), reference_view(TECHNIQUES["lora"].disabled_view, None))
    _train(model, spec, train, pad, steps=30, lr=1e-2)
    assert _margin(model, held_out, pad) > before + 1.0


def test_a_reward_model_ranks_held_out_pairs(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    from tunelab.objectives.reward import scores

    pad = tiny_tokenizer.pad_token_id
    torch.manual_seed(0)  # the new score head's initialisation
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = pad  # the head scores the last token that is not padding
    objective = OBJECTIVES["reward"]
    _train(model, objective.bind(objective.config_class()), toy_pairs(tiny_tokenizer, 0, 24), pad, steps=40, lr=1e-3)
    held_out = toy_pairs(tiny_tokenizer, 100, 30)
    with torch.no_grad():
        chosen, rejected = split(scores(model, collate_pairs([[p] for p in held_out], pad)))
    assert (chosen > rejected).float().mean().item() > 0.9
