"""The resolved config as YAML with every field's description above it (`tunelab config show`).

The descriptions are the schema's own (``Field(description=...)``), so the printout never drifts from what the
loader accepts; the output is still plain YAML that loads back to the same config.
"""

from __future__ import annotations

import textwrap
from typing import Any

import yaml
from pydantic import BaseModel

WIDTH = 100


def _comment(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(" ".join(text.split()), WIDTH - len(indent) - 2)]


def _field_lines(name: str, value: Any, description: str | None, indent: str) -> list[str]:
    lines = _comment(description, indent) if description else []
    dumped = yaml.safe_dump({name: value}, sort_keys=False, allow_unicode=True, width=WIDTH).rstrip("\n")
    return lines + [indent + line for line in dumped.splitlines()]


def describe_yaml(config: BaseModel, values: dict[str, Any] | None = None) -> str:
    """``config`` as YAML (``values`` if given: e.g. with the effective learning rate), each field under a comment
    holding its description."""
    values = values if values is not None else config.model_dump(mode="json")
    out: list[str] = []
    for section_name, section_field in type(config).model_fields.items():
        section = getattr(config, section_name)
        out += _comment(section_field.description, "") if section_field.description else []
        out.append(f"{section_name}:")
        for name, field in type(section).model_fields.items():  # the technique's own class: its own fields
            out += _field_lines(name, values[section_name][name], field.description, "  ")
        out.append("")
    return "\n".join(out)
