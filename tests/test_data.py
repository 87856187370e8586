"""Data: the four formats and four file types, errors with file:line, label masking, length policies, dedup and
split, the tokenized cache and the data report."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
from support.tiny import toy_chat_records, write_jsonl
from transformers import PreTrainedTokenizerFast

from tunelab.config import DataConfig
from tunelab.data import IGNORE, DataError, Example, collate, load_file, prepare_data, prepare_tokenizer, tokenize_example
from tunelab.data.report import mask_segments, percentiles
from tunelab.data.tokenize import FALLBACK_CHAT_TEMPLATE, apply_length_policy, pad_token_id, render_chat

END = "<|im_end|>"  # the tiny tokenizer's EOS and ChatML end-of-turn token

CHAT = {"messages": [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "what is the capital of france?"},
    {"role": "assistant", "content": "the capital of france is paris."},
]}
MULTI_TURN = {"messages": [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "what is the capital of france?"},
    {"role": "assistant", "content": "paris."},
    {"role": "user", "content": "count from one to five"},
    {"role": "assistant", "content": "one two three four five"},
]}
ALPACA = {"instruction": "count from one to five", "input": "", "output": "one two three four five"}
ALPACA_INPUT = {"instruction": "what is json.dumps?", "input": "python", "output": "it serialises an object", "system": "be brief"}
PROMPT_COMPLETION = {"prompt": "what is the capital of france?", "completion": " paris."}
TEXT = {"text": "the quick brown fox jumps over the lazy dog"}


def supervised_text(tokenizer: PreTrainedTokenizerFast, example) -> str:  # noqa: ANN001 - TokenizedExample
    return tokenizer.decode([label for label in example.labels if label != IGNORE])


def supervised_segments(tokenizer: PreTrainedTokenizerFast, example) -> list[str]:  # noqa: ANN001
    return [s["text"] for s in mask_segments(tokenizer, example) if s["supervised"]]


def tokenize_record(tokenizer: PreTrainedTokenizerFast, tmp_path: Path, record: dict, **kwargs):  # noqa: ANN201
    loaded = load_file(write_jsonl(tmp_path / "one.jsonl", [record]))
    return tokenize_example(tokenizer, loaded.examples[0], **kwargs)


def jsonl_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def data_error(path: Path, fmt: str = "auto") -> str:
    with pytest.raises(DataError) as info:
        load_file(path, fmt)
    return str(info.value)


# ---------------------------------------------------------------- formats and file types


@pytest.mark.parametrize(
    ("record", "fmt", "expected"),
    [
        (CHAT, "messages", Example("messages", "", messages=(
            ("system", "be brief"), ("user", "what is the capital of france?"),
            ("assistant", "the capital of france is paris.")))),
        (ALPACA, "alpaca", Example("alpaca", "", messages=(("user", ALPACA["instruction"]), ("assistant", ALPACA["output"])))),
        (ALPACA_INPUT, "alpaca", Example("alpaca", "", messages=(
            ("system", "be brief"), ("user", "what is json.dumps?\n\npython"), ("assistant", "it serialises an object")))),
        (PROMPT_COMPLETION, "prompt_completion", Example("prompt_completion", "", prompt=PROMPT_COMPLETION["prompt"],
                                                         completion=PROMPT_COMPLETION["completion"])),
        (TEXT, "text", Example("text", "", completion=TEXT["text"])),
    ],
    ids=["messages", "alpaca", "alpaca-input-system", "prompt_completion", "text"],
)
def test_each_format_parses_from_jsonl(tmp_path: Path, record: dict, fmt: str, expected: Example) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [record, record])
    for requested in ("auto", fmt):
        loaded = load_file(path, requested)
        assert loaded.format == fmt
        assert [e.source for e in loaded.examples] == [f"{path}:1", f"{path}:2"]
        got = loaded.examples[0]
        assert (got.format, got.messages, got.prompt, got.completion) == (
            expected.format, expected.messages, expected.prompt, expected.completion)


def test_json_array_file(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps([ALPACA, ALPACA_INPUT], indent=2))
    loaded = load_file(path)
    assert loaded.format == "alpaca" and len(loaded.examples) == 2
    assert loaded.examples[1].messages[1] == ("user", "what is json.dumps?\n\npython")
    assert loaded.examples[1].source == f"{path}: record 2"


def test_json_array_bad_record_is_named(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps([ALPACA, ALPACA, {"foo": "bar"}]))
    message = data_error(path)
    assert f"{path}: record 3" in message and "The alpaca format expects {\"instruction\": str" in message


def test_csv_file(tmp_path: Path) -> None:
    import pandas as pd

    path = tmp_path / "data.csv"
    pd.DataFrame({
        "prompt": ["1 + 1 =", "what does\nf() return?", "2 + 2 ="],  # a quoted cell over two lines
        "completion": ["2", "None", "4"],  # CSV has no types: these are text, not a number or a null
    }).to_csv(path, index=False)
    loaded = load_file(path)
    assert loaded.format == "prompt_completion"
    assert [(e.prompt, e.completion) for e in loaded.examples] == [
        ("1 + 1 =", "2"), ("what does\nf() return?", "None"), ("2 + 2 =", "4")]
    assert [e.source for e in loaded.examples] == [f"{path}:2", f"{path}:3", f"{path}:5"]  # the line each row starts on


def test_csv_alpaca_with_empty_optional_cell(tmp_path: Path) -> None:
    path = tmp_path / "alpaca.csv"
    path.write_text("instruction,input,output\ncount from one to five,,one two three four five\nsay hi,python,hello\n")
    loaded = load_file(path)
    assert loaded.format == "alpaca"
    assert loaded.examples[0].messages == (("user", "count from one to five"), ("assistant", "one two three four five"))
    assert loaded.examples[1].messages[0] == ("user", "say hi\n\npython")


def test_parquet_files(tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    chats = tmp_path / "chats.parquet"
    datasets.Dataset.from_list([CHAT, MULTI_TURN]).to_parquet(str(chats))
    loaded = load_file(chats)
    assert loaded.format == "messages"
    assert loaded.examples[1].messages[-1] == ("assistant", "one two three four five")
    assert loaded.examples[1].source == f"{chats}: record 2"

    pairs = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "completion": [" x", " y"]}), pairs)
    assert [(e.prompt, e.completion) for e in load_file(pairs).examples] == [("a", " x"), ("b", " y")]


def test_reading_files_never_touches_the_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    (tmp_path / "a.csv").write_text("prompt,completion\na,b\n")
    for path in (write_jsonl(tmp_path / "a.jsonl", [CHAT]), tmp_path / "a.csv"):
        assert len(load_file(path).examples) == 1
    assert attempts == []


def test_unsupported_and_missing_files(tmp_path: Path) -> None:
    assert "unsupported file type '.txt'" in data_error(tmp_path / "data.txt")
    assert "not found" in data_error(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no records|could not be read"):
        load_file(empty)


def test_a_directory_or_an_empty_path_is_named(tiny_tokenizer, tmp_path: Path) -> None:
    folder = tmp_path / "data.jsonl"  # a folder with a data file's name is not "not found" either
    folder.mkdir()
    for path in (tmp_path, folder):
        assert data_error(path) == f"{path}: is a directory: give a data file (.jsonl, .json, .csv or .parquet)"
    with pytest.raises(DataError, match="path is empty: give a data file"):
        load_file("")
    with pytest.raises(DataError, match=f"{folder}: is a directory"):  # a config's data.train naming a folder
        prepare_data(DataConfig(train=[str(folder)], cache=False), tiny_tokenizer)


@pytest.mark.parametrize(
    ("name", "content", "line"),
    [
        ("read.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', 2),  # datasets reads it; the line count did not
        ("broken.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n{"text": 5\n', 2),  # datasets fails: the diagnosis
        ("array.json", b'[\n{"text": "ok"},\n{"text": "caf\xe9"}\n]\n', 3),
        ("header.csv", b"prompt,caf\xe9\na,b\n", 1),
        ("row.csv", b"prompt,completion\na,b\nc,caf\xe9\n", 3),
    ],
    ids=["jsonl-read", "jsonl-diagnosed", "json-array", "csv-header", "csv-row"],
)
def test_non_utf8_file_names_the_line(tmp_path: Path, name: str, content: bytes, line: int) -> None:
    path = tmp_path / name
    path.write_bytes(content)  # "café" in Latin-1
    message = data_error(path)
    assert message.startswith(f"{path}:{line}: not UTF-8 text") and "the file must be UTF-8" in message


def test_csv_row_with_an_extra_column_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "extra.csv"
    path.write_text('prompt,completion\n"a\nmulti-line cell",b\n\nc,d, e\nf,g\n')
    message = data_error(path)
    assert message.startswith(f"{path}:5: 3 columns, but the header has 2")


def test_header_only_csv_has_no_records_like_an_empty_jsonl(tmp_path: Path) -> None:
    header_only = tmp_path / "header.csv"
    header_only.write_text("prompt,completion\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert data_error(header_only) == f"{header_only}: no records"
    assert data_error(empty) == f"{empty}: no records"


# ---------------------------------------------------------------- errors name the file and line


GOOD = json.dumps(CHAT)


def test_invalid_json_line_is_named(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = jsonl_lines(tmp_path / "bad.jsonl", [GOOD, GOOD, '{"messages": [', GOOD])
    message = data_error(path)
    assert f"{path}:3" in message and "not valid JSON" in message
    out, err = capfd.readouterr()
    assert "Failed to load JSON" not in out + err  # the one clear message, not datasets' Arrow error log besides it


def test_invalid_json_line_gives_the_parser_reason_once(tmp_path: Path) -> None:
    path = jsonl_lines(tmp_path / "bad.jsonl", [GOOD, '{"messages": "no closing quote'])
    # with its newline still on, the line read as "Invalid control character at at column 30"
    assert data_error(path) == f"{path}:2: not valid JSON (Unterminated string starting at column 14)"
    array = tmp_path / "bad.json"
    array.write_text('[\n{"text": "no closing quote\n]')
    assert data_error(array) == f"{array}:2: not valid JSON (Invalid control character at column 27)"


def test_non_object_line_is_named(tmp_path: Path) -> None:
    path = jsonl_lines(tmp_path / "bad.jsonl", [GOOD, GOOD, "[1, 2]", GOOD])
    assert f"{path}:3" in data_error(path)


def test_wrong_role_in_the_middle_is_named(tmp_path: Path) -> None:
    bot = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]})
    path = jsonl_lines(tmp_path / "bad.jsonl", [GOOD, GOOD, GOOD, bot, GOOD])
    message = data_error(path)
    assert f"{path}:4" in message
    assert "'bot'" in message and "system, user, assistant" in message


def test_a_record_missing_keys_is_told_its_files_format_and_line_not_every_shape(tmp_path: Path) -> None:
    """A record lacking the keys of its file's format (detected from the first record, or configured) is told that
    format, how it was chosen, what it lacks and that format's shape, at its line. Every format's shape, listed
    before, buried the one that applied; it is listed only when the format cannot be told."""
    path = jsonl_lines(tmp_path / "bad.jsonl", [GOOD, GOOD, GOOD, json.dumps({"question": "hi", "answer": "yo"}), GOOD])
    message = data_error(path)
    assert message.startswith(f"{path}:4: record does not match the 'messages' format of this file (detected from "
                              "its first record; it lacks 'messages'; its keys: answer, question). The messages "
                              "format expects {\"messages\": [{\"role\"")
    for other in ('"instruction"', '"completion"', '"chosen"', "alpaca:", "preference:"):
        assert other not in message
    configured = data_error(path, "prompt_completion")
    assert configured.startswith(f"{path}:1: record does not match the 'prompt_completion' format of this file "
                                 "(configured; it lacks 'prompt', 'completion'; its keys: messages). The "
                                 "prompt_completion format expects {\"prompt\": str, \"completion\": str}")
    assert '"instruction"' not in configured
    unknown = data_error(jsonl_lines(tmp_path / "unknown.jsonl", [json.dumps({"question": "hi"})]))
    assert "cannot tell the format" in unknown and "Expected shapes: messages:" in unknown
    for shape in ('"instruction"', '"prompt"', '"completion"', '"text"', '"chosen"'):
        assert shape in unknown


def test_line_numbers_count_blank_lines(tmp_path: Path) -> None:
    path = jsonl_lines(tmp_path / "blank.jsonl", [GOOD, "", "   ", json.dumps({"messages": "oops"})])
    assert f"{path}:4" in data_error(path)


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]}, "content is int"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"},
                       {"role": "assistant", "content": "y"}]}, "only the first message"),
        ({"messages": []}, "non-empty list"),
    ],
    ids=["no-assistant", "int-content", "late-system", "empty"],
)
def test_bad_chat_records(tmp_path: Path, bad: dict, expected: str) -> None:
    path = jsonl_lines(tmp_path / "bad.jsonl", [GOOD, json.dumps(bad)])
    message = data_error(path, "messages")
    assert f"{path}:2" in message and expected in message


def test_wrong_value_type_names_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pc.jsonl", [PROMPT_COMPLETION, PROMPT_COMPLETION, {"prompt": "a", "completion": 4}])
    message = data_error(path)
    assert f"{path}:3" in message and "'completion'" in message and "expects a string" in message


def test_auto_detect_mismatch_names_the_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mixed.jsonl", [CHAT, CHAT, PROMPT_COMPLETION])
    message = data_error(path)
    assert f"{path}:3" in message and "'messages' format" in message


def test_explicit_format_mismatch(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT])
    message = data_error(path, "alpaca")
    assert f"{path}:1" in message and "'alpaca' format" in message


def test_undetectable_first_record(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "a", "answer": "b"}])
    message = data_error(path)
    assert f"{path}:1" in message and "cannot tell the format" in message


# ---------------------------------------------------------------- masking


def test_supervised_tokens_are_the_assistant_turn_plus_end_token(tiny_tokenizer, tmp_path: Path) -> None:
    example = tokenize_record(tiny_tokenizer, tmp_path, CHAT)
    assert supervised_text(tiny_tokenizer, example) == "the capital of france is paris." + END
    assert example.labels[-2] == tiny_tokenizer.eos_token_id  # the final "\n" after the end token takes no loss
    assert example.labels[-1] == IGNORE
    assert all(label in (IGNORE, token) for label, token in zip(example.labels, example.input_ids))
    assert tiny_tokenizer.decode(example.input_ids) == render_chat(
        tiny_tokenizer, tuple((m["role"], m["content"]) for m in CHAT["messages"]), add_generation_prompt=False)


def test_multi_turn_supervises_every_assistant_turn_and_nothing_else(tiny_tokenizer, tmp_path: Path) -> None:
    example = tokenize_record(tiny_tokenizer, tmp_path, MULTI_TURN)
    assert supervised_segments(tiny_tokenizer, example) == ["paris." + END, "one two three four five" + END]
    unsupervised = "".join(s["text"] for s in mask_segments(tiny_tokenizer, example) if not s["supervised"])
    for message in MULTI_TURN["messages"]:
        if message["role"] != "assistant":
            assert message["content"] in unsupervised
    assert "<|im_start|>assistant\n" in unsupervised  # the role header is given, not learned


def test_an_assistant_turn_with_weight_0_is_context_only(tiny_tokenizer, tmp_path: Path) -> None:
    record = copy.deepcopy(MULTI_TURN)
    first_answer = next(m for m in record["messages"] if m["role"] == "assistant")
    first_answer["weight"] = 0  # OpenAI's fine-tuning format: keep the turn as context, take no loss on it
    example = tokenize_record(tiny_tokenizer, tmp_path, record)
    assert supervised_segments(tiny_tokenizer, example) == ["one two three four five" + END]
    first_answer["weight"] = 1  # control: weight 1 is the default
    assert len(supervised_segments(tiny_tokenizer, tokenize_record(tiny_tokenizer, tmp_path, record))) == 2


@pytest.mark.parametrize("message, expected", [
    ({"role": "user", "content": "hi", "weight": 0}, "only for assistant messages"),
    ({"role": "assistant", "content": "hi", "weight": 0.5}, "expected 0 .* or 1"),
])
def test_a_bad_weight_names_the_message(tmp_path: Path, message: dict, expected: str) -> None:
    record = {"messages": [message, {"role": "assistant", "content": "ok"}] if message["role"] == "user"
              else [{"role": "user", "content": "q"}, message]}
    path = write_jsonl(tmp_path / "w.jsonl", [record])
    error = data_error(path)
    assert f"{path}:1" in error and re.search(expected, error), error


def test_train_on_prompt_supervises_everything(tiny_tokenizer, tmp_path: Path) -> None:
    example = tokenize_record(tiny_tokenizer, tmp_path, MULTI_TURN, train_on_prompt=True)
    rendered = tiny_tokenizer.decode(example.input_ids[1:])  # but the first token: no position predicts it
    assert example.labels[0] == IGNORE
    assert supervised_text(tiny_tokenizer, example) == rendered.rstrip()
    default = tokenize_record(tiny_tokenizer, tmp_path, MULTI_TURN)
    assert example.num_supervised > default.num_supervised


def test_end_token_supervised_when_pad_is_eos(tiny_tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert prepare_tokenizer(tokenizer, None, needs_chat=True) == []  # nothing to change
    example = tokenize_record(tokenizer, tmp_path, MULTI_TURN)
    assert supervised_segments(tokenizer, example) == ["paris." + END, "one two three four five" + END]
    batch = collate([[example]], pad_id=tokenizer.pad_token_id)
    targets = batch["targets"][0].tolist()
    assert targets.count(tokenizer.eos_token_id) == 2  # the pad id is a real target, once per assistant turn


def test_the_pad_id_rule_is_pad_then_eos_then_0(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = "<|im_start|>"
    assert pad_token_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_start|>") != tokenizer.eos_token_id
    tokenizer.pad_token = None
    assert pad_token_id(tokenizer) == tokenizer.eos_token_id is not None  # what prepare_tokenizer would set
    tokenizer.eos_token = None
    assert pad_token_id(tokenizer) == 0


def test_tokenizer_without_chat_template_gets_the_fallback(tiny_tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = None
    tokenizer.eos_token = "<|endoftext|>"  # a base-model tokenizer: no template, EOS is the document end token
    tokenizer.pad_token = None
    changes = prepare_tokenizer(tokenizer, None, needs_chat=True)
    assert tokenizer.chat_template == FALLBACK_CHAT_TEMPLATE
    assert tokenizer.pad_token == "<|endoftext|>"
    assert len(changes) == 2
    assert any("pad_token" in change for change in changes)
    assert any("chat template" in change and "fallback" in change for change in changes)
    example = tokenize_record(tokenizer, tmp_path, MULTI_TURN)
    assert supervised_segments(tokenizer, example) == ["paris.<|endoftext|>", "one two three four five<|endoftext|>"]


def test_plain_text_data_keeps_the_tokenizer_without_template(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = None
    assert prepare_tokenizer(tokenizer, None, needs_chat=False) == []
    assert tokenizer.chat_template is None


def test_config_chat_template_replaces_and_is_reported(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    tokenizer = copy.deepcopy(tiny_tokenizer)
    changes = prepare_tokenizer(tokenizer, FALLBACK_CHAT_TEMPLATE, needs_chat=True)
    assert tokenizer.chat_template == FALLBACK_CHAT_TEMPLATE and len(changes) == 1 and "data.chat_template" in changes[0]


def test_tokenizer_changes_reach_the_report(tiny_tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = None
    tokenizer.chat_template = None
    path = write_jsonl(tmp_path / "toy.jsonl", toy_chat_records(12))
    report = prepare_data(DataConfig(train=[str(path)], cache=False), tokenizer).report
    assert len(report["tokenizer_changes"]) == 2
    assert tokenizer.pad_token is not None


def test_prompt_completion_supervises_completion_and_eos(tiny_tokenizer, tmp_path: Path) -> None:
    example = tokenize_record(tiny_tokenizer, tmp_path, PROMPT_COMPLETION)
    assert supervised_text(tiny_tokenizer, example) == PROMPT_COMPLETION["completion"] + END
    assert tiny_tokenizer.decode(example.input_ids) == PROMPT_COMPLETION["prompt"] + PROMPT_COMPLETION["completion"] + END
    assert example.labels[-1] == tiny_tokenizer.eos_token_id
    with_prompt = tokenize_record(tiny_tokenizer, tmp_path, PROMPT_COMPLETION, train_on_prompt=True)
    assert supervised_text(tiny_tokenizer, with_prompt) == tiny_tokenizer.decode(with_prompt.input_ids[1:])
    assert supervised_text(tiny_tokenizer, with_prompt).endswith(PROMPT_COMPLETION["completion"] + END)


def test_text_supervises_all_of_it_but_the_first_token(tiny_tokenizer, tmp_path: Path) -> None:
    example = tokenize_record(tiny_tokenizer, tmp_path, TEXT)
    # No position predicts the first token, so it takes no loss and is not counted as supervised.
    assert example.labels[0] == IGNORE
    assert supervised_text(tiny_tokenizer, example) == tiny_tokenizer.decode(example.input_ids[1:])
    assert supervised_text(tiny_tokenizer, example).endswith(END)
    assert example.num_supervised == len(example.input_ids) - 1
    targets = collate([[example]], pad_id=0)["targets"]
    assert example.num_supervised == int((targets != IGNORE).sum())  # what the report counts is what trains


def test_report_counts_the_tokens_that_take_a_loss(tiny_tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": f"the quick brown fox {i}"} for i in range(6)])
    data = prepare_data(DataConfig(train=[str(path)], val_size=0, cache=False), tiny_tokenizer)
    trained = sum(int((collate([[e]], pad_id=0)["targets"] != IGNORE).sum()) for e in data.train)
    assert data.report["train"]["supervised_tokens"] == trained


def _eos_appending(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """The tokenizer with a post-processor that appends EOS itself, as Llama-style add_eos_token tokenizers do."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = copy.deepcopy(tokenizer)
    eos = (tokenizer.eos_token, tokenizer.eos_token_id)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single=f"$A {eos[0]}", pair=f"$A $B {eos[0]}",
                                                                    special_tokens=[eos])
    assert tokenizer("a b")["input_ids"][-1] == tokenizer.eos_token_id
    return tokenizer


@pytest.mark.parametrize("record", [PROMPT_COMPLETION, TEXT], ids=["prompt_completion", "text"])
def test_eos_is_supervised_when_the_tokenizer_appends_it(tiny_tokenizer, tmp_path: Path, record: dict) -> None:
    tokenizer = _eos_appending(tiny_tokenizer)
    example = tokenize_record(tokenizer, tmp_path, record)
    assert example.input_ids[-1] == tokenizer.eos_token_id and example.input_ids.count(tokenizer.eos_token_id) == 1
    assert example.labels[-1] == tokenizer.eos_token_id, "the model must learn to stop"
    assert supervised_text(tokenizer, example).endswith(END)


def test_alpaca_supervises_only_the_output(tiny_tokenizer, tmp_path: Path) -> None:
    example = tokenize_record(tiny_tokenizer, tmp_path, ALPACA_INPUT)
    assert supervised_text(tiny_tokenizer, example) == ALPACA_INPUT["output"] + END


# ---------------------------------------------------------------- length policies


LONG_ANSWER = {"messages": [{"role": "user", "content": "count"}, {"role": "assistant", "content": "one two three four five " * 8}]}
LONG_PROMPT = {"messages": [{"role": "user", "content": "one two three four five " * 8}, {"role": "assistant", "content": "five"}]}


def _overlong_file(tmp_path: Path) -> Path:
    records = toy_chat_records(8)
    records[3] = LONG_ANSWER  # line 4
    return write_jsonl(tmp_path / "overlong.jsonl", records)


def test_overlong_truncate(tiny_tokenizer, tmp_path: Path) -> None:
    path = _overlong_file(tmp_path)
    data = prepare_data(DataConfig(train=[str(path)], val_size=0, max_length=40, overlong="truncate", cache=False), tiny_tokenizer)
    assert len(data.train) == 8
    assert max(len(e.input_ids) for e in data.train) == 40
    (cut,) = [e for e in data.train if e.truncated]
    assert cut.source == f"{path}:4" and len(cut.input_ids) == len(cut.labels) == 40
    assert data.report["train"]["truncated"] == 1
    assert data.report["truncation_rate"] == pytest.approx(1 / 8, abs=1e-4)
    assert data.report["missing_end_of_turn_supervision"] == 0  # truncated examples are not linted


def test_overlong_drop(tiny_tokenizer, tmp_path: Path) -> None:
    path = _overlong_file(tmp_path)
    data = prepare_data(DataConfig(train=[str(path)], val_size=0, max_length=40, overlong="drop", cache=False), tiny_tokenizer)
    assert len(data.train) == 7
    assert f"{path}:4" not in {e.source for e in data.train}
    assert data.report["dropped_overlong"] == 1


def test_overlong_error_names_the_line(tiny_tokenizer, tmp_path: Path) -> None:
    path = _overlong_file(tmp_path)
    with pytest.raises(DataError) as info:
        prepare_data(DataConfig(train=[str(path)], val_size=0, max_length=40, overlong="error", cache=False), tiny_tokenizer)
    assert f"{path}:4" in str(info.value) and "max_length=40" in str(info.value)


def test_apply_length_policy_keeps_short_examples(tiny_tokenizer, tmp_path: Path) -> None:
    example = tokenize_record(tiny_tokenizer, tmp_path, CHAT)
    for policy in ("truncate", "drop", "error"):
        assert apply_length_policy(example, len(example.input_ids), policy) is example
    assert apply_length_policy(example, len(example.input_ids) - 1, "drop") is None


def test_truncated_prompt_leaves_zero_supervised_example_out(tiny_tokenizer, tmp_path: Path) -> None:
    records = toy_chat_records(6)
    records[2] = LONG_PROMPT  # line 3: after truncation only the prompt is left
    path = write_jsonl(tmp_path / "zero.jsonl", records)
    data = prepare_data(DataConfig(train=[str(path)], val_size=0, max_length=30, cache=False), tiny_tokenizer)
    assert data.report["zero_supervised_examples"] == 1
    assert data.report["zero_supervised_sources"] == [f"{path}:3"]
    assert len(data.train) == 5 and all(e.num_supervised > 0 for e in data.train)
    assert any("no supervised token" in w and w.endswith(f"{path}:3") for w in data.report["warnings"])


# ---------------------------------------------------------------- dedup, split, validation file


def test_dedup_and_overlap_counts(tiny_tokenizer, tmp_path: Path) -> None:
    records = toy_chat_records(10)
    train = write_jsonl(tmp_path / "train.jsonl", records + [records[0], records[1], records[1]])  # 3 duplicates
    val = write_jsonl(tmp_path / "val.jsonl", [records[4], records[4], {"messages": [
        {"role": "user", "content": "only in validation"}, {"role": "assistant", "content": "yes"}]}])
    data = prepare_data(DataConfig(train=[str(train)], validation=[str(val)], cache=False), tiny_tokenizer)
    report = data.report
    assert report["records"] == 16
    assert report["duplicates_removed"] == 4  # 3 in train, 1 in validation
    assert report["overlap_removed"] == 1  # records[4] is in both
    assert len(data.train) == 9 and len(data.validation) == 2
    assert f"{train}:5" not in {e.source for e in data.train}


def test_dedup_off_keeps_everything(tiny_tokenizer, tmp_path: Path) -> None:
    records = toy_chat_records(6)
    train = write_jsonl(tmp_path / "train.jsonl", records + records[:2])
    data = prepare_data(DataConfig(train=[str(train)], val_size=0, dedup=False, cache=False), tiny_tokenizer)
    assert len(data.train) == 8 and data.report["duplicates_removed"] == 0


def test_seeded_split_is_deterministic(tiny_tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "toy.jsonl", toy_chat_records(40))

    def split(seed: int, val_size: float = 0.25) -> tuple[list[str], list[str]]:
        data = prepare_data(DataConfig(train=[str(path)], val_size=val_size, seed=seed, cache=False), tiny_tokenizer)
        return [e.source for e in data.train], [e.source for e in data.validation]

    first = split(0)
    assert len(first[1]) == 10 and len(first[0]) == 30
    assert not set(first[0]) & set(first[1])
    assert split(0) == first
    assert set(split(1)[1]) != set(first[1])
    assert len(split(0, val_size=3)[1]) == 3  # a count, not a fraction


def test_split_keeps_raw_validation_examples(tiny_tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "toy.jsonl", toy_chat_records(20))
    data = prepare_data(DataConfig(train=[str(path)], val_size=0.2, cache=False), tiny_tokenizer)
    assert [e.source for e in data.validation_examples] == [e.source for e in data.validation]


def test_val_size_leaving_no_training_data_errors(tiny_tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "toy.jsonl", toy_chat_records(3))
    with pytest.raises(DataError, match="val_size"):
        prepare_data(DataConfig(train=[str(path)], val_size=3, cache=False), tiny_tokenizer)


def test_explicit_validation_file_is_used(tiny_tokenizer, tmp_path: Path) -> None:
    records = toy_chat_records(20)
    train = write_jsonl(tmp_path / "train.jsonl", records[:14])
    val = write_jsonl(tmp_path / "val.jsonl", records[14:])
    data = prepare_data(DataConfig(train=[str(train)], validation=[str(val)], val_size=0.5, cache=False), tiny_tokenizer)
    assert len(data.train) == 14 and len(data.validation) == 6  # val_size is ignored
    assert all(e.source.startswith(f"{train}:") for e in data.train)
    assert [e.source for e in data.validation] == [f"{val}:{i}" for i in range(1, 7)]
    assert [f["role"] for f in data.report["files"]] == ["train", "validation"]


def test_empty_train_list_errors(tiny_tokenizer) -> None:
    with pytest.raises(DataError, match="data.train is empty"):
        prepare_data(DataConfig(), tiny_tokenizer)


# ---------------------------------------------------------------- cache


def _tokens(data) -> list[tuple]:  # noqa: ANN001 - PreparedData
    return [(e.input_ids, e.labels, e.source, e.truncated) for e in data.train + data.validation]


def test_cache_hit_and_invalidation(tiny_tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "toy.jsonl", toy_chat_records(20))
    cache = tmp_path / "cache"
    config = DataConfig(train=[str(path)], val_size=0.2)
    first = prepare_data(config, tiny_tokenizer, cache)
    assert first.from_cache is False
    second = prepare_data(config, tiny_tokenizer, cache)
    assert second.from_cache is True
    assert _tokens(second) == _tokens(first)
    assert second.report == first.report
    assert [(e.source, e.messages) for e in second.validation_examples] == [(e.source, e.messages) for e in first.validation_examples]
    # settings that do not change the tokens share the cache
    assert prepare_data(config.model_copy(update={"packing": False}), tiny_tokenizer, cache).from_cache is True
    # a setting that changes the tokens does not
    assert prepare_data(config.model_copy(update={"max_length": 20}), tiny_tokenizer, cache).from_cache is False

    write_jsonl(path, toy_chat_records(21))  # new content at the same path
    third = prepare_data(config, tiny_tokenizer, cache)
    assert third.from_cache is False
    assert len(third.train) + len(third.validation) == 21


def test_damaged_cache_is_rebuilt(tiny_tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "toy.jsonl", toy_chat_records(8))
    config = DataConfig(train=[str(path)], val_size=0)
    first = prepare_data(config, tiny_tokenizer, tmp_path / "cache")
    (tensors,) = (tmp_path / "cache").glob("*/train.safetensors")
    tensors.write_bytes(tensors.read_bytes()[:20])  # a damaged copy, e.g. cut short
    again = prepare_data(config, tiny_tokenizer, tmp_path / "cache")
    assert again.from_cache is False and _tokens(again) == _tokens(first)
    assert prepare_data(config, tiny_tokenizer, tmp_path / "cache").from_cache is True  # and written anew


def test_cache_off_never_reads_the_cache(tiny_tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "toy.jsonl", toy_chat_records(8))
    config = DataConfig(train=[str(path)], val_size=0, cache=False)
    prepare_data(config, tiny_tokenizer, tmp_path / "cache")
    assert prepare_data(config, tiny_tokenizer, tmp_path / "cache").from_cache is False
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------- the report


def test_report_has_the_required_figures(tiny_tokenizer, tmp_path: Path) -> None:
    records = toy_chat_records(12)
    train = write_jsonl(tmp_path / "train.jsonl", records + [records[0]])
    val = write_jsonl(tmp_path / "val.jsonl", [ALPACA, ALPACA_INPUT, {**ALPACA, "output": "five"}])
    data = prepare_data(DataConfig(train=[str(train)], validation=[str(val)], cache=False), tiny_tokenizer)
    report = data.report
    json.dumps(report)  # it is written as data_report.json
    assert report["formats"] == {"messages": 13, "alpaca": 3}
    assert report["duplicates_removed"] == 1 and report["overlap_removed"] == 0
    assert report["zero_supervised_examples"] == 0 and report["truncation_rate"] == 0.0
    assert report["tokenizer_changes"] == []
    for split, examples in (("train", data.train), ("validation", data.validation)):
        stats = report[split]
        lengths = sorted(len(e.input_ids) for e in examples)
        assert set(stats["token_length"]) == {"p50", "p90", "p95", "p99", "max", "mean"}
        assert stats["token_length"]["max"] == lengths[-1]
        assert lengths[0] <= stats["token_length"]["p50"] <= stats["token_length"]["p90"] <= stats["token_length"]["p99"]
        assert stats["examples"] == len(examples) and stats["tokens"] == sum(lengths)
        supervised = sum(e.num_supervised for e in examples)
        assert stats["supervised_tokens"] == supervised
        assert stats["supervised_share"] == pytest.approx(supervised / sum(lengths), abs=1e-4)
        assert 0 < stats["supervised_share"] < 1
    assert report["missing_end_of_turn_supervision"] == 0
    segments = report["example"]["segments"]
    assert "".join(s["text"] for s in segments) == tiny_tokenizer.decode(data.train[0].input_ids)
    assert segments[-2]["supervised"] and segments[-2]["text"].endswith(END)
    assert any("expect overfitting" in w for w in report["warnings"])


def _empty_response_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    chats = toy_chat_records(12)
    chats[4] = {"messages": [{"role": "user", "content": "say nothing"}, {"role": "assistant", "content": " \n"}]}
    chats[7] = {**MULTI_TURN, "messages": MULTI_TURN["messages"][:2] + [{"role": "assistant", "content": ""}]
                + MULTI_TURN["messages"][3:]}  # a blank turn in the middle counts too
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [ALPACA, {**ALPACA_INPUT, "output": ""}])
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("prompt,completion\n1 + 1 =,2\n2 + 2 =,\n")  # a missing cell reads as an empty string
    return write_jsonl(tmp_path / "chats.jsonl", chats), alpaca, pairs


def test_empty_responses_are_kept_counted_and_logged(tiny_tokenizer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    chats, alpaca, pairs = _empty_response_files(tmp_path)
    config = DataConfig(train=[str(chats), str(alpaca), str(pairs)], val_size=0, cache=False)
    with caplog.at_level("WARNING", logger="tunelab.data.prepare"):
        data = prepare_data(config, tiny_tokenizer)
    sources = [f"{chats}:5", f"{chats}:8", f"{alpaca}:2", f"{pairs}:3"]
    assert data.report["empty_responses"] == {"count": 4, "examples": sources}
    assert len(data.train) == 16  # kept: a blank answer can be what the user wants
    (warning,) = [w for w in data.report["warnings"] if "empty response" in w]
    assert warning.startswith("4 records have an empty response") and all(source in warning for source in sources)
    (record,) = [r for r in caplog.records if "empty response" in r.getMessage()]
    assert record.levelname == "WARNING" and sources[0] in record.getMessage()


def test_empty_responses_list_the_first_few_and_show_in_inspect(tiny_tokenizer, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from rich.console import Console

    from tunelab import console as console_module

    blank = {"prompt": "say nothing", "completion": ""}
    records = [{"prompt": f"say {i}", "completion": f" {i}"} for i in range(10)] + [blank] * 7
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    report = prepare_data(DataConfig(train=[str(path)], val_size=0, dedup=False, cache=False), tiny_tokenizer).report
    assert report["empty_responses"] == {"count": 7, "examples": [f"{path}:{n}" for n in range(11, 16)]}
    assert report["train"]["examples"] == 17
    printed = io.StringIO()
    monkeypatch.setattr(console_module, "console", Console(file=printed, width=400))
    console_module.print_data_report(report)
    assert f"7 records have an empty response, which teaches the model to answer nothing: {path}:11," in printed.getvalue()
    assert f"{path}:15, ..." in printed.getvalue()


def test_no_empty_responses_no_warning(tiny_tokenizer, tmp_path: Path) -> None:
    text = write_jsonl(tmp_path / "text.jsonl", [TEXT, {"text": "a b c"}, {"text": "c d e"}])  # no answer to be empty
    report = prepare_data(DataConfig(train=[str(text)], val_size=0, cache=False), tiny_tokenizer).report
    assert report["empty_responses"] == {"count": 0, "examples": []}
    assert not any("empty response" in w for w in report["warnings"])


def test_percentiles() -> None:
    stats = percentiles(list(range(1, 101)))
    assert (stats["p50"], stats["p90"], stats["p99"], stats["max"], stats["mean"]) == (51.0, 90.0, 99.0, 100.0, 50.5)
    assert percentiles([7]) == {"p50": 7.0, "p90": 7.0, "p95": 7.0, "p99": 7.0, "max": 7.0, "mean": 7.0}
    assert percentiles([]) == {}


def test_report_lints_examples_without_a_trained_stop(tiny_tokenizer, tmp_path: Path) -> None:
    from tunelab.data import TokenizedExample
    from tunelab.data.report import end_of_turn_lint

    good = tokenize_record(tiny_tokenizer, tmp_path, CHAT)
    cut = good.labels[:-2] + [IGNORE, IGNORE]  # the end token takes no loss
    no_stop = TokenizedExample(good.input_ids, cut, good.source)
    assert end_of_turn_lint(tiny_tokenizer, [good]) == 0
    assert end_of_turn_lint(tiny_tokenizer, [good, no_stop]) == 1


def test_no_usable_examples_says_why(tiny_tokenizer, tmp_path: Path) -> None:
    from tunelab.config import DataConfig
    from tunelab.data import DataError, prepare_data

    records = [{"prompt": "word " * 40, "completion": " answer"} for _ in range(3)]
    records = [{"prompt": f"{i} " + r["prompt"], "completion": r["completion"]} for i, r in enumerate(records)]
    path = write_jsonl(tmp_path / "long.jsonl", records)
    config = DataConfig(train=[str(path)], val_size=0, max_length=16)
    with pytest.raises(DataError, match=r"3 with no supervised token left .*truncated away at data.max_length=16"):
        prepare_data(config, tiny_tokenizer)


def test_an_empty_weight_0_turn_is_not_an_empty_response(tmp_path: Path) -> None:
    record = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "", "weight": 0},
                           {"role": "user", "content": "b"}, {"role": "assistant", "content": "answer"}]}
    [example] = load_file(write_jsonl(tmp_path / "w.jsonl", [record])).examples
    assert not example.has_empty_response
    record["messages"][1].pop("weight")  # control: a trained empty turn is one
    [example] = load_file(write_jsonl(tmp_path / "w2.jsonl", [record])).examples
    assert example.has_empty_response


# ---------------------------------------------------------------- overlap with dedup off


def test_dedup_off_still_counts_and_warns_about_overlap(tiny_tokenizer, tmp_path: Path) -> None:
    records = toy_chat_records(10)
    train = write_jsonl(tmp_path / "train.jsonl", records)
    val = write_jsonl(tmp_path / "val.jsonl", [records[2], records[5], {"messages": [
        {"role": "user", "content": "only in validation"}, {"role": "assistant", "content": "yes"}]}])
    config = DataConfig(train=[str(train)], validation=[str(val)], dedup=False, cache=False)
    report = prepare_data(config, tiny_tokenizer).report
    assert report["overlap_kept"] == 2 and report["overlap_removed"] == 0
    (warning,) = [w for w in report["warnings"] if "also appear in the validation data" in w]
    assert warning.startswith("2 training records") and "data.dedup is off" in warning
    deduped = prepare_data(config.model_copy(update={"dedup": True}), tiny_tokenizer).report
    assert deduped["overlap_removed"] == 2 and deduped["overlap_kept"] == 0
    assert not any("also appear in the validation data" in w for w in deduped["warnings"])


# ---------------------------------------------------------------- prompt_completion on a chat model


def test_prompt_completion_uses_the_chat_template_by_default(tiny_tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", [PROMPT_COMPLETION, {"prompt": "count", "completion": "one two"}])
    data = prepare_data(DataConfig(train=[str(path)], val_size=0, cache=False), tiny_tokenizer)
    example = data.train[0]
    chat = [("user", PROMPT_COMPLETION["prompt"]), ("assistant", PROMPT_COMPLETION["completion"])]
    assert tiny_tokenizer.decode(example.input_ids) == render_chat(tiny_tokenizer, tuple(chat), False)
    assert supervised_text(tiny_tokenizer, example) == PROMPT_COMPLETION["completion"] + END  # the assistant turn
    assert data.report["prompt_completion"].startswith("chat template (prompt = user turn")
    assert data.report["formats"] == {"prompt_completion": 2}


def test_prompt_completion_raw_is_an_explicit_choice(tiny_tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", [PROMPT_COMPLETION])
    data = prepare_data(DataConfig(train=[str(path)], val_size=0, cache=False, prompt_completion="raw"), tiny_tokenizer)
    text = PROMPT_COMPLETION["prompt"] + PROMPT_COMPLETION["completion"] + END
    assert tiny_tokenizer.decode(data.train[0].input_ids) == text
    assert data.report["prompt_completion"].startswith("raw text")


def test_prompt_completion_without_a_chat_template_stays_raw(tiny_tokenizer, tmp_path: Path) -> None:
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = None  # a base model
    path = write_jsonl(tmp_path / "pairs.jsonl", [PROMPT_COMPLETION])
    data = prepare_data(DataConfig(train=[str(path)], val_size=0, cache=False), tokenizer)
    assert tokenizer.decode(data.train[0].input_ids) == PROMPT_COMPLETION["prompt"] + PROMPT_COMPLETION["completion"] + END
    assert data.report["prompt_completion"].startswith("raw text") and not data.report["tokenizer_changes"]


def test_the_report_has_no_rendering_without_prompt_completion_data(tiny_tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "toy.jsonl", toy_chat_records(6))
    assert prepare_data(DataConfig(train=[str(path)], val_size=0, cache=False), tiny_tokenizer).report["prompt_completion"] is None


# ---------------------------------------------------------------- missing columns and data.columns


def test_csv_missing_a_column_names_it_for_the_nearest_format(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,answer\n1 + 1 =,2\n")
    error = data_error(path)
    assert "missing column 'completion' of the prompt_completion format" in error, error
    assert "columns: answer, prompt" in error and "data.columns" in error
    alpaca = tmp_path / "alpaca.csv"
    alpaca.write_text("instruction,input,response\ncount,,one two\n")
    assert "missing column 'output' of the alpaca format" in data_error(alpaca)
    jsonl = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "reply": "b"}])
    assert "missing key 'completion' of the prompt_completion format" in data_error(jsonl)


def test_a_record_that_fits_no_format_at_all_points_at_data_columns(tmp_path: Path) -> None:
    path = tmp_path / "qa.csv"
    path.write_text("question,response\na,b\n")
    error = data_error(path)
    assert "cannot tell the format (columns: question, response)" in error and "data.columns" in error


def test_an_explicit_format_names_the_missing_key(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "reply": "b"}])
    assert "it lacks 'completion'" in data_error(path, "prompt_completion")


def test_data_columns_maps_file_names_to_canonical_ones(tiny_tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "qa.csv"
    path.write_text("question,response\nwhat is the capital of france?,paris.\ncount,one two\n")
    loaded = load_file(path, columns={"question": "prompt", "response": "completion"})
    assert loaded.format == "prompt_completion"
    assert (loaded.examples[0].prompt, loaded.examples[0].completion) == ("what is the capital of france?", "paris.")
    config = DataConfig(train=[str(path)], val_size=0, cache=False, columns={"question": "prompt", "response": "completion"})
    assert len(prepare_data(config, tiny_tokenizer).train) == 2


def test_data_columns_errors_are_clear(tmp_path: Path) -> None:
    path = tmp_path / "qa.csv"
    path.write_text("question,response\na,b\n")
    with pytest.raises(DataError, match=r"qa.csv: data.columns names column 'reply', which the file does not have "
                                        r"\(columns: question, response\)"):
        load_file(path, columns={"question": "prompt", "reply": "completion"})
    both = write_jsonl(tmp_path / "both.jsonl", [{"prompt": "a", "response": "b", "completion": "c"}])
    with pytest.raises(DataError, match=r"both.jsonl:1: holds both 'response' and 'completion'"):
        load_file(both, columns={"response": "completion"})


@pytest.mark.parametrize("columns, message", [
    ({"response": "answer"}, "'response' is mapped to 'answer', which is not a canonical name"),
    ({"a": "prompt", "b": "prompt"}, "several columns are mapped to 'prompt'"),
    ({" ": "prompt"}, "an empty column name"),
])
def test_data_columns_config_is_checked(columns: dict, message: str) -> None:
    from tunelab.config import ConfigError, build_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config({"data": {"columns": columns}})
