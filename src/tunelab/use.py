"""Using a finished run from the terminal: `tunelab generate` (one-shot or a file of prompts) and `tunelab chat`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from tunelab.inference import (GenerationRequest, Sampling, encode, generate_batch, prompt_from_record, render_chat,
                               uses_chat_template)


def _prompt_text(tokenizer: Any, chat: bool, messages: list[dict[str, str]], raw: str | None, where: str) -> str:
    if chat:
        return render_chat(tokenizer, messages)
    if raw is None:
        from tunelab.errors import DataError

        raise DataError(f"{where}: a conversation needs the chat template; drop --raw")
    return raw


def generate_from_run(run: Path, prompts: list[str] | None, data: Path | None, max_new_tokens: int,
                      temperature: float = 0.0, seed: int | None = None, raw: bool | None = None,
                      batch_size: int = 8) -> Iterator[dict[str, Any]]:
    """Yield one record per prompt: {source, prompt, output, finish_reason, tokens}, in input order."""
    from tunelab.data.formats import read_records
    from tunelab.result import load_run

    loaded = load_run(run)
    chat = uses_chat_template(run, loaded.tokenizer) if raw is None else not raw
    items: list[tuple[str, str]] = []  # (source, rendered prompt)
    if data is not None:
        records, lines = read_records(Path(data))
        for index, record in enumerate(records):
            where = f"{data}:{lines[index] if lines else index + 1}"
            messages, text = prompt_from_record(record, where)
            items.append((where, _prompt_text(loaded.tokenizer, chat, messages, text, where)))
    for index, text in enumerate(prompts or []):
        items.append((f"--prompt {index + 1}", render_chat(loaded.tokenizer, [{"role": "user", "content": text}]) if chat else text))
    sampling = Sampling(temperature=temperature, seed=seed)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        requests = [GenerationRequest(encode(loaded.tokenizer, text, special=not chat), max_new_tokens) for _, text in chunk]
        generate_batch(loaded.model, loaded.tokenizer, requests, sampling)
        for (source, text), request in zip(chunk, requests):
            yield {"source": source, "prompt": text, "output": request.text.strip(),
                   "finish_reason": request.finish_reason, "tokens": len(request.token_ids)}


def chat_loop(run: Path, system: str | None, max_new_tokens: int, temperature: float = 0.0,
              read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> list[dict[str, str]]:
    """An interactive chat: each reply streams as it is generated. Returns the conversation (for tests)."""
    from tunelab.result import load_run

    loaded = load_run(run)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    out.write(f"Chatting with {Path(run).name} ({loaded.config.technique.name} on {loaded.config.model.name}). "
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
        request = GenerationRequest(encode(loaded.tokenizer, render_chat(loaded.tokenizer, messages)), max_new_tokens,
                                    on_text=lambda delta: (out.write(delta), out.flush()))
        out.write("assistant> ")
        try:
            generate_batch(loaded.model, loaded.tokenizer, [request], Sampling(temperature=temperature))
        except KeyboardInterrupt:  # stop this reply, keep the conversation
            request.finish_reason = "cancelled"
        out.write("\n" if request.finish_reason == "stop" else f"\n[{request.finish_reason}]\n")
        messages.append({"role": "assistant", "content": request.text.strip()})
