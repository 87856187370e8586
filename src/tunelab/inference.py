"""Using a result: turn chat messages into the run's prompt, and generate from one or many prompts at once.

One batch may hold requests for different adapters of the same base: PEFT's mixed-batch inference takes one
adapter name per row (``adapter_names``), 'base' or PEFT's ``__base__`` meaning no adapter. Generation itself is
transformers' ``generate``; what is added here is per-row control of a batch, which ``generate`` only offers
through its hooks: a streamer sees every new token of every row, and a stopping criterion ends each row on its
own (its token budget, a stop string, a cancelled request, a deadline) while the rest of the batch goes on.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from tunelab.data.tokenize import pad_token_id
from tunelab.errors import ConfigError

BASE = "base"  # the name that means "no adapter", in requests and in the CLI
PEFT_BASE = "__base__"  # PEFT's own name for it in adapter_names


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """The prompt text the run's own chat template makes of ``messages``, ending with the assistant's turn
    opened (the template travels with the run in tokenizer/, so training and serving agree)."""
    if not tokenizer.chat_template:
        raise ConfigError("this run's tokenizer has no chat template, so it cannot chat; use plain-text "
                          "generation (`tunelab generate RUN --prompt ...` or /v1/completions)")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def stop_token_ids(model: Any, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's EOS and the model's own end-of-turn tokens (a chat model may end turns with a token, such
    as <|im_end|>, that is not the tokenizer's EOS)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(i for i in [tokenizer.eos_token_id, *configured] if i is not None))


@dataclass
class GenerationRequest:
    """One row of a batch. ``on_token(text_so_far_delta)`` is called from the generating thread."""

    prompt_ids: list[int]
    max_new_tokens: int
    adapter: str = BASE
    stop: list[str] = field(default_factory=list)
    deadline: float | None = None  # time.monotonic() value
    cancelled: threading.Event = field(default_factory=threading.Event)
    on_text: Callable[[str], None] | None = None
    # Filled in by generate_batch:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # stop | length | cancelled | timeout

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class Sampling:
    """Requests are batched only with others of the same sampling settings (one ``generate`` call each)."""

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


class _RowTracker(BaseStreamer, StoppingCriteria):
    """Sees each generated token of each row (as a streamer) and tells ``generate`` which rows are finished (as a
    stopping criterion). Decoding is incremental: the text of a row is re-decoded from its tokens, and only the
    part after the last complete character is emitted, so multi-byte characters are never split."""

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
            request = self.requests[row]
            if request.done:
                continue
            if token in self.stop_ids:
                request.finish_reason = "stop"
                continue
            request.token_ids.append(token)
            self._update_text(row)
            if len(request.token_ids) >= request.max_new_tokens and not request.done:
                request.finish_reason = "length"

    def end(self) -> None:
        for request in self.requests:
            if not request.done:  # generate() ended on its own budget (the batch's longest)
                request.finish_reason = "length"

    def _update_text(self, row: int) -> None:
        request = self.requests[row]
        text = self.tokenizer.decode(request.token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return
        for stop in request.stop:
            cut = text.find(stop)
            if cut >= 0:
                text, request.finish_reason = text[:cut], "stop"
        delta = text[len(self.emitted[row]):] if text.startswith(self.emitted[row]) else ""
        self.emitted[row] = text
        request.text = text
        if delta and request.on_text is not None:
            request.on_text(delta)

    # -- stopping-criterion side: a (B,) bool tensor, True where the row is finished
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        now = time.monotonic()
        for request in self.requests:
            if request.done:
                continue
            if request.cancelled.is_set():
                request.finish_reason = "cancelled"
            elif request.deadline is not None and now > request.deadline:
                request.finish_reason = "timeout"
        return torch.tensor([r.done for r in self.requests], device=input_ids.device)


@torch.no_grad()
def generate_batch(model: Any, tokenizer: PreTrainedTokenizerBase, requests: list[GenerationRequest],
                   sampling: Sampling = Sampling(), adapter_names: dict[str, str] | None = None) -> list[GenerationRequest]:
    """Generate for every request in one left-padded batch; each request gets its tokens, text and finish reason.

    ``adapter_names`` maps a request's ``adapter`` to the PEFT adapter name; when given, the batch runs with
    PEFT's mixed-adapter inference. Rows are independent: left padding with the attention mask and position ids
    derived from it gives each row what it would get alone (greedy outputs equal single-request outputs)."""
    if not requests:
        return requests
    device = next(model.parameters()).device
    pad_id = pad_token_id(tokenizer)
    width = max(len(r.prompt_ids) for r in requests)
    input_ids = torch.full((len(requests), width), pad_id, dtype=torch.long)  # (B, T), left-padded
    attention = torch.zeros((len(requests), width), dtype=torch.long)
    for row, request in enumerate(requests):
        n = len(request.prompt_ids)
        input_ids[row, width - n:] = torch.tensor(request.prompt_ids)
        attention[row, width - n:] = 1
    stops = stop_token_ids(model, tokenizer)
    tracker = _RowTracker(tokenizer, requests, stops)
    kwargs: dict[str, Any] = {}
    if adapter_names is not None:
        kwargs["adapter_names"] = [adapter_names[r.adapter] for r in requests]
    if sampling.greedy:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=None)
    model.generate(
        input_ids=input_ids.to(device), attention_mask=attention.to(device),
        max_new_tokens=max(r.max_new_tokens for r in requests), eos_token_id=stops, pad_token_id=pad_id,
        streamer=tracker, stopping_criteria=StoppingCriteriaList([tracker]), **kwargs,
    )
    return requests


def generate_text(model: Any, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int,
                  sampling: Sampling = Sampling(), batch_size: int = 8) -> list[GenerationRequest]:
    """Plain helper for `tunelab generate` and tests: prompts already rendered as text."""
    out: list[GenerationRequest] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [GenerationRequest(encode(tokenizer, p), max_new_tokens) for p in prompts[start:start + batch_size]]
        out.extend(generate_batch(model, tokenizer, chunk, sampling))
    return out


def encode(tokenizer: PreTrainedTokenizerBase, text: str, special: bool = False) -> list[int]:
    """Token ids of a prompt. A chat template already writes its own special tokens, so by default none are
    added; raw text gets the tokenizer's usual ones (``special=True``), as in training on plain text."""
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def uses_chat_template(run_dir: Any, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether a run talks through its chat template: it has one and it was trained on conversations (a run on
    plain text or prompt/completion pairs continues raw text, as in its training)."""
    from pathlib import Path

    from tunelab.runs import read_json

    formats = (read_json(Path(run_dir) / "data_report.json") or {}).get("formats") or {}
    chat_formats = {"messages", "alpaca"}
    return bool(tokenizer.chat_template) and (not formats or bool(chat_formats & set(formats)))


def prompt_from_record(record: dict[str, Any], where: str) -> tuple[list[dict[str, str]] | None, str | None]:
    """(messages, raw text) for one `tunelab generate --data` record: a conversation (a trailing assistant turn,
    the reference answer, is dropped), an instruction, or a plain prompt/text."""
    from tunelab.errors import DataError

    record = {k: v for k, v in record.items() if v is not None}  # a table's rows carry every column, absent ones as None
    messages = record.get("messages")
    if isinstance(messages, list) and messages:
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
            raise DataError(f"{where}: each message needs a string 'role' and 'content'")
        turns = [{"role": m["role"], "content": m["content"]} for m in messages]
        while turns and turns[-1]["role"] == "assistant":
            turns.pop()
        if not turns:
            raise DataError(f"{where}: the conversation has no user turn to answer")
        return turns, None
    if isinstance(record.get("instruction"), str):
        text = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        return [*system, {"role": "user", "content": text}], text
    for key in ("prompt", "text"):
        if isinstance(record.get(key), str):
            return [{"role": "user", "content": record[key]}], record[key]
    raise DataError(f"{where}: expected 'messages', 'instruction', 'prompt' or 'text' (got keys {sorted(record)})")
