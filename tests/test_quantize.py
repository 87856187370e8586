"""`tunelab quantize`: one row per method with measured figures, or the reason it was skipped; the unquantized
row reproduces the run's own validation loss, and smaller formats really are smaller. The table is a section of
the run's evaluation reports (HTML and Markdown), built from quantize.json, whichever of eval and quantize ran
first."""

from __future__ import annotations

import json
import re
import shutil
from html import escape as html_escape
from pathlib import Path

import pytest
from support.trained import adapter_runs
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.errors import ConfigError
from tunelab.eval.runner import EvalSettings, evaluate
from tunelab.export import quantize
from tunelab.export.quantize import METHODS, parse_methods, quantize_run
from tunelab.fs import foreign_entries

EVAL = EvalSettings(metrics=["exact_match"], max_new_tokens=2, max_examples=2, resamples=10)
BEFORE_QUANTIZE: dict[str, str] = {}  # the report of an evaluation made before `tunelab quantize`, as it was then


def _eval_data(run: Path) -> Path:
    return run.parents[1] / f"{run.name}.jsonl"  # the run's own training file (support/trained.py writes it there)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict:
    run = adapter_runs(tmp_path_factory, tiny_model_dir)["cats"]
    earlier = evaluate(run, [_eval_data(run)], output=run / "evals" / "before-quantize", settings=EVAL, device="cpu")
    BEFORE_QUANTIZE["html"] = (Path(earlier["output"]) / "report.html").read_text()
    return quantize_run(run, list(METHODS), samples=2, max_new_tokens=4, device="cpu")


def test_a_row_per_method_with_figures_or_a_reason(report: dict) -> None:
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["float32", *METHODS]
    for method in ("int8", "nf4", "fp4", "dynamic-int8"):
        row = rows[method]
        assert row["status"] == "ok", row
        assert all(row[k] is not None for k in ("size_mb", "memory_mb", "tokens_per_s", "val_loss", "loss_change", "same_answers"))
    for method in ("gptq", "awq"):  # this machine has no CUDA GPU
        assert rows[method]["status"] == "skipped" and "CUDA" in rows[method]["reason"]
        assert rows[method]["reason"].endswith("(int8, nf4, fp4, dynamic-int8 run here)")  # exactly those measured above
    assert rows["float32"]["loss_change"] == 0 and rows["float32"]["same_answers"] == 1
    assert rows["nf4"]["size_mb"] < rows["int8"]["size_mb"] < rows["float32"]["size_mb"]
    assert rows["nf4"]["memory_mb"] < rows["float32"]["memory_mb"]


def test_the_unquantized_row_reproduces_the_runs_validation_loss(report: dict) -> None:
    run = Path(report["run"])
    trained = json.loads((run / "eval.json").read_text())["tuned"]["loss"]
    assert report["rows"][0]["val_loss"] == pytest.approx(trained, abs=1e-4)  # the merge kept the adapter's effect
    base = json.loads((run / "eval.json").read_text())["base"]["loss"]
    assert abs(report["rows"][0]["val_loss"] - base) > 1e-2  # negative control: the base alone scores otherwise


def test_the_report_is_saved_in_the_run_folder(report: dict) -> None:
    run = Path(report["run"])
    assert json.loads((run / "quantize.json").read_text()) == report
    assert "quantize.json" not in foreign_entries(run)  # tunelab's own file: replaced with the run, never the user's


def test_the_skip_reason_names_only_methods_that_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    import torch

    from tunelab.export import quantize

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    reason = quantize.skip_reason("gptq", torch.device("cpu"))
    assert reason.endswith("this machine has none (dynamic-int8 runs here)")  # no bitsandbytes: no int8/nf4/fp4


def test_unknown_methods_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown.*'int3'"):
        parse_methods("int8,int3")
    assert parse_methods("nf4, int8,nf4") == ["nf4", "int8"]


def test_cli_prints_the_table(report: dict) -> None:
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["quantize", report["run"], "--methods", "dynamic-int8,gptq",
                                                            "--samples", "1", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert "dynamic-int8" in result.output and "gptq skipped: GPTQ needs a CUDA GPU" in result.output
    result = CliRunner().invoke(app, ["quantize", report["run"], "--methods", "int3"])
    assert result.exit_code == 2 and "unknown" in result.output


def _quantize_rows_in(html: str) -> dict[str, str]:
    """{method: its row's text} from the Quantization section of a report.html."""
    section = html.split("<h2 id='quantization'>Quantization</h2>", 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr><td>([^<]+)</td>(.*?)</tr>", section)
    return {method: re.sub(r"<[^>]+>", " ", cells) for method, cells in rows}


def _expect_table(html: str, run: Path) -> None:
    report = json.loads((run / "quantize.json").read_text())  # the latest measurement (the CLI test re-measures)
    rows = _quantize_rows_in(html)
    assert list(rows) == [r["method"] for r in report["rows"]]
    for row in report["rows"]:
        if row["status"] == "ok":  # the figures are quantize.json's, formatted
            assert f"{row['size_mb']:.1f}" in rows[row["method"]] and f"{row['val_loss']:.4f}" in rows[row["method"]]
        else:
            assert f"skipped: {html_escape(row['reason'])}" in rows[row["method"]]


def test_an_earlier_evaluations_report_gains_the_table(report: dict) -> None:
    assert "Quantization" not in BEFORE_QUANTIZE["html"]  # negative control: no table before quantize ran
    folder = Path(report["run"]) / "evals" / "before-quantize"
    _expect_table((folder / "report.html").read_text(), folder.parents[1])
    markdown = (folder / "report.md").read_text()
    assert "## Quantization" in markdown and "| gptq | skipped: GPTQ needs a CUDA GPU" in markdown
    assert "| dynamic-int8 | " in markdown
    assert "quantize" not in json.loads((folder / "eval.json").read_text())  # eval.json stays the evaluation's own


def test_a_later_evaluation_of_the_run_has_the_table(report: dict, tmp_path: Path) -> None:
    run = Path(report["run"])
    later = evaluate(run, [_eval_data(run)], output=tmp_path / "later", settings=EVAL, device="cpu")
    _expect_table((Path(later["output"]) / "report.html").read_text(), run)


# ---------------------------------------------------------------- --save METHOD (issue 19)


@pytest.fixture
def run_copy(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A copy of the trained run, so the module's report stays as the tests above read it."""
    return Path(shutil.copytree(adapter_runs(tmp_path_factory, tiny_model_dir)["cats"], tmp_path / "cats"))


def test_save_keeps_the_measured_model_loadable_by_plain_transformers(run_copy: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.generation import GenerationRequest, Sampling, encode, generate_batch

    measured: dict[str, object] = {}  # the in-memory quantized models the table measured
    fresh: dict[str, torch.Tensor] = {}  # logits of an untouched second copy quantized the same way
    load = quantize._load_bnb
    ids = torch.tensor([[1, 5, 9, 12, 20, 7]])

    def keeping(merged_dir: Path, method: str, device: object) -> object:
        with torch.no_grad():
            fresh[method] = load(merged_dir, method, device).eval()(ids).logits
        measured[method] = load(merged_dir, method, device)
        return measured[method]

    monkeypatch.setattr(quantize, "_load_bnb", keeping)
    report = quantize_run(run_copy, ["int8"], samples=2, max_new_tokens=4, device="cpu", save="nf4")
    folder = run_copy / "quantized-nf4"
    assert report["saved"] == str(folder) and "quantized-nf4" in json.loads((run_copy / ".tunelab.json").read_text())["entries"]
    figures = json.loads((folder / "quantization.json").read_text())
    assert figures["measured"] == next(r for r in report["rows"] if r["method"] == "nf4")
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"

    plain = AutoModelForCausalLM.from_pretrained(folder).eval()  # no tunelab, no quantization argument
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        reloaded, in_memory = plain(ids).logits, measured["nf4"](ids).logits
    # the measured model, and nf4 itself: a model saved after its first forward pass on an AVX512-BF16 CPU
    # (bitsandbytes' repacked weights, converted back on saving) would match neither, nor would the table's figures
    assert torch.equal(reloaded, in_memory) and torch.equal(reloaded, fresh["nf4"])
    sampling = Sampling(max_new_tokens=4, min_new_tokens=4)
    assert len(figures["greedy"]) == 2
    for row in figures["greedy"]:
        prompt = encode(tokenizer, row["prompt"], special=figures["special_tokens"])
        again = generate_batch(plain, tokenizer, [GenerationRequest(prompt, sampling)])[0].token_ids
        assert again == row["answer_ids"] and len(again) == 4
    # control: the float model answers the same prompt with other logits, so the equality above means something
    with torch.no_grad():
        assert not torch.equal(measured["int8"](ids).logits, reloaded)


@pytest.mark.parametrize("method,message", [("dynamic-int8", "no saved form that transformers reads"),
                                            ("gptq", "cannot run here: GPTQ needs a CUDA GPU"),
                                            ("q4", "unknown method")])
def test_save_refuses_what_it_cannot_write_before_any_work(run_copy: Path, monkeypatch: pytest.MonkeyPatch,
                                                           method: str, message: str) -> None:
    monkeypatch.setattr(quantize, "merged_float", lambda *a: pytest.fail("merged before the refusal"))
    with pytest.raises(ConfigError, match=message):
        quantize_run(run_copy, ["int8"], device="cpu", save=method)


def test_save_leaves_a_folder_of_the_user_alone(run_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (run_copy / "quantized-int8").mkdir()
    (run_copy / "quantized-int8" / "notes.txt").write_text("mine")
    monkeypatch.setattr(quantize, "merged_float", lambda *a: pytest.fail("merged before the refusal"))
    with pytest.raises(ConfigError, match="not created by tunelab"):
        quantize_run(run_copy, ["int8"], device="cpu", save="int8")
    assert (run_copy / "quantized-int8" / "notes.txt").read_text() == "mine"


def test_runs_quantize_cannot_measure_are_refused_before_any_work(tiny_model_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """quantize scores each method by the validation loss of SFT records and by greedy answers: a DPO run (pairs)
    is refused with what it can do instead, and a reward model (a score head: no answers) with what it is, before
    any merge; both ended in AttributeError: 'TokenizedPair' object has no attribute 'labels'. `tunelab export`
    refuses the reward model too (it said: no GGUF name for the tensor score.weight)."""
    from support.preference import toy_pair_texts
    from support.runs import tiny_run_config
    from support.tiny import write_jsonl

    from tunelab.export.gguf import export_gguf
    from tunelab.training import train

    monkeypatch.setattr(quantize, "merged_float", lambda *a: pytest.fail("merged before refusing"))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "chosen": c, "rejected": r}
                                                    for p, c, r in toy_pair_texts(0, 16)])
    runs = {name: train(tiny_run_config(tiny_model_dir, tmp_path / name, pairs, objective={"name": name},
                                        training={"max_steps": 1, "grad_accum": 1},
                                        eval={"before_after": False, "num_samples": 0, "forgetting": False}),
                        progress=False).run_dir for name in ("dpo", "reward")}
    with pytest.raises(ConfigError, match=r"objective 'dpo'\) trained on preference pairs .* not supported yet.*"
                                          r"tunelab merge"):
        quantize_run(runs["dpo"], ["int8"], device="cpu")
    for refused in (lambda: quantize_run(runs["reward"], ["int8"], device="cpu"), lambda: export_gguf(runs["reward"])):
        with pytest.raises(ConfigError, match=r"trained with objective 'reward': its score head scores a text"):
            refused()
