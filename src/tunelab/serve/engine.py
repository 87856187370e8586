"""One base model with several LoRA adapters, and a worker thread that batches requests across adapters.

Loading is where the security rules live: an adapter comes only from a run folder named at start-up (a request
names a model, which is looked up in a fixed table and never used as a path), its weights must be safetensors
(a folder holding a pickle-format weights file is refused), remote code needs an explicit flag, and every run
must be a fine-tune of the same base.

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

from tunelab.errors import ConfigError
from tunelab.generation import BASE, PEFT_BASE, GenerationRequest, generate_batch

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


def _base_key(name: str) -> str:
    """The base a run was trained on, comparable across runs and with adapter_config.json's
    base_model_name_or_path: a local folder (the embedded default's converted copy included) by its resolved path."""
    from tunelab.models import EMBEDDED_MODELS, embedded_model_dir

    if name in EMBEDDED_MODELS:
        return str(embedded_model_dir(name).resolve())
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _read_run(run_dir: Path, allow_remote_code: bool) -> tuple[Any, Path]:
    """(config, adapter folder) of one run, after every check that needs no weights."""
    from tunelab.config import build_config, read_run_config
    from tunelab.techniques import TECHNIQUES

    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a tunelab run folder (no config.yaml)")
    config = build_config(read_run_config(run_dir))
    if config.model.trust_remote_code and not allow_remote_code:
        raise ConfigError(f"{run_dir}: its model needs remote code (model.trust_remote_code); serving it runs that "
                          "code, so it needs --trust-remote-code")
    folder = run_dir / TECHNIQUES[config.technique.name].result_dir_name
    if not folder.is_dir():
        raise ConfigError(f"{run_dir}: no result in {folder.name}/ (only a finished run can be served)")
    check_safe_result(folder)
    return config, folder


def _adapter_config(folder: Path) -> dict[str, Any]:
    path = folder / "adapter_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _check_adapter(folder: Path, run_dir: Path, base_key: str) -> None:
    """A served adapter must be a LoRA (PEFT's mixed batches are LoRA's) of the same base."""
    adapter_config = _adapter_config(folder)
    if adapter_config.get("peft_type") != "LORA":
        kind = adapter_config.get("peft_type") or f"'{folder.name}/'"
        raise ConfigError(f"{run_dir}: its result ({kind}) is not a LoRA adapter; several runs share one batch only "
                          f"as LoRA adapters of one base, so serve it alone (tunelab serve {run_dir})")
    named = adapter_config.get("base_model_name_or_path") or ""
    if named and _base_key(named) != base_key:
        raise ConfigError(f"{run_dir}: its adapter was trained on another base ({named}), not on the served "
                          f"base ({base_key}); serve it in its own server")


def load_models(runs: list[Path], device: Any = None, allow_remote_code: bool = False) -> tuple[Any, dict[str, ServedModel]]:
    """The shared model (base with every adapter loaded) and the table of servable names, 'base' included."""
    from transformers import AutoTokenizer

    from tunelab.models import load_tokenizer
    from tunelab.result import load_run

    if not runs:
        raise ConfigError("give at least one run folder to serve")
    checked = [(Path(r), *_read_run(Path(r), allow_remote_code)) for r in runs]
    names = [r.resolve().name for r, _, _ in checked]
    for name, (run_dir, _, _) in zip(names, checked):
        if not NAME.match(name) or name == BASE:
            raise ConfigError(f"{run_dir}: the run folder's name '{name}' cannot be a model name (letters, digits, "
                              f"'.', '_', '-'; not '{BASE}'); rename the folder")
    if len(set(names)) != len(names):
        raise ConfigError(f"two runs share a folder name ({', '.join(sorted(n for n in names if names.count(n) > 1))}); "
                          "each served model needs its own name")
    first_dir, first_config, first_folder = checked[0]
    if len(checked) == 1 and _adapter_config(first_folder).get("peft_type") != "LORA":  # any other result, served alone
        loaded = load_run(first_dir, device=device)
        return loaded.model, {names[0]: ServedModel(names[0], first_dir, "", loaded.tokenizer)}
    base_key = _base_key(first_config.model.name)
    for (run_dir, config, folder) in checked:
        if _base_key(config.model.name) != base_key:
            raise ConfigError(f"{run_dir}: trained on {config.model.name}, but {first_dir} on {first_config.model.name}; "
                              "one server serves adapters of one base")
        _check_adapter(folder, run_dir, base_key)
    loaded = load_run(first_dir, device=device)  # the base with the first adapter, as PEFT's "default"
    model = loaded.model
    served = {BASE: ServedModel(BASE, None, PEFT_BASE, load_tokenizer(first_config.model))}
    served[names[0]] = ServedModel(names[0], first_dir, "default", loaded.tokenizer)
    for index, (name, (run_dir, _, folder)) in enumerate(zip(names[1:], checked[1:]), start=1):
        adapter = f"adapter{index}"  # PEFT names become module keys: run names with dots would not do
        try:
            model.load_adapter(folder, adapter_name=adapter, is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as exc:  # shape mismatches: an adapter of another base
            raise ConfigError(f"{run_dir}: its adapter does not fit the served base ({str(exc).splitlines()[0][:200]})") from exc
        tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer") if (run_dir / "tokenizer").is_dir() else served[BASE].tokenizer
        if len(tokenizer) != len(served[BASE].tokenizer):
            raise ConfigError(f"{run_dir}: its tokenizer has {len(tokenizer)} tokens, the base's "
                              f"{len(served[BASE].tokenizer)}; a run with added tokens needs its own server")
        served[name] = ServedModel(name, run_dir, adapter, tokenizer)
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
