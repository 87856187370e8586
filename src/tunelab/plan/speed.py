"""Seconds per optimizer step for ``tunelab plan --recommend``: measured on shallow copies of the model.

A step's matmul FLOPs are easy to count; its time is not. On a CPU with bfloat16 matrix units the matmuls are well
under half of a LoRA step (docs/performance.md: the rest is elementwise passes, the adapters' dropout masks,
attention), and checkpointing costs more than its recomputed forward (on a CPU its heap policy returns freed
chunks to the system, and they are faulted in again). A FLOP count divided by a square GEMM's measured rate, the
previous estimate, came out 2-4 times short in bfloat16 and made it look 6-10 times faster than float32.

So the time is measured the way ``tunelab train`` spends it: a subprocess trains copies of the model at its real
widths (random weights, its tokenizer) with ``PROBE_LAYERS`` decoder layers, with the config's technique at its
default settings (those --recommend ranks), at the planned rows, length and supervised share, ``PROBE_STEPS``
steps each, for every dtype and checkpointing setting ranked. Every step trains the same rows, so the fastest one
after the first is the step without the machine's other work in it (a median kept a load spike of one copy, and
the difference of two copies magnified it). The fastest step of each pair (shallow, deep) gives
    layer = (t_deep - t_shallow) / (deep - shallow)       one decoder layer's forward, backward and optimizer share
    rest  = t_shallow - shallow * layer                    embedding, head, loss, optimizer, the loop
and a set-up of that technique, dtype and checkpointing setting with L layers is predicted at rest + L * layer.
Set-ups of other techniques are not timed: scaling a LoRA probe's layer by their matmul FLOPs came out 1.5-1.7
times too long for full fine-tuning and the bottleneck adapter (benchmarks/plan_speed.py), because a technique's
own elementwise work (LoRA's dropout masks, say) is not in its FLOPs.

No library times a training step for a model it does not load; accelerate's estimator counts memory only.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.config import TunelabConfig
from tunelab.models import default_device, load_model_config, load_tokenizer
from tunelab.plan.memory import Shape

PROBE_LAYERS = (1, 4)  # the shallow and the deep copy: their difference is three layers' time
PROBE_STEPS = 6  # the first is a warm-up (kernels chosen, pages touched); the fastest of the others is kept
PROBE = """
import json, sys
from pathlib import Path
from tunelab.config import build_config
from tunelab.training import train
out = []
for entry in json.loads(sys.argv[1]):
    train(build_config(entry["config"]), progress=False)
    run = Path(entry["config"]["output"]["dir"])
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    elapsed = [x["elapsed_s"] for x in lines if x.get("kind") == "train"]
    steps = [b - a for a, b in zip(elapsed, elapsed[1:])]  # every step after the first (warm-up)
    info = json.loads((run / "run_info.json").read_text())
    out.append({"dtype": entry["dtype"], "checkpointing": entry["checkpointing"], "layers": entry["layers"],
                "seconds": min(steps), "parameters": info["total_parameters"]})
print(json.dumps(out))
"""


@dataclass(frozen=True)
class StepTime:
    """One (dtype, checkpointing) setting's measured step split: ``rest`` seconds plus ``layer`` seconds per decoder
    layer, the probe's layer holding ``layer_parameters`` parameters."""

    rest: float
    layer: float
    layer_parameters: float

    def predict(self, layers: int) -> float:
        """Seconds per step of the probe's technique in this setting with ``layers`` decoder layers."""
        return max(self.rest, 0.0) + layers * self.layer


Setting = tuple[str, bool]  # (dtype, gradient checkpointing)


def step_times(results: list[dict[str, Any]]) -> dict[Setting, StepTime]:
    """Each setting's ``StepTime`` from the probe's runs (see the module doc)."""
    runs: dict[Setting, dict[int, dict[str, Any]]] = {}
    for result in results:
        runs.setdefault((result["dtype"], result["checkpointing"]), {})[result["layers"]] = result
    times = {}
    added = PROBE_LAYERS[1] - PROBE_LAYERS[0]
    for setting, pair in runs.items():
        shallow, deep = pair[PROBE_LAYERS[0]], pair[PROBE_LAYERS[1]]
        layer = max(deep["seconds"] - shallow["seconds"], 0.0) / added
        times[setting] = StepTime(rest=shallow["seconds"] - PROBE_LAYERS[0] * layer, layer=layer,
                                  layer_parameters=(deep["parameters"] - shallow["parameters"]) / added)  # one layer's
    return times


def probe_config(config: TunelabConfig, shape: Shape, setting: Setting, layers: int, folder: Path) -> dict[str, Any]:
    """The probe run of ``layers`` layers in ``setting``: the config's technique with its default settings (those
    --recommend ranks), the planned rows per micro-batch, each row one prompt/completion example cut to the planned
    length, supervised on about the planned share."""
    data = folder / "train.jsonl"
    if not data.exists():
        # " the" is one token in the common BPE vocabularies; the completion is longer than the row, so every
        # example is cut to the planned length (data.overlong's default) and every row is full
        prompt = round((1 - shape.supervised_share) * shape.length)
        record = {"prompt": "the" + " the" * max(prompt - 1, 0), "completion": " the" * (2 * shape.length)}
        data.write_text((json.dumps(record) + "\n") * (shape.rows * PROBE_STEPS))
    dtype, checkpointing = setting
    return {"model": {"name": str(folder / f"model-{layers}"), "dtype": dtype},
            "technique": {"name": config.technique.name},  # its defaults: the settings --recommend ranks
            "data": {"train": [str(data)], "val_size": 0, "max_length": shape.length, "dedup": False},
            "training": {"max_steps": PROBE_STEPS, "micro_batch_size": shape.rows, "grad_accum": 1, "log_every": 1,
                         "gradient_checkpointing": checkpointing, "seed": config.training.seed},
            "eval": {"before_after": False, "forgetting": False, "num_samples": 0},
            "output": {"dir": str(folder / f"run-{dtype}-{checkpointing}-{layers}")}}


def shallow_model(config: TunelabConfig, layers: int, folder: Path) -> None:
    """A copy of the config's model with ``layers`` decoder layers, its widths and tokenizer, random weights."""
    from transformers import AutoModelForCausalLM  # why: only the probe builds a model
    from transformers.utils import logging as hf_logging

    model_config = load_model_config(config.model)
    model_config.num_hidden_layers = layers
    for key in ("layer_types", "mlp_only_layers"):  # per-layer lists some configs carry: cut to the new depth
        if isinstance(getattr(model_config, key, None), list):
            setattr(model_config, key, getattr(model_config, key)[:layers])
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a temporary copy: no "Writing model shards" bar in the plan's output
    try:
        AutoModelForCausalLM.from_config(model_config).save_pretrained(folder)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    load_tokenizer(config.model).save_pretrained(folder)


def measure_step_times(config: TunelabConfig, shape: Shape, settings: list[Setting],
                       device: str = "cpu") -> dict[Setting, StepTime]:
    """Train the probe copies in one subprocess (its output kept from the planner's) and split their step times.
    Raises RuntimeError when they cannot be measured: ``device`` is not the one training would use here, or the
    probe failed (its last line of error)."""
    here = default_device().type
    if device != here:
        raise RuntimeError(f"the plan is for {device} and training here would run on {here}")
    with tempfile.TemporaryDirectory(prefix="tunelab-speed-") as tmp:
        folder = Path(tmp)
        for layers in PROBE_LAYERS:
            shallow_model(config, layers, folder / f"model-{layers}")
        # Checkpointed runs first: their heap policy returns freed chunks to the system, and after a training without
        # it in the same process glibc's heap made them look cheaper than `tunelab train` finds them (3 layers,
        # bfloat16, one thread: 0.54 s a step, against 0.67-0.69 first or alone; the other way round 0.41-0.45 s
        # against 0.41 alone)
        entries = [{"dtype": setting[0], "checkpointing": setting[1], "layers": layers,
                    "config": probe_config(config, shape, setting, layers, folder)}
                   for setting in sorted(settings, key=lambda s: not s[1]) for layers in PROBE_LAYERS]
        done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(entries)], capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}, no output"])[-1]
            raise RuntimeError(f"the speed probe failed: {last}")
        return step_times(json.loads(done.stdout.strip().splitlines()[-1]))
