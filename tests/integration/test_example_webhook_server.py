"""The example inbound webhook's HTTP server (docs/examples/retell_webhook.py) on loopback: a
signed ``call_inbound`` POST gets the dynamic variables, a bad signature 401, and other requests
their 4xx. The payload logic itself is checked in tests/unit/test_example_webhook.py."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "docs" / "examples" / "retell_webhook.py"
KEY = "key_loopback_test"
NOW = 1_790_000_000.0

PAYLOAD = {
    "event": "call_inbound",
    "call_inbound": {
        "agent_id": "agent_12345",
        "from_number": "+14155550123",
        "to_number": "+14155550100",
        "custom_sip_headers": {
            "x-caller-number": "+14155550123",
            "x-caller-name": "Alice Smith",
            "x-pbx-call-id": "NDk3ZjQ2-3cx-call-7@10.0.0.1",
        },
    },
}


def load_example() -> ModuleType:
    return load_script(EXAMPLE, "retell_webhook_example_server")


@pytest.fixture(scope="module")
def example() -> ModuleType:
    return load_example()


@pytest.fixture
def server_url(example: ModuleType) -> Iterator[str]:
    config = example.WebhookConfig(agents={"+14155550100": "agent_sales"}, api_key=KEY)
    server = example.make_server("127.0.0.1", 0, config, clock=lambda: NOW)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host}:{port}/retell/inbound"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_signed_request_gets_variables_and_agent(example: ModuleType, server_url: str) -> None:
    body = json.dumps(PAYLOAD).encode()
    signature = example.sign(body, KEY, int(NOW * 1000) - 1000)
    status, answer = post(
        server_url,
        body,
        {"Content-Type": "application/json", "X-Retell-Signature": signature},
    )
    assert status == 200
    assert answer["call_inbound"]["dynamic_variables"] == {
        "caller_number": "+14155550123",
        "caller_name": "Alice Smith",
        "pbx_call_id": "NDk3ZjQ2-3cx-call-7@10.0.0.1",
    }
    assert answer["call_inbound"]["override_agent_id"] == "agent_sales"


def test_refusals(example: ModuleType, server_url: str) -> None:
    body = json.dumps(PAYLOAD).encode()
    stale = example.sign(body, KEY, int(NOW * 1000) - 301_000)
    for headers in ({}, {"X-Retell-Signature": stale}, {"X-Retell-Signature": "v=1,d=00"}):
        status, answer = post(server_url, body, headers)
        assert status == 401, headers
        assert "signature" in answer["error"]
    other = json.dumps({"event": "chat_inbound", "chat_inbound": {}}).encode()
    signed = {"X-Retell-Signature": example.sign(other, KEY, int(NOW * 1000))}
    assert post(server_url, other, signed)[0] == 400
    garbage = b"{not json"
    signed = {"X-Retell-Signature": example.sign(garbage, KEY, int(NOW * 1000))}
    assert post(server_url, garbage, signed)[0] == 400
    big = b" " * (example.MAX_BODY + 1)
    assert post(server_url, big, {})[0] == 413
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(server_url, timeout=5)
    assert info.value.code == 405
