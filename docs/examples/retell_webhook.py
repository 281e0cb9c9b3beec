#!/usr/bin/env python3
"""An example inbound webhook for Retell, for calls that sbc bridges from 3CX.

Retell POSTs ``{"event": "call_inbound", "call_inbound": {...}}`` to the number's inbound webhook
URL before it answers a call, and takes the ``call_inbound`` object of the 2xx JSON answer:
``dynamic_variables`` (strings the agent's prompt uses as ``{{name}}``), ``metadata``, and
optionally ``override_agent_id`` (https://docs.retellai.com/features/inbound-call-webhook).

What this server does with a call sbc sent:

* reads the X- headers of sbc's INVITE (the ``[headers]`` templates of sbc's settings:
  ``X-Caller-Number``, ``X-Caller-Name``, ``X-Pbx-Call-Id`` in ``deploy/sbc.toml.example``) from
  ``call_inbound.custom_sip_headers``. Retell's inbound-webhook page does not list that field in
  the request payload; Retell's SIP header page documents the headers as ``call.custom_sip_headers``
  of the call object and as dynamic variables
  (https://docs.retellai.com/build/telephony/sip-headers). Names are matched case-insensitively,
  with or without the ``x-`` prefix (Retell's pages disagree on whether it is stripped: see
  ``docs/retell.md``), and a ``sip.h.`` prefix is tolerated;
* returns them as dynamic variables with stable names (``X-Caller-Number`` ->
  ``caller_number``), so a prompt does not depend on how Retell spells the header names;
  ``caller_number`` falls back to ``from_number`` when the header is missing;
* optionally overrides the agent: ``--agent VALUE=AGENT_ID`` picks an agent by the ``called``
  variable (add ``X-Called = "{called}"`` to sbc's ``[headers]``), else by Retell's
  ``to_number``; ``--default-agent AGENT_ID`` applies otherwise;
* checks ``x-retell-signature`` when ``RETELL_API_KEY`` is set: ``v=<ms>,d=<hex>`` where ``<hex>``
  is HMAC-SHA256 keyed with the API key over the raw request body followed by ``<ms>``, and
  ``<ms>`` within five minutes of now (read from Retell's SDKs: ``src/retell/lib/webhook_auth.py``
  of RetellAI/retell-python-sdk and ``src/lib/webhook_auth.ts`` of RetellAI/retell-typescript-sdk;
  https://docs.retellai.com/features/secure-webhook). A request that fails it gets 401.

Run it (standard library only, Python 3.11+) behind an HTTPS reverse proxy::

    RETELL_API_KEY=key_... python3 docs/examples/retell_webhook.py --listen 127.0.0.1:8080 \\
        --agent +14155550100=agent_sales --default-agent agent_main
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = [
    "SIGNATURE_HEADER",
    "UnsupportedEvent",
    "WebhookConfig",
    "build_response",
    "make_server",
    "sign",
    "sip_headers",
    "variable_name",
    "verify_signature",
]

log = logging.getLogger("retell_webhook")

SIGNATURE_HEADER = "x-retell-signature"
SIGNATURE_TOLERANCE_MS = 5 * 60 * 1000  # the SDKs' FIVE_MINUTES
MAX_BODY = 64 * 1024  # an inbound webhook payload is a few hundred bytes

_SIGNATURE_RE = re.compile(r"v=(\d+),d=([0-9a-fA-F]+)")
_NOT_NAME_RE = re.compile(r"[^a-z0-9]+")


class UnsupportedEvent(ValueError):
    """The payload is not a ``call_inbound`` event."""


class WebhookConfig:
    """What the server answers with: agents by called number, a default agent, the API key."""

    def __init__(
        self,
        *,
        agents: Mapping[str, str] | None = None,
        default_agent: str | None = None,
        api_key: str | None = None,
    ) -> None:
        self.agents = dict(agents or {})
        self.default_agent = default_agent or None
        self.api_key = api_key or None


# -- the payload -----------------------------------------------------------------------------


def sip_headers(call_inbound: Mapping[str, Any]) -> dict[str, str]:
    """The INVITE's custom SIP headers as Retell reports them, keyed by the lowercased name
    without ``x-`` (``X-Caller-Number``, ``x-caller-number`` and ``caller-number`` all give
    ``caller-number``). Anything that is not a name/value pair of text or numbers is skipped."""
    raw = call_inbound.get("custom_sip_headers")
    if not isinstance(raw, Mapping):
        return {}
    out: dict[str, str] = {}
    for name, value in raw.items():
        if not isinstance(name, str) or isinstance(value, bool):
            continue
        if not isinstance(value, str | int | float):
            continue
        key = name.strip().lower()
        key = key.removeprefix("sip.h.").removeprefix("x-")
        if key:
            out[key] = str(value)
    return out


def variable_name(header_key: str) -> str:
    """A dynamic variable name for a header key: ``caller-number`` -> ``caller_number``."""
    return _NOT_NAME_RE.sub("_", header_key.lower()).strip("_")


def build_response(payload: Mapping[str, Any], config: WebhookConfig) -> dict[str, Any]:
    """The JSON answer to one inbound webhook request; raises :class:`UnsupportedEvent`."""
    if payload.get("event") != "call_inbound":
        raise UnsupportedEvent(f"event {payload.get('event')!r} is not call_inbound")
    inbound = payload.get("call_inbound")
    if not isinstance(inbound, Mapping):
        raise UnsupportedEvent("call_inbound is missing")
    headers = sip_headers(inbound)
    variables: dict[str, str] = {}
    for key, value in headers.items():
        name = variable_name(key)
        if name:
            variables[name] = value
    # Calls from sbc carry the caller's number (E.164) as the From user, which Retell reports
    # as from_number; the header is the same number when the template sends it.
    from_number = inbound.get("from_number")
    if "caller_number" not in variables and isinstance(from_number, str):
        variables["caller_number"] = from_number
    variables.setdefault("caller_name", "")
    answer: dict[str, Any] = {
        "dynamic_variables": variables,
        "metadata": {"bridged_by": "sbc", "sip_headers": headers},
    }
    agent = _agent_for(config, variables.get("called"), inbound.get("to_number"))
    if agent is not None and agent != inbound.get("agent_id"):
        answer["override_agent_id"] = agent
    return {"call_inbound": answer}


def _agent_for(config: WebhookConfig, called: str | None, to_number: object) -> str | None:
    for key in (called, to_number):
        if isinstance(key, str) and key in config.agents:
            return config.agents[key]
    return config.default_agent


# -- x-retell-signature ----------------------------------------------------------------------


def sign(body: bytes, api_key: str, timestamp_ms: int) -> str:
    """The ``x-retell-signature`` value Retell's SDKs verify for ``body`` at ``timestamp_ms``."""
    digest = hmac.new(api_key.encode(), body + str(timestamp_ms).encode(), hashlib.sha256)
    return f"v={timestamp_ms},d={digest.hexdigest()}"


def verify_signature(
    body: bytes,
    api_key: str,
    signature: str | None,
    *,
    now_ms: int | None = None,
    tolerance_ms: int = SIGNATURE_TOLERANCE_MS,
) -> bool:
    """True when ``signature`` signs the raw ``body`` with ``api_key`` within the tolerance."""
    if not signature:
        return False
    match = _SIGNATURE_RE.fullmatch(signature.strip())
    if match is None:
        return False
    stamp = int(match.group(1))
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if abs(now - stamp) > tolerance_ms:
        return False
    expected = sign(body, api_key, stamp).partition(",d=")[2]
    return hmac.compare_digest(expected, match.group(2).lower())


# -- the HTTP server -------------------------------------------------------------------------


def make_server(
    host: str, port: int, config: WebhookConfig, *, clock: Callable[[], float] = time.time
) -> ThreadingHTTPServer:
    """A threading HTTP server answering POSTs on any path (port 0 picks a free one)."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "sbc-retell-webhook-example"

        def do_POST(self) -> None:
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit() or int(length) > MAX_BODY:
                status = 411 if length is None else 413 if length.isdigit() else 400
                self._reply(status, {"error": "missing, bad or too large Content-Length"})
                return
            body = self.rfile.read(int(length))
            if config.api_key is not None and not verify_signature(
                body,
                config.api_key,
                self.headers.get(SIGNATURE_HEADER),
                now_ms=int(clock() * 1000),
            ):
                self._reply(401, {"error": "bad or missing x-retell-signature"})
                return
            try:
                payload = json.loads(body)
                if not isinstance(payload, dict):
                    raise UnsupportedEvent("payload is not a JSON object")
                answer = build_response(payload, config)
            except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
                self._reply(400, {"error": str(exc)})
                return
            self._reply(200, answer)

        def do_GET(self) -> None:
            self._reply(405, {"error": "POST only"})

        def _reply(self, status: int, document: Mapping[str, Any]) -> None:
            data = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            log.info("%s %s", self.address_string(), format % args)

    return ThreadingHTTPServer((host, port), Handler)


def _agent_pair(text: str) -> tuple[str, str]:
    value, eq, agent = text.partition("=")
    if not eq or not value or not agent:
        raise argparse.ArgumentTypeError(f"expected VALUE=AGENT_ID, got {text!r}")
    return value, agent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--listen", default="127.0.0.1:8080", help="host:port (default %(default)s)"
    )
    parser.add_argument(
        "--agent",
        action="append",
        type=_agent_pair,
        default=[],
        metavar="VALUE=AGENT_ID",
        help="override the agent when the called variable or to_number equals VALUE",
    )
    parser.add_argument("--default-agent", metavar="AGENT_ID", help="override for other calls")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    api_key = os.environ.get("RETELL_API_KEY")
    if not api_key:
        log.warning("RETELL_API_KEY is not set: x-retell-signature is NOT checked")
    config = WebhookConfig(
        agents=dict(args.agent), default_agent=args.default_agent, api_key=api_key
    )
    server = make_server(host.strip("[]") or "127.0.0.1", int(port), config)
    log.info("listening on %s:%s", *server.server_address[:2])
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
