"""The per-token log-probs of the preference and policy-gradient objectives run the head in chunks
(``objectives.logps.LinearTokenLogps``): the same log-probs, entropies and gradients (hidden rows, a trainable head's
weight and bias) as whole logits, float32 or under bfloat16 autocast, and no (N, V) tensor made on the way."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from support.preference import toy_pairs
from support.tiny import fresh_model
from transformers import AutoTokenizer

from tunelab.data import IGNORE
from tunelab.objectives import grpo, ppo
from tunelab.objectives import logps as chunking
from tunelab.objectives.base import HeadOutput, attach_own_module
from tunelab.objectives.logps import LinearTokenLogps, chunked_logps_memory, supervised_token_logps
from tunelab.objectives.preference import collate_pairs, sequence_logps

Case = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]


def case(rows: int, vocab: int, width: int, trainable: bool, half: bool, bias: bool = False, seed: int = 0) -> Case:
    """(N, H) hidden rows, a (V, H) head (bfloat16 when frozen and ``half``: a LoRA base's; float32 master weights
    when trainable), its bias, (N,) targets and a per-token upstream gradient (N,) (as DPO's and GRPO's differ)."""
    torch.manual_seed(seed)
    weight = (0.3 * torch.randn(vocab, width)).to(torch.bfloat16 if half and not trainable else torch.float32)
    weight.requires_grad_(trainable)
    head_bias = (0.1 * torch.randn(vocab)).requires_grad_(trainable) if bias else None
    hidden = torch.randn(rows, width, dtype=torch.bfloat16 if half else torch.float32, requires_grad=True)
    return hidden, weight, head_bias, torch.randint(0, vocab, (rows,)), torch.randn(rows)


def chunked(c: Case, chunk_rows: int, half: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    hidden, weight, bias, targets, upstream = c
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
        logps, entropy = LinearTokenLogps.apply(hidden, weight, bias, targets, chunk_rows, True)
    (logps * upstream).sum().backward()
    return logps.detach(), entropy, grads_of(c)


def whole(c: Case, half: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """The unchunked reference: the whole (N, V) logits (the same half-precision matmul), float32 log-softmax."""
    hidden, weight, bias, targets, upstream = c
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
        logits = F.linear(hidden, weight, bias).float()  # (N, V)
    log_probs = F.log_softmax(logits, dim=-1)
    logps = log_probs.gather(1, targets[:, None]).squeeze(1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    (logps * upstream).sum().backward()
    return logps.detach(), entropy.detach(), grads_of(c)


def grads_of(c: Case) -> list[torch.Tensor | None]:
    """The gradients the backward left (hidden, weight, bias), taken off the tensors for the next run."""
    out = []
    for tensor in c[:3]:
        out.append(None if tensor is None or tensor.grad is None else tensor.grad.float())
        if tensor is not None:
            tensor.grad = None
    return out


def assert_equal_to_whole(got: tuple, want: tuple, half: bool) -> None:
    loose = dict(rtol=2e-2, atol=2e-2) if half else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-4 if half else 1e-5)  # float32 both ways
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-4 if half else 1e-5)
    for name, g, w in zip(("hidden", "weight", "bias"), got[2], want[2]):
        assert (g is None) == (w is None), name
        if g is not None:
            torch.testing.assert_close(g, w, **loose, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("rows,chunk_rows", [(37, 8), (16, 16), (5, 64), (1, 1)])  # partial last chunk; exact; one
@pytest.mark.parametrize("trainable,half,bias", [(False, False, False), (False, True, False), (True, False, True),
                                                 (True, True, False)])
def test_chunked_logps_entropy_and_gradients_equal_whole_logits(rows: int, chunk_rows: int, trainable: bool,
                                                               half: bool, bias: bool) -> None:
    """A frozen head (float32, or bfloat16 under autocast: its gradient made in the forward) and a trainable one
    (float32 master weights, or under autocast: its backward runs the chunks again), on chunkings that leave a partial
    last chunk, fill every chunk, or make one."""
    c = case(rows, vocab=300, width=24, trainable=trainable, half=half, bias=bias)
    assert_equal_to_whole(chunked(c, chunk_rows, half), whole(c, half), half)


def test_a_wrong_result_fails_the_comparison() -> None:
    """Negative control: the comparison catches a backward that ignored each token's own upstream gradient (their
    mean instead), and log-probs of the wrong targets."""
    c = case(37, vocab=300, width=24, trainable=True, half=False)
    got, want = chunked(c, 8, False), whole(c, False)
    assert_equal_to_whole(got, want, False)
    mean_upstream = (*c[:4], torch.full_like(c[4], float(c[4].mean())))
    with pytest.raises(AssertionError):
        assert_equal_to_whole(chunked(mean_upstream, 8, False), want, False)
    shifted = (*c[:3], (c[3] + 1) % 300, c[4])
    with pytest.raises(AssertionError):
        assert_equal_to_whole(chunked(shifted, 8, False), want, False)


def allocations(run: Callable[[], object]) -> list[int]:
    """Bytes of each tensor allocated while ``run`` runs (torch's profiler, CPU allocator)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    return [e.nbytes() for e in events]


def peak_allocated(run: Callable[[], object]) -> int:
    live = peak = 0
    for size in allocations(run):
        live += size
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("trainable", [False, True])
def test_no_tensor_as_large_as_the_whole_logits_is_made(trainable: bool) -> None:
    """N = 200 rows in chunks of 64 (the last partial): the largest tensor made, forward and backward, entropy
    included, is one chunk's (64, V) float32 logits, never a (N, V) one (of any dtype). Control: with one chunk of
    every row, the (N, V) tensor is made and seen."""
    vocab, rows, chunk_rows = 4096, 200, 64
    c = case(rows, vocab=vocab, width=32, trainable=trainable, half=True)

    def run(chunk: int) -> Callable[[], None]:
        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logps, _ = LinearTokenLogps.apply(*c[:4], chunk, True)
            (logps * c[4]).sum().backward()
        return step

    largest = max(allocations(run(chunk_rows)))
    assert largest == 4 * chunk_rows * vocab, largest
    assert largest < 2 * rows * vocab  # smaller than even a bfloat16 (N, V)
    assert max(allocations(run(rows))) >= 4 * rows * vocab  # the control


@pytest.mark.parametrize("rows", [100, 300])  # one chunk of 128 rows; three
@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("half", [False, True])
def test_declared_logps_memory_is_the_peak_the_chunked_logps_allocate(rows: int, trainable: bool, half: bool) -> None:
    """``chunked_logps_memory`` (what the planner reads for the DPO family, GRPO and PPO) against the bytes
    LinearTokenLogps really allocates, forward (with the entropy figure) and backward, counted by torch's profiler:
    a frozen half-precision head under autocast (LoRA on a bfloat16 base), a float32 one, a trainable float32 head
    (full fine-tuning) with and without autocast, one chunk or several."""
    vocab, width, chunk_rows = 32768, 64, 128  # oneDNN's bf16 scratch space (~0.3 MB) stays under 2%, as in SFT's test
    torch.manual_seed(0)
    weight = torch.randn(vocab, width, dtype=torch.bfloat16 if half and not trainable else torch.float32,
                         requires_grad=trainable)
    hidden = torch.randn(rows, width, dtype=torch.bfloat16 if half else torch.float32, requires_grad=True)  # (N, H)
    targets, upstream = torch.randint(0, vocab, (rows,)), torch.randn(rows)

    def logps_and_backward() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
            logps, _ = LinearTokenLogps.apply(hidden, weight, None, targets, chunk_rows, True)
        (logps * upstream).sum().backward()

    measured = peak_allocated(logps_and_backward)
    head = HeadOutput(rows=rows, columns=vocab, hidden=width, element_bytes=2 if half else 4, trainable=trainable,
                      plain=True)
    # the declaration counts the selected (N, H) rows, which exist before the loss here; and holds float32 at most.
    # A trainable head's peak is in its backward, beside the weight's half-precision copy autocast makes there: the
    # forward's copy (the planner's autocast_copies term, kept in a model by the head's own call) is gone here
    declared = sum(chunked_logps_memory(head, chunk_rows)) - 4 * rows * width
    assert 0.97 * measured <= declared <= 1.03 * measured, (declared, measured)


# ---------------------------------------------------------------- on a model, through the objectives' own calls


@pytest.fixture(scope="module")
def pairs_batch(tiny_model_dir: Path) -> dict[str, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return collate_pairs([[p] for p in toy_pairs(tokenizer, n=6)], tokenizer.pad_token_id)


def whole_logits_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each supervised token's log-prob and entropy (N,) from the model's whole (R, T, V) logits."""
    keep = batch["targets"] != IGNORE
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[keep]
    log_probs = F.log_softmax(logits.float(), dim=-1)  # (N, V)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return log_probs.gather(1, batch["targets"][keep][:, None]).squeeze(1), entropy.detach()


def test_sequence_logps_and_gradients_equal_whole_logits(tiny_model_dir: Path, pairs_batch: dict,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The DPO family's summed log-probs of each side, and every weight's gradient (the head's too: every weight of
    this model trains), as whole logits give them, in chunks of 7 rows."""
    model = fresh_model(tiny_model_dir)
    keep = pairs_batch["targets"] != IGNORE
    assert int(keep.sum()) > 2 * 7
    logps, _ = whole_logits_logps(model, pairs_batch)
    rows = keep.nonzero()[:, 0]
    want = torch.zeros(keep.shape[0]).index_add(0, rows, logps)  # (R,)
    upstream = torch.linspace(-1, 2, keep.shape[0])  # each side's own weight, as a preference loss gives it
    (want * upstream).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    monkeypatch.setattr(chunking, "CHUNK_ROWS", 7)
    sums, counts = sequence_logps(model, pairs_batch)
    (sums * upstream).sum().backward()
    torch.testing.assert_close(sums, want.detach(), rtol=1e-5, atol=1e-5)
    assert counts.tolist() == keep.sum(dim=1).tolist()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=5e-5, msg=lambda m: f"{name}: {m}")


def test_the_policy_objectives_entropy_is_the_whole_logits_entropy(tiny_model_dir: Path, pairs_batch: dict) -> None:
    """GRPO's and PPO's token log-probs and entropy figure (no gradient) equal those of the whole logits; without
    gradients (a rollout's or reference's scoring pass) the log-probs are the same."""
    model = fresh_model(tiny_model_dir)
    attach_own_module(ppo.VALUE_HEAD, model, None)
    with torch.no_grad():
        want_logps, want_entropy = whole_logits_logps(model, pairs_batch)
    for logps, entropy in (grpo.token_logps(model, pairs_batch, with_entropy=True),
                           ppo.policy_and_values(model, pairs_batch, with_entropy=True)[:2]):
        assert not entropy.requires_grad and logps.requires_grad
        torch.testing.assert_close(logps.detach(), want_logps, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(entropy, want_entropy, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        scored, none = grpo.token_logps(model, pairs_batch)
    assert none is None
    torch.testing.assert_close(scored, want_logps, rtol=1e-5, atol=1e-5)


def test_a_wrapped_head_runs_as_itself_with_the_same_figures(tiny_model_dir: Path, pairs_batch: dict) -> None:
    """A head a technique wraps (not a plain nn.Linear) is run by the model on the supervised rows, unchunked: the
    same log-probs and entropy."""
    model = fresh_model(tiny_model_dir)
    with torch.no_grad():
        want_logps, want_entropy = whole_logits_logps(model, pairs_batch)

    wrap_head(model)
    logps, entropy = supervised_token_logps(model, pairs_batch, with_entropy=True)
    torch.testing.assert_close(logps.detach(), want_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, want_entropy, rtol=1e-5, atol=1e-5)


def wrap_head(model: torch.nn.Module) -> None:
    """Replace the plain head by one a technique could have wrapped (not an nn.Linear itself): it runs unchunked."""
    class Wrapped(torch.nn.Linear):
        pass

    head = model.get_output_embeddings()
    wrapped = Wrapped(head.in_features, head.out_features, bias=False)
    wrapped.weight = head.weight
    model.set_output_embeddings(wrapped)


def logits_sized_allocations(tiny_model_dir: Path, batch: dict, wrapped: bool,
                             call: Callable[[torch.nn.Module], torch.Tensor]) -> list[int]:
    """The allocations of exactly a (N, V) tensor's bytes (float32 or half) while ``call`` and its backward run."""
    model = fresh_model(tiny_model_dir)
    attach_own_module(ppo.VALUE_HEAD, model, None)
    if wrapped:
        wrap_head(model)
    n = int((batch["targets"] != IGNORE).sum())
    sizes = {2 * n * model.config.vocab_size, 4 * n * model.config.vocab_size}
    return [size for size in allocations(lambda: call(model).sum().backward()) if size in sizes]


@pytest.mark.parametrize("name,call", [
    ("sequence_logps", lambda model, batch: sequence_logps(model, batch)[0]),
    ("grpo", lambda model, batch: grpo.token_logps(model, batch, with_entropy=True)[0]),
    ("ppo", lambda model, batch: ppo.policy_and_values(model, batch, with_entropy=True)[0]),
])
def test_the_objectives_make_no_whole_logits(tiny_model_dir: Path, pairs_batch: dict, monkeypatch: pytest.MonkeyPatch,
                                             name: str, call: Callable) -> None:
    """The DPO family's, GRPO's and PPO's log-probs (and entropy), forward and backward, in chunks of 7 rows of the
    N > 14 supervised ones: no tensor of a (N, V) tensor's size is made. Control: with the head wrapped (run
    unchunked) the (N, V) logits are made and seen."""
    monkeypatch.setattr(chunking, "CHUNK_ROWS", 7)
    assert int((pairs_batch["targets"] != IGNORE).sum()) > 2 * 7
    assert logits_sized_allocations(tiny_model_dir, pairs_batch, False, lambda model: call(model, pairs_batch)) == []
    assert logits_sized_allocations(tiny_model_dir, pairs_batch, True, lambda model: call(model, pairs_batch))
