"""Prefix tuning: learn key/value vectors prepended at every attention layer (Li & Liang 2021, "Prefix-Tuning:
Optimizing Continuous Prompts for Generation", https://arxiv.org/abs/2101.00190).

At layer l, attention reads learned prefixes P_K^l, P_V^l (n, d_kv) before the sequence's keys and values:
    head = softmax(q [P_K^l; K]^T / sqrt(d)) [P_V^l; V]
Trainable parameters: n * layers * 2 * d_kv (or, with prefix_projection, an MLP that produces them, which trains
more stably; only the prefixes are needed at inference). Nothing is merged; examples are not packed.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Literal

from pydantic import Field
from torch import nn

from tunelab.techniques.base import RunContext, Technique, peft_disabled_view, peft_task_type, save_peft_adapter
from tunelab.techniques.lora import wrap
from tunelab.techniques.prompt_learning import REFUSES, VirtualTokens


class PrefixTuningSettings(VirtualTokens):
    name: Literal["prefix_tuning"] = Field("prefix_tuning", description="Learned key/value prefixes at every layer (PEFT prefix tuning).")
    prefix_projection: bool = Field(False, description="Produce the prefixes with a two-layer MLP (reparameterisation).")
    projection_hidden_size: int = Field(512, gt=0, description="Hidden size of that MLP (prefix_projection only).")


def prepare(model: nn.Module, settings: PrefixTuningSettings, context: RunContext | None = None) -> nn.Module:
    from peft import PrefixTuningConfig

    config = PrefixTuningConfig(num_virtual_tokens=settings.num_virtual_tokens, prefix_projection=settings.prefix_projection,
                                encoder_hidden_size=settings.projection_hidden_size, task_type=peft_task_type(context))
    return wrap(model, config)


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
