"""The SIP trace (sbc/ops/sip_trace.py): every message at debug level through the engine's
tap, Authorization and Proxy-Authorization values redacted."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import structlog

from sbc.b2bua.ladder import REDACTED
from sbc.net.addresses import TransportConfig
from sbc.net.engine import SipEngine
from sbc.ops import sip_trace
from sbc.sip.server_transaction import build_response
from sbc.sip.uri import parse_uri
from tests.unit.engine_sink import engine_without_sockets
from tests.unit.test_ladder import OPTIONS, SECRET_DIGEST, bye


def test_the_trace_redacts_credentials_and_keeps_the_rest() -> None:
    message = bye(
        ("Authorization", SECRET_DIGEST),
        ("proxy-authorization", SECRET_DIGEST),
        ("Proxy-Authenticate", 'Digest realm="x", nonce="n1"'),
    )
    text = sip_trace.redacted(message)
    lines = text.split("\r\n")
    assert lines[0] == "BYE sip:101@10.0.0.5:5060 SIP/2.0"
    assert f"Authorization: {REDACTED}" in lines
    assert f"Proxy-Authorization: {REDACTED}" in lines  # any spelling of the name
    assert 'Proxy-Authenticate: Digest realm="x", nonce="n1"' in lines  # a challenge stays
    assert "Call-ID: pbx-call@10.0.0.1" in lines
    for secret in ("6001auth", "f00dfacecafe", "414d535c0d7a1"):
        assert secret not in text
    response = sip_trace.redacted(build_response(message, 401))
    assert response.startswith("SIP/2.0 401 Unauthorized\r\n")
    assert "f00dfacecafe" not in response  # a response copies no credentials, checked anyway


async def test_the_trace_logs_each_message_at_debug_through_the_tap() -> None:
    engine, _ = engine_without_sockets()
    kept: list[str] = []
    engine.on_message = lambda d, m, p: kept.append(d)
    sip_trace.install(engine, force=False)
    with structlog.testing.capture_logs() as logs:
        engine.transports._datagram_received(OPTIONS, ("127.0.0.1", 5070))
    assert kept == ["in", "out"]  # the tap already set still runs
    traced = [e for e in logs if e["event"] == "sip_message"]
    assert [(e["log_level"], e["direction"]) for e in traced] == [("debug", "in"), ("debug", "out")]
    assert traced[0]["peer"] == "udp:127.0.0.1:5070" and traced[0]["call_id"] == "tap-1@127.0.0.1"
    assert f"Authorization: {REDACTED}" in traced[0]["message"]
    assert "f00dfacecafe" not in json.dumps(traced)


def test_forcing_the_trace_lowers_its_own_logger_only(monkeypatch: pytest.MonkeyPatch) -> None:
    logger = logging.getLogger(sip_trace.LOGGER)
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    root = logging.getLogger().level
    sip_trace.install(SipEngine(TransportConfig(bind="127.0.0.1", port=5060)), force=True)
    assert logger.level == logging.DEBUG
    assert logging.getLogger().level == root


def test_a_password_in_the_request_uri_is_redacted() -> None:
    message = dataclasses.replace(bye(), uri=parse_uri("sip:101:hunter2@10.0.0.5"))
    text = sip_trace.redacted(message)
    assert text.startswith(f"BYE sip:101:{REDACTED}@10.0.0.5 SIP/2.0")
    assert "hunter2" not in text
