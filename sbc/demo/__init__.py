"""Local stand-ins of 3CX and Retell: the far ends of the bridge for ``sbc demo`` and the tests.

They are test doubles that ship with sbc, built on its own engine and SIP core, and small on
purpose; the product's call logic (:mod:`sbc.b2bua`) never imports them, the ``sbc demo``
driver (:mod:`sbc.ops.demo`) and the integration tests do. What they do on the wire follows the
captures and notes in PEERS.md:

* :mod:`sbc.demo.tones`: a sine tone as G.711 mu-law, cut into 20 ms PCMU payloads;
* :mod:`sbc.demo.rtp_peer`: :class:`~sbc.demo.rtp_peer.RtpStream`, one side's audio: the tone
  in 20 ms packets, RFC 4733 DTMF on demand, every packet sent and received kept for comparison;
* :mod:`sbc.demo.peer`: what both stand-ins share (their engine, SDP reading, in-dialog requests);
* :mod:`sbc.demo.pbx`: :class:`~sbc.demo.pbx.PbxStandIn` is 3CX: a registrar that challenges
  REGISTER with ``407`` (``realm="3CXPhoneSystem"``, MD5, no qop, as a real 3CX v11 did) and
  checks the digest, and a caller that sends 3CX's INVITE (its User-Agent, ``o=3cxPS`` SDP with
  PCMU/PCMA/G722 and telephone-event 101, a ``Record-Route``) to the registered Contact;
* :mod:`sbc.demo.retell`: :class:`~sbc.demo.retell.RetellStandIn` is Retell's SIP server
  (LiveKit): it answers an INVITE with 180 then 200 and an SDP with exactly one codec (plus
  telephone-event), and records what it received.

Layering: this package imports ``sbc.sip``, ``sbc.sdp``, ``sbc.net`` and ``sbc.media`` only
(``tests/unit/test_layers.py``).
"""
