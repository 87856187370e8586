"""The memory plan: a run's peak memory, term by term, from the model's meta-device skeleton and the data's
lengths, without reading a weight.

    peak (CPU RSS)   = runtime + max(load, static + loss, static + backward, static + optimizer step)
    load             = checkpoint file (its pages, memory-mapped while read) + the weights it loads into
    static           = weights + optimizer state + checkpoint kept mapped (quantized loads) + master-cast leftovers
    loss             = activations + the loss's tensors + autocast copies           (the top of backward)
                       (+ gradients with grad_accum > 1: a later micro-batch's forward holds the earlier ones')
    backward         = gradients + activations + the loss's tensors in the heap + autocast copies   (its end)
    optimizer step   = gradients + AdamW's temporaries (two of the largest trainable tensor: one tensor at a time)
    generation       = autocast copies + the rollout            (an online objective's sampling, before its loss)

Memory freed during backward stays in the process's heap (glibc keeps its arenas), so the end of backward still
holds the activations beside every gradient; chunks of 32 MiB or more (glibc's mmap threshold) go back to the
system when freed, so the loss's large (N, V) tensors count only at the top of backward. Under the heap policy
(``heap_mmap_threshold``: checkpointed runs and quantized loads on a CPU) the threshold is 1 MiB: the chunks of
1 MiB or more that backward frees, activations included, go back, and the end of backward holds only the rest.

- weights: every parameter after the technique is applied, in the dtype it trains in (trainable ones in float32:
  master weights; PEFT's k-bit preparation upcasts the non-quantized ones to float32), 4-bit blocks as half a byte
  per weight plus their absmax scales;
- activations: what autograd saves for backward, counted by running the skeleton's forward on meta tensors of the
  planned (micro-batch, length) under ``torch.autograd.graph.saved_tensors_hooks`` (prompt tuning's virtual
  tokens included); with checkpointing, each layer's input plus one layer's saves (recomputed in backward);
- the loss's tensors: the objective declares them from the head's (N, V) output (``Objective.loss_memory``): by
  default the output, its float32 copy, cross-entropy's log-softmax and the two (N, V) float32 gradients of
  backward; SFT's chunked loss holds a few (256, V) chunks instead;
- autocast copies: under bfloat16/float16 autocast, the half-precision copy of every trainable weight that feeds
  a matmul (cached by autocast, saved for backward);
- master-cast leftovers: the loaded half-precision trainable weights, freed when they become float32, kept by the
  heap (chunks under glibc's 32 MiB mmap threshold);
- checkpoint kept mapped: a quantized load keeps the frozen weights it did not convert as views of the
  memory-mapped checkpoint, so the whole file stays resident (measured on SmolLM2: RssFile +400 MiB);
- rollout (online objectives): one decoder layer's activations (a bound on the prefill's, which has no gradients),
  and the larger of the sampling (the KV cache at the full rollout shape, counted by a meta forward with
  ``use_cache=True``, and one decoding step's (rows, V) logits and sampling tensors) and the scoring passes the
  objective declares (``Objective.rollout_memory``);
- runtime: the resident memory of a process that imported the training stack (measured once, see ``runtime``).
On CUDA the runtime term is the CUDA context.
"""

from __future__ import annotations

import math
import os
import platform
import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tunelab.models import DYNAMIC_MMAP_THRESHOLD_MAX, attends_per_packed_example, output_cache
from tunelab.objectives.base import HeadOutput

# A 4-bit weight: two per byte, one absmax per block of 64 (bitsandbytes' blocksize for 4-bit).
QUANT_BLOCK = 64
NESTED_BLOCK = 256  # double quantization quantizes the absmax scales to 8 bits in blocks of 256 (one fp32 each)


@dataclass
class Shape:
    """The largest micro-batch a run trains on: records x the rows each becomes (``Objective.batch_rows``: a
    preference pair is two) x tokens, and the share of tokens that carry a label."""

    micro_batch_size: int  # records
    length: int  # the longest row, which every row of the micro-batch is padded to
    supervised_share: float = 1.0
    rows_per_record: int = 1
    head_size: int | None = None  # a score head's outputs from the data (a classifier's classes); None: the objective's
    padded: bool = False  # rows of different lengths padded to the longest: attention gets a (B, 1, T, T) mask
    packed: bool = False  # packed rows (a CPU attends per example without a mask; other devices get the packed mask)

    @property
    def rows(self) -> int:
        return self.micro_batch_size * self.rows_per_record

    @property
    def supervised(self) -> int:
        return max(1, math.ceil(self.rows * self.length * self.supervised_share))


@dataclass
class MemoryPlan:
    device: str
    peak_bytes: int
    components: dict[str, int]
    phase: str  # which phase peaks: "load", "loss", "backward", "optimizer step" or "generation"
    shape: Shape
    dtype: str
    notes: list[str] = field(default_factory=list)
    trainable_parameters: int = 0
    total_parameters: int = 0
    heap_mmap_threshold: int | None = None  # the heap policy's fixed mmap threshold, None: glibc's dynamic one
    # each phase's terms (the runtime term not included; a negative one is memory that phase returned to the system):
    # the peak is the runtime term plus the largest phase's sum, and the plan shows which terms make it
    phase_terms: dict[str, dict[str, int]] = field(default_factory=dict)
    context_length: int | None = None  # the model's context (its config's max_position_embeddings), None: unsaid
    # the positions the technique adds before every row (prompt learning's virtual tokens): a row of max_length
    # tokens takes max_length plus these of the context
    virtual_tokens: int = 0

    @property
    def phases(self) -> dict[str, int]:
        """Each phase's bytes, the runtime term not included."""
        return phase_sums(self.phase_terms)

    def as_dict(self) -> dict[str, Any]:
        return {"peak_bytes": self.peak_bytes, "peak_phase": self.phase, "device": self.device, "dtype": self.dtype,
                "heap_mmap_threshold": self.heap_mmap_threshold, "phases": self.phases, "phase_terms": self.phase_terms,
                "context_length": self.context_length, "virtual_tokens": self.virtual_tokens,
                "micro_batch_size": self.shape.micro_batch_size, "rows": self.shape.rows, "length": self.shape.length,
                "supervised_tokens": self.shape.supervised, "trainable_parameters": self.trainable_parameters,
                "total_parameters": self.total_parameters, "components": self.components, "notes": self.notes}


def phase_sums(phase_terms: Mapping[str, Mapping[str, int]]) -> dict[str, int]:
    """Each phase's bytes: the sum of its terms."""
    return {name: sum(terms.values()) for name, terms in phase_terms.items()}


def is_quantized_4bit(param: nn.Parameter) -> bool:
    return type(param).__name__ == "Params4bit"  # bitsandbytes' class; not imported: it is an optional dependency


def quantized_bytes(numel: int, double_quant: bool) -> int:
    """Bytes of a 4-bit weight with its absmax scales (fp32 each, or 8-bit plus one fp32 per 256 with double quant)."""
    blocks = math.ceil(numel / QUANT_BLOCK)
    scales = blocks + 4 * math.ceil(blocks / NESTED_BLOCK) if double_quant else 4 * blocks
    return math.ceil(numel / 2) + scales


def parameter_bytes(model: nn.Module, double_quant: bool) -> tuple[int, int, int, int]:
    """(weights, trainable weights in float32, trainable and total parameter counts) of a prepared skeleton. Trainable
    parameters count as float32: they are kept so (master weights) whatever dtype the base loads in."""
    weights = trainable_bytes = trainable = total = 0
    for param in unique_parameters(model):
        total += param.numel()
        if is_quantized_4bit(param):
            weights += quantized_bytes(param.numel(), double_quant)
        elif param.requires_grad:
            weights += 4 * param.numel()
            trainable_bytes += 4 * param.numel()
            trainable += param.numel()
        else:
            weights += param.numel() * param.element_size()
    return weights, trainable_bytes, trainable, total


def loaded_bytes(model: nn.Module, double_quant: bool) -> int:
    """Bytes of a skeleton's weights as ``from_pretrained`` materialises them (before a technique or the float32
    master weights): 4-bit blocks with their scales, everything else in the dtype it loads in."""
    return sum(quantized_bytes(p.numel(), double_quant) if is_quantized_4bit(p) else p.numel() * p.element_size()
               for p in unique_parameters(model))


def mapped_views_bytes(model: nn.Module, checkpoint_dtype: torch.dtype) -> int:
    """Frozen, non-quantized weights in the checkpoint's own dtype: after a quantized load they are views of the
    memory-mapped checkpoint file, resident as its pages (counted in ``checkpoint_mapped``), not copies."""
    return sum(p.numel() * p.element_size() for p in unique_parameters(model)
               if not is_quantized_4bit(p) and not p.requires_grad and p.dtype == checkpoint_dtype)


# glibc serves a chunk this large or larger with its own mmap and returns it to the system when freed (its
# dynamic mmap threshold stops growing here on 64-bit); smaller freed chunks stay in the heap.
MMAP_THRESHOLD_MAX = DYNAMIC_MMAP_THRESHOLD_MAX
# The heap policy (docs/choosing.md): on a CPU, a run that chose memory over speed (activation checkpointing) or
# loads a quantized base trains with glibc's mmap threshold fixed here, so that freed transients go back to the
# system instead of staying in the heap as holes (the price: the kernel maps and zeroes them again).
FIXED_MMAP_THRESHOLD = 2**20


def heap_mmap_threshold(device_type: str, checkpointing: bool, quantized: bool,
                        requested: bool | None = None) -> int | None:
    """The fixed mmap threshold a run trains under (the heap policy), None where glibc's dynamic one stays.
    ``requested`` is the config's ``training.return_freed_memory``: None lets checkpointing or a quantized load
    decide."""
    wanted = (checkpointing or quantized) if requested is None else requested
    return FIXED_MMAP_THRESHOLD if device_type == "cpu" and wanted else None


# glibc's memalign was changed in 2.38 (it looks for aligned free chunks) and for 2.39 (it merges the remainders it
# cuts off, glibc bug 30723): the releases before this one are named (measured here on 2.36 only)
MEMALIGN_MERGES_FROM = (2, 39)
TCACHE_COUNT = "glibc.malloc.tcache_count"  # a GLIBC_TUNABLES name, read by glibc at process start only
NO_TCACHE = f"{TCACHE_COUNT}=0"  # a GLIBC_TUNABLES entry: the per-thread cache off
# Set (to the reason) in the environment of a process `tunelab train` restarted with NO_TCACHE: the run records
# that tunelab set it, and a restarted process never restarts again.
RESTARTED_WITHOUT_TCACHE = "TUNELAB_RESTARTED_WITHOUT_TCACHE"


# oneDNN, which runs torch's bfloat16 matmuls on a CPU, keeps each primitive it creates (one per new shape) in a
# cache of 1024 by default. An online objective's micro-batches change length each time, so that cache and the heap
# under it grow step after step past the plan (the GRPO example: planned/VmHWM 0.935-0.942); bounded at 32
# primitives, 0.969-1.006 (docs/choosing.md, the heap policy). oneDNN reads the variable once, when it creates its
# first primitive: `tunelab train` sets it when it starts (training.restart), before any bfloat16 matmul.
ONEDNN_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")  # oneDNN's, older
BOUNDED_ONEDNN_CACHE = 32
# Set (to the reason) beside the capacity by `tunelab train`: the run records that tunelab bounded the cache.
BOUNDED_ONEDNN_CACHE_BY = "TUNELAB_BOUNDED_ONEDNN_CACHE"


def onednn_cache_capacity(environ: Mapping[str, str] | None = None) -> int | None:
    """The oneDNN primitive cache's capacity this environment sets (the newer variable wins), None where it sets
    none (oneDNN's default, 1024)."""
    environ = os.environ if environ is None else environ
    for name in ONEDNN_CACHE_VARIABLES:
        if environ.get(name, "").strip().isdigit():
            return int(environ[name])
    return None


def aligned_blocks_kept(libc: tuple[str, str] | None = None, tunables: str | None = None) -> str | None:
    """The C library, when it keeps freed aligned blocks out of reach (else None). torch allocates every CPU tensor
    with posix_memalign(64, n); glibc before 2.39 cuts the aligned block out of a larger chunk and puts the
    remainders in its per-thread cache, where the heap cannot merge them back, so a freed block cannot serve the
    next identical request and the heap grows (docs/choosing.md, known gaps: measured with quantized bases). The
    cache off (``GLIBC_TUNABLES=glibc.malloc.tcache_count=0``) avoids it. ``libc``, ``tunables``: this process's."""
    name, version = libc if libc is not None else platform.libc_ver()
    tunables = os.environ.get("GLIBC_TUNABLES", "") if tunables is None else tunables
    try:
        release = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return None
    if name != "glibc" or len(release) < 2 or release >= MEMALIGN_MERGES_FROM or NO_TCACHE in tunables.split(":"):
        return None
    return f"glibc {version}"


def tunables_without_tcache(libc: tuple[str, str] | None = None, tunables: str | None = None) -> str | None:
    """The GLIBC_TUNABLES a process must start with for its per-thread cache to be off: the given ones (this
    process's by default) plus ``NO_TCACHE``. None where nothing is to be set: the C library does not keep aligned
    blocks (``aligned_blocks_kept``), or the user's tunables already set the cache's count (theirs stands)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "") if tunables is None else tunables
    entries = [entry for entry in tunables.split(":") if entry]
    if aligned_blocks_kept(libc, tunables) is None or any(e.startswith(f"{TCACHE_COUNT}=") for e in entries):
        return None
    return ":".join([*entries, NO_TCACHE])


def master_cast_leftover_bytes(model: nn.Module, load_dtype: torch.dtype, threshold: int = MMAP_THRESHOLD_MAX) -> int:
    """The loaded half-precision copies of the trainable weights, freed when they become float32 master weights:
    the heap keeps the chunks below glibc's mmap threshold (the larger ones go back to the system)."""
    if load_dtype == torch.float32:
        return 0
    size = torch.empty((), dtype=load_dtype).element_size()
    return sum(size * p.numel() for p in unique_parameters(model)
               if p.requires_grad and size * p.numel() < threshold)


def autocast_copy_bytes(model: nn.Module, half_bytes: int = 2) -> int:
    """Half-precision copies autocast makes of the trainable float32 weights that feed a matmul (every linear, and
    the output head): autocast caches them for the forward and autograd saves them for backward, so all are alive
    at the start of backward. Parameters without a matmul (norms, biases, embeddings not tied to the head) are not
    cast."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    cast: dict[int, int] = {}
    for module in model.modules():
        weight = module._parameters.get("weight")
        if weight is not None and weight.requires_grad and (isinstance(module, nn.Linear) or module is head):
            cast[id(weight)] = weight.numel()
    return half_bytes * sum(cast.values())


def unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters and buffers once each (tied weights, e.g. embeddings shared with the head, count once)."""
    seen: dict[int, nn.Parameter] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        seen.setdefault(id(tensor), tensor)
    return list(seen.values())


@dataclass
class Saved:
    """What autograd saved for backward during a meta forward, in bytes, by where it was saved, and the head's
    output (what the objective's loss reads: its memory is the objective's declaration, ``loss_memory``)."""

    layers: list[int]  # per decoder layer
    layer_inputs: list[int]  # the hidden states entering each layer (what checkpointing keeps)
    outside: int  # embeddings, final norm, the head's input
    head: HeadOutput
    chunks: list[tuple[int, int]] = field(default_factory=list)  # every saved storage: (bytes, layer index or -1)
    transients: list[int] = field(default_factory=list)  # the bytes of every tensor the forward made and freed


# The share of the forward's freed tensors that glibc's heap still holds as free chunks when backward starts, under
# its dynamic mmap threshold. Each layer's forward frees tensors (a linear's output once an adapter's is added to it,
# an activation's input, the casts) between the tensors autograd keeps, and the next allocations are of other sizes
# or come before the frees, so the heap grows past what is alive; RSS counts those free chunks. First measured on
# SmolLM2 at 256 tokens (measured peak less the plan without them, over this probe's freed bytes: LoRA 0.15-0.17,
# prompt tuning 0.22) with glibc's per-thread cache on and a fresh (C, V) loss chunk each time. Fitted again on the
# 90-cell grid once every CPU run trained with the cache off (9920438) and the loss reused its chunk (8b7a6e8): the
# cells' implied shares were 0.06-0.11 for LoRA and 0.10-0.16 for the adapter and prompt tuning at 1024 tokens;
# 0.15 keeps every grid cell at or above 0.95 of its measured peak (max error 12.1%), the solver's decidable pairs
# at 20 of 22, and the shipped whole runs at 0.98 (0.13 fitted the grid and the solver better, 9.5% and 21 of 22,
# but left the quickstart's 40 steps at 0.96; docs/choosing.md). Under the fixed 1 MiB threshold of the heap policy
# the runs left 0.01 (QLoRA) and planned within 1.6% without the term, so it counts only under the dynamic threshold.
HEAP_HOLES_SHARE = 0.15


def heap_holes_bytes(saved: Saved, fixed_threshold: int | None) -> int:
    """The forward's freed memory that the process's heap still holds when backward starts: ``HEAP_HOLES_SHARE`` of
    the freed tensors under glibc's dynamic mmap threshold (larger ones are their own mappings, returned when
    freed), none under a fixed one (``heap_mmap_threshold``)."""
    if fixed_threshold is not None:
        return 0
    return int(HEAP_HOLES_SHARE * sum(size for size in saved.transients if size < MMAP_THRESHOLD_MAX))


def gradients_not_reused_bytes(model: nn.Module, saved: Saved, fixed_threshold: int | None) -> int:
    """The float32 gradients freed before each forward (``zero_grad(set_to_none=True)``) in chunks smaller than the
    largest tensor autograd saves (both under glibc's dynamic mmap threshold): from the second step on the heap holds
    them free while the forward's larger activations take new memory; backward's new gradients, of the same sizes,
    reuse them. Measured: SmolLM2 full fine-tuning 2 x 1024 tokens (activations of 6 MiB, its layers' gradients
    0.4-3.4 MiB) peaked 5180 MiB at the second step's loss against 4781 planned without this term (4990 with it).
    None under a fixed threshold (the heap policy)."""
    if fixed_threshold is not None:
        return 0
    largest = max((size for size, _ in saved.chunks if size < MMAP_THRESHOLD_MAX), default=0)
    sizes = [4 * p.numel() for p in unique_parameters(model) if p.requires_grad]
    return sum(size for size in sizes if size < largest)


class _Allocations(TorchDispatchMode):
    """Every tensor an operation makes on the meta device (an output that aliases none of its inputs), its bytes and a
    weak reference to its storage: those dead when the forward ends were freed during it."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[tuple[int, Any]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        specs = returns if len(returns) == len(outputs) else returns[:1] * len(outputs)  # a Tensor[] return
        for spec, tensor in zip(specs, outputs):
            if isinstance(tensor, torch.Tensor) and tensor.is_meta and spec.alias_info is None:
                self.made.append((tensor.numel() * tensor.element_size(), weakref.ref(tensor.untyped_storage())))
        return out

    def freed(self) -> list[int]:
        """The bytes of each tensor made whose storage is gone (call it while the forward's output, and with it what
        autograd saved, is alive)."""
        return [size for size, ref in self.made if ref() is None]


def loss_bytes(tensors: tuple[int, ...], threshold: int = MMAP_THRESHOLD_MAX) -> tuple[int, int]:
    """(all of them, the part in chunks glibc maps on their own and returns to the system once freed) of the
    tensors a loss holds at once: the large ones are alive only around the loss, the others stay in the heap."""
    return sum(tensors), sum(size for size in tensors if size >= threshold)


@contextmanager
def _four_bit_as_plain(model: nn.Module) -> Iterator[None]:
    """bitsandbytes' 4-bit matmul has no meta kernel; stand in for it with a linear on a frozen weight, which saves
    what its autograd function saves (only the quantized weight, a parameter)."""
    with ExitStack() as stack:
        for module in model.modules():
            # the layer's own parameter only: PEFT's LoRA wrapper answers ``.weight`` with its base layer's, and
            # replacing the wrapper's forward would drop the adapters from the probe (no activations at all)
            weight = module._parameters.get("weight")
            if weight is not None and is_quantized_4bit(weight):
                def forward(x: torch.Tensor, module: nn.Module = module) -> torch.Tensor:
                    return nn.functional.linear(x, module.weight.detach().to(x.dtype), module.bias)
                module.forward = forward
                stack.callback(module.__dict__.pop, "forward")
        yield


@contextmanager
def _no_packed_sequence_search() -> Iterator[None]:
    """transformers looks for packed sequences in the position ids with a data-dependent test (``.all()``), which
    meta tensors cannot answer; a packed row's activations have the same size as one sequence's, so answer "none"."""
    from unittest import mock

    from transformers import masking_utils  # why: only the probe needs it

    with mock.patch.object(masking_utils, "find_packed_sequence_indices", lambda position_ids: None):
        yield


def _sdpa_as_kernels_save(device_type: str, masked: bool = False) -> Any:
    """``torch.nn.functional.scaled_dot_product_attention`` for the probe: on meta tensors torch takes its math path,
    which saves the (B, H, T, T) float32 attention weights and float32 copies of the query, key and value, while on
    a device the fused kernels run and save the query, key, value, output and a float32 logsumexp (B, H, T): linear
    in T where the math path is quadratic (SmolLM2 LoRA at 2048 tokens: 7090 MiB planned with the math path's saves,
    3350 measured). So the probe calls the kernel a ``device_type`` run picks, on meta tensors (each has a meta
    implementation), and autograd saves what that kernel's backward keeps: a CPU's flash kernel (it takes fewer
    key/value heads than query heads: transformers asks for that without a mask, the probe's case), CUDA's flash
    kernel without a mask and its memory-efficient one with a mask (both take as many key/value heads as query
    heads: SDPA repeats them first). ``masked``: the run's attention gets a mask (padded rows), which SDPA converts to
    the query's dtype at each call and the kernel saves: a (B, 1, T, T) tensor a layer; the probe's forward has none
    (its rows are all real tokens), so it makes one of that shape."""
    math_path = torch.nn.functional.scaled_dot_product_attention

    def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
             dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
             enable_gqa: bool = False) -> torch.Tensor:
        if not query.is_meta or dropout_p:  # attention dropout: the math path on a CPU too
            return math_path(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                             scale=scale, enable_gqa=enable_gqa)
        if attn_mask is None and masked:  # the padded rows' mask (B, 1, T, T), causal within it
            attn_mask, is_causal = torch.zeros(query.shape[0], 1, query.shape[-2], key.shape[-2], dtype=torch.bool,
                                               device=query.device), False
        if attn_mask is not None and attn_mask.dtype == torch.bool:  # SDPA makes an additive mask of each call's
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
        if device_type == "cpu":
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, 0.0, is_causal, attn_mask=attn_mask, scale=scale)[0]
        if key.shape[-3] != query.shape[-3]:  # (B, K, T, D) -> (B, H, T, D)
            key, value = (x.repeat_interleave(query.shape[-3] // x.shape[-3], dim=-3) for x in (key, value))
        if attn_mask is None:
            return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, is_causal,
                                                                      scale=scale)[0]
        bias = attn_mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, bias, True, 0.0, is_causal,
                                                                      scale=scale)[0]

    return sdpa


@contextmanager
def _attention_as_on(device_type: str, masked: bool = False) -> Iterator[None]:
    """While the probe runs, SDPA saves what it saves on ``device_type`` (``_sdpa_as_kernels_save``)."""
    from unittest import mock

    sdpa = _sdpa_as_kernels_save(device_type, masked)
    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", sdpa):
        yield


def _dropout_as_kernels_save(device_type: str) -> Any:
    """``torch.nn.functional.dropout`` for the probe. On a CPU (and on meta tensors) torch multiplies x by a noise
    tensor of x's dtype and saves that, which is what a CPU run of ``nn.Dropout`` keeps (its adapters' dropout is
    tunelab's own, swapped in by the planner). On other devices torch runs its fused kernel, ``native_dropout``, whose
    backward keeps a one-byte bool mask: 2 (bfloat16) or 4 (float32) bytes an element less. So off the CPU the probe
    calls that kernel, on meta tensors (it has a meta implementation), where torch's choice would (training,
    0 < p < 1, not in place)."""
    plain = torch.nn.functional.dropout

    def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
        if device_type == "cpu" or not input.is_meta or inplace or not training or not 0.0 < p < 1.0 \
                or input.numel() == 0:
            return plain(input, p, training, inplace)
        return torch.native_dropout(input, p, training)[0]

    return dropout


@contextmanager
def _dropout_as_on(device_type: str) -> Iterator[None]:
    """While the probe runs, dropout saves what it saves on ``device_type`` (``_dropout_as_kernels_save``)."""
    from unittest import mock

    with mock.patch.object(torch.nn.functional, "dropout", _dropout_as_kernels_save(device_type)):
        yield


def saved_for_backward(model: nn.Module, shape: Shape, layers: list[nn.Module], device_type: str = "cpu") -> Saved:
    """Run ``model``'s forward on meta tensors, the head on the supervised rows only, and count what autograd saves
    (see module doc), attention as its kernels on ``device_type`` save it."""
    parameters = {p.untyped_storage()._cdata for p in unique_parameters(model)}
    saved: dict[int, tuple[int, int]] = {}  # storage -> (bytes, where: layer index or -1)
    where = [-1]
    inputs: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in parameters and storage._cdata not in saved:
            saved[storage._cdata] = (tensor.numel() * tensor.element_size() if tensor.is_meta else storage.nbytes(),
                                     where[0])
        return tensor

    def enter(index: int):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            where[0] = index
            hidden = args[0] if args else kwargs.get("hidden_states")
            inputs.append(hidden.numel() * hidden.element_size())
        return hook

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        where[0] = -1

    head = model.get_output_embeddings()

    def supervised_only(module: nn.Module, args: tuple) -> tuple:  # as the SFT objective's logits_only_where
        hidden = args[0]  # (B, T', H)
        return (hidden.reshape(-1, hidden.shape[-1])[: shape.supervised],) + tuple(args[1:])  # (N, H)

    handles = [layer.register_forward_pre_hook(enter(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(leave) for layer in layers]
    if head is not None:  # a score head (classification, reward) has no LM head: its (B, labels) output is small
        handles.append(head.register_forward_pre_hook(supervised_only))
    ids = torch.zeros(shape.rows, shape.length, dtype=torch.long, device="meta")
    allocations = _Allocations()
    # a CPU attends packed rows per example without a mask (training/attention.py), unless switched off; other
    # devices get the packing's mask
    masked = shape.padded or (shape.packed and not attends_per_packed_example(device_type))
    try:
        with _four_bit_as_plain(model), _no_packed_sequence_search(), _attention_as_on(device_type, masked), \
                _dropout_as_on(device_type), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), allocations:
            output = model(input_ids=ids, use_cache=False).logits  # (N, V)
    finally:
        for handle in handles:
            handle.remove()
    freed = allocations.freed()  # while ``output`` keeps what autograd saved alive
    per_layer = [0] * len(layers)
    outside = 0
    for storage, (size, index) in saved.items():
        if index >= 0:
            per_layer[index] += size
        else:
            outside += size
    weight = getattr(head, "weight", None)
    described = HeadOutput(rows=output.shape[0], columns=output.shape[-1], element_bytes=output.element_size(),
                           hidden=weight.shape[-1] if weight is not None else 0,
                           trainable=bool(weight is not None and weight.requires_grad), plain=type(head) is nn.Linear)
    return Saved(per_layer, inputs[: len(layers)], outside, described, chunks=list(saved.values()), transients=freed)


def rollout_cache_bytes(model: nn.Module, shape: Shape) -> int:
    """Bytes of the KV cache an online objective's rollout ends with: every row of the micro-batch (its completions)
    at the full rollout length (prompt plus max_completion_length), (rows, layers, 2, heads_kv, T, d) in the dtype
    the layers compute in. Counted as the model makes it: a meta forward with ``use_cache=True`` at that shape, its
    cache's tensors summed (no architecture's layout is assumed)."""
    ids = torch.zeros(shape.rows, shape.length, dtype=torch.long, device="meta")
    with torch.no_grad(), _four_bit_as_plain(model), _no_packed_sequence_search():
        output = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = output_cache(output)
    layers = getattr(cache, "layers", None)
    if layers is None:  # a legacy cache: a (key, value) tuple per layer
        return sum(t.numel() * t.element_size() for pair in cache for t in pair)
    return sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values) if t is not None)


# transformers' sampling of one token, from the head's (rows, V) output: its float32 copy, the temperature's quotient,
# softmax's probabilities, and torch's multinomial on a CPU (an exponential draw of the same shape, the quotient it
# takes the argmax of): float32 (rows, V) tensors alive at once, beside the head's output
SAMPLING_FLOAT32_COPIES = 5


def sampling_bytes(head: HeadOutput, rows: int) -> int:
    """Bytes of one decoding step's logits and the sampling's (rows, V) tensors (``SAMPLING_FLOAT32_COPIES``)."""
    return rows * head.columns * (head.element_bytes + 4 * SAMPLING_FLOAT32_COPIES)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks that activation checkpointing wraps (transformers' GradientCheckpointingLayer)."""
    from transformers.modeling_layers import GradientCheckpointingLayer  # why: transformers' own marker class

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def activation_bytes(saved: Saved, checkpointing: bool) -> int:
    """Saved activations at the start of backward; with checkpointing, each layer keeps only its input and the
    layer being recomputed holds its own saves again."""
    if not checkpointing or not saved.layers:
        return sum(saved.layers) + saved.outside
    return sum(saved.layer_inputs) + max(saved.layers) + saved.outside


def activations_returned_bytes(saved: Saved, checkpointing: bool, threshold: int) -> int:
    """The activations that are back with the system at the end of backward: chunks of ``threshold`` bytes or
    more that backward has freed (glibc maps them on their own). The first decoder layer's saves are alive until
    its own backward, the last; every other layer's, and those outside the layers (the final norm's, the head's
    input), are freed by then. With checkpointing a layer's saves are its recomputation's: only its input was
    kept, and the recomputed layer is counted at its largest (``activation_bytes``), so only inputs return."""
    if checkpointing and saved.layers:
        freed = saved.layer_inputs[1:] + [size for size, where in saved.chunks if where == -1]
    else:
        freed = [size for size, where in saved.chunks if where != 0]
    return sum(size for size in freed if size >= threshold)
