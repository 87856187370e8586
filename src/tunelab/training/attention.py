"""Grouped-query attention without copying the key/value heads, on a CPU.

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
from contextlib import contextmanager
from typing import Iterator

import torch

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
