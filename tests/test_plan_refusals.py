"""`tunelab plan` refuses what `tunelab train` refuses, before any work, with the same words: a reward model run
that is not there or is no reward model, a reward reading a column the prompts lack, a user's reward that does not
import."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.planning import config_for, online_config

from tunelab.plan import Shape, data_shape, plan_memory

RUNTIME = 0  # the runtime term is not what these tests check


def test_a_reward_run_that_is_missing_or_no_reward_model_is_refused_by_the_plan_as_by_training(tiny_model_dir, tmp_path):
    """`tunelab plan` of an online config whose reward model run is not there yet (the PPO example before its
    reward run) or is no reward model says so, as training does, instead of a FileNotFoundError traceback (a
    missing run) or a plan of a run training would refuse (another objective's run)."""
    from tunelab.config import ConfigError

    missing = tmp_path / "no-reward-run"
    with pytest.raises(ConfigError, match=rf"reward run {missing}: not a tunelab run folder \(no config.yaml\)"):
        plan_memory(online_config(tiny_model_dir, tmp_path, "ppo", rewards=[{"run": str(missing)}]), "cpu",
                    Shape(micro_batch_size=2, length=32), runtime=RUNTIME)
    sft_run = tmp_path / "sft-run"  # a run folder of another objective: its config is all the planner reads
    sft_run.mkdir()
    (sft_run / "config.yaml").write_text(config_for(tiny_model_dir, tmp_path, "lora").to_yaml())
    with pytest.raises(ConfigError, match=rf"reward run {sft_run}: not a reward model"):
        plan_memory(online_config(tiny_model_dir, tmp_path, "ppo", rewards=[{"run": str(sft_run)}]), "cpu",
                    Shape(micro_batch_size=2, length=32), runtime=RUNTIME)


@pytest.mark.parametrize(("reward", "message"), [
    ({"function": "exact_match", "column": "answer"},
     r"reward exact_match reads the column 'answer', which the prompt records do not have \(they have: reference\)"),
    ({"function": "rouge_l", "column": "answer"}, r"reward rouge_l reads the column 'answer'"),
    ({"function": "no_such_module_xyz:f"}, r"reward 'no_such_module_xyz:f': cannot import 'no_such_module_xyz'"),
])
def test_rewards_training_cannot_compute_are_refused_by_the_plan_in_trainings_words(tiny_model_dir, tmp_path,
                                                                                     reward, message):
    """A reward reading a column the prompt records lack, or a user's function that does not import: `tunelab plan`
    used to plan such a run, which `tunelab train` then refused. Both now run the one check (objectives'
    check_rewards) on the prepared data, before any weight is read, and refuse in the same words."""
    from tunelab.config import ConfigError
    from tunelab.training import train

    config = online_config(tiny_model_dir, tmp_path, "grpo", rewards=[reward])
    with pytest.raises(ConfigError, match=message) as planned:
        data_shape(config)
    with pytest.raises(ConfigError, match=message) as trained:
        train(config, progress=False)
    assert str(planned.value) == str(trained.value)
