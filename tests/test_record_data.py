"""Data for the non-SFT objectives: preference pairs, unpaired completions and labeled texts, in every file type,
with data.columns, file:line errors, tokenization (prompt ids + answer ids, answers supervised), truncation that
keeps the prompt's end and each answer's start, and the data report's counts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from support.tiny import write_csv, write_jsonl, write_parquet
from transformers import PreTrainedTokenizerFast

from tunelab.config import DataConfig
from tunelab.data import IGNORE, DataError, load_file, prepare_data
from tunelab.data.formats import Example
from tunelab.data.preference import TRUNCATION_RULE, fit_to_length, prompt_and_answer_ids, tokenize_pair

PAIR = {"prompt": "what is the capital of france?", "chosen": "paris.", "rejected": "the lazy dog."}
CONVERSATIONAL_PAIR = {
    "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is the capital of france?"}],
    "chosen": [{"role": "assistant", "content": "paris."}],
    "rejected": [{"role": "assistant", "content": "the lazy dog."}],
}
UNPAIRED = {"prompt": "count from one to five", "completion": "one two three four five", "label": True}
LABELED = {"text": "the quick brown fox", "label": "animal"}


def pairs(n: int) -> list[dict]:
    words = ["cat", "dog", "fox", "owl", "cow", "bee"]
    return [{"prompt": f"which animal is number {i}?", "chosen": f"the {words[i % 6]}.", "rejected": f"a {words[(i + 1) % 6]}."}
            for i in range(n)]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_each_shape_is_detected_in_every_file_type(tmp_path: Path, suffix: str) -> None:
    shapes = {"preference": PAIR, "unpaired_preference": {**UNPAIRED, "label": "true" if suffix == ".csv" else True},
              "labeled": LABELED}
    for fmt, record in shapes.items():
        path = tmp_path / f"{fmt}{suffix}"
        if suffix == ".jsonl":
            write_jsonl(path, [record, record])
        elif suffix == ".json":
            path.write_text(json.dumps([record, record]))
        elif suffix == ".csv":
            write_csv(path, [record, record])
        else:
            write_parquet(path, [record, record])
        loaded = load_file(path)
        assert loaded.format == fmt
        example = loaded.examples[0]
        if fmt == "preference":
            assert (example.prompt, example.chosen, example.rejected) == (PAIR["prompt"], "paris.", "the lazy dog.")
        elif fmt == "unpaired_preference":
            assert example.label is True and example.completion == UNPAIRED["completion"]
        else:
            assert (example.prompt, example.label) == ("the quick brown fox", "animal")


def test_conversational_pair_keeps_the_prompt_messages_and_the_answers_text(tmp_path: Path) -> None:
    example = load_file(write_jsonl(tmp_path / "p.jsonl", [CONVERSATIONAL_PAIR])).examples[0]
    assert example.messages == (("system", "be brief"), ("user", "what is the capital of france?"))
    assert (example.chosen, example.rejected) == ("paris.", "the lazy dog.")


def test_columns_map_other_names_onto_a_pair(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "q?", "good": "yes.", "bad": "no."}])
    example = load_file(path, columns={"question": "prompt", "good": "chosen", "bad": "rejected"}).examples[0]
    assert (example.format, example.prompt, example.chosen, example.rejected) == ("preference", "q?", "yes.", "no.")


@pytest.mark.parametrize(("record", "message"), [
    ({"prompt": "q", "chosen": "a", "rejected": 3}, "p.jsonl:2: 'rejected' is a int; after a string prompt it must be a string"),
    ({**CONVERSATIONAL_PAIR, "chosen": "paris."}, "p.jsonl:2: 'chosen' must be a list with one assistant message"),
    ({**CONVERSATIONAL_PAIR, "chosen": [{"role": "user", "content": "x"}]}, "p.jsonl:2: chosen[0] must be an assistant message"),
    ({**CONVERSATIONAL_PAIR, "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "p.jsonl:2: the prompt's last message is an assistant turn"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "label": 1}, None),  # extra keys are allowed
])
def test_bad_pairs_are_named_with_file_and_line(tmp_path: Path, record: dict, message: str | None) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [PAIR, record])
    if message is None:
        assert len(load_file(path).examples) == 2
        return
    with pytest.raises(DataError) as caught:
        load_file(path)
    assert message in str(caught.value)


def test_an_unpaired_label_must_say_desirable_or_not(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "k.jsonl", [UNPAIRED, {**UNPAIRED, "label": "maybe"}])
    with pytest.raises(DataError, match=r"k.jsonl:2: 'label' is 'maybe'; .* true or false"):
        load_file(path)


def test_a_class_label_must_be_a_name_or_an_integer(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [LABELED, {"text": "x", "label": 1.5}])
    with pytest.raises(DataError, match=r"c.jsonl:2: 'label' is 1.5; expected a class name"):
        load_file(path)


def test_pair_sides_share_the_prompt_ids_and_supervise_only_the_answer(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    for record in (PAIR, CONVERSATIONAL_PAIR):
        example = load_example(record)
        if not example.messages:
            example = Example(**{**example.__dict__, "messages": (("user", example.prompt),)})  # chat rendering
        pair, lengths = tokenize_pair(tiny_tokenizer, example, max_length=512)
        prompt_ids, (chosen_ids, rejected_ids) = prompt_and_answer_ids(tiny_tokenizer, example, (example.chosen, example.rejected))
        assert pair.chosen.input_ids == prompt_ids + chosen_ids and pair.rejected.input_ids == prompt_ids + rejected_ids
        assert pair.chosen.labels == [IGNORE] * len(prompt_ids) + chosen_ids
        assert tiny_tokenizer.decode(chosen_ids) == "paris.<|im_end|>"  # the answer with its end-of-turn marker
        assert (lengths.prompt, lengths.answers, lengths.truncated) == (len(prompt_ids), (len(chosen_ids), len(rejected_ids)), False)


def test_raw_pair_answers_end_with_eos(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    pair, _ = tokenize_pair(tiny_tokenizer, load_example(PAIR), max_length=512)
    supervised = [t for t in pair.rejected.labels if t != IGNORE]
    assert tiny_tokenizer.decode(supervised) == "the lazy dog.<|im_end|>"


def test_truncation_keeps_the_prompt_end_and_each_answer_start() -> None:
    prompt, answers = list(range(100, 120)), [list(range(200, 214)), list(range(300, 305))]
    kept_prompt, (chosen, rejected), truncated = fit_to_length(prompt, answers, max_length=24)
    assert truncated
    assert kept_prompt == prompt[-12:]  # cut first, down to half of max_length: its end is kept
    assert chosen == answers[0][:12] and rejected == answers[1]  # each answer's start is kept
    assert fit_to_length(prompt, answers, max_length=34) == (prompt, answers, False)
    # a short answer leaves the prompt more room than half
    assert fit_to_length(prompt, [[1, 2]], max_length=10) == (prompt[-8:], [[1, 2]], True)


def load_example(record: dict) -> Example:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        return load_file(write_jsonl(Path(folder) / "r.jsonl", [record])).examples[0]


def test_pair_report_counts_what_can_be_wrong(tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    records = pairs(10) + [{"prompt": "same?", "chosen": "the cat.", "rejected": "the cat."},
                           {"prompt": "empty?", "chosen": "", "rejected": "a dog."},
                           {"prompt": "the quick brown fox jumps over the lazy dog " * 8, "chosen": "the cat. " * 10,
                            "rejected": "a dog."}]
    data = prepare_data(DataConfig(train=[str(write_jsonl(tmp_path / "p.jsonl", records))], val_size=0, max_length=64,
                                   packing=False), tiny_tokenizer)
    report = data.report
    assert data.records == "preference" and len(data.train) == 13
    assert report["pairs"]["chosen_equals_rejected"] == 1
    assert report["pairs"]["empty_sides"] == {"prompt": 0, "chosen": 1, "rejected": 0}
    assert report["pairs"]["truncated"] == 1 and report["train"]["truncated"] == 1
    assert report["pairs"]["truncation"] == TRUNCATION_RULE
    assert set(report["pairs"]["tokens"]) == {"prompt", "chosen", "rejected"}
    assert report["pairs"]["tokens"]["prompt"]["max"] <= 64
    long_pair = next(p for p in data.train if p.chosen.truncated)
    assert len(long_pair.chosen.input_ids) == 64
    assert any("same chosen and rejected" in w for w in report["warnings"])


def test_labeled_classes_are_sorted_numerically_or_as_given(tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    records = [{"text": f"text {i}", "label": [2, 10, 1][i % 3]} for i in range(9)]
    path = str(write_jsonl(tmp_path / "c.jsonl", records))
    data = prepare_data(DataConfig(train=[path], val_size=0), tiny_tokenizer)
    assert data.classes == ["1", "2", "10"]
    assert [r.label_id for r in data.train[:3]] == [1, 2, 0]
    assert all(label == IGNORE for r in data.train for label in r.example.labels)
    given = prepare_data(DataConfig(train=[path], val_size=0), tiny_tokenizer, class_names_given=["10", "2", "1"])
    assert [r.label_id for r in given.train[:3]] == [1, 0, 2]
    with pytest.raises(DataError, match=r"c.jsonl:1: label '2' is not one of the classes given \(1, 10\)"):
        prepare_data(DataConfig(train=[path], val_size=0), tiny_tokenizer, class_names_given=["1", "10"])


def test_labeled_report_shows_class_balance(tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    records = [{"text": f"text number {i}", "label": "big" if i < 30 else "small"} for i in range(32)]
    data = prepare_data(DataConfig(train=[str(write_csv(tmp_path / "c.csv", records))], val_size=0), tiny_tokenizer)
    balance = data.report["classes"]["train"]
    assert balance == {"big": {"count": 30, "share": 0.9375}, "small": {"count": 2, "share": 0.0625}}
    assert any("unbalanced" in w for w in data.report["warnings"])


def test_unpaired_csv_labels_read_as_booleans(tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    records = [{**UNPAIRED, "prompt": f"count {i}", "label": "true" if i % 3 else "False"} for i in range(9)]
    data = prepare_data(DataConfig(train=[str(write_csv(tmp_path / "k.csv", records))], val_size=0), tiny_tokenizer)
    assert [r.desirable for r in data.train] == [i % 3 != 0 for i in range(9)]
    assert data.report["unpaired"]["desirable"] == 6 and data.report["unpaired"]["undesirable"] == 3


def test_one_kind_of_record_per_run(tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    chats = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                                {"role": "assistant", "content": "a"}]}])
    prefs = write_jsonl(tmp_path / "pairs.jsonl", [PAIR])
    with pytest.raises(DataError, match="different kinds of records .*chat.jsonl is messages; .*pairs.jsonl is preference"):
        prepare_data(DataConfig(train=[str(chats), str(prefs)], val_size=0), tiny_tokenizer)


def test_pairs_are_split_and_deduplicated_like_other_records(tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    records = pairs(20) + pairs(2)  # two duplicates
    data = prepare_data(DataConfig(train=[str(write_jsonl(tmp_path / "p.jsonl", records))], val_size=4), tiny_tokenizer)
    assert data.report["duplicates_removed"] == 2
    assert (len(data.train), len(data.validation)) == (16, 4)
    assert {p.source for p in data.validation} == {e.source for e in data.validation_examples}


def test_data_inspect_shows_both_sides_of_a_pair_and_its_counts(tmp_path: Path, tiny_model_dir: Path) -> None:
    from support.cli import invoke
    from support.runs import tiny_config_dict

    records = pairs(6) + [{"prompt": "same?", "chosen": "the cat.", "rejected": "the cat."}]
    config = tmp_path / "config.yaml"
    # a preference objective's config: inspect refuses pairs for one that trains on other records, as train does
    config.write_text(json.dumps(tiny_config_dict(tiny_model_dir, objective={"name": "dpo"})))
    result = invoke("data", "inspect", str(write_jsonl(tmp_path / "p.jsonl", records)), "--config", str(config), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["pairs"]["chosen_equals_rejected"] == 1
    assert [e["source"].rsplit(" ", 1)[1] for e in report["examples"]] == ["(chosen)", "(rejected)"]
    chosen = "".join(s["text"] for s in report["examples"][0]["segments"] if s["supervised"])
    assert chosen == "the cat.<|im_end|>"
    text = invoke("data", "inspect", str(tmp_path / "p.jsonl"), "--config", str(config))
    assert "pairs with chosen = rejected" in text.output, text.output
