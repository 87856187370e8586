"""The rewards of online objectives: the built-ins on fixed texts, a user's function with TRL's convention (prompts,
completions, every reference column as a keyword), weights, and one clear error naming the function and the record
when a function raises, miscounts or returns a value that is not finite."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tunelab.errors import ConfigError, TrainingAborted
from tunelab.objectives.online import RewardSettings
from tunelab.rewards import Reward, build_rewards, score

CPU = torch.device("cpu")


def terms(settings: list, completions: list[str], columns: list[dict] | None = None):  # noqa: ANN201
    rewards = build_rewards([RewardSettings.model_validate(s) for s in settings], CPU)
    columns = columns if columns is not None else [{"reference": "Paris."} for _ in completions]
    return score(rewards, ["q"] * len(completions), completions, columns, [f"f:{i + 1}" for i in range(len(completions))])


def test_built_ins_on_fixed_texts() -> None:
    scored = terms(["exact_match", "rouge_l", {"function": "regex", "pattern": r"^\w+\.$"},
                    {"function": "length", "max_words": 2}],
                   ["paris", "the city of paris", "Paris. Paris. Paris. Paris."])
    assert scored.terms["exact_match"].tolist() == [1.0, 0.0, 0.0]
    assert scored.terms["rouge_l"].tolist() == pytest.approx([1.0, 2 * (1 / 4) * 1 / (1 / 4 + 1), 2 * 0.25 / 1.25])
    assert scored.terms["regex"].tolist() == [0.0, 0.0, 0.0]
    assert scored.terms["length"].tolist() == [1.0, 0.0, 0.0]  # 4 words with max 2: 1 - 2/2 = 0
    assert terms([{"function": "length", "max_words": 4}], ["a b c d e"]).total.tolist() == pytest.approx([0.75])


def test_a_user_function_gets_prompts_completions_and_columns_and_weights_add_up(tmp_path: Path) -> None:
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(prompts, completions, reference, answer, **rest):\n"
        "    assert prompts == ['q', 'q'] and answer == [1, None]\n"
        "    return [float(len(c) <= len(r)) for c, r in zip(completions, reference)]\n")
    scored = terms([{"function": f"{tmp_path / 'my_rewards.py'}:brevity", "weight": 0.5}, {"function": "exact_match", "weight": 2}],
                   ["paris", "a very long answer"], [{"reference": "Paris.", "answer": 1}, {"reference": "Paris."}])
    assert scored.terms["brevity"].tolist() == [1.0, 0.0]
    assert scored.total.tolist() == [0.5 * 1 + 2 * 1, 0.0]


def test_a_users_reward_file_runs_once_for_the_check_and_the_run_and_again_once_edited(tmp_path: Path) -> None:
    """Training checks its rewards before loading weights (``check_rewards``) and then builds them: the user's file
    is executed once for both, not twice (its top-level code may be costly or have effects); an edited file is read
    again."""
    import os
    from types import SimpleNamespace

    from tunelab.objectives.online import check_rewards

    runs = tmp_path / "runs.txt"
    reward = tmp_path / "counted.py"
    reward.write_text(f"open({str(runs)!r}, 'a').write('x')\ndef r(prompts, completions, **k):\n    return [1.0] * len(completions)\n")
    spec = f"{reward}:r"
    check_rewards(SimpleNamespace(rewards=[RewardSettings(function=spec)]), [])
    build_rewards([RewardSettings(function=spec)], CPU)
    assert runs.read_text() == "x"
    reward.write_text(reward.read_text() + "# edited\n")
    os.utime(reward, ns=(reward.stat().st_atime_ns, reward.stat().st_mtime_ns + 10**9))
    build_rewards([RewardSettings(function=spec)], CPU)
    assert runs.read_text() == "xx"


def test_a_reward_file_edited_within_the_same_modification_time_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cache of users' reward files was keyed on the modification time: on a filesystem with coarse times, an
    edit within the same second (here: the same size, the time set back exactly) kept the old function. It is keyed
    on the content, which is also what is executed: Python's own __pycache__ copy, written by default (the tests
    turn it off), is validated by the same time and size."""
    import os
    import sys

    from tunelab.objectives.online import user_function

    monkeypatch.setattr(sys, "dont_write_bytecode", False)  # as a user's Python runs

    reward = tmp_path / "same_second.py"
    reward.write_text("def r(prompts, completions, **k):\n    return [1.0] * len(completions)\n")
    stamp = reward.stat()
    assert user_function(f"{reward}:r")([], ["a"]) == [1.0]
    reward.write_text("def r(prompts, completions, **k):\n    return [2.0] * len(completions)\n")
    os.utime(reward, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert reward.stat().st_mtime_ns == stamp.st_mtime_ns and reward.stat().st_size == stamp.st_size
    assert user_function(f"{reward}:r")([], ["a"]) == [2.0]


@pytest.mark.parametrize(("function", "message"), [
    (lambda p, c, **k: 1 / 0, r"reward bad raised ZeroDivisionError: division by zero \(on the completions of f:1, f:2\)"),
    (lambda p, c, **k: [1.0], r"reward bad returned 1 values for 2 completions \(of f:1, f:2\)"),
    (lambda p, c, **k: [1.0, float("nan")], r"reward bad returned nan for the completion of f:2; expected a finite"),
    (lambda p, c, **k: [1.0, "high"], r"reward bad returned 'high' for the completion of f:2"),
])
def test_a_failing_function_is_one_error_naming_it_and_the_record(function, message: str) -> None:  # noqa: ANN001
    with pytest.raises(TrainingAborted, match=message):
        score([Reward("bad", 1.0, function)], ["q", "q"], ["a", "b"], [{}, {}], ["f:1", "f:2"])


def test_unresolvable_rewards_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="cannot import 'no_such_module_xyz'"):
        build_rewards([RewardSettings(function="no_such_module_xyz:f")], CPU)
    with pytest.raises(ConfigError, match="reads the column 'answer'"):
        terms([{"function": "exact_match", "column": "answer"}], ["x"])
    with pytest.raises(ValueError, match="needs a `pattern`"):
        RewardSettings(function="regex")
    with pytest.raises(ValueError, match="expected a built-in"):
        RewardSettings(function="rouge")


def test_a_reward_model_run_scores_prompt_and_completion_as_its_head_does(tiny_model_dir: Path, tmp_path: Path) -> None:
    from support.preference import toy_pair_texts
    from support.runs import tiny_run_config
    from support.tiny import write_jsonl

    from tunelab.result import load_run
    from tunelab.training import train

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in toy_pair_texts(0, 24)])
    config = tiny_run_config(tiny_model_dir, tmp_path, pairs, objective={"name": "reward"},
                             training={"max_steps": 2, "grad_accum": 1}, eval={"before_after": False, "num_samples": 0})
    run = train(config, progress=False).run_dir
    scored = score(build_rewards([RewardSettings(run=str(run), weight=2.0)], CPU), ["say cat 1", "say dog 2"],
                   ["cat", "dog dog"], [{}, {}], ["f:1", "f:2"])
    loaded = load_run(run, "cpu")
    expected = []
    for prompt, completion in (("say cat 1", "cat"), ("say dog 2", "dog dog")):
        text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                                     {"role": "assistant", "content": completion}], tokenize=False)
        ids = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            expected.append(float(loaded.model(**ids).logits[0, 0]))
    name = next(iter(scored.terms))
    assert scored.terms[name].tolist() == pytest.approx(expected, abs=1e-5)
    assert scored.total.tolist() == pytest.approx([2 * e for e in expected], abs=1e-5)
    (tmp_path / "sft").mkdir()
    with pytest.raises(ConfigError, match="not a reward model"):
        sft = train(tiny_run_config(tiny_model_dir, tmp_path / "sft", training={"max_steps": 1, "grad_accum": 1},
                                    eval={"before_after": False}), progress=False).run_dir
        build_rewards([RewardSettings(run=str(sft))], CPU)
