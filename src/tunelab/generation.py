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
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from tunelab.data.formats import Example
from tunelab.data.tokenize import pad_token_id, prompt_for_generation, render_chat

__all__ = ["BASE", "GREEDY", "PEFT_BASE", "GenerationRequest", "Sampling", "encode", "generate_batch",
           "generate_samples", "generate_texts", "render_chat", "sample_prompts", "stop_token_ids"]

BASE = "base"  # the name that means "no adapter", in requests and in the CLI
PEFT_BASE = "__base__"  # PEFT's own name for it in adapter_names


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
    # Filled in by generate_batch:
    token_ids: list[int] = field(default_factory=list)  # the new tokens, without the end-of-turn token
    text: str = ""  # their text, without special tokens, cut at the first stop string
    finish_reason: str | None = None  # stop | length | cancelled | timeout

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


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
            if len(request.token_ids) >= request.sampling.max_new_tokens and not request.done:
                request.finish_reason = "length"

    def end(self) -> None:
        for row, request in enumerate(self.requests):
            self._update_text(row, final=True)  # a last character still incomplete is the text's end after all
            if not request.done:  # generate() ended on its own budget (the batch's longest)
                request.finish_reason = "length"

    def _update_text(self, row: int, final: bool = False) -> None:
        request = self.requests[row]
        text = self.tokenizer.decode(request.token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:  # an incomplete multi-byte character: wait for the next token
            return
        for stop in request.sampling.stop:
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


def _left_padded(requests: list[GenerationRequest], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask), both (B, T): each prompt at the right end of its row, so all rows continue
    from the same position."""
    width = max(len(r.prompt_ids) for r in requests)
    input_ids = torch.full((len(requests), width), pad, dtype=torch.long)  # (B, T)
    attention = torch.zeros((len(requests), width), dtype=torch.long)  # (B, T)
    for row, request in enumerate(requests):
        n = len(request.prompt_ids)
        input_ids[row, width - n:] = torch.tensor(request.prompt_ids)
        attention[row, width - n:] = 1
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
    device = next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    pad = pad_token_id(tokenizer)
    input_ids, attention = _left_padded(requests, pad)
    tracker = _RowTracker(tokenizer, requests, stops)
    kwargs = sampling.generate_kwargs()
    if adapter_names is not None:
        kwargs["adapter_names"] = [adapter_names[r.adapter] for r in requests]
    if not sampling.greedy and sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    was_training = model.training
    model.eval()
    try:
        model.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device),
            max_new_tokens=max(r.sampling.max_new_tokens for r in requests), eos_token_id=stops, pad_token_id=pad,
            streamer=tracker, stopping_criteria=StoppingCriteriaList([tracker]), **kwargs,
        )
    finally:
        model.train(was_training)
    return requests


def generate_texts(model: Any, tokenizer: PreTrainedTokenizerBase, prompts: list[str], sampling: Sampling = GREEDY,
                   batch_size: int = 8, special_tokens: bool = False) -> list[str]:
    """One output text per prompt (already rendered), stripped, in order, ``batch_size`` prompts at a time.
    Order-preserving batches keep each output independent of the rest of the set (grouping prompts of similar
    length would pad less). ``special_tokens``: encode as plain text, with the tokenizer's own BOS/EOS."""
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        rows = [GenerationRequest(encode(tokenizer, p, special_tokens), sampling) for p in prompts[start:start + batch_size]]
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
                          batch_size, special_tokens=plain_text)
