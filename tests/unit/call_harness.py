"""A scripted engine and a harness that runs one :class:`~sbc.b2bua.call.Call` against it.

The fake engine records what the call sends (requests, ACKs, CANCELs, responses to the PBX) and
lets each test play Retell's and the PBX's part. Used by ``test_call.py`` (real but tiny timers)
and ``test_call_timers.py`` (realistic timers on a fake clock, ``looptime``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any

from sbc.b2bua.call import Call, CallState
from sbc.b2bua.messages import BridgeConfig, PbxTarget, RetellTarget
from sbc.b2bua.numbers import NumberPlan
from sbc.b2bua.templates import compile_headers
from sbc.b2bua.transfer_rules import TransferConfig
from sbc.media.base import PassthroughBackend
from sbc.net.addresses import Destination
from sbc.net.engine import IncomingRequest
from sbc.sip.digest import Credentials
from sbc.sip.headers import Headers
from sbc.sip.message import Request, Response
from sbc.sip.server_transaction import build_response
from sbc.sip.uri import parse_uri

PBX_SDP = (
    b"v=0\r\no=3cxPS 1 1 IN IP4 10.0.0.1\r\ns=3cxPS Audio call\r\nc=IN IP4 10.0.0.1\r\n"
    b"t=0 0\r\nm=audio 9000 RTP/AVP 8 0 101\r\na=rtpmap:8 PCMA/8000\r\n"
    b"a=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n"
)
RETELL_SDP = (
    b"v=0\r\no=- 7 7 IN IP4 192.0.2.9\r\ns=-\r\nc=IN IP4 192.0.2.9\r\nt=0 0\r\n"
    b"m=audio 40000 RTP/AVP 8 101\r\na=rtpmap:8 PCMA/8000\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n"
)
PBX_SOURCE = Destination("udp", "10.0.0.1", 5060)
LIMIT = 2.0  # seconds of loop time any one wait may take (fake-clock tests raise it)


class FakeConfig:
    via_host = "10.0.0.5"

    def via_port(self, transport: str) -> int:
        return 5060


class FakeHandle:
    """A client transaction: the test delivers its responses."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.responses: list[Response] = []
        self.final: Response | None = None
        self.destination = None
        self.local_failure: str | None = None  # set to fail it the way the engine does
        self._changed = asyncio.Event()
        self._subscriber: Callable[[Response], None] | None = None

    def deliver(
        self,
        status: int,
        *,
        body: bytes = b"",
        to_tag: str = "rt1",
        headers: tuple[tuple[str, str], ...] = (),
        contact: str = "<sip:retell@192.0.2.9:5060;transport=TCP>",
    ) -> Response:
        headers = (("Contact", contact), *headers)
        if body:
            headers = (*headers, ("Content-Type", "application/sdp"))
        response = build_response(
            self.request,
            status,
            to_tag=to_tag if status > 100 else None,
            headers=headers,
            body=body,
        )
        self.responses.append(response)
        subscriber = self._subscriber
        if status >= 200:
            self.final = response
            self._subscriber = None
        self._changed.set()
        if subscriber is not None:
            subscriber(response)
        return response

    def subscribe(self, callback: Callable[[Response], None]) -> None:
        """As OutgoingRequest.subscribe: past responses now, the others as delivered."""
        self._subscriber = callback
        for response in list(self.responses):
            if response.status >= 200:
                self._subscriber = None
            callback(response)

    @property
    def done(self) -> bool:
        return self.final is not None

    def __aiter__(self) -> AsyncIterator[Response]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Response]:
        index = 0
        while True:
            while index < len(self.responses):
                response = self.responses[index]
                index += 1
                yield response
                if response.status >= 200:
                    return
            self._changed.clear()
            await self._changed.wait()

    def __await__(self) -> Generator[Any, None, Response]:
        return self._final().__await__()

    async def _final(self) -> Response:
        while self.final is None:
            self._changed.clear()
            await self._changed.wait()
        return self.final


class FakeEngine:
    def __init__(self) -> None:
        self.config = FakeConfig()
        self.handles: list[FakeHandle] = []
        self.cancelled: list[FakeHandle] = []
        self.acks: list[Request] = []
        self.to_pbx: list[Response] = []
        self.sent = asyncio.Event()
        self.limit = LIMIT
        self.timeline: list[tuple[float, str]] = []  # (loop time, "BYE call-id" / "to-pbx 200")
        self._branch = 0

    def _note(self, what: str) -> None:
        self.timeline.append((asyncio.get_running_loop().time(), what))
        self.sent.set()

    def times(self, what: str) -> list[float]:
        """Loop times at which ``what`` (e.g. ``"BYE"``, ``"to-pbx 200"``) was sent."""
        return [t for t, w in self.timeline if w == what]

    def make_via(
        self, transport: str, local: str | None = None, *, branch: str | None = None
    ) -> str:
        self._branch += 1
        if branch is None:
            branch = f"z9hG4bKf{self._branch}"
        return f"SIP/2.0/{transport.upper()} 10.0.0.5:5060;branch={branch};rport"

    def send_request(
        self, request: Request, target: object = None, local: str | None = None
    ) -> FakeHandle:
        if "Via" not in request.headers:
            request = dataclasses.replace(
                request, headers=request.headers.prepend("Via", self.make_via("tcp"))
            )
        handle = FakeHandle(request)
        self.handles.append(handle)
        self._note(request.method)
        return handle

    def cancel(self, handle: FakeHandle) -> FakeHandle:
        self.cancelled.append(handle)
        self._note("CANCEL")
        return FakeHandle(handle.request)

    async def send_ack(
        self, ack: Request, target: object = None, local: str | None = None
    ) -> Request:
        self.acks.append(ack)
        self._note("ACK")
        return ack

    def respond(self, key: str, response: Response) -> None:
        self.to_pbx.append(response)
        self._note(f"to-pbx {response.status}")

    async def wait(self, predicate: Any) -> None:
        async with asyncio.timeout(self.limit):
            while not predicate():
                self.sent.clear()
                await self.sent.wait()

    def requests(self, method: str) -> list[FakeHandle]:
        return [h for h in self.handles if h.request.method == method]


def a_invite(*extra: tuple[str, str], body: bytes = PBX_SDP) -> Request:
    headers = Headers(
        [
            ("Via", "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKpbx1;rport=5060"),
            ("Record-Route", "<sip:10.0.0.1;lr>"),
            ("From", '"Alice" <sip:02071234567@10.0.0.1>;tag=pbxtag'),
            ("To", "<sip:101@10.0.0.5>"),
            ("Call-ID", "pbx-call@10.0.0.1"),
            ("CSeq", "1 INVITE"),
            ("Contact", "<sip:3cx@10.0.0.1:5060>"),
            ("Allow", "INVITE, ACK, BYE, CANCEL, UPDATE, INFO"),
            ("X-Customer-Id", "C-9"),
            *extra,
            ("Content-Type", "application/sdp"),
        ]
    )
    return Request("INVITE", parse_uri("sip:101@10.0.0.5:5060"), headers, body)


def config(**overrides: Any) -> BridgeConfig:
    values: dict[str, Any] = {
        "extension": "101",
        "retell": RetellTarget("retell.test", 5060, "tcp", "+14155550100"),
        "answer_timeout": 1.0,
        "max_duration": 5.0,
        "number_plan": NumberPlan(country_code="44"),
        "headers": compile_headers({"X-Caller-Number": "{caller_number}"}, ["X-Customer-*"]),
        "pbx_credentials": Credentials("6001auth", "secret"),
        "pbx": PbxTarget("10.0.0.1", 5060, "udp", "10.0.0.1"),
        "transfer": TransferConfig(targets={"sales": "800"}, allow=re.compile(r"^8[0-9]{2}$")),
        "t1": 0.005,
        "t2": 0.04,
    }
    values.update(overrides)
    return BridgeConfig(**values)


class Harness:
    def __init__(self, **overrides: Any) -> None:
        self._drawn = 0
        self.engine = FakeEngine()
        self.engine.limit = overrides.pop("limit", LIMIT)
        media = overrides.pop("media", None) or PassthroughBackend()
        self.incoming = IncomingRequest(
            self.engine,
            "pbx-invite",
            overrides.pop("invite", None) or a_invite(),
            PBX_SOURCE,
            None,
        )
        self.call = Call(
            self.incoming,
            config=config(**overrides),
            engine=self.engine,  # type: ignore[arg-type]
            media=media,
            call_uuid="uuid-1",
            wall_clock=lambda: 1_795_000_000.0,
            random_bytes=self._random,
        )
        self.task = asyncio.ensure_future(self.call.run())

    def _random(self, n: int) -> bytes:
        """Deterministic and never the same twice: distinct Call-IDs, tags and branches."""
        self._drawn += 1
        return self._drawn.to_bytes(n, "big")

    def state(self) -> CallState:
        return self.call.state

    async def finished(self) -> None:
        async with asyncio.timeout(self.engine.limit):
            await self.task

    async def b_invite(self) -> FakeHandle:
        await self.engine.wait(lambda: self.engine.requests("INVITE"))
        return self.engine.requests("INVITE")[0]

    def statuses(self) -> list[int]:
        return [r.status for r in self.engine.to_pbx]

    async def pbx_status(self, status: int) -> Response:
        await self.engine.wait(lambda: status in self.statuses())
        return next(r for r in self.engine.to_pbx if r.status == status)

    async def connect(self) -> FakeHandle:
        invite = await self.b_invite()
        invite.deliver(180)
        invite.deliver(200, body=RETELL_SDP)
        await self.pbx_status(200)
        self.pbx_ack(1)
        await asyncio.wait_for(self.call.up.wait(), self.engine.limit)
        return invite

    def pbx_ack(self, seq: int) -> None:
        ack = self.pbx_request("ACK", seq)
        self.call.ack_arrived(self.call.caller_leg, ack)

    def pbx_request(
        self, method: str, seq: int, *extra: tuple[str, str], body: bytes = b""
    ) -> Request:
        headers = [
            ("Via", f"SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKp{method}{seq}"),
            ("From", '"Alice" <sip:02071234567@10.0.0.1>;tag=pbxtag'),
            ("To", f"<sip:101@10.0.0.5>;tag={self.call.caller_leg.local_tag}"),
            ("Call-ID", "pbx-call@10.0.0.1"),
            ("CSeq", f"{seq} {method}"),
            ("Contact", "<sip:3cx@10.0.0.1:5060>"),
            *extra,
        ]
        if body:
            headers.append(("Content-Type", "application/sdp"))
        return Request(method, parse_uri("sip:101@10.0.0.5:5060"), Headers(headers), body)

    def send_pbx(self, request: Request) -> IncomingRequest:
        incoming = IncomingRequest(
            self.engine,
            f"pbx-{request.method}-{request.cseq.seq}",
            request,
            PBX_SOURCE,
            request.to_tag,
        )
        self.call.request_arrived(self.call.caller_leg, incoming)
        return incoming

    def send_retell(
        self,
        method: str,
        seq: int,
        invite: FakeHandle,
        *extra: tuple[str, str],
        body: bytes = b"",
        content_type: str = "application/sdp",
    ) -> IncomingRequest:
        b = invite.request
        headers = [
            ("Via", f"SIP/2.0/TCP 192.0.2.9:5060;branch=z9hG4bKr{method}{seq}"),
            ("From", "<sip:+14155550100@retell.test>;tag=rt1"),
            ("To", f"{b.headers.get('From')}"),
            ("Call-ID", b.call_id),
            ("CSeq", f"{seq} {method}"),
            ("Contact", "<sip:retell@192.0.2.9:5060;transport=tcp>"),
            *extra,
        ]
        if body:
            headers.append(("Content-Type", content_type))
        request = Request(
            method, parse_uri("sip:10.0.0.5:5060;transport=tcp"), Headers(headers), body
        )
        incoming = IncomingRequest(
            self.engine,
            f"retell-{method}-{seq}",
            request,
            Destination("tcp", "192.0.2.9", 5060),
            request.to_tag,
        )
        self.call.request_arrived(self.call.agent_leg, incoming)
        return incoming


async def answer_bye(engine: FakeEngine, index: int = 0, status: int = 200) -> FakeHandle:
    await engine.wait(lambda: len(engine.requests("BYE")) > index)
    bye = engine.requests("BYE")[index]
    bye.deliver(status, to_tag=bye.request.to_tag or "x")
    return bye
