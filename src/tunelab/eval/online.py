"""A policy's greedy answers to prompts, rewarded by a run's rewards: how an online objective's policy is scored
both while it trains (its validation figure, ``training.rollout``) and by ``tunelab eval`` (against the base).

One function for both, so that the held-out figure of ``tunelab eval`` and the run's own validation reward are the
same measurement: greedy (no sampling noise), at most ``max_completion_length`` tokens, stopped at the end of turn.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable

import numpy as np
import torch

from tunelab.generation import GenerationRequest, Sampling, generate_batch
from tunelab.objectives.online import MEAN_REWARD
from tunelab.rewards import Reward, Scored, score


def rewarded_answers(model: torch.nn.Module, tokenizer: Any, records: list[Any], rewards: list[Reward],
                     max_new_tokens: int, batch_size: int,
                     autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
                     on_chunk: Callable[[int], None] | None = None) -> tuple[Scored, list[str]]:
    """The rewards of the greedy answer to each prompt record (its total and each term, (N,) each) and the answers."""
    totals: list[torch.Tensor] = []
    terms: dict[str, list[torch.Tensor]] = {}
    texts: list[str] = []
    greedy = Sampling(max_new_tokens=max_new_tokens)
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        with autocast():
            answers = generate_batch(model, tokenizer, [GenerationRequest(list(r.input_ids), greedy) for r in chunk])
        scored = score(rewards, [r.prompt for r in chunk], [a.text for a in answers],
                       [dict(r.columns) for r in chunk], [r.source for r in chunk])
        totals.append(scored.total)
        for name, values in scored.terms.items():
            terms.setdefault(name, []).append(values)
        texts += [a.text for a in answers]
        if on_chunk:
            on_chunk(len(chunk))
    empty = torch.zeros(0)
    return Scored(torch.cat(totals) if totals else empty, {n: torch.cat(v) for n, v in terms.items()}), texts


def term_name(reward: str) -> str:
    return f"reward_{reward}"


def unit_stats(scored: Scored) -> dict[str, np.ndarray]:
    """The (N, 2) (value, 1) statistics of the total and of each term, as ``metrics.unit_mean`` reads them."""
    figures = {MEAN_REWARD: scored.total, **{term_name(name): values for name, values in scored.terms.items()}}
    return {name: np.stack([v.double().numpy(), np.ones(len(v))], 1) for name, v in figures.items()}
