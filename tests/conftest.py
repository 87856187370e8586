"""Shared fixtures: a tiny tokenizer and a tiny Llama built in-process (by tests/support/tiny.py), so the suite needs
no network."""

from __future__ import annotations

import os

# OpenMP threads that spin only briefly before they sleep, set before torch loads its OpenMP runtime (children
# inherit it): on a loaded host (a shared CI runner, other jobs) libgomp's default spinning makes a process's
# threads take the cores another process computes on. The bench's two-thread bf16 training (docs/performance.md,
# "A host shared with other work"): default 244-312 tokens/s quiet and 15 beside six busy loops;
# GOMP_SPINCOUNT=20000 249-335 quiet and 32 loaded; OMP_WAIT_POLICY=PASSIVE 140-198 quiet and 63 loaded. The
# suite took passive first (a real-tier test at load 12: 350 s spinning, 61 s passive), but the real tier then ran
# about twice as long on a quiet machine; a short spin keeps the quiet speed and still halves the loaded time.
os.environ.setdefault("GOMP_SPINCOUNT", "20000")

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

