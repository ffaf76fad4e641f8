"""The error every data setting check raises (a leaf module, imported by all the others)."""

from __future__ import annotations

from safespot.errors import ConfigError


class DataConfigError(ConfigError):
    """An invalid data setting (named in the message)."""
