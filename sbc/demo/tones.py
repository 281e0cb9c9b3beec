"""Test tones: a sine wave as G.711 mu-law, cut into the 20 ms payloads of PCMU RTP, and the
way back: mu-law decoded and the frequency of what was heard measured."""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = [
    "PACKET_MS",
    "SAMPLES_PER_PACKET",
    "SAMPLE_RATE",
    "pcmu_tone",
    "tone_frequency",
    "ulaw",
    "ulaw_decode",
]

SAMPLE_RATE = 8000
PACKET_MS = 20
SAMPLES_PER_PACKET = SAMPLE_RATE * PACKET_MS // 1000


def ulaw(sample: int) -> int:
    """One 16-bit linear sample as G.711 mu-law (ITU-T G.711; the 14-bit segment search of
    the classic reference implementation, so the bytes match other encoders)."""
    value = sample >> 2
    mask = 0xFF
    if value < 0:
        value, mask = -value, 0x7F
    value = min(value, 8159) + 0x21
    segment = max(0, value.bit_length() - 6)
    if segment >= 8:
        return 0x7F ^ mask
    return ((segment << 4) | ((value >> (segment + 1)) & 0x0F)) ^ mask


def pcmu_tone(frequency: int, amplitude: int = 8000) -> list[bytes]:
    """One second of a sine tone as 20 ms PCMU payloads (whole periods when 8000/f is one)."""
    samples = bytes(
        ulaw(round(amplitude * math.sin(2 * math.pi * frequency * n / SAMPLE_RATE)))
        for n in range(SAMPLE_RATE)
    )
    step = SAMPLES_PER_PACKET
    return [samples[i : i + step] for i in range(0, SAMPLE_RATE, step)]


def ulaw_decode(code: int) -> int:
    """One G.711 mu-law byte as a 16-bit linear sample (the classic reference decoder)."""
    code = ~code & 0xFF
    magnitude = ((((code & 0x0F) << 3) + 0x84) << ((code >> 4) & 0x07)) - 0x84
    return -magnitude if code & 0x80 else magnitude


def tone_frequency(payloads: Iterable[bytes]) -> float | None:
    """The frequency in Hz of the tone in consecutive PCMU payloads, from its upward zero
    crossings (interpolated between samples); None with fewer than two crossings. Meant for
    the single tones the stand-ins send: for a mix of tones the result is no measurement."""
    crossings: list[float] = []
    previous: int | None = None
    index = 0
    for payload in payloads:
        for code in payload:
            sample = ulaw_decode(code)
            if previous is not None and previous < 0 <= sample:
                crossings.append(index - 1 + -previous / (sample - previous))
            previous = sample
            index += 1
    if len(crossings) < 2:
        return None
    return (len(crossings) - 1) * SAMPLE_RATE / (crossings[-1] - crossings[0])
