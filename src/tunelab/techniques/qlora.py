"""QLoRA: LoRA on a frozen base stored in 4-bit (or 8-bit) through bitsandbytes (Dettmers et al. 2023, "QLoRA:
Efficient Finetuning of Quantized LLMs", https://arxiv.org/abs/2305.14314).

The base weight is stored quantized, blockwise with one absmax scale c per block of 64 values:
    W0 ≈ dequant(Q, c) = c * code[Q]          Q: 4-bit indices into NF4 (or FP4) levels
and every forward dequantizes it on the fly in ``compute_dtype``:
    h = dequant(Q, c) x + (alpha / r) * B A x
Double quantization also quantizes the scales c (8-bit, blocks of 256), saving ~0.37 bits per weight. Only A and
B train (all of LoRA's options apply). Memory of the linear weights: ~0.5 byte per weight in 4-bit (1/8 of fp32),
1 byte in 8-bit (LLM.int8, Dettmers et al. 2022, https://arxiv.org/abs/2208.07339). Embeddings, norms and the output
head stay in full precision; so does a new score head (an objective with ``num_labels``), which trains in full.
The saved adapter is a standard PEFT LoRA adapter; tunelab reloads it on the same quantized base. ``tunelab merge``
folds it into the *dequantized* 4/8-bit base (the weights it was trained against), and says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from tunelab.models import adapter_num_labels, apply_head_config, load_model, resolve_dtype, saved_head_config
from tunelab.techniques import lora
from tunelab.techniques.base import BaseLoad, MergeResult, RunContext, Technique, peft_disabled_view, peft_wrapping


class QloraSettings(lora.LoraOptions):
    name: Literal["qlora"] = Field("qlora", description="LoRA on a 4-bit or 8-bit quantized base (bitsandbytes).")
    bits: Literal[4, 8] = Field(4, description="Storage of the frozen base's linear weights: 4-bit or 8-bit (LLM.int8).")
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit code: 'nf4' (normal-float levels, best for normally distributed weights) or 'fp4'.")
    double_quant: bool = Field(True, description="Quantize the per-block scales too (4-bit only; ~0.37 bit/weight less).")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype of the dequantized weights in each matmul; 'auto' follows model.dtype's rule "
        "(float32 on CPU, bfloat16 on GPUs that support it).")
    storage_dtype: Literal["uint8", "float16", "bfloat16", "float32"] = Field(
        "uint8", description="Container dtype of the packed 4-bit weights (bnb_4bit_quant_storage); non-uint8 "
        "containers let FSDP shard them alongside other weights.")

    @model_validator(mode="after")
    def _options_fit_a_quantized_base(self) -> "QloraSettings":
        if self.init in lora.BASE_CHANGING_INITS:
            raise ValueError(f"init '{self.init}' rewrites the base weights, which are quantized here; use 'default' "
                             "or 'gaussian' (or technique lora)")
        if self.bits == 8 and (self.quant_type != "nf4" or not self.double_quant or self.storage_dtype != "uint8"):
            # Only the 4-bit path reads these; an 8-bit config that sets them is a mistake.
            if "quant_type" in self.model_fields_set or "double_quant" in self.model_fields_set or "storage_dtype" in self.model_fields_set:
                raise ValueError("quant_type, double_quant and storage_dtype apply to bits: 4 only")
        return self


def full_precision_modules(num_labels: int | None) -> list[str]:
    """The modules left out of quantization: the output head, and a new score head (``num_labels`` set) under any
    of the names PEFT trains in full for a SEQ_CLS adapter (modules_to_save): PEFT copies that head to train it,
    and a 4/8-bit weight can neither be copied into a trainable float parameter nor take a gradient. Naming
    skip modules replaces transformers' defaults (which would keep the last module), so each is named here."""
    from peft.utils.constants import SEQ_CLS_HEAD_NAMES

    return ["lm_head"] + (list(SEQ_CLS_HEAD_NAMES) if num_labels is not None else [])


def quantization_config(settings: QloraSettings, device: torch.device, num_labels: int | None = None) -> Any:
    from transformers import BitsAndBytesConfig

    skip = full_precision_modules(num_labels)
    if settings.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=settings.quant_type, bnb_4bit_use_double_quant=settings.double_quant,
        bnb_4bit_compute_dtype=resolve_dtype(settings.compute_dtype, device),
        bnb_4bit_quant_storage=getattr(torch, settings.storage_dtype), llm_int8_skip_modules=skip,
    )


def base_load(settings: QloraSettings, device: torch.device, num_labels: int | None = None) -> BaseLoad:
    detail = f"{settings.quant_type}, double quant {'on' if settings.double_quant else 'off'}" if settings.bits == 4 else "LLM.int8"
    return BaseLoad(quantization_config=quantization_config(settings, device, num_labels), device_map={"": str(device)},
                    note=f"linear layers quantized to {settings.bits}-bit by bitsandbytes ({detail})")


def prepare(model: nn.Module, settings: QloraSettings, context: RunContext | None = None) -> nn.Module:
    from peft import prepare_model_for_kbit_training

    # Freezes the base and casts its non-quantized parameters (norms, embeddings) to float32 for stable training;
    # activation checkpointing stays under training.gradient_checkpointing's control.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return lora.prepare(model, settings, context)


def merge(config: Any, folder: Path, device: torch.device) -> MergeResult:
    """Fold the adapter into the dequantized base: W = dequant(Q, c) + s B A, exactly the weights it trained with."""
    from peft import PeftModel

    settings = config.technique
    num_labels = adapter_num_labels(folder)  # a score head's adapter merges onto a base with that head
    base = load_model(config.model, device, base_load(settings, device, num_labels), num_labels=num_labels)
    base = apply_head_config(base.dequantize(dtype=resolve_dtype(config.model.dtype, device)), saved_head_config(folder))
    with peft_wrapping():
        merged = PeftModel.from_pretrained(base, folder).merge_and_unload()
    return MergeResult(merged, f"QLoRA: merged the adapter into the DEQUANTIZED {settings.bits}-bit base "
                               f"({base_load(settings, device).note}); the merged model is full precision, and its "
                               "base weights carry the quantization error the adapter was trained against")


QUANTIZED_ALONE = ("its base is loaded in 4/8-bit, and the adapters of one served batch share one base as it was "
                   "loaded for the first run: served alone")


def mixed_batch(folder: Path) -> str | None:
    return QUANTIZED_ALONE


TECHNIQUE = Technique(
    name="qlora",
    config_class=QloraSettings,
    prepare=prepare,
    save=lora.save,
    disabled_view=peft_disabled_view,
    result_dir_name="adapter",
    default_learning_rate=2e-4,
    summary="LoRA on a 4-bit (nf4/fp4) or 8-bit base via bitsandbytes (least memory; merges into a dequantized base)",
    base_load=base_load,
    param_groups=lora.loraplus_param_groups,
    merge=merge,
    variant_names={"qlora4": {"bits": 4}, "qlora8": {"bits": 8}, "qlora_4bit": {"bits": 4}, "qlora_8bit": {"bits": 8},
                   "qdora": {"use_dora": True}},
    variant_label=lambda settings: ", ".join(filter(None, [f"{settings.bits}-bit", lora.variant_label(settings)])),
    adapter_types=("LORA",),  # PEFT's peft_type; a bare LORA folder opens as technique 'lora' (registered first)
    mixed_batch=mixed_batch,
    refuses={"fsdp": "bitsandbytes keeps the 4/8-bit base in its own packed parameter type, which FSDP2 cannot split "
                     "into shards; use training.distributed: ddp"},
)
