"""Typed reads from Kubernetes objects given as plain dicts (camelCase, as YAML/JSON has them).

Objects come from the API server or from hand-written YAML, so any field may be missing or
of the wrong type. Every reader takes the dotted path of the field it reads and raises a
`TranslationError` naming the object and that path ("spec.rules[0].from[1].source.ipBlocks[2]")
instead of letting a KeyError or TypeError escape: bad input never crashes the controller.
Absent and null fields read as empty, as Kubernetes' own decoding does.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from istiod_lite.model.errors import TranslationError, TranslationWarning

MAX_PORT = 65535


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """The object being read; makes errors and warnings that name it."""

    kind: str
    namespace: str
    name: str

    def error(self, field: str, message: str) -> TranslationError:
        return TranslationError(
            kind=self.kind, namespace=self.namespace, name=self.name, field=field, message=message
        )

    def warning(self, field: str, message: str) -> TranslationWarning:
        return TranslationWarning(
            kind=self.kind, namespace=self.namespace, name=self.name, field=field, message=message
        )


def _type_name(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return f"a {type(value).__name__}"


def mapping(ref: ObjectRef, value: Any, path: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ref.error(path, f"expected a mapping, got {_type_name(value)}")
    return value


def sequence(ref: ObjectRef, value: Any, path: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise ref.error(path, f"expected a list, got {_type_name(value)}")
    return list(value)


def string(ref: ObjectRef, value: Any, path: str, default: str = "") -> str:
    if value is None:
        return default
    if not isinstance(value, str):
        raise ref.error(path, f"expected a string, got {_type_name(value)} (quote it in YAML)")
    return value


def boolean(ref: ObjectRef, value: Any, path: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ref.error(path, f"expected true or false, got {_type_name(value)}")
    return value


def string_list(ref: ObjectRef, value: Any, path: str) -> list[str]:
    return [string(ref, item, f"{path}[{i}]") for i, item in enumerate(sequence(ref, value, path))]


def string_map(ref: ObjectRef, value: Any, path: str) -> dict[str, str]:
    """Labels, annotations, selectors: string keys to string values."""
    return {
        string(ref, key, path): string(ref, item, f"{path}.{key}")
        for key, item in mapping(ref, value, path).items()
    }


def port_number(ref: ObjectRef, value: Any, path: str) -> int:
    """A port given as a number or a decimal string (policies write ports as strings)."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.isascii() and value.isdigit():
        number = int(value)
    if number is None or not 1 <= number <= MAX_PORT:
        raise ref.error(path, f"{value!r} is not a port number (1-{MAX_PORT})")
    return number


def check_keys(
    ref: ObjectRef, value: Mapping[str, Any], allowed: Collection[str], path: str
) -> None:
    """Reject unknown keys: a misspelt field would otherwise silently widen a policy."""
    for key in value:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = (
                f"; did you mean {close[0]!r}?"
                if close
                else f"; expected one of {', '.join(sorted(allowed))}"
            )
            raise ref.error(f"{path}.{key}" if path else str(key), f"unknown field{hint}")
