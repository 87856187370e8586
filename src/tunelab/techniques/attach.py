"""Attaching a saved adapter to a plain transformers model, without the training code: ``tunelab.load_adapter``.

The folder's ``adapter_config.json`` says what it holds (tunelab's ``type`` or PEFT's ``peft_type``); the technique
registry says which technique declares that type, and that technique's ``attach`` loads it.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from torch import nn

from tunelab.errors import TechniqueError
from tunelab.techniques import technique_for_adapter
from tunelab.techniques import bottleneck as bn
from tunelab.techniques import routing as rt
from tunelab.techniques.base import ADAPTER_CONFIG, ADAPTER_DIR


def adapter_dir(path: str | Path) -> Path:
    """``path`` itself when it holds adapter_config.json, else a run folder's ``adapter/``."""
    path = Path(path)
    if (path / ADAPTER_CONFIG).is_file():
        return path
    if (path / ADAPTER_DIR / ADAPTER_CONFIG).is_file():
        return path / ADAPTER_DIR
    raise TechniqueError(f"{path}: no {ADAPTER_CONFIG} here or in {path / ADAPTER_DIR}; give an adapter folder or a "
                         "finished run folder")


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Attach the adapter saved in ``path`` (an adapter folder or a run folder) to ``model``, a plain transformers
    model of the same base, and return the adapted model.

    Bottleneck and routing adapters are attached in place (``model`` itself is returned, its base weights
    untouched); a PEFT adapter comes back wrapped in a ``peft.PeftModel``."""
    folder = adapter_dir(path)
    return technique_for_adapter(folder).attach(model, folder)


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """Turn every bottleneck/routed adapter off (the exact base model) or on again."""
    bn.set_enabled(model, enabled)
    rt.set_routing_enabled(model, enabled)


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """``with adapters_disabled(model):`` computes the base model's outputs (like PEFT's disable_adapter)."""
    set_adapters_enabled(model, False)
    try:
        yield model
    finally:
        set_adapters_enabled(model, True)


def remove_adapters(model: nn.Module) -> nn.Module:
    """Detach every bottleneck/routed adapter and its hooks: the base model again, with its original names."""
    return rt.remove_routing(model)
