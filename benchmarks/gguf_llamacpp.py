"""Loading `tunelab export --format gguf` files in llama.cpp itself (through llama-cpp-python) and comparing what
it does with transformers, for every GGUF type tunelab writes. Not part of the test suite: llama-cpp-python is
published as source only and compiles llama.cpp when installed (see docs/deployment.md for how long that took
here), so it is not a dependency of tunelab. Usage:

    pip install llama-cpp-python          # builds llama.cpp (cmake and a C++ compiler needed)
    .venv/bin/python benchmarks/gguf_llamacpp.py [--run RUN] [--types f32 f16 q8_0 ...] [--out FILE.json]

Without ``--run`` it trains a two-step LoRA run on the embedded SmolLM2-135M-Instruct (benchmarks/smollm_runs.py).
For each type: ``export_gguf`` writes the file; then llama.cpp loads it and, on the export check's chat prompts:
- tokenization: llama.cpp's token ids of each rendered prompt equal the run tokenizer's;
- greedy tokens: llama.cpp's greedy answer (top-k 1, no repeat penalty; ``CHECK_TOKENS`` tokens at most, up to
  and including the first end token) against the float model's (transformers, merged float32) and against
  transformers running the same file (its GGUF reader dequantizes the weights: same weights, other runtime);
- chat template: the file's ``tokenizer.chat_template`` as llama.cpp reads it equals the run's, and rendering a
  conversation with it the way llama-cpp-python's chat completion does (its Jinja formatter over the file's
  template) gives the run's own rendering; llama.cpp's built-in C template (``llama_chat_apply_template``, what
  llama-server uses without ``--jinja``) is reported too.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import time
from pathlib import Path
from typing import Any

import torch

from smollm_runs import train_runs  # benchmarks/ is this script's folder, first on sys.path

CONVERSATIONS = [
    [{"role": "user", "content": "My chain keeps slipping. What should I check?"}],
    [{"role": "system", "content": "You answer in one sentence."},
     {"role": "user", "content": "How do I use `json.dumps`?"},
     {"role": "assistant", "content": "`json.dumps(obj)` returns obj as a JSON string."},
     {"role": "user", "content": "And to indent it?"}],
]


def llama_greedy(llm: Any, ids: list[int], count: int) -> list[int]:
    out = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        out.append(int(token))
        if len(out) == count:
            break
    return out


@torch.no_grad()
def hf_greedy(model: Any, ids: list[int], count: int, stops: list[int], pad_id: int | None) -> list[int]:
    tensor = torch.tensor([ids])
    out = model.generate(input_ids=tensor, attention_mask=torch.ones_like(tensor), do_sample=False,
                         max_new_tokens=count, eos_token_id=stops, pad_token_id=pad_id)
    return answer(out[0, len(ids):].tolist(), stops)


def answer(tokens: list[int], stops: list[int]) -> list[int]:
    """The tokens up to and including the first end token: what a runtime returns (after it, nothing counts)."""
    for n, token in enumerate(tokens):
        if token in stops:
            return tokens[: n + 1]
    return tokens


def c_template(llm: Any, messages: list[dict[str, str]]) -> str | None:
    """llama.cpp's own C rendering with the file's template (None when llama.cpp does not recognise it)."""
    import llama_cpp

    template = llama_cpp.llama_model_chat_template(llm._model.model, None)
    array = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode()) for m in messages])
    buffer = ctypes.create_string_buffer(16384)
    written = llama_cpp.llama_chat_apply_template(template, array, len(messages), True, buffer, len(buffer))
    return buffer.raw[:written].decode() if written > 0 else None


def jinja_template(llm: Any, messages: list[dict[str, str]]) -> str:
    """The prompt llama-cpp-python's create_chat_completion builds from the file's template."""
    from llama_cpp import llama_chat_format

    eos, bos = llm.token_eos(), llm.token_bos()
    formatter = llama_chat_format.Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"],
        eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
        bos_token=llm._model.token_get_text(bos) if bos != -1 else "")
    return formatter(messages=messages).prompt


def check_type(run: Path, quant: str, reference: Any, tokenizer: Any, work: Path) -> dict[str, Any]:
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    from tunelab.export.gguf import CHECK_PROMPTS, CHECK_TOKENS, export_gguf
    from tunelab.generation import encode, render_chat, stop_token_ids

    stops = stop_token_ids(reference, tokenizer)
    started = time.perf_counter()
    # check=False: the transformers read-back is done below, once, on the same loaded file
    exported = export_gguf(run, quant, out=work / f"{run.name}-{quant}.gguf", check=False)
    export_s = time.perf_counter() - started
    path = Path(exported["file"])
    started = time.perf_counter()
    llm = Llama(model_path=str(path), n_ctx=512, n_threads=torch.get_num_threads(), verbose=False)
    load_s = time.perf_counter() - started
    same_file = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    prompts = [render_chat(tokenizer, [{"role": "user", "content": p}]) for p in CHECK_PROMPTS]
    rows = []
    llama_seconds, llama_generated = 0.0, 0
    for prompt in prompts:
        ids = encode(tokenizer, prompt)
        llama_ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        began = time.perf_counter()
        llama_tokens = answer(llama_greedy(llm, ids, CHECK_TOKENS), stops)
        llama_seconds += time.perf_counter() - began
        llama_generated += len(llama_tokens)
        float_tokens = hf_greedy(reference, ids, CHECK_TOKENS, stops, tokenizer.pad_token_id)
        file_tokens = hf_greedy(same_file, ids, CHECK_TOKENS, stops, tokenizer.pad_token_id)
        rows.append({"same_ids": llama_ids == ids, "llama": llama_tokens,
                     "equal_to_float": llama_tokens == float_tokens, "equal_to_transformers_same_file": llama_tokens == file_tokens,
                     "prefix_with_float": _prefix(llama_tokens, float_tokens),
                     "prefix_with_same_file": _prefix(llama_tokens, file_tokens),
                     "text": tokenizer.decode(llama_tokens)})
    templates = []
    for messages in CONVERSATIONS:
        ours = render_chat(tokenizer, messages)
        c_rendered = c_template(llm, messages)
        templates.append({"jinja_equal": jinja_template(llm, messages) == ours,
                          "c_builtin_equal": c_rendered == ours if c_rendered is not None else None,
                          "c_builtin": c_rendered, "ours": ours})
    result = {
        "type": quant, "size_mb": exported["size_mb"], "export_s": round(export_s, 1), "llama_load_s": round(load_s, 2),
        "llama_tokens_per_s": round(llama_generated / llama_seconds, 1), "prompts": rows,
        "same_tokenization": all(r["same_ids"] for r in rows),
        "greedy_equal_to_float": sum(r["equal_to_float"] for r in rows),
        "greedy_equal_to_transformers_same_file": sum(r["equal_to_transformers_same_file"] for r in rows),
        "template_in_file": llm.metadata.get("tokenizer.chat_template") == tokenizer.chat_template,
        "llama_cpp_python_chat_format": llm.chat_format, "templates": templates,
    }
    del llm, same_file
    path.unlink()  # the benchmark's own file in its work folder
    return result


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a finished LoRA run (default: train one on SmolLM2)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tunelab-gguf-bench"))
    parser.add_argument("--types", nargs="+", default=None, help="GGUF types (default: every type tunelab writes)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    import llama_cpp

    from tunelab.export.gguf import CHECK_PROMPTS, CHECK_TOKENS, TYPES
    from tunelab.export.quantize import merged_float

    run = args.run or train_runs(args.work, names=("support",))[0]
    args.work.mkdir(parents=True, exist_ok=True)
    reference, tokenizer, _ = merged_float(run, torch.device("cpu"))
    results = {"llama_cpp_python": llama_cpp.__version__, "run": str(run), "prompts": len(CHECK_PROMPTS),
               "greedy_tokens": CHECK_TOKENS, "types": []}
    for quant in args.types or list(TYPES):
        result = check_type(run, quant, reference, tokenizer, args.work)
        results["types"].append(result)
        print(json.dumps({k: v for k, v in result.items() if k not in ("prompts", "templates")}), flush=True)
    print_table(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")


def print_table(results: dict[str, Any]) -> None:
    n = results["prompts"]
    print(f"\nllama-cpp-python {results['llama_cpp_python']}; {n} chat prompts x {results['greedy_tokens']} greedy tokens\n")
    print("| type | MiB | loads | same tokenization | answer = float model | answer = transformers, same file | "
          "template carried | rendered as the run does (Jinja / C built-in) | llama.cpp tok/s |")
    print("| --- | ---: | --- | --- | ---: | ---: | --- | --- | ---: |")
    for r in results["types"]:
        jinja = sum(t["jinja_equal"] for t in r["templates"])
        builtin = sum(bool(t["c_builtin_equal"]) for t in r["templates"])
        print(f"| {r['type']} | {r['size_mb']:.1f} | yes | {'yes' if r['same_tokenization'] else 'NO'} | "
              f"{r['greedy_equal_to_float']}/{n} | {r['greedy_equal_to_transformers_same_file']}/{n} | "
              f"{'yes' if r['template_in_file'] else 'NO'} | "
              f"{jinja}/{len(r['templates'])} / {builtin}/{len(r['templates'])} | {r['llama_tokens_per_s']:.0f} |")


if __name__ == "__main__":
    main()
