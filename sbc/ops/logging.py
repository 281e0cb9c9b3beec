"""structlog set up once for the whole process, standard-library logging routed through it.

Output goes to stderr: one JSON object per line (``timestamp`` in ISO 8601 UTC, ``level``,
``event``, ``logger`` and whatever context is bound, e.g. ``call_id``, ``leg``) when stderr is not
a terminal or ``fmt="json"``, a readable console rendering otherwise. Records of aiohttp, asyncio
and every other library that logs through :mod:`logging` take the same path, so one grep on a
call id or one JSON parser sees everything.

sbc's own lines (structlog) do not go through :mod:`logging`: a level-filtered bound logger
(``make_filtering_bound_logger``: a line below the threshold costs one no-op call) renders
the event and writes the line straight to the stream, under the root handler's lock so that
lines from both paths never interleave. The standard-library path (a ``LogRecord``, the
handler, ``ProcessorFormatter``) cost about three times as much per line, and a call logs
about five lines at info (docs/performance.md, "Call layer").
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import datetime
import json.encoder
import logging
import sys
import threading
import time
from json.encoder import encode_basestring_ascii as _encode_string
from typing import Any, TextIO

import structlog
from structlog.processors import _json_fallback_handler as _json_fallback
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
# How long a batched line may wait for the others of its batch (_Output), seconds.
BATCH_DELAY = 0.01
# The encoder json.dumps() uses (None without the C accelerator: then _JsonLine is not used).
_make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)


def configure_logging(
    level: str, fmt: str = "auto", stream: TextIO | None = None, *, batched: bool = False
) -> None:
    """Set up structlog and the root logger. Calling it again replaces the previous setup.

    ``level`` is one of :data:`LEVELS`; ``fmt`` is ``auto`` (console on a terminal, JSON
    otherwise), ``json`` or ``console``; ``stream`` defaults to ``sys.stderr``. ``batched``
    (``sbc run``): the lines logged on a running event loop are written together, at most
    :data:`BATCH_DELAY` late (:class:`_Output`), one write instead of one per line.
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
    own: list[Processor] = [*shared, *final]  # sbc's own lines
    if as_json and _make_encoder is not None:
        own = [_JsonLine(own)]  # the same chain in one step, byte for byte

    global _output
    if _output is not None:
        _output.flush()  # what the previous setup still holds goes out first
    output = _output = _Output(out, batched)
    # The root handler writes through the same output: a line of a library is written after
    # the lines logged before it, batched or not.
    handler = logging.StreamHandler(output)
    output.lock = handler.lock if handler.lock is not None else threading.RLock()
    structlog.configure(
        processors=own,
        logger_factory=_LineWriterFactory(output),
        wrapper_class=_fast_wrapper(structlog.make_filtering_bound_logger(threshold), threshold),
        # Not cached: a logger taken before configure_logging() follows the current setup.
        # (A call binds its logger once, so its lines do not pay for the lookup.)
        cache_logger_on_first_use=False,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        # Records from plain `logging` callers get the same fields as structlog's own.
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(threshold)
    # Access lines of the admin endpoint are noise at info level.
    logging.getLogger("aiohttp.access").setLevel(max(threshold, logging.WARNING))


# "MM:SS" of each second of an hour, made once (about 0.2 MiB): see _JsonLine._hour.
_MINUTE_SECOND = tuple(f"{m:02d}:{s:02d}" for m in range(60) for s in range(60))


class _JsonLine:
    """The JSON chain (``general``: merge_contextvars, add_logger_name, add_log_level,
    TimeStamper(iso, utc), StackInfoRenderer, dict_tracebacks, JSONRenderer) as one processor,
    for the lines that carry neither ``exc_info`` nor ``stack_info`` (every line of a call).

    The same line, byte for byte, for a third fewer instructions (bench/bench_logging.py under
    callgrind: 102k -> 68k per line; what is left is mostly the JSON encoding itself): six
    processor calls fewer per line, the timestamp's date and time of day formatted once per
    second rather than a datetime made and formatted per line, and the encoder of json.dumps()
    made directly (json.dumps() with ``default`` builds a JSONEncoder per line). A line with an
    exception or a stack, or whose encoding fails, takes ``general`` itself.
    """

    __slots__ = ("_general", "_hour")

    def __init__(self, general: list[Processor]) -> None:
        self._general = general
        # An hour since the UNIX epoch and its date and hour ("2026-12-06T19:"), in one
        # attribute so that a thread never reads the text of another hour; the minutes and
        # seconds come from _MINUTE_SECOND. Not the text of each second: that was remade every
        # second and kept until the next, the last one made at the end of a burst of calls and
        # alive after it in the arenas the burst took, which Python's allocator then could not
        # give back (docs/performance.md, Round 8: idle). An hour's text is made during a
        # burst only if the burst crosses the hour.
        self._hour: tuple[int, str] = (-1, "")

    def __call__(self, logger: Any, method_name: str, event_dict: Any) -> Any:
        if "exc_info" in event_dict or "stack_info" in event_dict:
            return self._slow(logger, method_name, event_dict)
        event_dict = structlog.contextvars.merge_contextvars(logger, method_name, event_dict)
        if "_record" in event_dict:  # a LogRecord's fields: add_logger_name reads it
            return self._slow(logger, method_name, event_dict)
        self._stamp(logger, method_name, event_dict)
        try:
            return "".join(_new_encoder()(event_dict, 0))
        except Exception:  # as json.dumps() fails, from JSONRenderer itself
            return self._general[-1](logger, method_name, event_dict)

    def after(self, prefix: str, logger: Any, method_name: str, rest: dict[str, Any]) -> Any:
        """The line of a bound logger whose context encodes as ``prefix`` (its items as the
        encoder writes them, :func:`_context_json`) and ``rest`` (the line's own fields and
        the event, none of them a key of the context): the line :meth:`__call__` writes for
        the context followed by ``rest``, without encoding the context again. None when that
        cannot be promised (a field asks for the general chain, structlog's context variables
        are set, the encoder refuses a value): the caller then takes :meth:`__call__`.
        ``rest`` is not changed unless the line is written (the caller may take it again)."""
        if "exc_info" in rest or "stack_info" in rest or "_record" in rest:
            return None
        # merge_contextvars adds structlog's context variables after the fields: a line
        # with any of them takes the general chain (none are bound on a call's path; the
        # loop over the context is what merge_contextvars does, without its call).
        if _STRUCTLOG_VARS:  # none made yet (none on a call's path): nothing to merge
            context = _copy_context()
            for var in context:
                if var.name.startswith(_CONTEXTVAR_PREFIX) and context[var] is not Ellipsis:
                    return None
        name = logger.name
        if "logger" in rest or "level" in rest or "timestamp" in rest or type(name) is not str:
            # The stamps overwrite a field in its place: the encoder writes them there.
            rest = dict(rest)
            self._stamp(logger, method_name, rest)
            tail = "}"
        else:
            # The stamps come last, as text the encoder would write for them (a timestamp
            # is ASCII digits and punctuation, nothing to escape); the logger's name and the
            # level as JSON are the same for every line of a logger: encoded once.
            head = _TAILS.get((name, method_name))
            if head is None:
                head = _tail_of(name, method_name)
            # _timestamp() inline (a call less per line).
            second, fraction = divmod(time.time_ns() // 1000, 1_000_000)
            hour, within = divmod(second, 3600)
            known, stamp = self._hour
            if hour != known:
                stamp = self._hour_text(hour)
            clock = _MINUTE_SECOND[within]
            tail = (
                f'{head}{stamp}{clock}.{fraction:06d}Z"}}'
                if fraction
                else f'{head}{stamp}{clock}Z"}}'
            )
        try:
            # One encoder for all lines: without markers (no record of the containers being
            # encoded) it keeps no state between calls, and a circular value, which the
            # markers would refuse at once, fails here with RecursionError: the caller
            # then takes the general chain, which refuses it as json.dumps() does.
            body = "".join(_SHARED_ENCODER(rest, 0))
        except Exception:
            return None
        return f"{{{prefix}, {body[1:-1]}{tail}" if prefix else f"{body[:-1]}{tail}"

    def _stamp(self, logger: Any, method_name: str, event_dict: Any) -> None:
        """add_logger_name, add_log_level and TimeStamper(fmt="iso", utc=True)."""
        event_dict["logger"] = logger.name
        event_dict["level"] = _LEVEL_NAMES.get(method_name, method_name)
        event_dict["timestamp"] = self._timestamp()

    def _timestamp(self) -> str:
        # TimeStamper: datetime.now(timezone.utc).isoformat() with "Z" for "+00:00". now()
        # takes the system clock's microseconds rounded down, as time_ns() // 1000 does, and
        # isoformat() leaves out a fraction that is zero.
        micros = time.time_ns() // 1000
        second, fraction = divmod(micros, 1_000_000)
        hour, within = divmod(second, 3600)
        known, prefix = self._hour
        if hour != known:
            prefix = self._hour_text(hour)
        clock = _MINUTE_SECOND[within]
        return f"{prefix}{clock}.{fraction:06d}Z" if fraction else f"{prefix}{clock}Z"

    def _hour_text(self, hour: int) -> str:
        """The date and hour ("2026-12-06T19:") of the UNIX ``hour`` (a UNIX day is 24 of
        them: no leap seconds), remembered for its next lines."""
        moment = datetime.datetime.fromtimestamp(hour * 3600, datetime.UTC)
        text = moment.strftime("%Y-%m-%dT%H:")
        self._hour = (hour, text)
        return text

    def _slow(self, logger: Any, method_name: str, event_dict: Any) -> Any:
        for processor in self._general:
            event_dict = processor(logger, method_name, event_dict)
        return event_dict


# The methods of a bound logger that _fast_wrapper gives a shortcut (exception() and log()
# keep structlog's own: an exception takes the general chain anyway).
_FAST_METHODS = ("debug", "info", "msg", "warning", "warn", "error", "critical", "fatal")


def _fast_wrapper(base: type[Any], threshold: int) -> type[Any]:
    """``base`` (structlog's bound logger filtering below ``threshold``) whose enabled level
    methods go straight to the one-step JSON line when it is the whole chain: the line
    structlog makes, without its three frames per line (``meth``, ``_proxy_to_logger``,
    ``_process_event``) and their keyword re-packing. Any other chain (the console renderer,
    ``capture_logs`` in tests), or positional arguments to interpolate, take ``base``'s method
    itself."""
    methods: dict[str, Any] = {}
    for name in _FAST_METHODS:
        level = _LEVEL_METHOD.get(name, name)
        if LEVELS[level] >= threshold:  # below it, structlog's no-op stays
            methods[name] = _fast_method(name, getattr(base, name))
    # Per bound logger: its context's JSON and the context's size then (context_json), found
    # at its first line; a context changed in place (structlog's unbind() deletes keys from a
    # fresh copy, new() clears the old one) changes its size, and is encoded again.
    methods["_sbc_context_json"] = None
    methods["bind"] = _bind_with_json(base.bind)
    return type(base.__name__, (base,), methods)


def _bind_with_json(general: Any) -> Any:
    def bind(self: Any, **new_values: Any) -> Any:
        """structlog's bind(); the new logger starts with its context's JSON when this one
        knows its own and the new values only add keys (as a leg's logger adds ``leg`` to
        its call's): its first line then encodes only its own fields too."""
        child = general(self, **new_values)
        known = self._sbc_context_json
        context = self._context
        if (
            new_values
            and known is not None
            and known[0] is not None
            and known[1] == len(context)
            and context.keys().isdisjoint(new_values)
        ):
            added = _context_json(new_values)
            if added is not None:
                prefix = f"{known[0]}, {added}" if known[0] else added
                child._sbc_context_json = (prefix, known[1] + len(new_values))
        return child

    return bind


def _fast_method(name: str, general: Any) -> Any:
    level = _LEVEL_METHOD.get(name, name)  # the name structlog passes the chain

    def fast(self: Any, event: str, *args: Any, **kw: Any) -> Any:
        processors = self._processors
        if args or len(processors) != 1 or type(processors[0]) is not _JsonLine:
            return general(self, event, *args, **kw)
        context = self._context
        known = self._sbc_context_json
        if known is None or known[1] != len(context):
            known = self._sbc_context_json = (_context_json(context), len(context))
        prefix = known[0]
        logger = self._logger
        if prefix is not None and (not kw or context.keys().isdisjoint(kw)):
            # kw is this call's own dict: the event goes last, as structlog adds it (and
            # the general way below writes it in the same place).
            kw["event"] = event
            line = processors[0].after(prefix, logger, level, kw)
            if line is not None:
                if type(logger) is _LineWriter:  # its msg(), without the call
                    return logger._output.line(line)
                return getattr(logger, level)(line)
        # As BoundLoggerBase._process_event builds it: the context, the fields, the event.
        event_dict = context.copy()
        event_dict.update(kw)
        event_dict["event"] = event
        return getattr(logger, level)(processors[0](logger, level, event_dict))

    fast.__name__ = name
    return fast


# Values whose JSON never changes once encoded (a context holding anything else, whose text
# the encoder's fallback takes from repr() at each line, is encoded at each line).
_PLAIN_TYPES = (str, int, float, bool, type(None))
# Keys a line writes after its fields: a context holding one is encoded at each line.
_LINE_KEYS = frozenset({"event", "logger", "level", "timestamp"})


def _context_json(context: Any) -> str | None:
    """The items of a bound logger's ``context`` as the line's encoder writes them (between
    the braces), or None when they cannot be written once for all its lines."""
    if type(context) is not dict or not _LINE_KEYS.isdisjoint(context):
        return None
    for key, value in context.items():
        if type(key) is not str or type(value) not in _PLAIN_TYPES:
            return None
    try:
        # Plain values only, so nothing circular: the shared encoder (no markers) will do.
        return "".join(_SHARED_ENCODER(context, 0))[1:-1]
    except Exception:  # pragma: no cover - plain values always encode
        return None


# What merge_contextvars merges: the context variables named with structlog's prefix.
_CONTEXTVAR_PREFIX = structlog.contextvars.STRUCTLOG_KEY_PREFIX
# The variables structlog made for them (bind_contextvars makes each on its first use):
# while there is none, no line has any to merge and the context is not walked. Should a
# structlog release no longer have the table, a non-empty stand-in keeps the walk.
_STRUCTLOG_VARS: Any = getattr(structlog.contextvars, "_CONTEXT_VARS", (None,))
_copy_context = contextvars.copy_context

# The text a line's stamps start with, by logger name and method name: ', "logger": NAME,
# "level": LEVEL, "timestamp": "' (see _JsonLine.after). Bounded: a process has a few dozen.
_TAILS: dict[tuple[str, str], str] = {}
_TAILS_MAX = 1024


def _tail_of(name: str, method_name: str) -> str:
    level = _LEVEL_NAMES.get(method_name, method_name)
    head = f', "logger": {_encode_string(name)}, "level": {_encode_string(level)}, "timestamp": "'
    if len(_TAILS) < _TAILS_MAX:
        _TAILS[name, method_name] = head
    return head


def _new_encoder() -> Any:
    # A new encoder per line: its record of the containers being encoded (for circular
    # references) must not be shared between threads.
    return _make_encoder({}, _json_fallback, _encode_string, None, ": ", ", ", False, False, True)


# The encoder of _JsonLine.after(), shared by every line: no markers, so no state.
_SHARED_ENCODER: Any = (
    None
    if _make_encoder is None
    else _make_encoder(None, _json_fallback, _encode_string, None, ": ", ", ", False, False, True)
)


# structlog's filtering logger passes the chain the level's name (warn() logs "warning",
# fatal() "critical", msg() "info"): the method names whose level name differs.
_LEVEL_METHOD = {"msg": "info", "warn": "warning", "fatal": "critical"}

# What add_log_level writes for a method name other than itself.
_LEVEL_NAMES = {"warn": "warning", "exception": "error"}


class _Output:
    """Where the lines go: ``stream``, under ``lock`` (the root handler's, so that lines from
    structlog and from :mod:`logging` never interleave).

    ``batched``: a line logged on a running event loop is kept, and every line kept is written
    and flushed in one go :data:`BATCH_DELAY` after the first of them (a loop timer): a write
    to stderr is a system call per line otherwise (about 1.4 us of a line's ~6 us at info;
    five lines per call), and under load one write now carries dozens of lines. Not at the end
    of the loop's pass (``call_soon``): that costs the loop an extra pass, more than the write
    it saves when a pass logs one line. A line from another thread, or with no loop running,
    is written at once, after those kept. The root handler writes through :meth:`write` too,
    so the order is kept. Lost if the process is killed (SIGKILL, a crash in C): at most the
    lines of the last :data:`BATCH_DELAY`; none at a normal exit (:func:`_flush_at_exit`).
    """

    __slots__ = ("_flushing_on", "_pending", "batched", "lock", "stream")

    def __init__(self, stream: TextIO, batched: bool) -> None:
        self.stream = stream
        self.batched = batched
        self.lock: Any = threading.RLock()
        self._pending: list[str] = []
        self._flushing_on: asyncio.AbstractEventLoop | None = None  # a flush is scheduled

    def line(self, message: str) -> None:
        """Write ``message`` and a newline (now, or with the batch it joins: ``batched``)."""
        with self.lock:
            if self.batched:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:
                    loop = None
                if loop is not None:
                    self._pending.append(message)
                    if self._flushing_on is not loop:
                        # (a flush left on a loop that stopped since is not waited for)
                        self._flushing_on = loop
                        loop.call_later(BATCH_DELAY, self.flush)
                    return
            self.write(message + "\n")

    def write(self, text: str) -> None:
        """Write ``text`` after any line kept, and flush (what the root handler calls)."""
        with self.lock:
            pending = self._pending
            if pending:
                pending.append(text)
                text = "\n".join(pending) if text else "\n".join(pending[:-1]) + "\n"
                pending.clear()
            if not text:
                return
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):  # stderr gone: a line lost must not fail a call
                pass

    def flush(self) -> None:
        """Write the lines kept."""
        with self.lock:
            self._flushing_on = None
            self.write("")


# The output of the current setup (configure_logging), flushed at exit.
_output: _Output | None = None


@atexit.register
def _flush_at_exit() -> None:
    if _output is not None:
        _output.flush()


class _LineWriter:
    """The end of structlog's chain: the rendered line, handed to the output.

    ``name`` is what ``add_logger_name`` puts in the ``logger`` field."""

    __slots__ = ("_output", "name")

    def __init__(self, name: str, output: _Output) -> None:
        self.name = name
        self._output = output

    def msg(self, message: str) -> None:
        self._output.line(message)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


class _LineWriterFactory:
    def __init__(self, output: _Output) -> None:
        self._output = output

    def __call__(self, *args: Any) -> _LineWriter:
        name = args[0] if args and isinstance(args[0], str) else _caller_module()
        return _LineWriter(name, self._output)


def _caller_module() -> str:
    """The module that asked for an unnamed logger (as logging's factory names it)."""
    frame = sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not (module.startswith("structlog") or module == __name__):
            return str(module)
        frame = frame.f_back  # type: ignore[assignment]
    return "?"


def _isatty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except ValueError:  # closed stream
        return False
