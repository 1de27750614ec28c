"""`ConfigError`, the one user-facing configuration error (below both `load` and `validate`, which raise it)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A user-facing configuration error; its message names the key, the bad value and the fix (CLI: exit 2)."""
