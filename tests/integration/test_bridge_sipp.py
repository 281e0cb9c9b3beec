"""The bridge end to end: SIPp as 3CX (registrar and caller) and SIPp as Retell (over TCP).

Each test starts its own sbc (the app's :class:`~sbc.ops.service.Service`, in this process) on
127.0.0.22, SIPp "3CX" on 127.0.0.21 and SIPp "Retell" on 127.0.0.23, so that the Retell side
can check by address that nothing of the PBX leg reached it. The scenarios in
``sip-fixtures/sipp`` do the checking on the wire (``check_it`` / ``check_it_inverse``); the
tests assert both SIPp's exit status and their counts of successful and failed calls, and the
bridge's own call records.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from bridge_helpers import (
    EXTENSION,
    RETELL,
    STRANGER,
    assert_both_ends,
    final_statuses,
    pbx_call,
    retell,
    running_bridge,
)
from peers import free_port

from sbc.b2bua.events import CallEvent, CallStarted
from sbc.ops.settings import SecuritySettings

pytestmark = pytest.mark.integration


# -- the checks of the issue ---------------------------------------------------------------------


async def test_fifty_calls_bridged_with_headers(tmp_path: Path) -> None:
    async with running_bridge(tmp_path) as bridge:
        far = await retell(tmp_path, bridge, "retell_uas.xml", calls=50)
        near = await pbx_call(
            tmp_path, bridge, "pbx_caller.xml", calls=50, extra=("-r", "10", "-d", "1000")
        )
        pbx_result = await near.finish(60)
        retell_result = await far.finish(30)
        assert_both_ends("3CX", pbx_result, near, 50)
        assert_both_ends("Retell", retell_result, far, 50)
        await bridge.settled()
        records = bridge.calls.records
        assert len(records) == 50
        assert {r.pbx_status for r in records} == {200}
        assert {r.retell_status for r in records} == {200}
        assert {r.end_reason for r in records} == {"pbx_bye"}
        assert all(r.caller == "+442071234567" and r.called == EXTENSION for r in records)
        assert len({r.call_uuid for r in records}) == 50


async def test_cancel_before_answer(tmp_path: Path) -> None:
    async with running_bridge(tmp_path) as bridge:
        far = await retell(tmp_path, bridge, "retell_uas_cancel.xml")
        near = await pbx_call(tmp_path, bridge, "pbx_cancel.xml")
        assert_both_ends("3CX", await near.finish(20), near, 1)
        assert_both_ends("Retell", await far.finish(20), far, 1)
        await bridge.settled()
        (record,) = bridge.calls.records
        assert (record.pbx_status, record.retell_status) == (487, 487)
        assert record.end_reason == "pbx_cancel"


async def test_bye_from_retell_ends_the_pbx_leg(tmp_path: Path) -> None:
    async with running_bridge(tmp_path) as bridge:
        far = await retell(tmp_path, bridge, "retell_uas_bye.xml", extra=("-d", "500"))
        near = await pbx_call(tmp_path, bridge, "pbx_wait_bye.xml")
        assert_both_ends("3CX", await near.finish(20), near, 1)
        assert_both_ends("Retell", await far.finish(20), far, 1)
        await bridge.settled()
        (record,) = bridge.calls.records
        assert record.end_reason == "retell_bye"


@pytest.mark.parametrize(
    ("scenario", "expected"),
    [
        ("retell_reject_486.xml", 486),
        ("retell_reject_603.xml", 603),
        ("retell_reject_404.xml", 480),
    ],
)
async def test_retell_refusal_is_mapped(tmp_path: Path, scenario: str, expected: int) -> None:
    async with running_bridge(tmp_path) as bridge:
        far = await retell(tmp_path, bridge, scenario)
        near = await pbx_call(tmp_path, bridge, "pbx_rejected.xml")
        assert_both_ends("3CX", await near.finish(20), near, 1)
        assert_both_ends("Retell", await far.finish(20), far, 1)
        assert final_statuses(near.messages()) == [expected]
        await bridge.settled()
        (record,) = bridge.calls.records
        assert record.pbx_status == expected


async def test_retell_never_answering_gets_the_pbx_a_final_response(tmp_path: Path) -> None:
    answer_timeout = 2.0
    async with running_bridge(tmp_path, answer_timeout=answer_timeout) as bridge:
        far = await retell(tmp_path, bridge, "retell_uas_cancel.xml")
        near = await pbx_call(tmp_path, bridge, "pbx_rejected.xml")
        result = await near.finish(20)
        assert_both_ends("3CX", result, near, 1)
        assert_both_ends("Retell", await far.finish(20), far, 1)
        assert final_statuses(near.messages()) == [480]
        # The SIPp run covers INVITE to final response plus its own start and ACK.
        assert answer_timeout - 0.1 <= result.elapsed <= answer_timeout + 1.0
        await bridge.settled()
        (record,) = bridge.calls.records
        assert record.end_reason == "answer_timeout"


async def test_retell_unreachable_is_503_fast(tmp_path: Path) -> None:
    closed_port = free_port(RETELL)  # nothing listens there: TCP connect is refused
    async with running_bridge(tmp_path, retell_port=closed_port) as bridge:
        near = await pbx_call(tmp_path, bridge, "pbx_rejected.xml")
        result = await near.finish(20)
        assert_both_ends("3CX", result, near, 1)
        assert final_statuses(near.messages()) == [503]
        assert result.elapsed < 2.0
        await bridge.settled()


async def test_hold_and_refresh_are_absorbed(tmp_path: Path) -> None:
    async with running_bridge(tmp_path) as bridge:
        # retell_uas.xml expects only ACK and BYE after its 200: a forwarded re-INVITE or
        # UPDATE would fail its call.
        far = await retell(tmp_path, bridge, "retell_uas.xml")
        near = await pbx_call(tmp_path, bridge, "pbx_hold.xml", extra=("-d", "300"))
        assert_both_ends("3CX", await near.finish(20), near, 1)
        assert_both_ends("Retell", await far.finish(20), far, 1)
        assert "UPDATE sip:" not in far.messages()
        assert far.messages().count("INVITE sip:") == 1
        await bridge.settled()


async def test_untrusted_source_and_other_extension_create_nothing(tmp_path: Path) -> None:
    connections: list[object] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer.get_extra_info("peername"))
        writer.close()

    # Reject mode: the stranger is answered 403 (the default, drop, answers nothing at all:
    # tests/integration/test_edge_guard.py).
    async with running_bridge(tmp_path, security=SecuritySettings(untrusted="reject")) as bridge:
        server = await asyncio.start_server(accept, RETELL, bridge.retell_port)
        try:
            stranger = await pbx_call(tmp_path, bridge, "pbx_rejected.xml", local_ip=STRANGER)
            assert_both_ends("stranger", await stranger.finish(20), stranger, 1)
            other = await pbx_call(tmp_path, bridge, "pbx_rejected.xml", extension="999")
            assert_both_ends("other extension", await other.finish(20), other, 1)
        finally:
            server.close()
            await server.wait_closed()
        assert final_statuses(stranger.messages()) == [403]
        assert final_statuses(other.messages()) == [404]
        assert connections == []
        assert bridge.calls.active == 0
        assert bridge.calls.records == []


async def test_no_common_codec_is_488_before_retell(tmp_path: Path) -> None:
    async with running_bridge(tmp_path) as bridge:
        near = await pbx_call(tmp_path, bridge, "pbx_g729.xml")
        assert_both_ends("3CX", await near.finish(20), near, 1)
        assert final_statuses(near.messages()) == [488]
        await bridge.settled()
        (record,) = bridge.calls.records
        assert (record.pbx_status, record.retell_status) == (488, None)


async def test_bye_to_3cx_answers_its_challenge(tmp_path: Path) -> None:
    async with running_bridge(tmp_path) as bridge:
        far = await retell(tmp_path, bridge, "retell_uas_bye.xml", extra=("-d", "300"))
        near = await pbx_call(tmp_path, bridge, "pbx_wait_bye_auth.xml")
        assert_both_ends("3CX", await near.finish(20), near, 1)
        assert_both_ends("Retell", await far.finish(20), far, 1)
        byes = re.findall(r"\nBYE sip:[^\n]*\n(?:[^\n]+\n)*?CSeq: (\d+) BYE", near.messages())
        assert len(byes) == 2 and int(byes[1]) == int(byes[0]) + 1


async def test_max_duration_ends_both_legs(tmp_path: Path) -> None:
    async with running_bridge(tmp_path, max_duration=1.0) as bridge:
        far = await retell(tmp_path, bridge, "retell_uas.xml")
        near = await pbx_call(tmp_path, bridge, "pbx_wait_bye.xml")
        assert_both_ends("3CX", await near.finish(20), near, 1)
        assert_both_ends("Retell", await far.finish(20), far, 1)
        await bridge.settled()
        (record,) = bridge.calls.records
        assert record.end_reason == "max_duration"
        assert record.answered is not None
        assert 1.0 <= record.ended - record.answered < 2.5


def first_call(started: asyncio.Future[str]) -> Callable[[CallEvent], None]:
    """A call observer that resolves ``started`` with the first call's uuid."""

    def observe(event: CallEvent) -> None:
        if isinstance(event, CallStarted) and not started.done():
            started.set_result(event.call_uuid)

    return observe


async def test_over_capacity_is_503_with_retry_after(tmp_path: Path) -> None:
    async with running_bridge(tmp_path, max_concurrent=1) as bridge:
        started: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        bridge.calls.events.subscribe(first_call(started))
        far = await retell(tmp_path, bridge, "retell_uas_bye.xml", extra=("-d", "2000"))
        first = await pbx_call(tmp_path, bridge, "pbx_wait_bye.xml")
        async with asyncio.timeout(5):
            call_uuid = await started
            await bridge.calls.calls[call_uuid].up.wait()
        second = await pbx_call(tmp_path, bridge, "pbx_rejected.xml")
        assert_both_ends("second", await second.finish(20), second, 1)
        assert final_statuses(second.messages()) == [503]
        assert re.search(r"\nRetry-After: 30\r?\n", second.messages())  # calls.retry_after
        assert_both_ends("first", await first.finish(20), first, 1)
        assert_both_ends("Retell", await far.finish(20), far, 1)
        await bridge.settled()
        assert len(bridge.calls.records) == 1


async def test_cancel_crossing_retells_200_ends_with_ack_and_bye(tmp_path: Path) -> None:
    async with running_bridge(tmp_path) as bridge:
        far = await retell(tmp_path, bridge, "retell_uas_cancel_race.xml")
        near = await pbx_call(tmp_path, bridge, "pbx_cancel.xml")
        assert_both_ends("3CX", await near.finish(20), near, 1)
        assert_both_ends("Retell", await far.finish(20), far, 1)
        await bridge.settled()
        (record,) = bridge.calls.records
        assert (record.pbx_status, record.retell_status) == (487, 200)
        assert record.end_reason == "pbx_cancel"
