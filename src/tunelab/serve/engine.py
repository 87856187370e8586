"""One base model with several adapters that share batches, or one result served alone, and a worker thread that
batches requests across adapters.

Loading is where the security rules live: an adapter comes only from a run folder named at start-up (a request
names a model, which is looked up in a fixed table and never used as a path), its weights must be safetensors
(a folder holding a pickle-format weights file is refused), remote code needs an explicit flag, and results that
share batches must be adapters of the same base whose techniques declare that they can (``mixed_batch``).

The worker schedules at the level of decoding steps (``generation.ContinuousBatch``): requests join the running
batch at the next step (up to ``max_batch_size`` rows, each with its own adapter and sampling settings, through
PEFT's mixed-adapter inference) and leave it as soon as they finish; each new token goes to the request's own
callback. A request prefills only what its prompt adds to the prefix its adapter's prompts share (the chat
template's system prompt and user header), whose keys and values the batch keeps per adapter (``PrefixCache``).
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
from tunelab.generation import BASE, PEFT_BASE, PREFILL_TOKENS, ContinuousBatch, GenerationRequest, context_length
from tunelab.models import ModelConfig, load_tokenizer, same_base_model
from tunelab.invariance import is_row_invariant, make_row_invariant
from tunelab.precision import GenerationPrecision
from tunelab.result import check_generates, find_result, load_for_generation
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
    row_forward: Any = None  # its technique's computation of mixed-adapter rows (Technique.row_forward)
    precision: GenerationPrecision | None = None  # the dtype the shared model generates in, and why
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
    check_generates(found)  # a served model answers with text: a score head has none to give
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


def load_models(runs: list[Path], device: Any = None, allow_remote_code: bool = False,
                dtype: str = "auto") -> tuple[Any, dict[str, ServedModel]]:
    """The shared model and the table of servable names.

    Several results share one base and one batch, with 'base' servable too, when each technique declares that
    its result can (``mixed_batch``); one result that cannot is served alone, under its own name only. The model
    is loaded as `tunelab generate` loads it (``load_for_generation``: ``dtype`` auto is the first run's
    model.dtype, on a CPU float32 unless bfloat16 is asked for), so that served answers equal offline ones."""
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
        loaded = load_for_generation(first, device=device, dtype=dtype)
        return loaded.model, {names[0]: ServedModel(names[0], first_path, "", loaded.tokenizer,
                                                    precision=loaded.precision)}
    for path, result in found:
        _check_mixable(path, result, first.base)
    # the base with the first adapter, as PEFT's "default"; the other adapters load in their own dtype (PEFT keeps
    # float32 adapter weights over a bfloat16 base), as load_for_generation loads each of them alone
    loaded = load_for_generation(first, device=device, dtype=dtype)
    model, precision = loaded.model, loaded.precision
    base_config = first.config.model if first.config is not None else ModelConfig(name=first.base)
    served = {BASE: ServedModel(BASE, None, PEFT_BASE, load_tokenizer(base_config), precision=precision)}
    served[names[0]] = ServedModel(names[0], first_path, "default", loaded.tokenizer, first.technique.row_forward,
                                   precision)
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
        served[name] = ServedModel(name, path, adapter, tokenizer, result.technique.row_forward, precision)
    if is_row_invariant(model):  # the adapters loaded since compute their rows as the first one's do
        make_row_invariant(model)
    model.eval()
    return model, served


@dataclass
class Job:
    """One request in the worker's queue; ``finished(job, error)`` is called from the worker thread."""

    request: GenerationRequest
    finished: Callable[["Job", str | None], None]
    enqueued: float = field(default_factory=time.monotonic)


class Engine:
    """Owns the model; one worker thread generates, so the model is never used by two threads at once.

    The worker runs a ``ContinuousBatch``: at every decoding step it takes the requests that arrived meanwhile
    into the running batch (their prefill gives each its first token) and lets the finished ones go, so a request
    never waits for others to finish before it starts."""

    def __init__(self, model: Any, served: dict[str, ServedModel], max_batch_size: int = 16,
                 mix_adapters: bool = True, prefill_tokens: int = PREFILL_TOKENS, continuous: bool = True) -> None:
        self.model, self.served = model, served
        self.tokenizer = next(iter(served.values())).tokenizer  # decoding: every served tokenizer shares the vocab
        mixed = any(m.adapter for m in served.values())  # adapters: pass adapter_names to PEFT
        adapters = {m.name: m.adapter for m in served.values()} if mixed else None
        # the adapters' techniques compute mixed rows their own way when they all declare the same one
        forwards = {m.row_forward for m in served.values() if m.adapter not in ("", PEFT_BASE)}
        row_forward = forwards.pop() if len(forwards) == 1 else None
        self.batch = ContinuousBatch(model, self.tokenizer, adapters, max_rows=max_batch_size,
                                     prefill_tokens=prefill_tokens, mix_adapters=mix_adapters, row_forward=row_forward)
        self.batch.continuous = continuous
        if not self.batch.stepwise:
            log.info("whole batches, no continuous batching: %s", self.batch.why_not)
        self.context_length = context_length(model, self.tokenizer)
        self.precision = next(iter(served.values())).precision or _as_loaded(model)
        log.info("weights in %s: %s", self.precision.dtype, self.precision.reason)  # as generate and chat say it
        self.batch_wait_s = 0.01  # whole batches only (``continuous`` off): how long a batch waits for more requests
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._jobs: dict[int, Job] = {}  # id(request) -> its job, while it is in the batch
        self._thread = threading.Thread(target=self._work, name="tunelab-generate", daemon=True)
        self._thread.start()

    @property
    def mix_adapters(self) -> bool:
        """False: the running batch holds one adapter's requests only (the comparison point of benchmarks/serve.py)."""
        return self.batch.mix_adapters

    @mix_adapters.setter
    def mix_adapters(self, value: bool) -> None:
        self.batch.mix_adapters = value

    @property
    def continuous(self) -> bool:
        """False: a batch runs to its end before the next starts (the comparison point of benchmarks/serve.py)."""
        return self.batch.continuous

    @continuous.setter
    def continuous(self, value: bool) -> None:
        self.batch.continuous = value

    @property
    def batches(self) -> int:
        """Forward passes of the worker (decoding steps and prefills)."""
        return self.batch.steps

    @property
    def batch_rows(self) -> int:
        """The rows in those forward passes (batch_rows / batches is the mean batch)."""
        return self.batch.step_rows

    @property
    def prefix_reused_tokens(self) -> int:
        """Prompt tokens taken from the cached prompt prefixes instead of prefilled."""
        return self.batch.prefixes.reused_tokens if self.batch.prefixes is not None else 0

    @property
    def prefix_bytes(self) -> int:
        """Memory held by the cached prompt prefixes (read from the HTTP thread: a sum over a few tensors)."""
        return self.batch.prefixes.nbytes if self.batch.prefixes is not None else 0

    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _take(self) -> bool:
        """Move the jobs that arrived into the batch: wait for one while nothing runs, else take only what is
        there. False once the engine is closed."""
        block, gather_until = self.batch.idle, None
        while True:
            try:
                wait = None if gather_until is None else max(0.0, gather_until - time.monotonic())
                job = self._queue.get(block=block or wait is not None, timeout=wait)
            except queue.Empty:
                return True
            if job is None:
                return False
            self._jobs[id(job.request)] = job
            self.batch.add(job.request)
            if block and not self.batch.stepping:  # whole batches: gather what arrives within batch_wait_s first
                gather_until = time.monotonic() + self.batch_wait_s
            block = False

    def _work(self) -> None:
        while self._take():
            try:
                finished, error = self.batch.step(), None
            except Exception as exc:  # noqa: BLE001 - reported to every request in the batch, the worker lives on
                log.exception("generation failed")
                self.batch.clear()
                finished, error = [job.request for job in self._jobs.values()], f"generation failed: {type(exc).__name__}: {exc}"
            for request in finished:
                job = self._jobs.pop(id(request))
                job.finished(job, error)


class NoModels:
    """The engine of a page-only server (`tunelab ui` with no RUN): nothing is loaded, so nothing is served.
    Every request names a model, and the empty table refuses each one before anything would be submitted."""

    def __init__(self) -> None:
        self.served: dict[str, ServedModel] = {}
        self.batches = self.batch_rows = self.prefix_reused_tokens = self.prefix_bytes = 0
        self.context_length = 0
        self.precision: GenerationPrecision | None = None

    def alive(self) -> bool:
        return True

    def submit(self, job: Job) -> None:
        raise RuntimeError("no model is loaded in this server")  # unreachable: no name passes the model table

    def close(self) -> None:
        pass


def _as_loaded(model: Any) -> GenerationPrecision:
    """The precision of a model handed to the engine as it is (tests, notebooks): its weights' dtype."""
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return GenerationPrecision(dtype, f"the model as it was handed to the server ({dtype} weights)")
