"""The memory planner (tunelab plan): its terms against independent counts on the real tiny model, the solver's
answer against the planner and a real run, and the tiny grid cells' measured peak RSS within bounds."""

from __future__ import annotations

import ctypes
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support.planning import config_for, online_config
from support.runs import tiny_config
from support.tiny import toy_chat_records, write_jsonl
from tunelab.models import load_model, load_model_config, model_skeleton
from tunelab.objectives.base import HeadOutput, full_logits_memory
from tunelab.objectives.logps import chunked_logps_memory
from tunelab.objectives.sft import chunked_loss_memory
from tunelab.plan import Shape, heap_policy, plan_memory, resident_bytes
from tunelab.objectives import OBJECTIVES
from tunelab.plan.memory import (Saved, activations_returned_bytes, aligned_blocks_kept, decoder_layers,
                                 is_quantized_4bit, loss_bytes, saved_for_backward, unique_parameters)
from tunelab.plan.solve import solve
from tunelab import precision
from tunelab.precision import keep_trainable_in_float32
from tunelab.techniques import TECHNIQUES, RunContext

SHAPE = Shape(micro_batch_size=2, length=32)


@pytest.fixture(autouse=True)
def native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """bfloat16 bases are planned and loaded as on a CPU with native bfloat16 (conftest pins float32 otherwise):
    the dtype terms are what these tests check, on any host."""
    monkeypatch.setattr(precision, "detect_cpu_bf16", lambda: precision.CpuBf16(True, "tests: native bfloat16"))
    monkeypatch.setattr(precision, "native_cpu_bf16", lambda: True)
RUNTIME = 0  # the runtime term is measured in its own test; the others compare model-dependent terms only


def real_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of every parameter and buffer as loaded and prepared, float32 bytes of the trainable ones)."""
    total = trainable = 0
    for tensor in unique_parameters(model):
        total += tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)
        if state is not None:  # 4-bit: the absmax scales (and their own scales with double quantization)
            total += state.absmax.numel() * state.absmax.element_size()
            if state.state2 is not None:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size()
        if tensor.requires_grad:
            trainable += 4 * tensor.numel()
    return total, trainable


def prepared_model(config) -> torch.nn.Module:  # noqa: ANN001
    """The model exactly as training prepares it (load, technique, float32 master weights)."""
    technique = TECHNIQUES[config.technique.name]
    base_load = technique.base_load(config.technique, torch.device("cpu"))
    dtype = base_load.dtype or (torch.bfloat16 if config.model.dtype == "bfloat16" else torch.float32)
    model = load_model(config.model, torch.device("cpu"), base_load, dtype=dtype)
    model = technique.apply(model, config.technique, RunContext(total_steps=2))
    keep_trainable_in_float32(model)
    return model


@pytest.mark.parametrize("technique,dtype", [("full", "float32"), ("full", "bfloat16"), ("lora", "float32"), ("lora", "bfloat16"),
                                             ("qlora", "bfloat16"), ("prompt_tuning", "float32")])
def test_weight_gradient_and_optimizer_terms_match_the_prepared_model(tiny_model_dir, tmp_path, technique, dtype):
    config = config_for(tiny_model_dir, tmp_path, technique, dtype)
    plan = plan_memory(config, "cpu", SHAPE, runtime=RUNTIME)
    weights, trainable = real_bytes(prepared_model(config))
    assert plan.components["gradients"] == trainable
    assert plan.components["optimizer_state"] == 2 * trainable  # AdamW's two float32 moments
    # 4-bit: the code table of each layer's nested scales is not counted (1 KiB a layer), else exact
    assert abs(plan.components["weights"] - weights) <= 0.02 * weights


def test_qlora_counts_the_kbit_upcast(tiny_model_dir, tmp_path):
    """PEFT's k-bit preparation upcasts every non-4-bit parameter to float32: on a bfloat16 base the QLoRA plan's
    non-quantized weights are float32, so they weigh twice LoRA's bfloat16 ones."""
    model = prepared_model(config_for(tiny_model_dir, tmp_path, "qlora", "bfloat16"))
    plain = [p for p in unique_parameters(model) if not is_quantized_4bit(p) and not p.requires_grad]
    assert plain and all(p.dtype == torch.float32 for p in plain)
    qlora = plan_memory(config_for(tiny_model_dir, tmp_path, "qlora", "bfloat16"), "cpu", SHAPE, runtime=RUNTIME)
    weights, _ = real_bytes(model)
    assert abs(qlora.components["weights"] - weights) <= 0.02 * weights


@pytest.mark.parametrize("technique,dtype", [("lora", "float32"), ("lora", "bfloat16"), ("full", "bfloat16")])
def test_the_loss_term_is_the_objectives_declaration_for_the_prepared_head(tiny_model_dir, tmp_path, technique, dtype):
    """The planner reads what the objective declares (SFT: the chunked loss) for the head as training prepares it:
    N supervised rows x the vocabulary, the head's width, half-precision matmuls under autocast, trainable or not."""
    config = config_for(tiny_model_dir, tmp_path, technique, dtype)
    plan = plan_memory(config, "cpu", SHAPE, runtime=RUNTIME)
    head = prepared_model(config).get_output_embeddings()
    declared = HeadOutput(rows=SHAPE.supervised, columns=head.weight.shape[0], hidden=head.weight.shape[1],
                          element_bytes=2 if dtype == "bfloat16" else 4, trainable=head.weight.requires_grad,
                          plain=type(head) is torch.nn.Linear)
    assert plan.components["logits_and_loss"] == sum(chunked_loss_memory(declared))


def test_a_loss_over_whole_logits_holds_the_output_its_float32_copy_and_loss():
    """The default declaration (objectives that compute the whole (N, V) logits): the output, its float32 copy when
    it is half precision, cross-entropy's saved log-softmax, the two (N, V) float32 gradients, the int64 targets."""
    for element, copy in ((2, 4), (4, 0)):  # .float() of a float32 tensor is the tensor itself
        head = HeadOutput(rows=10, columns=100, hidden=8, element_bytes=element, trainable=False, plain=False)
        assert sum(full_logits_memory(head)) == 10 * 100 * (element + copy + 4 + 4 + 4) + 8 * 10
        assert chunked_loss_memory(head) == full_logits_memory(head)  # a wrapped head runs unchunked


def test_activations_grow_with_length_and_shrink_with_checkpointing(tiny_model_dir, tmp_path):
    plain = config_for(tiny_model_dir, tmp_path, "lora")
    short = plan_memory(plain, "cpu", Shape(2, 32), runtime=RUNTIME).components["activations"]
    long = plan_memory(plain, "cpu", Shape(2, 64), runtime=RUNTIME).components["activations"]
    checkpointed = plan_memory(config_for(tiny_model_dir, tmp_path, "lora", gradient_checkpointing=True), "cpu",
                               Shape(2, 64), runtime=RUNTIME).components["activations"]
    assert 1.9 * short <= long <= 2.2 * short  # sdpa's saves grow linearly with T
    assert checkpointed < long


def test_prompt_tuning_lengthens_the_sequence(tiny_model_dir, tmp_path):
    """Every layer sees the virtual tokens too: its input is (B, T + virtual, H)."""
    config = config_for(tiny_model_dir, tmp_path, "prompt_tuning")
    skeleton = TECHNIQUES["prompt_tuning"].apply(model_skeleton(load_model_config(config.model)), config.technique,
                                                 RunContext())
    saved = saved_for_backward(skeleton, SHAPE, decoder_layers(skeleton))
    hidden = skeleton.config.hidden_size
    virtual = config.technique.num_virtual_tokens
    assert saved.layer_inputs == [SHAPE.micro_batch_size * (SHAPE.length + virtual) * hidden * 4] * len(saved.layers)


CHILD = """
import json, sys
from tunelab.config import build_config
from tunelab.run_info import own_peak_rss_bytes
from tunelab.training import train
train(build_config(json.loads(sys.argv[1])), progress=False)
print(own_peak_rss_bytes())
"""


def measured_peak(config) -> int:  # noqa: ANN001
    """Peak RSS of a real training process: its own (VmHWM), not ru_maxrss, which holds this pytest process's peak."""
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(json.loads(config.model_dump_json()))],
                          capture_output=True, text=True, env=os.environ.copy())
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.strip().splitlines()[-1])


def test_a_child_process_reports_its_own_peak_not_its_parents():
    """ru_maxrss carries the starting process's peak across exec; the peak runs, the runtime probe and the grid
    record is the child's own."""
    ballast = bytearray(256 * 2**20)
    ballast[::4096] = b"\1" * len(range(0, len(ballast), 4096))  # touched: resident in this process
    code = "from tunelab.run_info import own_peak_rss_bytes; print(own_peak_rss_bytes())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(done.stdout.strip()) < 128 * 2**20 < 256 * 2**20 <= resident_bytes()
    del ballast


def test_solved_micro_batch_runs_within_bounds_and_the_next_does_not_fit(tiny_model_dir, tmp_path):
    """The tiny cell: the solver's micro-batch for a budget, run for real: its measured peak RSS is within the
    planner's bounds, and one more row a micro-batch is planned over the budget."""
    config = config_for(tiny_model_dir, tmp_path, "full", max_steps=2)
    shape = Shape(micro_batch_size=1, length=64)
    budget = plan_memory(config, "cpu", Shape(3, 64)).peak_bytes + 1
    value, plan = solve(config, shape, budget, "micro_batch_size", ceiling=16)
    assert value == 3 and plan is not None and plan.peak_bytes <= budget
    assert plan_memory(config, "cpu", Shape(4, 64)).peak_bytes > budget
    run = config.model_copy(update={"training": config.training.model_copy(update={"micro_batch_size": value}),
                                    "data": config.data.model_copy(update={"packing": True})})
    actual = measured_peak(run)
    # The tiny cell is almost all runtime term. It once read 0.947 in a full-file run: the child's ru_maxrss held
    # this pytest process's own peak (see measured_peak); measured as the child's own peak it is 1.002 alone and
    # after other tests. The bound, 0.95, holds here again.
    assert 0.95 <= plan_memory(run, "cpu").peak_bytes / actual <= 1.10


def test_qlora_activations_count_the_adapters_past_the_4bit_stand_in(tiny_model_dir, tmp_path):
    """The 4-bit layers run as a plain frozen linear in the meta forward; PEFT's LoRA wrapper (whose ``.weight`` is
    its base layer's) must keep its own forward, so the adapters' saves are counted: about what LoRA on a float32
    base saves (k-bit preparation adds the embedding output's gradient), never nothing."""
    lora = plan_memory(config_for(tiny_model_dir, tmp_path, "lora"), "cpu", SHAPE, runtime=RUNTIME)
    qlora = plan_memory(config_for(tiny_model_dir, tmp_path, "qlora"), "cpu", SHAPE, runtime=RUNTIME)
    assert qlora.components["activations"] >= 0.9 * lora.components["activations"] > 0


def test_autocast_copies_are_the_half_precision_weights_autograd_saves(tiny_model_dir, tmp_path):
    """Independent count: a real forward of the prepared model under bfloat16 autocast, recording every saved
    bfloat16 tensor shaped like a trainable weight (autocast's cached copy, saved for backward)."""
    config = config_for(tiny_model_dir, tmp_path, "full", "bfloat16")
    plan = plan_memory(config, "cpu", SHAPE, runtime=RUNTIME)
    model = prepared_model(config).train()
    halves = [p.detach().to(torch.bfloat16) for p in model.parameters() if p.requires_grad and p.dim() == 2]
    copies: dict[int, int] = {}

    def is_copy(tensor: torch.Tensor) -> bool:  # a weight's values in bfloat16 (random weights: no coincidence)
        return tensor.dtype == torch.bfloat16 and tensor.dim() == 2 and any(
            torch.equal(tensor, half) or (tensor.shape == half.t().shape and torch.equal(tensor, half.t()))
            for half in halves if tensor.numel() == half.numel())

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if is_copy(tensor.detach()):
            copies[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    ids = torch.randint(0, model.config.vocab_size, (SHAPE.micro_batch_size, SHAPE.length))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids).logits.float().sum()
    assert copies and plan.components["autocast_copies"] == sum(copies.values())
    float32 = plan_memory(config_for(tiny_model_dir, tmp_path, "full", "float32"), "cpu", SHAPE, runtime=RUNTIME)
    assert float32.components["autocast_copies"] == 0  # no autocast, no copies


def mapped_ranges(name: str) -> list[tuple[int, int]]:
    """Address ranges of this process's memory mappings of files called ``name`` (Linux /proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5].endswith("/" + name):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads /proc/self/maps (Linux)")
def test_a_quantized_load_keeps_the_checkpoint_mapped_and_its_frozen_weights_are_views_of_it(tiny_model_dir, tmp_path):
    config = config_for(tiny_model_dir, tmp_path, "qlora")  # float32 base from a float32 checkpoint
    model = prepared_model(config)
    ranges = mapped_ranges("model.safetensors")
    views = [p for p in unique_parameters(model) if not is_quantized_4bit(p) and not p.requires_grad
             and any(start <= p.data_ptr() < end for start, end in ranges)]
    assert ranges and views  # the file is still mapped, and frozen weights live in it
    plan = plan_memory(config, "cpu", SHAPE, runtime=RUNTIME)
    assert plan.components["checkpoint_mapped"] == (tiny_model_dir / "model.safetensors").stat().st_size
    # the views are counted once, as the file's pages: the weights term is the rest of the prepared model
    weights, _ = real_bytes(model)
    in_file = sum(p.numel() * p.element_size() for p in views)
    assert abs(plan.components["weights"] - (weights - in_file)) <= 0.02 * weights
    lora = plan_memory(config_for(tiny_model_dir, tmp_path, "lora"), "cpu", SHAPE, runtime=RUNTIME)
    assert "checkpoint_mapped" not in lora.components  # an ordinary load copies every weight out of the file


def test_solved_max_length_is_the_longest_that_fits(tiny_model_dir, tmp_path):
    """--solve max_length: the solved length's plan fits the budget and one token more does not."""
    config = config_for(tiny_model_dir, tmp_path, "lora")
    shape = Shape(micro_batch_size=2, length=16)
    budget = plan_memory(config, "cpu", Shape(2, 48)).peak_bytes
    value, plan = solve(config, shape, budget, "max_length", ceiling=256)
    assert value is not None and value >= 48 and plan is not None and plan.peak_bytes <= budget
    assert plan_memory(config, "cpu", Shape(2, value + 1)).peak_bytes > budget


@pytest.fixture
def no_runtime_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runtime term as a constant: it is measured in its own test, and --recommend plans dozens of set-ups."""
    from tunelab.plan import planner

    monkeypatch.setattr(planner, "runtime_bytes", lambda *args: 500 * 2**20)


@pytest.fixture
def no_speed_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """--recommend's time per step from fixed probe figures: the probe has its own tests (test_plan_speed.py)."""
    from tunelab.plan import speed

    def fixed(config, shape, settings, device="cpu"):  # noqa: ANN001, ANN202
        return {s: speed.StepTime(rest=0.5, layer=0.01 * (2 if s[1] else 1), layer_parameters=1e4) for s in settings}

    monkeypatch.setattr(speed, "measure_step_times", fixed)


def test_recommend_lists_only_set_ups_that_fit_most_trainable_first(tiny_model_dir, tmp_path, no_runtime_probe,
                                                                   no_speed_probe):
    from tunelab.plan.solve import recommend

    config = config_for(tiny_model_dir, tmp_path, "lora")
    full = [plan_memory(config_for(tiny_model_dir, tmp_path, "full", gradient_checkpointing=on), "cpu", SHAPE)
            for on in (False, True)]
    budget = int(min(p.peak_bytes for p in full) / 0.95) - 1  # full fine-tuning fits in no set-up, 5% left free
    found = recommend(config, SHAPE, budget).set_ups
    assert found and all(s.plan.peak_bytes <= 0.95 * budget for s in found)
    assert "full" not in {s.technique for s in found} and "lora" in {s.technique for s in found}
    ranks = [(-s.plan.trainable_parameters, s.seconds_per_step or float("inf")) for s in found]
    assert ranks == sorted(ranks)


def test_recommend_leaves_the_planners_measured_error_free(tiny_model_dir, tmp_path, no_runtime_probe, no_speed_probe):
    """A set-up is recommended only if its plan leaves 5% of the budget (the grid's lowest planned/measured is
    0.958): one planned just under the budget is not (a llama-narrow set-up planned at the 0.65 GiB budget peaked
    at 0.66). Control: with 5% more budget it is."""
    from tunelab.plan.solve import recommend

    config = config_for(tiny_model_dir, tmp_path, "lora")
    planned = plan_memory(config, "cpu", SHAPE).peak_bytes
    assert "lora" not in {s.technique for s in recommend(config, SHAPE, planned).set_ups if not s.checkpointing}
    assert "lora" in {s.technique for s in recommend(config, SHAPE, int(planned / 0.95) + 1).set_ups}


def test_recommend_on_a_cpu_with_native_bf16_ranks_the_bfloat16_set_ups_auto_trains(tiny_model_dir, tmp_path,
                                                                                      no_runtime_probe, no_speed_probe):
    """On a CPU with native bfloat16 (this module's fixture says so, as detection would) --recommend ranks the
    bfloat16 set-ups ``model.dtype: auto`` trains (each planned exactly as auto plans it) beside float32, and says
    why; a technique auto keeps in float32 (QLoRA loads its base quantized) gets no bfloat16 set-up."""
    from tunelab.plan.solve import recommend, recommend_dtypes

    dtypes, why = recommend_dtypes("cpu")
    assert dtypes == ["float32", "bfloat16"] and "model.dtype: auto" in why and "tests: native bfloat16" in why
    config = config_for(tiny_model_dir, tmp_path, "lora")
    found = recommend(config, SHAPE, 2**40).set_ups
    ranked = {(s.technique, s.dtype) for s in found}
    assert {("full", "bfloat16"), ("lora", "bfloat16"), ("lora", "float32")} <= ranked
    assert ("qlora", "float32") in ranked and ("qlora", "bfloat16") not in ranked
    for setup in (s for s in found if s.dtype == "bfloat16" and s.technique in ("full", "lora")):
        auto = config_for(tiny_model_dir, tmp_path, setup.technique, "auto",
                          gradient_checkpointing=setup.checkpointing)
        assert setup.plan.dtype == "bfloat16"
        assert setup.plan.components == plan_memory(auto, "cpu", SHAPE).components


def test_recommend_on_a_cpu_without_native_bf16_stays_float32_and_says_why(tiny_model_dir, tmp_path, monkeypatch,
                                                                          no_runtime_probe, no_speed_probe):
    from tunelab.plan.solve import recommend, recommend_dtypes

    monkeypatch.setattr(precision, "detect_cpu_bf16", lambda: precision.CpuBf16(False, "tests: no native bfloat16"))
    dtypes, why = recommend_dtypes("cpu")
    assert dtypes == ["float32"] and "float32 only" in why and "tests: no native bfloat16" in why
    found = recommend(config_for(tiny_model_dir, tmp_path, "lora", "bfloat16"), SHAPE, 2**40).set_ups
    assert found and {s.dtype for s in found} == {"float32"}
    assert recommend_dtypes("cuda")[0] == ["float32", "bfloat16"]


@pytest.mark.parametrize("native", [True, False])
def test_the_command_line_prints_why_the_set_ups_are_in_their_dtypes(tiny_model_dir, tmp_path, monkeypatch, native,
                                                                   no_runtime_probe, no_speed_probe):
    import yaml
    from support.cli import invoke

    reason = f"tests: {'native' if native else 'no native'} bfloat16"
    monkeypatch.setattr(precision, "detect_cpu_bf16", lambda: precision.CpuBf16(native, reason))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(yaml.safe_load(config_for(tiny_model_dir, tmp_path, "lora").to_yaml())))
    result = invoke("plan", path, "--budget", "1TiB", "--recommend")
    assert result.exit_code == 0, result.clean
    dtypes = "float32 and bfloat16" if native else "float32"
    assert f"set-ups ranked in {dtypes} (" in result.clean and reason in result.clean
    assert (" lora bfloat16 checkpointing" in result.clean) == native
    assert "time per step measured for lora" in result.clean
    # each note once, after the list, naming the set-ups it is about (the heap policy: every checkpointed one)
    assert result.clean.count("heap policy:") == 1
    assert re.search(r"note \(set-ups \d+(, \d+)+\): heap policy:", result.clean.replace("\n", " "))
    as_json = json.loads(invoke("plan", path, "--budget", "1TiB", "--recommend", "--json").stdout)
    assert reason in as_json["recommend_dtypes"]["why"]


def test_the_runtime_figure_is_measured_again_when_tunelabs_code_changes(tiny_model_dir, tmp_path, monkeypatch):
    """The cached runtime term is keyed on tunelab's source: a figure the probe measured with other code is not
    reused; the same code reuses its own."""
    from tunelab.models import ModelConfig
    from tunelab.plan import runtime

    model = ModelConfig(name=str(tiny_model_dir))
    probes: list[str] = []

    def probe(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - subprocess.run's stand-in: the probe's peak RSS
        probes.append(runtime.source_digest())
        return subprocess.CompletedProcess(args, 0, stdout="5000\n")

    monkeypatch.setattr(runtime.subprocess, "run", probe)
    monkeypatch.setattr(runtime, "micro_config", lambda model, folder: {})
    monkeypatch.setattr(runtime, "source_digest", lambda: "old code")
    assert runtime.runtime_bytes(tmp_path, model, lambda config: 1000) == 4000
    assert runtime.runtime_bytes(tmp_path, model, lambda config: 1000) == 4000 and probes == ["old code"]
    monkeypatch.setattr(runtime, "source_digest", lambda: "new code")
    runtime.runtime_bytes(tmp_path, model, lambda config: 1000)
    assert probes == ["old code", "new code"]


def dpo_config(tiny_model_dir: Path, tmp_path: Path, **training):  # noqa: ANN201
    from support.preference import toy_pair_texts

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in toy_pair_texts(0, 24)])
    return tiny_config(tiny_model_dir, {"dtype": "float32"}, data={"train": [str(pairs)], "val_size": 0, "max_length": 64},
                       technique={"name": "lora"}, objective={"name": "dpo"},
                       training={"max_steps": 2, "micro_batch_size": 2, **training},
                       eval={"before_after": False, "forgetting": False, "num_samples": 0},
                       output={"dir": str(tmp_path / "run")})


def test_a_preference_pair_is_planned_as_two_rows_as_long_as_its_longest_side(tiny_model_dir, tmp_path):
    """The objective declares its batch layout (``Objective.batch_rows``): a DPO micro-batch of B pairs is 2B rows
    padded to the longest side (collate_pairs), not B rows as long as both sides together: the planner's forward
    runs the batch training runs, and a tiny DPO run's measured peak is within the planner's bounds."""
    from tunelab.data import prepare_data
    from tunelab.models import load_tokenizer
    from tunelab.objectives.preference import collate_pairs
    from tunelab.plan import shape_of

    config = dpo_config(tiny_model_dir, tmp_path)
    data = prepare_data(config.data, load_tokenizer(config.model), tmp_path / "cache")
    shape = shape_of(config, data)
    widest = collate_pairs([[pair] for pair in data.train], 0)["input_ids"]  # (2P, T): every pair in one batch
    assert shape.rows == 2 * shape.micro_batch_size == 4
    assert shape.length == widest.shape[1] < max(len(pair.input_ids) for pair in data.train)
    plan = plan_memory(config, "cpu", shape, runtime=RUNTIME)
    rows = Shape(shape.rows, shape.length, shape.supervised_share, padded=shape.padded)  # the same rows, as SFT rows
    sft = plan_memory(config_for(tiny_model_dir, tmp_path, "lora"), "cpu", rows, runtime=RUNTIME)
    assert plan.components["activations"] == sft.components["activations"] > 0
    assert 0.95 <= plan_memory(config, "cpu").peak_bytes / measured_peak(config) <= 1.10


def test_plan_refuses_data_of_another_kind_than_its_objectives_records_as_training_does(tiny_model_dir, tmp_path):
    """`tunelab plan` reads the data as the run will and refuses, as `tunelab train` does, chats given to a
    preference objective: an error naming the objective, the file and the records it needs, not a traceback
    (it was AttributeError: 'TokenizedExample' object has no attribute 'chosen')."""
    import yaml
    from support.cli import invoke

    chats = write_jsonl(tmp_path / "chats.jsonl", toy_chat_records(8))
    config = dpo_config(tiny_model_dir, tmp_path)
    config.data.train = [str(chats)]
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(yaml.safe_load(config.to_yaml())))
    result = invoke("plan", path)
    assert result.exit_code == 2, result.clean
    assert f"objective.name=dpo trains on preference pairs {{prompt, chosen, rejected}}, but {chats} holds SFT " \
           "records" in result.clean.replace("\n", "") and "Traceback" not in result.clean


@pytest.mark.parametrize("objective,generations", [("grpo", 4), ("ppo", 3)])
def test_an_online_micro_batch_is_planned_as_its_completions(tiny_model_dir, tmp_path, objective, generations):
    """An online objective's loss runs on the sampled completions (``Objective.batch_rows``/``batch_targets``): a
    micro-batch of P prompts is P x num_generations rows, each the longest prompt plus max_completion_length, and
    the head scores the completions' tokens only."""
    from tunelab.data import prepare_data
    from tunelab.models import load_tokenizer
    from tunelab.plan import shape_of

    config = online_config(tiny_model_dir, tmp_path, objective, num_generations=generations)
    data = prepare_data(config.data, load_tokenizer(config.model), tmp_path / "cache", prompts=True)
    shape = shape_of(config, data)
    assert shape.rows == 2 * generations
    assert shape.length == max(len(prompt.input_ids) for prompt in data.train) + 8
    assert shape.supervised == 2 * generations * 8


def test_ppo_plans_its_value_head(tiny_model_dir, tmp_path):
    """PPO trains a value head beside the model (``Objective.own_module``): its weights, gradients and AdamW moments
    are in the plan, (H + 1) float32 values each beyond the same run's policy alone (GRPO: no such head)."""
    shape = Shape(micro_batch_size=2, length=32)
    ppo = plan_memory(online_config(tiny_model_dir, tmp_path, "ppo"), "cpu", shape, runtime=RUNTIME)
    grpo = plan_memory(online_config(tiny_model_dir, tmp_path, "grpo"), "cpu", shape, runtime=RUNTIME)
    hidden = load_model_config(tiny_config(tiny_model_dir).model).hidden_size
    assert ppo.components["gradients"] - grpo.components["gradients"] == 4 * (hidden + 1)
    assert ppo.components["optimizer_state"] - grpo.components["optimizer_state"] == 2 * 4 * (hidden + 1)
    assert ppo.trainable_parameters - grpo.trainable_parameters == hidden + 1


def test_a_reward_model_run_is_planned_as_it_loads(tiny_model_dir, tmp_path):
    """An online objective that scores with a reward model run (``Objective.scoring_runs``) holds that model for
    the whole run: the plan counts its weights as ``tunelab.load_run`` materialises them (counted here on the
    loaded model itself), in every phase after it is read, and a phase for reading it beside the policy."""
    from support.preference import toy_pair_texts
    from support.runs import tiny_run_config

    from tunelab.plan.memory import unique_parameters
    from tunelab.result import load_run
    from tunelab.training import train

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "chosen": c, "rejected": r}
                                                    for p, c, r in toy_pair_texts(0, 24)])
    reward = train(tiny_run_config(tiny_model_dir, tmp_path / "reward", pairs, objective={"name": "reward"},
                                   training={"max_steps": 1, "grad_accum": 1},
                                   eval={"before_after": False, "num_samples": 0}), progress=False).run_dir
    loaded = load_run(reward, "cpu").model
    loaded_weights = sum(p.numel() * p.element_size() for p in unique_parameters(loaded))
    shape = Shape(micro_batch_size=2, length=32)
    for objective in ("ppo", "grpo"):
        scored = plan_memory(online_config(tiny_model_dir, tmp_path, objective, rewards=[{"run": str(reward)}]),
                             "cpu", shape, runtime=RUNTIME)
        plain = plan_memory(online_config(tiny_model_dir, tmp_path, objective), "cpu", shape, runtime=RUNTIME)
        assert scored.components["scoring_models"] == loaded_weights
        assert "scoring_models" not in plain.components and "scoring model load" not in plain.phases
        for phase in ("loss", "backward", "optimizer step", "generation"):
            assert scored.phases[phase] - plain.phases[phase] == loaded_weights, phase
        # read after the policy's loaded weights: its checkpoint's pages (the same tiny checkpoint as the policy's)
        # and its weights beside them
        assert scored.phases["scoring model load"] == plain.phases["load"] + loaded_weights
        assert scored.peak_bytes - plain.peak_bytes >= loaded_weights


def test_the_rollout_cache_is_counted_as_the_model_makes_it(tiny_model_dir, tmp_path):
    """The KV cache a rollout ends with (``rollout_cache_bytes``, a meta forward): what the real model's forward
    caches at the same shape, and (rows, layers, 2, heads_kv, T, head_dim) float32 values."""
    from tunelab.plan.memory import rollout_cache_bytes

    config = online_config(tiny_model_dir, tmp_path, "grpo")
    model_config = load_model_config(config.model)
    skeleton = TECHNIQUES["lora"].apply(model_skeleton(model_config), config.technique, RunContext())
    shape = Shape(micro_batch_size=3, length=20, rows_per_record=2)
    with torch.no_grad():
        cache = prepared_model(config)(input_ids=torch.ones(6, 20, dtype=torch.long), use_cache=True).past_key_values
    real = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    head_dim = model_config.hidden_size // model_config.num_attention_heads
    assert rollout_cache_bytes(skeleton, shape) == real == \
        6 * model_config.num_hidden_layers * 2 * model_config.num_key_value_heads * 20 * head_dim * 4


def test_an_online_plan_has_a_generation_phase_that_grows_with_its_completions(tiny_model_dir, tmp_path):
    """An online objective's rollout is a phase of the plan (``generation``): the weights and optimizer state, the
    autocast copies and what the rollout holds (``rollout``). It grows with num_generations (rows) and
    max_completion_length (the cache's length) by at least the KV cache's growth; SFT has no such phase. The
    training pass, not the rollout, is the peak, as measured on GRPO's example once the prefill's head stopped
    copying its weight per row (docs/choosing.md)."""
    from tunelab.data import prepare_data
    from tunelab.models import load_tokenizer
    from tunelab.plan import shape_of

    def planned(**settings):  # noqa: ANN003, ANN202
        config = online_config(tiny_model_dir, tmp_path, "grpo", **settings)
        data = prepare_data(config.data, load_tokenizer(config.model), tmp_path / "cache", prompts=True)
        shape = shape_of(config, data)
        return plan_memory(config, "cpu", shape, runtime=RUNTIME), shape

    model_config = load_model_config(tiny_config(tiny_model_dir).model)
    head_dim = model_config.hidden_size // model_config.num_attention_heads
    per_token = model_config.num_hidden_layers * 2 * model_config.num_key_value_heads * head_dim * 4  # float32
    base, shape = planned(num_generations=2, max_completion_length=8)
    c = base.components
    assert base.phases["generation"] == c["weights"] + c["optimizer_state"] + c["master_cast_leftovers"] + \
        c["autocast_copies"] + c["rollout"]
    assert c["rollout"] >= shape.rows * shape.length * per_token
    more_rows, _ = planned(num_generations=4, max_completion_length=8)
    assert more_rows.components["rollout"] - c["rollout"] >= shape.rows * shape.length * per_token  # twice the rows
    longer, _ = planned(num_generations=2, max_completion_length=24)
    assert longer.components["rollout"] - c["rollout"] >= shape.rows * 16 * per_token
    assert base.phase in ("loss", "backward") and base.phases["generation"] < base.phases[base.phase]
    sft = plan_memory(config_for(tiny_model_dir, tmp_path, "lora"), "cpu", SHAPE, runtime=RUNTIME)
    assert "generation" not in sft.phases and "rollout" not in sft.components


@pytest.mark.parametrize("objective", ["grpo", "ppo"])
def test_an_online_loss_plans_its_entropy_figure(tiny_model_dir, tmp_path, objective):
    """GRPO's and PPO's loss with a plain head runs it in chunks (``chunked_logps_memory``: the entropy figure is
    computed in place in the same chunks). A head a technique wraps runs unchunked, and is largest where it computes
    the entropy figure: the float32 logits, cross-entropy's saved log-softmax, and the entropy's log-softmax, exp and
    product, five (N, V) float32 tensors (with the (N,) int64 targets), not the default's half-precision output,
    float32 copy, log-softmax and two gradients."""
    plan = plan_memory(online_config(tiny_model_dir, tmp_path, objective), "cpu", SHAPE, runtime=RUNTIME)
    n = SHAPE.supervised
    model_config = load_model_config(tiny_config(tiny_model_dir).model)
    vocab, width = model_config.vocab_size, model_config.hidden_size
    head = HeadOutput(rows=n, columns=vocab, hidden=width, element_bytes=4, trainable=False, plain=True)
    assert plan.components["logits_and_loss"] == sum(chunked_logps_memory(head))
    wrapped = HeadOutput(rows=n, columns=vocab, hidden=width, element_bytes=2, trainable=False, plain=False)
    assert sum(OBJECTIVES[objective].loss_memory(wrapped)) == 5 * 4 * n * vocab + 8 * n


@pytest.mark.parametrize("objective", ["dpo", "ipo", "kto", "orpo", "simpo"])
def test_a_preference_loss_plans_its_chunked_logps(objective):
    """The DPO family's log-probs run a plain head in chunks (``chunked_logps_memory``); a head a technique wraps
    runs unchunked over the whole (N, V) logits (``full_logits_memory``)."""
    for trainable, half in ((False, True), (True, False)):
        head = HeadOutput(rows=1000, columns=500, hidden=8, element_bytes=2 if half else 4, trainable=trainable,
                          plain=True)
        assert OBJECTIVES[objective].loss_memory(head) == chunked_logps_memory(head)
        assert sum(chunked_logps_memory(head)) < sum(full_logits_memory(head)) / 4
    wrapped = HeadOutput(rows=1000, columns=500, hidden=8, element_bytes=2, trainable=False, plain=False)
    assert OBJECTIVES[objective].loss_memory(wrapped) == full_logits_memory(wrapped)


def test_an_online_rollout_plans_the_scoring_passes_its_objective_declares(tiny_model_dir, tmp_path):
    """``Objective.rollout_memory``: GRPO scores its completions without gradients only to compare with them (beta >
    0 or num_iterations > 1), PPO always (log-probs and values). A plain head scores in chunks (``scoring_memory``),
    and nothing of the first pass is held through the reference's; a head a technique wraps runs unchunked
    (``scoring_pass_memory``), PPO holding the first pass's float32 logits through the reference's. The planner's
    rollout holds at least the declared tensors beside one layer's activations."""
    from tunelab.objectives.base import scoring_pass_memory
    from tunelab.objectives.logps import scoring_memory

    grpo, ppo = OBJECTIVES["grpo"], OBJECTIVES["ppo"]
    config = online_config(tiny_model_dir, tmp_path, "grpo")
    ppo_settings = online_config(tiny_model_dir, tmp_path, "ppo").objective
    for plain, scoring, held in ((True, scoring_memory, ()), (False, scoring_pass_memory, (4 * 70,))):
        head = HeadOutput(rows=10, columns=7, hidden=4, element_bytes=2, trainable=False, plain=plain)
        assert grpo.rollout_memory_of(head, config.objective) == ()
        assert grpo.rollout_memory_of(head, config.objective.model_copy(update={"beta": 0.1})) == scoring(head)
        assert ppo.rollout_memory_of(head, ppo_settings) == scoring(head) + held  # beta 0.05
        assert ppo.rollout_memory_of(head, ppo_settings.model_copy(update={"beta": 0.0})) == scoring(head)
        assert scoring(head) == ((2 * 70, 4 * 70, 4 * 70) if not plain else (4 * 70, 2 * 70, 4 * 40, 4 * 10))
    # on the tiny model (LoRA: a plain head) PPO's reference pass (beta > 0) runs after the first pass's chunks are
    # gone: the rollout is the same with it as without
    shape = Shape(micro_batch_size=2, length=48, rows_per_record=1)
    with_kl = plan_memory(online_config(tiny_model_dir, tmp_path, "ppo"), "cpu", shape, runtime=RUNTIME)
    without = plan_memory(online_config(tiny_model_dir, tmp_path, "ppo", beta=0.0), "cpu", shape, runtime=RUNTIME)
    assert with_kl.components["rollout"] == without.components["rollout"]


def test_a_later_micro_batch_of_a_window_plans_the_gradients_accumulated(tiny_model_dir, tmp_path):
    """With grad_accum > 1 the second micro-batch's forward runs beside the gradients the first one's backward made
    (measured on GRPO's example: its second forward peaked above its first), so the top of backward holds them;
    with one micro-batch a step no gradient exists there yet."""
    one = plan_memory(config_for(tiny_model_dir, tmp_path, "lora"), "cpu", SHAPE, runtime=RUNTIME)
    two = plan_memory(config_for(tiny_model_dir, tmp_path, "lora", grad_accum=2), "cpu", SHAPE, runtime=RUNTIME)
    assert two.phases["loss"] - one.phases["loss"] == one.components["gradients"] > 0
    assert two.phases["backward"] == one.phases["backward"]


def test_an_fsdp_process_plans_its_share_and_the_units_it_gathers(tiny_model_dir, tmp_path):
    """training.distributed: fsdp over 2 processes: each holds half the weights, gradients and optimizer state
    (rounded up), plus the root (embeddings, norm, head) and one decoder layer gathered, and that layer's whole
    float32 gradient; DDP's plan is every process's whole model, whatever their number."""
    sharded = config_for(tiny_model_dir, tmp_path, "full", distributed="fsdp")
    one, two = (plan_memory(sharded, "cpu", SHAPE, runtime=RUNTIME, processes=n) for n in (1, 2))
    for term in ("weights", "gradients", "optimizer_state", "optimizer_step_temporaries"):
        assert two.components[term] == -(-one.components[term] // 2), term
    model = prepared_model(sharded)
    root = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".layers." not in n)
    layer = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())  # every layer alike
    assert two.components["fsdp_gathered"] == root + layer + layer  # full: the layer's float32 gradient too
    assert "fsdp_gathered" not in one.components
    # the end of backward peaks in both: it holds the weights, gradients and moments, and (sharded) the gathered units
    assert one.phase == two.phase == "backward"
    held = ("weights", "gradients", "optimizer_state")
    assert two.peak_bytes == one.peak_bytes - sum(one.components[t] - two.components[t] for t in held) + \
        two.components["fsdp_gathered"]
    assert any("fsdp over 2 processes" in note for note in two.notes)
    ddp = config_for(tiny_model_dir, tmp_path, "full", distributed="ddp")
    assert plan_memory(ddp, "cpu", SHAPE, runtime=RUNTIME, processes=2).components == \
        plan_memory(ddp, "cpu", SHAPE, runtime=RUNTIME).components


def test_the_command_line_plans_one_process_of_n(tiny_model_dir, tmp_path):
    """`tunelab plan --processes N`: the plan of one of N processes (--device cuda: no runtime measurement here)."""
    import yaml
    from support.cli import invoke

    config = config_for(tiny_model_dir, tmp_path, "full", distributed="fsdp")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(yaml.safe_load(config.to_yaml())))
    plans = {n: invoke("plan", path, "--device", "cuda", "--processes", n, "--json") for n in (1, 2)}
    assert all(result.exit_code == 0 for result in plans.values()), plans[2].clean
    one, two = (json.loads(plans[n].stdout)["components"] for n in (1, 2))
    assert "fsdp_gathered" in two and "fsdp_gathered" not in one
    assert two["optimizer_state"] == -(-one["optimizer_state"] // 2)
    refused = invoke("plan", path, "--processes", 0)
    assert refused.exit_code != 0 and "--processes 0: expected 1 or more" in refused.clean


def test_the_heap_policy_fixes_the_threshold_of_checkpointed_and_quantized_cpu_runs_only(tiny_model_dir, tmp_path):
    """Activation checkpointing (memory chosen over speed) or a quantized load on a CPU: glibc's mmap threshold is
    fixed at 1 MiB; an ordinary run, or any run on a GPU, keeps glibc's dynamic one (negative controls)."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    plain = config_for(tiny_model_dir, tmp_path, "lora")
    checkpointed = config_for(tiny_model_dir, tmp_path, "lora", gradient_checkpointing=True)
    quantized = config_for(tiny_model_dir, tmp_path, "qlora", "bfloat16")
    assert heap_policy(plain, cpu) is None
    assert heap_policy(checkpointed, cpu) == heap_policy(quantized, cpu) == 2**20
    assert heap_policy(checkpointed, gpu) is None
    assert plan_memory(checkpointed, "cpu", SHAPE, runtime=RUNTIME).heap_mmap_threshold == 2**20
    assert plan_memory(plain, "cpu", SHAPE, runtime=RUNTIME).heap_mmap_threshold is None


def test_glibc_before_2_39_with_its_tcache_on_is_named_as_keeping_aligned_blocks():
    """glibc before 2.39 keeps the remainders posix_memalign cuts off in its per-thread cache (bug 30723); 2.39
    merges them, the cache off (GLIBC_TUNABLES) avoids it, and another C library is not glibc (negative controls)."""
    assert aligned_blocks_kept(("glibc", "2.36"), "") == "glibc 2.36"
    assert aligned_blocks_kept(("glibc", "2.37"), "glibc.malloc.mxfast=0") == "glibc 2.37"  # fastbins: not the cause
    assert aligned_blocks_kept(("glibc", "2.38"), "") == "glibc 2.38"
    assert aligned_blocks_kept(("glibc", "2.39"), "") is None
    assert aligned_blocks_kept(("glibc", "2.41"), "") is None
    assert aligned_blocks_kept(("glibc", "2.36"), "glibc.malloc.mxfast=0:glibc.malloc.tcache_count=0") is None
    assert aligned_blocks_kept(("", ""), "") is None  # musl, or not found


def test_a_quantized_cpu_plan_says_when_glibc_keeps_aligned_blocks(tiny_model_dir, tmp_path, monkeypatch):
    """A CPU plan with a quantized base, on a glibc that keeps aligned blocks: `tunelab train` restarts it with the
    cache off, as the plan says; with the restart refused (training.glibc_tcache_off: false) or planned for a
    process that keeps the cache (``tunables``: a training process's own) the note warns instead. A plain base
    restarts too, for its own reason; a GPU plan, or the cache already off, gets neither (negative controls)."""
    monkeypatch.setattr("platform.libc_ver", lambda *args: ("glibc", "2.36"))
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    quantized = config_for(tiny_model_dir, tmp_path, "qlora", "bfloat16")
    refused = config_for(tiny_model_dir, tmp_path, "qlora", "bfloat16", glibc_tcache_off=False)
    plain = config_for(tiny_model_dir, tmp_path, "lora")

    def notes(config, tunables=None) -> str:  # noqa: ANN001
        return "\n".join(plan_memory(config, "cpu", SHAPE, runtime=RUNTIME, tunables=tunables).notes)

    restarts = "tunelab train restarts with GLIBC_TUNABLES=glibc.malloc.tcache_count=0 for this run (a quantized base"
    warns = "glibc 2.36 keeps freed aligned blocks in its heap (glibc bug 30723"
    assert restarts in notes(quantized) and warns not in notes(quantized)
    assert warns in notes(refused) and "restarts" not in notes(refused)
    assert warns in notes(quantized, tunables="") and "restarts" not in notes(quantized, tunables="")
    assert "restarts with GLIBC_TUNABLES=glibc.malloc.tcache_count=0 for this run (training on a CPU" in notes(plain)
    gpu = "\n".join(plan_memory(plain, "cuda", SHAPE, runtime=RUNTIME).notes)
    assert "tcache" not in gpu and "aligned" not in gpu
    assert "aligned" not in notes(quantized, tunables="glibc.malloc.tcache_count=0")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0")
    assert "aligned" not in notes(quantized)


def test_training_return_freed_memory_overrides_the_heap_policy_and_the_plan_follows(tiny_model_dir, tmp_path):
    """The config's choice wins both ways: off for a checkpointed run, on for an ordinary one; the plan assumes it."""
    cpu = torch.device("cpu")
    kept = config_for(tiny_model_dir, tmp_path, "lora", gradient_checkpointing=True, return_freed_memory=False)
    returned = config_for(tiny_model_dir, tmp_path, "lora", return_freed_memory=True)
    assert heap_policy(kept, cpu) is None and heap_policy(returned, cpu) == 2**20
    assert heap_policy(returned, torch.device("cuda")) is None  # glibc's heap only matters on a CPU
    assert plan_memory(kept, "cpu", SHAPE, runtime=RUNTIME).heap_mmap_threshold is None
    assert plan_memory(returned, "cpu", SHAPE, runtime=RUNTIME).heap_mmap_threshold == 2**20


def test_activations_returned_are_the_large_chunks_backward_has_freed():
    """At the end of backward the first layer's saves are alive (its backward is the last); every other chunk of
    the threshold or more went back to the system. With checkpointing the layers kept only their inputs (the first
    layer's is still needed) and the saves outside the layers."""
    head = HeadOutput(rows=1, columns=1, hidden=1, element_bytes=4, trainable=False, plain=True)
    chunks = [(3, 0), (5, 0), (6, 1), (2, 1), (7, 2), (9, -1), (1, -1)]  # (bytes, layer or -1: outside)
    saved = Saved(layers=[8, 8, 7], layer_inputs=[4, 4, 8], outside=10, head=head, chunks=chunks)
    assert activations_returned_bytes(saved, checkpointing=False, threshold=5) == 6 + 7 + 9
    assert activations_returned_bytes(saved, checkpointing=True, threshold=5) == 8 + 9


def test_under_the_heap_policy_backward_ends_without_the_activations_it_returned(tiny_model_dir, tmp_path,
                                                                                  monkeypatch):
    """A checkpointed 16 x 512 micro-batch of the tiny model: each layer input is (16, 512, 64) float32, 2 MiB, a
    chunk the fixed threshold returns once backward has freed it; the dynamic threshold (32 MiB) keeps it."""
    from tunelab.plan import planner

    config = config_for(tiny_model_dir, tmp_path, "full", gradient_checkpointing=True)
    shape = Shape(16, 512)
    fixed = plan_memory(config, "cpu", shape, runtime=RUNTIME)
    monkeypatch.setattr(planner, "heap_mmap_threshold", lambda *args: None)
    dynamic = plan_memory(config, "cpu", shape, runtime=RUNTIME)
    assert fixed.heap_mmap_threshold == 2**20 and dynamic.heap_mmap_threshold is None
    # the top of backward: live tensors either way, and under the dynamic threshold the forward's holes in the heap
    # and the freed gradients its larger activations did not reuse
    kept = dynamic.components["heap_holes"] + dynamic.components["freed_gradients_kept"]
    assert dynamic.phases["loss"] - fixed.phases["loss"] == kept > 0 == fixed.components["freed_gradients_kept"]
    skeleton = TECHNIQUES["full"].apply(model_skeleton(load_model_config(config.model)), config.technique, RunContext())
    saved = saved_for_backward(skeleton, shape, decoder_layers(skeleton))
    returned = activations_returned_bytes(saved, True, 2**20)
    assert returned >= 16 * 512 * 64 * 4  # the second layer's input at least
    declared = OBJECTIVES["sft"].loss_memory(saved.head)
    loss_returned = loss_bytes(declared, 2**20)[1] - loss_bytes(declared)[1]  # the loss's 1 to 32 MiB chunks
    holes = dynamic.components["heap_holes"]  # the forward's free chunks are still in the heap at the end of backward
    assert dynamic.phases["backward"] - fixed.phases["backward"] == returned + loss_returned + holes


class FakeGlibc:
    """mallopt's calls, each with whether the model was loaded yet (the policy must hold from the load on)."""

    def __init__(self, events: list) -> None:
        self.events = events

    def mallopt(self, parameter: int, value: int) -> int:
        self.events.append(("mallopt", parameter, value))
        return 1


@pytest.mark.parametrize("checkpointing", [True, False])
def test_training_runs_under_the_heap_policy_and_records_it(tiny_model_dir, tmp_path, monkeypatch, checkpointing):
    """A checkpointed run fixes glibc's mmap threshold before its model loads and gives glibc back the thresholds
    its dynamic ones reach at the end (32 MiB, trim 64 MiB); run_info.json and the log say which policy ran. An
    ordinary run leaves the allocator alone (the negative control)."""
    from tunelab import models
    from tunelab.training import session

    events: list = []
    monkeypatch.setattr(models, "_glibc", lambda: FakeGlibc(events))
    load = session.load_model
    monkeypatch.setattr(session, "load_model", lambda *a, **k: events.append(("load",)) or load(*a, **k))
    config = config_for(tiny_model_dir, tmp_path, "lora", gradient_checkpointing=checkpointing)
    session.train(config, progress=False)
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    if checkpointing:
        assert events[0] == ("mallopt", -3, 2**20) and events[1] == ("load",)
        assert events[-2:] == [("mallopt", -3, 32 * 2**20), ("mallopt", -1, 64 * 2**20)]
        assert info["heap_policy"]["mmap_threshold"] == 2**20
    else:
        assert [e for e in events if e[0] == "mallopt"] == []
        assert info["heap_policy"]["mmap_threshold"] is None


HEAP_CHILD = """
import ctypes, json, torch
from tunelab.models import fixed_mmap_threshold

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2

def mapped_while_alive():
    # a tensor larger than all the heap has free: the heap must grow for it, or glibc maps it on its own
    before = libc.mallinfo2()
    tensor = torch.ones((before.fordblks + 2**22) // 4)
    mapped = libc.mallinfo2().hblkhd - before.hblkhd
    del tensor
    return mapped

large = torch.ones(6 * 2**20)  # 24 MiB, mapped on its own; freed, glibc's dynamic threshold rises to it
del large
seen = [mapped_while_alive()]
with fixed_mmap_threshold(2**20) as taken:
    seen.append(mapped_while_alive())
seen.append(mapped_while_alive())
print(json.dumps([taken, *seen]))
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="glibc 2.33 or later")
def test_a_fixed_threshold_gives_each_large_chunk_its_own_mapping_until_it_is_left():
    """The mechanism, for real (a fresh process: a small heap): a tensor of a few MiB is one of glibc's own
    mappings (returned to the system when freed) inside ``fixed_mmap_threshold(1 MiB)``, and grows the heap
    before and after it, once the dynamic threshold has risen (the negative controls)."""
    done = subprocess.run([sys.executable, "-c", HEAP_CHILD], capture_output=True, text=True, env=os.environ.copy())
    assert done.returncode == 0, done.stderr[-2000:]
    taken, before, inside, after = json.loads(done.stdout.strip().splitlines()[-1])
    assert taken and before == 0 and after == 0
    assert inside >= 2**22


def test_a_budget_without_a_unit_is_refused_with_the_units_it_could_mean(tiny_model_dir, tmp_path):
    """'--budget 8' was 8 bytes, and the plan said 'budget 0.00 GiB: does NOT fit' to a user who meant 8 GiB."""
    import yaml
    from support.cli import invoke

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(yaml.safe_load(config_for(tiny_model_dir, tmp_path, "lora").to_yaml())))
    refused = invoke("plan", path, "--budget", "8")
    assert refused.exit_code == 2 and "'8': give a unit, e.g. 8GiB or 8MiB (8B for bytes)" in refused.clean
    assert invoke("plan", path, "--budget", "8GiB", "--json").exit_code == 0
    zero = invoke("plan", path, "--budget", "0GiB")  # nothing fits nothing: a typo, not a question
    assert zero.exit_code == 2 and "'0GiB': expected a size above zero" in zero.clean


def test_recommend_prints_no_info_line_per_planned_set_up(tiny_model_dir, tmp_path, no_runtime_probe, no_speed_probe,
                                                          caplog):
    """Dozens of set-ups are planned: their INFO lines (the data cache read again, multitask prompt tuning's default
    task) buried the ranking; tunelab's logger is back at its level afterwards."""
    import logging

    from tunelab.plan.solve import recommend

    caplog.set_level(logging.INFO)
    level = logging.getLogger("tunelab").level
    assert recommend(config_for(tiny_model_dir, tmp_path, "lora"), SHAPE, 2**40).set_ups
    assert [r.getMessage() for r in caplog.records if r.name.startswith("tunelab") and r.levelno == logging.INFO] == []
    assert logging.getLogger("tunelab").level == level



def test_time_on_the_command_line_times_more_techniques_and_refuses_without_recommend(tiny_model_dir, tmp_path,
                                                                                       no_runtime_probe, no_speed_probe):
    """`--time full` adds full fine-tuning's probe to --recommend's (the timing line names both); a misspelt name is
    refused with the names it could be; --time alone (no --recommend) is refused, not ignored."""
    import yaml
    from support.cli import invoke

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(yaml.safe_load(config_for(tiny_model_dir, tmp_path, "lora").to_yaml())))
    timed = invoke("plan", path, "--budget", "1TiB", "--recommend", "--time", "full", "--json")
    assert timed.exit_code == 0, timed.clean
    out = json.loads(timed.stdout)
    assert "measured for lora, full (each with its default settings)" in out["recommend_timing"]
    assert {s["technique"] for s in out["recommend"] if s["seconds_per_step"] is not None} == {"lora", "full"}
    misspelt = invoke("plan", path, "--budget", "1TiB", "--recommend", "--time", "ful")
    assert misspelt.exit_code == 2 and "--time ful: no such technique; expected all or names from:" in misspelt.clean
    alone = invoke("plan", path, "--time", "full")
    assert alone.exit_code == 2 and "--time times --recommend's set-ups: add --recommend" in alone.clean


def test_solve_says_when_it_stopped_at_its_ceiling_and_what_the_smallest_needs(tiny_model_dir, tmp_path, no_runtime_probe):
    """--solve with a budget more than the search's ceiling needs said 'largest micro_batch_size that fits: 4096'
    (more fits); with a budget too small for even 1 it said 'no micro_batch_size fits the budget', not what 1 needs."""
    import yaml
    from support.cli import invoke

    from tunelab.plan.solve import SOLVE_CEILING

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(yaml.safe_load(config_for(tiny_model_dir, tmp_path, "lora").to_yaml())))
    huge = invoke("plan", path, "--budget", "1000TiB", "--solve", "micro_batch_size")
    assert huge.exit_code == 0, huge.clean
    assert f"micro_batch_size {SOLVE_CEILING} fits, and more may: the search stops at {SOLVE_CEILING}" in huge.clean
    assert "largest micro_batch_size that fits" not in huge.clean
    solved = json.loads(invoke("plan", path, "--budget", "1000TiB", "--solve", "micro_batch_size", "--json").stdout)
    assert solved["solve"]["value"] == SOLVE_CEILING and solved["solve"]["at_ceiling"] is True
    tiny = invoke("plan", path, "--budget", "1MiB", "--solve", "micro_batch_size")
    one = json.loads(invoke("plan", path, "--budget", "1MiB", "--solve", "micro_batch_size", "--json").stdout)["solve"]
    assert one["value"] is None and one["smallest"]["value"] == 1 and one["smallest"]["peak_bytes"] > 2**20
    assert f"no micro_batch_size fits the budget: even 1 needs {one['smallest']['peak_bytes'] / 2**30:.2f} GiB" in tiny.clean
    fitting = json.loads(invoke("plan", path, "--budget", "1TiB", "--solve", "max_length", "--json").stdout)["solve"]
    assert fitting["at_ceiling"] == (fitting["value"] == fitting["ceiling"]) and "smallest" not in fitting


def test_solve_max_length_stops_at_the_models_context(tiny_model_dir, tmp_path, no_runtime_probe):
    """--solve max_length searched up to 4096 tokens whatever the model: past the tiny model's 512 positions, and
    short of a model of 8192. It now stops at the model's context (config.json's max_position_embeddings, which
    the plan reads) and says that the answer is the model's context, not that more may fit."""
    import yaml
    from support.cli import invoke

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(yaml.safe_load(config_for(tiny_model_dir, tmp_path, "lora").to_yaml())))
    context = load_model_config(config_for(tiny_model_dir, tmp_path, "lora").model).max_position_embeddings
    assert context == 512
    solved = json.loads(invoke("plan", path, "--budget", "1000TiB", "--solve", "max_length", "--json").stdout)["solve"]
    assert solved["value"] == solved["ceiling"] == context and solved["at_ceiling"] and solved["ceiling_is_context"]
    text = invoke("plan", path, "--budget", "1000TiB", "--solve", "max_length").clean
    assert f"max_length {context} fits: the model's context (its config's max_position_embeddings)" in text, text
    assert "more may" not in text
    batch = json.loads(invoke("plan", path, "--budget", "1000TiB", "--solve", "micro_batch_size", "--json").stdout)
    assert batch["solve"]["ceiling"] == 4096 and not batch["solve"]["ceiling_is_context"]  # no context for batches


def test_solve_max_length_leaves_the_context_its_virtual_tokens(tiny_model_dir, tmp_path, no_runtime_probe):
    """Prompt learning adds its virtual tokens before every row, in the model's context too: --solve max_length
    answered the whole context (512 on the tiny model) for prompt tuning, a length whose rows the model cannot take
    with 7 tokens more. The ceiling is now the context less the virtual tokens, which the plan reads from the built
    model (prompt embeddings or prefix keys and values alike), and the answer says so."""
    import yaml
    from support.cli import invoke

    from tunelab.plan import plan_memory

    for settings, virtual in (({"name": "prefix_tuning", "num_virtual_tokens": 5}, 5), ({"name": "lora"}, 0),
                              ({"name": "p_tuning", "num_virtual_tokens": 3}, 3)):
        assert plan_memory(config_for(tiny_model_dir, tmp_path, settings)).virtual_tokens == virtual, settings
    config = config_for(tiny_model_dir, tmp_path, {"name": "prompt_tuning", "num_virtual_tokens": 7})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(yaml.safe_load(config.to_yaml())))
    solved = json.loads(invoke("plan", path, "--budget", "1000TiB", "--solve", "max_length", "--json").stdout)["solve"]
    assert solved["value"] == solved["ceiling"] == 512 - 7 and solved["ceiling_is_context"], solved
    assert solved["virtual_tokens"] == 7
    text = invoke("plan", path, "--budget", "1000TiB", "--solve", "max_length").clean
    assert ("max_length 505 fits: the model's context (its config's max_position_embeddings) less the technique's 7 "
            "virtual tokens, which every row adds, the longest the search tries") in " ".join(text.split()), text


def test_a_misspelt_solve_or_time_name_is_refused_before_anything_is_planned(tiny_model_dir, tmp_path, monkeypatch):
    """`--solve max_lenght` was refused after the plan (seconds), `--recommend --time lroa` after every set-up was
    planned (a minute on SmolLM2)."""
    import yaml
    from support.cli import invoke

    import tunelab.plan

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(yaml.safe_load(config_for(tiny_model_dir, tmp_path, "lora").to_yaml())))

    def planned(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("planned before the names were checked")

    monkeypatch.setattr(tunelab.plan, "data_shape", planned)
    solve_refused = invoke("plan", path, "--budget", "1GiB", "--solve", "max_lenght")
    assert solve_refused.exit_code == 2 and "--solve max_lenght: expected one of micro_batch_size, max_length" in solve_refused.clean
    time_refused = invoke("plan", path, "--budget", "1GiB", "--recommend", "--time", "lora,lroa")
    assert time_refused.exit_code == 2 and "--time lroa: no such technique" in time_refused.clean, time_refused.clean


def test_a_cuda_plan_of_a_quantized_load_counts_no_host_mapped_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    """On a CPU a quantized load keeps the checkpoint mapped (its frozen weights are views of it); on a GPU those
    weights are copied to the device and the file's pages are host memory. The CUDA plan counted the whole file in
    the GPU's peak (`checkpoint_mapped`, 0.5 GiB for SmolLM2's QLoRA) and left the copied weights out. And a CUDA plan
    made where no GPU is visible had a runtime term of 0 without saying the CUDA context was not measured."""
    from tunelab.plan import planner

    config = config_for(tiny_model_dir, tmp_path, "qlora")
    cpu = plan_memory(config, "cpu", SHAPE, runtime=RUNTIME)
    cuda = plan_memory(config, "cuda", SHAPE, runtime=0)
    assert "checkpoint_mapped" in cpu.components and "checkpoint_mapped" not in cuda.components
    assert cuda.components["weights"] > cpu.components["weights"]  # the frozen weights the file held, on the GPU
    assert not any("no GPU is visible" in note for note in cuda.notes)  # the caller gave the runtime term
    monkeypatch.setattr(planner.torch.cuda, "is_available", lambda: False)
    unmeasured = plan_memory(config, "cuda", SHAPE)
    assert unmeasured.components["runtime"] == 0
    assert any("no GPU is visible here, so the CUDA context is not measured" in note for note in unmeasured.notes)


def test_the_printed_plan_adds_up_to_its_peak(tiny_model_dir, tmp_path, no_runtime_probe):
    """The terms table listed every term of every phase (the loading phase and the runtime term among them) under
    the peak, and did not add up to it. It now lists the peak phase's terms and the runtime term, summed to the
    peak; the phases line says each phase's sum, and --json keeps its keys and adds each phase's terms."""
    import yaml
    from support.cli import invoke

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(yaml.safe_load(config_for(tiny_model_dir, tmp_path, "lora").to_yaml())))
    out = json.loads(invoke("plan", path, "--json").stdout)
    assert {"peak_bytes", "peak_phase", "phases", "components"} <= set(out)
    phase, terms = out["peak_phase"], out["phase_terms"][out["peak_phase"]]
    assert sum(terms.values()) + out["components"]["runtime"] == out["peak_bytes"]
    assert out["phases"] == {name: sum(held.values()) for name, held in out["phase_terms"].items()}
    text = invoke("plan", path).clean
    table = text[text.index(f"Peak at the {phase}"):]
    rows = re.findall(r"│ (\w+) +│ +(-?[\d.]+) │", table[:table.index("phases (GiB")])
    assert [name for name, _ in rows] == [*terms, "runtime", "peak"], text
    shown = {name: float(value) for name, value in rows}
    assert abs(sum(shown.values()) - 2 * shown["peak"]) <= 0.0005 * len(rows)  # the terms add up to the peak row
    assert shown["peak"] == round(out["peak_bytes"] / 2**30, 3)
    assert "loading" not in shown and f"load {out['phases']['load'] / 2**30:.3f}" in text
