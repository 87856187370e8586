"""Rollouts of an online objective (GRPO): every optimizer step, the prompts of the step's micro-batches are
continued by the policy, ``num_generations`` completions each (``tunelab.generation``: one left-padded, KV-cached
``generate`` call per micro-batch), the completions are scored by the run's rewards (``tunelab.rewards``), and the
objective's ``prepare`` turns each micro-batch into the batch its loss reads.

Sampling is seeded from (training.seed, step, micro-batch, process), so a resumed run samples exactly the
completions the uninterrupted run would have: the generation RNG is a function of the checkpoint's step. With
``num_iterations`` k, one batch of rollouts serves k optimizer steps: step s trains on the rollouts drawn at step
s - s % k from the plan's micro-batches of rollout number s // k. An objective whose settings split rollouts into
``num_mini_batches`` m (PPO) trains each step on one part of every micro-batch's completions: reuse number
i = s % k is pass i // m, part i % m, the parts cut from a shuffle seeded by (seed, drawn step, pass, micro-batch).

Generation, scoring and training are timed apart: each metrics line has ``generation_s`` and ``rewards_s``, and
run_info.json's phases hold ``generation`` and ``rewards`` beside ``training``.
"""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager
from typing import Any, Callable

import torch

from tunelab import distributed
from tunelab.errors import ConfigError
from tunelab.eval.online import rewarded_answers, term_name
from tunelab.generation import GenerationRequest, Sampling, generate_batch
from tunelab.objectives import Batch
from tunelab.objectives.online import MEAN_REWARD, Rollout
from tunelab.rewards import Reward, score
from tunelab.run_info import RunInfo
from tunelab.training.plan import Plan, Row

SEED_STRIDE = 1_000_003  # spreads (seed, step, micro-batch, rank) over distinct generation seeds


def pooled_figures(rewards: torch.Tensor, terms: dict[str, torch.Tensor], lengths: list[int],
                   spread: list[bool] | None) -> dict[str, float]:
    """The step's rollout figures over every process's completions: each process samples its own prompts, so the
    main's alone are 1/world of the step's (a two-process run logged half its rollouts). ``rewards`` and each term
    are (N,) for this process's N completions, ``spread`` whether each group's rewards differ (None: groups of
    one). Every process has completions and the same reward names, so all make the one same collective."""
    names = sorted(terms)
    r = rewards.double()
    local = [float(r.sum()), float((r * r).sum()), float(len(r)), *(float(terms[n].double().sum()) for n in names),
             float(sum(lengths)), float(len(lengths)), float(sum(spread or [])), float(len(spread or []))]
    total, squares, count, *rest = distributed.sum_over_processes(local)
    term_sums, (length_sum, length_count, spread_sum, spread_count) = rest[: len(names)], rest[len(names):]
    variance = (squares - total * total / count) / (count - 1) if count > 1 else 0.0  # unbiased, as torch.std
    figures = {"reward": round(total / count, 6), "reward_std": round(math.sqrt(max(variance, 0.0)), 6),
               **{f"reward_{name}": round(s / count, 6) for name, s in zip(names, term_sums)},
               "completion_length": round(length_sum / length_count, 3)}
    if spread is not None:  # one completion per prompt has no group to compare within
        figures["zero_variance_groups"] = round(1 - spread_sum / spread_count, 4)
    return figures


class Rollouts:
    """Draws, samples, scores and prepares the micro-batches of each optimizer step."""

    def __init__(self, settings: Any, tokenizer: Any, rewards: list[Reward], grad_accum: int, seed: int,
                 info: RunInfo, autocast: Callable[[], AbstractContextManager[Any]], processes: int = 1,
                 micro_batch_size: int | None = None) -> None:
        self.mini_batches = getattr(settings, "num_mini_batches", 1)
        if settings.num_iterations > 1 and processes > 1:  # the checkpoint keeps the main process's rollouts only
            keys = ("objective.num_iterations" if "num_iterations" in type(settings).model_fields
                    else "objective.ppo_epochs x num_mini_batches")
            raise ConfigError(f"{keys} above 1 trains in one process only (a checkpoint keeps the rollouts still to "
                              "be reused of the main process alone); set it to 1 or run one process")
        if micro_batch_size is not None and self.mini_batches > micro_batch_size * settings.num_generations:
            raise ConfigError(f"objective.num_mini_batches: expected at most training.micro_batch_size x "
                              f"objective.num_generations = {micro_batch_size * settings.num_generations} (the "
                              f"completions of a micro-batch), got {self.mini_batches}")
        self.settings, self.tokenizer, self.rewards = settings, tokenizer, rewards
        self.grad_accum, self.seed, self.info, self.autocast = grad_accum, seed, info, autocast
        self.reuse = settings.num_iterations
        self._cached: tuple[int, list[list[Row]], list[Batch], dict[str, float]] | None = None

    def window(self, model: torch.nn.Module, prepare: Callable[[torch.nn.Module, Rollout], Batch], plan: Plan,
               step: int) -> tuple[list[list[Row]], list[Batch], dict[str, float]]:
        """The rows (prompts), prepared batches and rollout figures of optimizer step ``step``."""
        drawn_at = step - step % self.reuse
        if self._cached is not None and self._cached[0] == drawn_at:
            return (self._cached[1], self._part(self._cached[2], step),
                    {**self._cached[3], "generation_s": 0.0, "rewards_s": 0.0})
        micro = plan.micro_batches((step // self.reuse) * self.grad_accum)
        rows = [next(micro) for _ in range(self.grad_accum)]
        window, rewards, terms, lengths, spread = [], [], {}, [], []
        generation_s = rewards_s = 0.0
        for index, micro_rows in enumerate(rows):
            records = [record for row in micro_rows for record in row]
            started = time.perf_counter()
            with self.info.phase("generation"), self.autocast():
                requests = self.sample(model, records, self._seed(step, index, plan.rank))
            generation_s += time.perf_counter() - started
            started = time.perf_counter()
            with self.info.phase("rewards"):
                scored = self.score(records, requests)
            rewards_s += time.perf_counter() - started
            completion_ids = [r.token_ids + ([r.end_token] if r.end_token is not None else []) for r in requests]
            group = self.settings.num_generations
            rollout = Rollout([r.prompt_ids for r in requests], completion_ids, scored.total, group)
            with self.autocast():
                window.append(prepare(model, rollout))
            rewards.append(scored.total)
            for name, values in scored.terms.items():
                terms.setdefault(name, []).append(values)
            lengths += [len(c) for c in completion_ids]
            spread += (scored.total.view(-1, group).amax(dim=1) > scored.total.view(-1, group).amin(dim=1)).tolist()
        figures = pooled_figures(torch.cat(rewards), {name: torch.cat(v) for name, v in terms.items()}, lengths,
                                 spread if group > 1 else None)
        self._cached = (drawn_at, rows, window, figures)
        return rows, self._part(window, step), {**figures, "generation_s": round(generation_s, 3),
                                                "rewards_s": round(rewards_s, 3)}

    def _part(self, window: list[Batch], step: int) -> list[Batch]:
        """The part of each micro-batch's completions that step ``step`` trains on (the whole window without
        mini-batches); every tensor of a prepared batch has one row per completion first. Empty parts (a short
        last micro-batch) are left out."""
        if self.mini_batches == 1:
            return window
        drawn_at = step - step % self.reuse
        epoch, part = divmod(step - drawn_at, self.mini_batches)
        chosen = []
        for index, batch in enumerate(window):
            generator = torch.Generator().manual_seed(self._seed(drawn_at, index, epoch))
            order = torch.randperm(batch["targets"].shape[0], generator=generator)
            rows = torch.tensor_split(order, self.mini_batches)[part].sort().values
            if len(rows):
                chosen.append({name: tensor[rows.to(tensor.device)] for name, tensor in batch.items()})
        return chosen

    def saved(self, step: int) -> dict[str, Any] | None:
        """The rollouts the next steps still train on (num_iterations > 1, a checkpoint mid-way through their
        reuse), as JSON for the checkpoint's state: a float32 value survives the trip through a JSON number exactly."""
        if self._cached is None or self._cached[0] + self.reuse <= step:
            return None
        drawn_at, _, window, figures = self._cached
        batches = [{name: [str(t.dtype).removeprefix("torch."), list(t.shape), t.reshape(-1).tolist()]
                    for name, t in batch.items()} for batch in window]
        return {"drawn_at": drawn_at, "batches": batches, "figures": figures}

    def restore(self, saved: dict[str, Any] | None, plan: Plan, device: torch.device) -> None:
        """Take back the rollouts of a checkpoint (``saved``); their prompts are the plan's, from the step alone."""
        if saved is None:
            return
        micro = plan.micro_batches((saved["drawn_at"] // self.reuse) * self.grad_accum)
        rows = [next(micro) for _ in range(self.grad_accum)]
        window = [{name: torch.tensor(values, dtype=getattr(torch, dtype), device=device).reshape(shape)
                   for name, (dtype, shape, values) in batch.items()} for batch in saved["batches"]]
        self._cached = (saved["drawn_at"], rows, window, saved["figures"])

    def _seed(self, step: int, index: int, rank: int) -> int:
        return ((self.seed * SEED_STRIDE + step) * SEED_STRIDE + index * 1009 + rank) % (2**63 - 1)

    def sample(self, model: torch.nn.Module, records: list[Any], seed: int) -> list[GenerationRequest]:
        """``num_generations`` sampled completions of each record's prompt, grouped by prompt, in one ``generate``
        call (greedy answers, for validation, are ``eval.online.rewarded_answers``)."""
        settings = self.settings
        sampling = Sampling(max_new_tokens=settings.max_completion_length, temperature=settings.temperature,
                            top_p=settings.top_p, seed=seed)
        requests = [GenerationRequest(list(r.input_ids), sampling) for r in records for _ in range(settings.num_generations)]
        return generate_batch(model, self.tokenizer, requests)

    def score(self, records: list[Any], requests: list[GenerationRequest]) -> Any:
        group = len(requests) // max(len(records), 1)
        each = [r for r in records for _ in range(group)]
        return score(self.rewards, [r.prompt for r in each], [q.text for q in requests], [dict(r.columns) for r in each],
                     [r.source for r in each])

    def validation(self, model: torch.nn.Module, records: list[Any], batch_size: int) -> dict[str, float]:
        """The mean reward of greedy completions of ``records`` (and of each term); the validation loss of an
        online objective is its negative, so that lower is better, as for every objective."""
        scored, _ = rewarded_answers(model, self.tokenizer, records, self.rewards, self.settings.max_completion_length,
                                     batch_size, self.autocast)
        reward = float(scored.total.mean()) if len(scored.total) else 0.0
        return {"loss": round(-reward, 6), MEAN_REWARD: round(reward, 6), "tokens": len(records),
                **{term_name(name): round(float(v.mean()), 6) for name, v in scored.terms.items()}}
