"""Shortcuts of the call path (issue 12, round 4: CPU per call), each against the general code
it stands for."""

from __future__ import annotations

import dataclasses

from sbc.media.base import _with_origin
from sbc.sdp.model import Origin, SessionDescription
from sbc.sdp.parser import parse_sdp
from sbc.sip.dialog import DIALOG_TABLE, DialogInput, DialogState

RICH_SDP = (
    "v=0\r\n"
    "o=alice 2890844526 2890844527 IN IP4 192.0.2.10\r\n"
    "s=a call\r\n"
    "i=session information\r\n"
    "c=IN IP4 192.0.2.10\r\n"
    "b=AS:64\r\n"
    "t=0 0\r\n"
    "a=sendrecv\r\n"
    "m=audio 49170 RTP/AVP 0 8 101\r\n"
    "a=rtpmap:101 telephone-event/8000\r\n"
    "a=fmtp:101 0-15\r\n"
    "m=video 0 RTP/AVP 31\r\n"
)


def test_with_origin_is_replace_for_every_field() -> None:
    sd = parse_sdp(RICH_SDP.encode())
    origin = Origin("sbc", "1", 2, "IN", "IP4", "198.51.100.1")
    ours = _with_origin(sd, origin)
    assert ours == dataclasses.replace(sd, origin=origin)
    # Every field, in order: a field added to SessionDescription must be added there too.
    names = [field.name for field in dataclasses.fields(SessionDescription)]
    assert names == [
        "origin",
        "session_name",
        "connection",
        "bandwidths",
        "timings",
        "attributes",
        "media",
        "version",
        "extra_head",
        "extra_tail",
    ]
    for name in names[1:]:
        assert getattr(ours, name) is getattr(sd, name)
    assert sd.bandwidths and sd.attributes and len(sd.media) == 2 and sd.extra_head


def test_dialog_enums_hash_by_identity_and_the_table_still_finds_every_key() -> None:
    for member in (*DialogState, *DialogInput):
        assert hash(member) == object.__hash__(member)
    for (state, kind), target in DIALOG_TABLE.items():
        assert DIALOG_TABLE[(state, kind)] is target
    assert len({(s, k) for s in DialogState for k in DialogInput} & set(DIALOG_TABLE)) == len(
        DIALOG_TABLE
    )
