"""One layer's attention, forward and backward, on the bench's packed batches: the block-diagonal mask (what
transformers builds from packed position ids) against causal attention per example, re-batched by length
(``training/attention.py``), SmolLM2-135M's heads (9 query, 3 key/value, 64 wide), bfloat16.

The batches are the bench's: its 128 pydoc Q&A records, tokenized with the chat template, packed first-fit
decreasing into rows of 256, four rows a batch, in the epoch's order. Each variant's forward and backward runs on every
batch in turn, the variants alternating, timed in process CPU seconds; the report gives the per-batch median of each
and the paired speed-up with its range. Run at one thread on a quiet machine (``--wall`` at several)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/packed_attention.py [--rounds 5] [--call-cost 4096]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from tunelab.data.batching import epoch_batches, pack_rows
from tunelab.training import attention

HERE = Path(__file__).resolve().parent
HEADS, KV_HEADS, DIM, LENGTH, BATCH = 9, 3, 64, 256, 4


def bench_position_ids() -> list[torch.Tensor]:
    """The bench's batches as (B, T) position ids."""
    from transformers import AutoTokenizer

    from tunelab.models import cache_root

    tokenizer = AutoTokenizer.from_pretrained(cache_root() / "models" / "smollm2-135m-instruct")
    records = [json.loads(line) for line in (HERE.parent / "src/tunelab/assets/pydoc_qa/pydoc_qa.jsonl")
               .read_text().splitlines()[:128]]
    chats = [tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True) for r in records]
    lengths = [min(LENGTH, len(chat["input_ids"])) for chat in chats]
    rows = pack_rows(lengths, LENGTH)
    out = []
    for batch in epoch_batches([sum(lengths[i] for i in row) for row in rows], BATCH, 0, 0, False):
        width = max(sum(lengths[i] for i in rows[r]) for r in batch)
        positions = []
        for r in batch:
            pos = [p for i in rows[r] for p in range(lengths[i])]
            positions.append(pos + list(range(width - len(pos))))
        out.append(torch.tensor(positions))
    return out


def one_pass(positions: torch.Tensor, variant: str, call_cost: int, clock=time.process_time) -> float:
    batch, length = positions.shape
    torch.manual_seed(0)
    q = torch.randn(batch, HEADS, length, DIM, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(batch, KV_HEADS, length, DIM, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(batch, KV_HEADS, length, DIM, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(batch, length, HEADS, DIM, dtype=torch.bfloat16)
    start = clock()
    if variant == "mask":
        mask = attention.block_causal(positions)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        out = out.transpose(1, 2)
    else:
        groups = attention.length_groups
        attention.length_groups = lambda lengths: groups(lengths, call_cost=call_cost)
        try:
            plan = attention.packed_plan(positions)
        finally:
            attention.length_groups = groups
        out = attention.attend_per_example(q, k, v, plan, None)
    out.backward(grad)
    return clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--call-cost", type=int, default=attention.CALL_COST)
    parser.add_argument("--wall", action="store_true",
                        help="time wall seconds, not process CPU seconds (several threads)")
    args = parser.parse_args()
    batches = bench_position_ids()
    names = ["mask", "per_example"]
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for index in range(args.rounds):
        for name in names if index % 2 == 0 else names[::-1]:
            clock = time.perf_counter if args.wall else time.process_time
            seconds[name].append(sum(one_pass(p, name, args.call_cost, clock) for p in batches) / len(batches))
    ratios = [a / b for a, b in zip(seconds["mask"], seconds["per_example"])]
    plans = [attention.packed_plan(p) for p in batches]
    print(json.dumps({"threads": torch.get_num_threads(), "batches": len(batches), "rounds": args.rounds,
                      "median_ms_per_batch": {n: round(1e3 * statistics.median(s), 2) for n, s in seconds.items()},
                      "paired_speedup_median": round(statistics.median(ratios), 3),
                      "paired_speedup_range": [round(min(ratios), 3), round(max(ratios), 3)],
                      "gathered_over_tokens": round(sum(p.gathered_tokens for p in plans)
                                                    / sum(p.numel() for p in batches), 3)}, indent=1))


if __name__ == "__main__":
    main()
