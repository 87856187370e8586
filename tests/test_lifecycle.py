"""A run's life: a pre-flight error leaves nothing behind, a finished run stays finished, a resume recomputes what
its changed settings invalidate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.ddp_driver import StopAfter
from support.runs import tiny_run_config
from support.tiny import toy_chat_records, write_jsonl

from tunelab import checkpoint as ckpt
from tunelab import fs
from tunelab.training import loop
from tunelab.config import ConfigError
from tunelab.data import DataError
from tunelab.runs import list_runs, read_metrics
from tunelab.training import train


# ---------------------------------------------------------------- pre-flight errors (issue 6, item 12)


def test_a_pre_flight_error_leaves_no_run_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"oops"\n')
    config = tiny_run_config(tiny_model_dir, tmp_path, data=bad, output={"dir": str(tmp_path / "runs" / "mine")})
    with pytest.raises(DataError):
        train(config, progress=False)
    assert not (tmp_path / "runs" / "mine").exists()
    assert list_runs(tmp_path / "runs") == []  # `tunelab runs` lists no failed run that never started


def test_a_pre_flight_error_in_the_users_empty_folder_keeps_the_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    config = tiny_run_config(tiny_model_dir, tmp_path, technique={"name": "freeze", "layers": [40]},
                         output={"dir": str(run_dir)})
    with pytest.raises(Exception, match="out of range"):
        train(config, progress=False)
    assert run_dir.is_dir() and list(run_dir.iterdir()) == []


# ---------------------------------------------------------------- a finished run (issue 6, item 11)


def test_resume_on_a_finished_run_says_it_is_finished_and_changes_nothing(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The defect: the checkpoint of an earlier interruption outlived completion, and --resume rolled back to it,
    retrained the last steps and replaced the finished adapter and eval.json."""
    config = tiny_run_config(tiny_model_dir, tmp_path, training={"max_steps": 6}, eval={"before_after": False})
    with monkeypatch.context() as patch:
        patch.setattr(loop, "_StopRequest", StopAfter(3))
        assert train(config, progress=False).status == "interrupted"
    assert (train(config, resume=True, progress=False).status) == "completed"
    run_dir = Path(config.output.dir)
    before = {p.name: p.read_bytes() for p in [run_dir / "eval.json", run_dir / "adapter" / "adapter_model.safetensors",
                                                run_dir / "metrics.jsonl", run_dir / "status.json"]}
    with pytest.raises(ConfigError, match=r"already finished \(completed at step 6\); there is nothing to resume"):
        train(config, resume=True, progress=False)
    longer = tiny_run_config(tiny_model_dir, tmp_path, training={"max_steps": 8}, eval={"before_after": False})
    with pytest.raises(ConfigError, match="no checkpoint of that step.*latest: step-000003"):
        train(longer, resume=True, progress=False)  # more steps from step 3 would retrain 4-6
    after = {p.name: p.read_bytes() for p in [run_dir / "eval.json", run_dir / "adapter" / "adapter_model.safetensors",
                                               run_dir / "metrics.jsonl", run_dir / "status.json"]}
    assert after == before


def test_a_finished_run_with_a_checkpoint_of_its_last_step_can_train_further(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = tiny_run_config(tiny_model_dir, tmp_path, training={"max_steps": 2, "save_every": 2}, eval={"before_after": False})
    train(config, progress=False)
    longer = tiny_run_config(tiny_model_dir, tmp_path, training={"max_steps": 3, "save_every": 2}, eval={"before_after": False})
    result = train(longer, resume=True, progress=False)
    assert (result.status, result.step) == ("completed", 3)
    assert [m["step"] for m in read_metrics(result.run_dir) if m["kind"] == "train"] == [1, 2, 3]
    assert ckpt.read_state(ckpt.latest_checkpoint(result.run_dir / "checkpoints"))["step"] == 2


# ---------------------------------------------------------------- base_eval.json on resume (issue 6, item 7)


def test_resume_recomputes_base_eval_when_eval_settings_changed(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", toy_chat_records(48))
    config = tiny_run_config(tiny_model_dir, tmp_path, data, training={"max_steps": 4},
                         eval={"max_examples": 4, "num_samples": 1, "max_new_tokens": 2})
    config.data.val_size = 12
    with monkeypatch.context() as patch:
        patch.setattr(loop, "_StopRequest", StopAfter(2))
        assert train(config, progress=False).status == "interrupted"
    run_dir = Path(config.output.dir)
    first = json.loads((run_dir / "base_eval.json").read_text())
    wider = tiny_run_config(tiny_model_dir, tmp_path, data, training={"max_steps": 4},
                        eval={"max_examples": 12, "num_samples": 1, "max_new_tokens": 2})
    wider.data.val_size = 12
    result = train(wider, resume=True, progress=False)
    base = json.loads((run_dir / "base_eval.json").read_text())
    assert base["tokens"] > first["tokens"], "the base figures must come from the same 12 examples as the tuned ones"
    assert result.evaluation["base"]["tokens"] == result.evaluation["tuned"]["tokens"]


# ---------------------------------------------------------------- status.json follows the run (issue 19)


def test_status_json_follows_the_run_at_every_metrics_line(tiny_model_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader of status.json while the run trains sees the step of the latest metrics line, never "step": 0."""
    seen: list[tuple[int, str, int]] = []  # (metrics line's step, status on disk, status's step on disk)
    append = fs.append_entry_line

    def watching(folder: Path, name: str, line: str) -> None:
        if name == "metrics.jsonl":
            status = json.loads((folder / "status.json").read_text())
            seen.append((json.loads(line)["step"], status["status"], status["step"]))
        append(folder, name, line)

    monkeypatch.setattr(fs, "append_entry_line", watching)
    config = tiny_run_config(tiny_model_dir, tmp_path, eval={"before_after": False},
                             training={"max_steps": 6, "log_every": 2, "eval_every": 3})
    result = train(config, progress=False)
    assert [step for step, _, _ in seen] == [2, 3, 4, 6, 6], seen  # train lines at 2, 4, 6; evaluations at 3, 6
    assert all(status == "running" and on_disk == step for step, status, on_disk in seen), seen
    assert json.loads((result.run_dir / "status.json").read_text())["step"] == 6


@pytest.mark.parametrize("raised, recorded", [(KeyError("learning_rate"), "KeyError: 'learning_rate'"),
                                              (DataError("data.jsonl:3: no text"), "data.jsonl:3: no text")])
def test_a_failed_run_records_its_error_with_its_type(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       raised: Exception, recorded: str) -> None:
    """status.json, which `tunelab runs` and compare quote, names the type of an error that is not tunelab's own (a
    KeyError's message is only the key); tunelab's own errors are recorded as written, to be read as they are."""
    from tunelab.training import session

    def fail(ctx, state):  # noqa: ANN001, ANN202 - run_loop's signature
        raise raised

    monkeypatch.setattr(session, "run_loop", fail)
    config = tiny_run_config(tiny_model_dir, tmp_path, output={"dir": str(tmp_path / "run")})
    with pytest.raises(type(raised)):
        train(config, progress=False)
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "failed" and status["error"] == recorded
