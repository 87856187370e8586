"""A/B of the preference objectives' per-token log-probs: whole (N, V) logits and one cross-entropy (the code before
``objectives.logps``) against the chunked ``LinearTokenLogps``, forward and backward, in one process.

SmolLM2-135M (the embedded default) in bfloat16 with LoRA r16 on every linear layer, under bfloat16 autocast as a CPU
with native bfloat16 trains it; a DPO-example-sized micro-batch: 8 rows (4 pairs) of 256 tokens, the second half of
each supervised (N = 1024). Each round runs A then B (B then A on odd rounds), timed in process CPU seconds, and
reports each variant's median, the paired ratios and the peak bytes allocated by the loss beyond the forward (torch's
profiler, one extra pass per variant).

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/logps_ab.py --rounds 6
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from tunelab.data import IGNORE
from tunelab.models import resolve_model_path
from tunelab.objectives.logps import supervised_token_logps
from tunelab.objectives.sft import logits_only_where


def whole_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The former ``sequence_logps`` core: the head over the supervised rows, one float32 cross-entropy."""
    keep = batch["targets"] != IGNORE
    with logits_only_where(model, keep):
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    return -F.cross_entropy(logits.float(), batch["targets"][keep], reduction="none")  # (N,)


def chunked(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return supervised_token_logps(model, batch)[0]


def one_pass(variant: Callable, model: torch.nn.Module, batch: dict[str, torch.Tensor], upstream: torch.Tensor) -> float:
    start = time.process_time()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps = variant(model, batch)
    (logps * upstream).sum().backward()
    model.zero_grad(set_to_none=True)
    return time.process_time() - start


def peak_allocated(variant: Callable, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                   upstream: torch.Tensor) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        one_pass(variant, model, batch, upstream)
    live = peak = 0
    for event in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    path = resolve_model_path("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    torch.manual_seed(0)
    rows, length = 8, 256
    ids = torch.randint(0, model.config.vocab_size, (rows, length))
    targets = torch.roll(ids, -1, dims=1)
    targets[:, : length // 2] = IGNORE
    batch = {"input_ids": ids, "position_ids": torch.arange(length).expand(rows, length), "targets": targets}
    upstream = torch.randn(int((targets != IGNORE).sum()))
    variants = {"whole": whole_logits, "chunked": chunked}
    logps, grads = {}, {}
    for name, variant in variants.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            values = variant(model, batch)
        (values * upstream).sum().backward()
        logps[name] = values.detach()
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        model.zero_grad(set_to_none=True)
    print(f"max |whole - chunked| log-prob: {float((logps['whole'] - logps['chunked']).abs().max()):.2e}; "
          f"adapters' gradient |whole - chunked| / |whole|: "
          f"{float((grads['whole'] - grads['chunked']).norm() / grads['whole'].norm()):.2e}")
    for name, variant in variants.items():
        one_pass(variant, model, batch, upstream)  # warm-up
        print(f"{name}: peak allocated in the pass {peak_allocated(variant, model, batch, upstream) / 2**20:.0f} MiB")
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.rounds):
        for name in (list(variants) if round_ % 2 == 0 else list(variants)[::-1]):
            times[name].append(one_pass(variants[name], model, batch, upstream))
    for name, values in times.items():
        print(f"{name}: median {statistics.median(values):.3f} s CPU ({', '.join(f'{v:.3f}' for v in values)})")
    ratios = [w / c for w, c in zip(times["whole"], times["chunked"])]
    print(f"whole/chunked: median {statistics.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f}")


if __name__ == "__main__":
    main()
