"""The one base of every setting error (a leaf module: it imports nothing of the package).

A :class:`ConfigError` is raised before any data is read or any model trained, names the
setting, and is printed by the command-line entry points as one line with exit status 2.
The threat, data, checkpoint, detector and report errors derive from it."""

from __future__ import annotations


class ConfigError(ValueError):
    """A setting that cannot work; raised before any data is loaded or model trained."""
