"""Prefix tuning: learn key/value vectors prepended at every attention layer (Li & Liang 2021, "Prefix-Tuning:
Optimizing Continuous Prompts for Generation", https://arxiv.org/abs/2101.00190).

At layer l, attention reads learned prefixes P_K^l, P_V^l (n, d_kv) before the sequence's keys and values:
    head = softmax(q [P_K^l; K]^T / sqrt(d)) [P_V^l; V]
Trainable parameters: n * layers * 2 * d_kv (or, with prefix_projection, an MLP that produces them, which trains
more stably; only the prefixes are needed at inference). Nothing is merged; examples are not packed.

Initialisation. PEFT draws the prefixes from N(0, 1), far from any key or value the model computes: on SmolLM2 the
untrained prefix raised the held-out loss of pydoc answers from 3.99 to 11.08, and an online objective's first
rollouts came from that broken model (ROUGE-L 0.02). The paper initialises the prefixes with the activations of real
words; ``init: text`` (the default) sets them to the base model's keys and values of ``init_text``, so the untrained
prefix is that text's cache: the model reads the prefix as if the text came before the input (3.69 on the same
answers). ``init: zero`` is PEFT's zero initialisation (5.93: the zero keys still take attention weight).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from tunelab.errors import TechniqueError
from tunelab.models import output_cache
from tunelab.techniques.base import RunContext, Technique, peft_disabled_view, peft_task_type, save_peft_adapter
from tunelab.techniques.lora import wrap
from tunelab.techniques.prompt_learning import REFUSES, VirtualTokens, model_path

log = logging.getLogger(__name__)

# init: text without init_text: a neutral instruction, so the untrained prefix reads as a plain preamble
DEFAULT_INIT_TEXT = "Answer the question that follows clearly and accurately."


class PrefixTuningSettings(VirtualTokens):
    name: Literal["prefix_tuning"] = Field("prefix_tuning", description="Learned key/value prefixes at every layer (PEFT prefix tuning).")
    prefix_projection: bool = Field(False, description="Produce the prefixes with a two-layer MLP (reparameterisation).")
    projection_hidden_size: int = Field(512, gt=0, description="Hidden size of that MLP (prefix_projection only).")
    init: Literal["text", "zero", "random"] = Field(
        "text", description="Start the prefixes as the base model's keys and values of `init_text` (the paper's "
        "real-word initialisation), at zero, or random (PEFT's N(0, 1)); with prefix_projection: random unless set.")
    init_text: str | None = Field(
        None, description="With init: text, the text whose keys and values start the prefixes (repeated or cut to "
        f"num_virtual_tokens); default {DEFAULT_INIT_TEXT!r}.")

    @model_validator(mode="after")
    def _init_fits_the_prefix(self) -> "PrefixTuningSettings":
        if self.prefix_projection and "init" not in self.model_fields_set:
            self.init = "random"  # the MLP produces the prefixes: there is no prefix to set to a text's cache
        if self.prefix_projection and self.init == "text":
            raise ValueError("init: text sets the prefixes themselves, which prefix_projection produces with an "
                             "MLP; use init: zero or random with it")
        if self.init != "text" and self.init_text is not None:
            raise ValueError("init_text is only read with init: text")
        if self.init_text is not None and not self.init_text.strip():
            raise ValueError("init_text is empty; give the text whose keys and values start the prefixes")
        return self


def prepare(model: nn.Module, settings: PrefixTuningSettings, context: RunContext | None = None) -> nn.Module:
    from peft import PrefixTuningConfig

    weightless = any(p.is_meta for p in model.parameters())  # a skeleton (the plan, the fit check): nothing to run
    cache = text_cache(model, settings) if settings.init == "text" and not weightless else None
    config = PrefixTuningConfig(num_virtual_tokens=settings.num_virtual_tokens, prefix_projection=settings.prefix_projection,
                                encoder_hidden_size=settings.projection_hidden_size, task_type=peft_task_type(context),
                                init_weights="zero" if settings.init == "zero" else None)
    wrapped = wrap(model, config)
    if cache is not None:
        set_prefix(wrapped, cache)
    return wrapped


def text_cache(model: nn.Module, settings: PrefixTuningSettings) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The base model's (keys, values) per layer, each (kv_heads, n, head_dim), of ``init_text`` tokenized with the
    model's tokenizer and repeated or cut to num_virtual_tokens (n) tokens."""
    from transformers import AutoTokenizer  # why: only text initialisation tokenizes

    text = settings.init_text or DEFAULT_INIT_TEXT
    ids = AutoTokenizer.from_pretrained(model_path(model))(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise TechniqueError(f"prefix_tuning: init_text {text!r} has no tokens; give a text, or use init: zero")
    n = settings.num_virtual_tokens
    ids = (ids * (n // len(ids) + 1))[:n]
    log.info("prefix_tuning: the prefixes start as the base model's keys and values of %r (%d tokens)", text, n)
    device = next(model.parameters()).device
    training = model.training
    model.eval()  # the text's cache as inference computes it: no dropout, and no draw from the run's generator
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids], device=device), use_cache=True)
    finally:
        model.train(training)
    cache = output_cache(out)
    return [(layer.keys[0], layer.values[0]) for layer in cache.layers]  # (kv_heads, n, head_dim) each


def set_prefix(model: nn.Module, cache: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write ``cache`` into PEFT's prefix embedding, (n, layers * 2 * kv_heads * head_dim), in the layout PEFT reads
    it back with (``get_prompt``: viewed (n, layers * 2, heads, head_dim), keys of layer l at 2l, values at 2l + 1)."""
    weight = model.prompt_encoder[model.active_adapter].embedding.weight  # (n, layers * 2 * kv_heads * head_dim)
    heads, n, dim = cache[0][0].shape
    if weight.shape != (n, len(cache) * 2 * heads * dim):
        raise TechniqueError(f"prefix_tuning: the prefix embedding is {tuple(weight.shape)}, the text's cache "
                             f"{len(cache)} layers of ({heads}, {n}, {dim}); use init: zero or random for this model")
    with torch.no_grad():
        view = weight.view(n, len(cache) * 2, heads, dim)
        for layer, (keys, values) in enumerate(cache):
            view[:, 2 * layer] = keys.transpose(0, 1)  # (n, heads, head_dim)
            view[:, 2 * layer + 1] = values.transpose(0, 1)


@contextmanager
def prefix_in_generate_cache(model: nn.Module) -> Iterator[None]:
    """``generate`` with the learned prefix in the cache it decodes with, as the forward has it.

    PEFT's ``prepare_inputs_for_generation`` hands the prefix over as ``past_key_values``: per layer (B, heads, n,
    head_dim), with the attention mask widened by n columns and the position ids moved by n. transformers 5
    carries its own ``cache`` from step to step, and the model's forward, given both, ignores the deprecated
    ``past_key_values``: the tokens attended without the prefix (the base's output). PEFT also never sees that
    cache (it looks for ``past_key_values``), so it builds the prefix again at every step. Here the prefix is
    written into generate's own (still empty) cache at the prefill, before the prompt's keys and values, and
    dropped at the later steps, whose cache already starts with it; PEFT's wider mask (B, n + W) and positions
    (n + each row's token index, from generate's mask) then match that cache, as in the forward, which puts the
    prefix in an empty cache and the tokens at positions n, n + 1, ..."""
    own = vars(model).get("prepare_inputs_for_generation")  # an instance attribute (disable_adapter sets one)
    prepare = model.prepare_inputs_for_generation

    def with_prefix(*args: Any, **kwargs: Any) -> dict[str, Any]:
        inputs = prepare(*args, **kwargs)
        prefix = inputs.pop("past_key_values", None)  # a DynamicCache of n tokens per layer, or None (disabled)
        cache = inputs.get("cache")
        if prefix is None:
            return inputs
        if cache is None or not inputs.get("use_cache", True):
            # generate without a cache feeds the whole sequence at every step: it reads this step's prefix alone
            # (the cache a forward returns is carried to the next step even then, so it is replaced, not kept)
            inputs["cache"] = prefix
        elif not cache.get_seq_length():  # the prefill: (B, heads, 0, head_dim) -> (B, heads, n, head_dim)
            for index, layer in enumerate(prefix.layers):
                cache.update(layer.keys, layer.values, index)
        return inputs

    model.prepare_inputs_for_generation = with_prefix
    try:
        yield
    finally:
        if own is None:
            del model.prepare_inputs_for_generation
        else:
            model.prepare_inputs_for_generation = own


TECHNIQUE = Technique(
    name="prefix_tuning",
    config_class=PrefixTuningSettings,
    prepare=prepare,
    save=save_peft_adapter,
    disabled_view=peft_disabled_view,
    result_dir_name="adapter",
    adapter_types=("PREFIX_TUNING",),  # PEFT's peft_type
    generation_view=prefix_in_generate_cache,
    default_learning_rate=1e-2,
    summary="learned key/value prefixes at every attention layer (not mergeable, no packing)",
    refuses={**REFUSES, "gradient_checkpointing": "PEFT refuses it: the learned prefix is passed as a key/value cache, "
                                                 "which recomputing activations in backward cannot use",
             "score_head": "PEFT passes the learned prefix to a sequence classifier as past_key_values, which "
                           "transformers' classifiers no longer accept (PEFT's ValueError in the first forward); "
                           "use lora or full"},
)
