"""--recommend's time per step: the speed probe (shallow copies of the model trained as `tunelab train` trains) and
how its measured steps are split and scaled to each set-up. No test times anything: the probe's figures are
checked for what they are made of, not for their size (speed is measured in benchmarks)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from support.planning import config_for
from tunelab.models import load_model, load_model_config
from tunelab.plan import Shape, speed
from tunelab.plan.speed import PROBE_LAYERS, StepTime, step_times

SHAPE = Shape(micro_batch_size=2, length=32)


def probe_result(dtype: str, checkpointing: bool, layers: int, seconds: float, parameters: int = 1000) -> dict:
    return {"dtype": dtype, "checkpointing": checkpointing, "layers": layers, "seconds": seconds,
            "parameters": parameters}


def test_the_probe_trains_shallow_copies_of_the_model_and_measures_one_layer(tiny_model_dir, tmp_path):
    """A real probe on the tiny model: both settings asked for are measured, and its layer is exactly one decoder
    layer of the model, counted independently here."""
    config = config_for(tiny_model_dir, tmp_path, "full")
    times = speed.measure_step_times(config, SHAPE, [("float32", False), ("float32", True)])
    assert set(times) == {("float32", False), ("float32", True)}
    layer = sum(p.numel() for p in load_model(config.model).model.layers[0].parameters())
    for measured in times.values():
        assert measured.layer_parameters == layer
        assert measured.layer >= 0  # (the tiny model's steps are a few ms: metrics.jsonl's 10 ms resolution)


def test_the_probe_runs_split_into_one_layer_and_the_rest():
    """rest + shallow x layer is the shallow copy's step, rest + deep x layer the deep one's, a set-up with L layers
    rest + L x layer; the layer's parameters are the difference between the copies over the layers added."""
    shallow, deep = PROBE_LAYERS
    times = step_times([probe_result("bfloat16", False, shallow, 0.5, 1000),
                        probe_result("bfloat16", False, deep, 0.9, 1000 + 300 * (deep - shallow))])
    measured = times[("bfloat16", False)]
    assert measured.rest + shallow * measured.layer == pytest.approx(0.5)
    assert measured.rest + deep * measured.layer == pytest.approx(0.9)
    assert measured.predict(30) == pytest.approx(measured.rest + 30 * measured.layer)
    assert measured.layer_parameters == 300
    assert StepTime(rest=-0.2, layer=0.1, layer_parameters=1).predict(10) == pytest.approx(1.0)  # no negative rest


def test_checkpointed_probe_runs_go_first(tiny_model_dir, tmp_path, monkeypatch):
    """Checkpointed runs are trained before the others in the probe's process (see speed.measure_step_times: after
    a run without checkpointing they measured cheaper than `tunelab train` finds them)."""
    seen: list[dict] = []

    def fake_run(command, **kwargs):  # noqa: ANN001, ANN202 - subprocess.run's signature
        entries = json.loads(command[-1])
        seen.extend(entries)
        out = [probe_result(e["dtype"], e["checkpointing"], e["layers"], 0.1 * e["layers"]) for e in entries]
        return subprocess.CompletedProcess(command, 0, json.dumps(out) + "\n", "")

    monkeypatch.setattr(speed.subprocess, "run", fake_run)
    settings = [("float32", False), ("bfloat16", False), ("float32", True), ("bfloat16", True)]
    times = speed.measure_step_times(config_for(tiny_model_dir, tmp_path, "lora"), SHAPE, settings)
    assert set(times) == set(settings)
    order = [entry["checkpointing"] for entry in seen]
    assert order == sorted(order, reverse=True) and order.count(True) == 2 * len(PROBE_LAYERS)
    for entry in seen:  # each run trains its own setting, at the planned rows and length
        training = entry["config"]["training"]
        assert training["gradient_checkpointing"] == entry["checkpointing"]
        assert entry["config"]["model"]["dtype"] == entry["dtype"]
        assert training["micro_batch_size"] == SHAPE.rows and entry["config"]["data"]["max_length"] == SHAPE.length


def test_recommend_times_each_set_up_by_its_own_dtype_and_checkpointing(tiny_model_dir, tmp_path, monkeypatch):
    """Each set-up of the config's technique gets the prediction of the probe's (dtype, checkpointing) setting it
    trains in; the other techniques' are not timed (not guessed), and the timing line says both."""
    from tunelab import precision
    from tunelab.plan import planner
    from tunelab.plan.solve import recommend

    monkeypatch.setattr(planner, "runtime_bytes", lambda *args: 500 * 2**20)
    # as on a CPU with native bfloat16: both dtypes ranked (conftest pins float32 otherwise)
    monkeypatch.setattr(precision, "detect_cpu_bf16", lambda: precision.CpuBf16(True, "tests: native bfloat16"))
    monkeypatch.setattr(precision, "native_cpu_bf16", lambda: True)
    fake = {(d, c): StepTime(rest=1.0 + (d == "float32"), layer=0.1 * (2 if c else 1), layer_parameters=5000)
            for d in ("float32", "bfloat16") for c in (False, True)}
    monkeypatch.setattr(speed, "measure_step_times", lambda config, shape, settings, device: {s: fake[s] for s in settings})
    config = config_for(tiny_model_dir, tmp_path, "lora")
    ranked = recommend(config, SHAPE, 2**40)
    assert "measured for lora (the config's technique, its defaults) on 1- and 4-layer copies" in ranked.timing
    layers = load_model_config(config.model).num_hidden_layers
    lora = [s for s in ranked.set_ups if s.technique == "lora"]
    assert len(lora) == 4 and len(ranked.set_ups) > len(lora)
    for setup in lora:
        assert setup.seconds_per_step == pytest.approx(fake[(setup.dtype, setup.checkpointing)].predict(layers))
    assert all(s.seconds_per_step is None and "s/step" not in s.why for s in ranked.set_ups if s.technique != "lora")


def test_recommend_times_the_techniques_named_by_time_each_by_its_own_probe(tiny_model_dir, tmp_path, monkeypatch):
    """--time full: the config's technique (LoRA) and full fine-tuning are each probed with their own technique (its
    default settings), and each set-up gets its own technique's prediction; the rest stay untimed. --time all probes
    every technique with a set-up that fits."""
    from tunelab.plan import planner
    from tunelab.plan.solve import recommend

    monkeypatch.setattr(planner, "runtime_bytes", lambda *args: 500 * 2**20)
    probed: list[str] = []

    def fake(config, shape, settings, device):  # noqa: ANN001, ANN202 - measure_step_times' signature
        probed.append(config.technique.name)
        rest = {"lora": 1.0, "full": 3.0}.get(config.technique.name, 2.0)
        return {s: StepTime(rest=rest, layer=0.1, layer_parameters=5000) for s in settings}

    monkeypatch.setattr(speed, "measure_step_times", fake)
    config = config_for(tiny_model_dir, tmp_path, "lora")
    layers = load_model_config(config.model).num_hidden_layers
    ranked = recommend(config, SHAPE, 2**40, time=["full", "lora"])
    assert probed == ["lora", "full"]  # the config's first, each once
    assert "measured for lora, full (each with its default settings)" in ranked.timing
    for setup in ranked.set_ups:
        expected = {"lora": 1.0, "full": 3.0}.get(setup.technique)
        if expected is None:
            assert setup.seconds_per_step is None
        else:
            assert setup.seconds_per_step == pytest.approx(expected + 0.1 * layers)
    probed.clear()
    everything = recommend(config, SHAPE, 2**40, time=["all"])
    assert sorted(probed) == sorted({s.technique for s in everything.set_ups})
    assert all(s.seconds_per_step is not None for s in everything.set_ups)


def test_time_names_a_technique_that_does_not_exist():
    """A misspelt --time name is refused with the names it could be, not silently left untimed."""
    from tunelab.errors import ConfigError
    from tunelab.plan.solve import timed_techniques

    class Named:
        technique = type("T", (), {"name": "lora"})()

    assert timed_techniques(Named(), ["full", "lora"]) == ["lora", "full"]
    with pytest.raises(ConfigError, match=r"--time fulll: no such technique; expected all or names from: .*full"):
        timed_techniques(Named(), ["fulll"])


def test_recommend_checks_the_time_names_once_before_planning(tiny_model_dir, tmp_path, monkeypatch):
    """--time's names had two checks: the CLI's before planning, and timed_techniques' inside recommend, after the
    minute recommend spends planning every set-up (a Python caller waited for it). One check now serves both:
    recommend makes it first, and the CLI makes the same one before planning and hands recommend its answer, which
    checked again is the same answer."""
    from tunelab.errors import ConfigError
    from tunelab.plan import solve
    from tunelab.plan.solve import recommend, timed_techniques

    def planned(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("set-ups planned before the --time names were checked")

    monkeypatch.setattr(solve, "_fitting", planned)
    config = config_for(tiny_model_dir, tmp_path, "lora")
    with pytest.raises(ConfigError, match="--time lroa: no such technique"):
        recommend(config, SHAPE, 2**40, time=["full", "lroa"])
    everything = timed_techniques(config, ["all"])
    assert everything[0] == "lora" and timed_techniques(config, everything) == everything


def test_a_probe_that_cannot_train_leaves_no_time_and_says_why(tiny_model_dir, tmp_path, monkeypatch):
    """No guessed time: when the probe fails, every set-up's time is None and the timing line gives the reason."""
    from tunelab.plan import planner
    from tunelab.plan.solve import recommend

    monkeypatch.setattr(planner, "runtime_bytes", lambda *args: 500 * 2**20)

    def failing(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("the speed probe failed: no memory")

    monkeypatch.setattr(speed, "measure_step_times", failing)
    ranked = recommend(config_for(tiny_model_dir, tmp_path, "lora"), SHAPE, 2**40)
    assert ranked.set_ups and all(s.seconds_per_step is None for s in ranked.set_ups)
    assert ranked.timing == "time per step not measured: lora: the speed probe failed: no memory"
    assert all("s/step" not in s.why for s in ranked.set_ups)


def test_a_plan_for_another_device_than_this_one_is_not_timed_here(tiny_model_dir, tmp_path):
    """--device cuda planned on a machine without CUDA: the probe would train on the CPU, so it refuses."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine trains on CUDA")
    with pytest.raises(RuntimeError, match="the plan is for cuda and training here would run on cpu"):
        speed.measure_step_times(config_for(tiny_model_dir, tmp_path, "lora"), SHAPE, [("float32", False)], "cuda")
