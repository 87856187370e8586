"""training.distributed: fsdp on two CPU processes (torchrun, gloo; torch's FSDP2 runs on CPU): the sharded run
trains as DDP and as one process with the same global batch, saves the one-process result folder (plain PEFT and
transformers open it), and resumes exactly from its gathered checkpoints. One torchrun launch (tens of seconds)
makes every two-process run, shared by the module's tests."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from support.preference import toy_pair_texts
from support.runs import tiny_config_dict
from support.tiny import build_tokenizer, toy_chat_records, write_jsonl
from support.torchrun import DRIVER, torchrun
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from tunelab.models import load_model, meta_twin, ModelConfig

from tunelab import distributed
from tunelab.config import ConfigError, build_config
from tunelab.runs import read_metrics
from tunelab.training import train

# As in test_distributed.py: the processes add the same gradients in another order (and FSDP reduce-scatters each
# micro-batch's gradient, then sums the shards), so agreement is promised to float32 rounding. A wrong loss scale or
# a lost micro-batch moves the losses by >1e-2.
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-5


def _config(model_dir: Path, data: Path, out: Path, technique: dict[str, Any] | None = None,
            **training: Any) -> dict[str, Any]:
    return tiny_config_dict(
        model_dir,
        data={"train": [str(data)], "val_size": 8, "max_length": 64},
        technique=technique or {"name": "lora", "r": 4, "dropout": 0.0},
        training={"max_steps": 6, "micro_batch_size": 2, "learning_rate": 3e-3, "save_every": 3, "eval_every": 3,
                  "distributed": "fsdp", **training},
        eval={"num_samples": 1, "max_new_tokens": 4},
        output={"dir": str(out)},
    )


# LoRA at a rate that overshoots after its first step (validation loss 5.83 then 6.28): the end restores step 1
BEST_STEPS = {"max_steps": 2, "eval_every": 1, "save_every": None, "learning_rate": 0.3, "warmup_ratio": 0.0}
FULL = {"name": "full"}
# full fine-tuning, with activation checkpointing per layer
FULL_STEPS = {"max_steps": 2, "save_every": None, "eval_every": None, "learning_rate": 1e-3,
              "gradient_checkpointing": True}


# LoRA with dropout: each process draws its masks from its own stream, which the technique's initialisation moved
DROPOUT = {"name": "lora", "r": 4, "dropout": 0.3}
DROPOUT_STEPS = {"max_steps": 3, "save_every": None, "eval_every": None}

# DPO with a precomputed reference: only the main process holds the base before sharding, so it computes the
# reference log-probs and hands them to the other (training/session.py, _measured_by)
DPO_STEPS = {"max_steps": 3, "save_every": None, "eval_every": 3}
PRECOMPUTED_DPO = {"objective": {"name": "dpo", "reference": "precomputed"}}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Data, and a tiny model whose head shares the embeddings (tied: the saved full model must keep one tensor)."""
    root = tmp_path_factory.mktemp("fsdp")
    write_jsonl(root / "train.jsonl", toy_chat_records(48))
    write_jsonl(root / "pairs.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in toy_pair_texts(0, 40)])
    tied = root / "tied"
    tokenizer = build_tokenizer(tied)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, eos_token_id=2, pad_token_id=0, bos_token_id=None,
        initializer_range=0.1)).save_pretrained(tied)
    return root


@pytest.fixture(scope="module")
def runs(workspace: Path, tiny_model_dir: Path) -> dict[str, Any]:
    """In one two-process launch: a sharded LoRA run straight, the same stopped after step 3 and resumed, the
    same with DDP, full fine-tuning of the tied model sharded, a sharded run that restores its best step, a LoRA
    run with dropout sharded and with DDP, DPO with a precomputed reference sharded and with DDP, and a sharded run stopped after step 3 and resumed with DDP."""
    data, pairs = workspace / "train.jsonl", workspace / "pairs.jsonl"
    configs = {"straight": _config(tiny_model_dir, data, workspace / "straight"),
               "split": _config(tiny_model_dir, data, workspace / "split"),
               "more": {"ddp": _config(tiny_model_dir, data, workspace / "ddp", distributed="ddp"),
                        "full": _config(workspace / "tied", data, workspace / "full", FULL, **FULL_STEPS),
                        "best": _config(tiny_model_dir, data, workspace / "best", **BEST_STEPS),
                        "dropout": _config(tiny_model_dir, data, workspace / "dropout", DROPOUT, **DROPOUT_STEPS),
                        "dropout_ddp": _config(tiny_model_dir, data, workspace / "dropout-ddp", DROPOUT,
                                               **{**DROPOUT_STEPS, "distributed": "ddp"}),
                        "dpo": {**_config(tiny_model_dir, pairs, workspace / "dpo", **DPO_STEPS), **PRECOMPUTED_DPO},
                        "dpo_ddp": {**_config(tiny_model_dir, pairs, workspace / "dpo-ddp",
                                              **{**DPO_STEPS, "distributed": "ddp"}), **PRECOMPUTED_DPO}},
               "resume_with": {"first": _config(tiny_model_dir, data, workspace / "switched"),
                               "second": _config(tiny_model_dir, data, workspace / "switched", distributed="ddp")}}
    result = torchrun([str(DRIVER), json.dumps(configs)], workspace)
    lines = [line for line in result.stdout.splitlines() if line.startswith("DRIVER ")]
    assert len(lines) == 2 and lines[0] == lines[1], result.stdout  # both processes saw the same outcomes
    return json.loads(lines[0].removeprefix("DRIVER "))


def _losses(run: Path, kind: str = "train", figure: str = "loss") -> list[float]:
    return [m[figure] for m in read_metrics(run) if m["kind"] == kind]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=WEIGHT_ATOL, msg=name)


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_sharded_training_equals_ddp_and_one_process(runs: dict[str, Any], workspace: Path, tiny_model_dir: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    assert runs["straight"] == ["completed", 6] and runs["ddp"] == ["completed", 6]
    sharded, ddp = workspace / "straight", workspace / "ddp"
    with caplog.at_level(logging.INFO, logger="tunelab"):  # fsdp on one process: the whole model, as it says
        one = train(build_config(_config(tiny_model_dir, workspace / "train.jsonl", workspace / "one", grad_accum=2)),
                    progress=False).run_dir
    assert "fsdp with one process: nothing to shard" in caplog.text
    info = {run: json.loads((run / "run_info.json").read_text()) for run in (sharded, ddp, one)}
    assert info[sharded]["fsdp_units"] == 3 and "fsdp_units" not in info[ddp] and "fsdp_units" not in info[one]
    assert info[sharded]["fsdp_loaded_by"] == "main process"  # the other process received its shards
    assert len(_losses(sharded)) == 6
    for other in (ddp, one):
        torch.testing.assert_close(_losses(sharded), _losses(other), rtol=LOSS_RTOL, atol=0)
        torch.testing.assert_close(_losses(sharded, "eval"), _losses(other, "eval"), rtol=LOSS_RTOL, atol=0)
        # the norm of the whole gradient, over every process's shards (above max_grad_norm 1.0 here: it clips)
        torch.testing.assert_close(_losses(sharded, figure="grad_norm"), _losses(other, figure="grad_norm"),
                                   rtol=LOSS_RTOL, atol=0)
        _assert_same_weights(_adapter(sharded), _adapter(other))
    # the final evaluation and sample generation ran (every process made the same forwards: no hang)
    evals = [json.loads((run / "eval.json").read_text()) for run in (sharded, one)]
    assert evals[0]["tuned"]["loss"] == pytest.approx(evals[1]["tuned"]["loss"], rel=LOSS_RTOL)
    assert evals[0]["samples"][0]["tuned"] == evals[1]["samples"][0]["tuned"]


def test_the_sharded_result_is_the_one_process_folder(runs: dict[str, Any], workspace: Path,
                                                      tiny_model_dir: Path) -> None:
    sharded, ddp = workspace / "straight", workspace / "ddp"
    assert sorted(p.name for p in (sharded / "adapter").iterdir()) == sorted(p.name for p in (ddp / "adapter").iterdir())
    assert (json.loads((sharded / "adapter" / "adapter_config.json").read_text())
            == json.loads((ddp / "adapter" / "adapter_config.json").read_text()))
    # plain PEFT opens it, with the trained weights in place
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), sharded / "adapter")
    loaded = {name: p for name, p in peft_model.named_parameters() if "lora_" in name}
    saved = _adapter(sharded)
    assert len(loaded) == len(saved)
    for name, value in saved.items():
        match = [p for n, p in loaded.items() if n.replace(".default", "").endswith(name.removeprefix("base_model.model"))]
        assert len(match) == 1 and torch.equal(match[0].detach(), value), name


def test_sharded_full_fine_tuning_saves_the_one_process_model(runs: dict[str, Any], workspace: Path) -> None:
    assert runs["full"] == ["completed", 2]
    sharded = workspace / "full" / "model"
    one = train(build_config(_config(workspace / "tied", workspace / "train.jsonl", workspace / "full-one", FULL,
                                     **{**FULL_STEPS, "grad_accum": 2})), progress=False).run_dir / "model"
    torch.testing.assert_close(_losses(workspace / "full"), _losses(one.parent), rtol=LOSS_RTOL, atol=0)
    assert sorted(p.name for p in sharded.iterdir()) == sorted(p.name for p in one.iterdir())
    assert json.loads((sharded / "config.json").read_text()) == json.loads((one / "config.json").read_text())
    weights = load_file(str(sharded / "model.safetensors"))
    assert "lm_head.weight" not in weights  # tied to the embeddings: saved once, as one process saves it
    _assert_same_weights(weights, load_file(str(one / "model.safetensors")))
    reopened = AutoModelForCausalLM.from_pretrained(sharded)
    assert reopened.lm_head.weight.data_ptr() == reopened.model.embed_tokens.weight.data_ptr()


def test_a_sharded_run_resumes_exactly_from_full_checkpoints(runs: dict[str, Any], workspace: Path) -> None:
    assert runs["first"] == ["interrupted", 3] and runs["second"] == ["completed", 6]
    straight, split, ddp = workspace / "straight", workspace / "split", workspace / "ddp"
    assert _losses(straight) == _losses(split)
    a, b = _adapter(straight), _adapter(split)
    assert all(torch.equal(a[name], b[name]) for name in a), "a resumed sharded run must equal the straight one"
    # the checkpoint holds full tensors keyed as one process keys them, so it is any run's checkpoint
    step = "checkpoints/step-000006"
    saved = {run: torch.load(run / step / "optimizer.pt", weights_only=True) for run in (straight, split, ddp)}
    assert saved[straight]["param_groups"] == saved[ddp]["param_groups"]
    assert saved[straight]["state"].keys() == saved[ddp]["state"].keys() == saved[split]["state"].keys()
    for key, values in saved[straight]["state"].items():
        for name, value in values.items():
            assert torch.equal(value, saved[split]["state"][key][name]), f"optimizer state {key}.{name}"
            assert value.shape == saved[ddp]["state"][key][name].shape, f"optimizer state {key}.{name}"
            torch.testing.assert_close(value, saved[ddp]["state"][key][name], rtol=1e-4, atol=1e-6)
    _assert_same_weights(load_file(str(straight / step / "trainable.safetensors")),
                         load_file(str(ddp / step / "trainable.safetensors")))


def test_a_sharded_checkpoint_resumes_under_ddp(runs: dict[str, Any], workspace: Path) -> None:
    """The checkpoint is any run's: the same run resumed with training.distributed: ddp continues it."""
    assert runs["resume_with"] == ["interrupted", 3, "completed", 6]
    straight, switched = workspace / "straight", workspace / "switched"
    torch.testing.assert_close(_losses(switched), _losses(straight), rtol=LOSS_RTOL, atol=0)
    _assert_same_weights(_adapter(switched), _adapter(straight))
    assert "fsdp_units" not in json.loads((switched / "run_info.json").read_text())  # the resumed session: DDP


def test_a_sharded_run_restores_its_best_weights(runs: dict[str, Any], workspace: Path, tiny_model_dir: Path) -> None:
    assert runs["best"] == ["completed", 2]
    sharded = workspace / "best"
    one = train(build_config(_config(tiny_model_dir, workspace / "train.jsonl", workspace / "best-one",
                                     **{**BEST_STEPS, "grad_accum": 2})), progress=False).run_dir
    for run in (sharded, one):
        assert json.loads((run / "eval.json").read_text())["weights_from_step"] == 1
    _assert_same_weights(_adapter(sharded), _adapter(one))


@pytest.mark.parametrize("technique", [{"name": "qlora"}, {"name": "prompt_tuning"}, {"name": "adalora"}])
def test_a_technique_that_cannot_be_sharded_is_refused(technique: dict[str, Any], tiny_model_dir: Path,
                                                       tmp_path: Path) -> None:
    config = _config(tiny_model_dir, tmp_path / "train.jsonl", tmp_path / "run", technique)
    with pytest.raises(ValueError, match=r"training.distributed: technique '\w+' cannot be sharded with fsdp \(.+\)"):
        build_config(config)
    build_config({**config, "training": {**config["training"], "distributed": "ddp"}})  # control: ddp takes it


def test_sharding_refuses_a_model_it_cannot_shard_before_any_collective(tiny_model_dir: Path) -> None:
    """Checked before fully_shard touches the process group, so one process can see the errors."""
    with pytest.raises(ConfigError, match="Linear holds none"):
        distributed.shard_model(torch.nn.Linear(2, 2), None)

    class BesideTheModel(torch.nn.Module):  # a trainable weight next to the transformers model, as a prompt encoder
        def __init__(self) -> None:
            super().__init__()
            self.model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
            self.prompt = torch.nn.Parameter(torch.zeros(4, 64))

    with pytest.raises(ConfigError, match=r"trainable weights outside the model \(prompt, 1 in all\)"):
        distributed.shard_model(BesideTheModel(), None)


RSS_DRIVER = DRIVER.with_name("rss_driver.py")


def _set_up_peaks(workspace: Path, model_dir: Path, kind: str) -> dict[str, tuple[int, int]]:
    """Each rank's peak resident memory (bytes) before and after setting up a LoRA run of ``model_dir`` (stopped
    before its first step: the set-up is where a process loads the base or receives its shards)."""
    config = tiny_config_dict(model_dir, data={"train": [str(workspace / "train.jsonl")], "val_size": 0, "max_length": 32},
                              technique={"name": "lora", "r": 4, "dropout": 0.0},
                              training={"max_steps": 2, "micro_batch_size": 1, "distributed": kind},
                              eval={"num_samples": 0, "before_after": False}, output={"dir": str(workspace / f"rss-{kind}")})
    result = torchrun([str(RSS_DRIVER), json.dumps(config)], workspace)
    lines = [line.split() for line in result.stdout.splitlines() if line.startswith("PEAK ")]
    assert len(lines) == 2 and all(line[2] == "interrupted" for line in lines), result.stdout
    return {line[1]: (int(line[3]) * 1024, int(line[4]) * 1024) for line in lines}


def test_only_the_main_process_reads_the_whole_base(workspace: Path) -> None:
    """A sharded run's other process never holds a full copy of the base: it builds the model on the meta device
    and receives its half. Measured on a random Llama of ~290 MB (float32; on ~77 MB the noise of a few tens of
    MB blurred it): during set-up the receiving process's peak grows by ~0.64x the weights (its half, one full
    tensor in transit), a DDP process's (the control, which loads the base) by ~2.1x (the load's copy on top)."""
    big = workspace / "big"
    if not big.is_dir():
        tokenizer = build_tokenizer(big)
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=2048, num_hidden_layers=8,
            num_attention_heads=8, num_key_value_heads=4, eos_token_id=2, pad_token_id=0, bos_token_id=None,
        )).save_pretrained(big)
    weights = sum(f.stat().st_size for f in big.glob("*.safetensors"))
    grown = {kind: {rank: peak - before for rank, (before, peak) in _set_up_peaks(workspace, big, kind).items()}
             for kind in ("ddp", "fsdp")}
    assert grown["ddp"]["1"] > 1.0 * weights, grown  # control: a process that loads the base holds all of it
    assert grown["fsdp"]["1"] < 0.8 * weights, grown  # half, not a full copy
    assert grown["fsdp"]["0"] > 1.0 * weights, grown  # the main process still loads it whole


def test_the_meta_twin_is_the_loaded_model(tiny_model_dir: Path) -> None:
    """What the other processes build from the main's config: the same parameters (names, shapes, dtypes), the
    same attention kernel and generation settings, and no memory."""
    for num_labels in (None, 3):
        loaded = load_model(ModelConfig(name=str(tiny_model_dir), attn_implementation="eager"), torch.device("cpu"),
                            num_labels=num_labels)
        generation = getattr(loaded, "generation_config", None)  # a score head's model has none
        twin = meta_twin(loaded.config, generation, {n: p.dtype for n, p in loaded.named_parameters()},
                         num_labels=num_labels)
        assert type(twin) is type(loaded)
        assert distributed.structure(twin) == distributed.structure(loaded)
        assert all(p.is_meta for p in twin.parameters())
        assert twin.config._attn_implementation == loaded.config._attn_implementation == "eager"
        if generation is not None:
            assert twin.generation_config.to_dict() == generation.to_dict()
        half = meta_twin(loaded.config, generation,
                         {n: torch.bfloat16 if "norm" in n else p.dtype for n, p in loaded.named_parameters()},
                         num_labels=num_labels)
        assert {p.dtype for n, p in half.named_parameters() if "norm" in n} == {torch.bfloat16}


def test_sharded_dropout_draws_as_ddp(runs: dict[str, Any], workspace: Path) -> None:
    """The process that built its model on the meta device initialised the adapter there (its values then came
    from the main): its random stream moved as on real weights, so it draws the dropout masks a process that
    loaded the base draws (DDP)."""
    assert runs["dropout"] == ["completed", 3] and runs["dropout_ddp"] == ["completed", 3]
    torch.testing.assert_close(_losses(workspace / "dropout"), _losses(workspace / "dropout-ddp"), rtol=LOSS_RTOL, atol=0)
    _assert_same_weights(_adapter(workspace / "dropout"), _adapter(workspace / "dropout-ddp"))


def test_a_sharded_run_with_a_precomputed_reference_trains_as_ddp(runs: dict[str, Any], workspace: Path) -> None:
    """The receiving process holds no weights when the reference log-probs are computed: the main computes them on
    its whole base and hands them over, so both processes score their pairs against the same reference as DDP's."""
    assert runs["dpo"] == ["completed", 3] and runs["dpo_ddp"] == ["completed", 3]
    sharded, ddp = workspace / "dpo", workspace / "dpo-ddp"
    assert json.loads((sharded / "run_info.json").read_text())["fsdp_loaded_by"] == "main process"
    assert _losses(sharded)[0] == pytest.approx(math.log(2), abs=1e-4)  # the policy starts as its reference
    torch.testing.assert_close(_losses(sharded), _losses(ddp), rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(_losses(sharded, "eval"), _losses(ddp, "eval"), rtol=LOSS_RTOL, atol=0)
    _assert_same_weights(_adapter(sharded), _adapter(ddp))


def test_every_process_loads_the_base_only_for_a_frozen_reference_copy() -> None:
    """Sharded, the other processes load nothing, unless the objective keeps a frozen copy of the whole base on
    each (a live reference with a technique that cannot switch itself off): then each needs the real weights."""
    from tunelab.objectives import OBJECTIVES
    from tunelab.objectives.reference import copies_the_base
    from tunelab.techniques import TECHNIQUES

    dpo, sft = OBJECTIVES["dpo"], OBJECTIVES["sft"]
    full, lora = TECHNIQUES["full"].disabled_view, TECHNIQUES["lora"].disabled_view
    assert copies_the_base(dpo, dpo.config_class(), full)
    assert not copies_the_base(dpo, dpo.config_class(), lora)  # the adapter switched off is the reference
    assert not copies_the_base(dpo, dpo.config_class(reference="precomputed"), full)
    assert not copies_the_base(sft, sft.config_class(), full)


def test_a_twin_that_differs_from_the_main_model_is_refused_on_every_process(tiny_model_dir: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the first all-gather (which would hang or mix shards), each process compares its parameters with the
    main's; a difference raises on every process (any_process), naming it."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    distributed.check_same_structure(model)  # one process: the main's is its own
    mains = distributed.structure(model)
    mains[3] = (mains[3][0], mains[3][1], torch.bfloat16, mains[3][3])  # the main loaded that weight in bf16
    monkeypatch.setattr(distributed, "main_decides", lambda compute: mains)
    with pytest.raises(RuntimeError, match=rf"differs from the one the main process loaded \(main: \('{mains[3][0]}'"):
        distributed.check_same_structure(model)
    fewer = distributed.structure(model)[:-1]  # the main's model has one parameter fewer
    monkeypatch.setattr(distributed, "main_decides", lambda compute: fewer)
    with pytest.raises(RuntimeError, match=r"main: None, here: \('lm_head.weight'"):
        distributed.check_same_structure(model)
