"""Text views of call records for ``sbc calls``: the list, one record, its ladder diagram.

The ladder diagram draws the SIP messages of all the call's legs in order, as sngrep does: one
column (lane) per party, sbc in the middle, an arrow per message with the method or status on
it, the time on the left and the request line (or the CSeq of a response) on the right::

    time          3CX                         sbc                         Retell
                  udp:127.0.0.21:5060         udp:127.0.0.22:5060         tcp:127.0.0.23:5070
    12:00:00.001  |--------INVITE------------>|                           |
    12:00:00.002  |<-------100 Trying---------|                           |
    12:00:00.004  |                           |---------INVITE----------->|

Lanes: the leg that called on the left (3CX's caller; Retell for a call Retell sent), then sbc,
then the other legs (Retell's agent, and the human a transfer by INVITE called: "queue 800").
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sbc.b2bua.ladder import REDACTED, LadderEntry, gap_index

__all__ = ["render_calls", "render_ladder", "render_record"]

TIME_WIDTH = 12
LANE_WIDTH = 28
SBC = "sbc"


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at)) + f".{int(at * 1000) % 1000:03d}"


def _when(at: float | None) -> str:
    if at is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def _lane_names(
    entries: Sequence[LadderEntry], direction: str, transfers: Sequence[Mapping[str, Any]]
) -> list[tuple[str, str]]:
    """(leg role, column title), left to right; sbc's column is role ``sbc``."""
    origin = "agent" if direction.startswith("retell") else "caller"
    roles = [origin]
    for entry in entries:
        if entry.leg and entry.leg not in roles:
            roles.append(entry.leg)
    targets = [str(t.get("target")) for t in transfers if t.get("target")]
    titles = {"caller": "3CX", "agent": "Retell"}
    if origin == "caller":
        titles["human"] = f"queue {targets[-1]}" if targets else "3CX (human)"
    else:
        titles["human"] = "3CX"
    lanes = [(roles[0], titles.get(roles[0], roles[0])), (SBC, SBC)]
    lanes += [(role, titles.get(role, role)) for role in roles[1:]]
    return lanes


def _addresses(entries: Sequence[LadderEntry]) -> dict[str, str]:
    found: dict[str, str] = {}
    for entry in entries:
        far = entry.source if entry.direction == "in" else entry.destination
        own = entry.destination if entry.direction == "in" else entry.source
        found.setdefault(entry.leg, far)
        found.setdefault(SBC, own)
    return found


def _place(row: list[str], start: int, text: str) -> None:
    start = max(TIME_WIDTH + 1, start)
    for i, char in enumerate(text):
        if start + i < len(row):
            row[start + i] = char


def _label(entry: LadderEntry) -> str:
    return entry.label + ("*" if entry.retransmission else "")


def _detail(entry: LadderEntry) -> str:
    is_response = entry.first_line.startswith("SIP/")
    detail = f"CSeq {entry.cseq}" if is_response else entry.first_line
    if entry.retransmission:
        detail += "  [retransmission]"
    if entry.credentials:
        detail += f"  [{entry.credentials}: {REDACTED}]"
    return detail


def render_ladder(
    entries: Sequence[LadderEntry],
    *,
    direction: str = "pbx->retell",
    transfers: Sequence[Mapping[str, Any]] = (),
    omitted: int = 0,
    lane_width: int = LANE_WIDTH,
) -> str:
    """The ladder diagram of ``entries`` (module docstring); ``omitted`` messages left out of
    a full ladder are shown as one line where they were."""
    if not entries:
        return "(no SIP messages kept for this call)\n"
    lanes = _lane_names(entries, direction, transfers)
    column = {role: TIME_WIDTH + 2 + i * lane_width for i, (role, _) in enumerate(lanes)}
    width = column[lanes[-1][0]] + 1
    addresses = _addresses(entries)

    def blank(fill: str = "|") -> list[str]:
        row = [" "] * width
        for x in column.values():
            row[x] = fill
        return row

    lines: list[str] = []
    titles = [title for _, title in lanes]
    where = [addresses.get(role, "") for role, _ in lanes]
    for first, texts in (("time", titles), ("", where)):
        row = [" "] * (width + lane_width)
        row[: len(first)] = list(first)
        for (role, _), text in zip(lanes, texts, strict=True):
            _place(row, column[role], text[: lane_width - 2])
        lines.append("".join(row).rstrip())
    gap = gap_index(len(entries), omitted)
    for i, entry in enumerate(entries):
        if i == gap:
            row = blank(":")
            _place(row, TIME_WIDTH + 2, f" ... {omitted} messages left out ... ")
            lines.append("".join(row).rstrip())
        row = blank()
        row[:TIME_WIDTH] = list(_clock(entry.at).ljust(TIME_WIDTH))
        far = column.get(entry.leg, column[lanes[-1][0]])
        src, dst = (far, column[SBC]) if entry.direction == "in" else (column[SBC], far)
        lo, hi = min(src, dst), max(src, dst)
        for x in range(lo + 1, hi):
            row[x] = "-"
        if dst > src:
            row[hi - 1] = ">"
        else:
            row[lo + 1] = "<"
        label = _label(entry)[: max(1, hi - lo - 6)]
        _place(row, lo + 1 + (hi - lo - 1 - len(label)) // 2, label)
        lines.append("".join(row) + "  " + _detail(entry))
    if gap is not None and gap >= len(entries):
        row = blank(":")
        _place(row, TIME_WIDTH + 2, f" ... {omitted} messages left out ... ")
        lines.append("".join(row).rstrip())
    if any(e.retransmission for e in entries):
        lines.append("* retransmission (the same message again)")
    return "\n".join(lines) + "\n"


def _ladder_entries(record: Mapping[str, Any]) -> list[LadderEntry]:
    raw = record.get("ladder") or []
    return [LadderEntry.from_dict(item) for item in raw if isinstance(item, dict)]


def _seconds(start: float | None, end: float | None) -> str:
    if start is None or end is None:
        return "-"
    return f"{end - start:.3f} s"


def _media(record: Mapping[str, Any]) -> str:
    parts = []
    for side, other in (("a", "b"), ("b", "a")):
        packets, size = record.get(f"{side}_packets"), record.get(f"{side}_bytes")
        if packets is not None:
            parts.append(f"{side}->{other} {packets} packets, {size} bytes")
    if parts:
        return "; ".join(parts)
    media = record.get("media")
    backend = media.get("backend") if isinstance(media, dict) else None
    return f"not counted ({backend})" if backend else "-"


def render_record(record: Mapping[str, Any]) -> str:
    """One call record, field by field, then its ladder diagram."""
    started = record.get("started")
    caller = str(record.get("caller") or "-")
    if record.get("caller_name"):
        caller += f' "{record["caller_name"]}"'
    statuses = f"3CX {record.get('pbx_status') or '-'}, Retell {record.get('retell_status') or '-'}"
    call_ids = [f"3CX {record.get('pbx_call_id') or '-'}"]
    call_ids.append(f"Retell {record.get('retell_call_id') or '-'}")
    if record.get("human_call_id"):
        call_ids.append(f"human {record['human_call_id']}")
    x_headers = record.get("x_headers") or {}
    transfers = [t for t in record.get("transfers") or [] if isinstance(t, dict)]
    # which sbc wrote it (several may share a PostgreSQL database) and the route that took it
    written_by = [(k, str(record[k])) for k in ("instance", "route") if record.get(k)]
    rows: list[tuple[str, str]] = [
        ("call", str(record.get("call_uuid"))),
        *written_by,
        ("direction", str(record.get("direction") or "-")),
        ("caller", caller),
        ("called", str(record.get("called") or "-")),
        ("Retell number", str(record.get("retell_number") or "-")),
        ("started", _when(started)),
        (
            "answered",
            "-"
            if record.get("answered") is None
            else "after " + _seconds(started, record.get("answered")),
        ),
        ("ended", "after " + _seconds(started, record.get("ended"))),
        ("talked", _seconds(record.get("answered"), record.get("ended"))),
        (
            "end reason",
            f"{record.get('end_reason')} (hung up by {record.get('hung_up_by') or '-'})",
        ),
        ("final status", statuses),
        ("Call-IDs", "; ".join(call_ids)),
    ]
    if isinstance(x_headers, dict):
        for name, value in x_headers.items():
            rows.append(("X- header", f"{name}: {value}"))
    for t in transfers:
        after = t.get("answer_after")
        took = "" if after is None else f", after {after:.3f} s"
        rows.append(
            (
                "transfer",
                f"to {t.get('target') or '-'} by {t.get('mode')}: {t.get('outcome')} "
                f"({t.get('status')}{took})",
            )
        )
    rows.append(("media", _media(record)))
    out = "\n".join(f"{name:<14}{value}" for name, value in rows) + "\n\n"
    return out + render_ladder(
        _ladder_entries(record),
        direction=str(record.get("direction") or "pbx->retell"),
        transfers=transfers,
        omitted=int(record.get("ladder_omitted") or 0),
    )


def render_calls(records: Iterable[Mapping[str, Any]]) -> str:
    """The list of ``sbc calls``: one line per record (with the ``instance`` that wrote it
    when the records come from several sbc sharing one database)."""
    records = list(records)
    instances = {r.get("instance") for r in records}
    width = max(8, *(len(str(i)) for i in instances)) if len(instances) > 1 else 0
    header = (
        f"{'started':<19}  {'talked':>8}  {'caller':<16}  {'called':<10}  {'end reason':<16}  "
        f"{'by':<6}  {'3CX':>3}  {'Ret':>3}  {'xfer':<4}  "
        + (f"{'instance':<{width}}  " if width else "")
        + "call_uuid"
    )
    lines = [header]
    for r in records:
        talked = "-"
        if r.get("answered") is not None and r.get("ended") is not None:
            talked = f"{r['ended'] - r['answered']:.1f}s"
        transfers = r.get("transfers") or []
        xfer = str(transfers[-1].get("outcome", "?"))[:4] if transfers else "-"
        instance = f"{r.get('instance') or '-'!s:<{width}}  " if width else ""
        lines.append(
            f"{_when(r.get('started')):<19}  {talked:>8}  {r.get('caller') or '-'!s:<16}  "
            f"{r.get('called') or '-'!s:<10}  {r.get('end_reason')!s:<16}  "
            f"{r.get('hung_up_by') or '-'!s:<6}  {r.get('pbx_status') or '-':>3}  "
            f"{r.get('retell_status') or '-':>3}  {xfer:<4}  {instance}{r.get('call_uuid')}"
        )
    return "\n".join(lines) + "\n"
