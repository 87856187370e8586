"""GPU smoke check and packing throughput, for a machine with CUDA (not part of the test suite).

Builds a model with SmolLM2-135M's architecture (random weights, the real tokenizer from TOKENIZER_DIR), then
runs tunelab LoRA training on the shipped pydoc Q&A data twice, with packing on and off, in dtype auto
(bf16 on GPUs that support it) and prints tokens/s and the ratio. Usage:

    python benchmarks/gpu_smoke.py TOKENIZER_DIR [--steps 30] [--attn sdpa]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tunelab.config import build_config
from tunelab.training import train

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
DATA = Path(__file__).parents[1] / "src" / "tunelab" / "assets" / "pydoc_qa" / "pydoc_qa.jsonl"


def build_model(tokenizer_dir: Path, out: Path) -> Path:
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def run(model_dir: Path, packing: bool, steps: int, attn: str, out: Path) -> dict:
    config = build_config({
        "model": {"name": str(model_dir), "attn_implementation": attn},
        "data": {"train": [str(DATA)], "val_size": 64, "max_length": 512, "packing": packing},
        "technique": {"name": "lora", "r": 16},
        "training": {"max_steps": steps, "micro_batch_size": 8},
        "eval": {"num_samples": 1, "max_new_tokens": 16},
        "output": {"dir": str(out / f"packing-{packing}")},
    })
    started = time.time()
    result = train(config, progress=False)
    metrics = [json.loads(l) for l in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [m for m in metrics if m["kind"] == "train"]
    return {"packing": packing, "tokens_per_s": train_lines[-1]["tokens_per_s"], "final_loss": train_lines[-1]["loss"],
            "seconds": round(time.time() - started, 1), "max_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
            "eval": result.evaluation["tuned"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tokenizer_dir", type=Path)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--attn", default="sdpa")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this check needs a CUDA GPU"
    print(torch.cuda.get_device_name(), "bf16:", torch.cuda.is_bf16_supported(), file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(args.tokenizer_dir, Path(tmp) / "model")
        results = []
        for packing in (True, False):
            torch.cuda.reset_peak_memory_stats()
            results.append(run(model_dir, packing, args.steps, args.attn, Path(tmp)))
            print(json.dumps(results[-1]))
    print(f"packing speed-up (tokens/s, packed / length-grouped padding): {results[0]['tokens_per_s'] / results[1]['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
