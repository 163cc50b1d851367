"""The slimkit error hierarchy.

Every error a user can cause derives from :class:`SlimkitError`; the CLI turns each into a one-line
message and exit code 2. Messages say what was expected, what was received, and name the field or
module involved.
"""

from __future__ import annotations


class SlimkitError(Exception):
    """Base class of every error slimkit raises on purpose."""


class ConfigError(SlimkitError, ValueError):
    """A configuration value (recipe field, technique option, schedule) is invalid.

    ``fields`` holds ``(dotted.field.path, message)`` pairs when the error came from validation.
    """

    fields: list[tuple[str, str]] = []  # noqa: RUF012 - replaced per instance, never mutated


class ScopeError(ConfigError):
    """A targeting rule matched nothing, or matched only modules a technique cannot handle."""


class UnsupportedModuleError(SlimkitError, TypeError):
    """A module cannot be handled by a technique or policy; the message names it."""


class CheckpointError(SlimkitError, OSError):
    """A checkpoint is missing, corrupt, or does not fit the model it is loaded into."""


class StateError(SlimkitError, RuntimeError):
    """An operation was called out of order (e.g. export before calibration, step before apply)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for
    one-line errors that wrap another library's exception."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


__all__ = [
    "CheckpointError",
    "ConfigError",
    "ScopeError",
    "SlimkitError",
    "StateError",
    "UnsupportedModuleError",
    "first_line",
]
