"""Timer values (RFC 3261 Table 4, RFC 6026) and identifier helpers."""

from __future__ import annotations

import pytest

from sbc.sip.ids import BRANCH_COOKIE, make_branch, new_branch, new_call_id, new_cnonce, new_tag
from sbc.sip.timers import TRYING_DELAY, Timer, TimerConfig


def test_table_4_defaults() -> None:
    config = TimerConfig()
    assert (config.t1, config.t2, config.t4) == (0.5, 4.0, 5.0)
    udp = {timer: config.initial(timer, reliable=False) for timer in Timer}
    tcp = {timer: config.initial(timer, reliable=True) for timer in Timer}
    assert udp == {
        Timer.A: 0.5,
        Timer.B: 32.0,
        Timer.D: 32.0,
        Timer.E: 0.5,
        Timer.F: 32.0,
        Timer.G: 0.5,
        Timer.H: 32.0,
        Timer.I: 5.0,
        Timer.J: 32.0,
        Timer.K: 5.0,
        Timer.L: 32.0,
        Timer.M: 32.0,
        Timer.TRYING: TRYING_DELAY,
    }
    # Over reliable transports D, I, J and K are zero; the rest do not change.
    assert {t for t in Timer if tcp[t] != udp[t]} == {Timer.D, Timer.I, Timer.J, Timer.K}
    assert all(tcp[t] == 0.0 for t in (Timer.D, Timer.I, Timer.J, Timer.K))


def test_timer_d_at_least_32_s_and_scales_with_large_t1() -> None:
    assert TimerConfig(t1=0.1).initial(Timer.D, reliable=False) == 32.0
    assert TimerConfig(t1=1.0).initial(Timer.D, reliable=False) == 64.0


def test_next_interval() -> None:
    config = TimerConfig()
    assert config.next_interval(Timer.A, 8.0) == 16.0  # INVITE: no cap
    assert config.next_interval(Timer.E, 2.0) == 4.0
    assert config.next_interval(Timer.E, 4.0) == 4.0  # capped at T2
    assert config.next_interval(Timer.G, 4.0) == 4.0


def test_ids_from_random_bytes() -> None:
    assert make_branch("abc") == "z9hG4bKabc"
    assert new_branch(b"\x01\x02\x03\x04") == BRANCH_COOKIE + "01020304"
    assert new_tag(b"\xff\x00\xaa\x55") == "ff00aa55"
    assert new_call_id(b"\x00\x00\x00\x01", "sbc.example") == "00000001@sbc.example"
    assert new_call_id(b"\x00\x00\x00\x01") == "00000001"
    assert new_cnonce(bytes(8)) == "0" * 16
    with pytest.raises(ValueError):
        new_tag(b"\x01")
    with pytest.raises(ValueError):
        make_branch("")
