"""tunelab: fine-tune open language models with every mainstream technique, measure whether it helped, ship it.

Python API (mirrors the CLI)::

    import tunelab
    result = tunelab.train("examples/beginner/quickstart-lora.yaml", overrides=["training.max_steps=10"])
    report = tunelab.inspect_data("my_data.jsonl")
    scores = tunelab.evaluate("runs/my-run", "test.jsonl", against=["base"], metrics=["rouge_l"])

Errors a user can fix are ConfigError, DataError, ModelLoadError and TechniqueError, each with a message that
names the file, line or key and what was expected.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tunelab.errors import ConfigError, DataError, ModelLoadError, TechniqueError

if TYPE_CHECKING:  # what __getattr__ below returns, for type checkers and editors
    from tunelab.api import (TunelabConfig, evaluate, inspect_data, load_adapter, load_config, load_run, quickstart,
                             quickstart_config, train)

__version__ = "0.1.0"
_API = ("TunelabConfig", "evaluate", "inspect_data", "load_adapter", "load_config", "load_run", "quickstart",
        "quickstart_config", "train")
__all__ = ["ConfigError", "DataError", "ModelLoadError", "TechniqueError", *_API]


def __getattr__(name: str) -> Any:
    """The Python API is loaded on first use (PEP 562), so that the command line (``tunelab --help``) and
    ``except tunelab.DataError`` do not load torch and transformers."""
    if name in _API:
        from tunelab import api  # lazily: it loads torch and transformers (see above)

        return getattr(api, name)
    raise AttributeError(f"module 'tunelab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
