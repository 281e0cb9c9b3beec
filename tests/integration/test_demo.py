"""``sbc demo`` end to end: the bridge between the shipped 3CX and Retell stand-ins.

Each test writes the built-in demo settings with its own loopback addresses and free ports, so
it can run next to a demo someone started by hand.
"""

from __future__ import annotations

import asyncio
import io
import re
import sys
from pathlib import Path

import pytest
from peers import free_port

from sbc.demo.tones import pcmu_tone, tone_frequency, ulaw, ulaw_decode
from sbc.ops.cli import demo_config_path
from sbc.ops.demo import run_demo, serve
from sbc.ops.settings import Settings, load_settings

pytestmark = pytest.mark.integration

SBC, PBX, RETELL = "127.0.0.41", "127.0.0.42", "127.0.0.43"

# The checks of the demo's transfer (the second call), by [transfer] mode.
TRANSFER_CHECKS = [
    "sbc answered Retell's REFER 202",
    "Retell got NOTIFY 100 Trying, then 200 OK with Subscription-State: terminated",
    "Retell's leg ended after the transfer (BYE answered 200)",
    "RTP ports released after the transfer",
    "sbc counted the transfer in its metrics",
]
INVITE_CHECKS = [
    "the queue got sbc's INVITE from extension 1000, challenged 407 then accepted",
    "the queue's INVITE carries the caller's name and number",
    "the queue's INVITE carries the call's and the REFER's X- headers",
    "the queue heard the caller (440 Hz)",
    "the caller hears the queue (880 Hz) after the transfer",
    "the caller hears every packet of the queue and nothing more of the agent",
    "sbc answered 3CX's BYE after the transfer with 200",
    "sbc sent BYE to the queue (answered 200)",
    "sbc's call record: transferred to 800 by invite",
]
REFER_CHECKS = [
    "3CX got sbc's REFER to 800, challenged 407 then accepted",
    "3CX's NOTIFYs answered 200",
    "sbc left 3CX's call with BYE",
    "sbc's call record: transferred to 800 by refer",
]


def demo_settings(tmp_path: Path, rtp_base: int, extra: str = "", transfer_mode: str = "") -> Path:
    """The shipped demo.toml with this test's addresses and ports (and ``extra`` appended to
    the [media] section, ``transfer_mode`` as [transfer] mode)."""
    text = demo_config_path().read_text()
    sip_port, pbx_port, retell_port, admin_port = (
        free_port(SBC),
        free_port(PBX),
        free_port(RETELL),
        free_port(SBC, udp=False),
    )
    replacements = {
        r'(?m)^bind = "127\.0\.0\.20"': f'bind = "{SBC}"',
        r'(?m)^advertised_address = "127\.0\.0\.20"': f'advertised_address = "{SBC}"',
        r'(?m)^listen = "127\.0\.0\.20:8081"': f'listen = "{SBC}:{admin_port}"',
        r"(?m)^rtp_port_min = \d+": f"rtp_port_min = {rtp_base}",
        r"(?m)^rtp_port_max = \d+": f"rtp_port_max = {rtp_base + 99}",
        r'(?m)^level = "info"': 'level = "warning"',
        r'(?m)^mode = "invite"$': f'mode = "{transfer_mode or "invite"}"',
    }
    for pattern, value in replacements.items():
        text, count = re.subn(pattern, value, text)
        assert count == 1, pattern
    # Ports: the [sip] one first, then [pbx], then [retell], in file order.
    ports = iter((sip_port, pbx_port, retell_port))
    text = re.sub(r"(?m)^port = 5060$", lambda _: f"port = {next(ports)}", text)
    text = text.replace('host = "127.0.0.21"', f'host = "{PBX}"')
    text = text.replace('host = "127.0.0.22"', f'host = "{RETELL}"')
    text = text.replace("[media]\n", f"[media]\n{extra}\n")
    path = tmp_path / "demo.toml"
    path.write_text(text)
    return path


def load(path: Path) -> Settings:
    return load_settings(path)


async def test_demo_call_passes_every_check(tmp_path: Path) -> None:
    settings = load(demo_settings(tmp_path, 33000))
    out = io.StringIO()
    report = await run_demo(settings, talk=2.0, out=out)
    text = out.getvalue()
    assert report.passed, text
    facts = report.facts
    # What Retell received: the imported number, the caller, and the X- headers.
    assert facts["request_uri"] == f"sip:+14155550100@{RETELL}:{settings.retell.port};transport=tcp"
    assert facts["to"] == f"<sip:+14155550100@{RETELL}>"
    assert facts["from"].startswith(f'"Jane Doe" <sip:+31201234567@{SBC}>;tag=')
    x = facts["x_headers"]
    assert x["X-Caller-Number"] == "+31201234567"
    assert x["X-Caller-Name"] == "Jane Doe"
    assert x["X-Called"] == "1000"
    assert re.fullmatch(r"[0-9a-f]{32}", x["X-Pbx-Call-Id"])
    assert re.fullmatch(r"[0-9a-f-]{36}", x["X-Call-Uuid"])
    # Two seconds of 20 ms packets each way, all of them, unchanged (the checks compare them).
    for direction in ("3CX -> Retell", "Retell -> 3CX"):
        sent, received = facts[f"rtp {direction}"]
        assert sent >= 90 and received == sent, (direction, sent, received)
    assert facts["dtmf_packets"] == 7  # RFC 4733: 5 packets, the last one three times
    assert facts["ports_in_use"] == 0
    names = [c.what for c in report.checks]
    assert "sbc sent BYE to Retell (answered 200)" in names
    assert "sbc answered 3CX's BYE with 200" in names
    assert "no task left running" in names and "no socket left open" in names
    # The transfer: every check of it was made (and passed, as all did).
    for name in TRANSFER_CHECKS + INVITE_CHECKS:
        assert name in names, name
    assert not set(REFER_CHECKS) & set(names)
    assert len(report.checks) == 21 + len(TRANSFER_CHECKS) + len(INVITE_CHECKS)
    assert facts["retell_notifies"] == [
        (100, "active;expires=60"),
        (200, "terminated;reason=noresource"),
    ]
    assert facts["transfers"] == [("800", "invite", "transferred", 200)]
    queue_invite = facts["queue_invite"]
    assert str(queue_invite.uri) == f"sip:800@{PBX}:{settings.pbx.port}"
    assert queue_invite.headers.get("P-Asserted-Identity") == (
        f'"Jane Doe" <sip:+31201234567@{PBX}>'
    )
    assert facts["queue_x_headers"]["X-Transfer-Reason"] == "caller asked for sales"
    # The second call's X- headers (its own call_uuid), plus the one the REFER carried.
    assert re.fullmatch(r"[0-9a-f-]{36}", facts["queue_x_headers"]["X-Call-Uuid"])
    assert facts["queue_x_headers"]["X-Caller-Number"] == "+31201234567"
    heard, frequency = facts["queue_heard"]
    assert heard >= 90 and abs(frequency - 440) < 5
    sent, received, frequency = facts["caller_heard_queue"]
    assert sent >= 90 and received >= sent - 1 and abs(frequency - 880) < 5
    assert facts["ports_in_use after the transfer"] == 0
    assert "PASS: all" in text and "FAILED" not in text


async def test_demo_transfer_by_refer(tmp_path: Path) -> None:
    # [transfer] mode = "refer": sbc REFERs 3CX's call to the queue; 3CX challenges the REFER.
    settings = load(demo_settings(tmp_path, 33100, transfer_mode="refer"))
    assert settings.transfer.mode == "refer"
    out = io.StringIO()
    report = await run_demo(settings, talk=1.0, out=out)
    text = out.getvalue()
    assert report.passed, text
    names = [c.what for c in report.checks]
    for name in TRANSFER_CHECKS + REFER_CHECKS:
        assert name in names, name
    assert not set(INVITE_CHECKS) & set(names)
    assert len(report.checks) == 21 + len(TRANSFER_CHECKS) + len(REFER_CHECKS)
    assert report.facts["pbx_refer_to"] == f"<sip:800@{PBX}:{settings.pbx.port}>"
    assert report.facts["transfers"] == [("800", "refer", "transferred", 200)]


async def test_demo_reports_a_refused_call_and_fails(tmp_path: Path) -> None:
    # sbc offers Retell only PCMA; the stand-in (like a peer without a common codec) answers
    # 488, so the call never connects: the demo must say so and exit non-zero.
    path = demo_settings(tmp_path, 33200, extra='codecs = ["PCMA", "telephone-event"]')
    settings = load(path)
    out = io.StringIO()
    report = await run_demo(settings, talk=1.0, out=out)
    text = out.getvalue()
    assert not report.passed
    assert "FAIL:" in text
    assert "the call was not answered (3CX got 100, 180, 488)" in text
    # Even then everything was stopped and released.
    by_name = {c.what: c.ok for c in report.checks}
    assert by_name["no task left running"] and by_name["no socket left open"]
    assert by_name["sbc unregistered at stop"]


async def test_serve_returns_one_on_failure(tmp_path: Path) -> None:
    path = demo_settings(tmp_path, 33300, extra='codecs = ["PCMA", "telephone-event"]')
    assert await serve(load(path)) == 1


async def test_sbc_demo_command(tmp_path: Path) -> None:
    """``python -m sbc demo --config ...`` as a user runs it: exit 0 and the summary."""
    path = demo_settings(tmp_path, 33400)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sbc",
        "demo",
        "--config",
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError("sbc demo still running after 60 s") from None
    text = stdout.decode()
    assert proc.returncode == 0, text + stderr.decode()
    assert "X-Caller-Number: +31201234567" in text
    assert "Retell received BYE from sbc: yes" in text
    for direction in ("3CX -> Retell", "Retell -> 3CX"):
        match = re.search(rf"RTP {direction}: (\d+) sent, (\d+) received \(sequence", text)
        assert match is not None, text
        assert int(match[1]) >= 300 and match[1] == match[2]
    assert "RTP port pairs in use 0 of 50" in text
    # What each side saw of the transfer, as printed.
    assert "Refer-To: sip:sales@" in text
    assert re.search(r"\+ +\d+ ms  202 to the REFER", text), text
    assert "NOTIFY SIP/2.0 100 Trying  Subscription-State: active;expires=60" in text
    assert "NOTIFY SIP/2.0 200 OK      Subscription-State: terminated;reason=noresource" in text
    assert "BYE from sbc (the agent's leg ends with the final NOTIFY)" in text
    assert "X-Transfer-Reason: caller asked for sales" in text
    assert "1 challenge (407), then the digest of demo1000 accepted" in text
    match = re.search(r"the queue: (\d+) of (\d+) packets, 88\d Hz; the agent: 0 packets", text)
    assert match is not None, text
    assert int(match[2]) >= 90
    assert "the queue received BYE from sbc: yes" in text
    assert "target 800, mode invite, outcome transferred (status 200" in text
    assert 'sbc_transfers_total{mode="invite",outcome="transferred"} 1' in text
    assert "PASS: all 35 checks passed" in text


@pytest.mark.parametrize(
    ("sample", "code"),
    [
        (0, 0xFF),
        (1, 0xFF),
        (-1, 0x7E),
        (100, 0xF2),
        (-100, 0x72),
        (1000, 0xCE),
        (-1000, 0x4E),
        (8000, 0xA0),
        (-8000, 0x20),
        (32767, 0x80),
        (-32768, 0x00),
    ],
)
def test_stand_in_audio_is_g711_mu_law(sample: int, code: int) -> None:
    # Reference values of the classic G.711 encoder (the one audioop and SoX use).
    assert ulaw(sample) == code


def test_stand_in_tone_is_one_second_of_20ms_frames() -> None:
    frames = pcmu_tone(440)
    assert len(frames) == 50 and {len(f) for f in frames} == {160}
    assert len(set(frames)) > 1


@pytest.mark.parametrize("sample", [0, 100, -100, 1000, -1000, 8000, -8000, 32767, -32768])
def test_mu_law_decodes_to_the_sample_within_its_step(sample: int) -> None:
    decoded = ulaw_decode(ulaw(sample))
    assert abs(decoded - sample) <= max(8, abs(sample) // 16)
    assert ulaw(decoded) == ulaw(sample)


@pytest.mark.parametrize("frequency", [440, 660, 880])
def test_the_frequency_of_a_tone_is_measured_from_its_payloads(frequency: int) -> None:
    frames = pcmu_tone(frequency)
    measured = tone_frequency(frames[7:30])  # any run of consecutive 20 ms packets
    assert measured is not None and abs(measured - frequency) < 1
    assert tone_frequency([b"\xff" * 160]) is None  # silence: no tone
