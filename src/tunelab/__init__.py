"""tunelab: fine-tune open language models with every mainstream technique, measure whether it helped, ship it.

Python API (mirrors the CLI)::

    import tunelab
    result = tunelab.train("examples/beginner/quickstart-lora.yaml", overrides=["training.max_steps=10"])
    report = tunelab.inspect_data("my_data.jsonl")
"""

from tunelab.api import inspect_data, quickstart_config, train
from tunelab.config import ConfigError, TunelabConfig, load_config

__version__ = "0.1.0"
__all__ = ["ConfigError", "TunelabConfig", "inspect_data", "load_config", "quickstart_config", "train"]
