"""Attention on a CPU during training: grouped-query attention without copying the key/value heads, and causal
attention per packed example instead of the packed rows' block-diagonal mask (second half of this module).

transformers' SDPA attention repeats each key/value head for its query heads (``repeat_kv``: two (B, H, T, D)
copies per layer, and their backward) whenever an attention mask is present, because CUDA's fast kernels refuse
``enable_gqa`` with a mask. Training batches always carry one (packed rows: the block-diagonal causal mask). torch's
CPU flash-attention kernel takes ``enable_gqa`` with a mask: the same output bit for bit (checked on SmolLM2's 9 query
and 3 key/value heads over a packed 4 x 256 batch), in about 20-30% less time for the attention's forward and
backward. The key/value gradients then sum over their query heads inside the kernel, in float32, instead of after
it in bfloat16: they may differ in the last bits, and are at least as close to float32's (tests/test_cpu_attention.py). transformers reads its switch for this, ``TRANSFORMERS_SDPA_FORCE_GQA``, at every
call; training on a CPU sets it for the run and restores it after. No library setting does this otherwise.
"""

from __future__ import annotations

import os
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from tunelab.models import attends_per_packed_example

FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"


@contextmanager
def kv_heads_shared_in_kernel(device: torch.device) -> Iterator[bool]:
    """While the block runs, SDPA attention on ``device`` (a CPU) shares key/value heads inside the kernel; yields
    whether it was switched on here (not on other devices, nor when the user set the variable)."""
    if device.type != "cpu" or FORCE_GQA in os.environ:
        yield False
        return
    os.environ[FORCE_GQA] = "1"
    try:
        yield True
    finally:
        os.environ.pop(FORCE_GQA, None)


# --- Causal attention per packed example, re-batched -------------------------------------------------------------
#
# A packed row's block-diagonal mask makes torch's CPU flash kernel compute every (query, key) pair of the row: at
# T = 256 its key block is the whole row, so no block is skipped. With ``is_causal`` and no mask it computes each
# query block only against the keys up to its diagonal. So the examples of a batch are gathered into a few
# right-padded batches by length, (n, H, L, D) each, attention runs causally on each, and the outputs are scattered
# back into the rows. Right padding needs no mask under causal attention: a real query never reaches the padded keys
# after it, and the padded queries' outputs are dropped (their gradient is zero). One SDPA call per example was no
# faster (the per-call cost ate the skipped pairs), hence a few calls, the groups chosen by ``length_groups``.

MAX_GROUPS = 3  # SDPA calls per layer at most
MAX_CUTS = 64  # places a length group may end that ``length_groups`` weighs
CALL_COST = 4096  # a call's fixed cost in (query, key) pairs: set by hand (3-8 groups measured alike)
PACKED_SDPA = "sdpa"  # the attention implementation this replaces while a CPU run trains
_last_plan: tuple[Any, Any, "PackedPlan | None"] | None = None  # (mask, position ids) weak references, and their plan


@dataclass(frozen=True)
class PackedPlan:
    """Where each example of a (B, T) batch goes: ``groups`` (n_g, L_g) token indices into the flattened B*T tokens,
    one row per example, right-padded by repeating the example's last token; ``back`` (B*T,) each token's index in
    the groups' outputs laid end to end (group by group, row-major)."""

    groups: tuple[torch.Tensor, ...]
    padding: tuple[torch.Tensor, ...]  # (n_g, L_g) bool each: True on a group's padding entries
    back: torch.Tensor

    @property
    def gathered_tokens(self) -> int:
        return sum(g.numel() for g in self.groups)


def segments(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) position ids -> (B, T) bool, True where an example starts: the first token of a row and every token whose
    position is not its predecessor's plus one (transformers' ``find_packed_sequence_indices`` reads them the same)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def length_groups(lengths: list[int], max_groups: int = MAX_GROUPS, call_cost: int = CALL_COST) -> list[list[int]]:
    """Split examples (their indices) into at most ``max_groups`` groups, each run as one right-padded causal batch,
    minimising sum over groups of (call_cost + n_g * L_g^2), L_g the group's longest example: examples sorted by
    length, groups contiguous in that order, by dynamic programming over the places a group may end: every example
    up to ``MAX_CUTS`` of them, else ``MAX_CUTS`` evenly spaced ones (O(max_groups * MAX_CUTS^2) whatever the batch:
    a long-context micro-batch holds hundreds of examples, and this runs once per forward)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    n = len(order)
    cuts = list(range(n + 1)) if n <= MAX_CUTS else sorted({round(c * n / MAX_CUTS) for c in range(MAX_CUTS + 1)})
    inf = float("inf")
    # best[k][b]: the cheapest split of the cuts[b] shortest examples into k groups; start[k][b]: its last group's
    # first cut
    best = [[inf] * len(cuts) for _ in range(max_groups + 1)]
    start = [[0] * len(cuts) for _ in range(max_groups + 1)]
    best[0][0] = 0.0
    for k in range(1, max_groups + 1):
        for b in range(1, len(cuts)):
            longest = lengths[order[cuts[b] - 1]] ** 2
            for a in range(k - 1, b):
                cost = best[k - 1][a] + call_cost + (cuts[b] - cuts[a]) * longest
                if cost < best[k][b]:
                    best[k][b], start[k][b] = cost, a
    k = min(range(1, max_groups + 1), key=lambda g: best[g][-1])
    groups, b = [], len(cuts) - 1
    while k:
        a = start[k][b]
        groups.append(order[cuts[a] : cuts[b]])
        b, k = a, k - 1
    return groups[::-1]


def packed_plan(position_ids: torch.Tensor) -> PackedPlan:
    """The gather/scatter indices of ``position_ids`` (B, T): computed once per forward, used by every layer."""
    flat = segments(position_ids).reshape(-1)  # (B*T,)
    starts = flat.nonzero().squeeze(1)  # (E,) each example's first token in B*T
    ends = torch.cat([starts[1:], starts.new_tensor([flat.numel()])])
    lengths = (ends - starts).tolist()
    back = torch.empty(flat.numel(), dtype=torch.long)
    groups, padding, offset = [], [], 0
    for members in length_groups(lengths):
        width = max(lengths[e] for e in members)
        first, size = starts[members], torch.tensor([lengths[e] for e in members])  # (n,), (n,)
        steps = torch.arange(width)  # (L,)
        index = first[:, None] + torch.minimum(steps[None, :], size[:, None] - 1)  # (n, L): pad repeats the last token
        real = steps[None, :] < size[:, None]  # (n, L)
        back[index[real]] = offset + real.reshape(-1).nonzero().squeeze(1)
        groups.append(index.to(position_ids.device))
        padding.append((~real).to(position_ids.device))
        offset += index.numel()
    return PackedPlan(tuple(groups), tuple(padding), back.to(position_ids.device))


def block_causal(position_ids: torch.Tensor) -> torch.Tensor:
    """The (B, 1, T, T) bool mask of causal attention within each example of ``position_ids`` (B, T)."""
    example = segments(position_ids).cumsum(dim=1)  # (B, T): the example each token belongs to
    length = position_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    return ((example[:, :, None] == example[:, None, :]) & causal)[:, None]


def attend_per_example(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: PackedPlan,
                       scaling: float | None) -> torch.Tensor:
    """Causal attention within each example: query (B, H, T, D), key/value (B, K, T, D) -> (B, T, H, D)."""
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    device = query.device.type
    if torch.is_autocast_enabled(device):
        # SDPA is on autocast's lower-precision list; the kernel called below is not, and refuses mixed inputs.
        # Full fine-tuning under bf16 autocast meets them: rotary embedding turns q and k float32 (cos and sin
        # take the float32 embeddings' dtype) while v stays the bf16 projection. Cast as SDPA would.
        dtype = torch.get_autocast_dtype(device)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    return PackedCausalAttention.apply(query, key, value, plan, scale)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, h, T, D) -> (B*T, h, D): a view when x is laid out (B, T, h, D), as the projections' outputs are."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B*T, h, D) tokens -> (n, h, L, D), the rows of ``index`` (n, L); laid out (n, L, h, D)."""
    return x.index_select(0, index.reshape(-1)).view(*index.shape, *x.shape[1:]).transpose(1, 2)


def _scatter(groups: list[torch.Tensor], plan: PackedPlan) -> torch.Tensor:
    """Per-group (n, h, L, D) -> (B*T, h, D): each token's row from its own example (padding rows are dropped)."""
    flat = [g.transpose(1, 2).reshape(-1, g.shape[1], g.shape[3]) for g in groups]  # (n*L, h, D) each
    return torch.cat(flat).index_select(0, plan.back)


class PackedCausalAttention(torch.autograd.Function):
    """Causal attention per example of packed rows: query (B, H, T, D), key/value (B, K, T, D) (K divides H:
    grouped-query attention) -> (B, T, H, D). The forward gathers each length group, runs torch's CPU flash kernel on
    it with ``is_causal`` and scatters the outputs back; the backward gathers again and runs ``_group_backward``.

    Autograd keeps what SDPA on the packed mask keeps: the query, key, value and output at the rows' (B, T) size,
    plus each group's float32 logsumexp (n, H, L), and not the mask, so the memory plan's probe (which runs SDPA)
    still counts it. The gathered copies live only inside the forward and inside the backward.
    """

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: PackedPlan,
                scale: float) -> torch.Tensor:
        q, k, v = _tokens(query), _tokens(key), _tokens(value)
        outs, lses = [], []
        for index in plan.groups:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                _gather(q, index), _gather(k, index), _gather(v, index), 0.0, True, scale=scale)
            outs.append(out)  # (n, H, L, D)
            lses.append(lse)  # (n, H, L) float32
        out = _scatter(outs, plan).view(query.shape[0], query.shape[2], query.shape[1], query.shape[3])  # (B, T, H, D)
        ctx.save_for_backward(query, key, value, out, *lses)
        ctx.plan, ctx.scale = plan, scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        query, key, value, out, *lses = ctx.saved_tensors
        q, k, v = _tokens(query), _tokens(key), _tokens(value)
        o, d_o = out.flatten(0, 1), grad.flatten(0, 1)  # (B*T, H, D)
        grads: list[list[torch.Tensor]] = [[], [], []]
        for index, padding, lse in zip(ctx.plan.groups, ctx.plan.padding, lses):
            # the padding entries repeat their example's last token: their outputs were dropped, so their dO is zero
            d_o_group = _gather(d_o, index).masked_fill(padding[:, None, :, None], 0)  # (n, H, L, D)
            for into, g in zip(grads, _group_backward(_gather(q, index), _gather(k, index), _gather(v, index),
                                                       _gather(o, index), lse, d_o_group, ctx.scale)):
                into.append(g)
        d_q, d_k, d_v = (_scatter(g, ctx.plan).view(x.shape[0], x.shape[2], x.shape[1], x.shape[3]).transpose(1, 2)
                         for g, x in zip(grads, (query, key, value)))
        return d_q, d_k, d_v, None, None


def _group_backward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                    grad: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of causal attention on one right-padded group: query/out/grad (n, H, L, D), key/value
    (n, K, L, D), lse (n, H, L) float32 -> (dQ, dK, dV) in the input dtype.

    torch's CPU flash backward splits the queries into blocks of 32 below 192 tokens (64 from 192) and runs five small
    GEMMs per block and head, which costs more than the work (examples of ~100 tokens took longer than whole 256-token
    rows). This is the same algebra in a few batched matmuls over each key/value head's G query heads, with the
    kernel's precision: scores and dP = dO V^T recomputed in float32, P = exp(S - logsumexp) in float32, and P and dS
    rounded to the input dtype for the three gradient products (the kernel rounds them the same way; its float32
    accumulation is the matmul's)::

        dV = P^T dO,   dS = P * (dP - rowsum(dO * O)),   dQ = scale * dS K,   dK = scale * dS^T Q

    A padded query's dO is zero, so its dS row is too; no real query reaches a padded key (it lies in its future).
    """
    n, heads, length, dim = query.shape
    kv = key.shape[1]
    rows = heads // kv * length  # a key/value head's query rows: its G query heads' L tokens each

    def by_kv_head(x: torch.Tensor) -> torch.Tensor:  # (n, H, L, ...) -> (n, K, G*L, ...)
        return x.reshape(n, kv, rows, *x.shape[3:])

    q, d_out = by_kv_head(query).flatten(0, 1), by_kv_head(grad).flatten(0, 1)  # (n*K, G*L, D)
    keys, values = key.flatten(0, 1), value.flatten(0, 1)  # (n*K, L, D)
    future = torch.ones(length, length, dtype=torch.bool, device=query.device).triu(1)  # (L, L) keys after the query
    # scale * S - logsumexp in one batched matmul (the subtrahend broadcast as its addend), then P in place
    scores = torch.baddbmm(lse.reshape(n * kv, rows, 1).neg(), q.float(), keys.float().transpose(1, 2), alpha=scale)
    scores.view(n * kv, -1, length, length).masked_fill_(future, float("-inf"))
    probs = scores.exp_()  # P, (n*K, G*L, L) float32
    d_out32 = d_out.float()
    d_sum = (d_out32 * by_kv_head(out).flatten(0, 1).float()).sum(-1, keepdim=True)  # (n*K, G*L, 1)
    # scale * (dP - rowsum(dO * O)) in one batched matmul, times P: scale * dS
    d_scores = torch.baddbmm(d_sum, d_out32, values.float().transpose(1, 2), beta=-scale, alpha=scale)
    d_scores = d_scores.mul_(probs).to(query.dtype)  # (n*K, G*L, L)
    d_value = torch.bmm(probs.to(query.dtype).transpose(1, 2), d_out).view(n, kv, length, dim)
    d_query = torch.bmm(d_scores, keys).view(n, heads, length, dim)
    d_key = torch.bmm(d_scores.transpose(1, 2), q).view(n, kv, length, dim)
    return d_query, d_key, d_value


def _plan_for(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, query: torch.Tensor,
              key: torch.Tensor) -> PackedPlan | None:
    """The plan for this layer's call, or None when the per-example path does not apply: no packed mask, a cache or
    prefix (keys longer than queries), or a mask that is not exactly causal within the examples of the position ids
    (a padding mask a caller passed, say). Checked and built once per forward: every layer gets the same mask and
    position ids objects, so the result is kept against (weak references to) them."""
    global _last_plan
    if attention_mask is None or position_ids is None or position_ids.dim() != 2 or attention_mask.dtype != torch.bool:
        return None
    batch, _, length, _ = query.shape
    if key.shape[2] != length or attention_mask.shape != (batch, 1, length, length) or position_ids.shape[-1] != length:
        return None
    last = _last_plan
    if last is not None and last[0]() is attention_mask and last[1]() is position_ids:
        return last[2]
    positions = position_ids.expand(batch, length)
    plan = packed_plan(positions) if torch.equal(attention_mask, block_causal(positions)) else None
    _last_plan = (weakref.ref(attention_mask), weakref.ref(position_ids), plan)
    return plan


def packed_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention (same signature), causal per example on packed rows (see above); every other call
    (a cache, a padding mask, dropout, sliding windows, soft-capping, sinks, position biases) goes to transformers'."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward  # why: only a CPU run needs it

    plain = dropout or not getattr(module, "is_causal", True) or kwargs.get("is_causal") is False or any(
        kwargs.get(name) is not None for name in ("sliding_window", "softcap", "s_aux", "position_bias"))
    plan = None if plain else _plan_for(attention_mask, kwargs.get("position_ids"), query, key)
    if plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return attend_per_example(query, key, value, plan, scaling), None


@contextmanager
def attention_per_packed_example(device: torch.device) -> Iterator[bool]:
    """While the block runs, transformers' "sdpa" attention on ``device`` (a CPU) attends per packed example
    (``packed_sdpa_attention``); yields whether it was switched on here (not on other devices, not when something
    else already replaced "sdpa" in this process's attention registry, nor with ``TUNELAB_PACKED_ATTENTION=0``: its
    many small operations wait for a descheduled thread on a busy host, see docs/performance.md)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # why: only a CPU run needs it

    if not attends_per_packed_example(device.type) or PACKED_SDPA in ALL_ATTENTION_FUNCTIONS._local_mapping:
        yield False
        return
    ALL_ATTENTION_FUNCTIONS[PACKED_SDPA] = packed_sdpa_attention
    try:
        yield True
    finally:
        ALL_ATTENTION_FUNCTIONS._local_mapping.pop(PACKED_SDPA, None)


def attention_in_use() -> str:
    """What this process's "sdpa" attention does on packed training rows, for the run's log and run_info.json."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # why: only a CPU run needs it

    if ALL_ATTENTION_FUNCTIONS._local_mapping.get(PACKED_SDPA) is packed_sdpa_attention:
        return "causal per packed example, re-batched by length (CPU; TUNELAB_PACKED_ATTENTION=0 turns it off)"
    return "transformers' SDPA on the packed rows' block-diagonal mask"
