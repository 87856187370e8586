"""The command line, in-process through typer's CliRunner: `config show` and `data inspect`, and exit code 2 with a
clear message for user errors."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import yaml
from support.cli import invoke
from support.tiny import toy_chat_records, write_jsonl

from tunelab.techniques import TECHNIQUES


@pytest.fixture
def tiny_config(tmp_path: Path, tiny_model_dir: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(f"model:\n  name: {tiny_model_dir}\ndata:\n  val_size: 0.1\n")
    return path


@pytest.fixture
def chat_file(tmp_path: Path) -> Path:
    records = toy_chat_records(30)
    return write_jsonl(tmp_path / "chat.jsonl", records + records[:2])  # two duplicates


# ---------------------------------------------------------------- config show


def test_config_show_prints_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    result = invoke("config", "show", path)
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    assert set(shown) == {"model", "data", "technique", "objective", "training", "eval", "output"}
    assert shown["technique"]["name"] == "lora"
    assert shown["training"]["learning_rate"] == TECHNIQUES["lora"].default_learning_rate  # resolved, not None
    assert shown["data"]["max_length"] == 1024 and shown["data"]["packing"] is True
    assert shown["output"]["dir"] == str(Path("runs") / "empty")


def test_config_show_applies_set(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  max_steps: 5\n")
    result = invoke("config", "show", path, "--set", "training.max_steps=9", "--set", "technique.name=full")
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    assert shown["training"]["max_steps"] == 9
    assert shown["technique"] == {"name": "full"}
    assert shown["training"]["learning_rate"] == TECHNIQUES["full"].default_learning_rate


def test_config_show_bad_config_exits_2_with_the_message(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("training:\n  lerning_rate: 0.1\n")
    result = invoke("config", "show", path)
    assert result.exit_code == 2
    assert "error:" in result.clean
    assert f"{path}:2" in result.clean
    assert "training.lerning_rate" in result.clean and "learning_rate" in result.clean
    assert "Traceback" not in result.clean


def test_config_show_refuses_python_tags(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / "evil.yaml"
    path.write_text(f'model: !!python/object/apply:os.system ["touch {marker}"]\n')
    result = invoke("config", "show", path)
    assert result.exit_code == 2
    assert "not plain YAML" in result.clean
    assert not marker.exists()


def test_config_show_bad_set_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("{}\n")
    result = invoke("config", "show", path, "--set", "training.nope=1")
    assert result.exit_code == 2
    assert "--set training.nope" in result.clean


def test_config_show_missing_file_exits_2(tmp_path: Path) -> None:
    result = invoke("config", "show", tmp_path / "missing.yaml")
    assert result.exit_code == 2 and "not found" in result.clean


# ---------------------------------------------------------------- data inspect


def test_data_inspect_prints_the_report(chat_file: Path, tiny_config: Path) -> None:
    result = invoke("data", "inspect", chat_file, "--config", tiny_config)
    assert result.exit_code == 0, result.output
    out = result.clean
    assert "Data report" in out
    assert "messages: 32" in out  # formats
    assert "duplicates removed" in out and re.search(r"duplicates removed\s*│\s*2\s", out)
    assert re.search(r"train tokens p50/p90/p99/max\s*│\s*\d+ / \d+ / \d+ / \d+", out)
    assert re.search(r"validation tokens p50/p90/p99/max\s*│\s*\d+ / \d+ / \d+ / \d+", out)
    assert "supervised share" in out and "truncation rate" in out
    assert re.search(rf"Example {re.escape(str(chat_file))}:\d+ ", out)  # the highlighted example names its source
    assert re.search(r"(\w+) \1 \1<\|im_end\|>", out)  # ... and shows its text


def test_data_inspect_json(chat_file: Path, tiny_config: Path) -> None:
    result = invoke("data", "inspect", chat_file, "--config", tiny_config, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for key in ("files", "formats", "records", "duplicates_removed", "overlap_removed", "dropped_overlong",
                "zero_supervised_examples", "train", "validation", "truncation_rate", "tokenizer_changes", "warnings",
                "example"):
        assert key in report, key
    assert report["formats"] == {"messages": 32}
    assert report["records"] == 32 and report["duplicates_removed"] == 2
    assert report["train"]["examples"] + report["validation"]["examples"] == 30
    assert report["validation"]["examples"] == 3
    assert {"p50", "p90", "p95", "p99", "max", "mean"} <= set(report["train"]["token_length"])
    assert 0 < report["train"]["supervised_share"] < 1
    assert report["files"] == [{"path": str(chat_file), "format": "messages", "records": 32, "role": "train"}]


def test_data_inspect_several_files_and_set(tmp_path: Path, tiny_config: Path) -> None:
    chats = write_jsonl(tmp_path / "a.jsonl", toy_chat_records(10))
    pairs = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"say {i}", "completion": f" {i} {i}"} for i in range(5)])
    result = invoke("data", "inspect", chats, pairs, "--config", tiny_config, "--set", "data.val_size=0", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["formats"] == {"messages": 10, "prompt_completion": 5}
    assert report["validation"]["examples"] == 0 and report["train"]["examples"] == 15


@pytest.mark.parametrize("where", ["--set", "--config"])
def test_data_inspect_follows_data_columns(tmp_path: Path, tiny_model_dir: Path, where: str) -> None:
    """The README's "check it first" step on data with its own column names: mapped with data.columns, the
    records are read as prompt/completion, in the report and in the highlighted example."""
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"what does cat {i} say?", "answer": f"meow {i}"}
                                             for i in range(8)])
    mapping = "{question: prompt, answer: completion}"
    config = tmp_path / "qa.yaml"
    config.write_text(f"model:\n  name: {tiny_model_dir}\n" + (f"data:\n  columns: {mapping}\n" if where == "--config" else ""))
    extra = ["--set", f"data.columns={mapping}"] if where == "--set" else []
    result = invoke("data", "inspect", qa, "--config", config, *extra, "--index", "3", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["formats"] == {"prompt_completion": 8}
    [example] = report["examples"]
    assert example["source"] == f"{qa}:4"
    supervised = "".join(s["text"] for s in example["segments"] if s["supervised"])
    assert "meow 3" in supervised and "cat 3" not in supervised


def test_data_inspect_malformed_file_exits_2_with_file_and_line(tmp_path: Path, tiny_config: Path) -> None:
    good = json.dumps(toy_chat_records(1)[0])
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n{good}\n{{\"messages\": [\n{good}\n")
    result = invoke("data", "inspect", path, "--config", tiny_config)
    assert result.exit_code == 2
    assert f"{path}:3" in result.clean and "not valid JSON" in result.clean
    assert "Traceback" not in result.clean


def test_data_inspect_wrong_shape_exits_2_with_line(tmp_path: Path, tiny_config: Path) -> None:
    records = toy_chat_records(5)
    records[3] = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]}
    path = write_jsonl(tmp_path / "bot.jsonl", records)
    result = invoke("data", "inspect", path, "--config", tiny_config)
    assert result.exit_code == 2
    assert f"{path}:4" in result.clean and "'bot'" in result.clean


def test_data_inspect_bad_config_exits_2(chat_file: Path, tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("data:\n  overlong: cut\n")
    result = invoke("data", "inspect", chat_file, "--config", config)
    assert result.exit_code == 2
    assert f"{config}:2" in result.clean and "data.overlong" in result.clean


def test_data_inspect_missing_model_dir_exits_2(chat_file: Path, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  name: ./no-such-model\n")
    result = invoke("data", "inspect", chat_file, "--config", config)
    assert result.exit_code == 2
    assert "does not exist" in result.clean


def test_data_inspect_json_stays_parseable_with_log_output(
    chat_file: Path, tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "model-without-pad"
    shutil.copytree(tiny_model_dir, model)
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    tokenizer_config.pop("pad_token", None)
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    config = tmp_path / "nopad.yaml"
    config.write_text(f"model:\n  name: {model}\n")
    # As in a real shell: no logging handler yet, so the CLI's own logging setup takes effect (pytest adds one).
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    result = invoke("data", "inspect", chat_file, "--config", config, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert any("pad_token" in change for change in report["tokenizer_changes"])


def test_config_show_set_path_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The README's own command: the config in examples/beginner/, the data file in the working directory.
    config = tmp_path / "examples" / "beginner" / "own.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("data:\n  train: ../data/chat.jsonl\n")
    monkeypatch.chdir(tmp_path)
    result = invoke("config", "show", "examples/beginner/own.yaml", "--set", "data.train=my_data.jsonl")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["data"]["train"] == [str(tmp_path / "my_data.jsonl")]


# ---------------------------------------------------------------- user text is never read as Rich markup

BRACKETS = "A tag [/INST] [red]x and d[key]"


def test_brackets_in_samples_print_as_they_are(capsys: pytest.CaptureFixture[str]) -> None:
    from tunelab.console import print_before_after

    metrics = {"loss": 2.0, "perplexity": 7.389}
    print_before_after({"base": metrics, "tuned": {"loss": 1.0, "perplexity": 2.718}, "samples": [
        {"source": "[b]val.jsonl:1", "prompt": f"user: {BRACKETS}", "reference": BRACKETS, "base": BRACKETS,
         "tuned": BRACKETS}]})
    out = capsys.readouterr().out
    assert out.count("[/INST]") == 4 and "d[key]" in out and "[b]val.jsonl:1" in out


def test_a_negative_loss_that_falls_is_shown_as_a_fall(capsys: pytest.CaptureFixture[str]) -> None:
    """An online objective's validation loss is minus its reward (negative): -0.6985 -> -0.7394 is a fall of 5.9%,
    printed -5.9% (green) and saved as relative_loss_change -0.0586; it was +5.9% in red, read as a worse model."""
    from tunelab.config import EvalConfig
    from tunelab.console import print_before_after
    from tunelab.eval.before_after import compare_with_base

    base, tuned = {"loss": -0.6985, "samples": []}, {"loss": -0.7394}
    comparison = compare_with_base(EvalConfig(), base, tuned, [], None, seed=0)
    assert comparison["relative_loss_change"] == pytest.approx(-0.0586)
    print_before_after(comparison)
    out = capsys.readouterr().out
    assert "-5.9%" in out and "+5.9%" not in out


def test_the_before_after_table_shows_the_objectives_own_figures(capsys: pytest.CaptureFixture[str]) -> None:
    """A pair objective's eval.json holds preference accuracy and reward margin beside the loss: the table shows them
    with their change (the confusion matrix's cells and the token count are not rows); a loss that rounds to zero
    prints without a minus sign (GRPO's -0.0)."""
    from tunelab.console import print_before_after

    base = {"loss": 0.693147, "tokens": 2, "reward_margin": 0.0, "preference_accuracy": 0.5, "confusion_0_1": 0.5}
    tuned = {"loss": -0.0, "tokens": 2, "reward_margin": 0.01931, "preference_accuracy": 1.0, "confusion_0_1": 0.5}
    print_before_after({"base": base, "tuned": tuned, "samples": []})
    out = capsys.readouterr().out
    assert re.search(r"preference_accuracy\s+│\s+0\.5000\s+│\s+1\.0000\s+│\s+\+0\.5000", out), out
    assert re.search(r"reward_margin\s+│\s+0\.0000\s+│\s+0\.0193\s+│\s+\+0\.0193", out), out
    assert "confusion" not in out and "tokens" not in out and "-0.0000" not in out


def test_brackets_in_a_data_error_print_as_they_are(tmp_path: Path, tiny_config: Path) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "[/INST]", "content": "x"}]}])
    result = invoke("data", "inspect", bad, "--config", tiny_config)
    assert result.exit_code == 2 and "[/INST]" in result.clean and "Traceback" not in result.clean


def test_inspect_marks_supervised_tokens_without_colour(chat_file: Path, tiny_config: Path) -> None:
    result = invoke("data", "inspect", chat_file, "--config", tiny_config)  # CliRunner: not a terminal
    assert result.exit_code == 0, result.output
    assert "⟦...⟧ = supervised tokens" in result.clean
    marked = re.findall(r"⟦(.*?)⟧", result.clean.split("supervised tokens, which take the loss")[1], re.S)
    assert marked and all(m.endswith("<|im_end|>") for m in marked), marked  # each answer with its end token


def test_the_cli_silences_rouge_scores_info_line() -> None:
    """rouge-score logs 'Using default tokenizer.' at INFO (through absl) for every scorer: eval and train's
    sample figures printed it among tunelab's own lines."""
    import logging

    from rouge_score import rouge_scorer  # noqa: F401 - absl's logger as rouge-score leaves it

    from tunelab import cli

    logging.getLogger("absl").setLevel(logging.NOTSET)  # whatever an earlier test set
    cli._setup_logging()
    assert logging.getLogger("absl").level == logging.WARNING


@pytest.mark.parametrize("records, holds", [
    ([{"text": f"the cat {i}", "labell": "cat"} for i in range(8)], "holds SFT records"),  # a misspelt label key
    ([{"prompt": f"say {i}", "chosen": f" {i}", "rejected": " no"} for i in range(8)], "holds preference pairs"),
    (toy_chat_records(8), "holds SFT records"),
])
def test_data_inspect_refuses_data_the_config_s_objective_cannot_train_on(
        tmp_path: Path, tiny_model_dir: Path, records: list[dict], holds: str) -> None:
    """With --config, inspect checks the records against the config's objective as `tunelab train` does, in its
    words, instead of printing a report of data the run would refuse (or blaming data.max_length)."""
    config = tmp_path / "classify.yaml"
    config.write_text(f"model:\n  name: {tiny_model_dir}\nobjective:\n  name: classification\ndata:\n  val_size: 0\n")
    path = write_jsonl(tmp_path / "data.jsonl", records)
    result = invoke("data", "inspect", path, "--config", config)
    assert result.exit_code == 2, result.output
    assert "objective.name=classification trains on labeled texts" in result.clean
    assert f"{path} {holds}" in result.clean and "Traceback" not in result.clean


def test_an_error_on_a_narrow_terminal_breaks_at_spaces_and_never_inside_a_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user error on a terminal is broken at spaces to its width (the terminal broke it mid-word at its edge),
    never inside a path, which keeps a line of its own when wider than the terminal; in a log (not a terminal)
    it stays one line as written, so a run's log quotes a path back whole."""
    import io

    from rich.console import Console

    from tunelab import cli

    missing = tmp_path / "a-folder-with-a-long-hyphenated-name" / "missing-config.yaml"
    printed = {}
    for terminal in (True, False):
        out = io.StringIO()
        monkeypatch.setattr(cli, "err_console", Console(file=out, width=40, force_terminal=terminal, markup=False,
                                                        color_system=None))
        assert invoke("config", "show", missing).exit_code == 2
        printed[terminal] = out.getvalue().rstrip("\n").split("\n")
    assert len(printed[False]) == 1 and printed[False][0].startswith("error: ")
    wrapped = printed[True]
    assert len(wrapped) >= 3, wrapped
    assert " ".join(wrapped).split(" ") == printed[False][0].split(" ")  # the same words: none broken, none lost
    assert f"{missing}:" in wrapped, wrapped  # the path, wider than the terminal, on a line of its own
    assert all(len(line) <= 40 or " " not in line for line in wrapped), wrapped
    assert "config file not found" in wrapped, wrapped  # words share a line up to the width


def test_the_resume_command_after_ctrl_c_is_never_broken_on_a_narrow_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """The error after Ctrl-C holds a command to copy: a line break inside it would run it cut short when pasted
    into a shell (without --resume), so it stays one line even on a terminal."""
    import io

    import typer
    from rich.console import Console

    from tunelab import cli

    out = io.StringIO()
    monkeypatch.setattr(cli, "err_console", Console(file=out, width=40, force_terminal=True, markup=False,
                                                    color_system=None))
    command = "tunelab train examples/beginner/quickstart-lora.yaml --resume --set=training.max_steps=20"

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(typer.Exit):
        cli._run_training(interrupted, resume_command=command)
    assert command in out.getvalue().split("\n")[0]
