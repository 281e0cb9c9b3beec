"""The example inbound webhook (docs/examples/retell_webhook.py) against what sbc really sends.

The X- headers come from an INVITE to Retell built the way a call builds it (``Call._b_invite``):
``deploy/sbc.toml.example`` loaded as the settings, mapped by ``bridge_config``, its ``[headers]``
rendered for a 3CX INVITE, :func:`build_b_invite`, serialized and parsed back. The webhook JSON is
Retell's ``call_inbound`` payload (https://docs.retellai.com/features/inbound-call-webhook) with
those headers in ``custom_sip_headers`` under each naming Retell's pages describe. A change of
sbc's headers or of the example settings shows up here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from sbc.b2bua.messages import (
    LegIds,
    LocalAddress,
    build_b_invite,
    call_facts,
    called_of,
    caller_of,
    uri_user,
)
from sbc.ops.service import bridge_config
from sbc.ops.settings import load_settings
from sbc.sip.message import Request
from sbc.sip.parser import parse_message
from sbc.sip.serializer import serialize
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "docs" / "examples" / "retell_webhook.py"
SETTINGS = ROOT / "deploy" / "sbc.toml.example"

# A call from the PSTN as 3CX offers it to the extension sbc registered (1000 in the example).
PBX_INVITE = (
    b"INVITE sip:1000@10.0.0.5:5060 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK-pbx-7;rport\r\n"
    b"Max-Forwards: 69\r\n"
    b'From: "Alice Smith" <sip:4155550123@10.0.0.1:5060>;tag=3cxtag\r\n'
    b"To: <sip:1000@10.0.0.1:5060>\r\n"
    b"Call-ID: NDk3ZjQ2-3cx-call-7@10.0.0.1\r\n"
    b"CSeq: 2 INVITE\r\n"
    b"Contact: <sip:10000@10.0.0.1:5060>\r\n"
    b"User-Agent: 3CXPhoneSystem 20.0.1.503 (500)\r\n"
    b"Supported: replaces, timer\r\n"
    b"Allow: INVITE, ACK, CANCEL, BYE, REFER, INFO, UPDATE, NOTIFY, OPTIONS\r\n"
    b"Content-Length: 0\r\n\r\n"
)
SDP = b"v=0\r\no=- 1 1 IN IP4 203.0.113.10\r\ns=-\r\nc=IN IP4 203.0.113.10\r\nt=0 0\r\n"
NOW = 1_790_000_000.0


def load_example() -> ModuleType:
    return load_script(EXAMPLE, "retell_webhook_example")


@pytest.fixture(scope="module")
def example() -> ModuleType:
    return load_example()


@pytest.fixture(scope="module")
def retell_invite() -> Request:
    """sbc's INVITE to Retell for PBX_INVITE, as it goes on the wire and Retell parses it."""
    settings = load_settings(SETTINGS, env={})
    config = bridge_config(settings, trusted=())
    pbx_invite = parse_message(PBX_INVITE)
    assert isinstance(pbx_invite, Request)
    caller = caller_of(pbx_invite, config.number_plan)
    facts = call_facts(pbx_invite, caller, called_of(pbx_invite), "c0ffee00-1111-2222", NOW)
    rendered = config.headers.render(facts)
    assert rendered.rejected == ()
    local = LocalAddress("203.0.113.10", 5060, "tcp")
    invite = build_b_invite(
        config, local, LegIds("b-leg-1", "sbctag"), caller, rendered.headers, SDP
    )
    parsed = parse_message(serialize(invite))
    assert isinstance(parsed, Request)
    return parsed


def x_headers(invite: Request) -> dict[str, str]:
    return {name: value for name, value in invite.headers if name.lower().startswith("x-")}


def webhook_payload(invite: Request, custom: dict[str, str] | None) -> dict[str, Any]:
    """Retell's inbound webhook request for ``invite`` (from/to are its From and To users)."""
    inbound: dict[str, Any] = {
        "agent_id": "agent_12345",
        "from_number": uri_user(invite.from_.uri),
        "to_number": uri_user(invite.to.uri),
    }
    if custom is not None:
        inbound["custom_sip_headers"] = custom
    return {"event": "call_inbound", "call_inbound": inbound}


def test_sbc_sends_the_example_headers(retell_invite: Request) -> None:
    # The default templates of deploy/sbc.toml.example, rendered for this call.
    assert x_headers(retell_invite) == {
        "X-Caller-Number": "+14155550123",
        "X-Caller-Name": "Alice Smith",
        "X-Pbx-Call-Id": "NDk3ZjQ2-3cx-call-7@10.0.0.1",
    }
    assert uri_user(retell_invite.from_.uri) == "+14155550123"
    assert uri_user(retell_invite.to.uri) == "+14155550100"


NAMINGS: dict[str, Callable[[str], str]] = {
    "as sent": lambda name: name,
    "lowercased, x- kept": lambda name: name.lower(),
    "lowercased, x- stripped": lambda name: name.lower().removeprefix("x-"),
    "LiveKit attribute": lambda name: "sip.h." + name.lower(),
}


@pytest.mark.parametrize("naming", NAMINGS)
def test_dynamic_variables_from_the_headers(
    example: ModuleType, retell_invite: Request, naming: str
) -> None:
    spell = NAMINGS[naming]
    custom = {spell(name): value for name, value in x_headers(retell_invite).items()}
    payload = json.loads(json.dumps(webhook_payload(retell_invite, custom)))
    answer = example.build_response(payload, example.WebhookConfig())
    assert set(answer) == {"call_inbound"}
    inbound = answer["call_inbound"]
    assert inbound["dynamic_variables"] == {
        "caller_number": "+14155550123",
        "caller_name": "Alice Smith",
        "pbx_call_id": "NDk3ZjQ2-3cx-call-7@10.0.0.1",
    }
    # Every header sbc sent is a variable, whatever the example file's templates become.
    for name, value in x_headers(retell_invite).items():
        assert inbound["dynamic_variables"][name[2:].lower().replace("-", "_")] == value
    assert inbound["metadata"]["bridged_by"] == "sbc"
    assert inbound["metadata"]["sip_headers"]["pbx-call-id"] == "NDk3ZjQ2-3cx-call-7@10.0.0.1"
    assert "override_agent_id" not in inbound
    json.dumps(answer)  # what the server writes


def test_without_custom_sip_headers_the_caller_comes_from_from_number(
    example: ModuleType, retell_invite: Request
) -> None:
    answer = example.build_response(webhook_payload(retell_invite, None), example.WebhookConfig())
    assert answer["call_inbound"]["dynamic_variables"] == {
        "caller_number": "+14155550123",
        "caller_name": "",
    }


def test_agent_override(example: ModuleType, retell_invite: Request) -> None:
    custom = {**x_headers(retell_invite), "X-Called": "801"}
    payload = webhook_payload(retell_invite, custom)
    config = example.WebhookConfig(
        agents={"801": "agent_support", "+14155550100": "agent_sales"}, default_agent="agent_main"
    )
    # The called variable (an X-Called template) wins over Retell's to_number.
    assert example.build_response(payload, config)["call_inbound"]["override_agent_id"] == (
        "agent_support"
    )
    payload = webhook_payload(retell_invite, x_headers(retell_invite))
    assert example.build_response(payload, config)["call_inbound"]["override_agent_id"] == (
        "agent_sales"
    )
    assert example.build_response(payload, example.WebhookConfig(default_agent="agent_main"))[
        "call_inbound"
    ]["override_agent_id"] == ("agent_main")
    # No override when it would name the agent the number already has.
    same = example.WebhookConfig(default_agent="agent_12345")
    assert "override_agent_id" not in example.build_response(payload, same)["call_inbound"]


def test_other_events_and_odd_headers(example: ModuleType, retell_invite: Request) -> None:
    with pytest.raises(example.UnsupportedEvent):
        example.build_response(
            {"event": "chat_inbound", "chat_inbound": {}}, example.WebhookConfig()
        )
    with pytest.raises(example.UnsupportedEvent):
        example.build_response({"event": "call_inbound"}, example.WebhookConfig())
    odd = {"X-Flag": True, "X-List": ["a"], "X-Seq": 7, "": "x", "X-Empty": ""}
    assert example.sip_headers({"custom_sip_headers": odd}) == {"seq": "7", "empty": ""}
    assert example.sip_headers({"custom_sip_headers": "X-A: 1"}) == {}
    assert example.variable_name("Customer.Id--2") == "customer_id_2"


# Retell's SDKs: sign(input, key, t) = f"v={t},d={hmac_sha256(key, input + str(t)).hex}",
# verify within five minutes (RetellAI/retell-typescript-sdk src/lib/webhook_auth.ts).
KEY = "key_0123456789abcdef"
BODY = b'{"event":"call_inbound","call_inbound":{"from_number":"+14155550123"}}'
T = 1_790_000_000_000


def test_signature_scheme(example: ModuleType) -> None:
    import hashlib
    import hmac

    digest = hmac.new(KEY.encode(), BODY + str(T).encode(), hashlib.sha256).hexdigest()
    assert example.sign(BODY, KEY, T) == f"v={T},d={digest}"
    good = example.sign(BODY, KEY, T)
    assert example.verify_signature(BODY, KEY, good, now_ms=T + 299_000)
    assert example.verify_signature(BODY, KEY, f"v={T},d={digest.upper()}", now_ms=T)
    assert not example.verify_signature(BODY, KEY, good, now_ms=T + 300_001)  # too old
    assert not example.verify_signature(BODY, KEY, good, now_ms=T - 300_001)  # from the future
    assert not example.verify_signature(BODY + b" ", KEY, good, now_ms=T)  # body changed
    assert not example.verify_signature(BODY, "key_other", good, now_ms=T)
    for bad in (None, "", "garbage", f"v={T}", f"v={T},d=zz", f"d={digest},v={T}"):
        assert not example.verify_signature(BODY, KEY, bad, now_ms=T)
