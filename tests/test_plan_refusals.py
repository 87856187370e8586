"""`tunelab plan` refuses what `tunelab train` refuses, before any work, with the same words: a reward model run
that is not there or is no reward model."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.online import toy_prompts_file
from support.runs import tiny_config
from support.tiny import toy_chat_records, write_jsonl

from tunelab.plan import Shape, plan_memory

RUNTIME = 0  # the runtime term is not what these tests check


def config_for(tiny_model_dir: Path, tmp_path: Path, technique: str):  # noqa: ANN201
    data = write_jsonl(tmp_path / "train.jsonl", toy_chat_records(24))
    return tiny_config(tiny_model_dir, {"dtype": "float32"}, data={"train": [str(data)], "val_size": 0, "max_length": 64},
                       technique={"name": technique}, training={"max_steps": 2, "micro_batch_size": 2},
                       eval={"before_after": False, "forgetting": False, "num_samples": 0},
                       output={"dir": str(tmp_path / "run")})


def online_config(tiny_model_dir: Path, tmp_path: Path, objective: str, **settings):  # noqa: ANN201, ANN003
    return tiny_config(tiny_model_dir, {"dtype": "float32"},
                       data={"train": [str(toy_prompts_file(tmp_path, 24))], "val_size": 0, "max_length": 64},
                       technique={"name": "lora"},
                       objective={"name": objective, "rewards": [{"function": "length", "max_words": 4}],
                                  "max_completion_length": 8, **settings},
                       training={"max_steps": 2, "micro_batch_size": 2},
                       eval={"before_after": False, "forgetting": False, "num_samples": 0},
                       output={"dir": str(tmp_path / "run")})


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
