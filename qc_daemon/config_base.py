"""What the daemon's settings and the trainer's config share: strict frozen pydantic sections read from TOML.

A :class:`Section` takes exactly what TOML gives: integers for ``int`` (not ``true``, not ``2.5``, not ``"3"``),
numbers for ``float``, strings for ``str``, arrays for tuples, an enum's value for an enum field, a string for a
``Path`` (``~`` expanded). Unknown keys are errors. :func:`validate_toml` turns pydantic's ``ValidationError``
into the caller's own error type with one line per problem, each naming the full key and the bad value::

    dicom.port = 70000: input should be less than or equal to 65535
    alerts.colour = 'red': unknown key (known: threshold, webhook_url, ...)

The trainer imports this module; it must never import the trainer (or anything heavy).
"""

from __future__ import annotations

import enum
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

T = TypeVar("T", bound=BaseModel)


class InvalidValue(ValueError):
    """Raised by a section's cross-key checks: ``key`` (inside the section) is named instead of the section."""

    def __init__(self, key: str, value: Any, expected: str):
        super().__init__(expected)
        self.key = key
        self.value = value
        self.expected = expected


class Section(BaseModel):
    """One frozen, strict table of a TOML file. Subclass it with typed fields that all have defaults."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _from_toml(cls, value: Any, info: ValidationInfo) -> Any:
        """TOML's spelling of enums, tuples and paths; strict validation then checks everything else."""
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(annotation, type) and issubclass(annotation, enum.Enum) and not isinstance(value, annotation):
            try:
                return annotation(value)
            except ValueError:
                raise ValueError("expected one of " + ", ".join(repr(m.value) for m in annotation)) from None
        if typing.get_origin(annotation) is tuple and isinstance(value, list):
            return tuple(value)
        if annotation is Path and isinstance(value, str):
            if not value:
                raise ValueError("expected a non-empty path")
            return Path(value).expanduser()
        return value


def read_toml(path: Path, error: type[Exception]) -> dict[str, Any]:
    """The parsed file; a missing, unreadable or malformed file raises ``error`` naming the path."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise error(f"config file {path} does not exist") from exc
    except OSError as exc:
        raise error(f"config file {path} cannot be read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise error(f"config file {path} is not valid TOML: {exc}") from exc


def validate_toml(model: type[T], raw: Mapping[str, Any], error: type[Exception]) -> T:
    """``model`` built from ``raw``; every problem becomes one line of one ``error``."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise error("\n".join(describe_error(model, e) for e in exc.errors(include_url=False))) from None


def describe_error(model: type[BaseModel], error: Mapping[str, Any]) -> str:
    """One pydantic error as ``section.key = value: what was expected``."""
    loc = tuple(error["loc"])
    value = error["input"]
    kind = error["type"]
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, InvalidValue):
        loc, value = (*loc, cause.key), cause.value
    key = _dotted(loc)
    if kind == "extra_forbidden":
        owner = _model_at(model, loc[:-1])
        known = ", ".join(owner.model_fields) if owner is not None else "?"
        what = "section" if len(loc) == 1 else "key"
        return f"{key} = {value!r}: unknown {what} (known: {known})"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{key} = {value!r}: expected a table ([{key}])"
    if isinstance(cause, ValueError):
        message = str(cause)
    else:
        message = error["msg"]
        message = message[:1].lower() + message[1:]
    return f"{key} = {value!r}: {message}"


def _dotted(loc: tuple[Any, ...]) -> str:
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that ``loc`` (a path of field names) points into, if it is one."""
    current: Any = model
    for part in loc:
        field = current.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        current = field.annotation
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None
