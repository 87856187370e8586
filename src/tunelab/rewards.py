"""The rewards of online objectives (GRPO): built-ins, users' functions and reward model runs, each with a weight.

A reward is called on the completions of a rollout as ``fn(prompts, completions, **columns) -> list[float]``
(TRL's convention), one value per completion. A function that raises, returns the wrong number of values or a
value that is not a finite number stops the run with one error naming the function and the record.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from tunelab.errors import ConfigError, TrainingAborted
from tunelab.metrics import Normalization
from tunelab.objectives import OBJECTIVES
from tunelab.objectives.online import RewardFunction, RewardSettings, missing_column, user_function
from tunelab.result import load_run


@dataclass
class Reward:
    name: str  # what the logs call it (reward_<name>) and what an error names
    weight: float
    function: RewardFunction


@dataclass
class Scored:
    total: torch.Tensor  # (R,) the weighted sum of the terms
    terms: dict[str, torch.Tensor]  # name -> (R,) each term's own values (unweighted)


# ---------------------------------------------------------------- built-ins


def _column(columns: dict[str, list[Any]], name: str, reward: str) -> list[Any]:
    if name not in columns:  # the run checked its records up front (check_rewards); a batch may still lack it
        raise missing_column(reward, name, columns)
    return columns[name]


def exact_match(column: str) -> RewardFunction:
    normalize = Normalization()

    def reward(prompts: list[Any], completions: list[str], **columns: list[Any]) -> list[float]:
        references = _column(columns, column, "exact_match")
        return [float(normalize(c) == normalize(str(r))) for c, r in zip(completions, references)]
    return reward


def rouge_l(column: str) -> RewardFunction:
    from rouge_score import rouge_scorer  # a heavy import, needed only when this reward is used

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def reward(prompts: list[Any], completions: list[str], **columns: list[Any]) -> list[float]:
        references = _column(columns, column, "rouge_l")
        return [scorer.score(str(r), c)["rougeL"].fmeasure for c, r in zip(completions, references)]  # (target, prediction)
    return reward


def regex(pattern: str) -> RewardFunction:
    compiled = re.compile(pattern, re.DOTALL)
    return lambda prompts, completions, **columns: [float(compiled.search(c) is not None) for c in completions]


def length(max_words: int) -> RewardFunction:
    """1 up to ``max_words`` words, then falling linearly to 0 at twice as many."""
    def one(text: str) -> float:
        words = len(text.split())
        return 1.0 if words <= max_words else max(0.0, 1.0 - (words - max_words) / max_words)
    return lambda prompts, completions, **columns: [one(c) for c in completions]


# ---------------------------------------------------------------- a reward model run


def reward_model(run: str, device: torch.device, batch_size: int = 8) -> RewardFunction:
    """A reward model run's score of each prompt + completion, rendered as its training rendered pairs."""
    loaded = load_run(run, device)
    objective = OBJECTIVES[loaded.config.objective.name] if loaded.config is not None else None
    if objective is None or objective.num_labels != 1:
        raise ConfigError(f"reward run {run}: not a reward model (a run trained with a one-score head)")
    tokenizer, model = loaded.tokenizer, loaded.model.requires_grad_(False)

    def text(prompt: Any, completion: str) -> str:
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if tokenizer.chat_template:
            return tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": completion}], tokenize=False)
        return (prompt if isinstance(prompt, str) else turns[-1]["content"]) + completion

    @torch.no_grad()
    def reward(prompts: list[Any], completions: list[str], **columns: list[Any]) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(completions), batch_size):
            texts = [text(p, c) for p, c in zip(prompts[start:start + batch_size], completions[start:start + batch_size])]
            encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            scores += model(**encoded).logits[:, 0].float().tolist()  # pooled at the last token that is not padding
        return scores
    return reward


def build_rewards(settings: list[RewardSettings], device: torch.device) -> list[Reward]:
    """The run's reward terms, each ready to call; a name that cannot be resolved is a ConfigError now."""
    rewards = []
    for spec in settings:
        if spec.run is not None:
            function = reward_model(spec.run, device)
        elif spec.function == "exact_match":
            function = exact_match(spec.column)
        elif spec.function == "rouge_l":
            function = rouge_l(spec.column)
        elif spec.function == "regex":
            function = regex(spec.pattern or "")
        elif spec.function == "length":
            function = length(spec.max_words or 1)
        else:
            function = user_function(spec.function or "")
        name = spec.label if spec.label not in [r.name for r in rewards] else f"{spec.label}_{len(rewards)}"
        rewards.append(Reward(name, spec.weight, function))
    return rewards


def score(rewards: list[Reward], prompts: list[Any], completions: list[str], columns: list[dict[str, Any]],
          sources: list[str]) -> Scored:
    """Every term on every completion (one per row; ``columns`` and ``sources`` per row too), and their weighted
    sum. A term that fails, miscounts or returns a value that is not a finite number is a TrainingAborted naming
    it and the record."""
    names = list(dict.fromkeys(name for row in columns for name in row))
    by_column = {name: [row.get(name) for row in columns] for name in names}  # absent: None, as TRL's datasets give
    total = torch.zeros(len(completions), dtype=torch.float64)
    terms: dict[str, torch.Tensor] = {}
    for reward in rewards:
        values = _call(reward, prompts, completions, by_column, sources)
        terms[reward.name] = torch.tensor(values, dtype=torch.float64)
        total += reward.weight * terms[reward.name]
    return Scored(total.float(), {name: v.float() for name, v in terms.items()})


def _call(reward: Reward, prompts: list[Any], completions: list[str], columns: dict[str, list[Any]],
          sources: list[str]) -> list[float]:
    try:
        values = list(reward.function(prompts, completions, **columns))
    except ConfigError:
        raise
    except Exception as exc:
        raise TrainingAborted(f"reward {reward.name} raised {type(exc).__name__}: {exc} (on the completions of "
                              f"{_records(sources)})") from exc
    if len(values) != len(completions):
        raise TrainingAborted(f"reward {reward.name} returned {len(values)} values for {len(completions)} completions "
                              f"(of {_records(sources)}); it must return one number per completion")
    for i, value in enumerate(values):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise TrainingAborted(f"reward {reward.name} returned {value!r} for the completion of {sources[i]}; "
                                  "expected a finite number")
        values[i] = number
    return values


def _records(sources: list[str]) -> str:
    unique = list(dict.fromkeys(sources))
    return ", ".join(unique[:3]) + (f" and {len(unique) - 3} more" if len(unique) > 3 else "")
