"""Settings: TOML file + SBC_* environment, validation messages, secrets."""

from __future__ import annotations

import re
import tomllib
import typing
from collections.abc import Callable
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr, ValidationError

from sbc.ops.cli import demo_config_path
from sbc.ops.settings import (
    RETELL_SIGNALLING_NETWORKS,
    ConfigError,
    PbxSettings,
    RetellSettings,
    Settings,
    TransferSettings,
    _is_container,
    load_settings,
    load_with_sources,
    split_host_port,
)

ROOT = Path(__file__).resolve().parents[2]

MINIMAL: dict[str, Any] = {
    "pbx": {"host": "pbx.example.com", "extension": "1000", "password": "file-secret"},
    "retell": {"number": "+14155550100"},
}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f'"{k}" = {_toml_value(v)}' for k, v in value.items()) + "}"
    raise TypeError(value)


def _toml(data: dict[str, Any]) -> str:
    lines = []
    for section, table in data.items():
        lines.append(f"[{section}]")
        for key, value in table.items():
            lines.append(f'"{key}" = {_toml_value(value)}')
    return "\n".join(lines) + "\n"


def _merged(**changes: dict[str, Any]) -> dict[str, Any]:
    data = {k: dict(v) for k, v in MINIMAL.items()}
    for section, table in changes.items():
        data.setdefault(section, {}).update(table)
    return data


@pytest.fixture
def write(tmp_path: Path) -> Callable[[dict[str, Any] | str], Path]:
    def _write(data: dict[str, Any] | str) -> Path:
        path = tmp_path / "sbc.toml"
        path.write_text(data if isinstance(data, str) else _toml(data))
        return path

    return _write


def _problems(path: Path, env: dict[str, str] | None = None) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        load_settings(path, env or {})
    return info.value.problems


# ----------------------------------------------------------------------------- loading


def test_minimal_file_gets_documented_defaults(write):
    s = load_settings(write(MINIMAL), {})
    assert s.pbx.host == "pbx.example.com"
    assert s.pbx.password.get_secret_value() == "file-secret"
    assert s.pbx.auth_id == "1000"  # defaults to the extension
    assert s.pbx.sip_domain == "pbx.example.com"
    assert (s.pbx.port, s.pbx.transport, s.pbx.register_expires, s.pbx.keepalive) == (
        5060,
        "udp",
        300,
        "options",
    )
    assert s.pbx.trusted == ()
    assert (s.retell.host, s.retell.port, s.retell.transport) == ("sip.retellai.com", 5060, "tcp")
    assert s.retell.trusted == tuple(ip_network(n) for n in RETELL_SIGNALLING_NETWORKS)
    assert s.retell.answer_timeout == 90
    assert (s.sip.port, s.sip.t1, s.sip.t2, s.sip.max_message_size) == (5060, 0.5, 4.0, 16384)
    assert s.sip.user_agent == ""  # no Server / User-Agent header unless configured
    assert s.security.untrusted == "drop"
    assert (s.security.rate_limit, s.security.rate_window, s.security.ban_time) == (30, 2.0, 60.0)
    assert (s.security.trusted_rate_limit, s.security.max_sources) == (1000, 10_000)
    assert (s.security.new_call_rate, s.security.new_call_burst) == (250.0, 500)
    assert s.security.new_call_retry_after == 2
    assert s.media.mode == "relay"
    assert (s.media.rtp_port_min, s.media.rtp_port_max) == (20000, 20999)
    assert s.media.codecs == ("PCMU", "PCMA", "G722", "telephone-event")
    assert s.media.rtpengine_address is None
    assert s.transfer.mode == "refer"
    assert s.transfer.allow.fullmatch("800") and not s.transfer.allow.fullmatch("800;x")
    assert (s.admin.host, s.admin.port) == ("127.0.0.1", 8081)
    assert (s.log.level, s.log.format) == ("info", "auto")
    assert (s.calls.max_concurrent, s.calls.max_duration, s.calls.retry_after) == (100, 7200, 30)
    assert s.calls.max_calls_per_source is None  # max_concurrent
    sip = s.sip
    assert (sip.max_headers, sip.max_via, sip.max_uri_length) == (128, 64, 1024)
    assert (sip.max_transactions_per_source, sip.large_requests_over_tcp) == (1000, True)
    assert sip.udp_buffer_size == 2 * 1024 * 1024
    # NANP: country code 1, trunk prefix 1, exit code 011, ten-digit numbers are national.
    calls = s.calls
    assert (calls.country_code, calls.national_prefix, calls.international_prefix) == (
        "1",
        "1",
        "011",
    )
    assert calls.national_lengths == (10,)
    assert s.headers == {}


def test_values_from_file(write):
    data = _merged(
        pbx={"auth_id": "Xy12", "domain": "3cx.local", "trusted": ["10.0.0.0/8", "fd00::/8"]},
        media={"mode": "rtpengine", "rtpengine": "[::1]:2223"},
        headers={"X-Caller-Number": "{caller_number}", "X-Q": "{header[X-3CX-Queue]} {now}"},
        transfer={"targets": {"sales": "800"}},
        log={"level": "DEBUG"},
        calls={"passthrough_x_headers": ["X-Customer-*", "X-Tenant"]},
    )
    s = load_settings(write(data), {})
    assert s.pbx.auth_id == "Xy12"
    assert s.pbx.sip_domain == "3cx.local"
    assert s.pbx.trusted == (ip_network("10.0.0.0/8"), ip_network("fd00::/8"))
    assert s.media.rtpengine_address == ("::1", 2223)
    assert s.headers["X-Q"] == "{header[X-3CX-Queue]} {now}"
    assert s.transfer.targets == {"sales": "800"}
    assert s.log.level == "debug"
    assert s.calls.passthrough_x_headers == ("X-Customer-*", "X-Tenant")


def test_env_overrides_file(write):
    path = write(_merged(sip={"port": 5070}, headers={"X-A": "a", "X-B": "b"}))
    env = {
        "SBC_PBX__PASSWORD": "env-secret",
        "SBC_SIP__PORT": "5080",
        "SBC_PBX__TRUSTED": "10.0.0.0/8, 192.168.0.0/16",
        "SBC_MEDIA__CODECS": '["PCMA", "telephone-event"]',
        "SBC_HEADERS": '{"X-B": "from-env", "X-C": "{called}"}',
        "SBC_CONFIG": "/ignored/because/not/a/setting",
        "HOME": "/root",
    }
    s = load_settings(path, env)
    assert s.pbx.password.get_secret_value() == "env-secret"
    assert s.sip.port == 5080
    assert s.pbx.trusted == (ip_network("10.0.0.0/8"), ip_network("192.168.0.0/16"))
    assert s.media.codecs == ("PCMA", "telephone-event")
    # Tables merge key by key: X-A from the file, X-B replaced, X-C added.
    assert s.headers == {"X-A": "a", "X-B": "from-env", "X-C": "{called}"}


def test_env_alone_without_file():
    env = {
        "SBC_PBX__HOST": "10.1.1.1",
        "SBC_PBX__EXTENSION": "200",
        "SBC_PBX__PASSWORD": "pw",
        "SBC_RETELL": '{"number": "+442071234567"}',
    }
    s = load_settings(None, env)
    assert s.pbx.host == "10.1.1.1"
    assert s.retell.number == "+442071234567"


def test_default_env_is_process_environment(write, monkeypatch):
    monkeypatch.setenv("SBC_PBX__PASSWORD", "from-os-environ")
    s = load_settings(write(MINIMAL))
    assert s.pbx.password.get_secret_value() == "from-os-environ"


def test_direct_construction_ignores_process_environment(monkeypatch):
    monkeypatch.setenv("SBC_PBX__HOST", "should-not-be-used")
    s = Settings(
        pbx=PbxSettings(host="p", extension="1", password=SecretStr("x")),
        retell=RetellSettings(number="+14155550100"),
    )
    assert s.pbx.host == "p"


def test_settings_are_frozen(write):
    s = load_settings(write(MINIMAL), {})
    with pytest.raises(ValidationError):
        s.pbx.port = 1
    with pytest.raises(ValidationError):
        s.log = s.log


def test_secrets_never_shown(write):
    data = _merged(retell={"auth_username": "retell", "auth_password": "retell-secret"})
    s = load_settings(write(data), {"SBC_PBX__PASSWORD": "env-secret"})
    for text in (repr(s), str(s), s.model_dump_json(), repr(s.pbx), str(s.model_dump())):
        assert "env-secret" not in text
        assert "retell-secret" not in text
    assert s.retell.auth_password is not None
    assert s.retell.auth_password.get_secret_value() == "retell-secret"


def test_secret_not_echoed_in_problems(write):
    problems = _problems(write(_merged(pbx={"password": 12345678})))
    assert problems == ("pbx.password: input should be a valid string",)
    problems = _problems(write(MINIMAL), {"SBC_PBX__PASSWORD": "", "SBC_PBX__PORT": "x"})
    assert all("12345678" not in p for p in problems)


# ----------------------------------------------------------------------------- messages


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"retell": {"number": "4155550100"}},
            "retell.number: must be E.164 like +14155550100, got '4155550100'",
        ),
        (
            {"headers": {"X-Foo": "{calller}"}},
            "headers.X-Foo: unknown variable {calller} (known: caller_number, caller_name, "
            "called, pbx_call_id, call_uuid, now, header[NAME])",
        ),
        (
            {"headers": {"X-Foo": "{caller_number!r}"}},
            "headers.X-Foo: unknown variable {caller_number!r}",
        ),
        ({"headers": {"X-Foo": "a {"}}, "headers.X-Foo: unclosed '{' at offset 2 in 'a {'"),
        ({"headers": {"X Foo": "a"}}, "headers.X Foo: header name 'X Foo' is not a SIP token"),
        ({"headers": {"Via": "a"}}, "headers.Via: header 'Via' is built by sbc itself"),
        ({"headers": {"X-A": "x", "x-a": "y"}}, "headers: header 'x-a' configured twice"),
        (
            {"pbx": {"trusted": ["10.0.0.0/8", "10.1.2.3/8"]}},
            "pbx.trusted[1]: not a CIDR network: '10.1.2.3/8' (10.1.2.3/8 has host bits set)",
        ),
        (
            {"retell": {"trusted": ["nonsense"]}},
            "retell.trusted[0]: not a CIDR network: 'nonsense'",
        ),
        (
            {"transfer": {"allow": "[0-9"}},
            "transfer.allow: not a valid regular expression '[0-9': unterminated character set",
        ),
        (
            {"transfer": {"targets": {"sales": "800;evil"}}},
            "transfer.targets: target 'sales' = '800;evil' does not match transfer.allow",
        ),
        (
            {"sip": {"port": 70000}},
            "sip.port: input should be less than or equal to 65535, got 70000",
        ),
        ({"pbx": {"port": 0}}, "pbx.port: input should be greater than or equal to 1, got 0"),
        (
            {"media": {"rtp_port_min": 80}},
            "media.rtp_port_min: input should be greater than or equal to 1024, got 80",
        ),
        (
            {"media": {"rtp_port_min": 30000, "rtp_port_max": 30000}},
            "media.rtp_port_max: must be greater than media.rtp_port_min (30000), got 30000",
        ),
        (
            {"media": {"rtp_port_min": 20001}},
            "media.rtp_port_min: must be even (RTP uses even ports), got 20001",
        ),
        (
            {"media": {"mode": "rtpengine"}},
            "media.rtpengine: required when media.mode = 'rtpengine'",
        ),
        (
            {"media": {"mode": "rtpengine", "rtpengine": "localhost"}},
            "media.rtpengine: must be host:port or [v6-address]:port, got 'localhost'",
        ),
        ({"media": {"mode": "kernel"}}, "media.mode: input should be 'relay', 'passthrough' or"),
        ({"media": {"codecs": ["telephone-event"]}}, "media.codecs: needs at least one audio"),
        ({"media": {"codecs": ["PCMU", "pcmu"]}}, "media.codecs: listed twice: 'pcmu'"),
        ({"media": {"codecs": ["PC MU"]}}, "media.codecs: not a codec name: 'PC MU'"),
        ({"pbx": {"transport": "sctp"}}, "pbx.transport: input should be 'udp', 'tcp' or 'tls'"),
        ({"pbx": {"keepalive": "ping"}}, "pbx.keepalive: input should be 'options', 'crlf' or"),
        ({"pbx": {"register_expires": 5}}, "pbx.register_expires: input should be greater than"),
        (
            {"pbx": {"register_backoff_base": 60, "register_backoff_max": 30}},
            "pbx.register_backoff_max: must be >= pbx.register_backoff_base (60.0), got 30.0",
        ),
        ({"sip": {"t1": 5.0}}, "sip.t2: must be >= sip.t1 (5.0), got 4.0"),
        (
            {"sip": {"max_headers": 8}},
            "sip.max_headers: input should be greater than or equal to 16",
        ),
        ({"sip": {"max_via": 1}}, "sip.max_via: input should be greater than or equal to 2, got 1"),
        ({"sip": {"max_uri_length": 10}}, "sip.max_uri_length: input should be greater than or"),
        ({"sip": {"max_transactions_per_source": 0}}, "sip.max_transactions_per_source: input"),
        ({"sip": {"udp_buffer_size": -1}}, "sip.udp_buffer_size: input should be greater"),
        ({"calls": {"max_calls_per_source": 0}}, "calls.max_calls_per_source: input should be"),
        (
            {"sip": {"tls_port": 5061, "tls_key": str(ROOT / "pyproject.toml")}},
            "sip.tls_cert: required when sip.tls_port is set",
        ),
        (
            {
                "sip": {
                    "tls_port": 5061,
                    "tls_cert": "/nonexistent/c.pem",
                    "tls_key": str(ROOT / "pyproject.toml"),
                }
            },
            "sip.tls_cert: no such file: '/nonexistent/c.pem'",
        ),
        ({"retell": {"auth_username": "u"}}, "retell.auth_password: required when retell.auth_"),
        ({"retell": {"auth_password": "p"}}, "retell.auth_password: set retell.auth_username"),
        ({"retell": {"local_udp_port": 5060}}, "retell.local_udp_port: 5060 is sip.port or"),
        ({"retell": {"local_udp_port": 70000}}, "retell.local_udp_port: input should be less"),
        ({"calls": {"country_code": "+1"}}, "calls.country_code: string should match pattern"),
        (
            {"calls": {"passthrough_x_headers": ["Foo"]}},
            "calls.passthrough_x_headers[0]: must be an X- header name or pattern",
        ),
        ({"admin": {"listen": "127.0.0.1:99999"}}, "admin.listen: must be host:port with a port"),
        ({"log": {"level": "loud"}}, "log.level: input should be 'debug', 'info', 'warning',"),
        ({"log": {"format": "xml"}}, "log.format: input should be 'auto', 'json' or 'console'"),
        ({"pbx": {"pasword": "typo"}}, "pbx.pasword: unknown key"),
        ({"sipp": {"port": 1}}, "sipp: unknown key"),
        ({"pbx": {"host": "pbx example"}}, "pbx.host: must be a host name or an IP address"),
    ],
)
def test_validation_message(write, changes, expected):
    problems = _problems(write(_merged(**changes)))
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems[0]


def test_missing_required_fields_one_line_each(write):
    problems = _problems(write({"pbx": {"host": "p"}, "retell": {}}))
    assert problems == (
        "pbx.extension: required",
        "pbx.password: required",
        "retell.number: required",
    )
    # An empty file names each missing key, not the missing sections.
    assert _problems(write({})) == (
        "pbx.host: required",
        "pbx.extension: required",
        "pbx.password: required",
        "retell.number: required",
    )


def test_several_problems_are_all_reported(write):
    problems = _problems(write(_merged(retell={"number": "1"}, sip={"port": 0})))
    assert [p.split(":")[0] for p in problems] == ["sip.port", "retell.number"]


def test_tls_port_needs_both_files(write):
    assert _problems(write(_merged(sip={"tls_port": 5061}))) == (
        "sip.tls_cert: required when sip.tls_port is set",
        "sip.tls_key: required when sip.tls_port is set",
    )


def test_tls_files_that_exist_pass(write, tmp_path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("y")
    s = load_settings(
        write(_merged(sip={"tls_port": 5061, "tls_cert": str(cert), "tls_key": str(key)})), {}
    )
    assert (s.sip.tls_port, s.sip.tls_cert, s.sip.tls_key) == (5061, cert, key)


def test_problem_names_the_environment_variable(write):
    problems = _problems(write(MINIMAL), {"SBC_PBX__PORT": "abc"})
    assert problems == (
        "pbx.port: input should be a valid integer, unable to parse string as an integer, "
        "got 'abc' (from SBC_PBX__PORT)",
    )


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"SBC_PBX__PASWORD": "x"}, "SBC_PBX__PASWORD: unknown setting pbx.pasword"),
        ({"SBC_NOPE": "x"}, "SBC_NOPE: unknown setting (expected SBC_<SECTION>__<KEY>)"),
        ({"SBC_PBX__A__B": "x"}, "SBC_PBX__A__B: unknown setting (expected"),
        ({"SBC_HEADERS__X_FOO": "x"}, "SBC_HEADERS__X_FOO: set headers as a JSON object in"),
        ({"SBC_HEADERS": "{bad"}, "SBC_HEADERS: not valid JSON (Expecting property name"),
        ({"SBC_HEADERS": "[1]"}, "SBC_HEADERS: must be a JSON object"),
        ({"SBC_PBX__TRUSTED": "[1"}, "SBC_PBX__TRUSTED: not valid JSON"),
        ({"SBC_TRANSFER__TARGETS": "[]"}, "SBC_TRANSFER__TARGETS: must be a JSON object"),
    ],
)
def test_bad_environment_variables(write, env, expected):
    problems = _problems(write(MINIMAL), env)
    assert len(problems) == 1
    assert problems[0].startswith(expected), problems[0]


def test_missing_file(tmp_path):
    path = tmp_path / "absent.toml"
    assert _problems(path) == (f"{path}: no such file",)


def test_directory_instead_of_file(tmp_path):
    assert _problems(tmp_path) == (f"{tmp_path}: is a directory, not a TOML file",)


def test_toml_syntax_error(write):
    path = write("[pbx\nhost = 1\n")
    (line,) = _problems(path)
    assert line.startswith(f"{path}: TOML syntax error: ")
    assert "line 1" in line


def test_not_utf8(write, tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[pbx]\nhost = "\xe9"\n')
    assert _problems(path) == (f"{path}: not UTF-8 text",)


def test_config_error_message_joins_problems():
    err = ConfigError(["a: x", "b: y"])
    assert str(err) == "a: x\nb: y"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8081", ("127.0.0.1", 8081)),
        ("localhost:1", ("localhost", 1)),
        ("[::1]:2223", ("::1", 2223)),
        (" host:65535 ", ("host", 65535)),
    ],
)
def test_split_host_port(text, expected):
    assert split_host_port(text) == expected


@pytest.mark.parametrize("text", ["host", ":80", "host:", "host:0", "h:65536", "::1:80", "[::1]"])
def test_split_host_port_rejects(text):
    with pytest.raises(ValueError, match="host:port"):
        split_host_port(text)


# ----------------------------------------------------------------------------- shipped files


def _all_keys() -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for section, field in Settings.model_fields.items():
        model = field.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            keys[section] = list(model.model_fields)
        else:
            keys[section] = []
    return keys


def test_example_config_is_valid_and_documents_every_key():
    path = ROOT / "deploy" / "sbc.toml.example"
    s = load_settings(path, {})
    assert s.retell.host == "sip.retellai.com"
    text = path.read_text()
    sections = re.split(r"^\[([a-z.]+)\]\s*$", text, flags=re.M)
    documented: dict[str, set[str]] = {}
    for name, body in zip(sections[1::2], sections[2::2], strict=True):
        section = name.split(".")[0]
        found = re.findall(r"^#?\s*([a-z_0-9]+)\s*=", body, flags=re.M)
        documented.setdefault(section, set()).update(found)
        if "." in name:
            documented[section].add(name.split(".")[1])
    for section, fields in _all_keys().items():
        if section == "routes":
            continue  # an array of tables, commented out: test_example_config_documents_routes
        assert section in documented, section
        missing = set(fields) - documented[section]
        assert not missing, f"[{section}] example lacks {sorted(missing)}"
    # The real Retell defaults are spelled out.
    data = tomllib.loads(text)
    assert data["retell"]["trusted"] == list(RETELL_SIGNALLING_NETWORKS)


def test_configuration_doc_lists_every_key_and_env_name():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    for section, fields in _all_keys().items():
        for field in fields:
            assert f"`{section}.{field}`" in doc, f"{section}.{field}"
            assert f"`SBC_{section.upper()}__{field.upper()}`" in doc, f"{section}.{field}"
    assert "`SBC_HEADERS`" in doc


def test_demo_config_is_valid_and_shipped_as_package_data():
    s = load_settings(demo_config_path(), {})
    assert s.retell.number.startswith("+")
    assert s.pbx.host != s.retell.host != s.sip.bind  # one loopback address per party
    assert all(h.startswith("127.") for h in (s.pbx.host, s.retell.host, s.sip.bind))
    deploy_copy = ROOT / "deploy" / "demo.toml"
    assert deploy_copy.read_text() == demo_config_path().read_text()


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"pbx": {"trusted": [10]}}, "pbx.trusted[0]: must be a CIDR network like 10.0.0.0/8"),
        (
            {"calls": {"passthrough_x_headers": ["X- bad"]}},
            "calls.passthrough_x_headers[0]: must be an X- header name or pattern",
        ),
        (
            {"calls": {"passthrough_x_headers": ["X-\u00e9"]}},
            "calls.passthrough_x_headers[0]: must be an X- header name or pattern",
        ),
        ({"transfer": {"allow": 5}}, "transfer.allow: must be a regular expression string"),
        # An invalid allow is reported once; targets are not checked against it.
        (
            {"transfer": {"allow": "(", "targets": {"a": "x"}}},
            "transfer.allow: not a valid regular expression",
        ),
        # A bad username is reported once; the password pairing is not checked against it.
        (
            {"retell": {"auth_username": 5, "auth_password": "p"}},
            "retell.auth_username: input should be a valid string, got 5",
        ),
        ({"calls": {"national_lengths": [3]}}, "calls.national_lengths[0]: input should be"),
    ],
)
def test_edge_validation_message(write, changes, expected):
    problems = _problems(write(_merged(**changes)))
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems[0]


def test_section_that_is_not_a_table(write):
    text = 'pbx = "pbx.example.com"\n[retell]\nnumber = "+14155550100"\n'
    (line,) = _problems(write(text))
    assert line.startswith("pbx: input should be a valid dictionary")


def test_unreadable_file(write, monkeypatch):
    path = write(MINIMAL)

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)
    assert _problems(path) == (f"{path}: cannot read: Permission denied",)


def test_optional_fields_from_environment(write):
    env = {
        "SBC_SIP__ADVERTISED_ADDRESS": "203.0.113.10",
        "SBC_MEDIA__MODE": "rtpengine",
        "SBC_MEDIA__RTPENGINE": "127.0.0.1:2223",
        "SBC_CALLS__NATIONAL_LENGTHS": "[10]",
    }
    s = load_settings(write(MINIMAL), env)
    assert s.sip.advertised_address == "203.0.113.10"
    assert s.media.rtpengine_address == ("127.0.0.1", 2223)
    assert s.calls.national_lengths == (10,)


@pytest.mark.parametrize(
    ("calls", "env", "expected"),
    [
        ({"country_code": "31"}, {}, ("31", "0", "00", ())),
        ({"country_code": "44"}, {}, ("44", "0", "00", ())),
        ({"country_code": ""}, {}, ("", "0", "00", ())),
        # Set keys win over what the country code implies.
        (
            {"country_code": "7", "national_prefix": "8", "international_prefix": "810"},
            {},
            ("7", "8", "810", ()),
        ),
        ({"country_code": "1", "national_lengths": []}, {}, ("1", "1", "011", ())),
        # The environment's country code picks the plan as the file's would.
        ({}, {"SBC_CALLS__COUNTRY_CODE": "31"}, ("31", "0", "00", ())),
        ({"country_code": "31"}, {"SBC_CALLS__COUNTRY_CODE": "1"}, ("1", "1", "011", (10,))),
    ],
)
def test_dialling_plan_follows_the_country_code(write, calls, env, expected):
    c = load_settings(write(_merged(calls=calls)), env).calls
    assert (c.country_code, c.national_prefix, c.international_prefix, c.national_lengths) == (
        expected
    )


def test_retry_after(write):
    assert load_settings(write(_merged(calls={"retry_after": 120})), {}).calls.retry_after == 120
    (problem,) = _problems(write(_merged(calls={"retry_after": 0})))
    assert problem == "calls.retry_after: input should be greater than or equal to 1, got 0"


def test_compiled_objects_accepted_when_constructed_directly():
    pattern = re.compile(r"^8\d\d$")
    network = ip_network("10.0.0.0/8")
    s = Settings(
        pbx=PbxSettings(host="p", extension="1", password=SecretStr("x"), trusted=(network,)),
        retell=RetellSettings(number="+14155550100"),
        transfer=TransferSettings(allow=pattern, targets={"sales": "800"}),
    )
    assert s.transfer.allow is pattern
    assert s.pbx.trusted == (network,)
    assert not s.transfer.allow.fullmatch("900")


@pytest.mark.parametrize(
    ("annotation", "expected"),
    [
        (tuple[int, ...] | None, tuple),
        (typing.Optional[list[str]], list),  # noqa: UP045 - the typing.Union spelling
        (typing.Annotated[dict[str, str], "meta"], dict),
        (str | None, None),
        (int, None),
    ],
)
def test_environment_value_shapes(annotation, expected):
    assert _is_container(annotation) is expected


# ----------------------------------------------------------------------------- secrets


@pytest.mark.parametrize(
    ("password", "problem"),
    [
        ("", "must not be empty"),
        ("abc\x00def", "must not contain control characters (found U+0000)"),
        ("abc\ndef", "must not contain control characters (found U+000A)"),
        ("tab\there", "must not contain control characters (found U+0009)"),
        ("del\x7f", "must not contain control characters (found U+007F)"),
    ],
)
def test_unusable_passwords_are_refused_without_echoing_them(write, password, problem):
    # TOML itself cannot hold most control characters (\u escapes can): write them escaped.
    escaped = "".join(c if c.isprintable() else f"\\u{ord(c):04X}" for c in password)
    path = write(
        '[pbx]\nhost = "p"\nextension = "1"\n'
        f'password = "{escaped}"\n'
        '[retell]\nnumber = "+14155550100"\nauth_username = "retell"\n'
        f'auth_password = "{escaped}"\n'
    )
    assert _problems(path) == (f"pbx.password: {problem}", f"retell.auth_password: {problem}")
    # The same from the environment, named as such.
    env = {"SBC_PBX__PASSWORD": password}
    assert _problems(write(MINIMAL), env) == (f"pbx.password: {problem} (from SBC_PBX__PASSWORD)",)


def _credentials(tmp_path: Path, **files: str | bytes) -> dict[str, str]:
    directory = tmp_path / "credentials"
    directory.mkdir(exist_ok=True)
    for name, content in files.items():
        data = content.encode() if isinstance(content, str) else content
        (directory / name).write_bytes(data)
    return {"CREDENTIALS_DIRECTORY": str(directory)}


def test_credential_file_wins_over_environment_which_wins_over_the_file(write, tmp_path):
    path = write(_merged(retell={"auth_username": "retell", "auth_password": "file-trunk"}))
    env = {"SBC_PBX__PASSWORD": "env-secret", "SBC_RETELL__AUTH_PASSWORD": "env-trunk"}
    env |= _credentials(tmp_path, pbx_password="cred-secret\n")  # `echo` leaves a newline
    loaded = load_with_sources(path, env)
    s = loaded.settings
    assert s.pbx.password.get_secret_value() == "cred-secret"
    assert s.retell.auth_password is not None
    assert s.retell.auth_password.get_secret_value() == "env-trunk"
    assert loaded.sources["pbx.password"] == "credential pbx_password"
    assert loaded.sources["retell.auth_password"] == "environment SBC_RETELL__AUTH_PASSWORD"
    assert loaded.sources["retell.auth_username"] == "file"
    assert "pbx.port" not in loaded.sources  # a default
    # Without the credential the environment wins, without both the file.
    assert load_settings(
        path, {"SBC_PBX__PASSWORD": "env-secret"}
    ).pbx.password.get_secret_value() == ("env-secret")
    assert load_settings(path, {}).pbx.password.get_secret_value() == "file-secret"


def test_blank_or_missing_credential_files_set_nothing(write, tmp_path):
    # The unit's SetCredential=NAME:\x20 default (one space) stands for a missing file.
    env = _credentials(tmp_path, pbx_password=" ", retell_auth_password="")
    s = load_settings(write(MINIMAL), env)
    assert s.pbx.password.get_secret_value() == "file-secret"
    assert s.retell.auth_password is None


def test_credential_problems_name_the_credential(write, tmp_path):
    env = _credentials(tmp_path, pbx_password=b"\xff\xfe")
    assert _problems(write(MINIMAL), env) == (
        f"credential pbx_password ({tmp_path / 'credentials' / 'pbx_password'}): not UTF-8 text",
    )
    env = _credentials(tmp_path, pbx_password="a\x00b")
    assert _problems(write(MINIMAL), env) == (
        "pbx.password: must not contain control characters (found U+0000) "
        "(from credential pbx_password)",
    )


def test_sources_of_tables_are_per_entry(write):
    path = write(_merged(headers={"X-A": "a"}, transfer={"targets": {"sales": "800"}}))
    env = {"SBC_HEADERS": '{"X-B": "b"}', "SBC_TRANSFER__TARGETS": '{"support": "801"}'}
    sources = load_with_sources(path, env).sources
    assert sources["headers.X-A"] == "file"
    assert sources["headers.X-B"] == "environment SBC_HEADERS"
    assert sources["transfer.targets.sales"] == "file"
    assert sources["transfer.targets.support"] == "environment SBC_TRANSFER__TARGETS"


def test_drain_timeout_default_and_bounds(write):
    assert load_settings(write(MINIMAL), {}).calls.drain_timeout == 30.0
    assert load_settings(write(_merged(calls={"drain_timeout": 0})), {}).calls.drain_timeout == 0
    (problem,) = _problems(write(_merged(calls={"drain_timeout": -1})))
    assert problem.startswith("calls.drain_timeout: input should be greater than or equal to 0")


def test_security_section_from_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "sbc.toml"
    path.write_text(
        '[pbx]\nhost = "pbx.example.com"\nextension = "1000"\npassword = "x"\n'
        '[retell]\nnumber = "+14155550100"\n'
        '[security]\nuntrusted = "REJECT"\nrate_limit = 10\nnew_call_rate = 0\n'
    )
    s = load_settings(path, {"SBC_SECURITY__BAN_TIME": "5", "SBC_SIP__USER_AGENT": "sbc/9"})
    assert s.security.untrusted == "reject"
    assert (s.security.rate_limit, s.security.ban_time, s.security.new_call_rate) == (10, 5, 0)
    assert s.sip.user_agent == "sbc/9"


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("untrusted", "ignore", "security.untrusted: input should be 'drop' or 'reject'"),
        ("rate_limit", "0", "security.rate_limit: input should be greater than or equal to 1"),
        ("rate_window", "0", "security.rate_window: input should be greater than 0"),
        ("new_call_rate", "-1", "security.new_call_rate: input should be greater than or equal"),
    ],
)
def test_security_section_is_validated(key: str, value: str, problem: str) -> None:
    env = {
        "SBC_PBX__HOST": "pbx.example.com",
        "SBC_PBX__EXTENSION": "1000",
        "SBC_PBX__PASSWORD": "x",
        "SBC_RETELL__NUMBER": "+14155550100",
        f"SBC_SECURITY__{key.upper()}": value,
    }
    with pytest.raises(ConfigError) as info:
        load_settings(None, env)
    assert any(line.startswith(problem) for line in info.value.problems), info.value.problems
