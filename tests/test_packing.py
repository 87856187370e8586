"""Packing is exact: several examples in one row give the same loss as each example alone, because position ids
restart per example (a block-diagonal causal mask) and targets are shifted per example. Padding changes nothing,
and the head hook that computes logits only at supervised positions gives the full-logits loss."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from tunelab.data import IGNORE, Example, TokenizedExample, collate, pack_rows, tokenize_example
from tunelab.objectives import OBJECTIVES
from tunelab.objectives.sft import count_supervised_tokens, logits_only_where, sft_loss_sum

TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """A tiny model gains nothing from intra-op threads, and on a busy CPU they make each forward ~100x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request: pytest.FixtureRequest, tiny_model_dir: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=request.param)
    return model.eval()


@pytest.fixture(scope="module")
def examples(tokenizer: PreTrainedTokenizerFast) -> list[TokenizedExample]:
    raw = [
        Example("messages", "chat:1", messages=(("user", "what is the capital of france?"),
                                                ("assistant", "the capital of france is paris."))),
        Example("messages", "chat:2", messages=(("system", "be brief"), ("user", "count from one to five"),
                                                ("assistant", "one two three"), ("user", "and then?"),
                                                ("assistant", "four five"))),
        Example("prompt_completion", "pc:1", prompt="hello, how are you?", completion=" i am fine, thank you."),
        Example("text", "text:1", completion="the quick brown fox jumps over the lazy dog"),
        Example("messages", "chat:3", messages=(("user", "say fox"), ("assistant", "fox fox fox"))),
    ]
    out = [tokenize_example(tokenizer, e) for e in raw]
    assert all(e.num_supervised > 0 for e in out)
    return out


def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    with torch.no_grad():
        result = sft_loss_sum(model, batch)
    return float(result.loss_sum), result.num_units


def only_targets_of(batch: dict[str, torch.Tensor], start: int, end: int) -> dict[str, torch.Tensor]:
    """The same batch with the loss taken only on row 0, positions [start, end)."""
    targets = torch.full_like(batch["targets"], IGNORE)
    targets[0, start:end] = batch["targets"][0, start:end]
    return {**batch, "targets": targets}


# ---------------------------------------------------------------- exactness


def test_packed_loss_equals_sum_of_single_losses(model, tokenizer, examples) -> None:  # noqa: ANN001
    singles = [loss(model, collate([[e]], tokenizer.pad_token_id)) for e in examples]
    single_sum, single_count = sum(s for s, _ in singles), sum(n for _, n in singles)

    packed_batch = collate([examples], tokenizer.pad_token_id)
    assert packed_batch["input_ids"].shape == (1, sum(len(e.input_ids) for e in examples))
    packed_sum, packed_count = loss(model, packed_batch)

    # every supervised label but an example's first token (nothing predicts it) is a target
    assert packed_count == single_count == sum(sum(label != IGNORE for label in e.labels[1:]) for e in examples)
    assert packed_sum == pytest.approx(single_sum, rel=TOL, abs=TOL)
    assert packed_sum / packed_count == pytest.approx(single_sum / single_count, abs=TOL)

    # and example by example, inside the packed row
    offset = 0
    for example, (alone, count) in zip(examples, singles):
        in_row, in_row_count = loss(model, only_targets_of(packed_batch, offset, offset + len(example.input_ids)))
        assert in_row_count == count
        assert in_row == pytest.approx(alone, rel=TOL, abs=TOL), example.source
        offset += len(example.input_ids)


def test_packing_order_does_not_matter(model, tokenizer, examples) -> None:  # noqa: ANN001
    forward, _ = loss(model, collate([examples], tokenizer.pad_token_id))
    backward, _ = loss(model, collate([examples[::-1]], tokenizer.pad_token_id))
    assert forward == pytest.approx(backward, rel=TOL, abs=TOL)


def test_negative_control_without_position_reset(model, tokenizer, examples) -> None:  # noqa: ANN001
    """Through tunelab's own collate: the same tokens handed over as ONE example get one position range over the
    whole row (no restart), so the last example attends to the others and its loss changes. What makes packing
    exact is collate's per-example restart, not the model or this test."""
    *others, last = examples
    packed = collate([examples], tokenizer.pad_token_id)
    merged_example = TokenizedExample([t for e in examples for t in e.input_ids],
                                      [label for e in examples for label in e.labels], "merged")
    merged = collate([[merged_example]], tokenizer.pad_token_id)
    assert torch.equal(packed["input_ids"], merged["input_ids"])
    start = sum(len(e.input_ids) for e in others)
    end = start + len(last.input_ids) - 1  # the last example's own targets (its final position predicts nothing)
    alone, _ = loss(model, collate([[last]], tokenizer.pad_token_id))
    in_packed, _ = loss(model, only_targets_of(packed, start, end))
    in_merged, _ = loss(model, only_targets_of(merged, start, end))
    assert in_packed == pytest.approx(alone, rel=TOL, abs=TOL)
    assert abs(in_merged - alone) > 1e-3


def test_targets_are_shifted_per_example(tokenizer, examples) -> None:  # noqa: ANN001
    a, b = examples[0], examples[2]
    batch = collate([[a, b]], tokenizer.pad_token_id)
    ids, pos, tgt = (batch[k][0].tolist() for k in ("input_ids", "position_ids", "targets"))
    assert ids == a.input_ids + b.input_ids
    assert pos == list(range(len(a.input_ids))) + list(range(len(b.input_ids)))
    assert tgt == a.labels[1:] + [IGNORE] + b.labels[1:] + [IGNORE]
    assert tgt[len(a.input_ids) - 1] == IGNORE  # a's last token does not predict b's first
    assert count_supervised_tokens(batch) == sum(t != IGNORE for t in tgt)


# ---------------------------------------------------------------- padding


@pytest.mark.parametrize("pad_with_eos", [False, True], ids=["pad", "pad=eos"])
def test_padding_rows_do_not_change_the_loss(model, tokenizer, examples, pad_with_eos: bool) -> None:  # noqa: ANN001
    pad_id = tokenizer.eos_token_id if pad_with_eos else tokenizer.pad_token_id
    long_row, short_row = examples[:3], examples[3:4]
    batch = collate([long_row, short_row], pad_id)
    width = sum(len(e.input_ids) for e in long_row)
    assert batch["input_ids"].shape == (2, width)
    short_len = len(short_row[0].input_ids)
    assert batch["input_ids"][1, short_len:].eq(pad_id).all()
    assert batch["targets"][1, short_len - 1:].eq(IGNORE).all()
    assert batch["position_ids"][1, short_len:].tolist() == list(range(width - short_len))

    long_alone, long_count = loss(model, collate([long_row], pad_id))
    short_alone, short_count = loss(model, collate([short_row], pad_id))
    both, both_count = loss(model, batch)
    assert both_count == long_count + short_count
    assert both == pytest.approx(long_alone + short_alone, rel=TOL, abs=TOL)
    short_in_batch = {**batch, "targets": torch.where(torch.arange(2)[:, None] == 1, batch["targets"], IGNORE)}
    assert loss(model, short_in_batch)[0] == pytest.approx(short_alone, rel=TOL, abs=TOL)


# ---------------------------------------------------------------- the logits hook


def test_logits_only_where_matches_full_logits(model, tokenizer, examples) -> None:  # noqa: ANN001
    batch = collate([examples[:3], examples[3:]], tokenizer.pad_token_id)
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        assert full.shape[:2] == batch["input_ids"].shape  # the hook is gone after the context
        reference = F.cross_entropy(full.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE, reduction="sum")
        result = sft_loss_sum(model, batch)
    assert result.num_units == int((batch["targets"] != IGNORE).sum())
    assert float(result.loss_sum) == pytest.approx(float(reference), rel=TOL, abs=TOL)
    assert OBJECTIVES["sft"].loss_sum is sft_loss_sum
    assert OBJECTIVES["sft"].count_units(batch) == result.num_units


def test_logits_only_where_gradients_match(tokenizer, examples, tiny_model_dir: Path) -> None:  # noqa: ANN001
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    batch = collate([examples[:2]], tokenizer.pad_token_id)
    sft_loss_sum(model, batch).loss_sum.backward()
    hooked = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE, reduction="sum").backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(hooked[name], param.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_logits_only_where_left_pads_the_mask_for_virtual_tokens(model) -> None:  # noqa: ANN001
    head = model.get_output_embeddings()
    hidden = torch.randn(2, 7, head.in_features)  # 2 virtual tokens prepended to T=5
    keep = torch.tensor([[True, False, True, False, False], [False, False, False, True, True]])
    with torch.no_grad(), logits_only_where(model, keep):
        out = head(hidden)
    assert out.shape == (4, head.out_features)
    with torch.no_grad():
        torch.testing.assert_close(out, head(hidden[:, 2:][keep]))


# ---------------------------------------------------------------- bin packing


@pytest.mark.parametrize("seed", range(5))
def test_pack_rows_respects_max_length_and_keeps_every_example_once(seed: int) -> None:
    rng = random.Random(seed)
    max_length = rng.choice([16, 64, 512])
    lengths = [rng.randint(1, max_length) for _ in range(rng.randint(1, 300))]
    rows = pack_rows(lengths, max_length)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= max_length for row in rows)
    assert all(row for row in rows)
    # first-fit decreasing stays within 11/9 of the optimum (+1), which is at least ceil(total / max_length)
    assert len(rows) <= 11 / 9 * max(math.ceil(sum(lengths) / max_length), sum(n > max_length / 2 for n in lengths)) + 1
    assert pack_rows(lengths, max_length) == rows  # deterministic, so a resumed run sees the same rows


def test_pack_rows_small_cases() -> None:
    assert pack_rows([], 10) == []
    assert pack_rows([10, 10], 10) == [[0], [1]]  # full rows stay alone
    assert pack_rows([3, 7, 5, 5], 10) == [[1, 0], [2, 3]]  # decreasing order, first fit, ties by index
    assert pack_rows([4, 4, 4], 12) == [[0, 1, 2]]


def test_packed_rows_of_real_examples_collate_within_max_length(tokenizer, examples) -> None:  # noqa: ANN001
    pool = examples * 7
    max_length = max(len(e.input_ids) for e in pool) + 10
    rows = pack_rows([len(e.input_ids) for e in pool], max_length)
    batch = collate([[pool[i] for i in row] for row in rows], tokenizer.pad_token_id)
    assert batch["input_ids"].shape[1] <= max_length
    assert count_supervised_tokens(batch) == sum(count_supervised_tokens(collate([[e]], 0)) for e in pool)
    assert len(rows) < len(pool)


# ---------------------------------------------------------------- pack_rows: O(n log n), same rows as the scan


def _first_fit_by_scan(lengths: list[int], max_length: int) -> list[list[int]]:
    """The quadratic first-fit decreasing that pack_rows replaced: scan every row for room."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for index in order:
        slot = next((r for r, room in enumerate(free) if room >= lengths[index]), None)
        if slot is None:
            rows.append([index])
            free.append(max_length - lengths[index])
        else:
            rows[slot].append(index)
            free[slot] -= lengths[index]
    return rows


@pytest.mark.parametrize("seed", range(6))
def test_pack_rows_packs_exactly_like_the_quadratic_scan(seed: int) -> None:
    rng = random.Random(seed)
    max_length = rng.choice([16, 64, 1024])
    count = rng.choice([0, 1, 7, 300, 2000])
    lengths = [rng.randint(1, max_length) for _ in range(count)]
    if count and seed % 2:  # ties, full rows and an over-long example (a row of its own)
        lengths[: count // 3] = [max_length // 2] * (count // 3)
        lengths[-1] = max_length + 5
    rows = pack_rows(lengths, max_length)
    assert rows == _first_fit_by_scan(lengths, max_length)  # same rows, so the same packing quality
    assert sorted(i for row in rows for i in row) == list(range(count))
    assert all(sum(lengths[i] for i in row) <= max_length or len(row) == 1 for row in rows)
