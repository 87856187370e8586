"""Using a finished run from the terminal: `tunelab generate` (one-shot or a file of prompts) and `tunelab chat`."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from tunelab.data.formats import read_records, record_location
from tunelab.errors import DataError
from tunelab.generation import (GREEDY, GenerationRequest, Sampling, context_length, encode, fit_context, generate_batch,
                                render_chat)
from tunelab.result import load_for_generation
from tunelab.runs import read_json

log = logging.getLogger(__name__)


def uses_chat_template(run_dir: Path, tokenizer: Any) -> bool:
    """Whether a run talks through its chat template: it has one and it was trained on conversations (a run on
    plain text or prompt/completion pairs continues raw text, as in its training)."""
    formats = (read_json(Path(run_dir) / "data_report.json") or {}).get("formats") or {}
    chat_formats = {"messages", "alpaca"}
    return bool(tokenizer.chat_template) and (not formats or bool(chat_formats & set(formats)))


def prompt_from_record(record: dict[str, Any], where: str) -> tuple[list[dict[str, str]] | None, str | None]:
    """(messages, raw text) for one `tunelab generate --data` record: a conversation (a trailing assistant turn,
    the reference answer, is dropped), an instruction, or a plain prompt/text."""
    record = {k: v for k, v in record.items() if v is not None}  # a table's rows carry every column, absent ones as None
    messages = record.get("messages")
    if "messages" in record and not (isinstance(messages, list) and messages):
        raise DataError(f"{where}: 'messages' should be a non-empty list of turns ({{\"role\": ..., \"content\": ...}}), "
                        f"got {json.dumps(messages)[:80]}")
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


def _prompt_text(tokenizer: Any, chat: bool, messages: list[dict[str, str]], raw: str | None, where: str) -> str:
    if chat:
        return render_chat(tokenizer, messages)
    if raw is None:
        raise DataError(f"{where}: a conversation needs the chat template; drop --raw")
    return raw


def generate_from_run(run: Path, prompts: list[str] | None, data: Path | None, sampling: Sampling = GREEDY,
                      raw: bool | None = None, batch_size: int = 8, dtype: str = "auto") -> Iterator[dict[str, Any]]:
    """Yield one record per prompt: {source, prompt, output, finish_reason, tokens}, in input order. The run is
    loaded as `tunelab serve` loads it (``load_for_generation``, ``dtype``), so the answers are the served ones."""
    parsed: list[tuple[str, list[dict[str, str]] | None, str | None]] = []  # (source, messages, raw text)
    if data is not None:  # read and checked before the weights load (seconds): a bad record is named at once
        records, lines = read_records(Path(data))
        for index, record in enumerate(records):
            where = record_location(Path(data), index, lines)
            parsed.append((where, *prompt_from_record(record, where)))
    loaded = load_for_generation(run, dtype=dtype)
    log.info("weights in %s: %s", loaded.precision.dtype, loaded.precision.reason)  # as serve says it
    chat = uses_chat_template(run, loaded.tokenizer) if raw is None else not raw
    items: list[tuple[str, str]] = [(where, _prompt_text(loaded.tokenizer, chat, messages, text, where))
                                    for where, messages, text in parsed]  # (source, rendered prompt)
    for index, text in enumerate(prompts or []):
        items.append((f"--prompt {index + 1}", render_chat(loaded.tokenizer, [{"role": "user", "content": text}]) if chat else text))
    requests = [GenerationRequest(encode(loaded.tokenizer, text, special=not chat), sampling, source=source)
                for source, text in items]
    fit_context(requests, context_length(loaded.model, loaded.tokenizer))  # a prompt too long: refused before any
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        generate_batch(loaded.model, loaded.tokenizer, requests[start:start + batch_size])
        for (source, text), request in zip(chunk, requests[start:start + batch_size]):
            yield {"source": source, "prompt": text, "output": request.text.strip(),
                   "finish_reason": request.finish_reason, "tokens": len(request.token_ids)}


def chat_loop(run: Path, system: str | None, sampling: Sampling = GREEDY,
              read: Callable[[str], str] = input, out: TextIO = sys.stdout, dtype: str = "auto") -> list[dict[str, str]]:
    """An interactive chat: each reply streams as it is generated. Returns the conversation (for tests)."""
    loaded = load_for_generation(run, dtype=dtype)
    log.info("weights in %s: %s", loaded.precision.dtype, loaded.precision.reason)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    out.write(f"Chatting with {loaded.name} ({loaded.technique.name} on {loaded.base}). "
              "/reset starts over, /exit leaves, Ctrl-C stops a reply.\n")
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return messages
        if line.strip() in ("/exit", "/quit"):
            return messages
        if line.strip() == "/reset":
            messages = list(start)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        request = GenerationRequest(encode(loaded.tokenizer, render_chat(loaded.tokenizer, messages)), sampling,
                                    on_text=lambda delta: (out.write(delta), out.flush()))
        out.write("assistant> ")
        try:
            generate_batch(loaded.model, loaded.tokenizer, [request])
        except KeyboardInterrupt:  # stop this reply, keep the conversation
            request.finish_reason = "cancelled"
        except DataError as exc:  # the conversation no longer fits the context: this message is refused, not the chat
            messages.pop()
            out.write(f"\n[refused: {exc}. /reset starts over]\n")
            continue
        out.write("\n" if request.finish_reason == "stop" else f"\n[{request.finish_reason}]\n")
        messages.append({"role": "assistant", "content": request.text.strip()})
