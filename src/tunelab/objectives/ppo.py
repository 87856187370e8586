"""Proximal Policy Optimization for language models: PPO (Schulman et al. 2017, "Proximal Policy Optimization
Algorithms", https://arxiv.org/abs/1707.06347) with generalized advantage estimation (Schulman et al. 2016,
"High-Dimensional Continuous Control Using Generalized Advantage Estimation", https://arxiv.org/abs/1506.02438),
as RLHF uses it (Ouyang et al. 2022, "Training language models to follow instructions with human feedback",
https://arxiv.org/abs/2203.02155): a KL penalty to the reference folded into the reward of every token.

A completion o = (o_1..o_T) of prompt q is a trajectory: state s_t = (q, o_<t), action o_t. A scalar value head
(one Linear on the last hidden state, ``model.value_head``) estimates V(s_t) at each completion token. The
rollout's policy pi_old gives each token the reward

    r_t = - beta (log pi_old(o_t | s_t) - log pi_ref(o_t | s_t))  +  [t = T] R(q, o)

(R: the run's rewards, a reward model's score or functions', at the last token only; pi_ref: the base, the
adapter switched off). Advantages by GAE, then the returns the value head regresses on:

    delta_t = r_t + gamma V(s_t+1) - V(s_t)        (V(s_T+1) = 0: the completion ends the episode)
    A_t = delta_t + gamma lam A_t+1                 G_t = A_t + V(s_t)

A is whitened over the micro-batch's completion tokens (``whiten_advantages``: (A - mean) / std). With the ratio
rho_t = pi(o_t | s_t) / pi_old(o_t | s_t) and V' the value head being trained, each token's loss is

    l_t = - min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)
          + vf_coef * 1/2 max((V'(s_t) - G_t)^2, (clip(V'(s_t), V(s_t) - c, V(s_t) + c) - G_t)^2)

summed over every completion token of the optimizer step and divided by their count (the loop's token rule).
Each batch of rollouts serves ``ppo_epochs`` x ``num_mini_batches`` optimizer steps: every epoch splits each
micro-batch's completions into ``num_mini_batches`` parts (a seeded shuffle), one part per step. With one epoch
and one part the policy is pi_old, so rho = 1 exactly and nothing is clipped.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal

import torch
from accelerate.utils import extract_model_from_parallel
from pydantic import Field
from safetensors.torch import load_file
from torch import nn

from tunelab.data import IGNORE, TokenizedExample, collate
from tunelab.objectives.base import Batch, HeadOutput, LossSum, Objective, OwnModule, Reference, USER_REWARDS
from tunelab.objectives.grpo import (NEVER_PACKED, as_grid, collate_prompts, clipped_token_losses, policy_loss_memory,
                                     token_logps)
from tunelab.objectives.online import (REWARDED_ANSWERS, OnlineSettings, Rollout, reward_model_runs, rollout_rows,
                                      rollout_targets)
from tunelab.objectives.logps import head_token_logps, logits_token_logps, scoring_memory
from tunelab.objectives.sft import output_head, rows_at
from tunelab.techniques.base import forward_inputs

VALUE_HEAD = OwnModule("value_head", lambda model, settings: new_value_head(model))
WHITEN_EPS = 1e-8  # keeps advantages that barely differ from dividing by ~0
NOT_SHARDED = ("rollouts sample from the whole policy token by token, which an fsdp-sharded model would have to "
               "gather layer by layer at every token, and the value head is a module beside the transformer's layers "
               "that sharding has not been made or tested to cover; use training.distributed: ddp")


class PpoSettings(OnlineSettings):
    name: Literal["ppo"] = Field("ppo", description="Training objective (see the section's description).")
    num_generations: int = Field(1, ge=1, description="Completions sampled per prompt (PPO's baseline is the value "
                                 "head, so one suffices; more give more trajectories per prompt).")
    beta: float = Field(0.05, ge=0, description="Weight of the KL penalty to the reference policy, subtracted from "
                        "every token's reward (0: none, and no reference pass runs).")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount of later rewards in the advantages and returns.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE's lambda: 0 gives one-step TD advantages (low variance, "
                       "biased by the value head), 1 the full return minus the value (unbiased, high variance).")
    epsilon: float = Field(0.2, gt=0, lt=1, description="The policy ratio is clipped to [1 - epsilon, 1 + epsilon].")
    value_clip: float = Field(0.2, gt=0, description="A new value may move at most this far from the rollout's value "
                              "before its loss stops giving gradient (the clipped value loss).")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss beside the policy loss.")
    whiten_advantages: bool = Field(True, description="Shift and scale each micro-batch's advantages to mean 0 and "
                                    "standard deviation 1 over its completion tokens.")
    ppo_epochs: int = Field(4, ge=1, description="Passes over each batch of rollouts (each pass is num_mini_batches "
                            "optimizer steps; training.max_steps counts optimizer steps).")
    num_mini_batches: int = Field(1, ge=1, description="Parts each micro-batch's completions are split into per "
                                  "pass: one optimizer step each. At most training.micro_batch_size x "
                                  "num_generations.")
    reference: Literal["live"] = Field("live", description="With beta > 0, the reference's log-probs are computed "
                                       "at every rollout: with an adapter, the same model with the adapter off.")

    @property
    def num_iterations(self) -> int:
        """Optimizer steps on each batch of rollouts (what the training layer and the plan read)."""
        return self.ppo_epochs * self.num_mini_batches


# ---------------------------------------------------------------- the value head


def new_value_head(model: nn.Module) -> nn.Linear:
    """A (H -> 1) Linear, zero at first: every value starts at 0, and no draw from the RNG changes the run."""
    inner = extract_model_from_parallel(model)
    hidden = inner.get_output_embeddings().in_features
    head = nn.Linear(hidden, 1, device=next(inner.parameters()).device, dtype=torch.float32)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def load_value_head(run_dir: Path | str) -> nn.Linear:
    """A finished PPO run's value head (``value_head.safetensors`` beside its result), e.g. to score states."""
    weights = load_file(str(Path(run_dir) / VALUE_HEAD.file_name))
    head = nn.Linear(weights["weight"].shape[1], 1)
    head.load_state_dict(weights)
    return head


@contextmanager
def values_beside_hidden(model: nn.Module, keep: torch.Tensor, project: bool) -> Iterator[list[torch.Tensor]]:
    """Like ``hidden_only_where`` (``project``: ``logits_only_where``): the yielded list receives the hidden states
    at ``keep`` (N, H) and the value head's (N,) values of them, computed inside the model's forward (so a DDP
    wrapper sees the value head's use as part of it); the output head projects those rows (``project``) or none."""
    inner = extract_model_from_parallel(model)
    head, value_head = inner.get_output_embeddings(), getattr(inner, VALUE_HEAD.name)
    seen: list[torch.Tensor] = []

    def select(module: nn.Module, args: tuple) -> tuple:
        rows = rows_at(args[0], keep)  # (B, T', H) -> (N, H)
        seen[:] = [rows, value_head(rows.to(value_head.weight.dtype)).squeeze(-1).float()]  # (N, H), (N,)
        return (rows if project else rows[:0],) + tuple(args[1:])  # (0, H): the head's rows run in chunks after

    handle = head.register_forward_pre_hook(select)
    try:
        yield seen
    finally:
        handle.remove()


def policy_and_values(model: nn.Module, batch: Batch,
                      with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Log-prob (N,) of each completion token (in the order of ``targets != IGNORE``), with ``with_entropy`` the
    policy's entropy at each (N,), without gradient (else None), and the value (N,) of the state before each token,
    from one forward pass. A plain head runs in chunks (no (N, V) logits); a head a technique wraps, as itself."""
    targets = batch["targets"]  # (R, T)
    keep = targets != IGNORE  # (R, T)
    plain = type(output_head(model)) is nn.Linear
    with values_beside_hidden(model, keep, project=not plain) as seen:
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                       **forward_inputs(model, batch)).logits  # (N, V), or (0, V) for a plain head
    hidden, values = seen
    if plain:
        return (*head_token_logps(output_head(model), hidden, targets[keep], with_entropy), values)
    return (*logits_token_logps(logits, targets[keep], with_entropy), values)


# ---------------------------------------------------------------- closed forms


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """(R, T) advantages by GAE from (R, T) per-token rewards and values; ``mask`` (R, T) marks each row's
    completion tokens (one contiguous run). After a row's last token the value is 0; outside the mask, 0."""
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)  # V(s_t+1), (R,)
    next_advantage = torch.zeros_like(next_value)  # A_t+1, (R,)
    for t in reversed(range(rewards.shape[1])):
        here = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(here, advantage, torch.zeros_like(advantage))
        next_value = torch.where(here, values[:, t], next_value)
        next_advantage = torch.where(here, advantage, next_advantage)
    return advantages


def whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(R, T) values shifted and scaled to mean 0, standard deviation 1 over ``mask``; 0 outside it. Fewer than
    two tokens: only shifted."""
    selected = values[mask]
    scale = selected.std() + WHITEN_EPS if selected.numel() > 1 else 1.0
    return torch.where(mask, (values - selected.mean()) / scale, torch.zeros_like(values))


def clipped_value_losses(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                         clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token value losses (N,), 1/2 max((V - G)^2, (clip(V, V_old - c, V_old + c) - G)^2), and whether each
    token's clipped term was the larger (N,): there the loss passes no gradient to the value."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    plain, bounded = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * torch.max(plain, bounded), bounded > plain


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    """1 - Var(G - V) / Var(G) over (N,) tokens: 1 when the values predict the returns, 0 when they do no better
    than the returns' mean (and 0 when the returns do not vary)."""
    spread = float(returns.var()) if returns.numel() > 1 else 0.0
    return 0.0 if spread < 1e-12 else 1.0 - float((returns - values).var()) / spread


# ---------------------------------------------------------------- from rollouts to the loss


def ppo_prepare(model: nn.Module, rollout: Rollout, settings: PpoSettings, reference: Reference | None) -> Batch:
    """The rollout as the loss reads it: one row per completion (prompt, then completion, supervised) with, per
    completion token, the rollout policy's log-prob and value, the KL to the reference, the advantage and the
    return; per row, the explained variance of the micro-batch's returns by the rollout's values."""
    rows = [TokenizedExample(p + c, [IGNORE] * len(p) + c, "") for p, c in zip(rollout.prompt_ids, rollout.completion_ids)]
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate([[r] for r in rows], 0).items()}  # padding is IGNORE, never read
    keep = batch["targets"] != IGNORE  # (R, T)
    with torch.no_grad():
        logps, _, values = policy_and_values(model, batch)  # (N,), None, (N,)
        old_logps, old_values = as_grid(logps, keep), as_grid(values, keep)  # (R, T)
        kl = torch.zeros_like(old_logps)
        if settings.beta > 0:  # a reference pass only with a KL penalty to fold in
            if reference is None:
                raise RuntimeError("ppo with beta > 0 compares with a reference policy, but none was set up")
            with reference(model) as scorer:
                kl = old_logps - as_grid(token_logps(scorer, batch)[0], keep)  # (R, T), log pi_old - log pi_ref
        rewards = -settings.beta * kl
        last = keep.long().cumsum(dim=1).argmax(dim=1)  # (R,) each row's last completion position
        rewards[torch.arange(len(last), device=device), last] += rollout.rewards.to(device).float()
        advantages = gae(rewards, old_values, keep, settings.gamma, settings.lam)
        returns = advantages + old_values
        if settings.whiten_advantages:
            advantages = whiten(advantages, keep)
    batch.update(old_logps=old_logps, old_values=old_values, kl=kl, advantages=advantages, returns=returns,
                 explained_variance=torch.full((len(rows),), explained_variance(old_values[keep], returns[keep]),
                                               device=device))
    return batch


def ppo_rollout_memory(head: HeadOutput, settings: PpoSettings) -> tuple[int, ...]:
    """``prepare`` scores the completions without gradients: the rollout policy's pass (log-probs and values), then,
    with beta > 0, the reference's; a head a technique wraps runs unchunked, and the first pass's (N, V) float32
    logits are still held then (a plain head's chunks are gone)."""
    held = (4 * head.rows * head.columns,) if settings.beta > 0 and not head.plain else ()
    return scoring_memory(head) + held


def count_ppo_units(batch: Batch) -> int:
    return int((batch["targets"] != IGNORE).sum())


def ppo_loss_sum(model: nn.Module, batch: Batch, settings: PpoSettings) -> LossSum:
    keep = batch["targets"] != IGNORE  # (R, T)
    rows = keep.nonzero()[:, 0]  # (N,) the completion of each token
    logps, entropy, values = policy_and_values(model, batch, with_entropy=True)  # (N,) each
    # steps on reused rollouts compare with the rollout's policy; on fresh ones the policy is that policy
    old = batch["old_logps"][keep] if settings.num_iterations > 1 else logps.detach()
    policy_losses, clipped = clipped_token_losses(logps, old, batch["advantages"][keep], settings.epsilon,
                                                  settings.epsilon)
    value_losses, value_clipped = clipped_value_losses(values, batch["old_values"][keep], batch["returns"][keep],
                                                       settings.value_clip)
    losses = policy_losses + settings.vf_coef * value_losses
    figures = {"clip_fraction": clipped.float(), "entropy": entropy, "kl": batch["kl"][keep],
               "value_loss": value_losses.detach(), "value_clip_fraction": value_clipped.float(),
               "explained_variance": batch["explained_variance"][rows]}  # (N,) each
    return LossSum(losses.sum(), len(losses), {k: v.sum() for k, v in figures.items()})


OBJECTIVE = Objective(
    name="ppo", config_class=PpoSettings, loss_sum=ppo_loss_sum, count_units=count_ppo_units, units="tokens",
    summary="proximal policy optimization: completions sampled per prompt, rewarded at their last token minus a KL "
            "penalty per token, reinforced by GAE advantages of a value head",
    collate=collate_prompts, batch_rows=rollout_rows, batch_targets=rollout_targets, needs_reference=True, reference_when=lambda settings: settings.beta > 0,
    metrics=("clip_fraction", "entropy", "kl", "value_loss", "value_clip_fraction", "explained_variance"),
    refuses={"packing": NEVER_PACKED, "fsdp": NOT_SHARDED}, records="prompt", evaluation=REWARDED_ANSWERS, prepare=ppo_prepare,
    own_module=VALUE_HEAD, loss_memory=policy_loss_memory, rollout_memory=ppo_rollout_memory,
    scoring_runs=reward_model_runs,
    base_figures_uncached=USER_REWARDS,
)
