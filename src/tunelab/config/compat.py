"""The compatibility matrix: every technique against every feature and objective, from what each declares.

Config validation reads it (``check_config``), ``tunelab techniques`` prints it, and the docs table in
``docs/techniques/compatibility.md`` is generated from it (``python -m tunelab.config.compat --write``; a
test keeps the file equal to the output). It lives in ``config``, above both ``techniques`` and ``objectives``,
because it crosses the two registries.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from tunelab.objectives import OBJECTIVES
from tunelab.techniques import TECHNIQUES
from tunelab.techniques.base import FEATURES, OBJECTIVE_PREFIX, Technique

log = logging.getLogger(__name__)

DOCS_TABLE = Path(__file__).parents[3] / "docs" / "techniques" / "compatibility.md"
BEGIN, END = "<!-- BEGIN GENERATED TABLE -->", "<!-- END GENERATED TABLE -->"


def columns() -> dict[str, str]:
    """Feature key -> column title: the FEATURES, then one column per registered objective."""
    return {**FEATURES, **{f"{OBJECTIVE_PREFIX}{name}": f"objective {name}" for name in OBJECTIVES}}


def matrix() -> dict[str, dict[str, str | None]]:
    """technique -> feature -> None (works) or the reason it is refused."""
    keys = columns()
    for technique in TECHNIQUES.values():
        unknown = set(technique.refuses) - set(keys)
        if unknown:
            raise RuntimeError(f"technique {technique.name!r} refuses unknown features {sorted(unknown)}; known: {sorted(keys)}")
    return {name: {key: refusal(t, key) for key in keys} for name, t in TECHNIQUES.items()}


def refusal(technique: Technique, key: str) -> str | None:
    """Why ``technique`` cannot work with ``key``: its own declaration, or, for an objective's column, what the
    objective needs that the technique refuses (a score head)."""
    reason = technique.refusal(key)
    if reason or not key.startswith(OBJECTIVE_PREFIX):
        return reason
    objective = OBJECTIVES[key.removeprefix(OBJECTIVE_PREFIX)]
    if objective.num_labels is not None and technique.refusal("score_head"):
        return f"the objective trains a score head: {technique.refusal('score_head')}"
    return None


def markdown_table() -> str:
    titles = columns()
    rows = ["| technique | " + " | ".join(titles.values()) + " |", "|---|" + "---|" * len(titles)]
    notes: list[str] = []
    for name, cells in matrix().items():
        marks = []
        for key, reason in cells.items():
            if reason is None:
                marks.append("yes")
            else:
                notes.append(f"- **{name}**, {titles[key]}: {reason}")
                marks.append(f"no [{len(notes)}]")
        rows.append(f"| `{name}` | " + " | ".join(marks) + " |")
    numbered = [f"{i}. {note[2:]}" for i, note in enumerate(notes, 1)]
    return "\n".join(rows) + "\n\nWhy each \"no\":\n\n" + "\n".join(numbered) + "\n"


def render_docs(text: str) -> str:
    """``text`` (the compatibility page) with its generated table replaced by the current one."""
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{markdown_table()}{END}{tail}"


def check_config(config: Any) -> None:
    """Refuse a combination the technique declares impossible, with its reason (raises ValueError).

    ``data.packing`` left at its default is turned off for a technique that cannot pack (and logged), so that
    switching ``technique.name`` alone always gives a valid config; an explicit ``packing: true`` is refused."""
    technique = TECHNIQUES[config.technique.name]
    name = config.technique.name
    reason = technique.refusal("packing")
    if reason and config.data.packing:
        if "packing" in config.data.model_fields_set:
            raise ValueError(f"data.packing: technique '{name}' cannot pack examples ({reason}); set data.packing: false")
        log.info("data.packing: off, because technique '%s' cannot pack (%s)", name, reason)
        object.__setattr__(config.data, "packing", False)  # no re-validation loop; the resolved config shows it
    reason = technique.refusal("gradient_checkpointing")
    if reason and config.training.gradient_checkpointing:
        raise ValueError(f"training.gradient_checkpointing: technique '{name}' cannot use it ({reason})")
    reason = technique.refusal("fsdp")
    if reason and config.training.distributed == "fsdp":
        raise ValueError(f"training.distributed: technique '{name}' cannot be sharded with fsdp ({reason})")
    objective = OBJECTIVES[config.objective.name]
    reason = objective.refusal("packing")
    if reason and config.data.packing:
        if "packing" in config.data.model_fields_set:
            raise ValueError(f"data.packing: objective '{config.objective.name}' cannot pack examples ({reason}); set data.packing: false")
        log.info("data.packing: off, because objective '%s' cannot pack (%s)", config.objective.name, reason)
        object.__setattr__(config.data, "packing", False)
    reason = objective.refusal("fsdp")
    if reason and config.training.distributed == "fsdp":
        raise ValueError(f"training.distributed: objective '{config.objective.name}' cannot be sharded with fsdp ({reason})")
    if objective.num_labels is not None:
        _no_text_figures(config)
    reason = refusal(technique, f"{OBJECTIVE_PREFIX}{config.objective.name}")
    if reason:
        raise ValueError(f"objective.name: technique '{name}' cannot train with objective '{config.objective.name}' ({reason})")


SCORE_HEAD_OFF = {"forgetting": False, "num_samples": 0}  # eval settings that need generated text or LM losses


def _no_text_figures(config: Any) -> None:
    """A score head (reward, classification) neither generates nor has a language-model loss on text: the sample
    generations and the forgetting check are turned off (and logged, when one was on), and refused when asked for
    explicitly."""
    turned_off = []
    for key, off in SCORE_HEAD_OFF.items():
        if getattr(config.eval, key) == off:
            continue
        if key in config.eval.model_fields_set:
            raise ValueError(f"eval.{key}: objective '{config.objective.name}' trains a score head, which generates no "
                             f"text; set eval.{key}: {str(off).lower()}")
        object.__setattr__(config.eval, key, off)
        turned_off.append(f"eval.{key}: {str(off).lower()}")
    if config.training.eval_metrics:
        raise ValueError(f"training.eval_metrics: objective '{config.objective.name}' trains a score head, which "
                         "generates no text to score; its own figures (e.g. pairwise_accuracy) are logged at every evaluation")
    if turned_off:  # a finished run's saved config has them off already: nothing to say when it is read again
        log.info("eval: no sample generations and no forgetting check for objective '%s' (a score head): %s",
                 config.objective.name, ", ".join(turned_off))


def main(argv: list[str]) -> int:
    if argv == ["--write"]:
        DOCS_TABLE.write_text(render_docs(DOCS_TABLE.read_text()))
        return 0
    sys.stdout.write(markdown_table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
