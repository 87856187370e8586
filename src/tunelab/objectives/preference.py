"""What the preference objectives share: pair batches, sequence log-probs, the reference's log-probs (live or
precomputed) and the figures they log.

A micro-batch of B pairs is one (2B, T) batch: rows 0..B-1 are the chosen sides, rows B..2B-1 the rejected ones,
each example on its own row (pairs are never packed). The unit is the pair: every loss is summed over pairs and
the loop divides by the window's pair count, so gradient accumulation equals the big batch.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Literal, Mapping

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab import fs
from tunelab.data import IGNORE, collate
from tunelab.data.pairs import TokenizedPair
from tunelab.metrics import Metric, unit_mean
from tunelab.objectives.base import Batch, Evaluation, Reference
from tunelab.objectives.logps import supervised_token_logps

NEVER_PACKED = "each pair is scored side by side on rows of its own; pairs are never packed across examples"
ReferenceMode = Literal["live", "precomputed"]
REFERENCE_FIELD = Field(
    "live", description="The reference policy's log-probs: 'live' computes them at every step (with an adapter "
    "technique, the same model with the adapter switched off: no second copy; otherwise a frozen copy of the base); "
    "'precomputed' computes them once before training with the base model and caches them in the run folder "
    "(reference_logps.safetensors), so training holds no reference at all.",
)


def collate_pairs(rows: list[list[TokenizedPair]], pad_id: int) -> Batch:
    """B pairs -> (2B, T) input_ids, position_ids and targets: chosen sides first, then rejected sides; with
    precomputed reference log-probs also ``reference_logps`` (B, 2)."""
    pairs = [pair for row in rows for pair in row]
    batch = collate([[p.chosen] for p in pairs] + [[p.rejected] for p in pairs], pad_id)
    if pairs and all(p.reference is not None for p in pairs):
        batch["reference_logps"] = torch.tensor([p.reference for p in pairs], dtype=torch.float32)  # (B, 2)
    return batch


def pair_rows(pair: TokenizedPair) -> tuple[int, ...]:
    """A pair's rows in a batch (``Objective.batch_rows``): its chosen and its rejected side, each padded to the
    batch's longest side (not one row as long as both)."""
    return len(pair.chosen.input_ids), len(pair.rejected.input_ids)


def count_pairs(batch: Batch) -> int:
    return batch["input_ids"].shape[0] // 2


def sequence_logps(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each row's supervised tokens (2B,) and their count (2B,): log pi(answer | prompt)."""
    keep = batch["targets"] != IGNORE  # (R, T)
    token_logps, _ = supervised_token_logps(model, batch)  # (N,), the head run in chunks: no (N, V) logits
    rows = keep.nonzero()[:, 0]  # (N,) the row of each supervised position
    sums = torch.zeros(keep.shape[0], device=token_logps.device).index_add(0, rows, token_logps)  # (R,)
    return sums, keep.sum(dim=1)


def split(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B,) -> chosen (B,), rejected (B,)."""
    half = values.shape[0] // 2
    return values[:half], values[half:]


def reference_logps(model: nn.Module, batch: Batch, reference: Reference | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference policy's summed log-probs of the chosen and rejected sides, each (B,): carried by the batch
    when precomputed, else computed now (no gradients) with the run's reference."""
    if "reference_logps" in batch:
        return batch["reference_logps"][:, 0], batch["reference_logps"][:, 1]
    if reference is None:
        raise RuntimeError("this objective compares with a reference policy, but none was set up")
    with reference(model) as scorer:
        sums, _ = sequence_logps(scorer, batch)
    return split(sums.detach())


def pair_stats(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """The figures every pair objective logs, summed over pairs (the loop divides by the pair count): the implicit
    rewards of each side, their margin, and preference accuracy (chosen rewarded above rejected; a tie counts half,
    as a coin toss would rank it). Ties are exact where the policy is its reference (the base model before/after
    compares, step 0): every reward is 0 there, and counting ties wrong showed the base at 0.0, as if it ranked
    every pair the wrong way round (TRL's logged accuracy counts them wrong)."""
    chosen, rejected = reward_chosen.detach(), reward_rejected.detach()
    ranked = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
    return {"reward_chosen": chosen.sum(), "reward_rejected": rejected.sum(), "reward_margin": (chosen - rejected).sum(),
            "preference_accuracy": ranked.sum()}


def _ranking_metrics(classes: list[str]) -> list[Metric]:
    return [unit_mean("preference_accuracy"), unit_mean("logp_margin")]


@torch.no_grad()
def log_prob_ranking(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    """Each pair's (value, 1) statistics: 1 when the policy gives the chosen answer a higher summed log-prob than
    the rejected one, log pi(y_w|x) - log pi(y_l|x); no reference is involved (the base is scored the same way)."""
    chosen, rejected = split(sequence_logps(model, batch)[0])  # (B,), (B,)
    return ranking_stats(chosen - rejected, "preference_accuracy", "logp_margin")


def ranking_stats(margin: torch.Tensor, accuracy: str, mean_margin: str) -> dict[str, torch.Tensor]:
    """(B,) margins (chosen - rejected) -> the (B, 2) statistics of the share ranked right and of the mean margin."""
    margin = margin.detach().double()
    ones = torch.ones_like(margin)
    return {accuracy: torch.stack([(margin > 0).double(), ones], 1), mean_margin: torch.stack([margin, ones], 1)}


def chance(accuracy: str, mean_margin: str) -> Callable[[Batch, list[str]], tuple[str, dict[str, torch.Tensor]]]:
    """The baseline of a pair ranking: a coin toss ranks half the pairs right, with no margin."""
    def baseline(batch: Batch, classes: list[str]) -> tuple[str, dict[str, torch.Tensor]]:
        half = torch.full((count_pairs(batch),), 0.5, dtype=torch.float64)
        ones = torch.ones_like(half)
        return "chance", {accuracy: torch.stack([half, ones], 1), mean_margin: torch.stack([0 * half, ones], 1)}
    return baseline


def describe_ranking(accuracy: str, mean_margin: str, unit: str) -> Callable[[Mapping[str, list[float]], list[str]], str]:
    def describe(stats: Mapping[str, list[float]], classes: list[str]) -> str:
        # a pair is ranked right (1) or wrong (0); chance scores every pair 0.5 with no margin: it ranks neither
        ranked, margin = stats[accuracy][0], stats[mean_margin][0]
        first = "neither" if margin == 0 or ranked not in (0, 1) else "chosen" if ranked == 1 else "rejected"
        return f"{first} ranked first ({unit} margin {margin:+.3f})"
    return describe


# `tunelab eval` of a policy trained on pairs (dpo, ipo, orpo, simpo, kto): does it rank held-out pairs right?
LOG_PROB_RANKING = Evaluation(
    records="preference", collate=collate_pairs, metrics=_ranking_metrics, unit_stats=log_prob_ranking,
    baseline=chance("preference_accuracy", "logp_margin"),
    describe=describe_ranking("preference_accuracy", "logp_margin", "log-prob"),
)


@torch.no_grad()
def precompute_reference(model: nn.Module, pairs: list[TokenizedPair], pad_id: int, batch_size: int,
                         device: torch.device) -> list[tuple[float, float]]:
    """The reference (here: the base model, before the technique changes it) log-probs of every pair, once."""
    was_training = model.training
    model.eval()
    out: list[tuple[float, float]] = []
    for start in range(0, len(pairs), batch_size):
        batch = {k: v.to(device) for k, v in collate_pairs([[p] for p in pairs[start : start + batch_size]], pad_id).items()}
        chosen, rejected = split(sequence_logps(model, batch)[0])
        out += list(zip(chosen.tolist(), rejected.tolist()))
    model.train(was_training)
    return out




REFERENCE_CACHE = "reference_logps.safetensors"


def attach_reference(model: nn.Module, splits: dict[str, list[TokenizedPair]], pad_id: int, batch_size: int,
                     device: torch.device, run_dir: Path, write: bool) -> dict[str, list[TokenizedPair]]:
    """Each split's pairs with the reference (the base model, before the technique changes it) log-probs attached,
    computed once and cached in the run folder; a resumed run reads them back instead of computing them again."""
    path = run_dir / REFERENCE_CACHE
    cached = load_file(str(path)) if path.is_file() else {}
    values: dict[str, torch.Tensor] = {}
    for name, pairs in splits.items():
        saved = cached.get(name)
        if saved is None or saved.shape != (len(pairs), 2):
            saved = torch.tensor(precompute_reference(model, pairs, pad_id, batch_size, device) or [], dtype=torch.float32)
        values[name] = saved.reshape(len(pairs), 2)
    changed = any(name not in cached or not torch.equal(v, cached[name]) for name, v in values.items())
    if write and changed:
        with fs.atomic_file(fs.own_entry(run_dir, REFERENCE_CACHE)) as tmp:
            save_file({k: v.contiguous() for k, v in values.items()}, str(tmp))
    return {name: [replace(p, reference=tuple(v)) for p, v in zip(pairs, values[name].tolist())]
            for name, pairs in splits.items()}
