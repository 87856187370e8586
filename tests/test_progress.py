"""Training progress off a terminal (a log file, CI): plain lines with step, loss, tokens/s and ETA every few steps
and at each evaluation, where a progress bar would print nothing until the end."""

from __future__ import annotations

import json
import re
from pathlib import Path

from support.cli import invoke
from support.runs import TINY_RUN, tiny_config_dict
from support.tiny import toy_chat_records, write_jsonl

from tunelab.training import context

STEP_LINE = re.compile(r"^step (\d+)/8  loss \d+\.\d{4}  lr \S+  [\d,]+ tokens/s  elapsed \d+:\d\d:\d\d  eta \d+:\d\d:\d\d$")
EVAL_LINE = re.compile(r"^step (\d+)/8  evaluation: val \d+\.\d{4}")


def test_training_piped_prints_a_plain_progress_line_every_few_steps_and_at_each_evaluation(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", toy_chat_records(48))
    config = tiny_config_dict(tiny_model_dir, data={"train": [str(data)], **TINY_RUN["data"]},
                              technique=TINY_RUN["technique"], eval={**TINY_RUN["eval"], "before_after": False},
                              training={**TINY_RUN["training"], "max_steps": 8, "log_every": 3, "eval_every": 4},
                              output={"dir": str(tmp_path / "run")})
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    assert context.PLAIN_PROGRESS_LINES < 8 * 3  # so log_every (3), not the run's length, sets the cadence here
    result = invoke("train", path)  # the CLI's output is captured: not a terminal
    assert result.exit_code == 0, result.output
    lines = result.clean.splitlines()
    steps = [int(m.group(1)) for m in map(STEP_LINE.match, lines) if m]
    evaluations = [int(m.group(1)) for m in map(EVAL_LINE.match, lines) if m]
    assert steps == [1, 3, 6, 8], result.clean  # the first step, every log_every steps, the last
    assert evaluations == [4, 8], result.clean
    assert [line for line in lines if STEP_LINE.match(line)][-1].endswith("eta 0:00:00")  # nothing left at the end
    assert "━" not in result.clean  # no progress bar drawn into a log
