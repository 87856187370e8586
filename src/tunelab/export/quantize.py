"""`tunelab quantize RUN`: quantize a run's result several ways and measure each against the unquantized model.

Every method starts from the same merged float32 model (the technique's own merge for an adapter run, the
saved model for a full run) and is measured the same way:
- size on disk: the quantized model saved with ``save_pretrained`` (safetensors), or the serialized
  state dict where a method has no safetensors form (torch dynamic int8);
- memory: bytes of the model's parameters and buffers once loaded (transformers' ``get_memory_footprint``);
- speed: greedy tokens per second over the validation prompts, a fixed number of new tokens each;
- quality: validation loss on the run's own validation split (change against the unquantized model), and the
  share of prompts whose greedy answer is identical to the unquantized model's.

Methods: bitsandbytes ``int8`` (LLM.int8), ``nf4`` and ``fp4`` (4-bit, CPU and CUDA), ``dynamic-int8``
(torch's own dynamic quantization of linear layers, CPU), ``gptq`` and ``awq`` (calibrated 4-bit; CUDA only,
through a maintained library). A method that cannot run here gets a row with the reason instead of figures.

``--save METHOD`` keeps the model that method measured: ``RUN/quantized-<method>/`` holds it as
``save_pretrained`` writes it (safetensors, with its ``quantization_config`` in config.json, so plain
``AutoModelForCausalLM.from_pretrained`` opens it quantized), the run's tokenizer, and ``quantization.json``
(its row of the table, the unquantized row, and its greedy answers). Only the bitsandbytes methods can be saved
(see ``save_refusal``).
"""

from __future__ import annotations

import io
import logging
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from tunelab import fs
from tunelab.data import collate, prepare_data
from tunelab.data.formats import RECORD_KINDS
from tunelab.errors import ConfigError
from tunelab.eval import validation_loss
from tunelab.eval.report import QUANTIZE_REPORT as REPORT_NAME  # the eval reports of the run read it too
from tunelab.eval.report import refresh_reports
from tunelab.generation import GenerationRequest, Sampling, encode, generate_batch, sample_prompts
from tunelab.models import cache_root, default_device
from tunelab.objectives import OBJECTIVES
from tunelab.result import check_generates, find_result, load_run

log = logging.getLogger(__name__)

METHODS = ("int8", "nf4", "fp4", "dynamic-int8", "gptq", "awq")
REFERENCE = "float32"


@dataclass
class Measured:
    method: str
    status: str  # "ok" or "skipped"
    reason: str | None = None
    size_mb: float | None = None  # MiB (2**20 bytes), as every size tunelab prints: labelled MiB
    memory_mb: float | None = None  # MiB
    tokens_per_s: float | None = None
    val_loss: float | None = None
    loss_change: float | None = None
    same_answers: float | None = None  # share of prompts answered exactly as the unquantized model does
    load_s: float | None = None
    answers: list[list[int]] | None = None  # greedy token ids per prompt (kept for a saved model, not in the table)


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"--methods: unknown {unknown or 'empty list'}; choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(methods))


def skip_reason(method: str, device: torch.device) -> str | None:
    """Why ``method`` cannot run on this machine, or None when it can."""
    import importlib.util

    if method in ("int8", "nf4", "fp4") and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    if method == "dynamic-int8" and device.type != "cpu":
        return "torch dynamic quantization runs on the CPU only; use int8 (bitsandbytes) on a GPU"
    if method in ("gptq", "awq"):
        if device.type != "cuda":
            here = [m for m in ("int8", "nf4", "fp4", "dynamic-int8") if skip_reason(m, device) is None]
            options = f" ({', '.join(here)} {'run' if len(here) > 1 else 'runs'} here)" if here else ""
            return f"{method.upper()} needs a CUDA GPU for calibration and its kernels; this machine has none{options}"
        package = {"gptq": "gptqmodel", "awq": "llm-compressor"}[method]
        return (f"{method.upper()} is not built into tunelab yet: merge the run and quantize the merged folder with "
                f"{package} on this GPU")
    return None


SAVABLE = ("int8", "nf4", "fp4")
SAVED_FIGURES = "quantization.json"  # beside a saved quantized model: what the table measured on it


def saved_name(method: str) -> str:
    """The run folder's entry that ``--save METHOD`` writes."""
    return f"quantized-{method}"


def save_refusal(method: str, device: torch.device) -> str | None:
    """Why ``--save METHOD`` cannot write a model here (None: it can)."""
    if method not in METHODS:
        return f"unknown method; choose from {', '.join(SAVABLE)}"
    if method == "dynamic-int8":
        return ("torch dynamic quantization has no saved form that transformers reads: its packed int8 layers exist "
                "only in memory or in a pickled state dict, which tunelab never writes. Save int8 (bitsandbytes) "
                "instead, or quantize when loading: torch.ao.quantization.quantize_dynamic on the merged model "
                "(tunelab merge)")
    reason = skip_reason(method, device)
    if reason:
        return f"it cannot run here: {reason}"
    return None


def _save_size_mb(model: Any, keep: Path | None = None) -> float:
    """Size of the model as ``save_pretrained`` writes it; the files are kept in ``keep`` when given."""
    with tempfile.TemporaryDirectory(prefix="tunelab-q-") as tmp:
        folder = keep or Path(tmp)
        model.save_pretrained(folder, safe_serialization=True)
        return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 2**20


def _state_dict_mb(model: Any) -> float:
    buffer = io.BytesIO()  # written here, never read back: no pickle is ever loaded
    torch.save(model.state_dict(), buffer)
    return buffer.tell() / 2**20


def _load_bnb(merged_dir: Path, method: str, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if method == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method, bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(merged_dir, quantization_config=config, device_map=device.type)


def _load_dynamic_int8(merged_dir: Path, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    with warnings.catch_warnings():  # torch.ao is deprecated in favour of torchao, which does not run on every CPU
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        # The output head stays float: it is tied to the embeddings in many models, and quantizing it costs the
        # most quality for the least memory (the same exclusion bitsandbytes makes by default).
        linear = {name for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear) and name != "lm_head"}
        return quantize_dynamic(model, linear, dtype=torch.qint8)


class _Measurer:
    """What every method is measured on: the validation examples, prompts and the reference's answers."""

    def __init__(self, config: Any, tokenizer: Any, device: torch.device, samples: int, max_new_tokens: int) -> None:
        self.config, self.tokenizer, self.device = config, tokenizer, device
        data = prepare_data(config.data, tokenizer, cache_root() / "data")
        if not data.validation:
            raise ConfigError("quantize: the run has no validation data to measure quality on (data.val_size is 0 "
                              "and data.validation is empty)")
        self.validation, self.objective = data.validation, OBJECTIVES[config.objective.name].bind(config.objective)
        chat = bool(data.validation_examples[0].messages)
        self.prompts = [s["prompt"] for s in sample_prompts(tokenizer, data.validation_examples, samples)]
        self.special_tokens = not chat  # plain-text prompts get the tokenizer's own BOS/EOS, as in training
        self.prompt_ids = [encode(tokenizer, p, special=not chat) for p in self.prompts]
        self.max_new_tokens = max_new_tokens
        self.reference_answers: list[list[int]] | None = None

    def measure(self, model: Any, method: str, size_mb: float, load_s: float, reference: Measured | None) -> Measured:
        memory_mb = model.get_memory_footprint() / 2**20 if hasattr(model, "get_memory_footprint") else None
        if method == "dynamic-int8":  # packed int8 weights are not parameters: count the serialized state instead
            memory_mb = _state_dict_mb(model)
        loss = validation_loss(model, self.validation, self.objective.loss_sum, self.tokenizer.pad_token_id,
                               self.config.eval.batch_size, self.device)["loss"]
        answers, seconds = self._answers(model)
        tokens = sum(len(a) for a in answers)
        if self.reference_answers is None:
            self.reference_answers = answers
        same = sum(a == r for a, r in zip(answers, self.reference_answers)) / max(1, len(answers))
        return Measured(method, "ok", size_mb=round(size_mb, 2), memory_mb=round(memory_mb, 2) if memory_mb else None,
                        tokens_per_s=round(tokens / seconds, 2) if seconds else None, val_loss=round(loss, 5),
                        loss_change=round(loss - reference.val_loss, 5) if reference else 0.0,
                        same_answers=round(same, 3), load_s=round(load_s, 2), answers=answers)

    @torch.no_grad()
    def _answers(self, model: Any) -> tuple[list[list[int]], float]:
        # Greedy and exactly max_new_tokens long (no end of turn before): every method is timed on as many tokens
        # and compared token for token.
        sampling = Sampling(max_new_tokens=self.max_new_tokens, min_new_tokens=self.max_new_tokens)
        answers, started = [], time.perf_counter()
        for ids in self.prompt_ids:  # one at a time: the speed of a single request, as a chat user sees it
            row = generate_batch(model, self.tokenizer, [GenerationRequest(ids, sampling)])[0]
            answers.append(row.token_ids)
        return answers, time.perf_counter() - started


def merged_float(run_dir: Path, device: torch.device) -> tuple[Any, Any, Any]:
    """(merged float32 model, tokenizer, run config): the technique's own merge for an adapter, else the model."""
    found = find_result(run_dir)
    if found.run_dir is None:
        raise ConfigError(f"{run_dir}: an adapter folder on its own; give its run folder (quantize and export read "
                          "the run's config and data)")
    check_generates(found)  # both ship a text generator (and measure its greedy answers): a score head has none
    loaded = load_run(found, device=device, dtype="float32")
    technique = found.technique
    if technique.attach is None:  # a standalone model result
        return loaded.model, loaded.tokenizer, loaded.config
    del loaded.model
    merge = getattr(technique, "merge", None)
    if merge is None:  # the technique's own reason, the same words `tunelab merge` gives
        raise ConfigError(f"{run_dir}: technique '{technique.name}' cannot be merged into its base, so it cannot be "
                          f"quantized or exported as one model: {technique.refusal('merge') or 'it has no merge'}")
    return merge(loaded.config, loaded.result_dir, device).model.eval(), loaded.tokenizer, loaded.config


def _check_measurable(run_dir: Path) -> None:
    """Refuse, before minutes of merging, a run whose validation data quantize cannot score: each method's
    validation loss is the language-model loss of SFT records (``validation_loss`` with the SFT collate); pairs,
    labeled texts or prompts need their objective's reference, head or rollouts, which quantize does not build."""
    found = find_result(run_dir)
    if found.config is None:
        return  # an adapter folder on its own: merged_float names it
    check_generates(found)
    name = found.config.objective.name
    objective = OBJECTIVES[name]
    if objective.collate is not collate:  # its records make batches of their own (pairs, labels, prompts)
        kind = objective.records
        raise ConfigError(f"{run_dir}: quantize measures each method by its validation loss on SFT records, and this "
                          f"run (objective '{name}') trained on {RECORD_KINDS[kind]}; that is not supported yet. "
                          f"`tunelab merge {run_dir}` gives its merged model, `tunelab export {run_dir}` a GGUF file")


def quantize_run(run: Path, methods: list[str], samples: int = 4, max_new_tokens: int = 16,
                 device: torch.device | str | None = None,
                 on_row: Callable[[Measured], None] | None = None, save: str | None = None) -> dict[str, Any]:
    """Measure the unquantized model and each method; write and return the report (RUN/quantize.json). ``save``:
    one method whose quantized model is kept in RUN/quantized-<method>/ with its figures (measured too if
    ``methods`` lacks it)."""
    run_dir = Path(run)
    device = torch.device(device) if device is not None else default_device()
    _check_measurable(run_dir)
    if save is not None:  # refused before minutes of merging and measuring
        refusal = save_refusal(save, device)
        if refusal:
            raise ConfigError(f"--save {save}: {refusal}")
        fs.own_entry(run_dir, saved_name(save))  # a folder of that name that tunelab did not write is refused
        methods = list(dict.fromkeys([*methods, save]))
    merged, tokenizer, config = merged_float(run_dir, device)
    measurer = _Measurer(config, tokenizer, device, samples, max_new_tokens)
    rows: list[Measured] = []
    saved: Measured | None = None
    tmp = Path(tempfile.mkdtemp(prefix="tunelab-merged-"))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)  # the start point every method loads from
        reference = measurer.measure(merged, REFERENCE, _save_size_mb(merged), 0.0, None)
        rows.append(reference)
        _report(on_row, reference)
        del merged
        for method in methods:
            keep = tmp / "saved" if method == save else None
            rows.append(_one_method(tmp, method, device, measurer, reference, keep))
            _report(on_row, rows[-1])
        report = {"run": str(run_dir), "device": device.type, "model": config.model.name,
                  "technique": config.technique.name, "prompts": len(measurer.prompt_ids),
                  "max_new_tokens": max_new_tokens,
                  "validation_tokens": sum(len(e.input_ids) for e in measurer.validation),
                  "rows": [{k: v for k, v in vars(r).items() if k != "answers"} for r in rows]}
        saved = next((r for r in rows if r.method == save), None)
        if saved is not None and saved.status == "ok":
            report["saved"] = str(_keep(run_dir, tmp / "saved", tokenizer, report, saved, reference, measurer))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fs.write_entry_json(run_dir, REPORT_NAME, report)  # recorded in the run's ownership record
    for folder in refresh_reports(run_dir, report):  # their HTML and Markdown reports gain this table
        log.info("quantization table added to %s", folder / "report.html")
    if saved is not None and "saved" not in report:  # after the table is written: its minutes are not lost
        raise ConfigError(f"--save {save}: {save} could not be measured here ({saved.reason}), so nothing was "
                          f"saved; the table of the other methods is in {run_dir / REPORT_NAME}")
    return report


def _keep(run_dir: Path, model_files: Path, tokenizer: Any, report: dict[str, Any], row: Measured,
          reference: Measured, measurer: _Measurer) -> Path:
    """RUN/quantized-<method>/: the measured model's files, the tokenizer and its figures, put in place whole."""
    with fs.new_entry_folder(run_dir, saved_name(row.method)) as folder:
        for path in model_files.iterdir():
            shutil.copy2(path, folder / path.name)
        tokenizer.save_pretrained(folder)
        figures = {key: report[key] for key in ("run", "device", "model", "technique", "prompts", "max_new_tokens",
                                                "validation_tokens")}
        fs.write_json(folder / SAVED_FIGURES, {
            **figures, "method": row.method, "measured": {k: v for k, v in vars(row).items() if k != "answers"},
            "unquantized": {k: v for k, v in vars(reference).items() if k != "answers"},
            # greedy, exactly max_new_tokens new tokens each (min_new_tokens too), the prompt encoded with the
            # tokenizer's special tokens when special_tokens: what a reload of this folder must reproduce
            "special_tokens": measurer.special_tokens,
            "greedy": [{"prompt": p, "answer_ids": a} for p, a in zip(measurer.prompts, row.answers or [])]})
    log.info("saved the %s model and its figures in %s", row.method, run_dir / saved_name(row.method))
    return run_dir / saved_name(row.method)


def _report(on_row: Callable[[Measured], None] | None, row: Measured) -> None:
    if on_row is not None:
        on_row(row)


def _one_method(merged_dir: Path, method: str, device: torch.device, measurer: _Measurer, reference: Measured,
                keep: Path | None = None) -> Measured:
    """``keep``: a folder to keep the quantized model's saved files in (``--save``)."""
    reason = skip_reason(method, device)
    if reason:
        return Measured(method, "skipped", reason=reason)
    started = time.perf_counter()
    try:
        if method in ("int8", "nf4", "fp4"):
            model = _load_bnb(merged_dir, method, device)
            # Saved before any forward pass: on a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight in
            # place at its first inference call, and saving converts it back only approximately (the model in
            # memory changes too), so a model saved after that is no longer the one nf4 or fp4 gives.
            size = _save_size_mb(model, keep)
        else:  # dynamic-int8 (skip_reason has ruled out every other method)
            model = _load_dynamic_int8(merged_dir, device)
            size = _state_dict_mb(model)
    except (RuntimeError, ValueError, ImportError, NotImplementedError, ConfigError) as exc:
        log.warning("%s failed: %s", method, exc)
        return Measured(method, "skipped", reason=f"failed on this machine: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    load_s = time.perf_counter() - started
    model.eval()
    return measurer.measure(model, method, size, load_s, reference)
