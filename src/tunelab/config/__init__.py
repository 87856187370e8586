"""The run configuration: the schema (``schema``) and how a YAML file plus ``--set`` overrides become one
validated config (``loading``)."""

from tunelab.config.loading import build_config, format_validation_error, load_config, parse_overrides, read_run_config
from tunelab.config.schema import (
    EMBEDDED_DEFAULT_MODEL,
    DataConfig,
    EvalConfig,
    ModelConfig,
    ObjectiveConfig,
    OutputConfig,
    TrainingConfig,
    TunelabConfig,
)
from tunelab.errors import ConfigError

__all__ = [
    "EMBEDDED_DEFAULT_MODEL", "ConfigError", "DataConfig", "EvalConfig", "ModelConfig", "ObjectiveConfig",
    "OutputConfig", "TrainingConfig", "TunelabConfig", "build_config", "format_validation_error", "load_config",
    "parse_overrides", "read_run_config",
]
