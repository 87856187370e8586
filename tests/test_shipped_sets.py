"""The shipped preference and classification sets: rebuilt byte for byte by their script from the standard
library's docstrings (nobody wrote them), readable by tunelab's data layer, with held-out splits that do not leak."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from tunelab.config import DataConfig
from tunelab.data import prepare_data

ROOT = Path(__file__).parents[1]
ASSETS = ROOT / "src" / "tunelab" / "assets"
SETS = ("pydoc_preference", "pydoc_kind")


def test_the_script_rebuilds_the_shipped_files(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_pydoc_sets.py"), "--out-dir", str(tmp_path)],
                   check=True, capture_output=True)
    for name in SETS:
        for split in ("train", "heldout"):
            assert (tmp_path / name / f"{split}.jsonl").read_bytes() == (ASSETS / name / f"{split}.jsonl").read_bytes()


@pytest.mark.parametrize("name", SETS)
def test_each_set_has_a_readme_and_a_licence(name: str) -> None:
    assert "PSF License" in (ASSETS / name / "LICENSE.md").read_text()
    assert "scripts/build_pydoc_sets.py" in (ASSETS / name / "README.md").read_text()


def test_preference_set_loads_as_pairs_without_identical_sides(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    folder = ASSETS / "pydoc_preference"
    data = prepare_data(DataConfig(train=[str(folder / "train.jsonl")], validation=[str(folder / "heldout.jsonl")],
                                   max_length=256), tiny_tokenizer)
    pairs = data.report["pairs"]
    assert data.records == "preference" and (len(data.train), len(data.validation)) == (464, 115)
    assert pairs["chosen_equals_rejected"] == 0 and pairs["empty_sides"] == {"prompt": 0, "chosen": 0, "rejected": 0}
    assert data.report["overlap_removed"] == 0


def test_kind_set_is_balanced_and_its_heldout_texts_are_unseen(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    folder = ASSETS / "pydoc_kind"
    data = prepare_data(DataConfig(train=[str(folder / "train.jsonl")], validation=[str(folder / "heldout.jsonl")]),
                        tiny_tokenizer)
    assert data.classes == ["class", "function", "method"]
    totals = [data.report["classes"]["train"][c]["count"] + data.report["classes"]["validation"][c]["count"]
              for c in data.classes]
    assert totals == [160, 160, 160]
    assert data.report["overlap_removed"] == 0 and data.report["duplicates_removed"] == 0
