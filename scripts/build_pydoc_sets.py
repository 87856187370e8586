"""Build the shipped preference and classification sets from the Python standard library's own docstrings.

Why this data: preference training and classification need real text with answers and labels nobody on the team
wrote. Both come mechanically from CPython's docstrings (PSF licence), the same source as pydoc Q&A:

- pydoc_preference: {prompt, chosen, rejected}. The prompt asks what one public function, class or method does;
  the chosen answer is its docstring's first paragraph; the rejected answer is another object's first paragraph
  from the same module: plausible (same topic, same style), but about something else.
- pydoc_kind: {text, label}. The text is a docstring's first paragraph; the label is what the documented object is
  (class, function or method), read from the object itself. The classes are balanced (as many of each), so the
  majority-class baseline is one third.

Each set has train.jsonl and heldout.jsonl (records of distinct modules for preference, so a held-out pair asks
about a module never seen in training; a seeded 20% for kind). Deterministic: the same Python version gives
byte-identical output.

    python scripts/build_pydoc_sets.py [--out-dir PATH]
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from build_pydoc_qa import QUESTIONS, first_paragraph, is_clean, members, stdlib_modules  # noqa: E402 - the same cleaning

DEFAULT_OUT = Path(__file__).parents[1] / "src" / "tunelab" / "assets"
PAIRS_PER_MODULE = 4  # spread the pairs over many modules rather than a few big ones
HELDOUT_SHARE = 0.2
KIND_PER_CLASS = 160


def documented(module: object) -> list[tuple[str, object, str]]:
    """(qualified name, object, first paragraph) of the module's public members with a clean, unique summary."""
    out, seen = [], set()
    for qualified, obj in members(module):
        summary = first_paragraph(inspect.getdoc(obj) or "")
        if is_clean(summary) and summary not in seen:
            seen.add(summary)
            out.append((qualified, obj, summary))
    return out


def kind_of(qualified: str, obj: object) -> str:
    if inspect.isclass(obj):
        return "class"
    return "method" if qualified.count(".") >= 2 and inspect.isclass(_owner(qualified)) else "function"


def _owner(qualified: str) -> object:
    module_name, class_name = qualified.split(".")[0], qualified.split(".")[1]
    return getattr(sys.modules.get(module_name), class_name, None)


def build(rng: random.Random) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    pairs_by_module: dict[str, list[dict]] = {}
    by_kind: dict[str, list[dict]] = {"class": [], "function": [], "method": []}
    texts_seen: set[str] = set()
    for module in stdlib_modules():
        if "." in module.__name__:
            continue
        items = documented(module)
        for qualified, obj, summary in items:
            if summary not in texts_seen:  # a text shared by two modules (re-exported classes) would leak into heldout
                texts_seen.add(summary)
                by_kind[kind_of(qualified, obj)].append({"text": summary, "label": kind_of(qualified, obj)})
        if len(items) < 2:
            continue
        for qualified, _, summary in rng.sample(items, min(PAIRS_PER_MODULE, len(items))):
            other = rng.choice([s for q, _, s in items if q != qualified])
            pairs_by_module.setdefault(module.__name__, []).append(
                {"prompt": rng.choice(QUESTIONS).format(name=qualified), "chosen": summary, "rejected": other})
    modules = sorted(pairs_by_module)
    rng.shuffle(modules)
    cut = round(len(modules) * HELDOUT_SHARE)
    preference = {"heldout": [p for m in modules[:cut] for p in pairs_by_module[m]],
                  "train": [p for m in modules[cut:] for p in pairs_by_module[m]]}
    kind_records = []
    for name in sorted(by_kind):  # as many of each class: the majority baseline is 1 / number of classes
        kind_records += rng.sample(by_kind[name], min(KIND_PER_CLASS, *(len(v) for v in by_kind.values())))
    rng.shuffle(kind_records)
    held = round(len(kind_records) * HELDOUT_SHARE)
    kind = {"heldout": kind_records[:held], "train": kind_records[held:]}
    return preference, kind


def write(folder: Path, splits: dict[str, list[dict]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        rng = random.Random(0)
        records = list(records)
        rng.shuffle(records)
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        print(f"{folder.name}/{split}.jsonl: {len(records)} records")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    preference, kind = build(random.Random(0))
    write(args.out_dir / "pydoc_preference", preference)
    write(args.out_dir / "pydoc_kind", kind)


if __name__ == "__main__":
    main()
