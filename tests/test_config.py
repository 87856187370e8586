"""The config: YAML loading, clear errors with file:line and the nearest key, --set overrides, path resolution."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tunelab.config import ConfigError, DataConfig, TunelabConfig, build_config, load_config, parse_overrides
from tunelab.techniques import TECHNIQUES


def write_config(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def config_error(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# ---------------------------------------------------------------- unknown keys, types, tags


def test_unknown_key_names_path_nearest_key_and_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, "model:\n  dtype: float32\ntraining:\n  max_steps: 10\n  lerning_rate: 1.0e-4\n")
    message = config_error(path)
    assert f"{path}:5" in message  # the line of `lerning_rate`
    assert "training.lerning_rate" in message
    assert "did you mean 'learning_rate'" in message.lower()


def test_switching_a_sections_name_by_set_says_how_to_replace_the_section(tmp_path: Path) -> None:
    """--set technique.name=adapter over a file written for LoRA keeps its `r`, which the adapter refuses: the error
    says how to switch (replace the section); the same key wrong in the file alone gets no such hint."""
    path = write_config(tmp_path, "technique:\n  name: lora\n  r: 8\n")
    switched = config_error(path, ["technique.name=adapter"])
    assert f"{path}:3: unknown key 'technique.r'" in switched
    assert "to switch, replace the section: --set 'technique={name: adapter}'" in switched
    assert load_config(path, ["technique={name: adapter}"]).technique.name == "adapter"
    plain = config_error(write_config(tmp_path, "technique:\n  name: adapter\n  r: 8\n", "b.yaml"))
    assert "unknown key 'technique.r'" in plain and "replace the section" not in plain


def test_an_objective_key_error_reads_as_the_user_wrote_it_with_the_objective_s_keys(tmp_path: Path) -> None:
    """The objective's settings class is picked by its name (a tagged union): errors say `objective.KEY`, at its
    line, with that objective's valid keys, as technique errors do."""
    path = write_config(tmp_path, "objective:\n  name: grpo\n  rewards: [rouge_l]\n  num_generatons: 4\n")
    message = config_error(path)
    assert f"{path}:4" in message and "unknown key 'objective.num_generatons'" in message
    assert "did you mean 'num_generations'" in message.lower() and "max_completion_length" in message
    bound = config_error(write_config(tmp_path, "objective:\n  name: grpo\n  rewards: [rouge_l]\n  beta: -1\n", "b.yaml"))
    assert "objective.beta:" in bound and "grpo" not in bound.split("objective.beta")[0]


def test_an_unknown_key_in_a_list_item_of_settings_gets_its_valid_keys_and_the_nearest(tmp_path: Path) -> None:
    """A misspelt key inside one reward term (objective.rewards.0.max_wrds) is named at its line with the reward
    term's valid keys and the nearest one; the list item used to stop the lookup ('Valid keys here: ' and nothing)."""
    path = write_config(tmp_path, "objective:\n  name: grpo\n  rewards:\n    - function: length\n      max_wrds: 4\n")
    message = config_error(path)
    assert f"{path}:5: unknown key 'objective.rewards.0.max_wrds'. Did you mean 'max_words'?" in message
    assert "Valid keys here: function, run, weight, column, pattern, max_words" in message


@pytest.mark.parametrize("objective", ["grpo", "ppo"])
@pytest.mark.parametrize(("key", "value", "expected"), [
    ("max_completion_length", "0", "greater than 0"), ("temperature", "0", "greater than 0"),
    ("top_p", "1.5", "less than or equal to 1"), ("rewards", "[]", "at least 1 item"),
])
def test_the_online_objectives_share_their_rewards_and_sampling_settings(tmp_path: Path, objective: str, key: str,
                                                                        value: str, expected: str) -> None:
    """One definition (objectives.online.OnlineSettings) holds both objectives' rewards and sampling bounds, and
    `name` stays the first key of their section, as in every other objective's."""
    rewards = "" if key == "rewards" else "  rewards: [rouge_l]\n"
    path = write_config(tmp_path, f"objective:\n  name: {objective}\n{rewards}  {key}: {value}\n")
    message = config_error(path)
    assert f"objective.{key}:" in message and expected in message
    settings = build_config({"model": {"name": "x"}, "data": {"train": ["a.jsonl"]},
                             "objective": {"name": objective, "rewards": ["rouge_l"]}}).objective
    assert list(type(settings).model_fields)[:5] == ["name", "rewards", "max_completion_length", "temperature", "top_p"]


def test_unknown_top_level_section_suggests_the_section(tmp_path: Path) -> None:
    path = write_config(tmp_path, "model:\n  dtype: float32\ntrainig:\n  max_steps: 3\n")
    message = config_error(path)
    assert f"{path}:3" in message
    assert "'trainig'" in message and "did you mean 'training'" in message.lower()


def test_wrong_type_names_path_line_and_expected_type(tmp_path: Path) -> None:
    path = write_config(tmp_path, "training:\n  epochs: 1\n  max_steps: ten\n")
    message = config_error(path)
    assert f"{path}:3" in message
    assert "training.max_steps" in message
    assert "valid integer" in message
    assert "'ten'" in message


def test_constraint_violation_names_the_bound(tmp_path: Path) -> None:
    path = write_config(tmp_path, "data:\n  max_length: 4\n")
    message = config_error(path)
    assert f"{path}:2" in message and "data.max_length" in message and "greater than 8" in message


def test_python_tag_is_refused_and_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    path = write_config(tmp_path, f'model: !!python/object/apply:os.system ["touch {marker}"]\n')
    message = config_error(path)
    assert f"{path}:1" in message
    assert "safe_load" in message and "python/object" in message
    assert not marker.exists()


def test_echo_tag_from_the_issue_is_refused(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, 'training: !!python/object/apply:os.system ["echo hi"]\n')
    message = config_error(path)
    assert "not plain YAML" in message
    assert "hi" not in capfd.readouterr().out  # nothing ran


# ---------------------------------------------------------------- duplicate keys, YAML syntax


def test_duplicate_section_names_file_line_and_first_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, "data:\n  val_size: 2\ntraining:\n  max_steps: 3\ndata:\n  max_length: 64\n")
    message = config_error(path)
    assert f"{path}:5: duplicate key 'data' (first at line 1)" in message


def test_duplicate_key_inside_a_section_names_the_key_path(tmp_path: Path) -> None:
    path = write_config(tmp_path, "training:\n  max_steps: 3\n  epochs: 2\n  max_steps: 5\n")
    message = config_error(path)
    assert f"{path}:4: duplicate key 'training.max_steps' (first at line 2)" in message


def test_same_key_in_different_sections_is_not_a_duplicate(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, "data:\n  seed: 1\ntraining:\n  seed: 2\n"))
    assert config.data.seed == 1 and config.training.seed == 2


def test_syntax_error_does_not_blame_python_tags(tmp_path: Path) -> None:
    path = write_config(tmp_path, "technique:\n  target_modules: [q_proj, v_proj\ntraining:\n  max_steps: 3\n")
    message = config_error(path)
    assert f"{path}:" in message and "']'" in message
    assert "python/object" not in message and "tags" not in message


def test_unknown_technique_lists_valid_ones(tmp_path: Path) -> None:
    path = write_config(tmp_path, "technique:\n  name: lorra\n")
    message = config_error(path)
    assert f"{path}:2" in message  # the line of `name:`
    assert "'lorra'" in message
    for name in TECHNIQUES:
        assert name in message


def test_technique_specific_unknown_key(tmp_path: Path) -> None:
    path = write_config(tmp_path, "technique:\n  name: lora\n  rank: 8\n")
    message = config_error(path)
    assert f"{path}:3" in message
    assert "technique.rank" in message
    assert "did you mean 'r'" in message.lower()
    assert "alpha" in message and "target_modules" in message  # lora's keys, not another technique's


def test_key_of_another_technique_is_unknown(tmp_path: Path) -> None:
    path = write_config(tmp_path, "technique:\n  name: full\n  r: 8\n")
    message = config_error(path)
    assert f"{path}:3" in message and "technique.r" in message


def test_technique_section_without_name_is_lora(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, "technique:\n  r: 4\n"))
    assert config.technique.name == "lora" and config.technique.r == 4


def test_early_stopping_needs_eval_every(tmp_path: Path) -> None:
    message = config_error(write_config(tmp_path, "training:\n  early_stopping_patience: 3\n"))
    assert "early_stopping_patience" in message and "eval_every" in message
    ok = load_config(write_config(tmp_path, "training:\n  early_stopping_patience: 3\n  eval_every: 10\n", "ok.yaml"))
    assert ok.training.early_stopping_patience == 3


def test_a_check_of_the_whole_config_is_blamed_at_the_key_it_names(tmp_path: Path) -> None:
    """A check across sections (the technique refuses packing) named no key: '<file>: (top level): ...'. It is
    blamed where the key it names is given, as any other error: the file's line, or the --set item."""
    path = write_config(tmp_path, "data:\n  packing: true\ntechnique:\n  name: prompt_tuning\n")
    message = config_error(path)
    assert f"\n  {path}:2: data.packing: technique 'prompt_tuning' cannot pack" in message
    assert "(top level)" not in message
    message = config_error(write_config(tmp_path, "model:\n  dtype: float32\n", "other.yaml"), ["training.best_metric=bleu"])
    assert "\n  --set training.best_metric=bleu: training.best_metric 'bleu' is not computed" in message


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    message = config_error(write_config(tmp_path, "- a\n- b\n"))
    assert "expected a mapping" in message


def test_missing_config_file(tmp_path: Path) -> None:
    assert "not found" in config_error(tmp_path / "nope.yaml")


# ---------------------------------------------------------------- --set overrides


def test_parse_overrides_yaml_scalars() -> None:
    parsed = dict((".".join(k), v) for k, v in parse_overrides(
        ["training.max_steps=10", "training.learning_rate=0.001", "data.packing=false", "technique.target_modules=[q_proj, v_proj]",
         "model.name=some/model"]
    ))
    assert parsed == {
        "training.max_steps": 10, "training.learning_rate": 0.001, "data.packing": False,
        "technique.target_modules": ["q_proj", "v_proj"], "model.name": "some/model",
    }
    assert isinstance(parsed["training.max_steps"], int) and isinstance(parsed["training.learning_rate"], float)


def test_set_overrides_apply(tmp_path: Path) -> None:
    path = write_config(tmp_path, "training:\n  max_steps: 5\n  learning_rate: 0.1\n")
    config = load_config(path, [
        "training.max_steps=12",            # int, replacing a file value
        "training.learning_rate=1e-4",      # exponent without a dot: YAML reads a string, pydantic makes it a float
        "training.warmup_ratio=0.25",       # float
        "data.packing=false",               # bool
        "technique.target_modules=[q_proj, v_proj]",  # list
        "training.adam_betas=[0.8, 0.95]",
        "technique.r=4",                    # into the default technique (lora), no name given
    ])
    assert config.training.max_steps == 12
    assert config.training.learning_rate == pytest.approx(1e-4) and config.learning_rate == pytest.approx(1e-4)
    assert config.training.warmup_ratio == 0.25
    assert config.data.packing is False
    assert config.technique.name == "lora"
    assert config.technique.target_modules == ["q_proj", "v_proj"] and config.technique.r == 4
    assert config.training.adam_betas == (0.8, 0.95)


def test_set_switches_technique(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, "{}\n"), ["technique.name=freeze", "technique.layers=[-1]"])
    assert config.technique.name == "freeze" and config.technique.layers == [-1]
    assert config.learning_rate == TECHNIQUES["freeze"].default_learning_rate


def test_set_unknown_key_errors_and_names_the_option(tmp_path: Path) -> None:
    message = config_error(write_config(tmp_path, "{}\n"), ["training.lerning_rate=0.1"])
    assert "--set training.lerning_rate" in message
    assert "did you mean 'learning_rate'" in message.lower()


def test_set_unknown_technique_names_the_option(tmp_path: Path) -> None:
    message = config_error(write_config(tmp_path, "{}\n"), ["technique.name=qlorra"])
    assert "--set technique.name" in message and "'qlorra'" in message and "full, freeze, lora" in message


def test_unknown_objective_name_is_named_with_the_objectives_not_the_techniques(tmp_path: Path) -> None:
    """A misspelt objective.name is an objective error: the key and the registered objectives, not technique.name
    and the techniques (the message used to say 'technique.name must be one of full, freeze, ...')."""
    message = config_error(write_config(tmp_path, "{}\n"), ["objective.name=dpoo"])
    assert "--set objective.name=dpoo: objective.name must be one of sft, dpo" in message
    assert "technique" not in message and "Did you mean 'dpo'?" in message
    in_file = config_error(write_config(tmp_path, "objective:\n  name: rewrd\n", "o.yaml"))
    assert "o.yaml:2: objective.name must be one of" in in_file and "Did you mean 'reward'?" in in_file


def test_set_wrong_type_errors(tmp_path: Path) -> None:
    message = config_error(write_config(tmp_path, "{}\n"), ["training.max_steps=abc"])
    assert "training.max_steps" in message and "valid integer" in message


def test_set_error_names_the_set_item_not_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, "model:\n  dtype: float32\n", "base.yaml")
    message = config_error(path, ["foo.bar=1"])
    assert "--set foo.bar=1" in message and "base.yaml" not in message
    message = config_error(path, ["training.max_steps=abc"])
    assert "--set training.max_steps=abc: training.max_steps" in message and "base.yaml" not in message


def test_set_error_in_a_section_of_the_file_names_the_set_item(tmp_path: Path) -> None:
    path = write_config(tmp_path, "model:\n  dtype: float32\ntraining:\n  max_steps: 3\n", "base.yaml")
    message = config_error(path, ["training.early_stopping_patience=2"])
    assert "--set training.early_stopping_patience=2" in message and "eval_every" in message
    # A --set of an unrelated field is not blamed for the file's own combination.
    path = write_config(tmp_path, "training:\n  early_stopping_patience: 2\n", "file.yaml")
    message = config_error(path, ["training.max_steps=9"])
    assert f"{path}:1" in message and "--set" not in message


def test_set_replacing_a_file_value_is_blamed_not_the_file_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, "training:\n  max_steps: 3\n", "base.yaml")
    message = config_error(path, ["training.max_steps=0"])
    assert "--set training.max_steps=0" in message and "base.yaml" not in message


@pytest.mark.parametrize("item", ["training.max_steps", "=3"])
def test_set_needs_key_and_value(item: str) -> None:
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides([item])


def test_set_into_a_value_errors(tmp_path: Path) -> None:
    message = config_error(write_config(tmp_path, "training:\n  max_steps: 3\n"), ["training.max_steps.x=1"])
    assert "holds a value, not a section" in message


# ---------------------------------------------------------------- union-typed fields


@pytest.mark.parametrize("value", ["5", "[q_proj, 5]", "{a: 1}"])
def test_union_field_error_is_one_message_listing_the_shapes(tmp_path: Path, value: str) -> None:
    message = config_error(write_config(tmp_path, "{}\n"), [f"technique.target_modules={value}"])
    lines = message.splitlines()[1:]
    assert len(lines) == 1, message  # one error for the field, not one per union branch
    assert f"--set technique.target_modules={value}: technique.target_modules: expected a list of strings or " \
           "'all-linear'" in lines[0]
    assert "literal[" not in message and "list[str]" not in message


def test_union_field_error_in_the_file_names_its_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, "technique:\n  name: lora\n  target_modules: 7\n  r: 0\n")
    message = config_error(path)
    assert len(message.splitlines()) == 3  # the heading, the union field once, and r
    assert f"{path}:3: technique.target_modules: expected a list of strings or 'all-linear' (got 7)" in message
    assert f"{path}:4: technique.r" in message


# ---------------------------------------------------------------- paths, defaults


def test_relative_data_paths_resolve_against_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_dir = tmp_path / "configs" / "nested"
    path = write_config(config_dir, "data:\n  train: ../data/train.jsonl\n  validation: [val.jsonl, /abs/v.jsonl]\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(path)
    assert config.data.train == [str((tmp_path / "configs" / "data" / "train.jsonl").resolve())]
    assert config.data.validation == [str((config_dir / "val.jsonl").resolve()), "/abs/v.jsonl"]
    assert config.output.dir == str(Path("runs") / "config")  # output dir stays relative to the working directory


def test_set_paths_are_relative_to_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_dir = tmp_path / "examples" / "beginner"
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    path = write_config(config_dir, "data:\n  train: ../data/a.jsonl\n  validation: v.jsonl\n")
    monkeypatch.chdir(tmp_path)
    config = load_config(path.relative_to(tmp_path), ["data.train=my_data.jsonl", "model.name=models/tiny"])
    assert config.data.train == [str(tmp_path / "my_data.jsonl")]  # as the shell user meant it
    assert config.data.validation == [str(config_dir / "v.jsonl")]  # the file's own path stays file-relative
    assert config.model.name == str(tmp_path / "models" / "tiny")
    assert load_config(path, ["data.train=/abs/t.jsonl"]).data.train == ["/abs/t.jsonl"]
    whole = load_config(path, ["data={train: [b.jsonl]}"])  # a whole section given with --set
    assert whole.data.train == [str(tmp_path / "b.jsonl")]


@pytest.mark.parametrize("item", ["data.train=", "data.validation=''", "model.name="])
def test_empty_path_is_an_error_naming_the_set_item(tmp_path: Path, item: str) -> None:
    message = config_error(write_config(tmp_path, "{}\n"), [item])
    assert f"--set {item}" in message and "empty" in message


def test_empty_path_in_the_file_is_an_error_with_its_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, "data:\n  val_size: 2\n  train: ''\n")
    message = config_error(path)
    assert f"{path}:3" in message and "data.train" in message and "empty" in message


def test_local_model_dir_resolves_against_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    path = write_config(tmp_path, "model:\n  name: models/tiny\n")
    monkeypatch.chdir(tmp_path.parent)
    assert load_config(path).model.name == str((tmp_path / "models" / "tiny").resolve())
    hub = load_config(write_config(tmp_path, "model:\n  name: Org/Some-Model\n", "hub.yaml"))
    assert hub.model.name == "Org/Some-Model"  # a hub id is left alone


def test_a_relative_model_name_is_read_from_the_config_files_folder_as_its_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """model.name runs/sft/merged (no folder beside the config) was left relative, and from_pretrained opened the
    working directory's folder while data.train was read from the config's: one config, two rules. It is read
    from the config file's folder (logged); a folder only in the working directory is refused naming both places,
    and a path with nothing at either is named with both when opened (a merged run may be made after the config
    is read)."""
    import logging

    from tunelab.models import ModelLoadError, resolve_model_path

    config_dir, cwd = tmp_path / "configs", tmp_path / "work"
    (config_dir / "runs" / "sft" / "merged").mkdir(parents=True)
    (cwd / "runs" / "other" / "merged").mkdir(parents=True)
    monkeypatch.chdir(cwd)
    beside = write_config(config_dir, "model:\n  name: runs/sft/merged\n", "beside.yaml")
    with caplog.at_level(logging.INFO, logger="tunelab.config.loading"):
        assert load_config(beside).model.name == str((config_dir / "runs" / "sft" / "merged").resolve())
    assert f"model.name runs/sft/merged: the folder {(config_dir / 'runs' / 'sft' / 'merged').resolve()}" in caplog.text
    assert f"the config file's folder {config_dir.resolve()}" in caplog.text
    only_cwd = write_config(config_dir, "model:\n  name: runs/other/merged\n", "cwd.yaml")
    with pytest.raises(ConfigError) as refused:
        load_config(only_cwd)
    message = str(refused.value)
    assert message.startswith("model.name runs/other/merged: no folder at "
                              f"{(config_dir / 'runs' / 'other' / 'merged').resolve()}"), message
    assert f"there is one at {(cwd / 'runs' / 'other' / 'merged').resolve()}" in message
    assert load_config(only_cwd, ["model.name=runs/other/merged"]).model.name == str(cwd / "runs" / "other" / "merged")
    nowhere = load_config(write_config(config_dir, "model:\n  name: runs/later/merged\n", "later.yaml"))
    with pytest.raises(ModelLoadError) as missing:
        resolve_model_path(nowhere.model.name, nowhere.model.looked_in)
    assert f"local directory {(config_dir / 'runs' / 'later' / 'merged').resolve()} does not exist" in str(missing.value)
    assert f"nor is there a folder at {(cwd / 'runs' / 'later' / 'merged').resolve()}" in str(missing.value)


def test_defaults_and_learning_rate_per_technique() -> None:
    config = build_config({})
    assert config.technique.name == "lora"
    assert config.data == DataConfig()
    assert config.learning_rate == TECHNIQUES["lora"].default_learning_rate
    assert build_config({"technique": {"name": "full"}}).learning_rate == TECHNIQUES["full"].default_learning_rate


def test_to_yaml_round_trips() -> None:
    config = build_config({"technique": {"name": "freeze", "layers": [-1]}, "training": {"max_steps": 3}})
    dumped = yaml.safe_load(config.to_yaml())
    assert dumped["training"]["learning_rate"] == TECHNIQUES["freeze"].default_learning_rate
    again = TunelabConfig.model_validate(dumped)
    assert again.technique == config.technique and again.training.max_steps == 3


@pytest.mark.parametrize(("given", "echoed"), [(32, "32"), (32.0, "32"), ("32.0", "32"), (0, "0"), (0.05, "0.05")])
def test_val_size_is_echoed_as_a_count_or_a_fraction(tmp_path: Path, given: object, echoed: str) -> None:
    """A count of validation records is echoed as a count (config.yaml, `tunelab config show`), not as 32.0 (the
    field is a float, and pydantic wrote every count as one); a fraction stays a fraction."""
    from tunelab.config.describe import describe_yaml

    config = load_config(write_config(tmp_path, "model:\n  dtype: float32\n"), [f"data.val_size={given}"])
    assert f"  val_size: {echoed}\n" in config.to_yaml()
    assert f"\n  val_size: {echoed}\n" in describe_yaml(config, yaml.safe_load(config.to_yaml()))


def test_val_size_above_one_must_be_a_whole_count(tmp_path: Path) -> None:
    """2.5 was silently cut to a count of 2: neither a fraction nor a count, it is refused."""
    message = config_error(write_config(tmp_path, "data:\n  val_size: 2.5\n"))
    assert "data.val_size: expected a fraction below 1 or a whole count of records (got 2.5)" in message


def test_every_field_has_a_description() -> None:
    missing = []
    sections = [TunelabConfig, *(f.annotation for f in TunelabConfig.model_fields.values() if isinstance(f.annotation, type))]
    sections += [t.config_class for t in TECHNIQUES.values()]
    for section in sections:
        for name, field in section.model_fields.items():
            if not field.description:
                missing.append(f"{section.__name__}.{name}")
    assert not missing


def test_a_tag_with_a_bad_value_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("training:\n  max_steps: !!int abc\n")
    with pytest.raises(ConfigError, match="invalid YAML value"):
        load_config(path)


def test_chat_template_must_be_jinja_text() -> None:
    with pytest.raises(ConfigError, match="data.chat_template.*Jinja template text"):
        build_config({"data": {"chat_template": "chatml"}})
    assert build_config({"data": {"chat_template": "{{ messages }}"}}).data.chat_template == "{{ messages }}"


def test_build_config_never_edits_the_callers_dict() -> None:
    data = {"training": {"max_steps": 5}}
    build_config(data, ["training.max_steps=7"])
    assert data == {"training": {"max_steps": 5}}


def test_a_score_head_turns_off_text_figures_once_and_says_which(caplog: pytest.LogCaptureFixture) -> None:
    """A reward model's config turns the sample generations and the forgetting check off and logs which; its saved
    config (both off already, as a finished run's is read again by the plan or eval) logs nothing (the control)."""
    raw = {"model": {"name": "m"}, "data": {"train": ["p.jsonl"]}, "objective": {"name": "reward"}}
    with caplog.at_level("INFO", logger="tunelab"):
        config = build_config(raw)
    said = [r.getMessage() for r in caplog.records if "no sample generations" in r.getMessage()]
    assert len(said) == 1 and said[0].endswith("eval.forgetting: false, eval.num_samples: 0")
    assert (config.eval.forgetting, config.eval.num_samples) == (False, 0)
    caplog.clear()
    with caplog.at_level("INFO", logger="tunelab"):
        build_config(yaml.safe_load(config.to_yaml()))
    assert not [r for r in caplog.records if "no sample generations" in r.getMessage()]
