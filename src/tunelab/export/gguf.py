"""`tunelab export RUN --format gguf`: the run's merged model as one GGUF file for llama.cpp and its kin.

Written with the ``gguf`` package (llama.cpp's own Python writer) following the layout of llama.cpp's
convert_hf_to_gguf.py for the llama architecture: the same metadata keys, tensor names (from gguf's
TensorNameMap), the q/k row permutation llama.cpp's rotary kernel expects, and the tokenizer as a GPT-2 style
BPE (tokens, types, merges, special ids) with the run's chat template carried over. The converter script itself
is not on PyPI, hence this module; it covers llama-architecture models (SmolLM2, Llama, Mistral-style) only.

Types: f32, f16, and the block quantizations the gguf package can compute (q8_0, q5_1, q5_0, q4_1, q4_0).
K-quants (q4_k_m, ...) need llama.cpp's ``llama-quantize``, which the error for them names.

The check after writing reads the file back with transformers' GGUF loader (an independent reader that
dequantizes and undoes the permutation), and compares greedy tokens with the merged float model, tokenization,
and the chat template. llama.cpp itself is not a dependency (its Python binding compiles it on install); that
it loads every type written here and answers as transformers does is verified by benchmarks/gguf_llamacpp.py,
with the figures in docs/deployment.md.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab import fs
from tunelab.errors import ConfigError
from tunelab.export.quantize import merged_float
from tunelab.generation import GenerationRequest, Sampling, encode, generate_batch, render_chat
from tunelab.models import EMBEDDED_MODELS

log = logging.getLogger(__name__)

# type -> (GGMLQuantizationType name, LlamaFileType name, share of prompts whose greedy tokens must equal the float model's)
TYPES: dict[str, tuple[str, str, float]] = {
    "f32": ("F32", "ALL_F32", 1.0),
    "f16": ("F16", "MOSTLY_F16", 0.75),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0", 0.5),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1", 0.0),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0", 0.0),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1", 0.0),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0", 0.0),
}
K_QUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
CHECK_TOKENS = 16
CHECK_PROMPTS = ["What is the capital of France?", "Write one sentence about the sea.", "How do I reverse a list in Python?"]


def check_type(quant: str) -> str:
    quant = quant.lower()
    if quant in K_QUANTS:
        raise ConfigError(f"--quant {quant}: K-quants are computed by llama.cpp's llama-quantize, not by the gguf "
                          f"package; export f16 here, then run: llama-quantize MODEL-f16.gguf MODEL-{quant}.gguf "
                          f"{quant.upper()}")
    if quant not in TYPES:
        raise ConfigError(f"--quant {quant}: choose one of {', '.join(TYPES)} (or a K-quant through llama-quantize)")
    return quant


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary kernel pairs dimension i with i + d/2 inside each head, HF's with the interleaved
    layout: reorder the rows of q_proj/k_proj (out_features, in_features) the way convert_hf_to_gguf does."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _tokenizer_fields(tokenizer: Any) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, token types, merges) of a byte-level BPE tokenizer."""
    import gguf

    state = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else None
    if not state or state.get("model", {}).get("type") != "BPE":
        raise ConfigError("GGUF export: only byte-level BPE tokenizers (GPT-2 style, as SmolLM2 and Llama 3 use) "
                          "are written here; use llama.cpp's convert_hf_to_gguf.py for other tokenizers")
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    size = max(len(tokenizer), max(by_id) + 1)
    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for index in range(size):
        token = by_id.get(index, f"[PAD{index}]")
        tokens.append(token)
        if token in added:
            types.append(gguf.TokenType.CONTROL if added[token] else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL if index in by_id else gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"].get("merges", [])]
    return tokens, [int(t) for t in types], merges


def _pre_tokenizer_name(model_name: str) -> str:
    """llama.cpp picks the pre-tokenizer by name; the embedded SmolLM2's own GGUF says 'smollm'."""
    return "smollm" if model_name in EMBEDDED_MODELS else "default"


def write_gguf(model: Any, tokenizer: Any, path: Path, quant: str, name: str, model_name: str) -> None:
    """Write ``model`` (a merged, plain transformers llama-architecture model) and ``tokenizer`` to ``path``."""
    import gguf

    config = model.config
    if config.model_type not in ("llama", "mistral"):
        raise ConfigError(f"GGUF export here covers llama-architecture models; this one is '{config.model_type}'. "
                          "Merge the run and use llama.cpp's convert_hf_to_gguf.py on the merged folder")
    qtype_name, file_type, _ = TYPES[quant]
    qtype = gguf.GGMLQuantizationType[qtype_name]
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope_theta = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    if rope_theta:
        writer.add_rope_freq_base(float(rope_theta))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType[file_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, types, merges = _tokenizer_fields(tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(model_name))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, key, None)
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)  # the run's template travels with the file

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd for the output when output.weight is absent
        new_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ConfigError(f"GGUF export: no GGUF name for the tensor {hf_name}")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, n_kv)
        if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:  # norms stay float32, as llama.cpp keeps them
            writer.add_tensor(new_name, data.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(new_name, data.astype(np.float16))
        else:
            writer.add_tensor(new_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _greedy(model: Any, tokenizer: Any, ids: list[int]) -> list[int]:
    """CHECK_TOKENS greedy tokens, with no end of turn before: the two models are compared token for token."""
    sampling = Sampling(max_new_tokens=CHECK_TOKENS, min_new_tokens=CHECK_TOKENS)
    return generate_batch(model, tokenizer, [GenerationRequest(ids, sampling)])[0].token_ids


def check_roundtrip(path: Path, reference: Any, tokenizer: Any, quant: str, prompts: list[str]) -> dict[str, Any]:
    """Read the file back with transformers' GGUF loader and compare it with the float model it came from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    load_s = time.perf_counter() - started
    same_tokens, same_ids = 0, 0
    for prompt in prompts:
        ids = encode(tokenizer, prompt)
        same_ids += ids == encode(loaded_tokenizer, prompt)
        same_tokens += _greedy(reference, tokenizer, ids) == _greedy(loaded, tokenizer, ids)
    required = TYPES[quant][2]
    result = {
        "loader": "transformers GGUF loader", "load_s": round(load_s, 2), "prompts": len(prompts),
        "greedy_tokens": CHECK_TOKENS, "same_greedy_tokens": round(same_tokens / len(prompts), 3),
        "required_same_greedy_tokens": required, "same_tokenization": round(same_ids / len(prompts), 3),
        "chat_template_carried": loaded_tokenizer.chat_template == tokenizer.chat_template,
    }
    result["passed"] = (result["same_greedy_tokens"] >= required and result["same_tokenization"] == 1.0
                        and result["chat_template_carried"])
    return result


class _CheckFailed(Exception):
    """Raised inside the atomic write of a file that failed its check: the write is abandoned, so the file is
    never put in place (not even while the check runs, nor when the command is interrupted)."""

    def __init__(self, report: dict[str, Any]) -> None:
        super().__init__("the exported file failed its check")
        self.report = report


def export_gguf(run: Path, quant: str = "f16", out: Path | None = None, check: bool = True,
                device: torch.device | str | None = "cpu") -> dict[str, Any]:
    """Merge the run, write the GGUF file (default RUN/exports/<run>-<quant>.gguf), check it; return the report,
    which is saved beside the file as <file stem>.json. A file that fails its check is not kept (``kept``)."""
    quant = check_type(quant)
    run_dir = Path(run)
    model, tokenizer, config = merged_float(run_dir, torch.device(device or "cpu"))
    name = run_dir.resolve().name
    path = Path(out) if out is not None else run_dir / "exports" / f"{name}-{quant}.gguf"
    if path.suffix != ".gguf":
        raise ConfigError(f"--out {path}: a GGUF file name ends in .gguf")
    own_folder = path.parent.resolve() == (run_dir / "exports").resolve()  # tunelab's folder in the run
    if own_folder:
        fs.own_entry(run_dir, "exports")  # recorded in the run's ownership record (refused if exports/ is the user's)
    for existing in (path, path.with_suffix(".json")):  # the file and its check report beside it
        if existing.exists() and not own_folder:
            raise ConfigError(f"--out {path}: {existing} exists; remove it or give another name (tunelab never "
                              "replaces a file it did not write)")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        report = _write_checked(model, tokenizer, path, quant, name, config.model.name, check, run_dir)
    except _CheckFailed as failed:
        report = failed.report
        if own_folder:  # an earlier export of tunelab's at this name is not this run's checked file any more
            fs.remove(path)
    fs.write_json(path.with_suffix(".json"), report)  # beside the file, as the docs say, --out or not
    return report


def _write_checked(model: Any, tokenizer: Any, path: Path, quant: str, name: str, model_name: str, check: bool,
                   run_dir: Path) -> dict[str, Any]:
    """Write the file under its temporary name, check it there and only then put it at ``path``; raise
    ``_CheckFailed`` (with the report) when it does not pass, leaving nothing at ``path``."""
    started = time.perf_counter()
    with fs.atomic_file(path) as tmp:
        write_gguf(model, tokenizer, tmp, quant, name, model_name)
        report: dict[str, Any] = {"run": str(run_dir), "file": str(path), "type": quant,
                                  "size_mb": round(tmp.stat().st_size / 2**20, 2),
                                  "write_s": round(time.perf_counter() - started, 2), "kept": True}
        if check:
            chat = bool(tokenizer.chat_template)
            prompts = [render_chat(tokenizer, [{"role": "user", "content": p}]) if chat else p for p in CHECK_PROMPTS]
            report["check"] = check_roundtrip(tmp, model, tokenizer, quant, prompts)
            if not report["check"]["passed"]:
                raise _CheckFailed({**report, "kept": False})
    return report
