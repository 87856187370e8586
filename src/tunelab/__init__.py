"""tunelab: fine-tune open language models with every mainstream technique, measure whether it helped, ship it.

Python API (mirrors the CLI)::

    import tunelab
    result = tunelab.train("examples/beginner/quickstart-lora.yaml", overrides=["training.max_steps=10"])
    report = tunelab.inspect_data("my_data.jsonl")
    scores = tunelab.evaluate("runs/my-run", "test.jsonl", against=["base"], metrics=["rouge_l"])

Errors a user can fix are ConfigError, DataError, ModelLoadError and TechniqueError, each with a message that
names the file, line or key and what was expected.
"""

from tunelab.api import evaluate, inspect_data, load_adapter, load_run, quickstart, quickstart_config, train
from tunelab.config import TunelabConfig, load_config
from tunelab.errors import ConfigError, DataError, ModelLoadError, TechniqueError

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "ModelLoadError", "TechniqueError", "TunelabConfig", "evaluate", "inspect_data",
           "load_adapter", "load_config", "load_run", "quickstart", "quickstart_config", "train"]
