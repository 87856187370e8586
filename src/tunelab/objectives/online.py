"""What the online objectives (GRPO, PPO) share: how completions are sampled and how they are rewarded.

Their records are prompts (``records="prompt"``). Every optimizer step, the training layer samples
``num_generations`` completions of each prompt with the policy (through ``tunelab.generation``), scores them with
the run's rewards (``tunelab.rewards``) and hands the objective a ``Rollout``; the objective's ``prepare`` turns it
into the batch its loss reads (advantages, the sampling policy's log-probs, the reference's).

A reward is a built-in, a user's function or a reward model run folder, each with a weight; the rollout's reward
is the weighted sum. A user's function follows TRL's convention, ``fn(prompts, completions, **columns) ->
list[float]``: ``prompts`` as the records give them (strings, or lists of {role, content} messages), completions
as strings, and every reference column of the records as a keyword (a list, one value per completion).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Sequence

import torch
from pydantic import Field, model_validator

from tunelab.errors import ConfigError
from tunelab.metrics import unit_mean
from tunelab.objectives.base import Evaluation
from tunelab.settings import Settings

BUILT_IN_REWARDS = ("exact_match", "rouge_l", "regex", "length")
COLUMN_REWARDS = ("exact_match", "rouge_l")  # the built-ins that compare a completion with a record's `column`

RewardFunction = Callable[..., Sequence[float]]  # fn(prompts, completions, **columns) -> one value per completion


class RewardSettings(Settings):
    """One reward term. Given as a string, it is its ``function`` (``- rouge_l``, ``- my_rewards:brevity``)."""

    function: str | None = Field(None, description="A built-in: 'exact_match' (1 when the completion equals the "
                                 "record's `column`, after lowercasing and dropping punctuation), 'rouge_l' (ROUGE-L F1 "
                                 "against `column`), 'regex' (1 when `pattern` is found in the completion), 'length' "
                                 "(1 up to `max_words` words, falling linearly to 0 at twice as many); or a user's "
                                 "function 'module:function' or 'path/to/file.py:function', called as fn(prompts, "
                                 "completions, **columns) -> list[float] (TRL's convention).")
    run: str | None = Field(None, description="A reward model run folder (objective: reward): its score of the "
                            "prompt and completion, rendered by its own tokenizer's chat template.")
    weight: float = Field(1.0, description="Weight of this term in the total reward.")
    column: str = Field("reference", description="exact_match, rouge_l: the record's column holding the reference.")
    pattern: str | None = Field(None, description="regex: the regular expression (Python's re.search, DOTALL).")
    max_words: int | None = Field(None, gt=0, description="length: completions up to this many words get 1.")

    @model_validator(mode="before")
    @classmethod
    def _string_is_a_function(cls, value: Any) -> Any:
        return {"function": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_source_with_its_settings(self) -> "RewardSettings":
        if (self.function is None) == (self.run is None):
            raise ValueError("a reward is either a `function` (a built-in or module:function) or a reward model `run`")
        if self.function == "regex" and not self.pattern:
            raise ValueError("the regex reward needs a `pattern`")
        if self.function == "length" and self.max_words is None:
            raise ValueError("the length reward needs `max_words`")
        if self.function is not None and self.function not in BUILT_IN_REWARDS and ":" not in self.function:
            raise ValueError(f"reward {self.function!r}: expected a built-in ({', '.join(BUILT_IN_REWARDS)}) or "
                             "'module:function'")
        return self

    @property
    def label(self) -> str:
        """How logs name this term: reward_<label>."""
        name = self.function or f"run:{self.run}"
        return name.rsplit(":", 1)[-1] if self.function and ":" in self.function else name


class OnlineSettings(Settings):
    """The settings every online objective's class shares, declared once: its rewards and how its completions are
    sampled (what ``training.rollout`` reads). Each objective's class narrows ``name`` to its own ``Literal`` and
    adds the rest: ``num_generations`` (its range differs) and its loss's settings."""

    # Declared here so that `name` comes first in `tunelab config show` and config.yaml; each subclass narrows it.
    name: str = Field(description="Training objective (see the section's description).")
    rewards: list[RewardSettings] = Field(min_length=1, description="The reward terms, summed with their weights: "
                                          "built-ins, users' functions and reward model runs (see each entry's "
                                          "fields); a string is a function's name.")
    max_completion_length: int = Field(64, gt=0, description="Most tokens a completion may have (it stops earlier at "
                                       "the chat template's end of turn).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the completions (above 0: the policy "
                               "learns from sampled completions; GRPO's group needs different ones to compare).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the completions (1: off).")


def user_function(path: str) -> RewardFunction:
    """A user's reward, 'module:function' (importable) or 'path/to/file.py:function' (relative to the working
    directory), imported; a ConfigError when it cannot be. Here, below both, so that `tunelab train` (through
    ``tunelab.rewards``) and `tunelab plan` (through ``check_rewards``) resolve it with the same code. A file is
    executed once per content: training's up-front check and its rewards share it, and an edit is always seen."""
    module_name = path.rpartition(":")[0]
    file = Path(module_name)
    source = file.read_bytes() if module_name.endswith(".py") and file.is_file() else None
    return _imported(path, str(file.resolve()) if source is not None else None, source)


@functools.lru_cache(maxsize=64)
def _imported(path: str, resolved: str | None, source: bytes | None) -> RewardFunction:
    """``user_function``'s import, cached on the file's resolved path and its bytes, not its modification time: an
    edit within the same second (a filesystem with coarse times) kept the old function. The bytes read are the
    ones executed, never a __pycache__ copy (validated by modification time and size too). A failure is not cached:
    it raises."""
    module_name, _, function_name = path.rpartition(":")
    try:
        if module_name.endswith(".py"):
            spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if spec is None or spec.loader is None or source is None:
                raise ImportError(f"no file {module_name}")
            module = importlib.util.module_from_spec(spec)
            exec(compile(source, module_name, "exec"), module.__dict__)  # noqa: S102 - the user's own reward file
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"reward {path!r}: cannot import {module_name!r} ({exc})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"reward {path!r}: {module_name!r} has no function {function_name!r}")
    return function


def missing_column(reward: str, name: str, columns: Collection[str]) -> ConfigError:
    """The refusal of a reward that reads a column the prompt records do not have (one wording, up front and while
    scoring a rollout)."""
    return ConfigError(f"reward {reward} reads the column {name!r}, which the prompt records do not have (they have: "
                       f"{', '.join(sorted(columns)) or 'none'}); set the reward's `column`")


def check_rewards(settings: OnlineSettings, columns: Collection[str]) -> None:
    """Refuse, before any weight is read, rewards the run could not compute on records with these reference
    ``columns``: a built-in reading a column they lack, a user's function that does not import. `tunelab train`
    and `tunelab plan` both call it (through ``objectives.check_rewards``), so plan refuses what train would.
    A reward model run is checked where it is read (``tunelab.rewards.reward_model``, the planner's scoring model)."""
    for reward in settings.rewards:
        if reward.function in COLUMN_REWARDS and reward.column not in columns:
            raise missing_column(reward.function, reward.column, columns)
        if reward.function is not None and reward.function not in BUILT_IN_REWARDS:
            user_function(reward.function)


def reward_model_runs(settings: OnlineSettings) -> tuple[str, ...]:
    """The reward model runs the rollout loads (``Objective.scoring_runs``): each stays loaded for the whole run."""
    return tuple(reward.run for reward in settings.rewards if reward.run)


def rollout_rows(prompt: Any, settings: OnlineSettings) -> tuple[int, ...]:
    """A prompt's rows in the loss's batch (``Objective.batch_rows``): its ``num_generations`` completions, each the
    prompt followed by up to ``max_completion_length`` sampled tokens (a row is padded to the batch's longest)."""
    return (len(prompt.input_ids) + settings.max_completion_length,) * getattr(settings, "num_generations", 1)


def rollout_targets(prompt: Any, settings: OnlineSettings) -> int:
    """The positions a prompt's completions are scored at (``Objective.batch_targets``): every completion token,
    at most ``max_completion_length`` each, ``num_generations`` completions."""
    return settings.max_completion_length * getattr(settings, "num_generations", 1)


@dataclass
class Rollout:
    """The completions sampled in one micro-batch and their rewards, as the objective's ``prepare`` receives them.

    Rows are grouped by prompt: the ``group`` completions of prompt i are rows i*group .. (i+1)*group-1."""

    prompt_ids: list[list[int]]  # per row (R = prompts x group), the prompt's token ids
    completion_ids: list[list[int]]  # per row, the sampled tokens, the end-of-turn token included when it stopped
    rewards: torch.Tensor  # (R,) the weighted total reward of each row
    group: int  # completions per prompt (objective.num_generations)


MEAN_REWARD = "mean_reward"  # the figure an online policy is evaluated by (validation loss = its negative)
STEP_REWARD = "reward"  # a training line's mean reward of the step's sampled completions (metrics.jsonl)

# `tunelab eval` of an online policy: the run's own rewards of its greedy answers to held-out prompts, against the
# base's (and any --against model's); each reward term is reported beside the weighted total. No model-free
# baseline: what an answer is worth depends on the rewards.
REWARDED_ANSWERS = Evaluation(records="prompt", metrics=lambda classes: [unit_mean(MEAN_REWARD)], rewarded_answers=True)
