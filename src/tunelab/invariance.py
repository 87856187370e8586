"""Row-invariant inference: each row of a batch computed bit for bit as it is alone.

A server batches concurrent requests, and greedy decoding takes the argmax of each row's logits: a row whose
logits move in their last bits with what shares its batch can pick another token, and from there its whole answer
departs from the one it gets alone (``tunelab generate``). On a CPU in bfloat16 two things made a row depend on its
batch (SmolLM2-135M, an AMD host with avx512_bf16, 2026-12-04; docs/deployment.md):

1. **Matrix products of fewer than 8 rows.** oneDNN computes a one-row bfloat16 product (a request decoding alone)
   with another kernel than a many-row one, whose rounding differs: layer 1's ``down_proj`` (1536 -> 576) gave a
   row other bits among 2-31 rows than alone, on the model's own activations. Padded with zero rows to 8, every
   product of up to 320 rows gave each row the bits it gets in its own padded product (one and two threads).
   So ``linear`` pads a product of fewer than ``MIN_ROWS`` rows to ``MIN_ROWS``: one more kernel call's worth of
   weight reading at most (0.08 -> 0.15 ms for a (1, 576) x (576, 1536) product, 6.7 -> 8.6 ms for the output head).
   At two threads a float32 product (a LoRA adapter's B, rank 8 -> 576) also gave its first rows other bits among
   9-11 rows than in its padded one-row product (2026-12-05): padded to a multiple of 8, no product of 1-320 rows
   differs at one thread or two, so ``linear`` pads every product to a multiple of ``MIN_ROWS`` (at most 7 zero
   rows: a prefill's copy of its input, against its product).
2. **Attention over a left-padded batch.** The kernel reduces over the batch's widest key row, the other rows'
   padding included (masked), so the order of a row's sums follows the batch's width. ``rows_attention`` runs each
   row in its own call over its own key columns only (the padding and a cached prefix's gap removed) with an
   explicit mask, the same call a row alone makes.

Neither is a property tunelab can prove of a kernel library: ``probe`` checks the products on the model's own
activations when a model is made row-invariant, and the caller falls back to float32 when they are not.
Not a library's job anywhere on this stack (transformers and torch have no batch-invariant CPU mode), hence here.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

MIN_ROWS = 8  # a product's rows are padded to a multiple of this (oneDNN's small-row kernels round otherwise)
ATTENTION = "tunelab_rows"  # the attention implementation a row-invariant model uses (transformers' registry)
_MARK = "tunelab_min_rows"  # set on every nn.Linear whose forward pads its rows (read by ``min_rows``)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           min_rows: int | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (..., d_in) -> (..., d_out), computed with a multiple of ``min_rows`` rows
    (default ``MIN_ROWS``): any other product is padded with zero rows, which are dropped from its output."""
    min_rows = MIN_ROWS if min_rows is None else min_rows
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    padded = -(-rows // min_rows) * min_rows  # rows rounded up to a multiple of min_rows
    if padded == rows:
        return F.linear(x, weight, bias)
    flat = F.pad(x.reshape(rows, x.shape[-1]), (0, 0, 0, padded - rows))  # (padded, d_in)
    return F.linear(flat, weight, bias)[:rows].reshape(*x.shape[:-1], weight.shape[0])


def min_rows(module: nn.Module | None) -> int:
    """The rows a product next to ``module`` (an nn.Linear of a row-invariant model) is padded to; 1 (no padding)
    for any other module."""
    return getattr(module, _MARK, 1) if module is not None else 1


def _padded_forward(module: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return linear(x, module.weight, module.bias, getattr(module, _MARK))
    return forward


# --- attention, row by row -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Call:
    """One SDPA call of ``rows_attention``: one row (a prefill's), or decoding rows of one width."""

    rows: list[int]  # the batch rows it computes
    queries: int  # Lq: each row's real queries, the last Lq of the batch's Q
    columns: slice | torch.Tensor  # one row: its key columns (a slice when contiguous, else (Lk,)); rows: (G, Lk)
    mask: torch.Tensor | None  # (Lq, Lk) bool: what each query sees; None: one query, every column


_last_calls: tuple[Any, list[_Call]] | None = None  # (a weak reference to the mask, its calls): one per forward pass


def _causal(queries: int, columns: int) -> torch.Tensor:
    """(Lq, Lk) bottom-right causal mask: the queries are the last Lq positions of the Lk columns."""
    return torch.ones(queries, columns, dtype=torch.bool).tril(columns - queries)


def _row_columns(sees: torch.Tensor, queries: int, keys: int) -> tuple[int, torch.Tensor, torch.Tensor | None]:
    """A row's real queries Lq, its key columns (Lk,) and its (Lq, Lk) mask (None for one query), from its (Q, K)
    mask (True: attend)."""
    count = int(sees.diagonal(offset=keys - queries).sum())  # a query is real where it sees its own column
    seen = sees[queries - count:]  # (Lq, K): left padding puts the real queries last
    columns = seen.any(dim=0).nonzero().flatten()  # (Lk,)
    return count, columns, seen[:, columns] if count > 1 else None


def _as_slice(columns: torch.Tensor) -> slice | torch.Tensor:
    contiguous = len(columns) and int(columns[-1] - columns[0]) + 1 == len(columns)
    return slice(int(columns[0]), int(columns[-1]) + 1) if contiguous else columns


def _calls(attention_mask: torch.Tensor | None, batch: int, queries: int, keys: int) -> list[_Call]:
    """The SDPA calls of a forward pass, from the (B, 1, Q, K) mask the model built (True or 0.0: attend): each
    row with queries and a mask alone, the rows with one query grouped by their width (Lk). Made once per forward
    pass: every layer gets the same mask tensor."""
    global _last_calls
    if attention_mask is None:  # no padding: every query, causal
        return [_Call([row], queries, slice(0, keys), _causal(queries, keys) if queries > 1 else None)
                for row in range(batch)]
    if _last_calls is not None and _last_calls[0]() is attention_mask:
        return _last_calls[1]
    calls, decoding = [], {}
    for row in range(batch):
        sees = attention_mask[row, 0] if attention_mask.dtype == torch.bool else attention_mask[row, 0] == 0  # (Q, K)
        count, columns, mask = _row_columns(sees, queries, keys)
        if count == 1:
            decoding.setdefault(len(columns), []).append((row, columns))
        elif count:
            calls.append(_Call([row], count, _as_slice(columns), mask))
    for group in decoding.values():
        rows = [row for row, _ in group]
        columns = _as_slice(group[0][1]) if len(group) == 1 else torch.stack([c for _, c in group])  # (G, Lk)
        calls.append(_Call(rows, 1, columns, None))
    _last_calls = (weakref.ref(attention_mask), calls)
    return calls


def rows_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                   **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface, each row over its own columns. query (B, H, Q, d), key and value
    (B, Hkv, K, d) -> (B, Q, H, d); a padded query's output is zero (nothing reads it). Decoding rows of one width
    share a call: SDPA computes each batch entry on its own, as a one-row call does (checked by the tests against
    each row alone)."""
    batch, heads, queries, width = query.shape
    out = query.new_zeros(batch, queries, heads, width)  # (B, Q, H, d)
    for call in _calls(attention_mask, batch, queries, key.shape[2]):
        if len(call.rows) == 1:
            row = call.rows[0]
            q = query[row : row + 1, :, queries - call.queries :]  # (1, H, Lq, d)
            k, v = (x[row : row + 1, :, call.columns] for x in (key, value))  # (1, Hkv, Lk, d)
        else:  # decoding rows: one query each, no mask, Lk columns each
            rows = torch.tensor(call.rows)[:, None]  # (G, 1)
            q = query[call.rows, :, queries - 1 :]  # (G, H, 1, d)
            k, v = (x[rows, :, call.columns].transpose(1, 2) for x in (key, value))  # (G, Hkv, Lk, d)
        attended = _grouped_query_attention(q, k, v, call.mask, dropout, scaling)  # (G, H, Lq, d)
        out[call.rows, queries - call.queries :] = attended.transpose(1, 2)
    return out, None


def _grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                             dropout: float, scaling: float | None) -> torch.Tensor:
    """SDPA with each key/value head's query heads stacked as its queries: q (G, H, Lq, d), k and v (G, Hkv, Lk,
    d) -> (G, H, Lq, d). Query head h reads key/value head h // (H / Hkv), as transformers' repeat_kv pairs them;
    torch's CPU kernel took 61 us for a decoding row's 9 heads over 3 with ``enable_gqa`` and 16 us stacked."""
    groups, heads, queries, width = q.shape
    repeats = heads // k.shape[1]
    stacked = q.reshape(groups, k.shape[1], repeats * queries, width)  # (G, Hkv, n_rep * Lq, d)
    if mask is not None:
        mask = mask.repeat(repeats, 1)  # (n_rep * Lq, Lk)
    attended = F.scaled_dot_product_attention(stacked, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return attended.reshape(groups, heads, queries, width)


def _register_attention() -> None:
    from transformers import AttentionInterface  # why here: the CLI's start-up does not need transformers
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, rows_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the masks SDPA attention gets: (B, 1, Q, K) bool or None


# --- a model made row-invariant --------------------------------------------------------------------------------------


def make_row_invariant(model: nn.Module) -> None:
    """Pad the small products of every plain nn.Linear of ``model`` (its adapters' included) and attend row by row.
    In place; for inference (no gradients are kept apart from the padding)."""
    for module in model.modules():
        if type(module) is nn.Linear:  # a quantized or wrapped layer computes its product otherwise
            module.forward = _padded_forward(module)
            setattr(module, _MARK, MIN_ROWS)
    _register_attention()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(ATTENTION)


def is_row_invariant(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(getattr(base, "config", None), "_attn_implementation", None) == ATTENTION


PROBE_SIZES = (2, 7, 8, 9, 16, 17, 33, 64, 128)  # rows a served product has: decoding 1-16, prefill slices to 128+
PROBE_ROWS = 17  # rows compared with their own one-row product in each size (the output head's one-row products
# are the probe's largest cost: 17 of them take about 0.15 s on SmolLM2)


@torch.no_grad()
def probe(model: nn.Module, input_ids: torch.Tensor, sizes: tuple[int, ...] = PROBE_SIZES) -> str | None:
    """Check on the model's own activations that every distinct product shape of a row-invariant ``model`` gives
    each of its first rows, among ``sizes`` rows, the bits it gets alone. ``input_ids`` (1, T); sizes past T are
    skipped. None when every product keeps them, else the first that did not. One forward pass, then each
    captured input's rows alone and in slices."""
    captured: dict[tuple[int, ...], tuple[nn.Linear, torch.Tensor]] = {}

    def capture(module: nn.Module, args: tuple[Any, ...]) -> None:
        if tuple(module.weight.shape) not in captured:
            captured[tuple(module.weight.shape)] = (module, args[0].reshape(-1, args[0].shape[-1]).clone())
    handles = [m.register_forward_pre_hook(capture) for m in model.modules() if type(m) is nn.Linear]
    try:
        model(input_ids=input_ids)
    finally:
        for handle in handles:
            handle.remove()
    for (outputs, inputs), (module, rows) in captured.items():
        first = min(len(rows), PROBE_ROWS)
        alone = torch.cat([linear(rows[i : i + 1], module.weight, module.bias) for i in range(first)])  # (n, d_out)
        for size in (s for s in sizes if s <= len(rows)):
            together = linear(rows[:size], module.weight, module.bias)[:first]
            if not torch.equal(together, alone[: len(together)]):
                return (f"a ({size}, {inputs}) x ({inputs}, {outputs}) {str(module.weight.dtype).removeprefix('torch.')} "
                        "product gives its rows other bits than each alone")
    return None
