"""Round 7 of issue 12 (cpu): what replaced per-call work keeps its behaviour.

* ``hang_up_all``'s limit (the branch replaced ``asyncio.timeout`` by a shared timer; the
  merge kept ``asyncio.timeout``, and these tests of what either must do): the wait ends at
  the limit, the limit's cancellation is taken back, another cancellation goes through.
* A leg's in-dialog Via: no branch drawn for the Via that ``Dialog.create_request`` gives
  its own branch (``make_via(..., branch=...)``), and the Via parsed the same.
* A log line does not walk the context while structlog has made no context variable.
* ``call_id`` reads the lookup keys inline: what ``Headers.get`` gives.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
from typing import Any, cast

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from sbc.b2bua.leg import Leg, LegState, hang_up_all
from sbc.net.addresses import TransportConfig
from sbc.net.engine import SipEngine
from sbc.ops import logging as sbc_logging
from sbc.ops.logging import configure_logging
from sbc.sip.errors import BadRequest
from sbc.sip.fields import parse_via
from sbc.sip.headers import Headers
from sbc.sip.ids import BRANCH_COOKIE
from sbc.sip.message import Request, Response
from sbc.sip.uri import parse_uri


class _Leg:
    """What hang_up_all uses of a leg: ``up``, ``state``, ``hang_up()``, ``ended()``."""

    def __init__(self, forever: bool = False) -> None:
        self.up = True
        self.state = LegState.CONFIRMED
        self.forever = forever
        self.ends = 0

    async def hang_up(self) -> None:
        if self.forever:  # a BYE nobody answers, and no transaction timeout either
            await asyncio.Event().wait()
        self.up = False

    def ended(self) -> None:
        self.ends += 1
        self.up = False
        self.state = LegState.ENDED


def _legs(*legs: _Leg) -> list[Leg]:
    return cast(list[Leg], list(legs))


async def test_hang_up_all_ends_at_the_limit_and_takes_its_cancellation_back() -> None:
    stuck, done = _Leg(forever=True), _Leg()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await hang_up_all(_legs(stuck, done), 0.05)  # returns: the limit is not an error
    assert loop.time() - started >= 0.05
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # nothing left to cancel this task
    assert stuck.ends == 1 and done.ends == 1
    await asyncio.sleep(0)  # and the task is not cancelled at its next await
    # One leg, the usual case, bounded the same way.
    again = _Leg(forever=True)
    await hang_up_all(_legs(again), 0.02)
    assert again.ends == 1 and task.cancelling() == 0


async def test_hang_up_all_lets_another_cancellation_through() -> None:
    stuck = _Leg(forever=True)
    waiting = asyncio.ensure_future(hang_up_all(_legs(stuck), 60.0))
    await asyncio.sleep(0)  # it runs up to the BYE's wait
    waiting.cancel()  # the call's task cancelled from outside: not the limit's doing
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_a_cancellation_beside_the_expired_limit_still_cancels() -> None:
    # The limit passes and the task is cancelled by someone else in the same pass:
    # asyncio.timeout raises CancelledError then (uncancel() leaves one), so does this.
    stuck = _Leg(forever=True)

    async def both() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        loop.call_at(loop.time() + 0.03, task.cancel)
        await hang_up_all(_legs(stuck), 0.03)

    with pytest.raises(asyncio.CancelledError):
        await asyncio.ensure_future(both())


# -- a leg's in-dialog Via -----------------------------------------------------------------


def test_make_via_with_a_given_branch_draws_none() -> None:
    engine = SipEngine(TransportConfig(bind="127.0.0.1", port=5060, tls_port=5061))
    for transport, host in (("udp", "UDP 127.0.0.1:5060"), ("tls", "TLS 127.0.0.1:5061")):
        given = engine.make_via(transport, branch=BRANCH_COOKIE)
        assert given == f"SIP/2.0/{host};branch={BRANCH_COOKIE};rport"
        drawn = engine.make_via(transport)
        assert re.fullmatch(rf"SIP/2\.0/{host};branch=z9hG4bK[0-9a-f]{{24}};rport", drawn)
        # What the dialog makes of either (it gives the Via its branch): the same Via.
        assert parse_via(given).with_param("branch", "z9hG4bKx") == parse_via(drawn).with_param(
            "branch", "z9hG4bKx"
        )
        assert given.partition(";branch=")[0] == drawn.partition(";branch=")[0]


# -- log lines: structlog's context variables ----------------------------------------------


def test_a_line_walks_the_context_only_once_structlog_made_a_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While structlog has made no context variable (none is bound on a call's path), a line
    does not copy and walk the context: nothing could be merged. Once one is made, lines
    merge it as structlog's chain does."""
    made: dict[str, Any] = {}  # structlog's table of its variables, empty as at start-up
    monkeypatch.setattr(structlog.contextvars, "_CONTEXT_VARS", made)
    monkeypatch.setattr(sbc_logging, "_STRUCTLOG_VARS", made)
    walks: list[int] = []
    copy = sbc_logging._copy_context

    def counted() -> Any:
        walks.append(1)
        return copy()

    monkeypatch.setattr(sbc_logging, "_copy_context", counted)
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    log = structlog.get_logger("sbc.test").bind(call_uuid="u1")
    log.info("first", n=1)
    assert walks == []
    structlog.contextvars.bind_contextvars(request="r1")  # a variable made: walked from now on
    try:
        log.info("second", n=2)
    finally:
        structlog.contextvars.clear_contextvars()
    assert walks
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert list(first)[:3] == ["call_uuid", "n", "event"] and "request" not in first
    assert second["request"] == "r1" and list(second)[:4] == ["call_uuid", "n", "event", "request"]


# -- the Call-ID read inline -----------------------------------------------------------------


@given(
    st.lists(
        st.tuples(st.sampled_from(["Call-ID", "i", "call-id", "CALL-ID", "Via", "X"]), st.text()),
        max_size=4,
    ),
    st.booleans(),
    st.booleans(),
)
def test_call_id_read_inline_is_headers_get(
    pairs: list[tuple[str, str]], response: bool, keys_known: bool
) -> None:
    """``call_id`` reads the lookup keys itself: the value ``Headers.get("Call-ID")`` gives
    (compact form and any spelling included), or the same error when there is none."""
    headers = Headers(pairs)
    if keys_known:
        headers.get("Via")  # the lookup keys made by an earlier read, as usual
    message: Request | Response = (
        Response(200, "OK", headers) if response else Request("BYE", parse_uri("sip:u@h"), headers)
    )
    want = Headers(pairs).get("Call-ID")
    if want is None:
        with pytest.raises(BadRequest, match="missing Call-ID"):
            _ = message.call_id
    else:
        assert message.call_id == want
