"""structlog set up once for the whole process, standard-library logging routed through it.

Output goes to stderr: one JSON object per line (``timestamp`` in ISO 8601 UTC, ``level``,
``event``, ``logger`` and whatever context is bound, e.g. ``call_id``, ``leg``) when stderr is not
a terminal or ``fmt="json"``, a readable console rendering otherwise. Records of aiohttp, asyncio
and every other library that logs through :mod:`logging` take the same path, so one grep on a
call id or one JSON parser sees everything.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog
from structlog.types import Processor

__all__ = ["LEVELS", "configure_logging"]

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
FORMATS = ("auto", "json", "console")

_HANDLER_NAME = "sbc"


def configure_logging(level: str, fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Set up structlog and the root logger. Calling it again replaces the previous setup.

    ``level`` is one of :data:`LEVELS`; ``fmt`` is ``auto`` (console on a terminal, JSON
    otherwise), ``json`` or ``console``; ``stream`` defaults to ``sys.stderr``.
    """
    try:
        threshold = LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}") from None
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = sys.stderr if stream is None else stream
    as_json = fmt == "json" or (fmt == "auto" and not _isatty(out))

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: Processor
    final: list[Processor]
    if as_json:
        renderer = structlog.processors.JSONRenderer()
        final = [structlog.processors.dict_tracebacks, renderer]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=_isatty(out))
        final = [renderer]

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a logger taken before configure_logging() follows the current setup.
        cache_logger_on_first_use=False,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        # Records from plain `logging` callers get the same fields as structlog's own.
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )
    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(threshold)
    # Access lines of the admin endpoint are noise at info level.
    logging.getLogger("aiohttp.access").setLevel(max(threshold, logging.WARNING))


def _isatty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except ValueError:  # closed stream
        return False
