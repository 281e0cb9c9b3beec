"""Operator settings: a TOML file overlaid by ``SBC_<SECTION>__<KEY>`` environment variables and
systemd credentials.

Every section is a frozen pydantic model; the whole tree is handed to the code that needs it as a
constructor argument (docs/architecture.md, "Configuration"), never kept in a global.
:func:`load_settings` is the only
entry point: it reads the file, overlays the environment, then the credential files of
``$CREDENTIALS_DIRECTORY`` (:data:`CREDENTIALS`; systemd's ``LoadCredential=``), validates, and
turns every problem into one readable line (:class:`ConfigError`). Precedence, highest first:
credential file > environment > TOML file > default. :func:`load_with_sources` also says where
each value came from (``sbc config show``). Secrets are ``SecretStr``: they print as
``**********`` in reprs, dumps and error messages.

Environment values are strings; lists take JSON (``["a", "b"]``) or a comma-separated list;
tables (``SBC_HEADERS``, ``SBC_TRANSFER__TARGETS``) take a JSON object, merged key by key over the
file's table. ``SBC_CONFIG`` names the file and is not a setting.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import tomllib
import types
import typing
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from sbc.b2bua import templates

__all__ = [
    "CREDENTIALS",
    "CREDENTIALS_ENV",
    "ENV_PREFIX",
    "RETELL_SIGNALLING_NETWORKS",
    "TEMPLATE_VARIABLES",
    "AdminSettings",
    "CallsSettings",
    "ConfigError",
    "Loaded",
    "LogSettings",
    "MediaSettings",
    "PbxSettings",
    "RecordsSettings",
    "RetellSettings",
    "Route",
    "RouteSettings",
    "SecuritySettings",
    "Settings",
    "SipSettings",
    "TransferSettings",
    "load_settings",
    "load_with_sources",
    "split_host_port",
]

ENV_PREFIX = "SBC_"
CONFIG_ENV = "SBC_CONFIG"
# systemd puts the unit's LoadCredential= files in this directory (one file per credential).
CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"
# Credential name (file in $CREDENTIALS_DIRECTORY) -> the setting it fills. A name whose setting
# does not exist in this version is ignored.
CREDENTIALS = {
    "pbx_password": "pbx.password",
    "retell_auth_password": "retell.auth_password",
    "admin_token": "admin.token",
    "records_password": "records.password",
}

# Retell's published signalling source ranges (docs.retellai.com/deploy/custom-telephony).
RETELL_SIGNALLING_NETWORKS = ("18.98.16.120/30", "143.223.88.0/21", "161.115.160.0/19")

# Variables a [headers] template may use besides header[NAME] (sbc.b2bua.templates owns them).
TEMPLATE_VARIABLES = templates.VARIABLES

# RFC 3261 §25.1 token (codec names in SDP are tokens too).
_TOKEN = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
_E164 = re.compile(r"\+[1-9]\d{6,14}")


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` holds one readable line per problem."""

    def __init__(self, problems: list[str] | tuple[str, ...]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


# --------------------------------------------------------------------------- field types


def split_host_port(value: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> ``(host, port)``; ValueError with a clear message."""
    text = value.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"must be host:port or [v6-address]:port, got {value!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"must be host:port or [v6-address]:port, got {value!r}")
    if not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"must be host:port with a port in 1-65535, got {value!r}")
    return host, int(port_text)


def _check_host(value: str) -> str:
    if not value or any(c.isspace() for c in value) or "/" in value:
        raise ValueError(f"must be a host name or an IP address, got {value!r}")
    return value


def _check_host_port(value: str) -> str:
    split_host_port(value)
    return value


def _parse_network(value: object) -> IPv4Network | IPv6Network:
    if isinstance(value, IPv4Network | IPv6Network):
        return value
    if not isinstance(value, str):
        raise ValueError(f"must be a CIDR network like 10.0.0.0/8, got {value!r}")
    try:
        return ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"not a CIDR network: {value!r} ({exc})") from None


def _check_header_name(value: str) -> str:
    # templates.TemplateError is a ValueError: pydantic reports its message.
    templates.check_header_name(value)
    return value


def _check_x_header(value: str) -> str:
    # A name or a shell-style pattern (X-Customer-*), as sbc.b2bua.templates matches them.
    printable = value.isascii() and value.isprintable() and not any(c.isspace() for c in value)
    if not printable or not value.lower().startswith("x-"):
        raise ValueError(f"must be an X- header name or pattern (X-Customer-*), got {value!r}")
    return value


_PROBE = "X-Template"


def _check_template(value: str) -> str:
    # Compiled here under a stand-in name so that the error lands on headers.<Name>; the whole
    # table is compiled again under its real names by Settings._compile_headers.
    try:
        templates.compile_template(_PROBE, value)
    except templates.TemplateError as exc:
        raise ValueError(str(exc).removeprefix(f"{_PROBE}: ")) from None
    return value


def _compile_regex(value: object) -> re.Pattern[str]:
    if isinstance(value, re.Pattern):
        return value
    if not isinstance(value, str):
        raise ValueError(f"must be a regular expression string, got {value!r}")
    try:
        return re.compile(value)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression {value!r}: {exc}") from None


def _lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


def _check_secret(value: SecretStr) -> SecretStr:
    # Never echo the value: the message names the problem only. An empty password would be sent
    # as one; a control character (NUL, newline, DEL...) is a paste accident, and a NUL cuts a
    # C string short in whatever reads it next.
    text = value.get_secret_value()
    if not text:
        raise ValueError("must not be empty")
    bad = next((c for c in text if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        raise ValueError(f"must not contain control characters (found U+{ord(bad):04X})")
    return value


def _check_e164(value: str) -> str:
    if not _E164.fullmatch(value):
        raise ValueError(f"must be E.164 like +14155550100, got {value!r}")
    return value


def _auth_id_from_extension(data: Any) -> Any:
    """A ``mode="before"`` step of [pbx] and each [[routes]] entry: an unset or empty
    ``auth_id`` is the extension."""
    if isinstance(data, dict):
        data = dict(data)
        if data.get("auth_id") in (None, "") and isinstance(data.get("extension"), str):
            data["auth_id"] = data["extension"]
    return data


Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0)]
Host = Annotated[str, AfterValidator(_check_host)]
HostPort = Annotated[str, AfterValidator(_check_host_port)]
Network = Annotated[IPv4Network | IPv6Network, PlainValidator(_parse_network)]
HeaderName = Annotated[str, AfterValidator(_check_header_name)]
HeaderTemplate = Annotated[str, AfterValidator(_check_template)]
XHeaderName = Annotated[str, AfterValidator(_check_x_header)]
Regex = Annotated[re.Pattern[str], PlainValidator(_compile_regex)]
Transport = Annotated[Literal["udp", "tcp", "tls"], BeforeValidator(_lower)]
Secret = Annotated[SecretStr, AfterValidator(_check_secret)]
E164 = Annotated[str, AfterValidator(_check_e164)]
Extension = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[0-9A-Za-z*#+._-]+$")]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --------------------------------------------------------------------------- sections


class SipSettings(_Section):
    """[sip]: the listener and the SIP stack's timers and limits."""

    # validate_default: the "required when tls_port is set" check must run when the key is absent
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    bind: Host = "0.0.0.0"
    port: Port = 5060  # UDP and TCP on the same port
    advertised_address: Host | None = None  # address written into Via/Contact/SDP; None: bind
    tls_port: Port | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Server / User-Agent header value; "" (the default): no such header, so nothing tells a
    # scanner what answers (set e.g. "sbc" or "sbc/1.2" to announce it).
    user_agent: str = Field(default="", max_length=200)
    t1: Seconds = 0.5  # RFC 3261 §17.1.1.1 (RTT estimate)
    t2: Seconds = 4.0  # RFC 3261 §17.1.2.2 (max non-INVITE retransmit interval)
    t4: Seconds = 5.0  # RFC 3261 §17.1.2.2 (max time a message stays in the network)
    max_message_size: int = Field(default=16384, ge=1024, le=1_048_576)
    read_timeout: Seconds = 10.0
    max_connections: int = Field(default=1024, ge=1)
    max_connections_per_ip: int = Field(default=64, ge=1)
    idle_timeout: Seconds = 120.0
    keepalive_interval: Seconds = 25.0
    # Parse-time limits (sbc.sip.parser.ParseLimits): a message over one is dropped (UDP) or
    # its connection closed (TCP/TLS), and counted in sbc_limit_hits_total.
    max_headers: int = Field(default=128, ge=16, le=4096)  # header lines
    max_via: int = Field(default=64, ge=2, le=1024)  # Via entries
    max_uri_length: int = Field(default=1024, ge=64, le=65536)  # Request-URI characters
    # Server transactions not answered yet per source address; over it a stateless 503
    # (Retry-After: 5).
    max_transactions_per_source: int = Field(default=1000, ge=1)
    # RFC 3261 §18.1.1: requests over 1300 bytes to a UDP peer (URI without transport=) try
    # TCP to the same address first, back to UDP when the connection cannot be made.
    large_requests_over_tcp: bool = True
    # SO_RCVBUF and SO_SNDBUF of the SIP UDP socket, bytes (Linux grants twice the value, capped
    # by net.core.rmem_max / wmem_max); 0: the kernel's default. What does not fit in the
    # receive buffer is dropped by the kernel (the peer retransmits it after T1).
    udp_buffer_size: int = Field(default=2 * 1024 * 1024, ge=0, le=64 * 1024 * 1024)

    @field_validator("t2")
    @classmethod
    def _t2_above_t1(cls, value: float, info: ValidationInfo) -> float:
        t1 = info.data.get("t1")
        if t1 is not None and value < t1:
            raise ValueError(f"must be >= sip.t1 ({t1}), got {value}")
        return value

    @field_validator("tls_cert", "tls_key", mode="after")
    @classmethod
    def _tls_files(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if info.data.get("tls_port") is None:
            return value
        if value is None:
            raise ValueError("required when sip.tls_port is set")
        if not value.is_file():
            raise ValueError(f"no such file: '{value}'")
        return value


class PbxSettings(_Section):
    """[pbx]: the 3CX side, where sbc registers as an extension."""

    host: Host
    port: Port = 5060
    transport: Transport = "udp"
    domain: Host | None = None  # SIP domain of From/To/Request-URI; defaults to host
    extension: Extension
    auth_id: str = Field(default="", max_length=128)  # "": the extension (filled in at load)
    password: Secret
    register_expires: int = Field(default=300, ge=10, le=86400)
    register_backoff_base: Seconds = 30.0
    register_backoff_max: Seconds = 1800.0
    trusted: tuple[Network, ...] = ()  # empty: pbx.host's resolved addresses only
    keepalive: Annotated[Literal["options", "crlf", "off"], BeforeValidator(_lower)] = "options"

    _defaults_from_extension = model_validator(mode="before")(_auth_id_from_extension)

    @field_validator("register_backoff_max")
    @classmethod
    def _backoff_order(cls, value: float, info: ValidationInfo) -> float:
        base = info.data.get("register_backoff_base")
        if base is not None and value < base:
            raise ValueError(f"must be >= pbx.register_backoff_base ({base}), got {value}")
        return value

    @property
    def sip_domain(self) -> str:
        return self.domain or self.host


class RetellSettings(_Section):
    """[retell]: the Retell side, reached as a SIP trunk (no registration)."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    host: Host = "sip.retellai.com"
    port: Port = 5060
    transport: Transport = "tcp"
    number: E164  # the imported number in E.164; Request-URI and To user of every INVITE
    trusted: tuple[Network, ...] = tuple(
        ipaddress.ip_network(n) for n in RETELL_SIGNALLING_NETWORKS
    )
    auth_username: str | None = None  # digest credentials Retell uses toward sbc, if set
    auth_password: Secret | None = None
    answer_timeout: Seconds = 90.0  # keep the PBX leg ringing this long at most
    # With transport = "udp": the local UDP port sbc's requests to Retell leave from (their Via
    # names it, so Retell's responses come back to it, read apart from 3CX's requests at
    # sip.port); 0: a port the kernel picks. None: from sip.port, as every other message.
    # Contacts still name sip.port: Retell's own requests keep arriving there.
    local_udp_port: int | None = Field(default=None, ge=0, le=65535)

    @field_validator("auth_password")
    @classmethod
    def _auth_pair(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if "auth_username" not in info.data:
            return value
        has_user = bool(info.data["auth_username"])
        if has_user and value is None:
            raise ValueError("required when retell.auth_username is set")
        if value is not None and not has_user:
            raise ValueError("set retell.auth_username too, or neither")
        return value


# The dialling plan a country code implies unless set: (national prefix, international prefix,
# digit counts of prefix-less national numbers). NANP (+1): "1 415 555 0100", "011 44 ...", and
# ten-digit numbers without prefix; most of the rest of the world: "0 20 ...", "00 44 ...".
NANP_DIALLING = ("1", "011", (10,))
DEFAULT_DIALLING = ("0", "00", ())


class CallsSettings(_Section):
    """[calls]: limits and number normalisation (PBX numbers -> E.164).

    ``national_prefix``, ``international_prefix`` and ``national_lengths`` default from
    ``country_code``: NANP's ``1`` / ``011`` / ``[10]`` for country code 1, else ``0`` / ``00`` /
    ``[]``; set them for a country that differs.
    """

    max_concurrent: int = Field(default=100, ge=1)
    # Calls in progress per source address of their INVITE; over it 503 with Retry-After.
    # None: max_concurrent (the PBX's one address carries all of its calls); set it lower when
    # several sources share the bridge (Retell's addresses, a second PBX).
    max_calls_per_source: int | None = Field(default=None, ge=1)
    max_duration: Seconds = 7200.0
    # Seconds in the Retry-After of a 503 sent for overload (max_concurrent, no free RTP ports).
    retry_after: int = Field(default=30, ge=1, le=86400)
    country_code: str = Field(default="1", pattern=r"^([1-9][0-9]{0,2})?$")  # "": none
    national_prefix: str = Field(default="1", pattern=r"^[0-9]{0,4}$")  # "": none
    international_prefix: str = Field(default="011", pattern=r"^[0-9]{1,4}$")
    # Digit counts of numbers that arrive without any prefix yet are national numbers
    # ([10] in NANP); empty: such numbers are left as they are.
    national_lengths: tuple[Annotated[int, Field(ge=4, le=14)], ...] = (10,)
    passthrough_x_headers: tuple[XHeaderName, ...] = ()
    # SIGTERM: calls in progress may run this long (new ones get 503), then they are BYE'd.
    drain_timeout: float = Field(default=30.0, ge=0, le=3600)

    @model_validator(mode="before")
    @classmethod
    def _dialling_from_country(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        country = data.get("country_code", "1")
        national, international, lengths = NANP_DIALLING if country == "1" else DEFAULT_DIALLING
        data = dict(data)
        data.setdefault("national_prefix", national)
        data.setdefault("international_prefix", international)
        data.setdefault("national_lengths", lengths)
        return data


class MediaSettings(_Section):
    """[media]: how RTP crosses the bridge."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    mode: Annotated[Literal["relay", "passthrough", "rtpengine"], BeforeValidator(_lower)] = "relay"
    rtp_port_min: int = Field(default=20000, ge=1024, le=65535)
    rtp_port_max: int = Field(default=20999, ge=1024, le=65535)
    rtpengine: HostPort | None = None  # NG control socket, host:port (UDP)
    # rtpengine only: the `inject DTMF` flag on every call, so that a SIP INFO key press reaches
    # Retell (NG `play DTMF`); all of the call's audio then goes through rtpengine's transcoding
    # engine (no kernel forwarding, more CPU). Off: INFO digits are only logged.
    rtpengine_inject_dtmf: bool = False
    media_timeout: Seconds = 60.0
    learning_window: Seconds = 3.0
    codecs: tuple[str, ...] = ("PCMU", "PCMA", "G722", "telephone-event")

    @field_validator("rtp_port_min")
    @classmethod
    def _even_min(cls, value: int) -> int:
        # RFC 3550 §11: RTP takes an even port, RTCP the next odd one.
        if value % 2:
            raise ValueError(f"must be even (RTP uses even ports), got {value}")
        return value

    @field_validator("rtp_port_max")
    @classmethod
    def _range(cls, value: int, info: ValidationInfo) -> int:
        low = info.data.get("rtp_port_min")
        if low is not None and value <= low:
            raise ValueError(f"must be greater than media.rtp_port_min ({low}), got {value}")
        return value

    @field_validator("rtpengine")
    @classmethod
    def _rtpengine_needed(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("mode") == "rtpengine" and not value:
            raise ValueError("required when media.mode = 'rtpengine' (host:port of the NG socket)")
        return value

    @field_validator("codecs")
    @classmethod
    def _codecs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        seen: set[str] = set()
        for name in value:
            if not _TOKEN.fullmatch(name):
                raise ValueError(f"not a codec name: {name!r}")
            if name.lower() in seen:
                raise ValueError(f"listed twice: {name!r}")
            seen.add(name.lower())
        if not seen - {"telephone-event"}:
            raise ValueError("needs at least one audio codec (PCMU, PCMA, G722, ...)")
        return value

    @property
    def rtpengine_address(self) -> tuple[str, int] | None:
        return split_host_port(self.rtpengine) if self.rtpengine else None


class TransferSettings(_Section):
    """[transfer]: how a transfer asked for by Retell reaches the PBX."""

    mode: Annotated[Literal["refer", "invite"], BeforeValidator(_lower)] = "refer"
    allow: Regex = re.compile(r"^[0-9*#+]{1,32}$")  # a target must match it as a whole
    targets: dict[str, str] = Field(default_factory=dict)  # name -> PBX number
    ring_timeout: Seconds = 30.0  # invite mode: how long the human's phone may ring

    @field_validator("targets")
    @classmethod
    def _targets_allowed(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        allow = info.data.get("allow")
        if allow is None:
            return value
        for name, number in value.items():
            if not allow.fullmatch(number):
                raise ValueError(
                    f"target {name!r} = {number!r} does not match transfer.allow {allow.pattern!r}"
                )
        return value


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


def _check_bearer(value: SecretStr) -> SecretStr:
    # RFC 6750 §2.1: a bearer token is visible ASCII (no spaces); never echoed.
    text = value.get_secret_value()
    if not all("!" <= c <= "~" for c in text):
        raise ValueError("must be visible ASCII characters without spaces")
    return value


BearerToken = Annotated[SecretStr, AfterValidator(_check_secret), AfterValidator(_check_bearer)]


class AdminSettings(_Section):
    """[admin]: the HTTP endpoint for health, metrics and call state.

    With a bearer token (``token``, or read from ``token_file``, or the ``admin_token``
    credential) every request must carry ``Authorization: Bearer <token>``. Listening anywhere
    but on loopback requires one: the endpoint lists calls and can end them.
    """

    listen: HostPort = "127.0.0.1:8081"
    token: BearerToken | None = None
    token_file: Path | None = None  # a file holding the token (one line)

    @field_validator("token_file")
    @classmethod
    def _token_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            _read_token_file(value)  # refused now rather than at start
        return value

    @model_validator(mode="after")
    def _token_needed(self) -> AdminSettings:
        if self.token is not None and self.token_file is not None:
            raise ValueError("set admin.token or admin.token_file, not both")
        if self.token is None and self.token_file is None and not _is_loopback(self.host):
            raise ValueError(
                f"listen = {self.listen!r} is not a loopback address: set admin.token (or "
                "admin.token_file, or the admin_token credential) so that the API needs it"
            )
        return self

    @property
    def host(self) -> str:
        return split_host_port(self.listen)[0]

    @property
    def port(self) -> int:
        return split_host_port(self.listen)[1]

    def bearer_token(self) -> str | None:
        """The token requests must carry (read from ``token_file`` when that is set)."""
        if self.token is not None:
            return self.token.get_secret_value()
        if self.token_file is not None:
            return _read_token_file(self.token_file)
        return None


def _read_token_file(path: Path) -> str:
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        raise ValueError(f"no such file: '{path}'") from None
    except UnicodeDecodeError:
        raise ValueError(f"'{path}' is not UTF-8 text") from None
    except OSError as exc:
        raise ValueError(f"cannot read '{path}': {exc.strerror}") from None
    token = text.removesuffix("\n").removesuffix("\r")  # `echo token > file`
    _check_bearer(_check_secret(SecretStr(token)))
    return token


class SecuritySettings(_Section):
    """[security]: the edge guard (sbc/net/guard.py): who may talk to sbc and how fast.

    Requests are taken from ``pbx.trusted`` and ``retell.trusted`` (and answers from where sbc
    sent requests); anything else is ``untrusted``: dropped unanswered, or answered 403.
    """

    untrusted: Annotated[Literal["drop", "reject"], BeforeValidator(_lower)] = "drop"
    # Per untrusted source: this many datagrams/requests/connections per rate_window, then a
    # ban of ban_time seconds (Kamailio pike's 30 per 2 s).
    rate_limit: int = Field(default=30, ge=1, le=1_000_000)
    rate_window: Seconds = 2.0
    ban_time: Seconds = 60.0
    # Per trusted source: out-of-dialog requests per rate_window; above it they are dropped
    # (never a ban, never an in-dialog request).
    trusted_rate_limit: int = Field(default=1000, ge=1, le=10_000_000)
    max_sources: int = Field(default=10_000, ge=16, le=10_000_000)  # sources tracked at most
    # New calls (INVITEs outside a dialog) per second for the whole bridge, bursts up to
    # new_call_burst; above it 503 with Retry-After: new_call_retry_after. 0: no cap. 250/s is
    # above the 200/s sbc is benchmarked at (docs/performance.md) and below where one core
    # falls behind, so a flood of INVITEs is refused cheaply before it slows every call.
    new_call_rate: float = Field(default=250.0, ge=0)
    new_call_burst: int = Field(default=500, ge=1)
    new_call_retry_after: int = Field(default=2, ge=1, le=86400)


class LogSettings(_Section):
    """[log]."""

    level: Annotated[
        Literal["debug", "info", "warning", "error", "critical"], BeforeValidator(_lower)
    ] = "info"
    format: Annotated[Literal["auto", "json", "console"], BeforeValidator(_lower)] = "auto"
    # Every SIP message sent and received, logged at debug level with the values of
    # Authorization and Proxy-Authorization redacted (sbc/ops/sip_trace.py). Unset: on when
    # level is debug; true: on whatever the level; false: off.
    sip_trace: bool | None = None

    @property
    def trace_sip(self) -> bool:
        return self.level == "debug" if self.sip_trace is None else self.sip_trace


# Where call records go when records.path is unset or relative: systemd's StateDirectory=
# (first entry of $STATE_DIRECTORY), else this directory.
STATE_DIRECTORY_ENV = "STATE_DIRECTORY"
DEFAULT_STATE_DIRECTORY = Path("/var/lib/sbc")
RECORDS_FILE = "calls.sqlite3"


def state_directory(env: Mapping[str, str] | None = None) -> Path:
    """``$STATE_DIRECTORY`` (its first entry: systemd separates several with ``:``), else
    ``/var/lib/sbc``."""
    value = (os.environ if env is None else env).get(STATE_DIRECTORY_ENV, "")
    first = value.split(":")[0]
    return Path(first) if first else DEFAULT_STATE_DIRECTORY


POSTGRESQL_SCHEMES = ("postgresql", "postgres")
_REDACTED = "***"


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def redact_url(text: str) -> str:
    """``text`` with the password of every URL in it (``scheme://user:PASSWORD@host``, or a
    ``password=`` query parameter as libpq takes it) replaced by ``***``; the rest as it is.
    For logs, errors and ``sbc config show``."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda match: _redact_one(match.group(0)), text)


def _redact_one(url: str) -> str:
    try:
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        return _REDACTED  # not a URL we can take apart: show none of it
    userinfo, at, hostinfo = parts.netloc.rpartition("@")
    in_userinfo = bool(at) and ":" in userinfo
    in_query = any(key == "password" for key, _ in query)
    if not (in_userinfo or in_query):
        return url  # as written (urlunsplit would normalise a postgresql:///db?host=... URL)
    netloc = f"{userinfo.partition(':')[0]}:{_REDACTED}@{hostinfo}" if in_userinfo else parts.netloc
    text = parts.query
    if in_query:
        text = urlencode([(k, _REDACTED if k == "password" else v) for k, v in query], safe="*/")
    # by hand: urlunsplit drops the // of an empty host (postgresql:///db?host=/run/...)
    return (
        f"{parts.scheme}://{netloc}{parts.path}"
        + (f"?{text}" if text else "")
        + (f"#{parts.fragment}" if parts.fragment else "")
    )


def _default_instance() -> str:
    return socket.gethostname() or "sbc"


class RecordsSettings(_Section):
    """[records]: one row per finished call (sbc/ops/records.py, ``sbc calls``), in SQLite
    (``path``, the default) or PostgreSQL (``url``, sbc/ops/records_pg.py)."""

    # Unset: calls.sqlite3 in the state directory; "": no call records. A relative path is
    # relative to the state directory (never to the config file: /etc is read-only for the
    # service under ProtectSystem=strict).
    path: str | None = None
    # postgresql://user@host:port/dbname: rows go to that PostgreSQL database instead of a file
    # (several instances may share it). Excludes path. A password in it is accepted, never shown.
    url: str | None = Field(default=None, repr=False)
    password: Secret | None = None  # the PostgreSQL user's; overrides one in the url
    # Written in every row (column instance), so that the rows of several sbc sharing one
    # database can be told apart. Default: the host name.
    instance: str = Field(default_factory=_default_instance, min_length=1, max_length=128)
    keep_days: int = Field(default=90, ge=0)  # rows older than this are deleted; 0: never
    queue: int = Field(default=10_000, ge=1, le=1_000_000)  # records waiting for the disk
    ladder_messages: int = Field(default=200, ge=0, le=10_000)  # SIP summaries kept per call

    @field_validator("path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None and ("\x00" in value or value != value.strip()):
            raise ValueError(f"not a usable file path: {value!r}")
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        # Messages never echo the value: it may hold a password.
        if value is None:
            return None
        if any(unicodedata.category(c) == "Cc" or c.isspace() for c in value):
            raise ValueError("must not contain spaces or control characters")
        scheme, sep, _ = value.partition("://")
        if not sep or scheme.lower() not in POSTGRESQL_SCHEMES:
            raise ValueError("must be a postgresql://user@host:port/dbname URL")
        try:
            urlsplit(value).port  # noqa: B018 (a port that is no number raises)
        except ValueError:
            raise ValueError("has a port that is not a number in 0-65535") from None
        return value

    @field_validator("instance")
    @classmethod
    def _instance(cls, value: str) -> str:
        if value != value.strip() or not value.isprintable():
            raise ValueError(f"must be printable without leading or trailing spaces: {value!r}")
        return value

    @model_validator(mode="after")
    def _one_store(self) -> RecordsSettings:
        if self.url is not None and self.path is not None:
            raise ValueError(
                "url and path are mutually exclusive: set url for PostgreSQL, path for SQLite"
            )
        return self

    @property
    def postgresql(self) -> bool:
        """The rows go to PostgreSQL (``url``)."""
        return self.url is not None

    def database(self, env: Mapping[str, str] | None = None) -> Path | None:
        """The SQLite file (None: records are off, or in PostgreSQL), resolved against the state
        directory."""
        if self.path == "" or self.url is not None:
            return None
        if self.path is None:
            return state_directory(env) / RECORDS_FILE
        return state_directory(env) / self.path  # an absolute path stays as it is


DEFAULT_ROUTE = "default"  # the name of the one implicit route of a config without [[routes]]
# A route's password in $CREDENTIALS_DIRECTORY: route_<name>_password (LoadCredential=).
ROUTE_CREDENTIAL = "route_{name}_password"
# Keys of [pbx] and [retell] that belong to each [[routes]] entry once there are routes.
ROUTE_KEYS = {"pbx": ("extension", "auth_id", "password"), "retell": ("number",)}
_ROUTE_STAND_INS = {"extension": "0", "auth_id": "", "password": "-", "number": "+10000000"}


class RouteSettings(_Section):
    """One ``[[routes]]`` entry: a 3CX extension of its own, bridged to a Retell number of its
    own. What it leaves unset comes from the top level (``[headers]``, ``[transfer] targets``,
    ``calls.max_concurrent``); the peers (``[pbx]`` host, port, transport, trusted; ``[retell]``
    host, trunk credentials) are shared by every route."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    extension: Extension
    auth_id: str = Field(default="", max_length=128)  # "": the extension (filled in at load)
    password: Secret
    number: E164
    headers: dict[HeaderName, HeaderTemplate] | None = None  # None: the top-level [headers]
    transfer_targets: dict[str, str] | None = None  # None: [transfer] targets
    max_concurrent: int | None = Field(default=None, ge=1)  # None: calls.max_concurrent

    _defaults_from_extension = model_validator(mode="before")(_auth_id_from_extension)

    @field_validator("headers")
    @classmethod
    def _compile_headers(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None:
            templates.compile_headers(value)
        return value


@dataclass(frozen=True)
class Route:
    """A route with its fallbacks resolved: what the service builds one registration and one
    call config from (:meth:`Settings.effective_routes`)."""

    name: str
    extension: str
    auth_id: str
    password: SecretStr
    number: str
    headers: Mapping[str, str]
    transfer: TransferSettings
    max_concurrent: int


class Settings(BaseSettings):
    """The whole configuration. Build it with :func:`load_settings` (file + environment).

    Constructed directly (``Settings(pbx=..., retell=...)``) it takes values from its arguments
    only, never from the process environment, so tests stay independent of the machine.
    """

    model_config = SettingsConfigDict(frozen=True, extra="forbid")

    sip: SipSettings = Field(default_factory=SipSettings)
    pbx: PbxSettings
    retell: RetellSettings
    headers: dict[HeaderName, HeaderTemplate] = Field(default_factory=dict)
    calls: CallsSettings = Field(default_factory=CallsSettings)
    media: MediaSettings = Field(default_factory=MediaSettings)
    transfer: TransferSettings = Field(default_factory=TransferSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    records: RecordsSettings = Field(default_factory=RecordsSettings)
    # Several extensions, each bridged to its own Retell number (docs/configuration.md,
    # "Routes"); empty: the one implicit route "default" of [pbx] and [retell].
    routes: tuple[RouteSettings, ...] = ()

    @field_validator("headers")
    @classmethod
    def _compile_headers(cls, value: dict[str, str]) -> dict[str, str]:
        # The real compile (names, duplicates differing only in case, line length).
        templates.compile_headers(value)
        return value

    @model_validator(mode="before")
    @classmethod
    def _single_route_keys_from_routes(cls, data: Any) -> Any:
        """With [[routes]], [pbx] extension/auth_id/password and [retell] number are per route:
        set there, they are refused (which would they belong to?); left out, they take the
        first route's values, so that what reads one extension (status line, config show)
        reads the first route's."""
        if not isinstance(data, dict) or not data.get("routes"):
            return data
        routes = data["routes"]
        first = routes[0] if isinstance(routes, list | tuple) and routes else None
        if not isinstance(first, dict):
            return data  # RouteSettings instances (built in code) or bad input: no filling
        data = dict(data)
        for section, keys in ROUTE_KEYS.items():
            table = data.get(section)
            if isinstance(table, BaseModel):
                continue  # a section built in code: it carries its own values
            table = dict(table) if isinstance(table, dict) else {}
            for key in keys:
                if key in table:
                    raise ValueError(
                        f"{section}.{key}: set it in each [[routes]] entry, not in [{section}], "
                        "when [[routes]] is used"
                    )
                value = first.get(key)
                # A missing or bad value is reported on the route (routes[0].number) alone:
                # a stand-in that passes keeps [pbx]/[retell] from repeating the problem.
                ok = isinstance(value, str) and (key != "number" or _E164.fullmatch(value))
                table[key] = value if ok else _ROUTE_STAND_INS[key]
            data[section] = table
        return data

    @model_validator(mode="after")
    def _routes_distinct(self) -> Settings:
        """Two routes may not share a name, an extension (3CX's INVITE would match both) or a
        number (Retell's calls would)."""
        problems: list[str] = []
        for what in ("name", "extension", "number"):
            seen: dict[str, tuple[int, str]] = {}
            for index, route in enumerate(self.routes):
                value = getattr(route, what)
                key = value.lower() if what == "name" else value
                if key in seen:
                    first, first_name = seen[key]
                    problems.append(
                        f"routes[{index}] ({route.name!r}): {what} {value!r} is already "
                        f"used by routes[{first}] ({first_name!r})"
                    )
                else:
                    seen[key] = (index, route.name)
        for index, route in enumerate(self.routes):
            for target, number in (route.transfer_targets or {}).items():
                if not self.transfer.allow.fullmatch(number):
                    problems.append(
                        f"routes[{index}].transfer_targets: target {target!r} = {number!r} does "
                        f"not match transfer.allow {self.transfer.allow.pattern!r}"
                    )
        if problems:
            raise ValueError("\n".join(problems))  # one line each (see _lines)
        return self

    @model_validator(mode="after")
    def _retell_port_apart(self) -> Settings:
        """Retell's UDP socket cannot share the SIP port (the bind would fail at start)."""
        port = self.retell.local_udp_port
        if port and port in (self.sip.port, self.sip.tls_port):
            raise ValueError(
                f"retell.local_udp_port: {port} is sip.port or sip.tls_port; "
                "pick another port, or 0 for one the kernel picks"
            )
        return self

    def effective_routes(self) -> tuple[Route, ...]:
        """Every route with its fallbacks filled in, in the order of the file; without
        [[routes]] the one implicit route :data:`DEFAULT_ROUTE` of [pbx] and [retell]."""
        if not self.routes:
            pbx = self.pbx
            return (
                Route(
                    name=DEFAULT_ROUTE,
                    extension=pbx.extension,
                    auth_id=pbx.auth_id,
                    password=pbx.password,
                    number=self.retell.number,
                    headers=self.headers,
                    transfer=self.transfer,
                    max_concurrent=self.calls.max_concurrent,
                ),
            )
        return tuple(
            Route(
                name=route.name,
                extension=route.extension,
                auth_id=route.auth_id,
                password=route.password,
                number=route.number,
                headers=self.headers if route.headers is None else route.headers,
                transfer=(
                    self.transfer
                    if route.transfer_targets is None
                    else self.transfer.model_copy(update={"targets": route.transfer_targets})
                ),
                max_concurrent=(
                    self.calls.max_concurrent
                    if route.max_concurrent is None
                    else route.max_concurrent
                ),
            )
            for route in self.routes
        )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_settings() merges the file and an explicit environment mapping itself.
        return (init_settings,)


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Loaded:
    """Settings and where each value came from.

    ``sources`` maps a dotted key (``pbx.port``; ``headers.X-Name`` and
    ``transfer.targets.NAME`` per table entry) to ``"file"``, ``"environment SBC_..."`` or
    ``"credential NAME"``; a key not in it has its default.
    """

    settings: Settings
    sources: Mapping[str, str]


def load_settings(path: Path | str | None, env: Mapping[str, str] | None = None) -> Settings:
    """Read ``path`` (TOML; None: no file), overlay ``SBC_*`` variables of ``env`` (default:
    ``os.environ``) and the credential files of ``$CREDENTIALS_DIRECTORY`` named in ``env``,
    validate. Raises :class:`ConfigError` listing every problem."""
    return load_with_sources(path, env).settings


def load_with_sources(path: Path | str | None, env: Mapping[str, str] | None = None) -> Loaded:
    """:func:`load_settings`, and the source of every value that is not a default."""
    environ = os.environ if env is None else env
    data: dict[str, Any] = {} if path is None else _read_toml(Path(path))
    sources = dict.fromkeys(_leaves(data), "file")
    overrides, env_paths, problems = _env_overrides(environ)
    credentials, credential_paths, credential_problems = _credentials(environ)
    problems += credential_problems
    if problems:
        raise ConfigError(problems)
    for key in _leaves(overrides):
        sources[key] = next(
            (
                f"environment {v}"
                for k, v in env_paths.items()
                if key == k or key.startswith(k + ".")
            ),
            "environment",
        )
    _deep_merge(data, overrides)
    for key, name in credential_paths.items():
        sources[key] = name
    _deep_merge(data, credentials)
    # Each route's secrets: SBC_ROUTES__<NAME>__PASSWORD, then its credential file.
    route_problems = _route_secrets(data, environ, sources)
    if route_problems:
        raise ConfigError(route_problems)
    # A missing required section is reported key by key ("pbx.host: required"), not as a whole.
    for name, field in Settings.model_fields.items():
        if field.is_required() and name not in data:
            data[name] = {}
    try:
        return Loaded(Settings(**data), sources)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, {**env_paths, **credential_paths})) from None


ROUTE_ENV_KEYS = ("password", "auth_id")


def _route_secrets(
    data: dict[str, Any], env: Mapping[str, str], sources: dict[str, str]
) -> list[str]:
    """Fill each ``[[routes]]`` entry's ``password`` / ``auth_id`` from
    ``SBC_ROUTES__<NAME>__<KEY>`` and its password from the credential file
    ``route_<name>_password`` (same precedence as the rest: credential > environment > file).
    Returns the problems (a variable naming no route, an unreadable credential file)."""
    problems: list[str] = []
    routes = data.get("routes")
    entries = [r for r in routes if isinstance(r, dict)] if isinstance(routes, list) else []
    by_name = {str(r.get("name", "")).lower(): r for r in entries}
    for name in sorted(env):
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if not name.upper().startswith(ENV_PREFIX) or parts[0] != "routes" or len(parts) != 3:
            continue
        route = by_name.get(parts[1])
        if route is None:
            problems.append(f"{name}: no [[routes]] entry named {parts[1]!r}")
        elif parts[2] not in ROUTE_ENV_KEYS:
            problems.append(f"{name}: only {', '.join(ROUTE_ENV_KEYS)} of a route can be set here")
        else:
            route[parts[2]] = env[name]
            sources[f"routes.{route.get('name')}.{parts[2]}"] = f"environment {name}"
    directory = env.get(CREDENTIALS_ENV)
    for route in entries if directory else ():
        credential = ROUTE_CREDENTIAL.format(name=route.get("name"))
        text = _read_credential(Path(str(directory)), credential, problems)
        if text is not None:
            route["password"] = text
            sources[f"routes.{route.get('name')}.password"] = f"credential {credential}"
    return problems


def _leaves(data: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    """Dotted keys of the non-table values in ``data`` (tables are walked into)."""
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _leaves(value, dotted + ".")
        else:
            yield dotted


def _read_credential(directory: Path, name: str, problems: list[str]) -> str | None:
    """The text of credential file ``name`` in ``directory``; None when it is missing, blank
    (the unit's ``SetCredential=`` stand-in for "no file") or unreadable (then a line in
    ``problems``)."""
    path = directory / name
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        problems.append(f"credential {name} ({path}): cannot read: {exc.strerror}")
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        problems.append(f"credential {name} ({path}): not UTF-8 text")
        return None
    # `echo secret > file` leaves a newline that is no part of the secret.
    text = text.removesuffix("\n").removesuffix("\r")
    return text if text.strip() else None


def _credentials(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """Files of ``$CREDENTIALS_DIRECTORY`` named in :data:`CREDENTIALS` -> (nested dict, dotted
    path -> "credential NAME", problems). A missing file, or one that is empty or blank, sets
    nothing: the unit's ``SetCredential=NAME:\\x20`` default (one space; systemd refuses an
    empty value) stands for a credential file that does not exist."""
    overrides: dict[str, Any] = {}
    origins: dict[str, str] = {}
    problems: list[str] = []
    directory = env.get(CREDENTIALS_ENV)
    if not directory:
        return overrides, origins, problems
    for name, dotted in CREDENTIALS.items():
        section, key = dotted.split(".")
        model = Settings.model_fields[section].annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        if key not in model.model_fields:
            continue  # a credential for a setting this version does not have
        text = _read_credential(Path(directory), name, problems)
        if text is None:
            continue
        overrides.setdefault(section, {})[key] = text
        origins[dotted] = f"credential {name}"
    return overrides, origins, problems


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a directory, not a TOML file"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: TOML syntax error: {exc}"]) from None


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> None:
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value


def _is_container(annotation: Any) -> type | None:
    """``list``/``dict``-shaped annotation (looking through Optional/Annotated) -> its origin."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _is_container(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _is_container(arg)
            if found is not None:
                return found
        return None
    kinds: tuple[type, ...] = (tuple, list, dict)
    for kind in kinds:
        if kind in (annotation, origin):
            return kind
    return None


def _env_value(name: str, raw: str, annotation: Any) -> tuple[Any, str | None]:
    kind = _is_container(annotation)
    if kind is None:
        return raw, None
    text = raw.strip()
    if kind is dict or text.startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            return None, f"{name}: not valid JSON ({exc.msg} at column {exc.colno})"
        expected = dict if kind is dict else list
        if not isinstance(value, expected):
            return None, f"{name}: must be a JSON {'object' if kind is dict else 'array'}"
        return value, None
    return [item.strip() for item in text.split(",") if item.strip()], None


def _env_overrides(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """``SBC_SECTION__KEY`` variables -> (nested dict, dotted path -> variable name, problems)."""
    overrides: dict[str, Any] = {}
    origins: dict[str, str] = {}
    problems: list[str] = []
    for name in sorted(env):
        if not name.upper().startswith(ENV_PREFIX) or name.upper() == CONFIG_ENV:
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if parts[0] == "routes" and len(parts) != 2:
            if len(parts) == 1:  # SBC_ROUTES: the whole array, as JSON
                value, problem = _env_value(name, env[name], tuple)
                if problem is None:
                    overrides["routes"] = value
                    origins["routes"] = name
                else:
                    problems.append(problem)
            continue  # SBC_ROUTES__<NAME>__<KEY>: _route_secrets
        section = Settings.model_fields.get(parts[0])
        if section is None or len(parts) > 2:
            problems.append(f"{name}: unknown setting (expected SBC_<SECTION>__<KEY>)")
            continue
        if len(parts) == 1:
            value, problem = _env_value(name, env[name], dict)
            if problem is None:
                overrides[parts[0]] = value
                origins[parts[0]] = name
            else:
                problems.append(problem)
            continue
        model = section.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            problems.append(
                f"{name}: set {parts[0]} as a JSON object in {ENV_PREFIX}{parts[0].upper()}"
            )
            continue
        field = model.model_fields.get(parts[1])
        if field is None:
            problems.append(f"{name}: unknown setting {parts[0]}.{parts[1]}")
            continue
        value, problem = _env_value(name, env[name], field.annotation)
        if problem is not None:
            problems.append(problem)
            continue
        overrides.setdefault(parts[0], {})[parts[1]] = value
        origins[f"{parts[0]}.{parts[1]}"] = name
    return overrides, origins, problems


def _secret_paths() -> frozenset[str]:
    paths = set()
    for section_name, section in Settings.model_fields.items():
        model = section.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            for name, field in model.model_fields.items():
                if "SecretStr" in repr(field.annotation):
                    paths.add(f"{section_name}.{name}")
    return frozenset(paths)


def _loc_text(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if part == "[key]":
            continue
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _describe(exc: ValidationError, env_paths: Mapping[str, str]) -> list[str]:
    secrets = _secret_paths()
    return list(_lines(exc, secrets, env_paths))


def _lines(
    exc: ValidationError, secrets: frozenset[str], env_paths: Mapping[str, str]
) -> Iterator[str]:
    for error in exc.errors(include_url=False):
        path = _loc_text(error["loc"])
        kind, msg = error["type"], error["msg"]
        if kind == "missing":
            text = "required"
        elif kind == "extra_forbidden":
            text = "unknown key"
        elif kind == "value_error":
            text = msg.removeprefix("Value error, ")
        else:
            text = msg[:1].lower() + msg[1:]
            value = error.get("input")
            secret = any(path == s or path.startswith(s + ".") for s in secrets) or (
                path.startswith("routes[") and path.endswith(".password")
            )
            if isinstance(value, str):
                value = redact_url(value)  # records.url: a password in a URL never shown
            if not secret and isinstance(value, str | int | float):
                text += f", got {value!r}"
        origin = next(
            (v for k, v in env_paths.items() if path == k or path.startswith(k + ".")), None
        )
        if origin is not None:
            text += f" (from {origin})"
        if path:
            yield f"{path}: {text}"
        else:  # a check across sections (routes) has no single key: its lines name them
            yield from text.split("\n")
