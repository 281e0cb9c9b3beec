"""The service's wiring: settings -> the plain configs of the layers below, and the requests the
call manager answers without a call (NOTIFY, overload) against a recording engine, no sockets."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import pytest
import structlog.testing

from sbc.b2bua.calls import CallManager
from sbc.b2bua.numbers import normalise
from sbc.media.base import MediaBackend, MediaSession, PassthroughBackend
from sbc.media.ports import PortsExhausted
from sbc.media.relay import RelayBackend
from sbc.media.rtpengine import RtpengineBackend
from sbc.net.addresses import Destination
from sbc.net.engine import IncomingRequest
from sbc.ops import service
from sbc.ops.metrics import Metrics
from sbc.ops.settings import load_settings
from sbc.sip.errors import ServiceUnavailable
from sbc.sip.headers import Headers
from sbc.sip.message import Request, Response
from sbc.sip.uri import parse_uri

PBX = Destination("udp", "10.0.0.1", 5060)
LIMIT = 2.0


def settings(**sections: dict[str, Any]) -> Any:
    env = {"SBC_PBX__PASSWORD": "secret"}
    data: dict[str, dict[str, Any]] = {
        "pbx": {"host": "10.0.0.1", "extension": "101", "trusted": '["10.0.0.0/24"]'},
        "retell": {"number": "+14155550100"},
        "sip": {"bind": "10.0.0.5"},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    for name, values in data.items():
        for key, value in values.items():
            env[f"SBC_{name.upper()}__{key.upper()}"] = str(value)
    return load_settings(None, env)


# -- settings -> BridgeConfig ---------------------------------------------------------------------


def test_bridge_config_maps_the_calls_section() -> None:
    s = settings(calls={"max_concurrent": 7, "max_duration": 600, "retry_after": 45})
    cfg = service.bridge_config(s)
    assert cfg.extension == "101"
    assert cfg.retell.number == "+14155550100" and cfg.retell.transport == "tcp"
    assert cfg.trusted == (ipaddress.ip_network("10.0.0.0/24"),)
    assert (cfg.max_concurrent, cfg.max_duration, cfg.retry_after) == (7, 600.0, 45)
    assert cfg.pbx_credentials is not None and cfg.pbx_credentials.password == "secret"
    assert cfg.media_timeout == 60.0


def test_number_plan_carries_national_lengths() -> None:
    plan = service.bridge_config(settings(calls={"national_lengths": "[9, 10]"})).number_plan
    assert plan.national_lengths == (9, 10)


@pytest.mark.parametrize(
    ("number", "e164"),
    [
        ("4155550100", "+14155550100"),  # ten digits, no prefix: national
        ("14155550100", "+14155550100"),  # NANP trunk prefix 1
        ("+14155550100", "+14155550100"),
        ("1 (415) 555-0100", "+14155550100"),
        ("011442071234567", "+442071234567"),  # NANP international prefix 011
        ("5550100", "5550100"),  # seven-digit local number: no area code, left alone
        ("101", "101"),  # an extension
    ],
)
def test_default_number_plan_is_nanp(number: str, e164: str) -> None:
    plan = service.number_plan(settings().calls)
    assert (plan.country_code, plan.national_prefix, plan.international_prefix) == ("1", "1", "011")
    assert normalise(number, plan) == e164


@pytest.mark.parametrize(
    ("number", "e164"),
    [
        ("0201234567", "+31201234567"),
        ("0031201234567", "+31201234567"),
        ("+31 (0)20 123 4567", "+31201234567"),
        ("201234567", "201234567"),  # no prefix-less national numbers outside NANP by default
    ],
)
def test_country_code_brings_its_own_prefixes(number: str, e164: str) -> None:
    # The demo's plan: country 31 alone implies trunk prefix 0 and international prefix 00.
    demo = load_settings(service.__file__.replace("service.py", "demo.toml"), {})
    plan = service.number_plan(demo.calls)
    assert (plan.country_code, plan.national_prefix, plan.international_prefix) == ("31", "0", "00")
    assert plan.national_lengths == ()
    assert normalise(number, plan) == e164


def test_pbx_networks_resolve_the_host_when_none_are_configured() -> None:
    s = settings(pbx={"host": "127.0.0.1", "trusted": "[]"})
    assert service.pbx_networks(s.pbx) == (ipaddress.ip_network("127.0.0.1/32"),)
    unresolvable = settings(pbx={"host": "no-such-host.invalid", "trusted": "[]"})
    assert service.pbx_networks(unresolvable.pbx) == ()


# -- settings -> media backend --------------------------------------------------------------------


def test_media_backend_per_mode() -> None:
    relay = service.media_backend(
        settings(media={"rtp_port_min": 30000, "rtp_port_max": 30099}), "[192.0.2.7]"
    )
    assert isinstance(relay, RelayBackend)
    assert (relay.bind_host, relay.advertised_address) == ("10.0.0.5", "192.0.2.7")
    assert relay.pool.capacity == 50
    passthrough = service.media_backend(settings(media={"mode": "passthrough"}), "10.0.0.5")
    assert isinstance(passthrough, PassthroughBackend)


def test_rtpengine_backend_polls_so_media_timeouts_work() -> None:
    backend = service.media_backend(
        settings(media={"mode": "rtpengine", "rtpengine": "127.0.0.1:2223"}), "10.0.0.5"
    )
    assert isinstance(backend, RtpengineBackend)
    assert backend.client.address == ("127.0.0.1", 2223)
    assert backend.poll_interval == service.RTPENGINE_POLL_INTERVAL == 5.0
    short = service.media_backend(
        settings(media={"mode": "rtpengine", "rtpengine": "127.0.0.1:2223", "media_timeout": 8}),
        "10.0.0.5",
    )
    assert isinstance(short, RtpengineBackend) and short.poll_interval == 2.0


def test_rtpengine_inject_dtmf_setting_reaches_the_backend() -> None:
    rtpengine = {"mode": "rtpengine", "rtpengine": "127.0.0.1:2223"}
    default = service.media_backend(settings(media=rtpengine), "10.0.0.5")
    assert isinstance(default, RtpengineBackend) and default.inject_dtmf is False
    flags = default.offer_options.get("flags", [])
    assert isinstance(flags, list) and "inject-DTMF" not in flags
    opted_in = service.media_backend(
        settings(media={**rtpengine, "rtpengine_inject_dtmf": "true"}), "10.0.0.5"
    )
    assert isinstance(opted_in, RtpengineBackend) and opted_in.inject_dtmf is True
    # rtpengine docs, `play DTMF`: the flag goes in both the offer and the answer.
    for options in (opted_in.offer_options, opted_in.answer_options):
        flags = options["flags"]
        assert isinstance(flags, list) and "inject-DTMF" in flags


# -- requests the call manager answers itself ---------------------------------------------------


class FakeConfig:
    via_host = "10.0.0.5"

    def via_port(self, transport: str) -> int:
        return 5060


class RecordingEngine:
    """What the manager and its calls need of the engine; responses are recorded."""

    def __init__(self) -> None:
        self.config = FakeConfig()
        self.accept: frozenset[str] = frozenset({"application/sdp"})
        self.responses: list[Response] = []
        self.sent = asyncio.Event()

    def respond(self, key: str, response: Response) -> None:
        self.responses.append(response)
        self.sent.set()

    async def final(self) -> Response:
        async with asyncio.timeout(LIMIT):
            while not any(r.status >= 200 for r in self.responses):
                self.sent.clear()
                await self.sent.wait()
        return next(r for r in self.responses if r.status >= 200)


class NoPorts(MediaBackend):
    def __init__(self, error: ServiceUnavailable) -> None:
        self.error = error
        self.closed = False

    async def allocate(self, call_id: str) -> MediaSession:
        raise self.error

    async def close(self) -> None:
        self.closed = True


class Refusals(Metrics):
    def __init__(self) -> None:
        super().__init__()
        self.refused: list[int] = []

    def call_refused(self, status: int) -> None:
        super().call_refused(status)
        self.refused.append(status)


SDP = (
    b"v=0\r\no=3cxPS 1 1 IN IP4 10.0.0.1\r\ns=3cxPS Audio call\r\nc=IN IP4 10.0.0.1\r\n"
    b"t=0 0\r\nm=audio 9000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n"
)


def request(method: str, *extra: tuple[str, str], body: bytes = b"", call_id: str = "") -> Request:
    headers = [
        ("Via", "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKpbx1;rport=5060"),
        ("From", "<sip:101@10.0.0.1>;tag=pbxtag"),
        ("To", "<sip:101@10.0.0.5>"),
        ("Call-ID", call_id or f"pbx-{method.lower()}@10.0.0.1"),
        ("CSeq", f"1 {method}"),
        ("Contact", "<sip:3cx@10.0.0.1:5060>"),
        *extra,
    ]
    if body:
        headers.append(("Content-Type", "application/sdp"))
    return Request(method, parse_uri("sip:101@10.0.0.5:5060"), Headers(headers), body)


def manager(
    media: MediaBackend | None = None, **calls: object
) -> tuple[CallManager, RecordingEngine, Refusals]:
    engine = RecordingEngine()
    metrics = Refusals()
    cfg = service.bridge_config(settings(calls=dict(calls)))
    bridge = CallManager(
        engine,  # type: ignore[arg-type]
        cfg,
        media or PassthroughBackend(),
    )
    bridge.events.subscribe(metrics.on_call_event)
    return bridge, engine, metrics


def incoming(engine: RecordingEngine, req: Request) -> IncomingRequest:
    return IncomingRequest(engine, "key-" + req.call_id, req, PBX, req.to_tag)


async def test_voicemail_notify_outside_a_dialog_is_answered_200() -> None:
    bridge, engine, _ = manager()
    notify = request(
        "NOTIFY",
        ("Event", "message-summary"),
        ("Content-Type", "application/simple-message-summary"),
        body=b"Messages-Waiting: yes\r\nVoice-Message: 1/0\r\n",
    )
    bridge.handle_request(incoming(engine, notify))
    (response,) = engine.responses
    assert response.status == 200
    assert response.call_id == notify.call_id and response.to_tag is not None


async def test_other_methods_outside_a_dialog_are_405_with_allow() -> None:
    bridge, engine, _ = manager()
    bridge.handle_request(incoming(engine, request("MESSAGE")))
    (response,) = engine.responses
    assert response.status == 405
    assert "INVITE" in (response.headers.get("Allow") or "")


class SlowPorts(NoPorts):
    """Holds every call in media allocation until ``release`` is set, then has no ports."""

    def __init__(self) -> None:
        super().__init__(PortsExhausted("no free RTP port pair"))
        self.waiting = asyncio.Event()
        self.release = asyncio.Event()

    async def allocate(self, call_id: str) -> MediaSession:
        self.waiting.set()
        await self.release.wait()
        raise self.error


async def test_over_capacity_is_503_with_the_configured_retry_after() -> None:
    media = SlowPorts()
    bridge, engine, metrics = manager(media, max_concurrent=1, retry_after=45)
    bridge.handle_request(incoming(engine, request("INVITE", body=SDP)))
    async with asyncio.timeout(LIMIT):
        await media.waiting.wait()
    assert bridge.active == 1
    second = request("INVITE", body=SDP, call_id="second@10.0.0.1")
    bridge.handle_request(incoming(engine, second))
    refused = [r for r in engine.responses if r.call_id == "second@10.0.0.1"]
    assert [r.status for r in refused] == [503]
    assert refused[0].headers.get("Retry-After") == "45"
    await bridge.events.flush()  # events reach observers off the call path
    assert metrics.refused == [503]
    media.release.set()
    async with asyncio.timeout(LIMIT):
        await bridge.wait_idle()
    await bridge.stop()


async def test_no_free_rtp_ports_is_503_with_retry_after() -> None:
    media = NoPorts(PortsExhausted("no free RTP port pair"))
    bridge, engine, _ = manager(media, retry_after=12)
    bridge.handle_request(incoming(engine, request("INVITE", body=SDP)))
    final = await engine.final()
    assert [r.status for r in engine.responses] == [100, 503]
    assert final.headers.get("Retry-After") == "12"
    async with asyncio.timeout(LIMIT):
        await bridge.wait_idle()
    assert bridge.records[-1].pbx_status == 503
    await bridge.stop()
    assert media.closed  # the manager closes the backend it was given


async def test_a_retry_after_from_the_media_layer_is_kept() -> None:
    media = NoPorts(ServiceUnavailable("draining", headers=(("Retry-After", "300"),)))
    bridge, engine, _ = manager(media, retry_after=12)
    bridge.handle_request(incoming(engine, request("INVITE", body=SDP)))
    final = await engine.final()
    assert final.status == 503
    assert final.headers.get_all("Retry-After") == ["300"]
    await bridge.stop()


# -- limits ---------------------------------------------------------------------------------------


def test_transport_config_maps_the_limits() -> None:
    s = settings(
        sip={
            "max_headers": 50,
            "max_via": 8,
            "max_uri_length": 256,
            "max_transactions_per_source": 20,
            "large_requests_over_tcp": "false",
            "udp_buffer_size": 65536,
        },
        calls={"max_calls_per_source": 3},
    )
    cfg = service.transport_config(s)
    limits = cfg.parse_limits
    assert (limits.max_headers, limits.max_via, limits.max_uri_length) == (50, 8, 256)
    assert (cfg.max_transactions_per_source, cfg.large_requests_over_tcp) == (20, False)
    assert cfg.udp_buffer_size == 65536
    assert service.bridge_config(s).max_calls_per_source == 3


def test_retell_udp_socket_only_with_the_port_set_and_retell_over_udp() -> None:
    # Unset (the default): one UDP socket for everything, as before.
    assert service.transport_config(settings(retell={"transport": "udp"})).udp_sockets == ()
    # Set, but Retell over TCP: nothing would leave from it, so it is not opened.
    tcp = settings(retell={"transport": "tcp", "local_udp_port": 5062})
    with structlog.testing.capture_logs() as logs:
        assert service.transport_config(tcp).udp_sockets == ()
    # ... and the operator is told the port is set for nothing.
    assert [(e["event"], e["port"], e["transport"]) for e in logs] == [
        ("retell_local_udp_port_unused", 5062, "tcp")
    ]
    udp = settings(retell={"transport": "udp", "local_udp_port": 5062})
    # Named as the legs toward Retell ask for it (Leg.socket is the peer's name).
    with structlog.testing.capture_logs() as logs:
        assert service.transport_config(udp).udp_sockets == (("retell", 5062),)
    assert logs == []
    ephemeral = settings(retell={"transport": "udp", "local_udp_port": 0})
    assert service.transport_config(ephemeral).udp_sockets == (("retell", 0),)


async def test_calls_per_source_capped_with_503_and_counted_back_to_zero() -> None:
    media = SlowPorts()
    bridge, engine, metrics = manager(media, max_calls_per_source=1, retry_after=20)
    bridge.handle_request(incoming(engine, request("INVITE", body=SDP)))
    async with asyncio.timeout(LIMIT):
        await media.waiting.wait()
    assert bridge.calls_by_source == {PBX.host: 1}
    second = request("INVITE", body=SDP, call_id="second@10.0.0.1")
    bridge.handle_request(incoming(engine, second))
    refused = [r for r in engine.responses if r.call_id == "second@10.0.0.1"]
    assert [r.status for r in refused] == [503]
    assert refused[0].headers.get("Retry-After") == "20"
    assert bridge.refused_per_source == 1
    # Another address of the PBX's network is not affected by the first one's calls.
    third = request("INVITE", body=SDP, call_id="third@10.0.0.2")
    other = Destination("udp", "10.0.0.2", 5060)
    bridge.handle_request(IncomingRequest(engine, "key-third", third, other, None))
    assert [r.status for r in engine.responses if r.call_id == "third@10.0.0.2"] == [100]
    assert bridge.calls_by_source == {PBX.host: 1, "10.0.0.2": 1}
    await bridge.events.flush()
    assert metrics.refused == [503]
    media.release.set()
    async with asyncio.timeout(LIMIT):
        await bridge.wait_idle()
    assert bridge.calls_by_source == {}
    assert bridge._call_sources == {}
    await bridge.stop()


async def test_calls_per_source_defaults_to_max_concurrent() -> None:
    media = SlowPorts()
    bridge, engine, _ = manager(media, max_concurrent=2)
    assert bridge.config.max_calls_per_source is None
    for call_id in ("one@10.0.0.1", "two@10.0.0.1"):
        bridge.handle_request(incoming(engine, request("INVITE", body=SDP, call_id=call_id)))
    assert [r.status for r in engine.responses] == [100, 100]
    assert bridge.calls_by_source == {PBX.host: 2}
    assert bridge.refused_per_source == 0
    media.release.set()
    async with asyncio.timeout(LIMIT):
        await bridge.wait_idle()
    await bridge.stop()
