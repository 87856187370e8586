"""The reference policy of objectives that compare with one (DPO, IPO, KTO), built once at set-up.

Three ways, cheapest first:
- with an adapter technique, the same model with its adapter switched off (the technique's declared
  ``disabled_view``, PEFT's ``disable_adapter()``): no second copy in memory;
- otherwise (``full``, ``freeze``: the base weights themselves train) a frozen copy made before training;
- or no model at all during training: log-probs computed once before training and carried by each batch
  (``objective.reference: precomputed``, see ``objectives.preference``).

A ``Reference`` is entered with the policy model and yields the model to score with, always without gradients.
"""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from tunelab.objectives.base import Reference


@contextmanager
def same_model(model: nn.Module) -> Iterator[nn.Module]:
    """The model as its own reference: before any training (the base evaluation) policy and reference are one."""
    with torch.no_grad():
        yield model


def frozen_reference(model: nn.Module) -> nn.Module:
    """A frozen copy of the base, for techniques that change its weights: eval mode (no dropout), no gradients."""
    frozen = copy.deepcopy(model).eval()
    frozen.requires_grad_(False)
    return frozen


def reference_view(disabled_view: Callable[[nn.Module], AbstractContextManager[Any]] | None,
                   frozen: nn.Module | None) -> Reference | None:
    """The run's reference: the frozen copy when there is one, else the technique's disabled view; None when the
    objective needs no reference (neither is given)."""
    if frozen is not None:
        @contextmanager
        def copy_of_base(model: nn.Module) -> Iterator[nn.Module]:
            with torch.no_grad():
                yield frozen
        return copy_of_base
    if disabled_view is None:
        return None

    @contextmanager
    def adapter_off(model: nn.Module) -> Iterator[nn.Module]:
        was_training = model.training
        model.eval()  # the reference is deterministic (no dropout), as the frozen copy and precomputed log-probs are
        try:
            with torch.no_grad(), disabled_view(model):
                yield model
        finally:
            model.train(was_training)
    return adapter_off


def _scores_live(objective: Any, settings: Any) -> bool:
    return objective.wants_reference(settings) and getattr(settings, "reference", "live") == "live"


def copies_the_base(objective: Any, settings: Any,
                    disabled_view: Callable[[nn.Module], AbstractContextManager[Any]] | None) -> bool:
    """Whether ``live_reference`` keeps a frozen copy of the whole base (it then needs the real weights)."""
    return _scores_live(objective, settings) and disabled_view is None


def live_reference(objective: Any, settings: Any, disabled_view: Callable[[nn.Module], AbstractContextManager[Any]] | None,
                   model: nn.Module) -> Reference | None:
    """The reference a run scores with at every step, set up before the technique changes ``model``: None when the
    objective needs none (orpo, simpo, sft...) or reads precomputed log-probs; else the technique's disabled view,
    or a frozen copy of ``model`` made now when the technique has no such view."""
    if not _scores_live(objective, settings):
        return None
    return reference_view(disabled_view, frozen_reference(model) if disabled_view is None else None)
