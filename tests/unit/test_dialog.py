"""Dialogs (RFC 3261 §12)."""

from __future__ import annotations

import dataclasses

import pytest

from sbc.sip.dialog import DIALOG_TABLE, Dialog, DialogId, DialogInput, DialogState
from sbc.sip.digest import ClientAuth, Credentials
from sbc.sip.errors import CallDoesNotExist, ProtocolError, RequestOutOfOrder
from sbc.sip.fields import Via
from sbc.sip.headers import Headers
from sbc.sip.message import Request, Response
from sbc.sip.transaction import build_response
from sbc.sip.uri import parse_name_addr, parse_uri

VIA = "SIP/2.0/UDP 192.0.2.1:5060;rport"


def invite(extra: tuple[tuple[str, str], ...] = ()) -> Request:
    return Request(
        "INVITE",
        parse_uri("sip:bob@biloxi.example.com"),
        Headers(
            (
                ("Via", "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK1"),
                ("From", "Alice <sip:alice@atlanta.example.com>;tag=a1"),
                ("To", "<sip:bob@biloxi.example.com>"),
                ("Call-ID", "cid-1"),
                ("CSeq", "10 INVITE"),
                ("Contact", "<sip:alice@192.0.2.1:5060;transport=udp>"),
                *extra,
            )
        ),
    )


def answer(
    request: Request,
    status: int = 200,
    *,
    tag: str | None = "b1",
    contact: str | None = "<sip:bob@192.0.2.2:5070>",
    record_route: tuple[str, ...] = (),
) -> Response:
    headers: list[tuple[str, str]] = [("Record-Route", rr) for rr in record_route]
    if contact is not None:
        headers.append(("Contact", contact))
    return build_response(request, status, to_tag=tag, headers=headers)


P1, P2 = "sip:p1.example.com;lr", "sip:p2.example.com;lr"
RR = (f"<{P1}>", f"<{P2}>")


def state(dialog: Dialog) -> DialogState:
    """Read the state without letting mypy narrow it across calls that change it."""
    return dialog.state


# -- creation --------------------------------------------------------------------------------


def test_from_uac_route_set_reversed_and_remote_target_from_contact() -> None:
    req = invite()
    dialog = Dialog.from_uac(req, answer(req, record_route=RR))
    assert dialog.id == DialogId("cid-1", "a1", "b1")
    assert state(dialog) is DialogState.CONFIRMED
    assert [str(r.uri) for r in dialog.route_set] == [
        "sip:p2.example.com;lr",
        "sip:p1.example.com;lr",
    ]
    assert str(dialog.remote_target) == "sip:bob@192.0.2.2:5070"
    assert dialog.local_cseq == 10
    assert dialog.remote_cseq is None
    assert str(dialog.local_uri) == "Alice <sip:alice@atlanta.example.com>"
    assert str(dialog.remote_uri) == "<sip:bob@biloxi.example.com>"
    assert dialog.is_uac
    assert not dialog.secure
    assert "Confirmed" in repr(dialog)


def test_from_uac_early_dialog_without_contact_uses_request_uri() -> None:
    req = invite()
    dialog = Dialog.from_uac(req, answer(req, 180, contact=None), secure=True)
    assert state(dialog) is DialogState.EARLY
    assert dialog.remote_target == req.uri
    assert dialog.secure


def test_from_uac_refusals() -> None:
    req = invite()
    with pytest.raises(ProtocolError):
        Dialog.from_uac(req, answer(req, 180, tag=None))
    with pytest.raises(ProtocolError):
        Dialog.from_uac(req, answer(req, 100))
    with pytest.raises(ProtocolError):
        Dialog.from_uac(req, answer(req, 486))


def test_from_uas_route_set_in_order_and_contact_of_request() -> None:
    req = invite(extra=tuple(("Record-Route", rr) for rr in RR))
    dialog = Dialog.from_uas(req, answer(req, 180, tag="local9"))
    assert dialog.id == DialogId("cid-1", "local9", "a1")
    assert state(dialog) is DialogState.EARLY
    assert [str(r.uri) for r in dialog.route_set] == [
        "sip:p1.example.com;lr",
        "sip:p2.example.com;lr",
    ]
    assert str(dialog.remote_target) == "sip:alice@192.0.2.1:5060;transport=udp"
    assert dialog.remote_cseq == 10
    assert dialog.local_cseq is None
    assert str(dialog.local_uri) == "<sip:bob@biloxi.example.com>"
    assert not dialog.is_uac


def test_from_uas_refusals() -> None:
    req = invite()
    with pytest.raises(ProtocolError):
        Dialog.from_uas(req, answer(req, 200, tag=None))
    no_contact = dataclasses.replace(req, headers=req.headers.remove("Contact"))
    with pytest.raises(ProtocolError):
        Dialog.from_uas(no_contact, answer(no_contact, 200))


# -- create_request (§12.2.1.1) --------------------------------------------------------------


def test_create_request_loose_routing() -> None:
    req = invite()
    dialog = Dialog.from_uac(req, answer(req, record_route=RR))
    bye = dialog.create_request("BYE", via=VIA, branch="z9hG4bKbye")
    assert bye.method == "BYE"
    assert str(bye.uri) == "sip:bob@192.0.2.2:5070"
    assert bye.headers.get_all("Route") == ["<sip:p2.example.com;lr>", "<sip:p1.example.com;lr>"]
    assert bye.headers.get("Via") == "SIP/2.0/UDP 192.0.2.1:5060;rport;branch=z9hG4bKbye"
    assert bye.headers.get("From") == "Alice <sip:alice@atlanta.example.com>;tag=a1"
    assert bye.headers.get("To") == "<sip:bob@biloxi.example.com>;tag=b1"
    assert bye.headers.get("Call-ID") == "cid-1"
    assert bye.headers.get("CSeq") == "11 BYE"
    assert bye.headers.get("Max-Forwards") == "70"
    assert dialog.local_cseq == 11
    info = dialog.create_request(
        "INFO",
        via=Via("TCP", "192.0.2.1", 5060),
        branch="z9hG4bKinfo",
        headers=(("Content-Type", "application/dtmf-relay"),),
        body=b"Signal=5\r\n",
    )
    assert info.headers.get("CSeq") == "12 INFO"
    assert info.headers.get("Via") == "SIP/2.0/TCP 192.0.2.1:5060;branch=z9hG4bKinfo"
    assert info.headers.get("Content-Type") == "application/dtmf-relay"
    assert info.body == b"Signal=5\r\n"


def test_create_request_strict_router_first() -> None:
    req = invite()
    dialog = Dialog.from_uac(
        req, answer(req, record_route=("<sip:strict.example.com>", "<sip:p1.example.com;lr>"))
    )
    # Route set (reversed): p1 (loose), strict -> first is loose.
    bye = dialog.create_request("BYE", via=VIA, branch="z9hG4bKb")
    assert str(bye.uri) == "sip:bob@192.0.2.2:5070"
    dialog2 = Dialog.from_uac(
        req, answer(req, record_route=("<sip:p1.example.com;lr>", "<sip:strict.example.com>"))
    )
    bye2 = dialog2.create_request("BYE", via=VIA, branch="z9hG4bKb")
    # §12.2.1.1: the strict router becomes the Request-URI; the remote target is appended.
    assert str(bye2.uri) == "sip:strict.example.com"
    assert bye2.headers.get_all("Route") == [
        "<sip:p1.example.com;lr>",
        "<sip:bob@192.0.2.2:5070>",
    ]


def test_create_request_non_sip_route_counts_as_loose() -> None:
    req = invite()
    dialog = Dialog.from_uac(req, answer(req, record_route=("<urn:x:y>",)))
    bye = dialog.create_request("BYE", via=VIA, branch="z9hG4bKb")
    assert str(bye.uri) == "sip:bob@192.0.2.2:5070"


def test_ack_and_cancel_use_given_cseq_without_advancing() -> None:
    req = invite()
    dialog = Dialog.from_uac(req, answer(req))
    ack = dialog.create_request("ACK", via=VIA, branch="z9hG4bKack", cseq=10)
    assert ack.headers.get("CSeq") == "10 ACK"
    assert dialog.local_cseq == 10
    with pytest.raises(ProtocolError):
        dialog.create_request("ACK", via=VIA, branch="z9hG4bKack")
    reinvite = dialog.create_request("INVITE", via=VIA, branch="z9hG4bKre", cseq=20)
    assert reinvite.headers.get("CSeq") == "20 INVITE"
    assert dialog.local_cseq == 20


def test_uas_dialog_starts_local_cseq_and_rfc2543_peer_without_from_tag() -> None:
    req = invite()
    untagged = dataclasses.replace(
        req, headers=req.headers.set("From", "<sip:alice@atlanta.example.com>")
    )
    dialog = Dialog.from_uas(untagged, answer(untagged, tag="l1"))
    assert dialog.id.remote_tag is None
    bye = dialog.create_request("BYE", via=VIA, branch="z9hG4bKb")
    assert bye.headers.get("CSeq") == "1 BYE"
    assert bye.headers.get("To") == "<sip:alice@atlanta.example.com>"
    assert bye.headers.get("From") == "<sip:bob@biloxi.example.com>;tag=l1"
    assert str(bye.uri) == "sip:alice@192.0.2.1:5060;transport=udp"


def test_advance_local_cseq_after_auth_retry() -> None:
    req = invite()
    dialog = Dialog.from_uac(req, answer(req))
    bye = dialog.create_request("BYE", via=VIA + ";branch=x", branch="z9hG4bKb")
    challenge = Response(
        407,
        "",
        Headers((("Proxy-Authenticate", 'Digest nonce="n",algorithm=MD5,realm="3CXPhoneSystem"'),)),
    )
    retry = ClientAuth(Credentials("u", "p")).authorize(challenge, bye, "c")
    assert retry is not None
    dialog.advance_local_cseq(retry.cseq.seq)
    dialog.advance_local_cseq(5)  # never goes back
    assert dialog.local_cseq == 12
    assert dialog.create_request("INFO", via=VIA, branch="z9hG4bKi").headers.get("CSeq") == (
        "13 INFO"
    )
    fresh = Dialog.from_uas(req, answer(req))
    fresh.advance_local_cseq(3)
    assert fresh.local_cseq == 3


def test_create_request_in_terminated_dialog_refused() -> None:
    req = invite()
    dialog = Dialog.from_uac(req, answer(req))
    dialog.terminate()
    assert state(dialog) is DialogState.TERMINATED
    dialog.terminate()
    with pytest.raises(ProtocolError):
        dialog.create_request("BYE", via=VIA, branch="z9hG4bKb")


# -- receive_request (§12.2.2) ---------------------------------------------------------------


def in_dialog(
    method: str, seq: int, *, contact: str | None = None, to_tag: str = "local9"
) -> Request:
    headers = [
        ("Via", "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKx"),
        ("From", "<sip:alice@atlanta.example.com>;tag=a1"),
        ("To", f"<sip:bob@biloxi.example.com>;tag={to_tag}"),
        ("Call-ID", "cid-1"),
        ("CSeq", f"{seq} {method}"),
    ]
    if contact:
        headers.append(("Contact", contact))
    return Request(method, parse_uri("sip:bob@192.0.2.2"), Headers(headers))


def uas_dialog() -> Dialog:
    req = invite()
    return Dialog.from_uas(req, answer(req, tag="local9"))


def test_receive_request_cseq_order() -> None:
    dialog = uas_dialog()
    dialog.receive_request(in_dialog("INFO", 11))
    assert dialog.remote_cseq == 11
    dialog.receive_request(in_dialog("INFO", 11))  # equal is not out of order
    with pytest.raises(RequestOutOfOrder) as info:
        dialog.receive_request(in_dialog("BYE", 9))
    assert info.value.status == 500
    assert dialog.remote_cseq == 11
    dialog.receive_request(in_dialog("ACK", 10))  # the ACK carries the INVITE's number
    assert dialog.remote_cseq == 11


def test_receive_request_sets_empty_remote_cseq() -> None:
    req = invite()
    dialog = Dialog.from_uac(req, answer(req, tag="local9"))
    # From the UAC's side the peer's requests carry our tag in To... build it accordingly.
    peer_bye = Request(
        "BYE",
        parse_uri("sip:alice@192.0.2.1"),
        Headers(
            (
                ("From", "<sip:bob@biloxi.example.com>;tag=local9"),
                ("To", "<sip:alice@atlanta.example.com>;tag=a1"),
                ("Call-ID", "cid-1"),
                ("CSeq", "500 BYE"),
            )
        ),
    )
    assert dialog.remote_cseq is None
    dialog.receive_request(peer_bye)
    assert dialog.remote_cseq == 500


def test_target_refresh_updates_remote_target() -> None:
    dialog = uas_dialog()
    dialog.receive_request(in_dialog("INVITE", 11, contact="<sip:alice@198.51.100.9:5080>"))
    assert str(dialog.remote_target) == "sip:alice@198.51.100.9:5080"
    dialog.receive_request(in_dialog("UPDATE", 12, contact="<sip:alice@198.51.100.10>"))
    assert str(dialog.remote_target) == "sip:alice@198.51.100.10"
    dialog.receive_request(in_dialog("INVITE", 13))  # no Contact: unchanged
    dialog.receive_request(in_dialog("NOTIFY", 14, contact="<sip:other@x>"))  # not a refresh
    assert str(dialog.remote_target) == "sip:alice@198.51.100.10"


def test_receive_request_for_another_or_ended_dialog_is_481() -> None:
    dialog = uas_dialog()
    with pytest.raises(CallDoesNotExist) as info:
        dialog.receive_request(in_dialog("BYE", 11, to_tag="other"))
    assert info.value.status == 481
    dialog.terminate()
    with pytest.raises(CallDoesNotExist):
        dialog.receive_request(in_dialog("BYE", 11))


# -- update_from_response --------------------------------------------------------------------


def test_early_to_confirmed_recomputes_route_set_and_target() -> None:
    req = invite()
    dialog = Dialog.from_uac(
        req, answer(req, 183, contact="<sip:early@x>", record_route=("<sip:old;lr>",))
    )
    dialog.update_from_response(answer(req, 180, contact="<sip:early2@x>"))
    assert str(dialog.remote_target) == "sip:early2@x"
    assert state(dialog) is DialogState.EARLY
    dialog.update_from_response(answer(req, 200, contact="<sip:final@x>", record_route=RR))
    assert state(dialog) is DialogState.CONFIRMED
    assert str(dialog.remote_target) == "sip:final@x"
    assert [str(r.uri) for r in dialog.route_set] == [
        "sip:p2.example.com;lr",
        "sip:p1.example.com;lr",
    ]


def test_uas_dialog_confirmed_keeps_route_set() -> None:
    dialog = uas_dialog()
    routes = dialog.route_set
    req = invite()
    dialog.update_from_response(answer(req, 200, tag="local9", record_route=RR))
    assert state(dialog) is DialogState.CONFIRMED
    assert dialog.route_set == routes


def test_non_2xx_final_to_creating_invite_ends_early_dialog() -> None:
    req = invite()
    dialog = Dialog.from_uac(req, answer(req, 180))
    dialog.update_from_response(answer(req, 486))
    assert state(dialog) is DialogState.TERMINATED
    dialog.update_from_response(answer(req, 200))  # late: changes nothing
    assert state(dialog) is DialogState.TERMINATED


def test_reinvite_responses_refresh_target_and_failures() -> None:
    req = invite()
    dialog = Dialog.from_uac(req, answer(req))
    reinvite = dialog.create_request(
        "INVITE", via=VIA, branch="z9hG4bKre", headers=(("Contact", "<sip:alice@192.0.2.1>"),)
    )
    dialog.update_from_response(answer(reinvite, 100, tag="b1", contact=None))
    dialog.update_from_response(answer(reinvite, 180, tag="b1", contact="<sip:ignored@x>"))
    assert str(dialog.remote_target) == "sip:bob@192.0.2.2:5070"  # 1xx: only while early
    dialog.update_from_response(answer(reinvite, 491, tag="b1"))
    assert state(dialog) is DialogState.CONFIRMED
    dialog.update_from_response(answer(reinvite, 200, tag="b1", contact="<sip:moved@x>"))
    assert str(dialog.remote_target) == "sip:moved@x"
    dialog.update_from_response(answer(reinvite, 200, tag="b1", contact=None))
    assert str(dialog.remote_target) == "sip:moved@x"
    # A 2xx to a non-refresh request does not touch the target.
    info = dialog.create_request("INFO", via=VIA, branch="z9hG4bKi")
    dialog.update_from_response(answer(info, 200, tag="b1", contact="<sip:nope@x>"))
    assert str(dialog.remote_target) == "sip:moved@x"
    # §12.2.1.2: 481 ends the dialog.
    dialog.update_from_response(answer(info, 481, tag="b1"))
    assert state(dialog) is DialogState.TERMINATED


def test_408_in_early_dialog_and_other_failures() -> None:
    req = invite()
    dialog = Dialog.from_uac(req, answer(req, 183))
    update = dialog.create_request("UPDATE", via=VIA, branch="z9hG4bKu")
    dialog.update_from_response(answer(update, 500, tag="b1"))
    assert state(dialog) is DialogState.EARLY
    dialog.update_from_response(answer(update, 408, tag="b1"))
    assert state(dialog) is DialogState.TERMINATED


def test_confirmed_dialog_ignores_failure_from_another_fork() -> None:
    req = invite()
    dialog = Dialog.from_uac(req, answer(req))
    dialog.update_from_response(answer(req, 404))
    assert state(dialog) is DialogState.CONFIRMED


def test_dialog_table_is_total() -> None:
    assert {(s, i) for s in DialogState for i in DialogInput} == set(DIALOG_TABLE)
    assert parse_name_addr("<sip:x>").tag is None
