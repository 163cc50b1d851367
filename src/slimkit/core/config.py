"""Configs are data: pydantic models that reject unknown keys and raise :class:`ConfigError`.

Every technique, schedule and recipe config derives from :class:`Config`. A validation failure is
turned into one line that names the field, what was expected and what was received.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from typing_extensions import Self

from slimkit.errors import ConfigError


def field_errors(exc: ValidationError) -> list[tuple[str, str]]:
    """``(dotted.field.path, message)`` pairs; nested slimkit configs are flattened."""
    out: list[tuple[str, str]] = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        inner = (err.get("ctx") or {}).get("error")
        if isinstance(inner, ConfigError) and inner.fields:
            out.extend((".".join(p for p in (loc, sub) if p), msg) for sub, msg in inner.fields)
            continue
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field (check the spelling)"
        elif "input" in err and err.get("type") != "missing" and not isinstance(err["input"], dict):
            msg = f"{msg} (got {err['input']!r})"
        out.append((loc, msg))
    return out


def format_field_errors(fields: list[tuple[str, str]], *, source: str | None = None) -> str:
    """One line: ``source: field.path: message; other.path: message``."""
    shown = [f"{loc}: {msg}" if loc else msg for loc, msg in fields[:3]]
    more = len(fields) - len(shown)
    line = "; ".join(shown) + (f"; and {more} more" if more > 0 else "")
    return f"{source}: {line}" if source else line


def format_validation_error(exc: ValidationError, *, source: str | None = None) -> str:
    """Render a pydantic error as one line naming each field, what was expected and received."""
    return format_field_errors(field_errors(exc), source=source)


def config_error(exc: ValidationError, *, source: str | None = None) -> ConfigError:
    """A one-line :class:`ConfigError` with ``fields`` set; when every failure was raised as the
    same subclass (e.g. :class:`~slimkit.errors.ScopeError` from a scope rule), that class."""
    fields = field_errors(exc)
    raised = {type((err.get("ctx") or {}).get("error")) for err in exc.errors()}
    cls = raised.pop() if len(raised) == 1 else ConfigError
    if not issubclass(cls, ConfigError):
        cls = ConfigError
    error = cls(format_field_errors(fields, source=source))
    error.fields = fields
    return error


class Config(BaseModel):
    """Base of every slimkit config: frozen, keyword-only, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise config_error(exc, source=type(self).__name__) from None

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str | None = None) -> Self:
        """Validate a plain dict (e.g. parsed YAML); errors name ``source`` and the field."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise config_error(exc, source=source or cls.__name__) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict; ``from_dict(to_dict())`` gives an equal config."""
        return self.model_dump(mode="json")
