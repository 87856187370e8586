"""The errors a user can fix. Each message names the file, the line or key, and what was expected; the CLI
prints it in one line (no traceback) and exits with 2. Kept in this light module so ``import tunelab`` and
``except tunelab.DataError`` need no torch or transformers."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config that cannot be used, with the file, the line or key, and what was expected."""


class DataError(ValueError):
    """A data file or record that cannot be used: the message names the file, the line and what was expected."""


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded; the message says what to do."""


class TechniqueError(ValueError):
    """A technique setting that does not fit the model (a layer index out of range, a module name not found)."""


class TrainingAborted(RuntimeError):
    """The run stopped on an error the user must fix (repeated non-finite steps, ...)."""


USER_ERRORS = (ConfigError, DataError, ModelLoadError, TechniqueError, TrainingAborted)


def error_text(exc: BaseException) -> str:
    """An error as a run's status.json records it: tunelab's own errors are written to be read as they are; any
    other is prefixed with its type, which its message alone may not name (a KeyError's is only the key)."""
    text = str(exc)
    if isinstance(exc, USER_ERRORS):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
