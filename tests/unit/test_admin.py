"""The admin API's pieces without sockets: the token settings and their check, ending a call
from outside, a live call as ``GET /calls`` shows it, and the metrics read at scrape time."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sbc.b2bua.events import CallEnded, CallRecord
from sbc.b2bua.messages import Peer
from sbc.b2bua.reachability import Reachability
from sbc.net.addresses import Destination, TransportConfig
from sbc.net.engine import IncomingRequest, SipEngine
from sbc.net.transport import TransportStats
from sbc.ops import cli
from sbc.ops.admin import describe_call
from sbc.ops.metrics import Metrics
from sbc.ops.settings import ConfigError, load_settings
from sbc.sip.message import Request, Response
from sbc.sip.parser import parse_message
from sbc.sip.uri import parse_uri
from tests.unit.call_harness import Harness, answer_bye

BASE = """
[pbx]
host = "10.0.0.1"
extension = "101"
password = "pw-secret"
[retell]
number = "+14155550100"
"""


def settings_file(tmp_path: Path, admin: str) -> Path:
    path = tmp_path / "sbc.toml"
    path.write_text(BASE + "[admin]\n" + admin)
    return path


# -- [admin] token -------------------------------------------------------------------------------


@pytest.mark.parametrize("listen", ["127.0.0.1:8081", "127.0.0.9:1", "[::1]:8081", "localhost:80"])
def test_loopback_needs_no_token(tmp_path: Path, listen: str) -> None:
    admin = load_settings(settings_file(tmp_path, f'listen = "{listen}"\n'), {}).admin
    assert admin.bearer_token() is None


@pytest.mark.parametrize("listen", ["0.0.0.0:8081", "10.1.2.3:8081", "[::]:8081", "sbc.lan:80"])
def test_other_listen_without_token_is_one_config_error(tmp_path: Path, listen: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(settings_file(tmp_path, f'listen = "{listen}"\n'), {})
    (line,) = caught.value.problems
    assert line.startswith(f"admin: listen = '{listen}' is not a loopback address: set admin.token")


def test_check_config_names_the_missing_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = settings_file(tmp_path, 'listen = "0.0.0.0:8081"\n')
    assert cli.main(["check-config", "--config", str(path)]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("admin: listen = '0.0.0.0:8081' is not a loopback")


def test_token_from_the_file_the_environment_a_file_or_a_credential(tmp_path: Path) -> None:
    path = settings_file(tmp_path, 'listen = "0.0.0.0:8081"\ntoken = "from-toml"\n')
    assert load_settings(path, {}).admin.bearer_token() == "from-toml"
    env = {"SBC_ADMIN__TOKEN": "from-env"}
    assert load_settings(path, env).admin.bearer_token() == "from-env"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    path = settings_file(tmp_path, f'listen = "0.0.0.0:8081"\ntoken_file = "{token_file}"\n')
    assert load_settings(path, {}).admin.bearer_token() == "from-file"
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "admin_token").write_text("from-credential\n")
    path = settings_file(tmp_path, 'listen = "0.0.0.0:8081"\n')
    loaded = load_settings(path, {"CREDENTIALS_DIRECTORY": str(credentials)})
    assert loaded.admin.bearer_token() == "from-credential"


@pytest.mark.parametrize(
    ("admin", "problem"),
    [
        ('token = ""\n', "admin.token: must not be empty"),
        ('token = "two words"\n', "admin.token: must be visible ASCII characters without spaces"),
        ('token_file = "/no/such/token"\n', "admin.token_file: no such file: '/no/such/token'"),
        ('token = "a"\ntoken_file = "/etc/hostname"\n', "admin: set admin.token or"),
    ],
)
def test_bad_tokens_are_refused_without_echoing_them(
    tmp_path: Path, admin: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(settings_file(tmp_path, admin), {})
    (line,) = caught.value.problems
    assert line.startswith(problem)
    assert "two words" not in line


# -- ending a call from outside ------------------------------------------------------------------


async def test_hang_up_ends_both_legs_with_bye_and_reason_admin() -> None:
    h = Harness()
    await h.connect()
    h.call.hang_up()
    await answer_bye(h.engine, 0)
    await answer_bye(h.engine, 1)
    await h.finished()
    assert {b.request.call_id for b in h.engine.requests("BYE")} == {
        "pbx-call@10.0.0.1",
        h.call.agent_leg.call_id,
    }
    assert h.call.end_reason == "admin"


async def test_hang_up_while_ringing_cancels_and_answers_the_caller() -> None:
    h = Harness()
    invite = await h.b_invite()
    invite.deliver(180)
    await h.pbx_status(180)
    h.call.hang_up("admin")
    await h.engine.wait(lambda: h.engine.cancelled)
    invite.deliver(487)
    await h.finished()
    assert h.statuses() == [180, 503]
    assert h.call.end_reason == "admin"


async def test_describe_call_shows_ids_parties_state_and_times() -> None:
    h = Harness()
    await h.connect()
    seen = describe_call(h.call, now=1_795_000_012.5)
    assert seen["call_uuid"] == "uuid-1"
    assert seen["direction"] == "pbx->retell"
    assert seen["pbx_call_id"] == "pbx-call@10.0.0.1"
    assert seen["retell_call_id"] == h.call.agent_leg.call_id
    assert seen["human_call_id"] is None
    assert (seen["caller"], seen["caller_name"], seen["called"]) == (
        "+442071234567",
        "Alice",
        "101",
    )
    assert seen["state"] in ("answered", "connected")
    assert (seen["duration"], seen["talk"]) == (12.5, 12.5)  # the harness's clock stands still
    assert [(leg["role"], leg["status"]) for leg in seen["legs"]] == [
        ("caller", 200),
        ("agent", 200),
    ]
    assert seen["media"] == {"backend": "passthrough", "sides": {}}
    h.call.hang_up()
    await answer_bye(h.engine, 0)
    await answer_bye(h.engine, 1)
    await h.finished()


# -- metrics read at scrape time -----------------------------------------------------------------


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(metrics: Metrics) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
    }


def value(got: Samples, name: str, **labels: str) -> float:
    return got[(name, tuple(sorted(labels.items())))]


@dataclass
class FakeStats:
    messages: dict[tuple[str, str | int, str], int] = field(default_factory=dict)
    retransmissions: int = 0
    transactions_refused: int = 0
    large_over_tcp: int = 0
    large_tcp_fallbacks: int = 0


@dataclass
class FakeEngine:
    stats: FakeStats
    layer: list[object]


@dataclass
class FakeTransports:
    connection_count: int = 3
    stats: TransportStats = field(default_factory=TransportStats)


@dataclass
class FakeTablesEngine(FakeEngine):
    transports: FakeTransports = field(default_factory=FakeTransports)

    def table_sizes(self) -> dict[str, int]:
        return {"engine_clients": 2, "transaction_timers": 9}


@dataclass
class FakeBus:
    dropped: int = 0


@dataclass
class FakeBridge:
    events: FakeBus
    reachability: dict[Peer, Reachability]


@dataclass
class FakePool:
    in_use: int = 2
    capacity: int = 500


class FakeRelay:
    pool = FakePool()

    def counters(self) -> dict[tuple[str, str], tuple[int, int]]:
        return {("a", "rtp"): (50, 8600), ("b", "rtp"): (48, 8256), ("a", "rtcp"): (1, 60)}


@dataclass
class FakeRecords:
    written: int = 7
    failed: int = 1


def test_scrape_time_families_read_the_parts_of_the_bridge() -> None:
    metrics = Metrics()
    stats = FakeStats(
        {("in", "INVITE", "udp"): 2, ("out", 200, "udp"): 1, ("out", "INVITE", "tcp"): 1},
        retransmissions=3,
    )
    retell = Reachability("retell")
    bridge = FakeBridge(FakeBus(dropped=4), {Peer.RETELL: retell, Peer.PBX: Reachability("pbx")})
    metrics.watch(
        engine=FakeEngine(stats, [object()] * 5),
        bridge=bridge,
        media=FakeRelay(),
        records=FakeRecords(),
    )
    got = samples(metrics)
    requests, responses = "sbc_sip_requests_total", "sbc_sip_responses_total"
    assert value(got, requests, direction="in", method="INVITE", transport="udp") == 2
    assert value(got, requests, direction="out", method="INVITE", transport="tcp") == 1
    assert value(got, responses, direction="out", status="200", transport="udp") == 1
    assert value(got, "sbc_sip_retransmissions_total") == 3
    assert value(got, "sbc_sip_transactions") == 5
    assert value(got, "sbc_rtp_packets_total", side="a", stream="rtp") == 50
    assert value(got, "sbc_rtp_bytes_total", side="b", stream="rtp") == 8256
    assert value(got, "sbc_rtp_ports_in_use") == 4
    assert value(got, "sbc_rtp_ports_capacity") == 1000
    assert value(got, "sbc_retell_reachable") == 1
    assert value(got, "sbc_call_events_dropped_total") == 4
    assert value(got, "sbc_call_records_written_total") == 7
    assert value(got, "sbc_call_records_dropped_total", reason="write_failed") == 1
    retell.failed("connect failed: [Errno 111] Connection refused")
    assert samples(metrics)[("sbc_retell_reachable", ())] == 0
    retell.answered()
    assert samples(metrics)[("sbc_retell_reachable", ())] == 1


@dataclass
class FakeTablesBridge(FakeBridge):
    dialogs: int = 4

    def table_sizes(self) -> dict[str, int]:
        return {"calls": 1, "dialogs": 4}


@dataclass
class FakeSessionsRelay:
    sessions: set[object] = field(default_factory=lambda: {object(), object()})


def test_leak_check_families_count_dialogs_connections_and_tables() -> None:
    metrics = Metrics()
    metrics.watch(
        engine=FakeTablesEngine(FakeStats(), []),
        bridge=FakeTablesBridge(FakeBus(), {}),
        media=FakeSessionsRelay(),
    )
    got = samples(metrics)
    assert value(got, "sbc_sip_dialogs") == 4
    assert value(got, "sbc_sip_connections") == 3
    assert value(got, "sbc_table_entries", table="engine_clients") == 2
    assert value(got, "sbc_table_entries", table="transaction_timers") == 9
    assert value(got, "sbc_table_entries", table="calls") == 1
    assert value(got, "sbc_table_entries", table="media_sessions") == 2


def test_families_without_their_parts_are_empty_and_build_info_is_there() -> None:
    metrics = Metrics()
    got = samples(metrics)
    assert not [name for name, _ in got if name.startswith(("sbc_sip_", "sbc_rtp_"))]
    ((_, labels),) = [key for key in got if key[0] == "sbc_build_info"]
    assert {k for k, _ in labels} == {"version", "python"}
    assert ("process_cpu_seconds_total", ()) in got or not Path("/proc/self/stat").exists()
    assert any(name == "python_info" for name, _ in got)


def test_setup_time_is_invite_to_answer() -> None:
    metrics = Metrics()
    record: Any = CallRecord(
        call_uuid="u",
        pbx_call_id="p",
        retell_call_id="r",
        caller="+1",
        called="101",
        started=100.0,
        answered=101.5,
        ended=130.0,
        pbx_status=200,
        retell_status=200,
        end_reason="pbx_bye",
    )
    metrics.on_call_event(CallEnded(record))
    got = samples(metrics)
    assert got[("sbc_call_setup_seconds_count", ())] == 1
    assert got[("sbc_call_setup_seconds_sum", ())] == 1.5
    assert got[("sbc_call_setup_seconds_bucket", (("le", "1.0"),))] == 0
    assert got[("sbc_call_setup_seconds_bucket", (("le", "2.0"),))] == 1


# -- the engine's counters -----------------------------------------------------------------------

UDP_SOURCE = Destination("udp", "192.0.2.7", 5060)


def parsed(data: bytes) -> Request:
    message = parse_message(data)
    assert isinstance(message, Request)
    return message


def raw_request(method: str, branch: str) -> bytes:
    return (
        f"{method} sip:101@127.0.0.1:5060 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 192.0.2.7:5060;branch=z9hG4bK{branch};rport\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:pbx@192.0.2.7>;tag=f1\r\n"
        "To: <sip:101@127.0.0.1>\r\n"
        f"Call-ID: {branch}@192.0.2.7\r\n"
        f"CSeq: 1 {method}\r\n"
        "Contact: <sip:pbx@192.0.2.7:5060>\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


async def test_engine_counts_messages_and_retransmissions() -> None:
    engine = SipEngine(TransportConfig(bind="127.0.0.1", port=0, t1=0.01, t2=0.04))
    sent: list[tuple[Destination, Request | Response]] = []
    engine.transports.send = lambda dest, message: sent.append((dest, message))  # type: ignore[method-assign]
    engine._loop = asyncio.get_running_loop()
    engine._running = True
    arrived: list[IncomingRequest] = []
    engine.on_request = arrived.append
    engine._message_received(parsed(raw_request("INVITE", "inv1")), UDP_SOURCE)
    (invite,) = arrived
    ok = invite.response(200, headers=(("Contact", "<sip:101@127.0.0.1:5060>"),))
    invite.send(ok)
    invite.send(ok)  # the TU's 2xx again: no ACK yet (RFC 3261 §13.3.1.4)
    assert engine.stats.retransmissions == 1
    # A method nobody knows is counted as "other" (the label set stays bounded); its answer too.
    engine._message_received(parsed(raw_request("FROBNICATE", "x1")), UDP_SOURCE)
    arrived[-1].respond(501)
    assert engine.stats.messages == {
        ("in", "INVITE", "udp"): 1,
        ("out", 200, "udp"): 2,
        ("in", "other", "udp"): 1,
        ("out", 501, "udp"): 1,
    }
    # A request sbc sends over UDP and nobody answers goes again on Timer E.
    options = parsed(raw_request("OPTIONS", "o1")).headers.remove("Via")
    request = Request("OPTIONS", parse_uri("sip:pbx@192.0.2.7"), options)
    engine.send_request(request, UDP_SOURCE)
    async with asyncio.timeout(2):
        while engine.stats.messages.get(("out", "OPTIONS", "udp"), 0) < 3:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    resent = engine.stats.messages[("out", "OPTIONS", "udp")] - 1
    assert engine.stats.retransmissions >= 1 + resent >= 3
    await engine.stop()
