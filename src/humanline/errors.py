"""Errors that reach the user as one line (exit code 2), not as a traceback."""

from __future__ import annotations


class HumanlineError(Exception):
    """Bad input or configuration: the CLI prints ``str(err)`` on one line and exits with code 2."""


class DataError(HumanlineError):
    """A problem in a data set, located by source (file or data set name), row and field."""

    def __init__(self, message: str, *, source: str | None = None, row: int | None = None,
                 field: str | None = None) -> None:
        parts = [p for p in (source, f"row {row}" if row is not None else None,
                             f"field '{field}'" if field else None) if p]
        where = ", ".join(parts)
        super().__init__(f"{where}: {message}" if where else message)
        self.source, self.row, self.field = source, row, field


class ConfigError(HumanlineError):
    """A problem in a config file or override, located by file and key."""

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None) -> None:
        parts = [p for p in (source, f"key '{key}'" if key else None) if p]
        where = ", ".join(parts)
        super().__init__(f"{where}: {message}" if where else message)
        self.source, self.key = source, key


class RewardError(HumanlineError):
    """A reward function raised or returned an unusable value."""
