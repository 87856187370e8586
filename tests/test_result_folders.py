"""One opener for every result folder, and what each technique declares about serving.

- `tunelab eval`, `generate`, `chat`, `merge` and `serve` given a bottleneck adapter folder on its own (technique
  'adapter', copied out of its run) open it on the base its adapter_config.json names, as the run opens, or refuse
  it with the reason.
- Every registered technique (and LoRA's DoRA variant), served alone and beside a LoRA run, either answers what
  offline greedy decoding of the opened result answers, or is refused at start-up, as its ``mixed_batch``
  declaration says."""

from __future__ import annotations

import io
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.errors import ConfigError
from tunelab.eval.runner import EvalSettings, evaluate
from tunelab.generation import GenerationRequest, Sampling, generate_batch
from tunelab.result import find_result, load_run
from tunelab.serve.engine import Engine, Job, load_models
from tunelab.techniques import TECHNIQUES
from tunelab.techniques.adapter import MERGE_REFUSAL
from tunelab.training import train
from tunelab.use import chat_loop, generate_from_run

from support.runs import tiny_config

PROMPT = "say something 3"
TASKS = ("owls", "cats")


def records(n: int, word: str = "owl", tasks: bool = False) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "user", "content": f"say something {i}"},
                          {"role": "assistant", "content": f"{word} {word} {word}"}],
             **({"task": TASKS[i % 2]} if tasks else {})} for i in range(n)]


def write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_run(root: Path, model_dir: Path, name: str, technique: dict[str, Any], steps: int = 1,
             tasks: bool = False) -> Path:
    data = write(root / f"{name}.jsonl", records(24, tasks=tasks))
    config = tiny_config(
        model_dir, data={"train": [str(data)], "val_size": 4, "max_length": 48}, technique=technique,
        training={"max_steps": steps, "micro_batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0.0},
        eval={"before_after": False, "forgetting": False, "num_samples": 0}, output={"dir": str(root / name)})
    return train(config, progress=False).run_dir


@pytest.fixture(scope="module")
def folders(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A bottleneck run, its adapter folder copied out on its own, a LoRA run and a test file."""
    root = tmp_path_factory.mktemp("result-folders")
    run = tiny_run(root, tiny_model_dir, "owl-run", {"name": "adapter", "reduction_factor": 4}, steps=10)
    bare = root / "owl-bottleneck"
    shutil.copytree(run / "adapter", bare)
    lora = tiny_run(root, tiny_model_dir, "lora-run", {"name": "lora", "r": 4, "dropout": 0.0}, steps=4)
    return {"run": run, "bare": bare, "lora": lora, "test": write(root / "test.jsonl", records(8)), "root": root}


def test_eval_opens_a_bottleneck_adapter_folder_as_its_run(folders: dict[str, Path], tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["eval", str(folders["bare"]), "--data", str(folders["test"]), "--metric",
                                      "rouge_l", "--max-new-tokens", "4", "--resamples", "20",
                                      "--output", str(tmp_path / "bare")])
    assert result.exit_code == 0, result.output
    bare = json.loads((tmp_path / "bare" / "eval.json").read_text())
    settings = EvalSettings(metrics=["rouge_l"], max_new_tokens=4, resamples=20)
    run = evaluate(folders["run"], [folders["test"]], output=tmp_path / "run", settings=settings)
    base_model = json.loads((folders["bare"] / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = evaluate(base_model, [folders["test"]], output=tmp_path / "base", settings=settings)
    loss = {name: r["metrics"]["loss"]["scores"][r["target"]] for name, r in (("bare", bare), ("run", run), ("base", base))}
    assert bare["target"] == "owl-bottleneck"
    assert loss["bare"] == pytest.approx(loss["run"], rel=1e-6)
    assert loss["bare"] != pytest.approx(loss["base"], rel=1e-3)  # the adapter is really on


def test_generate_opens_a_bottleneck_adapter_folder_as_its_run(folders: dict[str, Path]) -> None:
    from_run = [r["output"] for r in generate_from_run(folders["run"], [PROMPT], None, Sampling(max_new_tokens=6))]
    from_bare = [r["output"] for r in generate_from_run(folders["bare"], [PROMPT], None, Sampling(max_new_tokens=6))]
    assert from_bare == from_run
    result = CliRunner().invoke(app, ["generate", str(folders["bare"]), "--prompt", PROMPT, "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == from_run[0]


def test_chat_replies_from_a_bottleneck_adapter_folder_equal_the_runs(folders: dict[str, Path]) -> None:
    def conversation(folder: Path) -> str:
        lines = iter([PROMPT, "/exit"])
        out = io.StringIO()
        chat_loop(folder, None, Sampling(max_new_tokens=6), read=lambda _: next(lines), out=out)
        return out.getvalue().split("assistant> ", 1)[1]

    bare, run = conversation(folders["bare"]), conversation(folders["run"])
    assert bare == run and bare.strip()


def test_merge_refuses_a_bottleneck_adapter_folder_with_the_reason(folders: dict[str, Path]) -> None:
    before = sorted(p.name for p in folders["bare"].iterdir())
    result = CliRunner().invoke(app, ["merge", str(folders["bare"])])
    assert result.exit_code != 0
    flat = " ".join(result.output.split())
    assert "technique 'adapter' cannot be merged" in flat and " ".join(MERGE_REFUSAL.split()) in flat
    assert sorted(p.name for p in folders["bare"].iterdir()) == before  # nothing written


def served_tokens(model: Any, served: dict[str, Any], name: str, prompt_ids: list[int], n: int) -> list[int]:
    """What the server's engine generates for one request to ``name``."""
    engine = Engine(model, served)
    done, errors = threading.Event(), []
    request = GenerationRequest(list(prompt_ids), Sampling(max_new_tokens=n), adapter=name)
    engine.submit(Job(request, lambda job, error: (errors.append(error), done.set())))
    assert done.wait(120)
    engine.close()
    assert errors == [None]
    return request.token_ids


def offline_tokens(folder: Path, n: int) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy tokens) of the result opened on its own, without the server."""
    loaded = load_run(folder, device="cpu")
    ids = loaded.tokenizer(PROMPT)["input_ids"]
    request = GenerationRequest(list(ids), Sampling(max_new_tokens=n))
    generate_batch(loaded.model, loaded.tokenizer, [request])
    return ids, request.token_ids


def test_serve_takes_a_bottleneck_adapter_folder_alone_and_refuses_it_beside_a_lora(folders: dict[str, Path]) -> None:
    model, served = load_models([folders["bare"]], device="cpu")
    assert list(served) == ["owl-bottleneck"]  # alone: no 'base' that would not answer as the base
    ids, expected = offline_tokens(folders["run"], 6)
    assert served_tokens(model, served, "owl-bottleneck", ids, 6) == expected
    with pytest.raises(ConfigError, match="owl-bottleneck: its result \\(adapter\\) cannot share a batch.*serve it alone"):
        load_models([folders["lora"], folders["bare"]], device="cpu")


# Small settings per technique (the tiny model: hidden size 64, 2 layers); 'dora' is LoRA's DoRA variant.
SETTINGS: dict[str, dict[str, Any]] = {
    "full": {}, "freeze": {"layers": [-1]}, "lora": {"r": 4, "dropout": 0.0},
    "dora": {"name": "lora", "r": 4, "dropout": 0.0, "use_dora": True}, "qlora": {"r": 4, "dropout": 0.0},
    "adalora": {"init_r": 4, "target_r": 2}, "ia3": {}, "loha": {"r": 4}, "lokr": {"r": 4}, "vera": {"r": 16},
    "prompt_tuning": {"num_virtual_tokens": 4}, "multitask_prompt_tuning": {"num_virtual_tokens": 4, "num_ranks": 2},
    "prefix_tuning": {"num_virtual_tokens": 4}, "p_tuning": {"num_virtual_tokens": 4},
    "adapter": {"reduction_factor": 4}, "adapter_routing": {},
}


STEPS = {"adalora": 3}  # AdaLoRA's rank allocator needs a few steps of importance scores before its schedule starts


def test_every_registered_technique_is_served_here() -> None:
    assert set(TECHNIQUES) <= set(SETTINGS)


@pytest.fixture(scope="module")
def technique_runs(folders: dict[str, Path], tiny_model_dir: Path) -> dict[str, Path]:
    """One-step runs, trained on first use."""
    root, cache = folders["root"], {}

    class Lazy(dict):
        def __missing__(self, case: str) -> Path:
            technique = {"name": case, **SETTINGS[case]}
            if case == "adapter_routing":
                technique["adapters"] = {"lora": str(folders["lora"]), "owl": str(folders["run"])}
            self[case] = tiny_run(root, tiny_model_dir, f"served-{case}", technique, steps=STEPS.get(case, 1),
                                  tasks=case == "multitask_prompt_tuning")
            return self[case]

    return Lazy(cache)


@pytest.mark.parametrize("case", list(SETTINGS))
def test_each_technique_served_alone_and_beside_a_lora_answers_or_is_refused(
        technique_runs: dict[str, Path], folders: dict[str, Path], case: str) -> None:
    run = technique_runs[case]
    found = find_result(run)
    ids, expected = offline_tokens(run, 5)
    model, served = load_models([run], device="cpu")
    assert served_tokens(model, served, run.name, ids, 5) == expected
    reason = found.technique.mixed_batch(found.result_dir)
    if reason is None:
        model, served = load_models([folders["lora"], run], device="cpu")
        assert served_tokens(model, served, run.name, ids, 5) == expected
        assert served_tokens(model, served, folders["lora"].name, ids, 5) == offline_tokens(folders["lora"], 5)[1]
    else:
        with pytest.raises(ConfigError, match="cannot share a batch with other adapters"):
            load_models([folders["lora"], run], device="cpu")


@pytest.mark.parametrize("case", ["adapter", "freeze", "lora"])
def test_the_card_shows_how_the_result_loads_without_tunelab(technique_runs: dict[str, Path], tiny_model_dir: Path,
                                                             case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    run = technique_runs[case]
    found = find_result(run)
    card = (found.result_dir / "README.md").read_text()
    assert f"library_name: {found.technique.card.library}" in card
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(run)  # the card names the result folder relative to the run folder
    scope: dict[str, Any] = {"BASE": str(tiny_model_dir)}
    exec(snippet, scope)  # noqa: S102 - the card's own code, as a reader would paste it
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        assert torch.allclose(scope["model"](ids).logits, load_run(run, device="cpu").model(ids).logits, atol=1e-5)
