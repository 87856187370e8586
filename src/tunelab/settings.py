"""The one base class of every config section (model, data, technique, objective, training, eval, output).

Each section is defined by the package that owns it (``models.ModelConfig``, ``data.config.DataConfig``, each
technique's settings, ...); ``tunelab.config`` only composes them. Unknown keys are errors, and assigning a field
re-validates it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
