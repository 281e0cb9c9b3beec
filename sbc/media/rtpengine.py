"""Client of rtpengine's NG control protocol, and the media backend built on it.

The NG protocol (rtpengine docs, "The ng Control Protocol"): each UDP datagram is a cookie, one
space, and a bencoded dictionary. The request dictionary carries `command` (`ping`, `offer`,
`answer`, `delete`, `query`, ...); the reply carries the same cookie and a dictionary whose
`result` is `ok` (`pong` for ping), or `error` with a human-readable `error-reason`. rtpengine
detects a retransmission by its cookie and answers it from a cache, so a retry resends the very
same bytes.

`NgClient` is the asyncio shell: one connected UDP socket, a cookie per request (a random token
per client plus a counter), replies matched to requests by cookie, each request retransmitted
`tries` times `timeout` seconds apart before it fails with `RtpengineTimeout`.

`RtpengineBackend` drives one rtpengine call per bridged call: the offer of either side goes to
rtpengine with that side's name (`a`: the caller's leg, `b`: the far leg, the agent or after a
transfer the human) as `from-tag`, the answer of the other side with its name as `to-tag`;
rtpengine rewrites each SDP to point at its own ports and forwards RTP between them.

SIP INFO DTMF (``send_dtmf``) uses the NG `play DTMF` command (documented in the NG protocol;
the Debian 10.5 binary has it): rtpengine injects the digit as RFC 4733 events toward the side
when that side negotiated telephone-event, as an in-band tone otherwise. It needs the
`inject DTMF` flag in every offer and answer of the call, which sends all of the call's audio
through rtpengine's transcoding engine (no kernel forwarding, more CPU), so it is off unless the
backend is built with ``inject_dtmf=True``; without it ``send_dtmf`` returns False and the
bridge only logs the digit.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sbc.media.base import (
    DEFAULT_CODECS,
    SIDES,
    MediaBackend,
    MediaSession,
    Side,
    clamp_dtmf_duration,
    media_address,
    other_side,
)
from sbc.media.bencode import BencodeError, Encodable, decode, encode, to_text
from sbc.media.rtp import DTMF_EVENTS
from sbc.sdp.model import SdpError, SessionDescription
from sbc.sdp.parser import parse_sdp, serialize_sdp
from sbc.sip.errors import ServiceUnavailable

__all__ = [
    "DEFAULT_ANSWER_OPTIONS",
    "DEFAULT_OFFER_OPTIONS",
    "NgClient",
    "NgReply",
    "RtpengineBackend",
    "RtpengineError",
    "RtpengineSession",
    "RtpengineTimeout",
    "StreamCounters",
    "rtp_totals",
]

NgReply = dict[str, Any]

# Options for a B2BUA bridging two plain RTP/AVP IPv4 sides (a PBX caller and a Retell agent)
# through one rtpengine interface:
# - replace origin and session-connection: the o= and session c= lines carry rtpengine's address,
#   so nothing of one side's addressing leaks into the other;
# - ICE remove: neither side uses ICE; strip any candidates rather than let rtpengine add its own;
# - trust-address: media goes where the SDP says (the B2BUA is not the SIP source of the media);
#   rtpengine's endpoint learning (symmetric RTP, its default) still latches onto the first
#   packets, which Retell needs since its media addresses are not published;
# - transport-protocol RTP/AVP and SDES off: plain RTP toward both sides, no crypto offered.
# `direction` is not needed with one interface.
DEFAULT_OFFER_OPTIONS: Mapping[str, Encodable] = {
    "replace": ["origin", "session-connection"],
    "ICE": "remove",
    "flags": ["trust-address"],
    "transport-protocol": "RTP/AVP",
    "SDES": ["off"],
}
DEFAULT_ANSWER_OPTIONS: Mapping[str, Encodable] = {
    "replace": ["origin", "session-connection"],
    "ICE": "remove",
    "flags": ["trust-address"],
}


class RtpengineError(ServiceUnavailable):
    """rtpengine answered `result: error` (or something that is not a valid reply).

    A call whose media cannot be set up is answered 503 (the status this error carries)."""

    def __init__(self, command: str, reason: str) -> None:
        super().__init__(f"rtpengine {command!r} failed: {reason}")
        self.command = command
        self.reason = reason


class RtpengineTimeout(RtpengineError):
    """No reply after every retransmission."""


class _NgProtocol(asyncio.DatagramProtocol):
    """Routes each reply datagram to the future waiting on its cookie."""

    def __init__(self, pending: dict[bytes, asyncio.Future[bytes]]) -> None:
        self.pending = pending
        self.stray_replies = 0
        self.last_error: Exception | None = None

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        cookie, sep, body = data.partition(b" ")
        waiter = self.pending.get(cookie)
        if not sep or waiter is None or waiter.done():
            # A reply to a request that already timed out or was answered (a retransmission's
            # duplicate), or garbage: nobody waits for it.
            self.stray_replies += 1
            return
        waiter.set_result(body)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable on the connected socket: rtpengine not (yet) listening. Keep
        # retransmitting; the error is named if the request finally times out.
        self.last_error = exc


class NgClient:
    """An NG protocol client over UDP. Use `async with NgClient(...)` or `start()`/`close()`."""

    def __init__(
        self,
        address: tuple[str, int],
        *,
        timeout: float = 1.0,
        tries: int = 3,
        token: str | None = None,
    ) -> None:
        if tries < 1 or timeout <= 0:
            raise ValueError("tries must be >= 1 and timeout > 0")
        self.address = address
        self.timeout = timeout
        self.tries = tries
        self._token = token if token is not None else secrets.token_hex(6)
        self._counter = itertools.count(1)
        self._pending: dict[bytes, asyncio.Future[bytes]] = {}
        self._protocol = _NgProtocol(self._pending)
        self._transport: asyncio.DatagramTransport | None = None
        self.requests_sent = 0
        self.retransmissions = 0

    async def start(self) -> None:
        if self._transport is not None:
            return
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: self._protocol, remote_addr=self.address
        )
        self._transport = transport

    def attach(self, transport: asyncio.DatagramTransport) -> _NgProtocol:
        """Use an already made transport (tests); returns the protocol to feed replies to."""
        self._transport = transport
        return self._protocol

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        for waiter in self._pending.values():
            if not waiter.done():
                waiter.cancel()
        self._pending.clear()

    async def __aenter__(self) -> NgClient:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def stray_replies(self) -> int:
        return self._protocol.stray_replies

    def _next_cookie(self) -> bytes:
        return f"{self._token}_{next(self._counter)}".encode("ascii")

    async def request(self, command: str, params: Mapping[str, Encodable] | None = None) -> NgReply:
        """Send one command and return its reply dictionary (strings as str).

        Raises RtpengineError on `result: error` or a malformed reply, RtpengineTimeout when no
        reply came after `tries` sends `timeout` seconds apart."""
        if self._transport is None:
            raise RuntimeError("NgClient is not started")
        message: dict[str, Encodable] = dict(params or {})
        message["command"] = command
        cookie = self._next_cookie()
        datagram = cookie + b" " + encode(message)
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[cookie] = waiter
        try:
            body = await self._send_until_answered(datagram, waiter, command)
        finally:
            self._pending.pop(cookie, None)
        return self._parse_reply(command, body)

    async def _send_until_answered(
        self, datagram: bytes, waiter: asyncio.Future[bytes], command: str
    ) -> bytes:
        for attempt in range(self.tries):
            if self._transport is None:
                raise RtpengineError(command, "client closed while waiting for the reply")
            self._transport.sendto(datagram)
            if attempt:
                self.retransmissions += 1
            else:
                self.requests_sent += 1
            try:
                return await asyncio.wait_for(asyncio.shield(waiter), self.timeout)
            except TimeoutError:
                continue
        detail = (
            f" (last socket error: {self._protocol.last_error})"
            if self._protocol.last_error
            else ""
        )
        raise RtpengineTimeout(
            command,
            f"no reply from {self.address[0]}:{self.address[1]} after {self.tries} tries "
            f"{self.timeout:g} s apart{detail}",
        )

    @staticmethod
    def _parse_reply(command: str, body: bytes) -> NgReply:
        try:
            reply = to_text(decode(body))
        except BencodeError as exc:
            raise RtpengineError(command, f"malformed reply: {exc}") from exc
        if not isinstance(reply, dict):
            raise RtpengineError(command, "reply is not a dictionary")
        result = reply.get("result")
        if result == "error":
            raise RtpengineError(command, str(reply.get("error-reason", "no error-reason given")))
        if result not in ("ok", "pong"):
            # e.g. "load limit" (the `supports: load limit` extension) or no result at all.
            raise RtpengineError(command, f"unexpected result {result!r}")
        return reply

    # --- commands --------------------------------------------------------------------------

    async def ping(self) -> None:
        reply = await self.request("ping")
        if reply.get("result") != "pong":
            raise RtpengineError("ping", f"answered {reply.get('result')!r} instead of 'pong'")

    async def offer(
        self,
        call_id: str,
        from_tag: str,
        sdp: str,
        *,
        to_tag: str | None = None,
        options: Mapping[str, Encodable] = DEFAULT_OFFER_OPTIONS,
    ) -> str:
        """Return the SDP to send on to the answerer (rtpengine's ports and address in it)."""
        params: dict[str, Encodable] = {**options, "call-id": call_id, "from-tag": from_tag}
        params["sdp"] = sdp
        if to_tag is not None:
            params["to-tag"] = to_tag
        return _sdp_of(await self.request("offer", params), "offer")

    async def answer(
        self,
        call_id: str,
        from_tag: str,
        to_tag: str,
        sdp: str,
        *,
        options: Mapping[str, Encodable] = DEFAULT_ANSWER_OPTIONS,
    ) -> str:
        """`from_tag` is the offerer's tag, `to_tag` the answerer's; returns the SDP for the
        offerer."""
        params: dict[str, Encodable] = {
            **options,
            "call-id": call_id,
            "from-tag": from_tag,
            "to-tag": to_tag,
            "sdp": sdp,
        }
        return _sdp_of(await self.request("answer", params), "answer")

    async def delete(self, call_id: str, from_tag: str | None = None) -> NgReply:
        """Delete the call at once (`delete-delay` 0). Returns the reply, with its `totals`.

        An unknown call is not an error here (rtpengine answers ok with a warning, which the
        reply carries under `warning`)."""
        params: dict[str, Encodable] = {"call-id": call_id, "delete-delay": 0}
        if from_tag is not None:
            params["from-tag"] = from_tag
        return await self.request("delete", params)

    async def query(self, call_id: str) -> NgReply:
        """The call's tags, streams and counters (`totals`); RtpengineError if unknown."""
        return await self.request("query", {"call-id": call_id})


def _sdp_of(reply: NgReply, command: str) -> str:
    sdp = reply.get("sdp")
    if not isinstance(sdp, str) or not sdp:
        raise RtpengineError(command, "reply carries no sdp")
    return sdp


@dataclass(frozen=True, slots=True)
class StreamCounters:
    """Packets and bytes rtpengine counted for a call (its `totals.RTP`)."""

    packets: int = 0
    bytes: int = 0
    errors: int = 0


def rtp_totals(reply: NgReply) -> StreamCounters:
    """The `totals.RTP` of a query or delete reply (zeros when absent)."""
    totals = reply.get("totals")
    rtp = totals.get("RTP") if isinstance(totals, dict) else None
    if not isinstance(rtp, dict):
        return StreamCounters()

    def _int(key: str) -> int:
        value = rtp.get(key)
        return value if isinstance(value, int) else 0

    return StreamCounters(_int("packets"), _int("bytes"), _int("errors"))


# --- the media backend -------------------------------------------------------------------------

# Re-offers that move a side's media keep rtpengine's local ports (the other side is never told
# of the change: the bridge answers re-INVITEs itself).
_REOFFER_FLAGS = ["trust-address", "port-latching"]
_INJECT_DTMF_FLAG = "inject-DTMF"
# rtpengine's `play DTMF` takes 100 ms to 5 s (NG protocol docs).
_PLAY_DTMF_MIN_MS = 100


def _with_flag(options: Mapping[str, Encodable], flag: str) -> dict[str, Encodable]:
    """``options`` with ``flag`` added to its ``flags`` list."""
    flags = options.get("flags", [])
    present = list(flags) if isinstance(flags, list | tuple) else [flags]
    return {**options, "flags": present if flag in present else [*present, flag]}


def _side_counters(reply: NgReply, tag: str) -> dict[str, Any]:
    """Counters of what rtpengine received from the side with `tag` (its streams face that side),
    with the UNIX time of the last packet."""
    out: dict[str, Any] = {"local_port": None, "rtp": {}, "rtcp": {}, "last_packet": None}
    tags = reply.get("tags")
    monologue = tags.get(tag) if isinstance(tags, dict) else None
    if not isinstance(monologue, dict):
        return out
    for media in monologue.get("medias") or []:
        streams = media.get("streams") if isinstance(media, dict) else None
        for stream in streams or []:
            if not isinstance(stream, dict):
                continue
            flags = stream.get("flags") or []
            kind = "rtcp" if "RTCP" in flags else "rtp"
            if out[kind]:
                continue  # the first audio stream only, as the relay counts
            stats = stream.get("stats")
            if not isinstance(stats, dict):
                stats = {}
            out[kind] = {k: stats.get(k, 0) for k in ("packets", "bytes", "errors")}
            if kind == "rtp":
                out["local_port"] = stream.get("local port")
            last = stream.get("last packet")
            if isinstance(last, int) and (out["last_packet"] is None or last > out["last_packet"]):
                out["last_packet"] = last
    return out


class RtpengineSession(MediaSession):
    """One call's media in rtpengine: call-id `call_id`, one tag per side (the side's name)."""

    def __init__(self, call_id: str, backend: RtpengineBackend) -> None:
        super().__init__(call_id, codecs=backend.codecs)
        self._backend = backend
        self._loop = asyncio.get_running_loop()
        self.created = self._loop.time()
        self._offerer: Side | None = None  # side whose offer awaits an answer
        self._first_offerer: Side | None = None  # its tag names the call in `delete`
        self._negotiated = False
        self._last_reply: NgReply = {}
        self._last_activity: dict[Side, float] = {}
        self.close_error: str | None = None

    @property
    def client(self) -> NgClient:
        return self._backend.client

    # -- MediaSession -------------------------------------------------------------------------

    async def offer(self, side: Side, sdp: SessionDescription) -> SessionDescription:
        self._check_open()
        filtered = self.filter(sdp)
        self._learn(side, filtered)
        to = other_side(side)
        # After the first exchange rtpengine knows both tags; naming the other one lets it match
        # a re-offer from either side to the existing dialogue.
        out = await self.client.offer(
            self.call_id,
            side,
            serialize_sdp(filtered).decode("utf-8", "surrogateescape"),
            to_tag=to if self._negotiated else None,
            options=self._backend.offer_options,
        )
        self._offerer = side
        if self._first_offerer is None:
            self._first_offerer = side
        return self._forward(to, out, "offer")

    async def answer(self, side: Side, sdp: SessionDescription) -> SessionDescription:
        self._check_open()
        offerer = other_side(side)
        if self._offerer != offerer:
            raise RuntimeError(f"answer on {side!r} without an offer from {offerer!r}")
        self._learn(side, sdp)
        out = await self.client.answer(
            self.call_id,
            offerer,
            side,
            serialize_sdp(sdp).decode("utf-8", "surrogateescape"),
            options=self._backend.answer_options,
        )
        self._offerer = None
        self._negotiated = True
        return self._forward(offerer, out, "answer")

    async def reoffer(self, side: Side, sdp: SessionDescription) -> SessionDescription:
        """As the base class (the bridge answers it), and when the re-offer moves `side`'s media
        to a new address or port, tell rtpengine with an offer/answer round of its own, keeping
        its local ports, so forwarding follows the move."""
        before = self._received.get(side)
        answer = await super().reoffer(side, sdp)
        moved_to = media_address(sdp)
        far = self._received.get(other_side(side))
        if (
            self._negotiated
            and far is not None
            and moved_to is not None
            and (before is None or moved_to != media_address(before))
        ):
            options = {**self._backend.offer_options, "flags": self._backend.reoffer_flags}
            await self.client.offer(
                self.call_id,
                side,
                serialize_sdp(self.filter(sdp)).decode("utf-8", "surrogateescape"),
                to_tag=other_side(side),
                options=options,
            )
            await self.client.answer(
                self.call_id,
                side,
                other_side(side),
                serialize_sdp(far).decode("utf-8", "surrogateescape"),
                options={**self._backend.answer_options, "flags": self._backend.reoffer_flags},
            )
        return answer

    def _forward(self, to: Side, sdp_text: str, command: str) -> SessionDescription:
        try:
            rewritten = parse_sdp(sdp_text)
        except SdpError as exc:
            raise RtpengineError(command, f"rewritten SDP does not parse: {exc}") from exc
        return self._stamp(to, rewritten, rewritten.origin.address)

    async def send_dtmf(self, side: Side, digit: str, duration_ms: int) -> bool:
        """NG `play DTMF` toward ``side``; False (nothing asked) unless the backend was built with
        ``inject_dtmf`` and the call is negotiated. May raise :class:`RtpengineError`."""
        digit = digit.upper()
        if (
            self.closed
            or not self._backend.inject_dtmf
            or not self._negotiated
            or digit not in DTMF_EVENTS
        ):
            return False
        # The participant named is the one the digit comes from, not the one hearing it.
        duration = max(clamp_dtmf_duration(duration_ms), _PLAY_DTMF_MIN_MS)
        params: dict[str, Encodable] = {
            "call-id": self.call_id,
            "from-tag": other_side(side),
            "code": digit,
            "duration": duration,
        }
        await self.client.request("play DTMF", params)
        return True

    def local_endpoint(self, side: Side) -> tuple[str, int] | None:
        sent = self._sent.get(side)
        return None if sent is None else media_address(sent)

    def last_activity(self, side: Side) -> float | None:
        """From the last `refresh()` (the backend's poller runs it); None when no poller runs
        (rtpengine's own `--timeout` then ends dead calls)."""
        if not self._backend.poll_interval:
            return None
        return self._last_activity.get(side, self.created)

    async def refresh(self) -> NgReply:
        """Query rtpengine for this call's counters; updates `stats()` and `last_activity`."""
        reply = await self.client.query(self.call_id)
        self._absorb(reply)
        return reply

    def _absorb(self, reply: NgReply) -> None:
        self._last_reply = reply
        now_loop, now_unix = self._loop.time(), time.time()
        for side in SIDES:
            last = _side_counters(reply, side)["last_packet"]
            if isinstance(last, int):
                self._last_activity[side] = max(self.created, now_loop - (now_unix - last))

    def stats(self) -> dict[str, Any]:
        totals = rtp_totals(self._last_reply)
        sides = {side: _side_counters(self._last_reply, side) for side in SIDES}
        result: dict[str, Any] = {
            "backend": "rtpengine",
            "call_id": self.call_id,
            "sides": sides,
            "totals": {"packets": totals.packets, "bytes": totals.bytes, "errors": totals.errors},
        }
        if self.close_error is not None:
            result["close_error"] = self.close_error
        return result

    async def close(self) -> None:
        """Delete the call in rtpengine (its final counters stay in `stats()`). A failure to
        reach rtpengine is kept in `stats()["close_error"]`, not raised: rtpengine's own
        timeout ends a call nobody deletes."""
        if self.closed:
            return
        self.closed = True
        self._backend.sessions.discard(self)
        try:
            # With a from-tag rtpengine's reply carries the final counters; without one (no
            # offer ever succeeded) it still deletes whatever a half-done offer created.
            reply = await self.client.delete(self.call_id, self._first_offerer)
        except RtpengineError as exc:
            self.close_error = str(exc)
        else:
            if "warning" not in reply:
                self._absorb(reply)

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("media session is closed")


class RtpengineBackend(MediaBackend):
    """Media through an rtpengine daemon controlled over NG at `address` (UDP).

    `poll_interval` (seconds), when set, makes the backend query every open call that often so
    `last_activity` reflects real media (one query per call per interval). `inject_dtmf` marks
    every call for `play DTMF` (module docstring: it costs transcoding-engine CPU)."""

    def __init__(
        self,
        address: tuple[str, int],
        *,
        codecs: Sequence[str] = DEFAULT_CODECS,
        timeout: float = 1.0,
        tries: int = 3,
        poll_interval: float | None = None,
        offer_options: Mapping[str, Encodable] = DEFAULT_OFFER_OPTIONS,
        answer_options: Mapping[str, Encodable] = DEFAULT_ANSWER_OPTIONS,
        inject_dtmf: bool = False,
    ) -> None:
        self.client = NgClient(address, timeout=timeout, tries=tries)
        self.codecs = tuple(codecs)
        self.poll_interval = poll_interval
        self.inject_dtmf = inject_dtmf
        self.offer_options: Mapping[str, Encodable] = offer_options
        self.answer_options: Mapping[str, Encodable] = answer_options
        self.reoffer_flags: list[Encodable] = list(_REOFFER_FLAGS)
        if inject_dtmf:
            # rtpengine docs, `play DTMF`: the flag must be in both the offer and the answer.
            self.offer_options = _with_flag(offer_options, _INJECT_DTMF_FLAG)
            self.answer_options = _with_flag(answer_options, _INJECT_DTMF_FLAG)
            self.reoffer_flags.append(_INJECT_DTMF_FLAG)
        self.sessions: set[RtpengineSession] = set()
        self._poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open the control socket and check rtpengine answers `ping` (RtpengineError if not)."""
        await self.client.start()
        await self.client.ping()
        if self.poll_interval and self._poller is None:
            self._poller = asyncio.create_task(self._poll(self.poll_interval))

    async def allocate(self, call_id: str) -> RtpengineSession:
        await self.client.start()
        session = RtpengineSession(call_id, self)
        self.sessions.add(session)
        return session

    async def _poll(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            for session in list(self.sessions):
                if session.closed or not session._negotiated:
                    continue
                with contextlib.suppress(RtpengineError):
                    await session.refresh()

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        self.client.close()
