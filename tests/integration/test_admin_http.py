"""The admin HTTP endpoint of a real sbc (in this process) between SIPp "3CX" and SIPp "Retell":
``/metrics`` counts a test call (parsed with prometheus_client's own text parser), ``GET /calls``
shows a live call, ``DELETE /calls/{call_uuid}`` ends both legs with BYE, and a token, when set,
is required."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from bridge_helpers import (
    EXTENSION,
    PBX,
    RETELL,
    SBC,
    Bridge,
    assert_both_ends,
    pbx_call,
    retell,
    running_bridge,
)
from peers import free_port
from prometheus_client.parser import text_string_to_metric_families

from sbc.media.relay import RelayBackend, RelaySession
from sbc.ops.admin import AdminServer
from sbc.ops.metrics import Metrics
from sbc.ops.service import Service
from sbc.ops.settings import load_settings

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
RTP_SIZE = 172  # 12 bytes of RTP header, 20 ms of G.711


def relay(rtp_min: int) -> Any:
    from sbc.ops.settings import MediaSettings

    return MediaSettings(mode="relay", rtp_port_min=rtp_min, rtp_port_max=rtp_min + 19)


def url(bridge: Bridge, path: str) -> str:
    address = bridge.service.admin.address
    assert address is not None
    return f"http://{address[0]}:{address[1]}{path}"


async def scrape(bridge: Bridge) -> tuple[Samples, set[str]]:
    """The bridge's /metrics, parsed back: samples by (name, labels), and the family names."""
    async with aiohttp.ClientSession() as http, http.get(url(bridge, "/metrics")) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    families = list(text_string_to_metric_families(text))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples
    }
    return samples, {f.name for f in families}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def live_calls(bridge: Bridge) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(url(bridge, "/calls")) as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
    calls: list[dict[str, Any]] = body["calls"]
    return calls


async def connected_call(bridge: Bridge, limit: float = 10.0) -> dict[str, Any]:
    """The one call of the bridge, once both legs are confirmed (seen through GET /calls)."""
    async with asyncio.timeout(limit):
        while True:
            calls = await live_calls(bridge)
            if len(calls) == 1 and calls[0]["state"] == "connected":
                return calls[0]
            await asyncio.sleep(0.05)  # polling the API is what is tested


def rtp_packet(seq: int, ssrc: int) -> bytes:
    header = struct.pack("!BBHII", 0x80, 8, seq, seq * 160, ssrc)  # PCMA, 20 ms per packet
    return header + b"\xd5" * (RTP_SIZE - 12)


def send_rtp(source_host: str, to: tuple[str, int], count: int, ssrc: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source_host, 0))
        for seq in range(count):
            sock.sendto(rtp_packet(seq, ssrc), to)


async def wait_for(condition: Any, limit: float = 5.0) -> None:
    async with asyncio.timeout(limit):
        while not await condition():  # noqa: ASYNC110 - metrics have no event to wait on
            await asyncio.sleep(0.05)


# -- /metrics counts a call ----------------------------------------------------------------------


async def test_metrics_count_a_test_call(tmp_path: Path) -> None:
    async with running_bridge(tmp_path, media=relay(34600)) as bridge:
        before, _ = await scrape(bridge)
        far = await retell(tmp_path, bridge, "retell_uas.xml")
        near = await pbx_call(tmp_path, bridge, "pbx_caller.xml", extra=("-d", "1500"))
        await connected_call(bridge)
        media = bridge.service.media
        assert isinstance(media, RelayBackend)
        (session,) = media.sessions
        assert isinstance(session, RelaySession)
        # Media from both sides while the call is up: 5 packets from 3CX, 3 from Retell.
        send_rtp(PBX, (SBC, session.port("a")), 5, ssrc=0x3C3C)
        send_rtp(RETELL, (SBC, session.port("b")), 3, ssrc=0xAEAE)

        async def media_counted() -> bool:
            during, _ = await scrape(bridge)
            return value(during, "sbc_rtp_packets_total", side="b", stream="rtp") >= 3 and (
                value(during, "sbc_rtp_packets_total", side="a", stream="rtp") >= 5
            )

        await wait_for(media_counted)
        during, _ = await scrape(bridge)
        assert value(during, "sbc_calls_active") == 1
        assert value(during, "sbc_rtp_ports_in_use") == 4  # two RTP/RTCP pairs for the call
        assert value(during, "sbc_rtp_ports_capacity") == 20
        assert_both_ends("3CX", await near.finish(20), near, 1)
        assert_both_ends("Retell", await far.finish(20), far, 1)
        await bridge.settled()

        async def call_counted() -> bool:
            after, _ = await scrape(bridge)
            return (
                value(after, "sbc_calls_ended_total", outcome="answered") == 1
                and value(after, "sbc_call_records_written_total") == 1
            )

        await wait_for(call_counted)
        after, families = await scrape(bridge)

    # Each new family is there.
    for family in (
        "sbc_build_info",
        "sbc_call_setup_seconds",
        "sbc_sip_requests",
        "sbc_sip_responses",
        "sbc_sip_retransmissions",
        "sbc_sip_transactions",
        "sbc_rtp_packets",
        "sbc_rtp_bytes",
        "sbc_rtp_ports_in_use",
        "sbc_retell_reachable",
        "sbc_call_events_dropped",
        "sbc_call_records_written",
        "sbc_call_records_dropped",
        "process_cpu_seconds",
        "python_info",
    ):
        assert family in families, family
    (build,) = [labels for name, labels in after if name == "sbc_build_info"]
    assert dict(build).keys() == {"version", "python"}

    # The call: INVITE, ACK and BYE from 3CX over UDP; sbc's INVITE, ACK and BYE to Retell over
    # TCP; 100, 180 and the two 200s (INVITE, BYE) each way.
    def d(name: str, **labels: str) -> float:
        return delta(after, before, name, **labels)

    for method in ("INVITE", "ACK", "BYE"):
        assert d("sbc_sip_requests_total", direction="in", method=method, transport="udp") == 1
        assert d("sbc_sip_requests_total", direction="out", method=method, transport="tcp") == 1
        assert d("sbc_sip_requests_total", direction="out", method=method, transport="udp") == 0
    for status, count in (("100", 1), ("180", 1), ("200", 2)):
        assert d("sbc_sip_responses_total", direction="in", status=status, transport="tcp") == count
        assert (
            d("sbc_sip_responses_total", direction="out", status=status, transport="udp") == count
        )
    assert d("sbc_sip_retransmissions_total") == 0
    # A gauge whose value depends on timers still running; value() reads a missing one as 0.
    assert ("sbc_sip_transactions", ()) in after
    assert d("sbc_calls_started_total") == 1
    assert d("sbc_call_setup_seconds_count") == 1
    assert 0 < d("sbc_call_setup_seconds_sum") < 5
    assert d("sbc_call_duration_seconds_count") == 1
    # The media: what each side sent, counted where it arrived; the ports went back.
    assert value(after, "sbc_rtp_packets_total", side="a", stream="rtp") == 5
    assert value(after, "sbc_rtp_bytes_total", side="a", stream="rtp") == 5 * RTP_SIZE
    assert value(after, "sbc_rtp_packets_total", side="b", stream="rtp") == 3
    assert value(after, "sbc_rtp_bytes_total", side="b", stream="rtp") == 3 * RTP_SIZE
    assert value(after, "sbc_rtp_ports_in_use") == 0
    assert value(after, "sbc_calls_active") == 0
    assert value(after, "sbc_retell_reachable") == 1
    assert value(after, "sbc_call_events_dropped_total") == 0
    # The call's record (bridge_helpers keeps them in the test's directory).
    assert value(after, "sbc_call_records_written_total") == 1
    assert value(after, "sbc_call_records_dropped_total", reason="write_failed") == 0
    assert value(after, "sbc_call_records_dropped_total", reason="queue_full") == 0


async def test_retell_unreachable_shows_in_the_metric(tmp_path: Path) -> None:
    closed_port = free_port(RETELL)  # nothing listens there: TCP connect is refused
    async with running_bridge(tmp_path, retell_port=closed_port) as bridge:
        near = await pbx_call(tmp_path, bridge, "pbx_rejected.xml")
        assert_both_ends("3CX", await near.finish(20), near, 1)
        await bridge.settled()
        samples, _ = await scrape(bridge)
    assert value(samples, "sbc_retell_reachable") == 0
    assert value(samples, "sbc_calls_refused_total", status="503") == 0  # a call, refused later
    assert value(samples, "sbc_calls_ended_total", outcome="unanswered") == 1


# -- the calls in progress -----------------------------------------------------------------------


async def test_get_calls_shows_a_live_call_and_delete_ends_both_legs(tmp_path: Path) -> None:
    async with running_bridge(tmp_path, media=relay(34640)) as bridge:
        far = await retell(tmp_path, bridge, "retell_uas.xml")  # answers, then awaits a BYE
        near = await pbx_call(tmp_path, bridge, "pbx_wait_bye.xml")  # the same
        call = await connected_call(bridge)
        (live,) = bridge.calls.calls.values()
        assert call["call_uuid"] == live.call_uuid
        assert call["direction"] == "pbx->retell"
        assert call["pbx_call_id"].endswith(f"@{PBX}")
        assert call["retell_call_id"] == live.agent_leg.call_id != call["pbx_call_id"]
        assert call["human_call_id"] is None
        assert (call["caller"], call["caller_name"]) == ("+442071234567", "Alice Smith")
        assert call["called"] == EXTENSION
        assert call["answered"] is not None and call["duration"] >= call["talk"] >= 0
        assert [(leg["role"], leg["state"]) for leg in call["legs"]] == [
            ("caller", "confirmed"),
            ("agent", "confirmed"),
        ]
        media = call["media"]
        assert media["backend"] == "relay"
        assert set(media["sides"]) == {"a", "b"}
        assert {"packets", "bytes"} <= media["sides"]["a"]["rtp"].keys()
        path = f"/calls/{call['call_uuid']}"
        async with aiohttp.ClientSession() as http:
            async with http.get(url(bridge, path)) as response:
                assert response.status == 200
                assert (await response.json())["call_uuid"] == call["call_uuid"]
            async with http.delete(url(bridge, path)) as response:
                assert response.status == 202
                assert (await response.json())["hanging_up"] is True
            # Both ends got sbc's BYE and answered it: their scenarios end successfully.
            assert_both_ends("3CX", await near.finish(20), near, 1)
            assert_both_ends("Retell", await far.finish(20), far, 1)
            await bridge.settled()
            async with http.delete(url(bridge, path)) as response:
                assert response.status == 404
            async with http.get(url(bridge, path)) as response:
                assert response.status == 404
        assert await live_calls(bridge) == []
        (record,) = bridge.calls.records
        assert record.end_reason == "admin"
        assert (record.pbx_status, record.retell_status) == (200, 200)
        assert "BYE sip:" in near.messages() and "BYE sip:" in far.messages()


async def test_delete_of_an_unknown_call_is_404(tmp_path: Path) -> None:
    async with (
        running_bridge(tmp_path) as bridge,
        aiohttp.ClientSession() as http,
        http.delete(url(bridge, "/calls/no-such-call")) as response,
    ):
        assert response.status == 404
        assert "no-such-call" in (await response.json())["error"]


# -- the token -----------------------------------------------------------------------------------


async def requests_with(base: str, headers: Mapping[str, str]) -> dict[tuple[str, str], int]:
    statuses: dict[tuple[str, str], int] = {}
    async with aiohttp.ClientSession(headers=headers) as http:
        for method, path in (
            ("GET", "/healthz"),
            ("GET", "/readyz"),
            ("GET", "/metrics"),
            ("GET", "/calls"),
            ("DELETE", "/calls/x"),
        ):
            async with http.request(method, base + path) as response:
                statuses[(method, path)] = response.status
                if response.status == 401:
                    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    return statuses


async def test_a_token_set_in_the_settings_is_required(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Settings -> service -> admin endpoint: with ``[admin] token`` (here from a systemd
    credential file), requests without it or with another are refused 401."""
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path))  # call records, if kept, go here
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "admin_token").write_text("s3cret-token\n")
    host = "127.0.0.61"
    admin_port = free_port(host, udp=False)
    env = {
        "CREDENTIALS_DIRECTORY": str(credentials),
        "SBC_PBX__HOST": "127.0.0.62",
        "SBC_PBX__PORT": str(free_port("127.0.0.62")),
        "SBC_PBX__EXTENSION": "101",
        "SBC_PBX__PASSWORD": "pw-secret",
        "SBC_PBX__KEEPALIVE": "off",
        "SBC_RETELL__NUMBER": "+14155550100",
        "SBC_SIP__BIND": host,
        "SBC_SIP__PORT": str(free_port(host)),
        "SBC_MEDIA__MODE": "passthrough",
        "SBC_ADMIN__LISTEN": f"{host}:{admin_port}",
    }
    settings = load_settings(None, env)
    service = Service(settings)
    await service.start()
    try:
        base = f"http://{host}:{admin_port}"
        refused = await requests_with(base, {})
        assert set(refused.values()) == {401}
        wrong = await requests_with(base, {"Authorization": "Bearer s3cret-tokeN"})
        assert set(wrong.values()) == {401}
        basic = await requests_with(base, {"Authorization": "Basic czNjcmV0LXRva2Vu"})
        assert set(basic.values()) == {401}
        accepted = await requests_with(base, {"Authorization": "Bearer s3cret-token"})
        assert accepted[("GET", "/healthz")] == 200
        assert accepted[("GET", "/metrics")] == 200
        assert accepted[("GET", "/calls")] == 200
        assert accepted[("DELETE", "/calls/x")] == 404  # past the token: no such call
    finally:
        await service.stop()


async def test_without_a_token_every_request_is_served() -> None:
    server = AdminServer("127.0.0.1", 0, metrics=Metrics())
    await server.start()
    try:
        assert server.address is not None
        base = f"http://{server.address[0]}:{server.address[1]}"
        statuses = await requests_with(base, {})
        assert statuses[("GET", "/healthz")] == 200
        assert statuses[("GET", "/calls")] == 200
        assert statuses[("DELETE", "/calls/x")] == 404
    finally:
        await server.stop()
