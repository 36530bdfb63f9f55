"""What translation reports about an object it could not (fully) use.

A `TranslationError` rejects one version of one object: the translator keeps serving the
previous good version and lists the error until the object is fixed or deleted. A
`TranslationWarning` accompanies an accepted object that is enforced differently from what
it says (e.g. HTTP rules a ztunnel cannot see). Both name the object and the field path,
so an operator can go straight to the offending line.
"""

from __future__ import annotations

from dataclasses import dataclass


class TranslationError(ValueError):
    """One object version was rejected; says which object, which field and why."""

    def __init__(self, *, kind: str, namespace: str, name: str, field: str, message: str) -> None:
        self.kind = kind
        self.namespace = namespace
        self.name = name
        self.field = field
        self.message = message
        super().__init__(_describe(kind, namespace, name, field, message))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TranslationError):
            return NotImplemented
        return (self.kind, self.namespace, self.name, self.field, self.message) == (
            other.kind,
            other.namespace,
            other.name,
            other.field,
            other.message,
        )

    def __hash__(self) -> int:
        return hash((self.kind, self.namespace, self.name, self.field, self.message))


@dataclass(frozen=True, slots=True)
class TranslationWarning:
    """An accepted object that is enforced differently from what it says."""

    kind: str
    namespace: str
    name: str
    field: str
    message: str

    def __str__(self) -> str:
        return _describe(self.kind, self.namespace, self.name, self.field, self.message)


def _describe(kind: str, namespace: str, name: str, field: str, message: str) -> str:
    where = f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"
    return f"{where}: {field}: {message}" if field else f"{where}: {message}"
