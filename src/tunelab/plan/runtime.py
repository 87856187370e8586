"""The runtime term: resident memory a training process holds besides the model's own terms (the interpreter,
torch, transformers, peft and accelerate, the tokenizer, oneDNN's kernels, the heap's arenas).

It is measured, not guessed: once per machine, library versions and model, a subprocess trains a micro copy of
the model (same tokenizer and vocabulary, one layer of width 16) for two steps, exactly as ``tunelab train`` does;
its own peak RSS minus the micro model's own planned terms is the runtime. The peak is the child's own
(``run_info.own_peak_rss_bytes``), not ru_maxrss, which holds the planning process's peak: that put 80-100 MiB of
the planner's own memory into the runtime term of the random-initialised Llama grid cells. Cached in the tunelab
cache, keyed on the library versions and on tunelab's own source (a digest of its files): a figure measured by
other code is measured again."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from tunelab import fs
from tunelab.models import ModelConfig, load_model_config, load_tokenizer

LIBRARIES = ("torch", "transformers", "peft", "accelerate", "tunelab")
MICRO = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 1,
         "num_key_value_heads": 1, "head_dim": 16}
PROBE = """
import json, sys
from tunelab.config import build_config
from tunelab.run_info import own_peak_rss_bytes
from tunelab.training import train
train(build_config(json.loads(sys.argv[1])), progress=False)
print(own_peak_rss_bytes())
"""


def resident_bytes() -> int:
    """This process's resident memory now (Linux /proc; else its peak so far)."""
    statm = Path("/proc/self/statm")
    if statm.is_file():
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    import resource  # why: Unix only

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def source_digest() -> str:
    """A digest of tunelab's own Python files: its version number does not change with its code, and the runtime
    term depends on what the training code imports and keeps."""
    package = Path(__file__).parents[1]
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def runtime_key(model: ModelConfig) -> str:
    versions = "-".join(f"{name}{metadata.version(name)}" for name in LIBRARIES)
    return f"{versions}-src{source_digest()}-py{sys.version_info[0]}.{sys.version_info[1]}-{model.name}-{model.dtype}"


def micro_model(model: ModelConfig, folder: Path) -> Path:
    """A one-layer, width-16 copy of ``model`` (random weights) with its tokenizer, saved in ``folder``."""
    from transformers import AutoModelForCausalLM  # why: only the probe builds a model

    config = load_model_config(model)
    for key, value in MICRO.items():
        if hasattr(config, key):
            setattr(config, key, value)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    load_tokenizer(model).save_pretrained(folder)
    return folder


def micro_config(model: ModelConfig, folder: Path) -> dict[str, Any]:
    data = folder / "train.jsonl"
    data.write_text("".join('{"text": "the runtime probe of tunelab plan, line %d"}\n' % i for i in range(8)))
    return {"model": {"name": str(micro_model(model, folder / "model")), "dtype": model.dtype},
            "data": {"train": [str(data)], "val_size": 0, "max_length": 16, "dedup": False},
            "training": {"max_steps": 2, "micro_batch_size": 1},
            "eval": {"before_after": False, "forgetting": False, "num_samples": 0},
            "output": {"dir": str(folder / "run")}}


def runtime_bytes(cache_dir: Path, model: ModelConfig, own_terms: Callable[[dict[str, Any]], int]) -> int:
    """The runtime term for ``model`` (see the module doc); ``own_terms(config)`` plans the micro run without it."""
    path = cache_dir / "runtime.json"
    cached = fs.read_json(path) or {}
    key = runtime_key(model)
    if key not in cached:
        import tempfile  # why: only a first probe needs it

        with tempfile.TemporaryDirectory(prefix="tunelab-plan-") as tmp:
            config = micro_config(model, Path(tmp))
            out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(config)],
                                 capture_output=True, text=True, check=True).stdout
            cached[key] = int(out.strip().splitlines()[-1]) - own_terms(config)
        path.parent.mkdir(parents=True, exist_ok=True)
        fs.write_json(path, cached)
    return int(cached[key])
