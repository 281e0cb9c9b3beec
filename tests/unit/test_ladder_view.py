"""The text views of ``sbc calls`` (sbc/ops/ladder_view.py): the ladder diagram of a call's
legs, one record, the list."""

from __future__ import annotations

from sbc.b2bua.ladder import REDACTED, LadderEntry, gap_index
from sbc.ops.ladder_view import render_calls, render_ladder, render_record


def _e(at: float, direction: str, leg: str, first_line: str, **extra: object) -> LadderEntry:
    far = {"caller": "udp:127.0.0.21:5060", "agent": "tcp:127.0.0.23:5060"}.get(
        leg, "udp:127.0.0.21:5060"
    )
    own = "udp:127.0.0.22:5060"
    values: dict[str, object] = {
        "at": at,
        "direction": direction,
        "leg": leg,
        "peer": "retell" if leg == "agent" else "pbx",
        "source": far if direction == "in" else own,
        "destination": own if direction == "in" else far,
        "first_line": first_line,
        "call_id": f"{leg}-id",
        "cseq": "1 INVITE",
    }
    values.update(extra)
    return LadderEntry(**values)  # type: ignore[arg-type]


TRANSFER_LADDER = [
    _e(1.0, "in", "caller", "INVITE sip:101@127.0.0.22"),
    _e(1.1, "out", "agent", "INVITE sip:+14155550100@127.0.0.23"),
    _e(1.2, "in", "agent", "SIP/2.0 200 OK"),
    _e(1.3, "out", "caller", "SIP/2.0 200 OK"),
    _e(1.35, "out", "caller", "SIP/2.0 200 OK", retransmission=True),
    _e(2.0, "in", "agent", "REFER sip:sbc@127.0.0.22"),
    _e(2.1, "out", "human", "INVITE sip:800@127.0.0.21", credentials="Proxy-Authorization"),
    _e(2.5, "in", "human", "SIP/2.0 200 OK"),
    _e(3.0, "in", "caller", "BYE sip:101@127.0.0.22"),
]


def _arrow(line: str) -> str:
    return line[14:].split("  ", 1)[0] if len(line) > 14 else ""


def test_the_diagram_has_a_lane_per_party_and_an_arrow_per_message() -> None:
    text = render_ladder(
        TRANSFER_LADDER, transfers=[{"target": "800", "mode": "invite", "outcome": "transferred"}]
    )
    lines = text.splitlines()
    header = lines[0]
    assert header.startswith("time")
    titles = header.split()
    assert titles == ["time", "3CX", "sbc", "Retell", "queue", "800"]
    assert "udp:127.0.0.21:5060" in lines[1] and "tcp:127.0.0.23:5060" in lines[1]
    rows = lines[2:]
    assert len([r for r in rows if "|" in r]) >= len(TRANSFER_LADDER)
    invite_in, invite_out, ok_in = rows[0], rows[1], rows[2]
    lanes = [i for i, c in enumerate(invite_out) if c == "|"]
    assert "INVITE" in invite_in and ">|" in invite_in
    assert invite_in.index(">") < lanes[1]  # 3CX -> sbc
    assert invite_out.index("INVITE") > lanes[1] and ">|" in invite_out  # sbc -> Retell
    assert "|<" in ok_in and "200 OK" in ok_in
    assert "200 OK*" in rows[4] and "[retransmission]" in rows[4]
    human = rows[6]
    assert human.rstrip().endswith(f"[Proxy-Authorization: {REDACTED}]")
    assert human.index(">") > lanes[2]  # to the queue, past Retell's lane
    assert text.rstrip().endswith("* retransmission (the same message again)")
    assert rows[0].startswith("00:00:01.000") or ":" in rows[0][:12]


def test_left_out_messages_are_marked_where_they_were() -> None:
    entries = [_e(float(n), "in", "caller", f"INFO sip:{n}@x") for n in range(12)]
    text = render_ladder(entries, omitted=40)
    marked = [i for i, line in enumerate(text.splitlines()) if "40 messages left out" in line]
    assert marked == [2 + gap_index(12, 40)]  # type: ignore[operator]


def test_a_call_from_retell_has_retell_on_the_left() -> None:
    entries = [
        _e(1.0, "in", "agent", "INVITE sip:800@x"),
        _e(1.1, "out", "human", "INVITE sip:800@y"),
    ]
    assert render_ladder(entries, direction="retell->pbx").splitlines()[0].split() == [
        "time",
        "Retell",
        "sbc",
        "3CX",
    ]


def test_an_empty_ladder_says_so() -> None:
    assert "no SIP messages" in render_ladder([])


def test_a_record_view_shows_fields_then_the_ladder() -> None:
    record = {
        "call_uuid": "u-1",
        "direction": "pbx->retell",
        "caller": "+442071234567",
        "caller_name": "Zoë",
        "called": "101",
        "started": 1000.0,
        "answered": 1001.5,
        "ended": 1061.5,
        "end_reason": "pbx_bye",
        "hung_up_by": "pbx",
        "pbx_status": 200,
        "retell_status": 200,
        "pbx_call_id": "pbx-id",
        "retell_call_id": "retell-id",
        "human_call_id": "human-id",
        "x_headers": {"X-Caller-Number": "+442071234567"},
        "transfers": [
            {
                "target": "800",
                "mode": "invite",
                "outcome": "transferred",
                "status": 200,
                "answer_after": 0.5,
            }
        ],
        "a_packets": 10,
        "a_bytes": 1720,
        "b_packets": 9,
        "b_bytes": 1548,
        "ladder": [e.as_dict() for e in TRANSFER_LADDER],
        "ladder_omitted": 0,
    }
    text = render_record(record)
    assert 'caller        +442071234567 "Zoë"' in text
    assert "talked        60.000 s" in text
    assert "pbx_bye (hung up by pbx)" in text
    assert "human human-id" in text
    assert "to 800 by invite: transferred (200, after 0.500 s)" in text
    assert "a->b 10 packets, 1720 bytes; b->a 9 packets, 1548 bytes" in text
    assert "queue 800" in text and "REFER" in text
    listing = render_calls([record])
    assert listing.splitlines()[1].split()[-1] == "u-1"
    assert "60.0s" in listing
