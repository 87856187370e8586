"""One base model with several adapters that share batches, or one result served alone, and a worker thread that
batches requests across adapters.

Loading is where the security rules live: an adapter comes only from a run folder named at start-up (a request
names a model, which is looked up in a fixed table and never used as a path), its weights must be safetensors
(a folder holding a pickle-format weights file is refused), remote code needs an explicit flag, and results that
share batches must be adapters of the same base whose techniques declare that they can (``mixed_batch``).

The worker takes whatever requests are waiting (up to ``max_batch_size``, same sampling settings), generates
them as one PEFT mixed-adapter batch, and hands each token to the request's own callback.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from transformers import AutoTokenizer

from tunelab.errors import ConfigError
from tunelab.generation import BASE, PEFT_BASE, GenerationRequest, generate_batch
from tunelab.models import ModelConfig, load_tokenizer, same_base_model
from tunelab.result import find_result, load_run
from tunelab.techniques.base import ADAPTER_CONFIG

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class ServedModel:
    name: str  # what a request puts in `model`
    run_dir: Path | None  # None for the base
    adapter: str  # PEFT adapter name ('__base__' for the base)
    tokenizer: Any  # the run's own tokenizer (its chat template)
    created: int = field(default_factory=lambda: int(time.time()))


def check_safe_result(folder: Path) -> None:
    """Refuse a result folder that holds pickle-format weights or lacks safetensors ones."""
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ConfigError(f"{folder}: holds pickle-format files {pickles}; tunelab serves safetensors weights only "
                          "(a pickle can run code when loaded). Remove them or re-save the adapter as safetensors")
    if not any(folder.glob("*.safetensors")):
        raise ConfigError(f"{folder}: no .safetensors weights to serve")


def _find(path: Path, allow_remote_code: bool) -> Any:
    """What one served folder holds (a run, or an adapter folder on its own), after every check that needs no
    weights."""
    found = find_result(path)
    if found.config is not None and found.config.model.trust_remote_code and not allow_remote_code:
        raise ConfigError(f"{path}: its model needs remote code (model.trust_remote_code); serving it runs that "
                          "code, so it needs --trust-remote-code")
    check_safe_result(found.result_dir)
    return found


def _check_mixable(path: Path, found: Any, base: str) -> None:
    """A result served beside others shares their batches: its technique must declare that it can, and it must be
    an adapter of the served base."""
    reason = found.technique.mixed_batch(found.result_dir)
    if reason is not None:
        raise ConfigError(f"{path}: its result ({found.technique.name}) cannot share a batch with other adapters "
                          f"({reason}); serve it alone (tunelab serve {path})")
    if not same_base_model(found.base, base):
        raise ConfigError(f"{path}: trained on {found.base}, but the first one on {base}; one server serves "
                          "adapters of one base")
    named = _adapter_config(found.result_dir).get("base_model_name_or_path") or ""
    if named and not same_base_model(named, base):
        raise ConfigError(f"{path}: its adapter was trained on another base ({named}), not on the served "
                          f"base ({base}); serve it in its own server")


def _adapter_config(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG
    return json.loads(path.read_text()) if path.is_file() else {}


def load_models(runs: list[Path], device: Any = None, allow_remote_code: bool = False) -> tuple[Any, dict[str, ServedModel]]:
    """The shared model and the table of servable names.

    Several results share one base and one batch, with 'base' servable too, when each technique declares that
    its result can (``mixed_batch``); one result that cannot is served alone, under its own name only."""
    if not runs:
        raise ConfigError("give at least one run folder to serve")
    found = [(Path(r), _find(Path(r), allow_remote_code)) for r in runs]
    names = [f.name for _, f in found]
    for name, (path, _) in zip(names, found):
        if not NAME.match(name) or name == BASE:
            raise ConfigError(f"{path}: the folder's name '{name}' cannot be a model name (letters, digits, "
                              f"'.', '_', '-'; not '{BASE}'); rename the folder")
    if len(set(names)) != len(names):
        raise ConfigError(f"two runs share a folder name ({', '.join(sorted(n for n in names if names.count(n) > 1))}); "
                          "each served model needs its own name")
    first_path, first = found[0]
    if len(found) == 1 and first.technique.mixed_batch(first.result_dir) is not None:  # served alone, as it opens
        loaded = load_run(first, device=device)
        return loaded.model, {names[0]: ServedModel(names[0], first_path, "", loaded.tokenizer)}
    for path, result in found:
        _check_mixable(path, result, first.base)
    loaded = load_run(first, device=device)  # the base with the first adapter, as PEFT's "default"
    model = loaded.model
    base_config = first.config.model if first.config is not None else ModelConfig(name=first.base)
    served = {BASE: ServedModel(BASE, None, PEFT_BASE, load_tokenizer(base_config))}
    served[names[0]] = ServedModel(names[0], first_path, "default", loaded.tokenizer)
    for index, (name, (path, result)) in enumerate(zip(names[1:], found[1:]), start=1):
        adapter = f"served{index}"  # PEFT names become module keys: run names with dots would not do
        try:
            model.load_adapter(result.result_dir, adapter_name=adapter, is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as exc:  # shape mismatches: an adapter of another base
            raise ConfigError(f"{path}: its adapter does not fit the served base ({str(exc).splitlines()[0][:200]})") from exc
        own = result.run_dir / "tokenizer" if result.run_dir is not None else None
        tokenizer = AutoTokenizer.from_pretrained(own) if own is not None and own.is_dir() else served[BASE].tokenizer
        if len(tokenizer) != len(served[BASE].tokenizer):
            raise ConfigError(f"{path}: its tokenizer has {len(tokenizer)} tokens, the base's "
                              f"{len(served[BASE].tokenizer)}; a run with added tokens needs its own server")
        served[name] = ServedModel(name, path, adapter, tokenizer)
    model.eval()
    return model, served


@dataclass
class Job:
    """One request in the worker's queue; ``finished(job, error)`` is called from the worker thread."""

    request: GenerationRequest
    finished: Callable[["Job", str | None], None]
    enqueued: float = field(default_factory=time.monotonic)


class Engine:
    """Owns the model; one worker thread generates, so the model is never used by two threads at once."""

    def __init__(self, model: Any, served: dict[str, ServedModel], max_batch_size: int = 16,
                 batch_wait_s: float = 0.01, mix_adapters: bool = True) -> None:
        self.model, self.served = model, served
        self.max_batch_size, self.batch_wait_s = max_batch_size, batch_wait_s
        # False: a batch holds one adapter's requests only (the comparison point of benchmarks/serve.py)
        self.mix_adapters = mix_adapters
        self.tokenizer = next(iter(served.values())).tokenizer  # decoding: every served tokenizer shares the vocab
        self.mixed = any(m.adapter for m in served.values())  # adapters: pass adapter_names to PEFT
        self.context_length = _context_length(model, self.tokenizer)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._held: list[Job] = []  # taken from the queue but waiting for a batch of their sampling settings
        self.batches = 0
        self.batch_rows = 0
        self._thread = threading.Thread(target=self._work, name="tunelab-generate", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _next_batch(self) -> list[Job] | None:
        if not self._held:
            first = self._queue.get()
            if first is None:
                return None
            self._held.append(first)
        deadline = time.monotonic() + self.batch_wait_s
        while len(self._held) < self.max_batch_size * 4:  # gather what is waiting (bounded), briefly
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)
                break
            self._held.append(job)
        first = self._held[0]
        batch = [j for j in self._held if j.request.sampling.batch_key == first.request.sampling.batch_key
                 and (self.mix_adapters or j.request.adapter == first.request.adapter)][: self.max_batch_size]
        self._held = [j for j in self._held if all(j is not b for b in batch)]
        return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [j for j in batch if not j.request.cancelled.is_set()]
            for job in batch:
                if job.request.cancelled.is_set():
                    job.request.finish_reason = "cancelled"
                    job.finished(job, None)
            if not live:
                continue
            error = None
            try:
                adapters = {m.name: m.adapter for m in self.served.values()} if self.mixed else None
                generate_batch(self.model, self.tokenizer, [j.request for j in live], adapters)
                self.batches += 1
                self.batch_rows += len(live)
            except Exception as exc:  # noqa: BLE001 - reported to every request of the batch, the worker lives on
                log.exception("generation failed")
                error = f"generation failed: {type(exc).__name__}: {exc}"
            for job in live:
                job.finished(job, error)


class NoModels:
    """The engine of a page-only server (`tunelab ui` with no RUN): nothing is loaded, so nothing is served.
    Every request names a model, and the empty table refuses each one before anything would be submitted."""

    def __init__(self) -> None:
        self.served: dict[str, ServedModel] = {}
        self.batches = self.batch_rows = 0
        self.context_length = 0

    def alive(self) -> bool:
        return True

    def submit(self, job: Job) -> None:
        raise RuntimeError("no model is loaded in this server")  # unreachable: no name passes the model table

    def close(self) -> None:
        pass


def _context_length(model: Any, tokenizer: Any) -> int:
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    model_max = getattr(tokenizer, "model_max_length", None)
    candidates = [v for v in (limit, model_max) if isinstance(v, int) and 0 < v < 10**8]
    return min(candidates) if candidates else 2048
