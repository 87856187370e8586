"""Build the two small real tasks of the multi-task and adapter-routing examples.

Why this data: routing needs two tasks that look different, built from real text nobody on the team wrote and
shipped in the repository (no downloads). Both come with CPython itself:

- ``docstrings.jsonl`` (task ``docstrings``): "Summarise `json.dumps` in one sentence." -> the first sentence of
  that object's docstring (CPython standard library, PSF License).
- ``unicode_names.jsonl`` (task ``unicode``): "What is the Unicode name of the character «é»?" -> "LATIN SMALL
  LETTER E WITH ACUTE (U+00E9)", from the Unicode Character Database as bundled in ``unicodedata`` (Unicode
  License v3).

Deterministic for a given Python version.

    python scripts/build_multitask_data.py [--out DIR] [--count N]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
import re
import unicodedata
from pathlib import Path

DEFAULT_OUT = Path(__file__).parents[1] / "examples" / "data" / "multitask"
MODULES = ("json", "os.path", "textwrap", "string", "shutil", "itertools", "functools", "collections", "math",
           "statistics", "random", "re", "datetime", "pathlib", "csv", "gzip", "zipfile", "tarfile", "hashlib",
           "base64", "urllib.parse", "html", "difflib", "heapq", "bisect", "copy", "pprint", "fnmatch", "glob",
           "tempfile", "time", "calendar", "uuid", "struct", "operator", "inspect", "logging", "argparse", "shlex")
QUESTIONS = ("Summarise `{name}` in one sentence.", "In one sentence, what does `{name}` do?",
             "Give a one-sentence summary of `{name}`.")
# Printable characters from varied scripts and symbol blocks: Latin-1, Latin Extended-A, Greek, Cyrillic,
# Hebrew, general punctuation, currency, letterlike, arrows, mathematical operators, box drawing, dingbats.
BLOCKS = ((0x00C0, 0x00FF), (0x0100, 0x017F), (0x0391, 0x03C9), (0x0410, 0x044F), (0x05D0, 0x05EA),
          (0x2010, 0x2027), (0x20A0, 0x20BF), (0x2100, 0x214F), (0x2190, 0x21FF), (0x2200, 0x22FF),
          (0x2500, 0x257F), (0x2700, 0x27BF))
SENTENCE = re.compile(r"^(.+?[.!?])(\s|$)")


def first_sentence(doc: str) -> str | None:
    paragraph = " ".join(re.split(r"\n\s*\n", doc.strip())[0].split())
    if "(" in paragraph.split(" ")[0]:  # a C-style signature line, not prose
        return None
    match = SENTENCE.match(paragraph)
    sentence = match.group(1) if match else paragraph
    return sentence if 20 <= len(sentence) <= 200 else None


def docstring_records(count: int, rng: random.Random) -> list[dict]:
    found = []
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue
            home = (getattr(obj, "__module__", None) or "").lstrip("_")  # _json, _functools: C accelerators
            if home not in (module_name, module_name.split(".")[0]) and not (module_name == "os.path" and home == "posixpath"):
                continue  # re-exported from another module: it belongs to that module's name
            sentence = first_sentence(inspect.cleandoc(obj.__doc__ or ""))  # its own docstring, not an inherited one
            if sentence:
                found.append((f"{module_name}.{name}", sentence))
    rng.shuffle(found)
    return [{"messages": [{"role": "user", "content": rng.choice(QUESTIONS).format(name=name)},
                          {"role": "assistant", "content": sentence}], "task": "docstrings"}
            for name, sentence in found[:count]]


def unicode_records(count: int, rng: random.Random) -> list[dict]:
    chars = [chr(c) for lo, hi in BLOCKS for c in range(lo, hi + 1) if unicodedata.name(chr(c), "")]
    rng.shuffle(chars)
    return [{"messages": [{"role": "user", "content": f"What is the Unicode name of the character «{c}»?"},
                          {"role": "assistant", "content": f"{unicodedata.name(c)} (U+{ord(c):04X})"}], "task": "unicode"}
            for c in chars[:count]]


def write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--count", type=int, default=240)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    write(args.out / "docstrings.jsonl", docstring_records(args.count, random.Random(0)))
    write(args.out / "unicode_names.jsonl", unicode_records(args.count, random.Random(1)))


if __name__ == "__main__":
    main()
