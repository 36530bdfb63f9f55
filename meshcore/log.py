"""Process-wide structured logging: one JSON object per line.

Every line carries `timestamp` (ISO 8601, UTC), `level`, `event`, `component` (who logged
it: "access", "xds", ... or a stdlib logger's name) and whatever was bound with `structlog.contextvars.bind_contextvars`
(e.g. a connection id). Third-party libraries that log through the stdlib `logging` module
(grpc, kubernetes, urllib3) are rendered the same way, so one log stream stays parseable.

    configure_logging("info")
    log = get_logger("xds")
    log.info("connected", address="istiod:15012")

The level can be changed while running (`set_level`, used by the admin `/logging` endpoint);
loggers obtained earlier follow the change because they are not cached.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

# Names accepted by `configure_logging` / `set_level`; "warn" is accepted because ztunnel's
# admin endpoint uses it and operators type it out of habit.
_LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
LEVEL_NAMES: tuple[str, ...] = tuple(_LEVELS)

_current_level = "info"

_SHARED_PROCESSORS: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
    structlog.processors.StackInfoRenderer(),
    structlog.processors.format_exc_info,
]


class _CurrentStderr:
    """Writes to whatever `sys.stderr` is at write time, not at configure time: test runners
    and daemonizers swap it, and a logger must not keep a closed one."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class _JsonLinesHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The stdlib root handler we install; a distinct type so reconfiguring replaces it."""


def _add_stdlib_component(logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    event_dict["component"] = event_dict["_record"].name
    return event_dict


def _parse_level(level: str) -> tuple[str, int]:
    name = level.strip().lower()
    if name not in _LEVELS:
        raise ValueError(f"invalid log level {level!r}: expected one of {', '.join(LEVEL_NAMES)}")
    return name, _LEVELS[name]


def configure_logging(level: str = "info", *, stream: TextIO | None = None) -> None:
    """Send JSON log lines at `level` and above to `stream` (default: sys.stderr at call time).

    Calling it again replaces the previous configuration (it never stacks handlers).
    Raises ValueError naming the level if it is not one of LEVEL_NAMES.
    """
    global _current_level
    name, number = _parse_level(level)
    out: Any = _CurrentStderr() if stream is None else stream
    structlog.configure(
        processors=[*_SHARED_PROCESSORS, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(number),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        # Not cached, so `set_level` reaches loggers that modules created at import time.
        cache_logger_on_first_use=False,
    )

    handler = _JsonLinesHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[_add_stdlib_component, *_SHARED_PROCESSORS],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not isinstance(h, _JsonLinesHandler)]
    root.addHandler(handler)
    root.setLevel(number)
    _current_level = name


def set_level(level: str) -> None:
    """Change the level of every logger now; raises ValueError naming an unknown level."""
    global _current_level
    name, number = _parse_level(level)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(number))
    logging.getLogger().setLevel(number)
    _current_level = name


def enabled(level: str) -> bool:
    """Whether lines at `level` are written now: a hot path skips building a line that
    would be dropped."""
    return _LEVELS[level] >= _LEVELS[_current_level]


def current_level() -> str:
    """The level set by the last `configure_logging` / `set_level` call."""
    return _current_level


def get_logger(component: str) -> Any:
    """A structlog logger whose lines carry `component=<component>`."""
    return structlog.get_logger(component=component)
