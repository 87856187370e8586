"""Small finished LoRA runs on the embedded SmolLM2-135M-Instruct for the benchmarks that need real runs
(serve.py, gguf_llamacpp.py): two steps each, trained once into a work folder and reused afterwards."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).parents[1]
DATA = {"support": ROOT / "examples" / "data" / "support_chat.jsonl",
        "pydoc": ROOT / "src" / "tunelab" / "assets" / "pydoc_qa" / "pydoc_qa.jsonl"}


def train_runs(work: Path, names: tuple[str, ...] = ("support", "pydoc")) -> list[Path]:
    """One finished LoRA run per name of ``DATA`` under ``work`` (trained only when not already there)."""
    from tunelab.config import build_config
    from tunelab.training import train

    runs = []
    for name in names:
        run_dir = work / f"{name}-lora"
        if not (run_dir / "adapter" / "adapter_model.safetensors").is_file():
            work.mkdir(parents=True, exist_ok=True)
            train_file = work / f"{name}.jsonl"
            train_file.write_text("\n".join(DATA[name].read_text().splitlines()[:24]) + "\n")
            config = build_config({
                "data": {"train": [str(train_file)], "val_size": 2, "max_length": 128},
                "technique": {"name": "lora", "r": 8, "dropout": 0.0},
                "training": {"max_steps": 2, "micro_batch_size": 2, "learning_rate": 1e-3},
                "eval": {"before_after": False, "forgetting": False, "num_samples": 0},
                "output": {"dir": str(run_dir)},
            })
            train(config, progress=False)
        runs.append(run_dir)
    return runs
