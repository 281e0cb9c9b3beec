"""configure_logging: JSON lines or console, structlog and standard logging alike."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

import pytest
import structlog

from sbc.ops import logging as sbc_logging
from sbc.ops.logging import configure_logging


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_line_holds_bound_context():
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    structlog.get_logger("sbc.test").bind(call_id="abc@10.0.0.1", leg="pbx").info(
        "call answered", status=200
    )
    (line,) = _lines(out)
    assert line["event"] == "call answered"
    assert line["call_id"] == "abc@10.0.0.1"
    assert line["leg"] == "pbx"
    assert line["status"] == 200
    assert line["level"] == "info"
    assert line["logger"] == "sbc.test"
    stamp = datetime.fromisoformat(str(line["timestamp"]).replace("Z", "+00:00"))
    offset = stamp.utcoffset()
    assert offset is not None and offset.total_seconds() == 0


def test_contextvars_are_merged():
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    structlog.contextvars.bind_contextvars(call_id="ctx-1")
    structlog.get_logger().warning("media timeout")
    (line,) = _lines(out)
    assert (line["call_id"], line["level"]) == ("ctx-1", "warning")


def test_standard_logging_goes_through_the_same_renderer():
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    logging.getLogger("aiohttp.server").error("bad %s", "request", extra={"peer": "127.0.0.1"})
    (line,) = _lines(out)
    assert line["event"] == "bad request"
    assert line["logger"] == "aiohttp.server"
    assert line["level"] == "error"
    assert line["peer"] == "127.0.0.1"
    assert "timestamp" in line


def test_level_filters_both_paths():
    out = io.StringIO()
    configure_logging("warning", "json", stream=out)
    structlog.get_logger().info("dropped")
    logging.getLogger("x").info("dropped too")
    structlog.get_logger().error("kept")
    assert [line["event"] for line in _lines(out)] == ["kept"]


def test_exception_is_rendered_inside_the_json_line():
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        structlog.get_logger().exception("handler failed")
    (line,) = _lines(out)
    assert line["event"] == "handler failed"
    assert "RuntimeError" in json.dumps(line["exception"])


def test_auto_is_json_when_not_a_terminal():
    out = io.StringIO()
    configure_logging("info", "auto", stream=out)
    structlog.get_logger().info("hello", n=1)
    assert _lines(out)[0]["event"] == "hello"


def test_auto_is_console_on_a_terminal():
    out = _Tty()
    configure_logging("info", "auto", stream=out)
    structlog.get_logger().info("hello", call_id="c1")
    text = out.getvalue()
    assert "hello" in text and "call_id" in text and "c1" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])


def test_reconfiguring_replaces_the_handler():
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", "json", stream=first)
    configure_logging("info", "json", stream=second)
    structlog.get_logger().info("once")
    assert first.getvalue() == ""
    assert len(_lines(second)) == 1


@pytest.mark.parametrize(("level", "fmt"), [("loud", "json"), ("info", "xml")])
def test_bad_arguments(level, fmt):
    with pytest.raises(ValueError):
        configure_logging(level, fmt, stream=io.StringIO())


def test_closed_stream_counts_as_not_a_terminal():
    out = io.StringIO()
    out.close()  # isatty() now raises ValueError
    configure_logging("info", "auto", stream=out)  # JSON chosen; nothing written yet
    root = logging.getLogger()
    (handler,) = [h for h in root.handlers if h.get_name() == "sbc"]
    assert isinstance(handler.formatter, structlog.stdlib.ProcessorFormatter)
    assert any(
        isinstance(p, structlog.processors.JSONRenderer) for p in handler.formatter.processors
    )


def test_unnamed_logger_is_named_after_its_module():
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    structlog.get_logger().info("hello")
    (line,) = _lines(out)
    assert line["logger"] == __name__


def test_both_paths_share_one_stream_in_order():
    out = io.StringIO()
    configure_logging("debug", "json", stream=out)
    log = structlog.get_logger("sbc.test").bind(call_uuid="u1")
    log.debug("first")
    logging.getLogger("aiohttp.server").warning("second")
    log.info("third %s", "with argument")
    assert [(x["event"], x["level"]) for x in _lines(out)] == [
        ("first", "debug"),
        ("second", "warning"),
        ("third with argument", "info"),
    ]


def test_a_closed_stream_loses_the_line_without_raising():
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    log = structlog.get_logger("sbc.test")
    out.close()
    log.info("lost")  # a call must not fail because stderr went away


def _json_line() -> Any:
    (processor,) = structlog.get_config()["processors"]
    assert type(processor).__name__ == "_JsonLine"
    return processor


class _Thing:
    def __repr__(self) -> str:
        return "<thing é>"


class _Structured:
    def __structlog__(self) -> dict[str, int]:
        return {"n": 1}


@pytest.mark.parametrize(
    "event_kw",
    [
        {"event": "call_ended", "reason": "bye", "pbx_status": 200, "talked": 1.002},
        {"event": 'ünïcode ☎ \x00 "quoted" \\ \n', "caller": "Zoë", "n": -(2**70)},
        {"event": "nested", "x": [1, 2.5, None, True, False, {"k": ("t", "u")}], "y": {}},
        {"event": "odd floats", "a": float("nan"), "b": float("inf"), "c": -0.0, "d": 1e300},
        {"event": "fallback", "thing": _Thing(), "structured": _Structured(), 3: "int key"},
        {"event": "overrides", "level": "mine", "logger": "mine", "timestamp": "mine"},
        {"event": "surrogate", "name": "Zo\udceb"},
    ],
)
def test_the_one_step_json_line_is_the_general_chain_byte_for_byte(
    event_kw: dict[Any, Any],
) -> None:
    """sbc's lines take _JsonLine (the chain in one step); every line must read as the general
    chain (merge_contextvars ... JSONRenderer) writes it, timestamps aside (their format is
    tested below)."""
    assert sbc_logging._make_encoder is not None  # else every line takes the general chain
    configure_logging("info", "json", stream=io.StringIO())
    fast = _json_line()
    writer = structlog.get_logger("sbc.test").bind()._logger
    for method in ("info", "warning", "warn", "debug", "error", "critical"):
        general = fast._slow(writer, method, dict(event_kw))
        line = fast(writer, method, dict(event_kw))
        stamp = json.loads(general)["timestamp"]
        ours = json.loads(line)["timestamp"]
        if "mine" in ours:  # a timestamp given is replaced, as TimeStamper does
            assert stamp == ours
        assert line.replace(json.dumps(ours), json.dumps(stamp)) == general


def test_the_one_step_json_line_takes_the_general_chain_for_exceptions_stacks_contextvars():
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    log = structlog.get_logger("sbc.test")
    structlog.contextvars.bind_contextvars(call_id="ctx-1")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed", n=1)
    log.info("with stack", stack_info=True)
    log.info("plain", call_id="own")  # a field given wins over the context's
    failed, stacked, plain = _lines(out)
    exception = failed["exception"]
    assert isinstance(exception, list) and exception[0]["exc_type"] == "RuntimeError"
    assert failed["level"] == "error"
    assert failed["call_id"] == stacked["call_id"] == "ctx-1"
    assert "stack_info" not in stacked and "test_logging.py" in str(stacked["stack"])
    assert plain["call_id"] == "own"
    assert list(plain) == ["call_id", "event", "logger", "level", "timestamp"]


def test_a_line_that_cannot_be_encoded_fails_as_json_dumps_does():
    configure_logging("info", "json", stream=io.StringIO())
    circular: list[Any] = []
    circular.append(circular)
    with pytest.raises(ValueError, match="Circular reference"):
        structlog.get_logger("sbc.test").info("loop", value=circular)
    structlog.get_logger("sbc.test").info("still fine", value=[circular[:0]])  # encoder intact


@pytest.mark.parametrize(
    "nanoseconds",
    [
        1_765_051_716_352_034_999,  # rounded down to the microsecond, as datetime.now()
        1_765_051_716_000_000_000,  # no fraction: isoformat() writes none
        1_765_051_716_000_000_999,
        1_765_051_716_999_999_999,
        946_684_799_000_001_000,  # the last second of 1999
    ],
)
def test_timestamps_are_written_as_timestamper_writes_datetime_now(
    monkeypatch: pytest.MonkeyPatch, nanoseconds: int
) -> None:
    configure_logging("info", "json", stream=io.StringIO())
    fast = _json_line()
    writer = structlog.get_logger("sbc.test").bind()._logger
    monkeypatch.setattr(time, "time_ns", lambda: nanoseconds)
    for _ in range(2):  # the second line reuses the second's text
        stamp = json.loads(fast(writer, "info", {"event": "x"}))["timestamp"]
        micros = nanoseconds // 1000
        now = datetime.fromtimestamp(micros // 10**6, UTC).replace(microsecond=micros % 10**6)
        assert stamp == now.isoformat().replace("+00:00", "Z")


class _CountingStream(io.StringIO):
    """A stream that counts its writes (one per system call on a real stderr) and tells the
    event loop of each."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.written: asyncio.Event | None = None

    def write(self, text: str) -> int:
        self.writes += 1
        if self.written is not None:
            self.written.set()
        return super().write(text)


def test_batched_lines_are_written_in_one_go_in_order() -> None:
    out = _CountingStream()
    configure_logging("info", "json", stream=out, batched=True)
    log = structlog.get_logger("sbc.test").bind(call_uuid="u1")
    seen: list[tuple[str, int]] = []

    async def main() -> None:
        written = out.written = asyncio.Event()
        started = asyncio.get_running_loop().time()
        log.info("first", n=1)
        log.warning("second", n=2)
        await asyncio.sleep(0)
        seen.append((out.getvalue(), out.writes))  # kept: the batch waits BATCH_DELAY
        await asyncio.wait_for(written.wait(), 5.0)
        waited = asyncio.get_running_loop().time() - started
        assert waited >= sbc_logging.BATCH_DELAY * 0.9  # (the loop's clock has ms steps)
        seen.append((out.getvalue(), out.writes))
        log.info("third", n=3)
        logging.getLogger("library").warning("from logging")  # after "third", at once
        seen.append((out.getvalue(), out.writes))
        log.info("fourth")
        await asyncio.to_thread(log.info, "from a thread")  # written at once, after "fourth"
        log.info("last")  # kept when the loop closes: written at exit (here: by hand)

    asyncio.run(main())
    assert seen[0] == ("", 0)
    assert seen[1][1] == 1 and len(seen[1][0].splitlines()) == 2
    assert seen[2][1] == 2
    assert [line["event"] for line in _lines(out)][-1] == "from a thread"
    sbc_logging._flush_at_exit()
    events = [line["event"] for line in _lines(out)]
    assert events == ["first", "second", "third", "from logging", "fourth", "from a thread", "last"]
    assert out.getvalue().endswith("\n")


def test_batched_lines_are_the_lines_written_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time_ns", lambda: 1_765_051_716_352_034_999)
    texts = []
    for batched in (False, True):
        out = io.StringIO()
        configure_logging("info", "json", stream=out, batched=batched)
        log = structlog.get_logger("sbc.test").bind(call_uuid="u1", route="r")

        async def main(log: Any = log) -> None:
            log.info("call_started", caller="+1", n=1)
            log.info("call_answered")
            log.debug("filtered")
            log.warning("odd", detail="x", call_uuid="own")
            log.info("interpolated %s", "text")

        asyncio.run(main())
        sbc_logging._flush_at_exit()  # what the loop's timer had not written yet
        texts.append(out.getvalue())
    assert texts[0] == texts[1]
    assert len(texts[0].splitlines()) == 4


def test_lines_kept_are_written_when_logging_is_set_up_again_or_at_exit():
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", "json", stream=first, batched=True)

    async def main() -> None:
        structlog.get_logger("sbc.test").info("kept")
        configure_logging("info", "json", stream=second)  # the old setup's lines go first
        assert [line["event"] for line in _lines(first)] == ["kept"]
        structlog.get_logger("sbc.test").info("new")
        assert [line["event"] for line in _lines(second)] == ["new"]  # not batched
        configure_logging("info", "json", stream=first, batched=True)
        structlog.get_logger("sbc.test").info("at exit")
        sbc_logging._flush_at_exit()
        assert [line["event"] for line in _lines(first)] == ["kept", "at exit"]

    asyncio.run(main())


def test_the_fast_level_methods_write_what_structlogs_own_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bound logger's level methods skip structlog's frames for the one-step JSON line:
    the same line as structlog's own methods, for every level method and argument shape."""
    monkeypatch.setattr(time, "time_ns", lambda: 1_765_051_716_000_000_000)
    out = io.StringIO()
    configure_logging("debug", "json", stream=out)
    log = structlog.get_logger("sbc.test").bind(call_uuid="u1", leg="caller")
    general = structlog.make_filtering_bound_logger(logging.DEBUG)
    assert type(log).__mro__[1] is general and type(log).info is not general.info
    for name in ("debug", "info", "msg", "warning", "warn", "error", "critical", "fatal"):
        for args, kw in (((), {}), ((), {"leg": "agent", "n": 2}), (("x",), {"k": 1})):
            event = "event %s" if args else "event"
            getattr(log, name)(event, *args, **kw)
            ours = out.getvalue()
            out.seek(0)
            out.truncate()
            getattr(type(log).__mro__[1], name)(log, event, *args, **kw)
            assert ours == out.getvalue() != ""
            out.seek(0)
            out.truncate()
    configure_logging("warning", "json", stream=out)
    structlog.get_logger("sbc.test").info("filtered")  # below the threshold: structlog's no-op
    assert out.getvalue() == ""


def test_a_chain_other_than_the_json_line_takes_structlogs_own_methods():
    configure_logging("info", "json", stream=io.StringIO())
    with structlog.testing.capture_logs() as captured:
        structlog.get_logger("sbc.test").bind(call_uuid="u1").info("captured", n=1)
    assert captured == [{"call_uuid": "u1", "n": 1, "event": "captured", "log_level": "info"}]


@pytest.mark.parametrize(
    "context",
    [
        {},
        {"call_uuid": "u1", "route": "default", "pbx_call_id": "a@b", "retell_call_id": "c"},
        {"s": 'Zoë ☎ \x00 "q" \\', "i": -(2**70), "f": 1.5, "nan": float("nan"), "t": True},
        {"none": None, "surrogate": "Zo\udceb", "neg": -0.0},
        {"thing": _Thing(), "after": 1},  # not plain: encoded at each line
        {"nested": [1, {"k": "v"}]},
        {"level": "bound"},  # a key the line writes: encoded at each line
        {3: "int key"},
    ],
)
@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"reason": "bye", "pbx_status": 200, "talked": 1.002},
        {"call_uuid": "own"},  # a field overriding the context's
        {"timestamp": "mine", "logger": "mine"},
        {"x": _Structured()},
        {"stack_info": True},
    ],
)
def test_a_bound_context_encoded_once_writes_the_same_lines(
    monkeypatch: pytest.MonkeyPatch, context: dict[Any, Any], fields: dict[str, Any]
) -> None:
    """A bound logger keeps its context's JSON from its first line; every line must still be
    the one structlog's own method writes, whatever the context and the fields."""
    monkeypatch.setattr(time, "time_ns", lambda: 1_765_051_716_352_034_999)
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    log = structlog.get_logger("sbc.test")
    if any(type(key) is not str for key in context):
        log = log.bind()
        log._context.update(context)  # as structlog would keep it; bind() takes str keys
    else:
        log = log.bind(**context)
    general: Any = type(log).__mro__[1]
    for _ in range(2):  # the first line finds the context's JSON, the second reuses it
        for method in ("info", "warning"):
            log_line = _take(out, lambda m=method: getattr(log, m)("event", **fields))
            want = _take(out, lambda m=method: getattr(general, m)(log, "event", **fields))
            if "stack_info" in fields:
                # The general chain: the stack names the calling line, TimeStamper reads
                # datetime.now(): compare the rest.
                ours, theirs = json.loads(log_line), json.loads(want)
                for key in ("stack", "timestamp"):
                    ours.pop(key)
                    theirs.pop(key)
                assert list(ours.items()) == list(theirs.items())
            else:
                assert log_line == want
    child = log.bind(leg="caller")  # a child logger: the parent's context and its own
    if log._sbc_context_json[0] is not None:  # the child starts with the parent's JSON
        assert child._sbc_context_json[1] == len(child._context)
    assert (
        _take(out, lambda: child.info("event", **fields))
        == _take(out, lambda: general.info(child, "event", **fields))
        or "stack_info" in fields
    )


def _take(out: io.StringIO, write: Any) -> Any:
    write()
    text = out.getvalue()
    out.seek(0)
    out.truncate()
    assert text.count("\n") == 1
    return text


def test_a_context_changed_after_its_first_line_is_encoded_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(time, "time_ns", lambda: 1_765_051_716_000_000_000)
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    log = structlog.get_logger("sbc.test").bind(a=1, b="two")
    log.info("first")
    smaller = log.unbind("a")  # unbind deletes from a fresh copy's context
    smaller.info("second")
    log.try_unbind("b").info("third")
    log.info("fourth")
    fresh = log.new(c=3)  # new() clears log's own context in place
    fresh.info("fifth")
    log.info("sixth")
    rebound = fresh.bind(c=30, g=7)  # a key bound again keeps its place, with its new value
    rebound.info("rebound")
    structlog.contextvars.bind_contextvars(request="r1")  # merged after the fields
    log.bind(d=4).info("seventh", e=5)
    lines = _lines(out)
    assert lines.pop(6)["c"] == 30
    assert [list(line)[:-3] for line in lines] == [
        ["a", "b", "event"],
        ["b", "event"],
        ["a", "event"],
        ["a", "b", "event"],
        ["c", "event"],
        ["event"],
        ["d", "e", "event", "request"],
    ]
    assert lines[0]["b"] == "two" and lines[4]["c"] == 3 and lines[6]["request"] == "r1"


def test_the_stamps_text_per_logger_is_bounded_and_every_line_keeps_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The logger's name and level as JSON are kept per logger (round 6): past the bound, a
    name is encoded at each line; either way the line is structlog's own."""
    monkeypatch.setattr(time, "time_ns", lambda: 1_765_051_716_000_000_000)
    monkeypatch.setattr(sbc_logging, "_TAILS_MAX", 3)
    monkeypatch.setattr(sbc_logging, "_TAILS", {})
    structlog.contextvars.clear_contextvars()  # (cleared: the lines take the fast way)
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    for n in range(6):
        log = structlog.get_logger(f'sbc.n{n} "é"').bind(call_uuid=f"u{n}")
        general: Any = type(log).__mro__[1]
        for _ in range(2):
            ours = _take(out, lambda log=log, n=n: log.warning("event", n=n))
            want = _take(out, lambda log=log, g=general, n=n: g.warning(log, "event", n=n))
            assert ours == want
    assert len(sbc_logging._TAILS) == 3


def test_a_circular_field_of_a_bound_logger_fails_as_json_dumps_does() -> None:
    """The shared encoder of the bound logger's lines keeps no markers: a circular value goes
    to the general chain, which refuses it as before, and the next line is written."""
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    log = structlog.get_logger("sbc.test").bind(call_uuid="u1")
    circular: dict[str, Any] = {}
    circular["self"] = circular
    with pytest.raises(ValueError, match="Circular reference"):
        log.info("loop", value=circular)
    log.info("after", value={"deep": [1, 2]})
    (line,) = _lines(out)
    assert line["value"] == {"deep": [1, 2]} and line["call_uuid"] == "u1"


def test_a_line_under_a_context_variable_of_another_library_takes_the_fast_way() -> None:
    """Only structlog's context variables send a line the general way; others are not its."""
    import contextvars

    other: contextvars.ContextVar[str] = contextvars.ContextVar("other_library")
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    log = structlog.get_logger("sbc.test").bind(call_uuid="u1")

    def write() -> None:
        other.set("x")
        log.info("event", n=1)

    contextvars.copy_context().run(write)
    (line,) = _lines(out)
    assert list(line) == ["call_uuid", "n", "event", "logger", "level", "timestamp"]
