"""The base model's figures are measured once per base, data and settings, and reused by later runs (issue 19):
the second of two runs on the same base and data does not evaluate the base and reports the same figures; a run
whose figures would differ (other dtype, data, eval.max_examples, chat template, a random new head) measures them
again; a damaged cache entry is ignored and rewritten."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file, save_file
from support.runs import tiny_run_config
from support.tiny import toy_chat_records, write_jsonl

from tunelab import precision
from tunelab.eval import before_after
from tunelab.run_info import versions
from tunelab.eval.before_after import BASE_EVAL, CACHE_FOLDER
from tunelab.models import cache_root
from tunelab.training import train
from tunelab.training.context import TrainingContext

ONE_STEP = {"max_steps": 1}
EVAL = {"max_examples": 6, "num_samples": 1, "max_new_tokens": 3, "forgetting": True, "forgetting_max_tokens": 48}
# A ChatML variant (one more newline after each turn): the same messages tokenize differently.
OTHER_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class Measured:
    """Counts the base measurements: validation loss, greedy samples and held-out loss, during the base
    evaluation only (the final evaluation of the tuned weights calls them too)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        import tunelab.training.session as session

        real = session.base_evaluation

        def counting(*args: Any, **kwargs: Any) -> Any:
            validation_loss, generate, heldout = args[3], args[4], args[5]
            args = (*args[:3], self._count("loss", validation_loss), self._count("samples", generate),
                    self._count("heldout", heldout), *args[6:])
            return real(*args, **kwargs)

        monkeypatch.setattr(session, "base_evaluation", counting)

    def _count(self, name: str, measure: Any) -> Any:
        def measured() -> Any:
            self.calls.append(name)
            return measure()
        return measured

    def take(self) -> list[str]:
        calls, self.calls = self.calls, []
        return calls


def run(model_dir: Path, tmp_path: Path, name: str, records: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    sections = {"training": ONE_STEP, **sections}
    sections["eval"] = {**EVAL, **sections.get("eval", {})}
    sections["output"] = {"dir": str(tmp_path / name)}
    data_settings = sections.pop("data", {})  # tiny_run_config's own `data` argument is the training file
    config = tiny_run_config(model_dir, tmp_path, records, **sections)
    for key, value in data_settings.items():
        setattr(config.data, key, value)
    train(config, progress=False)
    return json.loads((tmp_path / name / BASE_EVAL).read_text())


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", toy_chat_records(48))


@pytest.fixture
def measured(monkeypatch: pytest.MonkeyPatch) -> Measured:
    return Measured(monkeypatch)


def entries() -> list[Path]:
    folder = cache_root() / CACHE_FOLDER
    return sorted(folder.glob("*/" + BASE_EVAL)) if folder.is_dir() else []


def test_a_second_run_on_the_same_base_and_data_reuses_the_base_figures(
    tiny_model_dir: Path, tmp_path: Path, data: Path, measured: Measured, caplog: pytest.LogCaptureFixture,
) -> None:
    first = run(tiny_model_dir, tmp_path, "first", data)
    assert measured.take() == ["loss", "samples", "heldout"]
    assert len(entries()) == 1
    with caplog.at_level(logging.INFO, logger="tunelab"):
        # another technique and seed: neither changes the untouched model's figures
        second = run(tiny_model_dir, tmp_path, "second", data, technique={"name": "freeze", "layers": [-1]},
                     training={**ONE_STEP, "seed": 7})
    assert measured.take() == [], "the base was evaluated again"
    assert second == first
    key = entries()[0].parent.name
    assert f"base figures from cache (key {key})" in caplog.text
    tuned = json.loads((tmp_path / "second" / "eval.json").read_text())
    assert tuned["base"]["loss"] == first["loss"]


@pytest.mark.parametrize("change", ["dtype", "weights", "data", "max_examples", "template", "version"])
def test_a_run_whose_base_figures_would_differ_measures_them(
    tiny_model_dir: Path, tmp_path: Path, data: Path, measured: Measured, monkeypatch: pytest.MonkeyPatch,
    change: str,
) -> None:
    model_dir = tiny_model_dir
    if change == "weights":  # the same folder, other weights in it
        model_dir = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    before: dict[str, dict[str, Any]] = {}
    if change == "data":  # validation files that differ in one record, not the sample prompt (the first)
        records = toy_chat_records(8)
        before["data"] = {"validation": [str(write_jsonl(tmp_path / "val.jsonl", records))]}
    first = run(model_dir, tmp_path, "first", data, **before)
    measured.take()
    after: dict[str, dict[str, Any]] = {}
    if change == "dtype":  # a CPU with native bfloat16: 'auto' loads the frozen base in bfloat16
        monkeypatch.setattr(precision, "detect_cpu_bf16", lambda: precision.CpuBf16(True, "test: native"))
        monkeypatch.setenv(precision.CPU_BF16_ENV, "1")
    elif change == "weights":
        weights = load_file(str(model_dir / "model.safetensors"))
        name = next(n for n in weights if n.endswith("q_proj.weight"))
        weights[name] = weights[name] + 0.05
        save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    elif change == "data":
        records[3]["messages"][1]["content"] = "a different answer"
        after["data"] = {"validation": [str(write_jsonl(tmp_path / "val.jsonl", records))]}
    elif change == "max_examples":
        after["eval"] = {"max_examples": 4}
    elif change == "version":  # another tunelab (or torch...) may compute other figures
        monkeypatch.setattr(before_after, "versions", lambda: {**versions(), "tunelab": "99.0"})
    else:
        after["data"] = {"chat_template": OTHER_TEMPLATE}
    second = run(model_dir, tmp_path, "second", data, **after)
    assert measured.take() == ["loss", "samples", "heldout"], f"a changed {change} reused the cached base figures"
    assert len(entries()) == 2
    if change not in ("dtype", "version"):  # the figures really differ (bf16 autocast of a tiny model may round alike)
        assert second["loss"] != first["loss"] or second["tokens"] != first["tokens"]


def test_a_damaged_cache_entry_is_ignored_and_rewritten(
    tiny_model_dir: Path, tmp_path: Path, data: Path, measured: Measured,
) -> None:
    first = run(tiny_model_dir, tmp_path, "first", data)
    measured.take()
    (entry,) = entries()
    entry.write_text('{"key": "truncat')
    assert run(tiny_model_dir, tmp_path, "second", data) == first
    assert measured.take() == ["loss", "samples", "heldout"]
    assert json.loads(entry.read_text())["figures"] == first, "the damaged entry was not rewritten"
    run(tiny_model_dir, tmp_path, "third", data)
    assert measured.take() == []


def test_a_random_new_head_is_never_cached(tiny_model_dir: Path, tmp_path: Path, measured: Measured) -> None:
    from support.labeled import toy_labeled

    labeled = write_jsonl(tmp_path / "labeled.jsonl", toy_labeled())
    sections: dict[str, Any] = {"objective": {"name": "classification"}, "data": {"packing": False},
                                "eval": {"num_samples": 0, "forgetting": False}}
    run(tiny_model_dir, tmp_path, "first", labeled, **sections)
    assert measured.take() == ["loss", "samples"]
    run(tiny_model_dir, tmp_path, "second", labeled, **sections)
    assert measured.take() == ["loss", "samples"], "a classifier's random head was scored from another run's cache"
    assert entries() == []
