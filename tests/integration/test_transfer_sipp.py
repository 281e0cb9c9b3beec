"""Transfers end to end (issue 9's SIPp checks): SIPp as 3CX (registrar and caller, UDP) and
SIPp as Retell (TCP), a real sbc between them, relay media, ``[transfer] mode = "refer"``.

* refer mode: Retell REFERs the caller to the target name ``sales``; 3CX gets a REFER to
  ``<sip:800@PBX>``, challenges it, takes it, reports NOTIFY 200; Retell hears 202, NOTIFY
  100, NOTIFY 200 (in that order); every leg ends with an answered BYE.
* refer mode, the target is busy: Retell hears NOTIFY 100 then NOTIFY 486, the caller stays
  with the agent until it hangs up.
* a target outside ``[transfer] allow``: 202 then NOTIFY 403 at once, nothing reaches 3CX.
* a 401/407 from Retell on sbc's INVITE: answered with ``retell.auth_username`` and
  ``auth_password``; without them, 480 to 3CX.

The scenarios in ``sip-fixtures/sipp`` check each message on the wire; the tests also read
both message traces (order, headers, digests) and the bridge's call records. After every test
the bridge holds nothing: no call, no SIP transaction, no RTP port (``Bridge.drained``).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from bridge_helpers import (
    EXTENSION,
    Bridge,
    assert_both_ends,
    final_statuses,
    pbx_call,
    retell,
    running_bridge,
)
from sipp_helpers import Sipp, TracedMessage

from sbc.b2bua.events import CallRecord
from sbc.ops.settings import MediaSettings, TransferSettings
from sbc.sip.message import Request, Response

pytestmark = pytest.mark.integration

# T1, T2, T4 of sbc: short, so that its UDP transactions with "3CX" end (Timer J: 64*T1)
# within a few seconds of the call, when every test checks that none is left.
T1 = 0.1
TIMERS = (T1, 1.0, 0.5)
DRAIN = 64 * T1 + 5.0
RELAY = MediaSettings(mode="relay")
REFER_MODE = TransferSettings(
    mode="refer", allow=re.compile(r"^8[0-9]{2}$"), targets={"sales": "800"}
)
RETELL_AUTH = ("retell-trunk", "trunk-secret")  # what retell_uas_challenge.xml expects
REFER_AFTER_MS = "300"  # Retell's REFER this long after its ACK: the call is connected
TALK_MS = 1500  # how long the caller stays after a failed transfer before hanging up
SIPFRAG = "message/sipfrag;version=2.0"


@contextlib.asynccontextmanager
async def transfer_bridge(
    workdir: Path,
    *,
    transfer: TransferSettings = REFER_MODE,
    retell_auth: tuple[str, str] | None = None,
) -> AsyncIterator[Bridge]:
    """The bridge for these tests (relay media, short timers); once the test's body passed,
    it must be drained: 0 calls, 0 transactions, 0 RTP ports."""
    async with running_bridge(
        workdir, media=RELAY, transfer=transfer, retell_auth=retell_auth, timers=TIMERS
    ) as bridge:
        yield bridge
        await bridge.drained(DRAIN)


# -- reading the traces --------------------------------------------------------------------------


def traffic(sipp: Sipp) -> list[TracedMessage]:
    """SIPp's message trace without retransmissions (a message seen again with the same
    direction, top Via, CSeq and start line: UDP resends it)."""
    seen: set[tuple[object, ...]] = set()
    out: list[TracedMessage] = []
    for traced in sipp.traced():
        message = traced.message
        start = message.method if isinstance(message, Request) else message.status
        key = (traced.received, message.headers.get("Via"), message.headers.get("CSeq"), start)
        if key not in seen:
            seen.add(key)
            out.append(traced)
    return out


def label(message: Request | Response) -> str:
    """``INVITE``, ``202 REFER``, ``NOTIFY SIP/2.0 100 Trying`` (a NOTIFY with its sipfrag)."""
    if isinstance(message, Response):
        return f"{message.status} {message.cseq.method}"
    if message.method == "NOTIFY":
        return f"NOTIFY {message.body.decode().splitlines()[0]}"
    return message.method


def received(sipp: Sipp) -> list[str]:
    """What SIPp received from sbc, in order, as :func:`label` writes it; provisional
    responses left out (a 100 Trying comes or not depending on timing)."""
    return [
        label(m.message)
        for m in traffic(sipp)
        if m.received and not (isinstance(m.message, Response) and m.message.status < 200)
    ]


def requests(sipp: Sipp, method: str, *, came: bool = True) -> list[TracedMessage]:
    """``method`` requests SIPp received (``came``) or sent, in order."""
    return [
        m
        for m in traffic(sipp)
        if m.received is came and isinstance(m.message, Request) and m.message.method == method
    ]


def answered(sipp: Sipp, method: str, *, by_sipp: bool) -> list[int]:
    """Statuses of the final responses to ``method`` that SIPp sent (``by_sipp``) or got."""
    return [
        m.message.status
        for m in traffic(sipp)
        if isinstance(m.message, Response)
        and m.message.cseq.method == method
        and m.message.status >= 200
        and m.received is not by_sipp
    ]


def header(message: Request | Response, name: str) -> str:
    value = message.headers.get(name)
    assert value is not None, f"no {name} in {label(message)}"
    return value


def notifies(sipp: Sipp) -> list[Request]:
    return [m.request for m in requests(sipp, "NOTIFY")]


def assert_refer_notify(notify: Request, sipfrag: str, *, final: bool) -> None:
    """A NOTIFY for Retell's REFER (RFC 3515 §2.4.4, RFC 3420), as the issue asks for."""
    headers = notify.headers
    assert headers.get("Event") == "refer"
    assert headers.get("Content-Type") == SIPFRAG
    state = headers.get("Subscription-State") or ""
    if final:
        assert state == "terminated;reason=noresource"
    else:
        assert state.split(";")[0] == "active"
    assert notify.body.decode().splitlines()[0] == sipfrag


def last_record(bridge: Bridge) -> CallRecord:
    (record,) = bridge.calls.records
    return record


# -- refer mode ----------------------------------------------------------------------------------


async def test_refer_mode_hands_the_caller_to_3cx(tmp_path: Path) -> None:
    async with transfer_bridge(tmp_path) as bridge:
        far = await retell(tmp_path, bridge, "retell_uas_refer.xml", extra=("-d", REFER_AFTER_MS))
        near = await pbx_call(tmp_path, bridge, "pbx_refer_target.xml")
        assert_both_ends("3CX", await near.finish(30), near, 1)
        assert_both_ends("Retell", await far.finish(30), far, 1)
        await bridge.settled()

        # 3CX: the REFER, challenged, then again with the extension's credentials.
        first, second = (m.request for m in requests(near, "REFER"))
        for refer in (first, second):
            assert re.fullmatch(r"<sip:800@127\.0\.0\.21(:[0-9]+)?>", header(refer, "Refer-To"))
            assert refer.headers.get("Referred-By") == f"<sip:{EXTENSION}@127.0.0.21>"
            assert refer.call_id == near.traced()[0].message.call_id
        assert "Proxy-Authorization" not in first.headers
        assert second.cseq.seq > first.cseq.seq
        auth = second.headers.get("Proxy-Authorization") or ""
        assert re.match(r'Digest .*username="6001auth"', auth), auth
        assert answered(near, "REFER", by_sipp=True) == [407, 202]
        # 3CX's NOTIFY 200 answered, then sbc leaves the PBX dialog (RFC 5589 §6.1).
        assert answered(near, "NOTIFY", by_sipp=False) == [200]
        assert received(near) == ["200 INVITE", "REFER", "REFER", "200 NOTIFY", "BYE"]
        assert answered(near, "BYE", by_sipp=True) == [200]

        # Retell: 202, NOTIFY 100, NOTIFY 200 in that order, then its own BYE answered.
        assert received(far) == [
            "INVITE",
            "ACK",
            "202 REFER",
            "NOTIFY SIP/2.0 100 Trying",
            "NOTIFY SIP/2.0 200 OK",
            "200 BYE",
        ]
        trying, done = notifies(far)
        assert_refer_notify(trying, "SIP/2.0 100 Trying", final=False)
        assert_refer_notify(done, "SIP/2.0 200 OK", final=True)
        assert requests(far, "BYE", came=False)  # Retell hangs up, as it does after success

        record = last_record(bridge)
        assert record.end_reason == "transferred"
        (transfer,) = record.transfers
        assert (transfer.target, transfer.mode, transfer.outcome, transfer.status) == (
            "800",
            "refer",
            "transferred",
            200,
        )


async def test_refer_mode_busy_target_keeps_the_caller_with_the_agent(tmp_path: Path) -> None:
    async with transfer_bridge(tmp_path) as bridge:
        far = await retell(
            tmp_path,
            bridge,
            "retell_uas_refer_fail.xml",
            extra=("-d", REFER_AFTER_MS, "-s", "sales"),
        )
        near = await pbx_call(tmp_path, bridge, "pbx_refer_busy.xml", extra=("-d", str(TALK_MS)))
        assert_both_ends("3CX", await near.finish(30), near, 1)
        assert_both_ends("Retell", await far.finish(30), far, 1)
        await bridge.settled()

        # 3CX's own NOTIFY 100 is not relayed as a second one: exactly 100, then 486.
        assert received(far) == [
            "INVITE",
            "ACK",
            "202 REFER",
            "NOTIFY SIP/2.0 100 Trying",
            "NOTIFY SIP/2.0 486 Busy Here",
            "BYE",
        ]
        trying, busy = notifies(far)
        assert_refer_notify(trying, "SIP/2.0 100 Trying", final=False)
        assert_refer_notify(busy, "SIP/2.0 486 Busy Here", final=True)
        assert answered(far, "BYE", by_sipp=True) == [200]
        # Nobody hung up until the caller did: sbc sent no BYE to 3CX, and Retell's BYE
        # follows the caller's, TALK_MS after the failure.
        assert received(near) == [
            "200 INVITE",
            "REFER",
            "REFER",
            "200 NOTIFY",
            "200 NOTIFY",
            "200 BYE",
        ]
        (caller_bye,) = requests(near, "BYE", came=False)
        (agent_bye,) = requests(far, "BYE")
        (failure,) = (m for m in requests(far, "NOTIFY") if "486" in m.request.body.decode())
        assert agent_bye.at >= caller_bye.at - 0.05  # two SIPp processes, one clock
        assert agent_bye.at - failure.at >= TALK_MS / 1000 - 0.2

        record = last_record(bridge)
        assert record.end_reason == "pbx_bye"
        (transfer,) = record.transfers
        assert (transfer.target, transfer.mode, transfer.outcome, transfer.status) == (
            "800",
            "refer",
            "failed",
            486,
        )


@pytest.mark.parametrize("mode", ["refer", "invite"])
async def test_target_not_allowed_is_refused_and_reaches_nothing(tmp_path: Path, mode: str) -> None:
    settings = REFER_MODE.model_copy(update={"mode": mode})
    async with transfer_bridge(tmp_path, transfer=settings) as bridge:
        far = await retell(
            tmp_path,
            bridge,
            "retell_uas_refer_fail.xml",
            extra=("-d", REFER_AFTER_MS, "-s", "+19005551234", "-set", "refused", "1"),
        )
        near = await pbx_call(tmp_path, bridge, "pbx_caller.xml", extra=("-d", str(TALK_MS)))
        assert_both_ends("3CX", await near.finish(30), near, 1)
        assert_both_ends("Retell", await far.finish(30), far, 1)
        await bridge.settled()

        assert received(far) == [
            "INVITE",
            "ACK",
            "202 REFER",
            "NOTIFY SIP/2.0 403 Forbidden",
            "BYE",
        ]
        (refused,) = notifies(far)
        assert_refer_notify(refused, "SIP/2.0 403 Forbidden", final=True)
        # 3CX saw the call and its end, no REFER and no new INVITE (the caller's SIPp would
        # get a REFER, the registrar's at pbx.host:pbx.port an INVITE for the target).
        assert received(near) == ["200 INVITE", "200 BYE"]
        assert set(received(bridge.registrar)) == {"REGISTER"}
        (caller_bye,) = requests(near, "BYE", came=False)
        (agent_bye,) = requests(far, "BYE")
        (failure,) = requests(far, "NOTIFY")
        assert agent_bye.at >= caller_bye.at - 0.05
        assert agent_bye.at - failure.at >= TALK_MS / 1000 - 0.2 - int(REFER_AFTER_MS) / 1000

        record = last_record(bridge)
        assert record.end_reason == "pbx_bye"
        (transfer,) = record.transfers
        assert (transfer.target, transfer.mode, transfer.outcome, transfer.status) == (
            "",
            mode,
            "refused",
            403,
        )


# -- Retell's challenge on sbc's INVITE ----------------------------------------------------------


def digest_params(value: str) -> dict[str, str]:
    scheme, _, rest = value.partition(" ")
    assert scheme == "Digest", value
    return {k.lower(): v for k, v in re.findall(r'([A-Za-z-]+)="?([^",]*)"?', rest)}


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


@pytest.mark.parametrize(
    ("status", "challenge", "answer"),
    [
        (407, "Proxy-Authenticate", "Proxy-Authorization"),
        (401, "WWW-Authenticate", "Authorization"),
    ],
)
async def test_retell_challenge_is_answered_with_the_trunk_credentials(
    tmp_path: Path, status: int, challenge: str, answer: str
) -> None:
    extra = ("-set", "www_authenticate", "1") if status == 401 else ()
    async with transfer_bridge(tmp_path, retell_auth=RETELL_AUTH) as bridge:
        far = await retell(tmp_path, bridge, "retell_uas_challenge.xml", extra=extra)
        near = await pbx_call(tmp_path, bridge, "pbx_caller.xml", extra=("-d", "300"))
        assert_both_ends("3CX", await near.finish(30), near, 1)
        assert_both_ends("Retell", await far.finish(30), far, 1)
        await bridge.settled()

        assert received(far) == ["INVITE", "ACK", "INVITE", "ACK", "BYE"]
        first, second = (m.request for m in requests(far, "INVITE"))
        (sent_challenge,) = (
            m.message
            for m in traffic(far)
            if not m.received and isinstance(m.message, Response) and m.message.status == status
        )
        # RFC 3261 §22.2: the same request again, CSeq + 1, in the same call and From tag.
        assert (second.call_id, second.from_tag) == (first.call_id, first.from_tag)
        assert second.cseq.seq == first.cseq.seq + 1
        assert second.top_via.branch != first.top_via.branch
        assert "Authorization" not in first.headers and "Proxy-Authorization" not in first.headers
        other = "Authorization" if answer == "Proxy-Authorization" else "Proxy-Authorization"
        assert other not in second.headers
        offered = digest_params(header(sent_challenge, challenge))
        given = digest_params(header(second, answer))
        username, password = RETELL_AUTH
        assert (given["username"], given["realm"], given["nonce"]) == (
            username,
            offered["realm"],
            offered["nonce"],
        )
        assert given["uri"] == str(second.uri)
        assert given.get("algorithm", "MD5").upper() == "MD5" and "qop" not in given
        ha1 = md5(f"{username}:{given['realm']}:{password}")
        ha2 = md5(f"INVITE:{given['uri']}")
        assert given["response"] == md5(f"{ha1}:{given['nonce']}:{ha2}")

        assert final_statuses(near.messages()) == [200, 200]  # the INVITE, then the BYE
        record = last_record(bridge)
        assert (record.pbx_status, record.retell_status, record.end_reason) == (
            200,
            200,
            "pbx_bye",
        )


async def test_retell_challenge_without_credentials_is_480(tmp_path: Path) -> None:
    async with transfer_bridge(tmp_path) as bridge:
        far = await retell(
            tmp_path, bridge, "retell_uas_challenge.xml", extra=("-set", "no_credentials", "1")
        )
        near = await pbx_call(tmp_path, bridge, "pbx_rejected.xml")
        assert_both_ends("3CX", await near.finish(30), near, 1)
        assert_both_ends("Retell", await far.finish(30), far, 1)
        await bridge.settled()

        assert received(far) == ["INVITE", "ACK"]  # one INVITE, its 407 ACKed, no retry
        assert final_statuses(near.messages()) == [480]
        record = last_record(bridge)
        assert (record.pbx_status, record.retell_status) == (480, 407)
