"""Shared fixtures: a tiny tokenizer and a tiny Llama built in-process (by tests/support/tiny.py), so the suite needs
no network."""

from __future__ import annotations

import os

# OpenMP threads that wait by sleeping, not spinning, set before torch loads its OpenMP runtime (children inherit
# it): on a loaded host (a shared CI runner, other jobs) a process's spinning threads take the cores another
# process computes on. Measured on the 2-core machine at load average 12-13: two SmolLM2 LoRA steps through the
# CLI in 87 s spinning (libgomp's default), 18 s waiting passively; tests/test_real_model.py's two LoRA steps
# 350 s against 61 s. The price on a quiet host: the bench's two-thread bf16 training at 140-198 tokens/s against
# 244-335 (tiny-model tests run on one thread, where no thread waits): a slower best case for a far better worst.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402
from typing import Iterator

import pytest
import torch
from support.tiny import build_model, build_tokenizer
from transformers import PreTrainedTokenizerFast

CPU_THREADS = torch.get_num_threads()


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tiny models run far faster on one thread (thread start-up dominates a 64-wide matmul); the real tier
    gets every core."""
    torch.set_num_threads(CPU_THREADS if item.get_closest_marker("real") else 1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer(path)
    build_model(path, len(tokenizer))
    return path


@pytest.fixture
def tiny_tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerFast:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(autouse=True, scope="session")
def host_independent_precision() -> Iterator[None]:
    """Every test gives the same numbers on every CPU: ``model.dtype: auto`` trains in float32 here whatever the
    host's CPU flags, unless a test says the CPU has native bfloat16 (tests/test_precision.py does). Session-wide,
    so module- and session-scoped fixtures that train are covered too."""
    from tunelab import precision

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(precision, "detect_cpu_bf16", lambda: precision.CpuBf16(False, "tests: float32 on every host"))
        patch.setenv(precision.CPU_BF16_ENV, "0")  # the same in the processes tests start (torchrun, the CLI)
        yield


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own tunelab cache, except the real-model cache which is shared (conversion is slow)."""
    from tunelab.models import model_cache_dir

    shared_models = model_cache_dir()  # resolved before TUNELAB_CACHE is redirected below
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "tunelab-cache"))
    monkeypatch.setenv("TUNELAB_MODEL_CACHE", str(shared_models))

