"""Build pydoc Q&A, the quickstart dataset, from the Python standard library's own docstrings.

Why this data: the quickstart must fine-tune on real text that nobody on the team wrote, ship inside the
repository (no downloads), and show a visible change. CPython's docstrings are real, varied technical prose
under the PSF licence. Each example asks about one public function, class or method; the answer follows one
fixed house style (signature in backticks, the docstring's first paragraph, the module) that an instruct
model does not produce by itself, so after fine-tuning the change is visible in the generations.

Deterministic: the same Python version gives byte-identical output.

    python scripts/build_pydoc_qa.py [--out PATH] [--max-per-module N]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import random
import re
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Iterator

DEFAULT_OUT = Path(__file__).parents[1] / "src" / "tunelab" / "assets" / "pydoc_qa" / "pydoc_qa.jsonl"
SKIP_PREFIXES = ("_", "test", "idlelib", "tkinter", "turtle", "lib2to3", "ensurepip", "pydoc_data", "msvcrt",
                 "winreg", "winsound", "nt", "antigravity", "this", "xxsubtype", "xxlimited")
QUESTIONS = (
    "What does `{name}` do in Python?",
    "Explain `{name}`.",
    "How do I use `{name}`?",
    "What is `{name}` for?",
    "Describe the Python standard library's `{name}`.",
)
SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)(\s*->\s*.+)?$")
MEMORY_ADDRESS = re.compile(r"<([^<>]*?) at 0x[0-9a-f]+>")  # default values like <function f at 0x7f..>


def stdlib_modules() -> Iterator[ModuleType]:
    for name in sorted(sys.stdlib_module_names):
        if name.startswith(SKIP_PREFIXES):
            continue
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            try:
                yield importlib.import_module(name)
            except Exception:  # platform-specific or optional modules: skip what does not import here
                continue


def first_paragraph(doc: str) -> str:
    """The docstring's first prose paragraph, whitespace-normalised (a leading C-style signature is skipped)."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", doc.strip()) if p.strip()]
    while paragraphs and SIGNATURE_LINE.match(paragraphs[0]):
        paragraphs.pop(0)
    return paragraphs[0] if paragraphs else ""


def signature(obj: object, qualified: str) -> str:
    try:
        text = f"{qualified}{inspect.signature(obj)}"
    except (TypeError, ValueError):
        text = f"{qualified}(...)"
    text = MEMORY_ADDRESS.sub(r"<\1>", text)  # addresses change from run to run; the output must not
    if len(text) > 100:
        text = text[:96] + "...)"
    return f"class {text}" if inspect.isclass(obj) else text


def members(module: ModuleType) -> Iterator[tuple[str, object]]:
    """Public functions and classes defined in the module, and the public methods of those classes."""
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj) or inspect.isbuiltin(obj):
            yield f"{module.__name__}.{name}", obj
        elif inspect.isclass(obj):
            yield f"{module.__name__}.{name}", obj
            for method_name, method in sorted(vars(obj).items()):
                if not method_name.startswith("_") and (inspect.isfunction(method) or inspect.ismethoddescriptor(method)):
                    yield f"{module.__name__}.{name}.{method_name}", method


def is_clean(text: str) -> bool:
    return text.isascii() and 40 <= len(text) <= 400 and not text.startswith(("Deprecated", "Return repr", "Helper"))


def build(max_per_module: int) -> list[dict]:
    rng = random.Random(0)
    examples, seen_answers = [], set()
    for module in stdlib_modules():
        taken = 0
        for qualified, obj in members(module):
            if taken >= max_per_module:
                break
            summary = first_paragraph(inspect.getdoc(obj) or "")
            if not is_clean(summary) or summary in seen_answers:
                continue
            seen_answers.add(summary)
            answer = f"`{signature(obj, qualified)}`\n\n{summary}\n\nModule: `{module.__name__}`"
            question = rng.choice(QUESTIONS).format(name=qualified)
            examples.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
            taken += 1
    random.Random(0).shuffle(examples)
    return examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--max-per-module", type=int, default=60)
    args = parser.parse_args()
    examples = build(args.max_per_module)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples))
    modules = {e["messages"][1]["content"].rsplit("`", 2)[-2] for e in examples}
    mean = sum(len(e["messages"][1]["content"]) for e in examples) / len(examples)
    print(f"{len(examples)} examples from {len(modules)} modules, mean answer {mean:.0f} chars -> {args.out}")


if __name__ == "__main__":
    main()
