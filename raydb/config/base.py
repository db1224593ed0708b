"""What every config section shares: strict validation, and the error that names the field."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["ConfigError", "Section"]


class ConfigError(ValueError):
    """A config that cannot be used; the message names every offending field path."""


class Section(BaseModel):
    """A config section: unknown keys are errors (a typo names its field path instead of being
    silently ignored), and assignments are validated too."""

    # YAML (and so every override) reads `id: 42` or `revision: 2024` as a number; a str field
    # takes it as text instead of rejecting it.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)
