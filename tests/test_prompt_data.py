"""Prompt records, the data of online objectives (GRPO): {prompt} or {messages} ending in a user turn, plus
reference columns, in every file type, with file:line errors; tokenized as the prompt alone (the end kept past
max_length), the columns carried for the rewards, and counted in the data report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.tiny import write_jsonl
from support.tiny import write_csv, write_parquet
from transformers import PreTrainedTokenizerFast

from tunelab.config import DataConfig
from tunelab.data import IGNORE, DataError, load_file, prepare_data
from tunelab.data.formats import Example
from tunelab.data.prompts import tokenize_prompt

PROMPT = {"prompt": "what is the capital of france?", "reference": "paris"}
CHAT_PROMPT = {"messages": [{"role": "system", "content": "be brief"},
                            {"role": "user", "content": "what is the capital of france?"}], "reference": "paris"}


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_a_prompt_with_reference_columns_is_detected_in_every_file_type(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"p{suffix}"
    records = [PROMPT, {**PROMPT, "reference": "lyon"}]
    {".jsonl": lambda: write_jsonl(path, records), ".json": lambda: path.write_text(json.dumps(records)),
     ".csv": lambda: write_csv(path, records), ".parquet": lambda: write_parquet(path, records)}[suffix]()
    loaded = load_file(path, prompts=True)
    assert loaded.format == "prompt"
    assert [(e.prompt, dict(e.columns)) for e in loaded.examples] == [
        (PROMPT["prompt"], {"reference": "paris"}), (PROMPT["prompt"], {"reference": "lyon"})]


def test_messages_ending_in_a_user_turn_are_a_prompt_and_keep_their_turns(tmp_path: Path) -> None:
    example = load_file(write_jsonl(tmp_path / "p.jsonl", [CHAT_PROMPT]), prompts=True).examples[0]
    assert example.format == "prompt"
    assert example.messages == (("system", "be brief"), ("user", "what is the capital of france?"))
    assert dict(example.columns) == {"reference": "paris"}
    trl_style = load_file(write_jsonl(tmp_path / "q.jsonl", [{"prompt": CHAT_PROMPT["messages"], "answer": 4}]),
                          prompts=True).examples[0]
    assert trl_style.messages == example.messages and dict(trl_style.columns) == {"answer": 4}


def test_prompts_are_detected_only_for_a_run_that_reads_them(tmp_path: Path) -> None:
    """An SFT run keeps its diagnoses: {prompt, reply} lacks a completion, a chat ending in a user turn is a chat."""
    with pytest.raises(DataError, match="missing key 'completion' of the prompt_completion format"):
        load_file(write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "reply": "b"}]))
    trailing = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                             {"role": "user", "content": "bye"}]}
    assert load_file(write_jsonl(tmp_path / "c.jsonl", [trailing])).format == "messages"
    # a given data.format: prompt reads any record with a prompt, 'completion' included, as a reference column
    explicit = load_file(write_jsonl(tmp_path / "e.jsonl", [{"prompt": "q", "completion": "a"}]), "prompt").examples[0]
    assert explicit.format == "prompt" and dict(explicit.columns) == {"completion": "a"}


@pytest.mark.parametrize(("record", "message"), [
    ({"prompt": 3}, "'prompt' is a int"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "assistant turn"),
    ({"prompt": [{"role": "system", "content": "s"}]}, "must end with the user's turn"),
    ({"text": "q"}, "a prompt record needs 'prompt'"),
])
def test_bad_prompt_records_are_named_with_file_and_line(tmp_path: Path, record: dict, message: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [PROMPT, record])
    with pytest.raises(DataError, match=rf"bad.jsonl:2: .*{message}"):
        load_file(path, "prompt")


def test_a_prompt_is_tokenized_alone_with_its_end_kept(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    example = Example("prompt", "f:1", messages=(("user", "what is the capital of france?"),), prompt="what is the capital of france?",
                      columns=(("reference", "paris"),))
    whole = tokenize_prompt(tiny_tokenizer, example, max_length=512)
    assert tiny_tokenizer.decode(whole.input_ids).endswith("<|im_start|>assistant\n")  # the answer's turn is open
    assert set(whole.example.labels) == {IGNORE}  # nothing supervised: the completions are generated
    assert whole.prompt == "what is the capital of france?" and whole.columns == {"reference": "paris"}
    cut = tokenize_prompt(tiny_tokenizer, example, max_length=9)
    assert cut.input_ids == whole.input_ids[-9:] and cut.example.truncated
    assert tokenize_prompt(tiny_tokenizer, example, max_length=9, overlong="drop") is None
    with pytest.raises(DataError, match="f:1: the prompt is"):
        tokenize_prompt(tiny_tokenizer, example, max_length=9, overlong="error")


def test_prompt_data_is_prepared_as_prompt_records_and_reported(tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    records = [{"prompt": f"say animal {i}", "reference": "cat"} for i in range(6)] + [{"prompt": "say it"}]
    data = prepare_data(DataConfig(train=[str(write_jsonl(tmp_path / "p.jsonl", records))], val_size=2, packing=False),
                        tiny_tokenizer, prompts=True)
    assert data.records == "prompt" and len(data.train) == 5 and len(data.validation) == 2
    counts = data.report["prompts"]
    assert counts["count"] == 7 and counts["columns"] == {"reference": {"missing": 1}}
    first = data.train[0]
    assert first.prompt.startswith("say") and tiny_tokenizer.decode(first.input_ids).startswith("<|im_start|>user\nsay")


def test_a_given_prompt_format_reads_a_chat_s_last_answer_as_its_reference(tmp_path: Path) -> None:
    chat = {"messages": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]}
    example = load_file(write_jsonl(tmp_path / "c.jsonl", [chat]), "prompt").examples[0]
    assert example.messages == (("user", "2 + 2?"),) and dict(example.columns) == {"reference": "4"}
    with pytest.raises(DataError, match="c2.jsonl:1: the chat ends with an answer"):
        load_file(write_jsonl(tmp_path / "c2.jsonl", [{**chat, "reference": "four"}]), "prompt")


def test_a_prompt_s_sample_reference_is_its_reference_column(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    """The before/after samples of an online run are measured (exact_match, rouge_l) against the prompt record's
    'reference' column, the answer the rewards read; it was always empty, so every sample scored 0."""
    from tunelab.data.tokenize import prompt_for_generation

    with_reference = Example("prompt", "p.jsonl:1", prompt=PROMPT["prompt"], columns=(("reference", "paris"),))
    assert prompt_for_generation(tiny_tokenizer, with_reference) == (PROMPT["prompt"], "paris")
    without = Example("prompt", "p.jsonl:2", prompt=PROMPT["prompt"], columns=(("score", 3),))
    assert prompt_for_generation(tiny_tokenizer, without) == (PROMPT["prompt"], "")
