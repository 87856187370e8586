"""Row-invariant bfloat16 generation (tunelab.invariance): each row of a batch computed bit for bit as it is alone.

The kernels' own behaviour (oneDNN's one-row products) shows on SmolLM2 only: tests/test_real_invariance.py. Here
tunelab's part: the padding of small products, attention per row against a row alone (with plain SDPA over the
padded batch as the negative control), the probe, and the loader's choice and fallback."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from support.greedy import tokens_alone_offline_and_joining
from support.trained import adapter_runs
from torch import nn
from transformers import AutoModelForCausalLM

from tunelab import invariance, precision
from tunelab.generation import Sampling
from tunelab.result import load_for_generation

HEADS, KV_HEADS, WIDTH = 6, 2, 16


def test_a_product_is_computed_with_a_multiple_of_min_rows_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fewer than MIN_ROWS rows are padded to MIN_ROWS (a one-row bfloat16 product rounds otherwise), and any other
    count to the next multiple of it (at two threads a float32 product of 9-11 rows rounded its first rows otherwise
    than alone)."""
    shapes = []
    spy = types.SimpleNamespace(**{**vars(F), "linear": lambda x, w, b=None: (shapes.append(tuple(x.shape)), F.linear(x, w, b))[1]})
    monkeypatch.setattr(invariance, "F", spy)
    x, weight = torch.randn(2, 3, 5), torch.randn(7, 5)
    small = invariance.linear(x[:1, :2], weight)  # 2 rows
    assert shapes == [(invariance.MIN_ROWS, 5)] and small.shape == (1, 2, 7)
    assert torch.equal(small[0], F.linear(F.pad(x[0, :2], (0, 0, 0, invariance.MIN_ROWS - 2)), weight)[:2])
    rows = invariance.MIN_ROWS + 1
    nine = invariance.linear(torch.randn(rows, 5), weight)
    assert shapes[-1] == (2 * invariance.MIN_ROWS, 5) and nine.shape == (rows, 7)
    invariance.linear(x.repeat(4, 4, 1), weight)  # 96 rows, a multiple: as they are
    assert shapes[-1] == (8, 12, 5)


def _batch(queries: int, lengths: list[int], gap: tuple[int, int, int] | None = None):
    """Random (B, H, Q, d) queries, (B, Hkv, K, d) keys and values, each row's real columns at the right end of
    K (left padding), an optional gap (row, start, stop) in one row's columns (a cached prefix's), and the
    (B, 1, Q, K) bool mask transformers builds for SDPA."""
    keys = max(lengths)
    q = torch.randn(len(lengths), HEADS, queries, WIDTH).bfloat16()
    k, v = (torch.randn(len(lengths), KV_HEADS, keys, WIDTH).bfloat16() for _ in range(2))
    real = torch.zeros(len(lengths), keys, dtype=torch.bool)
    for row, length in enumerate(lengths):
        real[row, keys - length:] = True
    if gap is not None:
        real[gap[0], gap[1]:gap[2]] = False
    causal = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)
    return q, k, v, real, real[:, None, None, :] & causal


@pytest.mark.parametrize("queries,lengths,gap", [(1, [37, 20, 64, 5], None), (1, [37, 20, 37, 64, 37], (4, 40, 44)),
                                                 (6, [37, 20, 64, 9], None), (6, [40, 30, 64, 12], (0, 26, 30))],
                         ids=["decoding", "decoding-rows-of-one-width", "prefill", "prefill-over-a-cached-prefix"])
def test_each_row_attends_bit_for_bit_as_alone(queries: int, lengths: list[int], gap: tuple | None) -> None:
    """A left-padded batch (and a row whose columns have a gap): each row's real queries get exactly what the row
    alone (its own columns, no padding, no mask) gets, and what SDPA gives them over the padded batch up to
    rounding. Negative control: plain SDPA over the padded batch gives some row other bits than alone."""
    torch.manual_seed(0)
    q, k, v, real, mask = _batch(queries, lengths, gap)
    together, _ = invariance.rows_attention(None, q, k, v, mask)  # (B, Q, H, d)
    plain = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)
    plain_differs = False
    for row in range(len(lengths)):
        columns = real[row].nonzero().flatten()
        count = min(queries, len(columns))
        own = (q[row:row + 1, :, queries - count:], k[row:row + 1, :, columns], v[row:row + 1, :, columns])
        alone, _ = invariance.rows_attention(None, *own, None)
        assert torch.equal(together[row, queries - count:], alone[0]), f"row {row}"
        assert torch.allclose(together[row, queries - count:].float(), plain[row, queries - count:].float(), atol=2e-2)
        causal = torch.ones(count, len(columns), dtype=torch.bool).tril(len(columns) - count)
        plain_alone = F.scaled_dot_product_attention(*own, attn_mask=causal, enable_gqa=True).transpose(1, 2)
        plain_differs |= not torch.equal(plain[row, queries - count:], plain_alone[0])
    assert plain_differs, "the control: SDPA over the padded batch should round some row otherwise"


def test_the_probe_finds_a_product_that_rounds_a_row_with_its_batch(tiny_model_dir: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    invariance.make_row_invariant(model)
    ids = torch.arange(3, 3 + 40)[None]  # (1, 40)
    assert invariance.probe(model, ids) is None
    # a kernel whose rounding follows the row count: what oneDNN's one-row path does to SmolLM2's down_proj
    drifting = types.SimpleNamespace(**{**vars(F), "linear": lambda x, w, b=None: F.linear(x, w, b) * (1 + 2 ** -6 * (len(x) > 8))})
    monkeypatch.setattr(invariance, "F", drifting)
    found = invariance.probe(model, ids)
    assert found is not None and "product gives its rows other bits than each alone" in found


def test_a_row_invariant_model_generates_every_row_as_alone(tiny_model_dir: Path, tiny_tokenizer) -> None:
    """The tiny model in bfloat16, made row-invariant: every nn.Linear pads its small products and attention runs
    per row; requests joining a continuous batch at different steps, and a left-padded offline batch, each get
    the tokens of the same prompt alone."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    invariance.make_row_invariant(model)
    assert invariance.is_row_invariant(model)
    assert all(invariance.min_rows(m) == invariance.MIN_ROWS for m in model.modules() if type(m) is nn.Linear)
    prompts = [tiny_tokenizer(f"the quick brown fox {i} " + "jumps " * i)["input_ids"] for i in range(6)]
    alone, offline, joining, _ = tokens_alone_offline_and_joining(model, tiny_tokenizer, prompts,
                                                                  Sampling(max_new_tokens=10), 2, prefix_tokens=0)
    assert offline == alone and joining == alone


@pytest.fixture(scope="module")
def one_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return adapter_runs(tmp_path_factory, tiny_model_dir)["cats"]


def test_bfloat16_generation_on_a_cpu_is_row_invariant_or_float32_with_the_reason(
        one_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`tunelab serve`, `generate` and `chat` (one loader): bfloat16 on a CPU is made row-invariant and says so;
    where the probe finds a product that rounds a row with its batch, the run is loaded in float32 and the reason
    names the product."""
    monkeypatch.setattr(precision, "detect_cpu_bf16", lambda: precision.CpuBf16(True, "test: native bfloat16"))
    loaded = load_for_generation(one_run, device="cpu")  # dtype auto, the run's model.dtype auto
    assert loaded.precision.dtype == "bfloat16" and "computed row by row" in loaded.precision.reason
    assert invariance.is_row_invariant(loaded.model)
    assert loaded.model.get_input_embeddings().weight.dtype == torch.bfloat16
    import tunelab.result as result
    monkeypatch.setattr(result, "probe", lambda model, ids: "a (2, 64) x (64, 64) bfloat16 product gives ...")
    fallback = load_for_generation(one_run, device="cpu", dtype="bfloat16")
    assert fallback.precision.dtype == "float32" and "a (2, 64) x (64, 64) bfloat16 product" in fallback.precision.reason
    assert fallback.model.get_input_embeddings().weight.dtype == torch.float32
    assert not invariance.is_row_invariant(fallback.model)
