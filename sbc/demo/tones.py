"""Test tones: a sine wave as G.711 mu-law, cut into the 20 ms payloads of PCMU RTP."""

from __future__ import annotations

import math

__all__ = ["PACKET_MS", "SAMPLES_PER_PACKET", "SAMPLE_RATE", "pcmu_tone", "ulaw"]

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
