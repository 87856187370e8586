"""Every example config: it starts with the command that runs it, validates against the schema, its data exists,
and it trains for two steps on the tiny in-process model (torchtune-style tests over every config)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.config import load_config
from tunelab.objectives import OBJECTIVES
from tunelab.techniques import TECHNIQUES

ROOT = Path(__file__).parents[1]
EXAMPLES = sorted((ROOT / "examples").rglob("*.yaml")) + [ROOT / "src" / "tunelab" / "recipes" / "quickstart.yaml"]


def test_there_are_examples_at_every_level() -> None:
    levels = {p.parent.name for p in EXAMPLES}
    assert {"beginner", "intermediate", "expert"} <= levels


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_example_starts_with_its_command_and_validates(path: Path) -> None:
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# tunelab "), f"{path}: the first line must be the command that runs it"
    if path.parent.name != "recipes":
        assert str(path.relative_to(ROOT)) in first_line
    config = load_config(path)
    assert config.data.train, f"{path}: no training data"
    for data_file in config.data.train + config.data.validation:
        assert Path(data_file).is_file(), f"{path}: data file {data_file} does not exist"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_example_trains_two_steps_on_tiny_model(path: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    from tunelab.training import train

    score_head = OBJECTIVES[load_config(path).objective.name].num_labels is not None  # generates no samples
    tiny = [
        f"model.name={tiny_model_dir}", "training.max_steps=2", "training.eval_every=null",
        "training.early_stopping_patience=null", *([] if score_head else ["eval.num_samples=1"]),
        "eval.max_new_tokens=4", "eval.max_examples=8",
    ]
    config = load_config(path, [*tiny, f"output.dir={tmp_path / 'run'}"])
    experts = getattr(config.technique, "adapters", None)
    if experts:  # a routing example names the runs its first-line commands make: make them on the tiny model too
        made = [f"technique.adapters.{name}={_tiny_adapter_run(config, tiny, tmp_path / name)}" for name in experts]
        config = load_config(path, [*tiny, f"output.dir={tmp_path / 'run'}", *made])
    rewards = getattr(config.objective, "rewards", None) or []
    if any(r.run for r in rewards):  # an RLHF example scores with the reward run its first-line commands make
        made = _tiny_reward_run(tiny, tmp_path / "reward")
        terms = [{**r.model_dump(exclude_none=True), **({"run": str(made)} if r.run else {})} for r in rewards]
        config = load_config(path, [*tiny, f"output.dir={tmp_path / 'run'}", f"objective.rewards={json.dumps(terms)}"])
    result = train(config, progress=False)
    assert result.status == "completed" and result.step == 2
    evaluation = json.loads((result.run_dir / "eval.json").read_text())
    # Before/after on one and the same validation subset, with finite figures.
    assert evaluation["base"]["tokens"] == evaluation["tuned"]["tokens"] > 0
    if OBJECTIVES[config.objective.name].prepare is not None:  # online: the loss is minus the mean reward
        assert all(abs(evaluation[side]["mean_reward"]) < float("inf") for side in ("base", "tuned"))
    else:
        assert 0 < evaluation["tuned"]["loss"] < float("inf") and 0 < evaluation["base"]["loss"] < float("inf")
    assert (result.run_dir / TECHNIQUES[config.technique.name].result_dir_name).is_dir()
    # The saved result is a trained model, not the base: it opens with load_run and its logits moved.
    _assert_result_differs_from_base(result.run_dir, tiny_model_dir)


def _assert_result_differs_from_base(run_dir: Path, base_dir: Path) -> None:
    import torch

    from tunelab.models import head_class
    from tunelab.result import load_run

    loaded = load_run(run_dir, device="cpu", dtype="float32")
    ids = loaded.tokenizer("say fox 3", return_tensors="pt")["input_ids"]
    labels = loaded.model.config.num_labels if "ForSequenceClassification" in type(loaded.model).__name__ else None
    with torch.no_grad():
        # (1, V) at the last position (virtual tokens come first); a classifier's (1, k) scores
        last = (lambda logits: logits[:, -1]) if labels is None else (lambda logits: logits)  # noqa: E731
        tuned = last(loaded.model(input_ids=ids).logits)
        base_model = head_class(labels).from_pretrained(base_dir, **({"num_labels": labels} if labels else {}))
        base = last(base_model.eval()(input_ids=ids).logits)
    assert tuned.shape == base.shape and not torch.allclose(tuned, base, atol=1e-6), "two steps changed nothing"


def _tiny_adapter_run(config, tiny: list[str], out: Path) -> Path:
    """A two-step bottleneck adapter run on the routing example's data, as an expert for it."""
    from tunelab.config import build_config
    from tunelab.training import train

    data = config.data.model_dump(mode="json")
    expert = build_config({"data": data, "technique": {"name": "adapter"}, "output": {"dir": str(out)}}, tiny)
    return train(expert, progress=False).run_dir


def _tiny_reward_run(tiny: list[str], out: Path) -> Path:
    """A two-step reward model run of the reward example on the tiny model (a score head: no sample generations)."""
    from tunelab.training import train

    settings = [item for item in tiny if not item.startswith("eval.num_samples")]
    config = load_config(ROOT / "examples" / "intermediate" / "reward-lora.yaml", [*settings, f"output.dir={out}"])
    return train(config, progress=False).run_dir
