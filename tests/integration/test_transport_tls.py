"""SIP over TLS between two engines: certificates verified by default (RFC 5630, RFC 5922)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from peers import free_port

from sbc.net.addresses import Destination, TransportConfig
from sbc.net.engine import SipEngine
from sbc.net.transport import client_context
from sbc.sip.headers import Headers
from sbc.sip.message import Request
from sbc.sip.uri import parse_uri

A_HOST = "127.0.0.1"
B_HOST = "127.0.0.2"


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A test CA and a server certificate for ``sbc.test`` and 127.0.0.2."""
    root = tmp_path_factory.mktemp("pki")
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sbc test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sbc.test")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("sbc.test"), x509.IPAddress(ipaddress.ip_address(B_HOST))]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": root / "ca.pem", "cert": root / "cert.pem", "key": root / "key.pem"}
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(paths["key"], key)
    return paths


def _options(call_id: str) -> Request:
    headers = Headers(
        [
            ("Max-Forwards", "70"),
            ("From", "<sip:a@127.0.0.1>;tag=t1"),
            ("To", "<sip:b@sbc.test>"),
            ("Call-ID", call_id),
            ("CSeq", "1 OPTIONS"),
        ]
    )
    return Request("OPTIONS", parse_uri("sip:b@sbc.test"), headers)


@pytest.fixture
async def tls_pair(
    pki: dict[str, Path], free_port_factory: Callable[..., int]
) -> AsyncIterator[Callable[..., object]]:
    started: list[SipEngine] = []

    async def make(host: str, **overrides: object) -> SipEngine:
        config = TransportConfig(bind=host, port=free_port_factory(host), **overrides)  # type: ignore[arg-type]
        engine = SipEngine(config)
        await engine.start()
        started.append(engine)
        return engine

    try:
        yield make
    finally:
        for engine in started:
            await engine.stop()


async def test_options_over_verified_tls(
    tls_pair: Callable[..., object], pki: dict[str, Path], free_port_factory: Callable[..., int]
) -> None:
    tls_port = free_port_factory(B_HOST)
    b: SipEngine = await tls_pair(  # type: ignore[misc]
        B_HOST, tls_port=tls_port, tls_cert=str(pki["cert"]), tls_key=str(pki["key"])
    )
    a: SipEngine = await tls_pair(A_HOST, tls_ca_file=str(pki["ca"]))  # type: ignore[misc]
    # By name (checked against the DNS SAN) and by address (the IP SAN).
    by_name = Destination("tls", B_HOST, tls_port, server_name="sbc.test")
    response = await a.send_request(_options("tls-name"), by_name)
    assert response.status == 200
    assert b.transports.stats.connections_accepted == 1
    sent = a.send_request(_options("tls-ip"), Destination("tls", B_HOST, tls_port))
    assert (await sent).status == 200
    assert (await sent.wait_sent()).top_via.transport == "TLS"


async def test_unverifiable_certificate_fails_with_503(
    tls_pair: Callable[..., object], pki: dict[str, Path], free_port_factory: Callable[..., int]
) -> None:
    tls_port = free_port_factory(B_HOST)
    b: SipEngine = await tls_pair(  # type: ignore[misc]
        B_HOST, tls_port=tls_port, tls_cert=str(pki["cert"]), tls_key=str(pki["key"])
    )
    # No CA configured: the system store does not know the test CA, so verification fails.
    a: SipEngine = await tls_pair(A_HOST)  # type: ignore[misc]
    response = await a.send_request(
        _options("tls-bad"), Destination("tls", B_HOST, tls_port, server_name="sbc.test")
    )
    assert response.status == 503
    assert a.transports.stats.connect_failures == 1
    assert b.stats.requests_received == 0
    # A name the certificate does not carry fails too, even with the right CA.
    c: SipEngine = await tls_pair(A_HOST, tls_ca_file=str(pki["ca"]))  # type: ignore[misc]
    wrong = await c.send_request(
        _options("tls-wrong-name"), Destination("tls", B_HOST, tls_port, server_name="other.test")
    )
    assert wrong.status == 503


def test_client_context_defaults() -> None:
    context = client_context(TransportConfig())
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    relaxed = client_context(TransportConfig(tls_verify=False))
    assert relaxed.verify_mode == ssl.CERT_NONE


async def test_stalled_tls_handshake_cut_at_the_read_deadline(
    pki: dict[str, Path], tls_pair: Callable[..., object]
) -> None:
    """Slowloris on the TLS port: a peer that opens the connection and trickles a handshake
    that never completes is closed after read_timeout, not asyncio's default 60 s."""
    b = await tls_pair(  # type: ignore[misc]
        B_HOST,
        tls_port=free_port(B_HOST),
        tls_cert=str(pki["cert"]),
        tls_key=str(pki["key"]),
        read_timeout=0.5,
    )
    assert isinstance(b, SipEngine) and b.transports.tls_address is not None
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(*b.transports.tls_address)
    started = loop.time()

    async def trickle() -> None:
        # The first bytes of a TLS record header (handshake, TLS 1.0 record version), slowly.
        for byte in b"\x16\x03\x01\x02\x00":
            writer.write(bytes([byte]))
            await asyncio.sleep(0.1)

    sender = asyncio.create_task(trickle())
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    elapsed = loop.time() - started
    sender.cancel()
    await asyncio.gather(sender, return_exceptions=True)
    writer.close()
    assert 0.4 <= elapsed < 3.0, elapsed
    assert b.transports.connection_count == 0
