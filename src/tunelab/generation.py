"""Generation: the one way tunelab continues prompts, for every caller (eval's metrics and before/after samples,
the trainer's samples, `tunelab generate` and `chat`, the server, the GGUF check and the quantize comparison).

A batch is a list of requests (rows), left-padded into one call of transformers' ``generate`` (KV-cached). With
the attention mask and the position ids derived from it, each row gets what it would get alone: greedy outputs
of a batch equal single-row outputs. What is added to ``generate`` is per-row control, which it only offers
through its hooks: a streamer sees every new token of every row, and a stopping criterion ends each row on its
own (its token budget, the chat template's end of turn, a stop string, a cancelled request, a deadline) while
the rest of the batch goes on.

One batch may hold requests for different adapters of the same base: PEFT's mixed-batch inference takes one
adapter name per row (``adapter_names``), 'base' or PEFT's ``__base__`` meaning no adapter.

Several completions of one prompt (RL rollouts) are several rows with the same ``prompt_ids``; a seeded
``Sampling`` makes the whole batch repeatable.

``ContinuousBatch`` is the same left-padded, KV-cached batch decoded one step at a time by tunelab, so that
requests join it and leave it between steps (iteration-level scheduling, what `tunelab serve` runs): each row
has its own adapter and its own sampling settings, applied as ``generate`` applies them, and the row-finishing
rules above are shared with ``generate_batch``.
"""

from __future__ import annotations

import inspect
import math
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import DynamicLayer
from transformers.generation.streamers import BaseStreamer

from tunelab.data.formats import Example
from tunelab.data.tokenize import pad_token_id, prompt_for_generation, render_chat
from tunelab.errors import ConfigError, DataError
from tunelab.techniques import generation_view
from tunelab.techniques.base import virtual_tokens

__all__ = ["BASE", "GREEDY", "PEFT_BASE", "SMALLEST_DIVISOR", "ContinuousBatch", "GenerationRequest", "PrefixCache",
           "Sampling", "common_prefix", "context_length", "divisor_problem", "encode", "fit_context", "generate_batch",
           "generate_samples", "generate_texts", "render_chat", "sample_prompts", "steps_supported", "stop_token_ids"]

BASE = "base"  # the name that means "no adapter", in requests and in the CLI
PEFT_BASE = "__base__"  # PEFT's own name for it in adapter_names


# The smallest temperature (other than 0: greedy) and repetition penalty: the logits are divided by them, and a
# smaller divisor (5e-324 is a valid float and JSON number) turns them into inf, whose softmax is nan, from which
# sampling cannot draw (torch.multinomial fails mid-generation). vLLM draws its line at the same place (a
# temperature under 1e-5 is greedy there); here it is refused, so nobody gets greedy output believing it sampled.
SMALLEST_DIVISOR = 1e-5


def divisor_problem(name: str, value: float | None) -> str | None:
    """Why ``value`` cannot be the ``temperature`` or ``repetition_penalty`` of a generation (None: it can). One
    rule for every caller: ``Sampling`` applies it (generate, chat, eval) and the server's request schema too."""
    if value is None or (name == "temperature" and value == 0):
        return None
    if not math.isfinite(value) or value < SMALLEST_DIVISOR:
        zero = " (a temperature of 0 means greedy)" if name == "temperature" else ""
        return (f"{name} {value:g} is too small: the logits are divided by it, and anything under "
                f"{SMALLEST_DIVISOR:g} overflows them{zero}")
    return None


@dataclass(frozen=True)
class Sampling:
    """How a prompt is continued; the same options with the same meaning in eval, generate, chat and serve.

    Greedy by default. ``max_new_tokens`` and ``stop`` may differ between the rows of one batch; every other
    field is one setting of the whole ``generate`` call, so rows share a batch only when those agree
    (``batch_key``)."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy; above 0: sampling
    top_p: float = 1.0  # nucleus sampling: 1.0 keeps every token
    top_k: int = 0  # 0: off
    repetition_penalty: float | None = None  # None: the model's generation_config (1.0 where it sets none)
    min_new_tokens: int = 0  # the end-of-turn tokens are forbidden before this many (fixed-length comparisons)
    stop: tuple[str, ...] = ()  # a row ends where its text first contains one of these; the text is cut there
    seed: int | None = None  # seeds the batch's sampling (torch's global RNG), so sampled outputs repeat

    def __post_init__(self) -> None:
        for name in ("temperature", "repetition_penalty"):
            problem = divisor_problem(name, getattr(self, name))
            if problem:  # a ConfigError: the CLI prints it in one line, the server's schema answers 400
                raise ConfigError(problem)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def batch_key(self) -> Sampling:
        """The settings one ``generate`` call applies to all its rows."""
        return replace(self, max_new_tokens=0, stop=())

    def generate_kwargs(self) -> dict[str, Any]:
        """The batch-wide keyword arguments of ``generate``. Unused sampling settings are passed as None, so a
        model's generation_config cannot turn greedy decoding into sampling or add its own top-k."""
        kwargs: dict[str, Any] = {"min_new_tokens": self.min_new_tokens or None}
        if self.repetition_penalty is not None:
            kwargs["repetition_penalty"] = self.repetition_penalty
        if self.greedy:
            return {**kwargs, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {**kwargs, "do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k or None}


GREEDY = Sampling()


@dataclass
class GenerationRequest:
    """One row of a batch. ``on_text(delta)`` is called from the generating thread with each new piece of text."""

    prompt_ids: list[int]
    sampling: Sampling = GREEDY
    adapter: str = BASE
    deadline: float | None = None  # time.monotonic() value
    cancelled: threading.Event = field(default_factory=threading.Event)
    on_text: Callable[[str], None] | None = None
    source: str = ""  # where the prompt came from (a file and line), named when it is refused
    # Filled in by generate_batch:
    token_ids: list[int] = field(default_factory=list)  # the new tokens, without the end-of-turn token
    text: str = ""  # their text, without special tokens, cut at the first stop string
    finish_reason: str | None = None  # stop | length | cancelled | timeout
    room: int | None = None  # the new tokens the model's context leaves after the prompt (generate_batch's cap)
    end_token: int | None = None  # the end-of-turn token that stopped it (RL rollouts train on it: when to stop)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def budget(self) -> int:
        """The most new tokens this row generates: its sampling's max_new_tokens, or fewer where the context ends."""
        return self.sampling.max_new_tokens if self.room is None else min(self.sampling.max_new_tokens, self.room)


def context_length(model: Any, tokenizer: Any) -> int:
    """The positions a prompt and its new tokens may take: the model config's max_position_embeddings (or the
    tokenizer's model_max_length, where smaller; 2048 where neither says one), less the virtual tokens a
    prompt-learning adapter puts before every row. Past it a model with learned positions fails and one with rotary
    positions generates from positions it never saw."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    model_max = getattr(tokenizer, "model_max_length", None)
    candidates = [v for v in (limit, model_max) if isinstance(v, int) and 0 < v < 10**8]
    return (min(candidates) if candidates else 2048) - virtual_tokens(model)


def fit_context(requests: list[GenerationRequest], context: int) -> None:
    """Cap each request's new tokens at the room its prompt leaves in ``context`` positions (its finish reason is then
    "length", as for its own budget), and refuse, naming its source, a prompt that leaves none or has no token."""
    for request in requests:
        where = f"{request.source}: " if request.source else ""
        if not request.prompt_ids:
            raise DataError(f"{where}the prompt is empty (it encodes to no tokens): give it some text")
        if len(request.prompt_ids) >= context:
            raise DataError(f"{where}the prompt has {len(request.prompt_ids)} tokens, and this model takes {context} "
                            "positions (max_position_embeddings in its config.json, less any virtual tokens), so no "
                            "token can follow it: shorten the prompt")
        request.room = context - len(request.prompt_ids)


def stop_token_ids(model: Any, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens that end a turn: the tokenizer's EOS and the model's own end tokens (a chat model may end turns
    with a token, such as <|im_end|> or <|eot_id|>, that is not the tokenizer's EOS)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(i for i in [tokenizer.eos_token_id, *configured] if i is not None))


def encode(tokenizer: PreTrainedTokenizerBase, text: str, special: bool = False) -> list[int]:
    """Token ids of a prompt. A chat template already writes its own special tokens, so by default none are
    added; raw text gets the tokenizer's usual ones (``special=True``), as in training on plain text."""
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _accept(tokenizer: PreTrainedTokenizerBase, request: GenerationRequest, token: int, stop_ids: set[int],
            emitted: str) -> str:
    """Take one new token of a row: the end of turn finishes it, any other token is appended and its text
    followed, and the token budget finishes it once spent. Returns the text emitted so far."""
    if request.done:
        return emitted
    if token in stop_ids:
        request.finish_reason, request.end_token = "stop", token
        return emitted
    request.token_ids.append(token)
    emitted = _follow_text(tokenizer, request, emitted)
    if len(request.token_ids) >= request.budget and not request.done:
        request.finish_reason = "length"
    return emitted


def _follow_text(tokenizer: PreTrainedTokenizerBase, request: GenerationRequest, emitted: str, final: bool = False) -> str:
    """Re-decode a row's tokens and hand the callback the part after what it already has. Only the text up to the
    last complete character is emitted, so multi-byte characters are never split; a stop string ends the row and
    is cut off. Returns the text emitted so far."""
    text = tokenizer.decode(request.token_ids, skip_special_tokens=True)
    if text.endswith("\ufffd") and not final:  # an incomplete multi-byte character: wait for the next token
        return emitted
    for stop in request.sampling.stop:
        cut = text.find(stop)
        if cut >= 0:
            text, request.finish_reason = text[:cut], "stop"
    delta = text[len(emitted):] if text.startswith(emitted) else ""
    request.text = text
    if delta and request.on_text is not None:
        request.on_text(delta)
    return text


def _interrupt(request: GenerationRequest, now: float) -> None:
    """Finish a row whose client has gone or whose deadline has passed."""
    if request.done:
        return
    if request.cancelled.is_set():
        request.finish_reason = "cancelled"
    elif request.deadline is not None and now > request.deadline:
        request.finish_reason = "timeout"


class _RowTracker(BaseStreamer, StoppingCriteria):
    """Sees each generated token of each row (as a streamer) and tells ``generate`` which rows are finished (as a
    stopping criterion)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, requests: list[GenerationRequest], stop_ids: list[int]) -> None:
        self.tokenizer, self.requests, self.stop_ids = tokenizer, requests, set(stop_ids)
        self.prompt_seen = False
        self.emitted = [""] * len(requests)

    # -- streamer side: generate() calls put() with the prompt first, then with each step's new tokens (B,)
    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            self.emitted[row] = _accept(self.tokenizer, self.requests[row], token, self.stop_ids, self.emitted[row])

    def end(self) -> None:
        for row, request in enumerate(self.requests):
            # a last character still incomplete is the text's end after all
            self.emitted[row] = _follow_text(self.tokenizer, request, self.emitted[row], final=True)
            if not request.done:  # generate() ended on its own budget (the batch's longest)
                request.finish_reason = "length"

    # -- stopping-criterion side: a (B,) bool tensor, True where the row is finished
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        now = time.monotonic()
        for request in self.requests:
            _interrupt(request, now)
        return torch.tensor([r.done for r in self.requests], device=input_ids.device)


def _left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask), both (B, T): each prompt's token ids at the right end of its row, so all rows
    continue from the same position."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)  # (B, T)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, T)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention[row, width - len(ids):] = 1
    return input_ids, attention


@torch.no_grad()
def generate_batch(model: Any, tokenizer: PreTrainedTokenizerBase, requests: list[GenerationRequest],
                   adapter_names: dict[str, str] | None = None) -> list[GenerationRequest]:
    """Generate for every request in one left-padded batch; each request gets its tokens, text and finish reason.

    Rows must agree on their ``Sampling.batch_key``. ``adapter_names`` maps a request's ``adapter`` to the PEFT
    adapter name; when given, the batch runs with PEFT's mixed-adapter inference. The model is put in eval mode
    for the call (no dropout) and left as it was."""
    if not requests:
        return requests
    sampling = requests[0].sampling
    if any(r.sampling.batch_key != sampling.batch_key for r in requests):
        raise ValueError("the rows of one generation batch need the same sampling settings (Sampling.batch_key)")
    fit_context(requests, context_length(model, tokenizer))
    device = next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    pad = pad_token_id(tokenizer)
    input_ids, attention = _left_padded([r.prompt_ids for r in requests], pad)
    tracker = _RowTracker(tokenizer, requests, stops)
    kwargs = sampling.generate_kwargs()
    names = None if adapter_names is None else [adapter_names[r.adapter] for r in requests]
    if not sampling.greedy and sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    was_training = model.training
    model.eval()
    try:
        # the prefill's head input contiguous: else torch broadcasts the (V, H) weight into a (B, H, V) copy, rows x
        # the head's bytes (8 rows on SmolLM2: +432 MiB of RSS, measured)
        # the rows' adapter active first: its technique's generation view is the one entered
        with row_adapters(model, names) as adapter_kwargs, contiguous_head_input(model), generation_view(model):
            model.generate(
                input_ids=input_ids.to(device), attention_mask=attention.to(device),
                max_new_tokens=max(r.budget for r in requests), eos_token_id=stops, pad_token_id=pad,
                streamer=tracker, stopping_criteria=StoppingCriteriaList([tracker]), **kwargs, **adapter_kwargs,
            )
    finally:
        model.train(was_training)
    return requests


@contextmanager
def row_adapters(model: Any, names: list[str] | None) -> Iterator[dict[str, Any]]:
    """The forward's keyword arguments for rows that ask for the PEFT adapters ``names`` (one per row; None: the
    model as it is), with the model set up for them while the block runs.

    PEFT's per-row path (``adapter_names``) splits the input of every adapted layer into one sub-batch per adapter
    at every forward. When every row asks for the same adapter, which is what one client or one run sends, the
    model runs it as its active adapter instead (no adapter: adapters disabled): the same sums, over the whole
    batch at once. The adapter is set only when another one is active, and left active afterwards: the server
    calls this at every decode step, and PEFT's ``set_adapter`` walks every module, so a restore would set it twice
    per step. Calls with names always say what they need; a call without names gets the model as it is."""
    if names is None or len(set(names)) > 1 or not hasattr(model, "set_adapter"):
        yield {} if names is None else {"adapter_names": names}
        return
    if names[0] == PEFT_BASE:
        with model.disable_adapter():
            yield {}
        return
    if model.active_adapter != names[0]:
        model.set_adapter(names[0], inference_mode=True)
    yield {}


def generate_texts(model: Any, tokenizer: PreTrainedTokenizerBase, prompts: list[str], sampling: Sampling = GREEDY,
                   batch_size: int = 8, special_tokens: bool = False, sources: list[str] | None = None) -> list[str]:
    """One output text per prompt (already rendered), stripped, in order, ``batch_size`` prompts at a time.
    Order-preserving batches keep each output independent of the rest of the set (grouping prompts of similar
    length would pad less). ``special_tokens``: encode as plain text, with the tokenizer's own BOS/EOS. ``sources``:
    where each prompt came from, named if the model's context refuses it."""
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        rows = [GenerationRequest(encode(tokenizer, p, special_tokens), sampling,
                                  source=sources[start + offset] if sources else "")
                for offset, p in enumerate(prompts[start:start + batch_size])]
        texts.extend(r.text.strip() for r in generate_batch(model, tokenizer, rows))
    return texts


def sample_prompts(tokenizer: PreTrainedTokenizerBase, examples: list[Example], count: int) -> list[dict[str, str]]:
    """The first `count` validation examples as (prompt, reference) pairs; the same ones for base and tuned."""
    samples = []
    for example in examples[:count]:
        prompt, reference = prompt_for_generation(tokenizer, example)
        samples.append({"source": example.source, "prompt": prompt, "reference": reference})
    return samples


def generate_samples(model: Any, tokenizer: PreTrainedTokenizerBase, samples: list[dict[str, str]],
                     max_new_tokens: int, plain_text: bool = False, batch_size: int = 8) -> list[str]:
    """Greedy outputs for ``sample_prompts``' samples (the before/after samples of a run)."""
    return generate_texts(model, tokenizer, [s["prompt"] for s in samples], Sampling(max_new_tokens=max_new_tokens),
                          batch_size, special_tokens=plain_text, sources=[s["source"] for s in samples])


# ---------------------------------------------------------------- continuous batching (iteration-level scheduling)


def steps_supported(model: Any) -> tuple[bool, str]:
    """Whether ``ContinuousBatch`` can decode this model step by step, and why not. It needs a plain per-layer
    key/value cache that rows can be added to and dropped from; a PEFT prompt-learning model (its virtual tokens
    live in the cache or the input embeddings that ``generate`` prepares) and a model whose cache is not a plain
    one (sliding-window or linear-attention layers) run whole batches through ``generate`` instead."""
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and any(getattr(c, "is_prompt_learning", False) for c in peft_config.values()):
        return False, "a prompt-learning adapter (virtual tokens are added by generate)"
    config = getattr(model, "config", None)
    if config is None:
        return False, "the model has no config"
    try:
        layers = DynamicCache(config=config).layers
    except Exception as exc:  # noqa: BLE001 - a config the cache cannot read: fall back, say why
        return False, f"its cache cannot be built ({type(exc).__name__})"
    odd = {type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer}
    if odd:
        return False, f"its cache has {', '.join(sorted(odd))} layers"
    return True, ""


# The most prompt tokens prefilled in one forward pass (one prompt at least). Prefill has priority over decoding,
# so a burst of arrivals is prefilled in consecutive passes of this size with no decoding step in between: its
# last request gets its first token as early as from one pass over the whole burst (on a CPU a prefill costs about
# the same per token in slices of 128 tokens as in one pass), and its first ones get theirs after the first slice
# instead of after the whole burst. Measured in one process on SmolLM2 (16 requests at once, one thread, a loaded
# machine): TTFT p50 1.4-2.3 s with slices of 128 tokens, 4.6 s with all 16 in one pass; the same p95 within noise.
PREFILL_TOKENS = 128


# A technique's computation of rows that ask for different adapters (``Technique.row_forward``): given the model
# and the rows' PEFT adapter names (a list refilled in place before each forward pass), a context manager that
# computes them while it is open, or None when it cannot for this model.
RowForward = Callable[[Any, list[str]], Any]


class _MixedRows:
    """PEFT's per-row adapter hooks, installed once for as long as the running batch mixes adapters (or holds
    only rows of the base).

    Given ``adapter_names``, PEFT walks every module twice and puts a pre-forward hook on every adapted layer at
    each forward pass, and removes them after it: 13 ms a pass on SmolLM2-135M (210 adapted layers; cProfile of
    a 4-row decoding step, 187 ms, with two adapters and the base), which ``generate`` pays once per call and a
    step-by-step batch at every step. Here PEFT's own hooks (its ``_enable_peft_forward_hooks``, the context
    its ``generate`` enters) are installed once, over one list that each forward pass refills in place with its
    rows' adapter names (the hook hands the layer that very list), and removed when the batch stops mixing:
    a batch of one adapter runs it as the active adapter instead (``row_adapters``), and an empty batch holds
    none. Rows of the base alone keep the hooks too, each layer skipping every adapter for '__base__': PEFT's
    ``disable_adapter``, the alternative, walks the model twice and reads every layer's status at each forward
    pass (one base row decoded at 362 ms a step that way, 73 ms through the hooks; cProfile, one thread).

    A technique may compute such rows its own way (``row_forward``, which its serving caller passes: LoRA stacks
    each layer's adapters and masks the rows' rank columns, one pair of matrix products per layer instead of one
    per adapter); it is installed in place of PEFT's hooks, over the same list, when it takes the model."""

    def __init__(self, model: Any, row_forward: RowForward | None = None) -> None:
        self.model, self.row_forward = model, row_forward
        self.names: list[str] = []  # the rows' PEFT adapter names, refilled before each forward pass
        self.hooks: ExitStack | None = None  # open while installed
        self.installs = 0  # how many times the hooks were installed (tests)
        self.own = False  # whether the installed ones are the technique's row_forward (else PEFT's hooks)

    @contextmanager
    def rows(self, names: list[str] | None) -> Iterator[dict[str, Any]]:
        """``row_adapters`` for one forward pass, with the mixed case served by the hooks installed once."""
        hooks = names is not None and (len(set(names)) > 1 or names[0] == PEFT_BASE)
        # PeftModel's context installs nothing when its tuner has no hooks of its own (LoRA's has): that model
        # gets adapter_names passed at each forward pass instead, as row_adapters does
        if not hooks or not hasattr(getattr(self.model, "base_model", None), "_enable_peft_forward_hooks"):
            self.release()
            with row_adapters(self.model, names) as kwargs:
                yield kwargs
            return
        self.names[:] = names
        if self.hooks is None:
            hooks = ExitStack()
            own = self.row_forward(self.model, self.names) if self.row_forward is not None else None
            hooks.enter_context(own if own is not None else self.model._enable_peft_forward_hooks(adapter_names=self.names))
            self.hooks, self.installs, self.own = hooks, self.installs + 1, own is not None
        yield {}

    def release(self) -> None:
        if self.hooks is not None:
            self.hooks.close()
            self.hooks = None


# Columns of room a cache layer keeps to the right of its keys and values, so that decoding steps write their new
# token in place: DynamicLayer concatenates, which copies every row's whole cache at every step and every layer
# (on SmolLM2-135M with 16 rows of about 50 tokens: 60 copies of 0.6 MB a step, about 8% of a 200 ms step).
CACHE_ROOM = 64


class _RoomyLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values (B, heads, W, head_dim) are views of buffers (B, heads, W + room,
    head_dim): ``update`` writes the new columns into the room and widens the views, and allocates new buffers (with
    ``CACHE_ROOM`` more columns) only when the room is spent or the batch replaced the tensors (rows joined or
    left: ``ContinuousBatch`` assigns ``keys`` and ``values`` then). The views hold the same numbers as the
    concatenated tensors would."""

    key_room: torch.Tensor | None = None
    value_room: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.key_room, self.keys = _write(self.key_room, self.keys, key_states)
        self.value_room, self.values = _write(self.value_room, self.values, value_states)
        return self.keys, self.values


def _write(room: torch.Tensor | None, cached: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(buffer, view of its first W + T columns) after writing ``new`` (B, heads, T, head_dim) after ``cached``
    (B, heads, W, head_dim, or empty), in place when ``cached`` is the start of ``room`` and the room suffices."""
    width, added = (cached.shape[-2] if cached.numel() else 0), new.shape[-2]
    fits = (room is not None and cached.numel() > 0 and cached.data_ptr() == room.data_ptr()
            and cached.stride() == room.stride() and cached.shape[:2] == room.shape[:2]
            and width + added <= room.shape[-2])
    if not fits:
        room = new.new_empty((*new.shape[:2], width + added + CACHE_ROOM, new.shape[-1]))
        if width:
            room[:, :, :width] = cached
    room[:, :, width:width + added] = new
    return room, room[:, :, :width + added]


def _new_cache(model: Any) -> DynamicCache:
    """The model's DynamicCache with layers that keep room for the decoding steps (``_RoomyLayer``)."""
    cache = DynamicCache(config=model.config)
    cache.layers = [_RoomyLayer() for _ in cache.layers]
    return cache


@dataclass
class _Row:
    """A request in the running batch: ``length`` of its tokens are in the cache (the real ones of its row; the
    columns to their left are padding), ``next_token`` is the one chosen last, fed at the next decoding step."""

    request: GenerationRequest
    length: int
    next_token: int = -1
    emitted: str = ""
    generator: torch.Generator | None = None


# The longest prompt prefix whose keys and values ``PrefixCache`` keeps per adapter, and the shortest worth keeping.
# SmolLM2-135M holds 30 layers x (keys + values) x 3 heads x 64 dims in float32 = 46 KiB per token: at most 11.3 MiB
# per adapter at 256 tokens; its chat template's system prompt and user header are 24 tokens, 1.1 MiB.
PREFIX_TOKENS = 256
PREFIX_MIN_TOKENS = 4


@dataclass
class _Prefix:
    """A cached prompt prefix: its token ids and, per layer, their keys and values (heads, P, head_dim), computed
    at positions 0..P-1 under one adapter."""

    tokens: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    def __post_init__(self) -> None:
        # a prefix whose tensors do not hold exactly its tokens would hand rows another prompt's keys: refuse it
        widths = {t.shape[1] for t in self.keys + self.values}
        if widths != {len(self.tokens)}:
            raise ValueError(f"a cached prefix of {len(self.tokens)} tokens holds keys/values of widths {sorted(widths)}")

    def cut(self, length: int, copy: bool = True) -> _Prefix:
        """The first ``length`` tokens: causal attention makes their keys and values those of the shorter prefix.
        A copy, to be kept (a view would hold the longer tensors' memory); a view for one prefill."""
        keep = (lambda t: t[:, :length].clone()) if copy else (lambda t: t[:, :length])
        return _Prefix(self.tokens[:length], [keep(k) for k in self.keys], [keep(v) for v in self.values])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading token ids ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    """Per adapter, the longest token prefix that its requests' prompts share (the chat template's system prompt and
    user header at least), with its keys and values, so that a joining row prefills only the rest of its prompt.

    An adapter's entry is learned from two of its prompts: the second one whose prompt shares at least
    ``min_tokens`` leading tokens with the one before keeps that common part of its own keys and values (cut from
    its prefill, no extra forward pass). A later prompt that shares only a shorter part (at least ``min_tokens``)
    cuts the entry down to it, so the entry converges on what every prompt of the adapter shares; a prompt that
    shares less prefills in full and leaves the entry alone. A row always prefills its last prompt token (its
    logits give its first token), and a cached prefix is used only where the prompt's token ids start with it.

    Memory is bounded: one entry per adapter key (the served adapters and the base), each at most ``max_tokens``
    tokens (``PREFIX_TOKENS``), plus the last prompt's token ids per adapter. ``forget`` drops entries; the batch
    calls it when the model's adapters change (an adapter loaded or deleted), whose keys and values they were."""

    def __init__(self, max_tokens: int = PREFIX_TOKENS, min_tokens: int = PREFIX_MIN_TOKENS) -> None:
        self.max_tokens, self.min_tokens = max_tokens, min_tokens
        self.entries: dict[str, _Prefix] = {}
        self.last: dict[str, list[int]] = {}  # the last prompt of an adapter with no entry yet
        self.reused_tokens = 0  # prompt tokens taken from the cache instead of prefilled (tests, metrics)

    def lookup(self, key: str, prompt: list[int]) -> _Prefix | None:
        """The cached prefix that ``prompt`` starts with, at most all of it but its last token, or None. Where the
        prompt departs from the entry (a token differs) after ``min_tokens`` shared ones, the entry is cut down to
        the shared part for good; a prompt that is merely shorter leaves it whole."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        shared = common_prefix(entry.tokens, prompt)
        if self.min_tokens <= shared < min(len(entry.tokens), len(prompt)):
            entry = self.entries[key] = entry.cut(shared)
        usable = min(shared, len(prompt) - 1)
        if usable < self.min_tokens:
            return None
        self.reused_tokens += usable
        return entry if usable == len(entry.tokens) else entry.cut(usable, copy=False)

    def covered(self, key: str, prompt: list[int]) -> int:
        """How many of ``prompt``'s tokens ``lookup`` would take from the cache (0: none); changes nothing."""
        entry = self.entries.get(key)
        usable = 0 if entry is None else min(common_prefix(entry.tokens, prompt), len(prompt) - 1)
        return usable if usable >= self.min_tokens else 0

    def to_learn(self, key: str, prompt: list[int]) -> int:
        """For a prompt prefilled in full: how many of its leading tokens become the adapter's entry (0: none)."""
        if key in self.entries:
            return 0
        before, self.last[key] = self.last.get(key), list(prompt)
        shared = 0 if before is None else min(common_prefix(before, prompt), len(prompt) - 1, self.max_tokens)
        return shared if shared >= self.min_tokens else 0

    def store(self, key: str, prefix: _Prefix) -> None:
        self.entries[key] = prefix
        self.last.pop(key, None)

    def forget(self) -> None:
        self.entries.clear()
        self.last.clear()

    @property
    def nbytes(self) -> int:
        # list() copies the values at once: the server's HTTP thread reads this while the worker stores entries
        return sum(entry.nbytes for entry in list(self.entries.values()))


class ContinuousBatch:
    """Iteration-level scheduling: requests join and leave the running batch at every decoding step.

    ``add`` queues a request; each ``step`` (1) finishes the rows that were cancelled or ran past their deadline,
    then either (2) prefills the waiting requests that fit (``max_rows`` rows, at most ``prefill_tokens`` prompt
    tokens, but always one) in one left-padded forward pass, which gives each its first token at once, and merges
    their key/value cache into the running one, or, when none waits, (3) decodes one token for every running row
    in one forward pass. Prefill has priority over decoding: a request waits for the forward pass under way when
    it arrives and for the prefills of those that arrived before it, never for a decoding step; the running rows
    wait while requests are admitted, and a full batch (``max_rows``) admits nobody, so they are never starved.

    The cache is transformers' ``DynamicCache``, each layer (B, heads, W, head_dim) with every row's tokens at the
    right end of its row and padding to their left, masked by ``mask`` (B, W); position ids count each row's own
    tokens, so a row computes what it computes alone (the left-padded batch of ``generate_batch``, grown and
    shrunk between steps). Rows that leave are dropped from the cache and the columns no row uses any more are cut.
    Its layers keep room to the right of their columns (``_RoomyLayer``), so a decoding step writes its column in
    place instead of copying the whole cache.

    A joining row whose prompt starts with the prefix its adapter's prompts share (``PrefixCache``: the chat
    template's system prompt and user header at least, learned from the prompts themselves) prefills only the rest
    of it over that prefix's cached keys and values (``prefix_tokens``: the longest prefix kept, 0: none cached).
    Rows of different adapters are computed by ``row_forward`` where the serving caller passes the technique's
    (``Technique.row_forward``), else by PEFT's per-row hooks.

    Every row has its own sampling settings (temperature, top-p, top-k, repetition penalty, min_new_tokens,
    seed), applied in transformers' order, and its own adapter (PEFT's ``adapter_names``, one per row). A model
    that cannot be decoded step by step (``steps_supported``), or a batch told not to (``continuous = False``),
    runs each admitted group of requests with the same ``batch_key`` through ``generate_batch`` to its end
    instead.
    """

    def __init__(self, model: Any, tokenizer: PreTrainedTokenizerBase, adapter_names: dict[str, str] | None = None,
                 max_rows: int = 16, prefill_tokens: int = PREFILL_TOKENS, mix_adapters: bool = True,
                 prefix_tokens: int = PREFIX_TOKENS, row_forward: RowForward | None = None) -> None:
        self.model, self.tokenizer, self.adapter_names = model, tokenizer, adapter_names
        self.max_rows, self.prefill_tokens = max_rows, prefill_tokens
        # None: every prompt is prefilled in full
        self.prefixes = PrefixCache(prefix_tokens) if prefix_tokens > 0 else None
        self.adapters_seen = _adapter_state(model)  # the adapters the cached prefixes were computed with
        self.mix_adapters = mix_adapters  # False: the running rows all ask for one adapter
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.stop_set = set(self.stop_ids)
        self.pad = pad_token_id(tokenizer)
        self.device = next(model.parameters()).device
        self.stepwise, self.why_not = steps_supported(model)
        # False: every admitted group runs to its end before the next starts (the scheduling tunelab serve had
        # before continuous batching; benchmarks/serve.py's comparison point)
        self.continuous = True
        self.cache_argument = _cache_argument(model)
        # None: the model's generation_config (as generate_batch passes no repetition_penalty then)
        self.default_penalty = getattr(getattr(model, "generation_config", None), "repetition_penalty", None)
        self.mixed = _MixedRows(model, row_forward)
        self.waiting: list[GenerationRequest] = []
        self.rows: list[_Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (B, W) long, 1 where a cache column holds a token of the row
        self.steps = 0  # forward passes over the running batch (decoding steps, or whole generate_batch calls)
        self.step_rows = 0  # the rows in them: step_rows / steps is the mean batch

    @property
    def stepping(self) -> bool:
        """Whether requests join and leave at every step (else whole batches run through ``generate``)."""
        return self.stepwise and self.continuous

    @property
    def running(self) -> list[GenerationRequest]:
        return [row.request for row in self.rows]

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.rows

    def add(self, request: GenerationRequest) -> None:
        self.waiting.append(request)

    def clear(self) -> list[GenerationRequest]:
        """Drop every request, running or waiting (after a failed step); returns them."""
        dropped = self.running + self.waiting
        self.rows, self.waiting, self.cache, self.mask = [], [], None, None
        self.mixed.release()
        return dropped

    @torch.no_grad()
    def step(self) -> list[GenerationRequest]:
        """One iteration; returns the requests that finished in it (their finish_reason set, text final)."""
        now = time.monotonic()
        for request in self.running + self.waiting:
            _interrupt(request, now)
        finished = [r for r in self.waiting if r.done]
        self.waiting = [r for r in self.waiting if not r.done]
        self._check_adapters()
        joining = self._admit()
        was_training = self.model.training
        if was_training:  # eval mode (no dropout) for the step; a served model is in it already (no walk per step)
            self.model.eval()
        try:
            if not self.stepping:
                return finished + self._whole_batch(joining)
            if joining:  # prefill first: the decoding step of the running rows waits for the next step
                self._prefill(joining)
            elif self.rows:
                self._decode()
            finished += self._drop_finished()
        finally:
            if was_training:
                self.model.train()
        return finished

    # -- scheduling

    def _admit(self) -> list[GenerationRequest]:
        """The waiting requests that join at this step, in arrival order: free rows permitting, prompt tokens
        within ``prefill_tokens`` (the first always), one adapter only when mixing is off; the rest wait."""
        joining: list[GenerationRequest] = []
        tokens = 0
        for request in self.waiting:
            if len(self.rows) + len(joining) >= self.max_rows:
                break
            cost = len(request.prompt_ids) - self._covered(request)  # the tokens its prefill computes
            if joining and tokens + cost > self.prefill_tokens:
                break
            if not self._fits(request, joining):
                continue
            joining.append(request)
            tokens += cost
        self.waiting = [r for r in self.waiting if all(r is not j for j in joining)]
        return joining

    def _key(self, request: GenerationRequest) -> str:
        """Whose keys and values a row's prompt gets: its PEFT adapter's (or the served model's)."""
        return request.adapter if self.adapter_names is None else self.adapter_names[request.adapter]

    def _covered(self, request: GenerationRequest) -> int:
        return 0 if self.prefixes is None or not self.stepping else self.prefixes.covered(self._key(request), request.prompt_ids)

    def _check_adapters(self) -> None:
        """Cached prefixes hold the keys and values of the adapters they were computed with: an adapter loaded or
        deleted since (PEFT's ``peft_config`` changed) drops them all."""
        state = _adapter_state(self.model)
        if state != self.adapters_seen:
            self.adapters_seen = state
            self.mixed.release()  # installed over the adapters of the time: installed again at the next pass
            if self.prefixes is not None:
                self.prefixes.forget()

    def _fits(self, request: GenerationRequest, joining: list[GenerationRequest]) -> bool:
        others = self.running + joining
        if not others:
            return True
        if not self.stepping and request.sampling.batch_key != others[0].sampling.batch_key:
            return False
        return self.mix_adapters or request.adapter == others[0].adapter

    def _drop_finished(self) -> list[GenerationRequest]:
        keep = [i for i, row in enumerate(self.rows) if not row.request.done]
        finished = [row.request for row in self.rows if row.request.done]
        for row in self.rows:
            if row.request.done:
                row.emitted = _follow_text(self.tokenizer, row.request, row.emitted, final=True)
        if len(keep) == len(self.rows):
            return finished
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache, self.mask = None, None
            self.mixed.release()  # an empty batch leaves no hooks on the model
            return finished
        index = torch.tensor(keep, device=self.device)
        self.mask = self.mask[index]
        used = int(self.mask.any(dim=0).nonzero()[0])  # the first column some row still uses
        self.mask = self.mask[:, used:]
        for layer in self.cache.layers:  # (B, heads, W, head_dim) -> (B', heads, W - used, head_dim)
            layer.keys = layer.keys[index, :, used:]
            layer.values = layer.values[index, :, used:]
        return finished

    # -- forward passes

    def _forward(self, input_ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor,
                 cache: DynamicCache, adapters: list[str]) -> torch.Tensor:
        """Last-position logits (B, V) in float32. ``input_ids`` (B, T); ``attention`` (B, W + T), the cached
        columns and the new ones; ``positions`` (B, T)."""
        names = None if self.adapter_names is None else [self.adapter_names[a] for a in adapters]
        with self.mixed.rows(names) as kwargs, contiguous_head_input(self.model):
            out = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                             logits_to_keep=1, **kwargs, **{self.cache_argument: cache})
        self.steps += 1
        self.step_rows += input_ids.shape[0]
        return out.logits[:, -1, :].float()

    def _prefill(self, joining: list[GenerationRequest]) -> None:
        """One left-padded forward pass over the joining prompts; each row gets its first token, and their cache
        is merged into the running one.

        A row whose prompt starts with its adapter's cached prefix (``PrefixCache``) feeds only the rest: the cache
        the pass starts from holds each row's prefix keys and values at the right end of P columns (P the longest
        prefix among the rows; padding to the left, masked), and the fed tokens continue at the positions after
        their row's prefix. A row's columns are then [padding, prefix, padding, rest of the prompt]: the mask hides
        the padding in between as it hides the padding on the left."""
        prefixes = [self.prefixes.lookup(self._key(r), r.prompt_ids) if self.prefixes else None for r in joining]
        cached = [0 if p is None else len(p.tokens) for p in prefixes]  # (J,) tokens taken from the cache
        input_ids, attention = _left_padded([r.prompt_ids[n:] for r, n in zip(joining, cached)], self.pad)  # (J, T)
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        start = torch.tensor(cached, device=self.device)[:, None]  # (J, 1): each row's first fed position
        positions = (attention.cumsum(dim=1) - 1).clamp(min=0) + start  # (J, T): each row counts its own tokens from 0
        cache, prefix_mask = self._prefix_cache(prefixes, cached)
        attention = torch.cat([prefix_mask, attention], dim=1)  # (J, P + T)
        logits = self._forward(input_ids, attention, positions, cache, [r.adapter for r in joining])
        rows = [_Row(r, len(r.prompt_ids), generator=_generator(r.sampling, self.device)) for r in joining]
        self._choose(logits, rows)
        self._learn_prefixes(joining, cached, cache, attention)
        self._merge(rows, cache, attention)

    def _prefix_cache(self, prefixes: list[_Prefix | None], cached: list[int]) -> tuple[DynamicCache, torch.Tensor]:
        """The cache a prefill starts from, each layer (J, heads, P, head_dim) with each row's cached prefix at the
        right end of its row (P = the longest; nothing cached: P = 0), and its mask (J, P)."""
        cache = _new_cache(self.model)
        width = max(cached)
        mask = torch.zeros((len(cached), width), dtype=torch.long, device=self.device)  # (J, P)
        if width == 0:
            return cache, mask
        first = next(p for p in prefixes if p is not None)
        for index, layer in enumerate(cache.layers):
            like_k, like_v = first.keys[index], first.values[index]  # (heads, p, head_dim)
            keys = like_k.new_zeros((len(cached), like_k.shape[0], width, like_k.shape[2]))  # (J, heads, P, head_dim)
            values = like_v.new_zeros((len(cached), like_v.shape[0], width, like_v.shape[2]))
            for row, (prefix, n) in enumerate(zip(prefixes, cached)):
                if prefix is not None:
                    keys[row, :, width - n:] = prefix.keys[index]
                    values[row, :, width - n:] = prefix.values[index]
            layer.update(keys, values)
        for row, n in enumerate(cached):
            if n:
                mask[row, width - n:] = 1
        return cache, mask

    def _learn_prefixes(self, joining: list[GenerationRequest], cached: list[int], cache: DynamicCache,
                        attention: torch.Tensor) -> None:
        """Rows prefilled in full may start their adapter's cached prefix: its keys and values are cut from the
        row's own (its prompt's columns start where its mask does)."""
        if self.prefixes is None:
            return
        for row, (request, n) in enumerate(zip(joining, cached)):
            length = self.prefixes.to_learn(self._key(request), request.prompt_ids) if n == 0 else 0
            if length:
                first = int(attention[row].nonzero()[0])  # the row's first token's column
                span = slice(first, first + length)
                self.prefixes.store(self._key(request), _Prefix(
                    request.prompt_ids[:length], [layer.keys[row, :, span].clone() for layer in cache.layers],
                    [layer.values[row, :, span].clone() for layer in cache.layers]))

    def _merge(self, rows: list[_Row], cache: DynamicCache, attention: torch.Tensor) -> None:
        """Append the new rows to the running batch, left-padding whichever cache is shorter to the other's width."""
        if not self.rows:
            self.rows, self.cache, self.mask = rows, cache, attention
            return
        width = max(self.mask.shape[1], attention.shape[1])
        pad = torch.nn.functional.pad
        for old, new in zip(self.cache.layers, cache.layers):  # (B, heads, W, head_dim): pad W on the left
            old.keys = torch.cat([pad(old.keys, (0, 0, width - old.keys.shape[2], 0)),
                                  pad(new.keys, (0, 0, width - new.keys.shape[2], 0))])
            old.values = torch.cat([pad(old.values, (0, 0, width - old.values.shape[2], 0)),
                                    pad(new.values, (0, 0, width - new.values.shape[2], 0))])
        self.mask = torch.cat([pad(self.mask, (width - self.mask.shape[1], 0)), pad(attention, (width - attention.shape[1], 0))])
        self.rows += rows

    def _decode(self) -> None:
        """One token for every running row: each feeds the token chosen last, at its own next position."""
        input_ids = torch.tensor([[row.next_token] for row in self.rows], device=self.device)  # (B, 1)
        positions = torch.tensor([[row.length] for row in self.rows], device=self.device)  # (B, 1)
        self.mask = torch.cat([self.mask, torch.ones_like(input_ids)], dim=1)  # (B, W + 1)
        logits = self._forward(input_ids, self.mask, positions, self.cache, [r.request.adapter for r in self.rows])
        for row in self.rows:
            row.length += 1
        self._choose(logits, self.rows)

    def _choose(self, logits: torch.Tensor, rows: list[_Row]) -> None:
        """Pick each row's next token from its logits (B, V) with its own settings, and hand it to the row."""
        greedy = logits.argmax(dim=-1).tolist()  # (B,): what a row with nothing to adjust takes
        for index, row in enumerate(rows):
            sampling = row.request.sampling
            penalty = sampling.repetition_penalty if sampling.repetition_penalty is not None else self.default_penalty
            adjust = (penalty not in (None, 1.0)) or len(row.request.token_ids) < sampling.min_new_tokens
            token = greedy[index]
            if adjust or not sampling.greedy:
                token = _pick(logits[index], row, penalty, self.stop_ids)
            row.next_token = token
            row.emitted = _accept(self.tokenizer, row.request, token, self.stop_set, row.emitted)

    def _whole_batch(self, joining: list[GenerationRequest]) -> list[GenerationRequest]:
        """A model that cannot be decoded step by step: the admitted group runs to its end through ``generate``."""
        if not joining:
            return []
        self.mixed.release()  # generate_batch installs its own
        generate_batch(self.model, self.tokenizer, joining, self.adapter_names)
        self.steps += 1
        self.step_rows += len(joining)
        return joining


@contextmanager
def contiguous_head_input(model: Any) -> Iterator[None]:
    """The output head gets its input (B, 1, H) contiguous while the block runs.

    Given ``logits_to_keep=1``, transformers' causal LMs slice the last position, ``hidden[:, -1:, :]``, a (B, 1, H)
    view with the strides of the (B, T, H) hidden states. torch's linear folds a contiguous 3-D input into one
    matrix product, but broadcasts the (V, H) weight into a batched product for a strided one: the head of a
    prefill of 8 rows took 88 ms instead of 26 on SmolLM2 (V = 49152; one thread), 176 against 29 for 16 rows,
    as much as a decoding step's linear layers. Without gradients that batched product first copies the weight
    once per row, (B, H, V): 8 rows on SmolLM2 (bfloat16) added 432 MiB of RSS to a GRPO rollout (torch's
    profiler: a clone of [8, 576, 49152] in bmm). A decoding step's (B, 1, H) is contiguous already."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def _adapter_state(model: Any) -> tuple[tuple[str, int], ...]:
    """What tells a model's adapters apart over time: PEFT's adapter names with their config objects (a loaded or
    deleted adapter changes it; a plain model has none)."""
    configs = getattr(model, "peft_config", None)
    return tuple((name, id(config)) for name, config in configs.items()) if isinstance(configs, dict) else ()


def _cache_argument(model: Any) -> str:
    """The forward argument that takes the cache: ``cache`` in recent transformers, ``past_key_values`` before
    (and in models whose code has not been renamed)."""
    network = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT passes it through
    return "cache" if "cache" in inspect.signature(network.forward).parameters else "past_key_values"


def _generator(sampling: Sampling, device: torch.device) -> torch.Generator | None:
    """A seeded request samples from its own generator: its output repeats whatever shares its batch."""
    if sampling.greedy or sampling.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(sampling.seed)


def _pick(logits: torch.Tensor, row: _Row, penalty: float | None, stop_ids: list[int]) -> int:
    """One row's next token from its logits (V,): the most likely one when greedy, else a draw from its own
    generator (or torch's global one)."""
    scores = adjusted_scores(logits, row.request, penalty, stop_ids)
    if row.request.sampling.greedy:
        return int(scores.argmax())
    return int(torch.multinomial(scores.softmax(dim=-1), 1, generator=row.generator))


def adjusted_scores(logits: torch.Tensor, request: GenerationRequest, penalty: float | None,
                    stop_ids: list[int]) -> torch.Tensor:
    """A row's logits (V,) after its settings, in the order transformers applies the same ones: the repetition
    penalty over the prompt and the tokens so far, the end of turn held off before min_new_tokens, then, when
    sampling, temperature, top-k and top-p (removed tokens get -inf)."""
    sampling = request.sampling
    scores = logits.clone()
    if penalty not in (None, 1.0):
        seen = torch.tensor(request.prompt_ids + request.token_ids, device=scores.device)
        picked = scores[seen]
        scores[seen] = torch.where(picked < 0, picked * penalty, picked / penalty)
    if len(request.token_ids) < sampling.min_new_tokens:
        scores[stop_ids] = -float("inf")
    if sampling.greedy:
        return scores
    if sampling.temperature != 1.0:
        scores = scores / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(scores, min(sampling.top_k, scores.shape[-1])).values[-1]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(scores)  # ascending
        outside = ordered.softmax(dim=-1).cumsum(dim=-1) <= 1 - sampling.top_p
        outside[-1] = False  # the most likely token always stays
        scores = scores.masked_fill(torch.zeros_like(outside).scatter(0, order, outside), -float("inf"))
    return scores
