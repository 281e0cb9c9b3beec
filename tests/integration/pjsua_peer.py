"""A pjsua2 (PJSIP) phone for the media tests, run as a process of its own.

pjsua2 is not asyncio-friendly and asserts (aborts) on some misuse; in a subprocess a crash
cannot take pytest down. One call per run:

* ``--role caller``: calls ``--target`` from ``--bind:--port`` (3CX's part: caller id, its
  User-Agent), plays a tone, sends DTMF ``--dtmf`` after a second, hangs up after ``--talk``
  seconds of connected call;
* ``--role answerer``: listens on ``--bind:--port`` over ``--transport``, answers the first
  INVITE with 180 then 200 (PCMU only, as Retell's one-codec answers), plays a tone, and stays
  until the far end hangs up.

Each side counts RTP with pjsua2's stream statistics. The process prints ``READY`` once it
listens, then one ``RESULT {json}`` line when the call is over, and exits 0 (2 on a timeout).
No sound card is needed (null audio device).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import pjsua2 as pj

PBX_USER_AGENT = "3CXPhoneSystem 18.0.9.20 (20)"


class PeerCall(pj.Call):  # type: ignore[misc]
    def __init__(self, peer: Peer, account: pj.Account, call_id: int = pj.PJSUA_INVALID_ID):
        super().__init__(account, call_id)
        self.peer = peer

    def onCallState(self, prm: Any) -> None:
        info = self.getInfo()
        self.peer.state(info)

    def onCallMediaState(self, prm: Any) -> None:
        info = self.getInfo()
        for index, media in enumerate(info.media):
            if media.type == pj.PJMEDIA_TYPE_AUDIO and media.status == pj.PJSUA_CALL_MEDIA_ACTIVE:
                audio = self.getAudioMedia(index)
                self.peer.tone.startTransmit(audio)

    def onDtmfDigit(self, prm: Any) -> None:
        self.peer.digits.append(prm.digit)


class PeerAccount(pj.Account):  # type: ignore[misc]
    def __init__(self, peer: Peer) -> None:
        super().__init__()
        self.peer = peer

    def onIncomingCall(self, prm: Any) -> None:
        self.peer.incoming(PeerCall(self.peer, self, prm.callId), prm.rdata.wholeMsg)


class Peer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ep = pj.Endpoint()
        self.call: PeerCall | None = None
        self.account: PeerAccount | None = None
        self.tone: Any = None
        self.digits: list[str] = []
        self.invite = ""
        self.incoming_at: float | None = None
        self.answered = False
        self.connected_at: float | None = None
        self.disconnected = False
        self.last_status = 0
        self.last_reason = ""
        self.states: list[str] = []
        self.rx = self.tx = self.rx_bytes = 0
        self.dtmf_sent = False
        self.hung_up = False

    # -- set-up ---------------------------------------------------------------------------------
    def start(self) -> None:
        args = self.args
        self.ep.libCreate()
        cfg = pj.EpConfig()
        cfg.uaConfig.threadCnt = 0
        cfg.uaConfig.mainThreadOnly = True
        cfg.uaConfig.maxCalls = 4
        cfg.uaConfig.userAgent = PBX_USER_AGENT if args.role == "caller" else "LiveKit"
        cfg.logConfig.level = 4
        cfg.logConfig.consoleLevel = 0
        if args.log:
            cfg.logConfig.filename = args.log
        cfg.medConfig.noVad = True
        cfg.medConfig.threadCnt = 0
        self.ep.libInit(cfg)
        transport = pj.TransportConfig()
        transport.boundAddress = args.bind
        transport.publicAddress = args.bind
        transport.port = args.port
        kind = pj.PJSIP_TRANSPORT_TCP if args.transport == "tcp" else pj.PJSIP_TRANSPORT_UDP
        transport_id = self.ep.transportCreate(kind, transport)
        self.ep.libStart()
        self.ep.audDevManager().setNullDev()
        if args.role == "answerer":
            # Retell's (LiveKit's) answer carries exactly one codec.
            for codec in self.ep.codecEnum2():
                keep = codec.codecId.upper().startswith("PCMU/")
                self.ep.codecSetPriority(codec.codecId, 255 if keep else 0)
        acc = pj.AccountConfig()
        acc.idUri = args.id_uri
        acc.sipConfig.transportId = transport_id
        acc.mediaConfig.transportConfig.boundAddress = args.bind
        acc.mediaConfig.transportConfig.publicAddress = args.bind
        acc.natConfig.iceEnabled = False
        acc.natConfig.sdpNatRewriteUse = 0
        acc.natConfig.viaRewriteUse = 0
        acc.natConfig.contactRewriteUse = 0
        self.account = PeerAccount(self)
        self.account.create(acc, True)
        self.tone = pj.ToneGenerator()
        self.tone.createToneGenerator()
        tones = pj.ToneDescVector()
        desc = pj.ToneDesc()
        desc.freq1 = args.tone
        desc.freq2 = args.tone
        desc.on_msec = 1000
        desc.off_msec = 0
        desc.volume = 0
        tones.append(desc)
        self.tone.play(tones, True)

    # -- callbacks ------------------------------------------------------------------------------
    def state(self, info: Any) -> None:
        self.states.append(info.stateText)
        self.last_status = info.lastStatusCode
        self.last_reason = info.lastReason
        if info.state == pj.PJSIP_INV_STATE_CONFIRMED and self.connected_at is None:
            self.connected_at = time.monotonic()
        if info.state == pj.PJSIP_INV_STATE_DISCONNECTED:
            self.disconnected = True

    def incoming(self, call: PeerCall, whole_msg: str) -> None:
        if self.call is not None:
            busy = pj.CallOpParam()
            busy.statusCode = 486
            call.hangup(busy)
            return
        self.call = call
        self.invite = whole_msg
        self.incoming_at = time.monotonic()
        ringing = pj.CallOpParam()
        ringing.statusCode = 180
        call.answer(ringing)

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> int:
        args = self.args
        print("READY", flush=True)
        if args.role == "caller":
            self.call = PeerCall(self, self.account)
            prm = pj.CallOpParam(True)
            self.call.makeCall(args.target, prm)
        deadline = time.monotonic() + args.max_time
        while not self.disconnected and time.monotonic() < deadline:
            self.ep.libHandleEvents(10)
            self.tick(time.monotonic())
        if not self.disconnected and self.call is not None:
            self.ep.hangupAllCalls()
        end = time.monotonic() + 1.0
        while time.monotonic() < end and not self.disconnected:
            self.ep.libHandleEvents(10)
        result = {
            "role": args.role,
            "connected": self.connected_at is not None,
            "disconnected": self.disconnected,
            "hung_up_here": self.hung_up,
            "last_status": self.last_status,
            "last_reason": self.last_reason,
            "states": self.states,
            "rx_packets": self.rx,
            "tx_packets": self.tx,
            "rx_bytes": self.rx_bytes,
            "digits": self.digits,
            "invite": self.invite,
        }
        print("RESULT " + json.dumps(result), flush=True)
        return 0 if self.disconnected else 2

    def tick(self, now: float) -> None:
        call = self.call
        if call is None:
            return
        args = self.args
        ringing_since = self.incoming_at
        if not self.answered and ringing_since is not None and now - ringing_since >= args.ring:
            ok = pj.CallOpParam()
            ok.statusCode = 200
            call.answer(ok)
            self.answered = True
        if self.connected_at is None or self.disconnected:
            return
        self.sample(call)
        if args.role != "caller":
            return
        if args.dtmf and not self.dtmf_sent and now - self.connected_at >= 1.0:
            call.dialDtmf(args.dtmf)  # RFC 4733 telephone-event, pjsua2's default method
            self.dtmf_sent = True
        if not self.hung_up and now - self.connected_at >= args.talk:
            self.sample(call)
            self.hung_up = True
            call.hangup(pj.CallOpParam(True))

    def sample(self, call: PeerCall) -> None:
        try:
            stat = call.getStreamStat(0)
        except pj.Error:
            return
        self.rx = stat.rtcp.rxStat.pkt
        self.tx = stat.rtcp.txStat.pkt
        self.rx_bytes = stat.rtcp.rxStat.bytes

    def stop(self) -> None:
        # Every Call must be gone before the endpoint, or PJSUA asserts at exit.
        self.call = None
        if self.tone is not None:
            self.tone = None
        self.account = None
        self.ep.libDestroy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--role", choices=("caller", "answerer"), required=True)
    parser.add_argument("--bind", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--transport", choices=("udp", "tcp"), default="udp")
    parser.add_argument("--id-uri", required=True)
    parser.add_argument("--target", default="")
    parser.add_argument("--talk", type=float, default=3.0)
    parser.add_argument("--ring", type=float, default=0.3)
    parser.add_argument("--dtmf", default="")
    parser.add_argument("--tone", type=int, default=440)
    parser.add_argument("--max-time", type=float, default=20.0)
    parser.add_argument("--log", default="")
    peer = Peer(parser.parse_args())
    peer.start()
    try:
        return peer.run()
    finally:
        peer.stop()


if __name__ == "__main__":
    sys.exit(main())
