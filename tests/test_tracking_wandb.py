"""training.report_to: wandb writes an offline Weights & Biases run inside the run folder, with the metrics that
metrics.jsonl holds, read back here from W&B's own run file (no server, no network)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

import pytest
from support.runs import tiny_run_config

from tunelab.fs import foreign_entries
from tunelab.runs import read_metrics
from tunelab.training import session

wandb_pb2 = pytest.importorskip("wandb.proto.wandb_internal_pb2", reason="wandb is in the test extra: pip install -e '.[test]'")

BLOCK, RECORD_HEADER = 32768, 7  # W&B's run file is a LevelDB-style log: 32 KiB blocks of (crc, length, type) records


def wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf Records of an offline run file (run-<id>.wandb): a 7-byte file header, then records split
    into FULL (1) or FIRST (2) / MIDDLE (3) / LAST (4) pieces that never straddle a block; a block's last bytes,
    too few for a record header, are padding."""
    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, (ident, magic)
    offset, pending = 7, b""
    while offset + RECORD_HEADER <= len(data):
        left = BLOCK - offset % BLOCK
        if left < RECORD_HEADER:
            offset += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset:offset + RECORD_HEADER])
        if kind == 0:  # zero-filled rest of the last block
            break
        pending += data[offset + RECORD_HEADER:offset + RECORD_HEADER + length]
        offset += RECORD_HEADER + length
        if kind in (1, 4):
            record = wandb_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_report_to_wandb_writes_an_offline_run_with_the_metrics(tiny_model_dir: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "online")  # a user's setting must not send anything: tunelab asks for offline
    monkeypatch.chdir(tmp_path)
    config = tiny_run_config(tiny_model_dir, tmp_path, training={"max_steps": 4, "eval_every": 2, "report_to": ["wandb"]})
    run_dir = session.train(config, progress=False).run_dir

    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history: dict[str, dict[int, float]] = {}
    configs = []
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            step = record.history.step.num
            for item in record.history.item:
                history.setdefault(item.key or "/".join(item.nested_key), {})[step] = json.loads(item.value_json)
        elif record.WhichOneof("record_type") == "run":
            configs.append({item.key: json.loads(item.value_json) for item in record.run.config.update})
    metrics = read_metrics(run_dir)
    train = {m["step"]: m["loss"] for m in metrics if m["kind"] == "train"}
    evals = {m["step"]: m["loss"] for m in metrics if m["kind"] == "eval"}
    assert history["train/loss"] == pytest.approx(train) and sorted(train) == [1, 2, 3, 4]
    assert history["eval/loss"] == pytest.approx(evals) and sorted(evals) == [2, 4]
    assert configs and configs[0]["technique"]["name"] == config.technique.name
    assert not (tmp_path / "wandb").exists()  # nothing beside the run folder
    assert foreign_entries(run_dir) == []  # RUN/wandb is recorded as tunelab's
