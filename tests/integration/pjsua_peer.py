"""A pjsua2 (PJSIP) phone for the media and transfer tests, run as a process of its own.

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

Options for the transfer tests (all off by default):

* ``--answer STATUS``: the answerer's final answer after ``--ring`` seconds: 200, a failure
  (486...), or 0 to ring until the caller gives up (CANCEL);
* ``--late-offer``: the caller's INVITE carries no SDP (``PJSUA_CALL_NO_SDP_OFFER``);
* ``--codecs PCMU,G722``: the codecs enabled (default: the answerer PCMU only, the caller all);
* ``--talk 0``: the caller hangs up only when told (``--control``);
* ``--control``: commands on stdin, one a line (``hangup``; ``xfer URI``: a REFER in the call,
  pjsua2's ``Call.xfer``), and what happens on stdout as it happens: ``EVENT {json}`` (call
  states, media, received offers, the NOTIFYs received in the call with their sipfrag status
  line and Subscription-State, and the transfer statuses pjsua2 reports: 100 once the REFER is
  accepted, then each NOTIFY's) and, with ``--record-dir``, one ``WINDOW {json}`` per
  ``--window`` seconds of connected call: the RTP packets received and sent in it (stream
  statistics) and the tone decoded from what was heard (the call's audio recorded to a WAV file
  per window, then its zero-crossing frequency and, per ``--probe`` frequency, the share of the
  window's energy at it, Goertzel).
  Times are ``time.monotonic()``, one clock for every process of the machine.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import itertools
import json
import math
import os
import select
import sys
import time
import wave
from pathlib import Path
from typing import Any

import pjsua2 as pj

PBX_USER_AGENT = "3CXPhoneSystem 18.0.9.20 (20)"
WAV_WAIT = 2.0  # seconds a recorded window's WAV may take to be complete
TONE_BLOCK = 0.04  # seconds of audio per Goertzel sum (tone_of)


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
                self.peer.media_active(audio)

    def onDtmfDigit(self, prm: Any) -> None:
        self.peer.digits.append(prm.digit)

    def onCallTransferStatus(self, prm: Any) -> None:
        self.peer.transfer_status(prm.statusCode, prm.reason, prm.finalNotify)

    def onCallTsxState(self, prm: Any) -> None:
        # A NOTIFY received in the call's dialog (about our REFER): its sipfrag, as sent.
        event = prm.e
        if event.type != pj.PJSIP_EVENT_TSX_STATE:
            return
        state = event.body.tsxState
        if state.type == pj.PJSIP_EVENT_RX_MSG and state.tsx.method == "NOTIFY":
            self.peer.notify_received(state.src.rdata.wholeMsg)

    def onCallRxOffer(self, prm: Any) -> None:
        # pjsua2 answers it as usual (statusCode stays 200): only counted.
        self.peer.rx_offers += 1
        self.peer.emit("rx_offer")


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
        # --control, --record-dir: the transfer tests' view of the call.
        self.rx_offers = 0
        self.transfers: list[dict[str, Any]] = []
        self.notifies: list[dict[str, Any]] = []
        self.audio: Any = None  # the call's AudioMedia while media is active
        self.recorder: Any = None
        self.recording: Path | None = None
        self.window_start = 0.0
        self.window_rx = self.window_tx = 0  # stream counters when the window began
        self.windows: list[dict[str, Any]] = []
        # Windows recorded, whose WAV pjsua2 has not finished yet (the conference bridge
        # removes a recorder in its own clock thread, some time after it was destroyed).
        self.pending: list[tuple[dict[str, Any], Path, float]] = []
        self.window_count = 0
        self.probes = [int(f) for f in args.probe.split(",") if f.strip()]
        self._stdin = b""
        self._stdin_open = args.control

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
        codecs = args.codecs or ("PCMU" if args.role == "answerer" else "")
        if codecs:
            # Retell's (LiveKit's) answer carries exactly one codec.
            wanted = [c.strip().upper() + "/" for c in codecs.split(",")]
            for codec in self.ep.codecEnum2():
                name = codec.codecId.upper()
                rank = next((i for i, w in enumerate(wanted) if name.startswith(w)), None)
                self.ep.codecSetPriority(codec.codecId, 0 if rank is None else 255 - rank)
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
    def emit(self, kind: str, **data: Any) -> None:
        """One ``EVENT`` line (``--control`` only: nobody reads stdout during the call else)."""
        if self.args.control:
            print("EVENT " + json.dumps({"kind": kind, "t": time.monotonic(), **data}), flush=True)

    def state(self, info: Any) -> None:
        self.states.append(info.stateText)
        self.last_status = info.lastStatusCode
        self.last_reason = info.lastReason
        self.emit("state", state=info.stateText, status=info.lastStatusCode)
        if info.state == pj.PJSIP_INV_STATE_CONFIRMED and self.connected_at is None:
            self.connected_at = time.monotonic()
            self.emit("connected")
        if info.state == pj.PJSIP_INV_STATE_DISCONNECTED:
            self.disconnected = True
            self.audio = None  # its conference port is gone with the call
            self.emit("disconnected", status=info.lastStatusCode, reason=info.lastReason)

    def media_active(self, audio: Any) -> None:
        """The call's audio is (again) up: what it hears goes to the window's recorder."""
        self.audio = audio
        self.emit("media")
        if self.recorder is not None:
            audio.startTransmit(self.recorder)

    def notify_received(self, message: str) -> None:
        head, _, body = message.replace("\r\n", "\n").partition("\n\n")
        fields = {}
        for line in head.split("\n")[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        self.notifies.append(
            {
                "cseq": fields.get("cseq", ""),
                "event": fields.get("event", fields.get("o", "")),
                "state": fields.get("subscription-state", ""),
                "type": fields.get("content-type", fields.get("c", "")),
                "sipfrag": body.strip().split("\n", 1)[0],
            }
        )
        self.emit("notify", **self.notifies[-1])

    def transfer_status(self, status: int, reason: str, final: bool) -> None:
        self.transfers.append({"status": status, "reason": reason, "final": final})
        self.emit("xfer_status", status=status, reason=reason, final=final)

    def incoming(self, call: PeerCall, whole_msg: str) -> None:
        if self.call is not None:
            busy = pj.CallOpParam()
            busy.statusCode = 486
            call.hangup(busy)
            return
        self.call = call
        self.invite = whole_msg
        self.incoming_at = time.monotonic()
        self.emit("incoming")
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
            if args.late_offer:
                prm.opt.flag |= pj.PJSUA_CALL_NO_SDP_OFFER
            self.call.makeCall(args.target, prm)
        deadline = time.monotonic() + args.max_time
        while not self.disconnected and time.monotonic() < deadline:
            self.ep.libHandleEvents(10)
            self.tick(time.monotonic())
            self.commands()
            self.finish_windows(time.monotonic())
        if not self.disconnected and self.call is not None:
            self.ep.hangupAllCalls()
        end = time.monotonic() + 1.0
        while time.monotonic() < end and not self.disconnected:
            self.ep.libHandleEvents(10)
        self.close_window(time.monotonic())
        end = time.monotonic() + 2 * WAV_WAIT
        while self.pending and time.monotonic() < end:
            self.ep.libHandleEvents(10)
            self.finish_windows(time.monotonic())
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
            "transfers": self.transfers,
            "notifies": self.notifies,
            "rx_offers": self.rx_offers,
            "windows": self.windows,
        }
        print("RESULT " + json.dumps(result), flush=True)
        return 0 if self.disconnected else 2

    def tick(self, now: float) -> None:
        call = self.call
        if call is None:
            return
        args = self.args
        ringing_since = self.incoming_at
        if (
            not self.answered
            and args.answer
            and ringing_since is not None
            and now - ringing_since >= args.ring
        ):
            final = pj.CallOpParam()
            final.statusCode = args.answer
            if args.answer < 300:
                call.answer(final)
            else:
                call.hangup(final)  # a failure answer (486 Busy Here...)
            self.answered = True
        if self.connected_at is None or self.disconnected:
            return
        self.sample(call)
        self.roll_window(call, now)
        if args.role != "caller":
            return
        if args.dtmf and not self.dtmf_sent and now - self.connected_at >= 1.0:
            call.dialDtmf(args.dtmf)  # RFC 4733 telephone-event, pjsua2's default method
            self.dtmf_sent = True
        if not self.hung_up and args.talk > 0 and now - self.connected_at >= args.talk:
            self.hang_up(call)

    def hang_up(self, call: PeerCall) -> None:
        self.sample(call)
        self.hung_up = True
        self.emit("hangup")
        call.hangup(pj.CallOpParam(True))

    # -- --control: commands on stdin --------------------------------------------------------------
    def commands(self) -> None:
        if not self._stdin_open or not select.select([0], [], [], 0)[0]:
            return
        data = os.read(0, 4096)
        if not data:
            self._stdin_open = False  # the test closed our stdin: no more commands
            return
        self._stdin += data
        while b"\n" in self._stdin:
            line, self._stdin = self._stdin.split(b"\n", 1)
            self.command(line.decode().strip())

    def command(self, line: str) -> None:
        call = self.call
        verb, _, arg = line.partition(" ")
        if call is None or self.disconnected:
            self.emit("ignored", command=line)
        elif verb == "hangup":
            if not self.hung_up:
                self.hang_up(call)
        elif verb == "xfer" and arg:
            self.emit("xfer_sent", target=arg)
            call.xfer(arg, pj.CallOpParam(True))  # REFER, Refer-To: ARG as given
        else:
            self.emit("unknown", command=line)

    # -- --record-dir: what the call hears, window by window ---------------------------------------
    def roll_window(self, call: PeerCall, now: float) -> None:
        if self.args.record_dir is None or self.audio is None:
            return
        if self.recorder is not None and now - self.window_start < self.args.window:
            return
        self.close_window(now)
        path = Path(self.args.record_dir) / f"{self.args.name}-{self.window_count:03d}.wav"
        self.window_count += 1
        recorder = pj.AudioMediaRecorder()
        recorder.createRecorder(str(path))
        self.audio.startTransmit(recorder)
        self.recorder, self.recording = recorder, path
        self.window_start = now
        self.window_rx, self.window_tx = self.rx, self.tx

    def close_window(self, now: float) -> None:
        """End the window being recorded (its WAV is complete once pjsua2 has let go of it)."""
        recorder, path = self.recorder, self.recording
        if recorder is None or path is None:
            return
        if self.audio is not None:
            with contextlib.suppress(pj.Error):
                self.audio.stopTransmit(recorder)
        self.recorder = self.recording = None
        del recorder  # pjsua_recorder_destroy(): the WAV header is written, asynchronously
        # Counters restart when pjsua2 rebuilds the stream (a re-INVITE): a drop means that.
        rx = self.rx - self.window_rx if self.rx >= self.window_rx else self.rx
        tx = self.tx - self.window_tx if self.tx >= self.window_tx else self.tx
        window = {"i": self.window_count - 1, "start": self.window_start, "end": now}
        self.pending.append(({**window, "rx": rx, "tx": tx}, path, now))

    def finish_windows(self, now: float) -> None:
        """Report the recorded windows whose WAV is complete, in order (one pjsua2 has not
        finished after WAV_WAIT seconds is reported as it is)."""
        while self.pending:
            window, path, closed_at = self.pending[0]
            if not wav_complete(path) and now - closed_at < WAV_WAIT:
                return
            self.pending.pop(0)
            window.update(tone_of(path, self.probes))
            self.windows.append(window)
            if self.args.control:
                print("WINDOW " + json.dumps(window), flush=True)

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
        self.recorder = None
        self.audio = None
        self.call = None
        if self.tone is not None:
            self.tone = None
        self.account = None
        self.ep.libDestroy()


def wav_complete(path: Path) -> bool:
    """Whether the WAV's header has its data size (written when the recorder closes it)."""
    try:
        with wave.open(str(path), "rb") as wav:
            return wav.getnframes() > 0
    except (OSError, EOFError, wave.Error):
        return False


def tone_of(path: Path, probes: list[int]) -> dict[str, Any]:
    """What a recorded window holds: its RMS level, its frequency by zero crossings, and for
    each probe frequency the share of the window's energy at it (a pure tone at the frequency
    gives about 1.0, another one about 0.0). The share is measured by Goertzel over blocks of
    TONE_BLOCK seconds: a jitter buffer's dropped or repeated frame shifts the tone's phase,
    which would cancel a single sum over the whole window."""
    try:
        with wave.open(str(path), "rb") as wav:
            rate = wav.getframerate()
            samples = array.array("h", wav.readframes(wav.getnframes()))
    except (OSError, EOFError, wave.Error):
        return {"rate": 0, "n": 0, "rms": 0.0, "freq": 0.0, "power": {}}
    if sys.byteorder == "big":
        samples.byteswap()
    n = len(samples)
    energy = float(sum(x * x for x in samples))
    crossings = sum(1 for a, b in itertools.pairwise(samples) if (a < 0) != (b < 0))
    block = max(1, int(rate * TONE_BLOCK))
    power: dict[str, float] = {}
    for freq in probes:
        coeff = 2.0 * math.cos(2.0 * math.pi * freq / rate)
        at_freq = 0.0
        for start in range(0, n, block):
            chunk = samples[start : start + block]
            s1 = s2 = 0.0
            for x in chunk:
                s1, s2 = x + coeff * s1 - s2, s1
            at_freq += 2.0 * (s1 * s1 + s2 * s2 - coeff * s1 * s2) / len(chunk)
        power[str(freq)] = round(at_freq / energy, 3) if energy else 0.0
    return {
        "rate": rate,
        "n": n,
        "rms": round(math.sqrt(energy / n), 1) if n else 0.0,
        "freq": round(crossings * rate / (2.0 * n), 1) if n else 0.0,
        "power": power,
    }


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
    parser.add_argument("--name", default="peer")
    parser.add_argument("--answer", type=int, default=200)
    parser.add_argument("--late-offer", action="store_true")
    parser.add_argument("--codecs", default="")
    parser.add_argument("--control", action="store_true")
    parser.add_argument("--record-dir", default=None)
    parser.add_argument("--window", type=float, default=0.5)
    parser.add_argument("--probe", default="")
    peer = Peer(parser.parse_args())
    peer.start()
    try:
        return peer.run()
    finally:
        peer.stop()


if __name__ == "__main__":
    sys.exit(main())
