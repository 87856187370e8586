"""Ctrl-C on a real `tunelab train` process: it finishes the step, saves a resumable checkpoint, exits 130,
and `--resume` continues from that checkpoint to the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from support.tiny import toy_chat_records, write_jsonl

from tunelab.checkpoint import latest_checkpoint, read_state


def _tunelab(*args: str) -> list[str]:
    return [sys.executable, "-c", "from tunelab.cli import main; main()", *args]


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", toy_chat_records(48))
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {{name: {tiny_model_dir}}}\n"
        f"data: {{train: {data}, val_size: 4, max_length: 64}}\n"
        "technique: {name: lora, r: 4}\n"
        "training: {max_steps: 100000, micro_batch_size: 2, learning_rate: 0.001}\n"
        "eval: {num_samples: 1, max_new_tokens: 4}\n"
        f"output: {{dir: {tmp_path / 'run'}}}\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(_tunelab("train", str(config), "--no-progress", "--set", "eval.max_new_tokens=5"), env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    assert metrics.is_file(), "training never started"
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    assert "Interrupted at step" in output
    # The hint repeats the user's overrides: without them a resume would be a different run.
    assert f"Continue with: tunelab train {config} --resume --set=eval.max_new_tokens=5\n" in output, output

    checkpoint = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert checkpoint is not None, "Ctrl-C must leave a resumable checkpoint"
    stopped_at = read_state(checkpoint)["step"]
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "interrupted"
    first = json.loads((tmp_path / "run" / "run_info.json").read_text())

    resumed = subprocess.run(
        _tunelab("train", str(config), "--resume", "--no-progress", "--set=eval.max_new_tokens=5",
                 "--set", f"training.max_steps={stopped_at + 3}"),
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"train"' in line]
    assert steps == list(range(1, stopped_at + 4)), "resume must continue at the step after the checkpoint, once each"
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    # run_info.json covers both sessions, each listed: times and tokens add up, the peak is the higher one
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    earlier, last = info["sessions"]
    assert earlier["wall_time_s"] == first["wall_time_s"] and earlier["started"] == info["started"] == first["started"]
    assert info["wall_time_s"] == round(first["wall_time_s"] + last["wall_time_s"], 3)
    assert info["training_tokens"] == first["training_tokens"] + last["training_tokens"] and last["training_tokens"] > 0
    training_s = first["phases_s"]["training"] + last["phases_s"]["training"]
    assert info["phases_s"]["training"] == round(training_s, 3)
    assert info["tokens_per_s"] == round(info["training_tokens"] / info["phases_s"]["training"], 1)
    assert info["peak_memory"]["rss_bytes"] == max(first["peak_memory"]["rss_bytes"], last["peak_memory"]["rss_bytes"])
