"""Group Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical
Reasoning in Open Language Models", https://arxiv.org/abs/2402.03300), with DAPO's clip-higher and token-level
normalisation (Yu et al. 2025, https://arxiv.org/abs/2503.14476) and Dr. GRPO's unscaled advantages (Liu et al.
2025, https://arxiv.org/abs/2503.20783) as options.

For each prompt q, G completions o_1..o_G are sampled from the policy before the update (pi_old) and scored:
rewards r_1..r_G. Each completion's advantage is its reward against its group's:

    A_i = (r_i - mean(r)) / (std(r) + 1e-4)        (scale_rewards: false drops the division: A_i = r_i - mean(r))

(std: the unbiased sample deviation of the group). Every token t of o_i shares A_i. With the ratio
rho = pi(o_i,t | q, o_i,<t) / pi_old(o_i,t | q, o_i,<t), the per-token loss is

    l_i,t = - min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i) + beta KL_i,t
    KL_i,t = exp(ref - logp) - (ref - logp) - 1     (ref, logp: the token's log-prob under the reference, policy)

the k3 estimator of KL(pi || pi_ref), always >= 0. ``loss_normalization: tokens`` sums l over every completion
token and the loop divides by the tokens of the whole optimizer step (DAPO); ``sequences`` averages each
completion's tokens first and divides by the step's completions (the paper's 1/G sum_i 1/|o_i| sum_t). With
``num_iterations`` 1 the policy is pi_old, so rho = 1 exactly (its gradient is the policy gradient); more
iterations reuse one batch of rollouts for that many optimizer steps, rho then measuring how far the policy moved.
beta = 0 (the default) needs no reference: no reference pass runs and no copy is made.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from tunelab.data import IGNORE, TokenizedExample, collate
from tunelab.objectives.base import Batch, HeadOutput, LossSum, Objective, Reference, USER_REWARDS
from tunelab.objectives.logps import chunked_logps_memory, scoring_memory, supervised_token_logps
from tunelab.objectives.online import (REWARDED_ANSWERS, OnlineSettings, Rollout, reward_model_runs, rollout_rows,
                                      rollout_targets)
from torch import nn

NEVER_PACKED = "each completion is scored on a row of its own, against its group; prompts are never packed"
# Sampling needs every layer's whole weight at each decoded token; a sharded model would gather them once per token
# per layer, and tunelab's generation has not been made or tested to do that: refused rather than left untried.
NOT_SHARDED = ("rollouts sample from the whole policy token by token, which an fsdp-sharded model would have to "
               "gather layer by layer at every token; use training.distributed: ddp")
GROUP_EPS = 1e-4  # keeps a group whose rewards barely differ from dividing by ~0


class GrpoSettings(OnlineSettings):
    name: Literal["grpo"] = Field("grpo", description="Training objective (see the section's description).")
    num_generations: int = Field(4, ge=2, description="Completions sampled per prompt (the group G); the group's "
                                 "rewards are the baseline of each other's.")
    beta: float = Field(0.0, ge=0, description="Weight of the KL penalty to the reference policy (0: none, and no "
                        "reference pass runs).")
    epsilon_low: float = Field(0.2, ge=0, lt=1, description="The ratio is clipped below at 1 - epsilon_low.")
    epsilon_high: float = Field(0.2, ge=0, description="The ratio is clipped above at 1 + epsilon_high (DAPO's "
                                "clip-higher: e.g. 0.28).")
    scale_rewards: bool = Field(True, description="Divide each group's advantages by its rewards' standard "
                                "deviation (false: Dr. GRPO, the advantage is the reward minus the group mean).")
    loss_normalization: Literal["tokens", "sequences"] = Field(
        "tokens", description="'tokens': the loss is the mean over every completion token of the optimizer step "
        "(DAPO; long completions weigh by their length); 'sequences': each completion's token mean, averaged over "
        "the step's completions (the GRPO paper).")
    num_iterations: int = Field(1, ge=1, description="Optimizer steps on each batch of rollouts (above 1: the "
                                "clipped importance ratio keeps later steps near the policy that sampled them).")
    reference: Literal["live"] = Field("live", description="With beta > 0, the reference's log-probs are computed "
                                       "at every step: with an adapter, the same model with the adapter off.")


def group_advantages(rewards: torch.Tensor, group: int, scale: bool) -> torch.Tensor:
    """(R,) rewards, rows grouped by prompt -> (R,) advantages: each reward minus its group's mean, divided by
    the group's standard deviation (+ GROUP_EPS) when ``scale``."""
    grouped = rewards.view(-1, group)  # (P, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(dim=1, keepdim=True) + GROUP_EPS)
    return centred.reshape(-1)


def token_logps(model: nn.Module, batch: Batch, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each completion token (N,), in the order of ``targets != IGNORE``, and with ``with_entropy`` the
    policy's entropy at each (N,), without gradient (else None): the head runs in chunks, no (N, V) logits."""
    return supervised_token_logps(model, batch, with_entropy)


def as_grid(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(N,) per completion token -> (R, T), zero where there is no completion token (so a batch carries it)."""
    grid = torch.zeros(keep.shape, dtype=torch.float32, device=values.device)
    grid[keep] = values.float()
    return grid


def grpo_prepare(model: nn.Module, rollout: Rollout, settings: GrpoSettings, reference: Reference | None) -> Batch:
    """The rollout as the loss reads it: one row per completion (prompt, then completion, the completion
    supervised), its advantage, and the log-probs it is compared with: the sampling policy's when it is reused
    (num_iterations > 1), the reference's when beta > 0."""
    rows = [TokenizedExample(p + c, [IGNORE] * len(p) + c, "") for p, c in zip(rollout.prompt_ids, rollout.completion_ids)]
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate([[r] for r in rows], 0).items()}  # padding is IGNORE, never read
    batch["advantages"] = group_advantages(rollout.rewards, rollout.group, settings.scale_rewards).to(device)  # (R,)
    keep = batch["targets"] != IGNORE
    if settings.num_iterations > 1:
        with torch.no_grad():
            batch["old_logps"] = as_grid(token_logps(model, batch)[0], keep)  # (R, T)
    if settings.beta > 0:  # a reference pass only with a KL term to weigh
        if reference is None:
            raise RuntimeError("grpo with beta > 0 compares with a reference policy, but none was set up")
        with reference(model) as scorer:
            batch["ref_logps"] = as_grid(token_logps(scorer, batch)[0], keep)  # (R, T)
    return batch


def count_grpo_units(batch: Batch, settings: GrpoSettings) -> int:
    if settings.loss_normalization == "sequences":
        return batch["targets"].shape[0]
    return int((batch["targets"] != IGNORE).sum())


def clipped_token_losses(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, eps_low: float,
                         eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate losses (N,) and whether each token's ratio was clipped (N,): a token is clipped
    where the clip bound, not the ratio, gives the minimum (below 1 - eps_low with A < 0, above 1 + eps_high
    with A > 0), and so passes no gradient."""
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    losses = -torch.min(ratio * advantages, clipped * advantages)
    was_clipped = ((ratio < 1 - eps_low) & (advantages < 0)) | ((ratio > 1 + eps_high) & (advantages > 0))
    return losses, was_clipped


def grpo_loss_sum(model: nn.Module, batch: Batch, settings: GrpoSettings) -> LossSum:
    keep = batch["targets"] != IGNORE  # (R, T)
    rows = keep.nonzero()[:, 0]  # (N,) the completion of each token
    logps, entropy = token_logps(model, batch, with_entropy=True)  # (N,), (N,)
    old = batch["old_logps"][keep] if "old_logps" in batch else logps.detach()  # (N,)
    losses, was_clipped = clipped_token_losses(logps, old, batch["advantages"][rows], settings.epsilon_low,
                                               settings.epsilon_high)
    figures = {"clip_fraction": was_clipped.float(), "entropy": entropy}
    if settings.beta > 0:
        delta = batch["ref_logps"][keep] - logps  # (N,)
        kl = torch.exp(delta) - delta - 1
        losses = losses + settings.beta * kl
        figures["kl"] = kl.detach()
    if settings.loss_normalization == "tokens":
        return LossSum(losses.sum(), len(losses), {k: v.sum() for k, v in figures.items()})
    lengths = keep.sum(dim=1).clamp(min=1).float()  # (R,)

    def per_sequence(values: torch.Tensor) -> torch.Tensor:  # (N,) -> the sum over completions of their token mean
        return (torch.zeros(keep.shape[0], device=values.device).index_add(0, rows, values.float()) / lengths).sum()
    return LossSum(per_sequence(losses), keep.shape[0], {k: per_sequence(v) for k, v in figures.items()})


def policy_loss_memory(head: HeadOutput) -> tuple[int, ...]:
    """What the loss (GRPO's, PPO's) holds at once at its largest moment. A plain head: the chunked log-probs'
    (``chunked_logps_memory``; the entropy figure is computed in place in the same chunks). A head a technique wraps
    runs unchunked, largest at the entropy figure: the (N, V) logits in float32 (the head's half-precision output,
    if any, is freed by then), cross-entropy's saved (N, V) float32 log-softmax, the entropy's own log-softmax, its
    exp and their product (float32, without gradients), and the (N,) int64 targets. Backward holds less: the saved
    log-softmax and two or three (N, V) gradients."""
    if head.plain:
        return chunked_logps_memory(head)
    cells = head.rows * head.columns
    return (4 * cells, 4 * cells, 4 * cells, 4 * cells, 4 * cells, 8 * head.rows)


def grpo_rollout_memory(head: HeadOutput, settings: GrpoSettings) -> tuple[int, ...]:
    """``prepare`` scores the completions without gradients, one pass at a time, only to compare with them: the
    sampling policy's log-probs when a rollout is reused (num_iterations > 1), the reference's when beta > 0."""
    return scoring_memory(head) if settings.num_iterations > 1 or settings.beta > 0 else ()


def collate_prompts(rows: list[list[TokenizedExample]], pad_id: int) -> Batch:
    """Prompts as a batch (their ids, nothing supervised): what evaluation's loss would see, were it asked."""
    return collate([[record.example for record in row] for row in rows], pad_id)


OBJECTIVE = Objective(
    name="grpo", config_class=GrpoSettings, loss_sum=grpo_loss_sum, count_units=count_grpo_units, units="tokens",
    summary="group relative policy optimization: completions sampled per prompt, rewarded, and reinforced by their "
            "advantage over their group",
    collate=collate_prompts, batch_rows=rollout_rows, batch_targets=rollout_targets, needs_reference=True, reference_when=lambda settings: settings.beta > 0,
    metrics=("clip_fraction", "entropy", "kl"), refuses={"packing": NEVER_PACKED, "fsdp": NOT_SHARDED}, records="prompt",
    evaluation=REWARDED_ANSWERS,
    prepare=grpo_prepare, loss_memory=policy_loss_memory, rollout_memory=grpo_rollout_memory,
    scoring_runs=reward_model_runs,
    base_figures_uncached=USER_REWARDS,
)
