"""The SFT loss runs the head in chunks over the supervised rows: the same loss and gradients as full logits and
one cross-entropy, no (N, V) tensor kept for the backward, and the softmax in float32 under bfloat16 autocast."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.data import IGNORE, Example, collate, tokenize_example
from tunelab.objectives.base import HeadOutput
from tunelab.objectives.sft import (LinearCrossEntropySum, chunked_loss_memory, chunked_sft_loss_sum,
                                   logits_only_where, sft_loss_sum)


@pytest.fixture(scope="module")
def batch(tiny_model_dir: Path) -> dict[str, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    raw = [Example("messages", f"chat:{i}", messages=(("user", f"say {word} {i} times"), ("assistant", f"{word} " * i)))
           for i, word in enumerate(["fox", "dog", "paris", "five"], start=3)]
    rows = [tokenize_example(tokenizer, e) for e in raw]
    return collate([rows[:2], rows[2:]], tokenizer.pad_token_id)  # two packed rows


def full_model(tiny_model_dir: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).eval()  # every weight trains (head too)


def full_logits_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=IGNORE, reduction="sum")


def test_chunked_loss_and_gradients_equal_full_logits(tiny_model_dir: Path, batch: dict[str, torch.Tensor]) -> None:
    model = full_model(tiny_model_dir)
    supervised = int((batch["targets"] != IGNORE).sum())
    assert supervised > 2 * 7, "chunks of 7 rows must make several chunks"
    reference = full_logits_loss(model, batch)
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    for chunk_rows in (1, 7, supervised + 1):
        model.zero_grad()
        result = chunked_sft_loss_sum(model, batch, chunk_rows)
        result.loss_sum.backward()
        assert result.num_units == supervised
        torch.testing.assert_close(result.loss_sum, reference, rtol=1e-5, atol=1e-5)
        for name, param in model.named_parameters():
            torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=5e-5, msg=f"{name}, chunks of {chunk_rows}")
    with torch.no_grad():  # the objective's own loss, chunked by default
        torch.testing.assert_close(sft_loss_sum(model, batch).loss_sum, reference, rtol=1e-5, atol=1e-5)


def test_no_full_logits_are_kept_for_the_backward(tiny_model_dir: Path, batch: dict[str, torch.Tensor]) -> None:
    model = full_model(tiny_model_dir)
    vocab, chunk_rows = model.config.vocab_size, 4
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: list[tuple[int, ...]] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() not in weights:  # the head's weight (V, H) is no activation
            saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        chunked_sft_loss_sum(model, batch, chunk_rows).loss_sum.backward()
    logit_shaped = [shape for shape in saved if shape and shape[-1] == vocab]
    assert not logit_shaped, f"tensors of logits kept for the backward: {logit_shaped}"


def test_under_bf16_autocast_the_softmax_and_loss_are_float32(tiny_model_dir: Path, batch: dict[str, torch.Tensor]) -> None:
    """The same bfloat16 logits, reduced in float32 in one cross-entropy: a bfloat16 logsumexp would be ~1% off."""
    model = full_model(tiny_model_dir, torch.bfloat16)
    keep = batch["targets"] != IGNORE
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with logits_only_where(model, keep):
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        assert logits.dtype == torch.bfloat16
        reference = F.cross_entropy(logits.float(), batch["targets"][keep], reduction="sum")
        chunked = chunked_sft_loss_sum(model, batch, 5).loss_sum
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, reference, rtol=1e-5, atol=1e-4)


def peak_allocated(run: Callable[[], object]) -> int:
    """The most bytes of tensors alive at once while ``run`` runs, beyond those alive before: the CPU allocator's
    allocations and frees, in the order torch's profiler recorded them."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("rows", [100, 300])  # one chunk of 128 rows; three
@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("half", [False, True])
def test_declared_loss_memory_is_the_peak_the_chunked_loss_allocates(rows: int, trainable: bool, half: bool) -> None:
    """``chunked_loss_memory`` (what the planner reads) against the bytes LinearCrossEntropySum really allocates,
    forward and backward, counted by torch's profiler: a frozen half-precision head under autocast (LoRA on a
    bfloat16 base) or a float32 one, a trainable float32 head (full fine-tuning), one chunk or several."""
    # a vocabulary large enough that oneDNN's bf16 GEMM scratch space (~0.3 MB whatever the shape, not modelled)
    # stays under 2% of the chunk's (C, V) tensors, as it does at a real model's size (0.4% on SmolLM2's head)
    vocab, width, chunk_rows = 32768, 64, 128
    torch.manual_seed(0)
    weight = torch.randn(vocab, width, dtype=torch.bfloat16 if half and not trainable else torch.float32,
                         requires_grad=trainable)
    hidden = torch.randn(rows, width, dtype=torch.bfloat16 if half else torch.float32, requires_grad=True)  # (N, H)
    targets = torch.randint(0, vocab, (rows,))

    def loss_and_backward() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
            LinearCrossEntropySum.apply(hidden, weight, None, targets, chunk_rows).backward()

    measured = peak_allocated(loss_and_backward)
    head = HeadOutput(rows=rows, columns=vocab, hidden=width, element_bytes=2 if half else 4, trainable=trainable,
                      plain=True)
    # the declaration counts the selected (N, H) rows, which exist before the loss here; and holds float32 at most
    declared = sum(chunked_loss_memory(head, chunk_rows)) - 4 * rows * width
    if half and trainable:  # autocast's cached bfloat16 copy of the weight: the planner's autocast_copies term
        declared += 2 * vocab * width
    assert 0.97 * measured <= declared <= 1.03 * measured, (declared, measured)


def test_a_frozen_float32_head_under_autocast_is_cast_once_not_at_every_chunk() -> None:
    """QLoRA's head stays float32 (PEFT upcasts it) and frozen; under bfloat16 autocast each chunk's product cast its
    (V, H) weight again (autocast caches only the casts of weights that train). It is cast once per forward now:
    one (V, H) bfloat16 tensor however many chunks, and the loss and gradient of autocast's own casts."""
    vocab, width, chunk_rows, rows = 4096, 32, 64, 200  # 4 chunks
    torch.manual_seed(0)
    weight = 0.05 * torch.randn(vocab, width)  # float32, frozen
    hidden = torch.randn(rows, width, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = LinearCrossEntropySum.apply(hidden, weight, None, targets, chunk_rows)
    copies = sum(1 for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.nbytes() == 2 * vocab * width)
    assert copies == 1
    loss.backward()
    reference_hidden = hidden.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # whole logits, cast by autocast
        reference = F.cross_entropy(F.linear(reference_hidden, weight).float(), targets, reduction="sum")
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(hidden.grad.float(), reference_hidden.grad.float(), rtol=2e-2, atol=2e-3)


def test_a_head_with_a_bias_frees_each_chunk_before_the_next() -> None:
    """A head with a bias makes a fresh (C, V) output each chunk (``torch.mm`` into the previous chunk's cannot add
    the bias): the previous chunk is freed first, so the peak is one chunk's, as ``chunked_loss_memory`` declares
    (it has no bias term: a (V,) vector)."""
    vocab, width, chunk_rows, rows = 32768, 64, 128, 300  # three chunks
    torch.manual_seed(0)
    weight, bias = torch.randn(vocab, width), torch.randn(vocab)
    hidden = torch.randn(rows, width, requires_grad=True)  # (N, H)
    targets = torch.randint(0, vocab, (rows,))
    measured = peak_allocated(lambda: LinearCrossEntropySum.apply(hidden, weight, bias, targets, chunk_rows).backward())
    head = HeadOutput(rows=rows, columns=vocab, hidden=width, element_bytes=4, trainable=False, plain=True)
    declared = sum(chunked_loss_memory(head, chunk_rows)) - 4 * rows * width  # the (N, H) rows exist before
    assert 0.97 * measured <= declared <= 1.03 * measured, (declared, measured)


def half_chunk_allocations(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int) -> int:
    """How many (C, V) half-precision tensors LinearCrossEntropySum allocates in its forward and backward."""
    size = 2 * chunk_rows * weight.shape[0]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            LinearCrossEntropySum.apply(hidden, weight, None, targets, chunk_rows).backward()
    return sum(1 for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.nbytes() == size)


def test_a_frozen_half_head_computes_every_chunk_into_one_tensor() -> None:
    """A frozen bfloat16 head (LoRA and the other adapters on a bfloat16 base) makes one (C, V) bfloat16 tensor for
    all its chunks' logits and gradient casts, not two a chunk: fresh 24 MiB tensors moved a run's peak RSS by ~100
    MiB with the heap's history (docs/choosing.md). A frozen float32 head under autocast (QLoRA's) is cast once and
    reuses its chunk too. Negative control: a trainable float32 head under autocast (a cast weight, its gradient
    needed) still makes its own each chunk. The loss and gradient are what per-chunk tensors gave (checked bit for
    bit against the former code when this landed; here against full logits)."""
    vocab, width, chunk_rows, rows = 4096, 32, 64, 200  # 4 chunks, the last partial
    torch.manual_seed(0)
    frozen = (0.05 * torch.randn(vocab, width)).to(torch.bfloat16)
    hidden = torch.randn(rows, width, dtype=torch.bfloat16, requires_grad=True)  # (N, H)
    targets = torch.randint(0, vocab, (rows,))
    assert half_chunk_allocations(hidden, frozen, targets, chunk_rows) == 1
    assert half_chunk_allocations(hidden, frozen.float(), targets, chunk_rows) == 1  # QLoRA's upcast head: cast once
    assert half_chunk_allocations(hidden, frozen.float().requires_grad_(), targets, chunk_rows) >= 4  # the control
    hidden.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = LinearCrossEntropySum.apply(hidden, frozen, None, targets, chunk_rows)
    loss.backward()
    reference_hidden = hidden.detach().clone().requires_grad_(True)
    reference = F.cross_entropy(F.linear(reference_hidden, frozen).float(), targets, reduction="sum")
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(hidden.grad.float(), reference_hidden.grad.float(), rtol=2e-2, atol=2e-3)
