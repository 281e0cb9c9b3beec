"""Several routes in one process: ``[[routes]]`` settings (parsing, fallbacks, the implicit
route, duplicates refused, per-route secrets), the configs the service builds from them, and
the call manager picking a route for an INVITE (from 3CX by extension, from Retell by number)."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import pytest

from sbc.b2bua.calls import CallManager
from sbc.b2bua.messages import BridgeConfig, RetellTarget
from sbc.ops import service
from sbc.ops.settings import DEFAULT_ROUTE, ConfigError, Settings, load_settings, load_with_sources
from sbc.sip.errors import ServiceUnavailable
from sbc.sip.message import Request
from sbc.sip.parser import parse_message

ROOT = Path(__file__).resolve().parents[2]

SHARED = """
[pbx]
host = "127.0.0.1"
trusted = ["127.0.0.0/8"]
[retell]
host = "127.0.0.2"
[headers]
X-Called = "{called}"
[transfer]
targets = { desk = "200" }
[calls]
max_concurrent = 50
"""

SALES = """
[[routes]]
name = "sales"
extension = "1001"
password = "pw-1001"
number = "+14155550101"
"""

SUPPORT = """
[[routes]]
name = "support"
extension = "1002"
auth_id = "auth-1002"
password = "pw-1002"
number = "+14155550102"
headers = { X-Route = "support" }
transfer_targets = { desk = "300" }
max_concurrent = 3
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sbc.toml"
    path.write_text(text)
    return path


def problems(path: Path, env: dict[str, str] | None = None) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        load_settings(path, env or {})
    return info.value.problems


# -- settings -------------------------------------------------------------------------------------


def test_two_routes_parsed_with_their_own_values_and_fallbacks(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, SHARED + SALES + SUPPORT), {})
    sales, support = settings.effective_routes()
    assert (sales.name, sales.extension, sales.auth_id, sales.number) == (
        "sales",
        "1001",
        "1001",  # auth_id defaults to the extension, as for [pbx]
        "+14155550101",
    )
    assert sales.password.get_secret_value() == "pw-1001"
    # Unset: the top-level [headers], [transfer] targets and calls.max_concurrent.
    assert dict(sales.headers) == {"X-Called": "{called}"}
    assert sales.transfer.targets == {"desk": "200"}
    assert sales.max_concurrent == 50
    # Set: the route's own.
    assert (support.auth_id, support.password.get_secret_value()) == ("auth-1002", "pw-1002")
    assert dict(support.headers) == {"X-Route": "support"}
    assert support.transfer.targets == {"desk": "300"}
    assert support.transfer.mode == settings.transfer.mode  # only the targets are the route's
    assert support.max_concurrent == 3
    # What reads one extension (status line, config show) reads the first route's.
    assert (settings.pbx.extension, settings.retell.number) == ("1001", "+14155550101")


def test_without_routes_the_single_extension_is_the_implicit_default_route(
    tmp_path: Path,
) -> None:
    text = SHARED.replace(
        'host = "127.0.0.1"', 'host = "127.0.0.1"\nextension = "101"\npassword = "pw"', 1
    ).replace('host = "127.0.0.2"', 'host = "127.0.0.2"\nnumber = "+14155550100"', 1)
    settings = load_settings(write(tmp_path, text), {})
    assert settings.routes == ()
    (route,) = settings.effective_routes()
    assert (route.name, route.extension, route.auth_id, route.number) == (
        DEFAULT_ROUTE,
        "101",
        "101",
        "+14155550100",
    )
    assert route.password.get_secret_value() == "pw"
    assert route.max_concurrent == 50 and route.transfer is settings.transfer


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ('extension = "1002"', 'extension = "1001"'),
            "routes[1] ('support'): extension '1001' is already used by routes[0] ('sales')",
        ),
        (
            ('number = "+14155550102"', 'number = "+14155550101"'),
            "routes[1] ('support'): number '+14155550101' is already used by routes[0] ('sales')",
        ),
        (
            ('name = "support"', 'name = "Sales"'),
            "routes[1] ('Sales'): name 'Sales' is already used by routes[0] ('sales')",
        ),
    ],
)
def test_check_config_refuses_two_routes_sharing_an_extension_number_or_name(
    tmp_path: Path, change: tuple[str, str], expected: str
) -> None:
    text = SHARED + SALES + SUPPORT.replace(*change)
    assert problems(write(tmp_path, text)) == (expected,)


def test_both_duplicates_reported_one_line_each(tmp_path: Path) -> None:
    text = SHARED + SALES + SALES.replace('name = "sales"', 'name = "sales2"')
    assert problems(write(tmp_path, text)) == (
        "routes[1] ('sales2'): extension '1001' is already used by routes[0] ('sales')",
        "routes[1] ('sales2'): number '+14155550101' is already used by routes[0] ('sales')",
    )


def test_single_extension_keys_refused_next_to_routes(tmp_path: Path) -> None:
    text = SHARED.replace('host = "127.0.0.1"', 'host = "127.0.0.1"\nextension = "101"', 1)
    assert problems(write(tmp_path, text + SALES)) == (
        "pbx.extension: set it in each [[routes]] entry, not in [pbx], when [[routes]] is used",
    )


def test_route_fields_validated_with_their_path(tmp_path: Path) -> None:
    text = SHARED + SALES.replace("+14155550101", "4155550101").replace('password = "pw-1001"', "")
    assert problems(write(tmp_path, text)) == (
        "routes[0].password: required",
        "routes[0].number: must be E.164 like +14155550100, got '4155550101'",
    )


def test_route_transfer_targets_must_match_transfer_allow(tmp_path: Path) -> None:
    text = SHARED + SUPPORT.replace('desk = "300"', 'desk = "12a"')
    (line,) = problems(write(tmp_path, text))
    assert line.startswith("routes[0].transfer_targets: target 'desk' = '12a' does not match")


def test_route_password_from_environment_then_credential_file(tmp_path: Path) -> None:
    path = write(tmp_path, SHARED + SALES + SUPPORT)
    env = {"SBC_ROUTES__SUPPORT__PASSWORD": "from-env"}
    loaded = load_with_sources(path, env)
    assert loaded.settings.routes[1].password.get_secret_value() == "from-env"
    assert loaded.sources["routes.support.password"] == "environment SBC_ROUTES__SUPPORT__PASSWORD"
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "route_support_password").write_text("from-file\n")
    (credentials / "route_sales_password").write_text(" ")  # blank: no credential
    env["CREDENTIALS_DIRECTORY"] = str(credentials)
    loaded = load_with_sources(path, env)
    sales, support = loaded.settings.routes
    assert support.password.get_secret_value() == "from-file"
    assert sales.password.get_secret_value() == "pw-1001"
    assert loaded.sources["routes.support.password"] == "credential route_support_password"


def test_route_environment_variable_naming_no_route(tmp_path: Path) -> None:
    path = write(tmp_path, SHARED + SALES)
    assert problems(path, {"SBC_ROUTES__NOPE__PASSWORD": "x"}) == (
        "SBC_ROUTES__NOPE__PASSWORD: no [[routes]] entry named 'nope'",
    )


def test_route_secret_never_echoed(tmp_path: Path) -> None:
    text = SHARED + SALES.replace('password = "pw-1001"', "password = 123456789")
    (line,) = problems(write(tmp_path, text))
    assert line.startswith("routes[0].password:") and "123456789" not in line


def test_example_config_documents_routes() -> None:
    text = (ROOT / "deploy" / "sbc.toml.example").read_text()
    body = text.split("# [[routes]]", 1)[1]
    found = set(re.findall(r"^#\s*([a-z_]+)\s*=", body, flags=re.M))
    from sbc.ops.settings import RouteSettings

    assert set(RouteSettings.model_fields) <= found
    doc = (ROOT / "docs" / "configuration.md").read_text()
    for field in RouteSettings.model_fields:
        assert f"`routes.{field}`" in doc, field


# -- what the service builds from the routes ------------------------------------------------------


def two_routes(tmp_path: Path) -> Settings:
    return load_settings(write(tmp_path, SHARED + SALES + SUPPORT), {})


def test_one_bridge_config_and_registration_per_route(tmp_path: Path) -> None:
    settings = two_routes(tmp_path)
    sales, support = service.bridge_configs(settings, trusted=())
    assert (sales.route, sales.extension, sales.retell.number) == ("sales", "1001", "+14155550101")
    assert (support.route, support.extension, support.retell.number) == (
        "support",
        "1002",
        "+14155550102",
    )
    assert [t.header for t in sales.headers.templates] == ["X-Called"]
    assert [t.header for t in support.headers.templates] == ["X-Route"]
    assert (sales.max_concurrent, support.max_concurrent) == (50, 3)
    assert sales.max_total == support.max_total == 50
    assert support.pbx_credentials is not None
    assert (support.pbx_credentials.username, support.pbx_credentials.password) == (
        "auth-1002",
        "pw-1002",
    )
    assert support.transfer.targets == {"desk": "300"}
    routes = settings.effective_routes()
    configs = [service.registration_config(settings, "127.0.0.9", r) for r in routes]
    assert [(c.aor.user, c.contact.user, c.username) for c in configs] == [
        ("1001", "1001", "1001"),
        ("1002", "1002", "auth-1002"),
    ]


def test_service_builds_one_registration_per_route_each_with_its_own_call_id(
    tmp_path: Path,
) -> None:
    text = SHARED.replace("[calls]", '[admin]\nlisten = "127.0.0.1:8081"\n[calls]')
    settings = load_settings(write(tmp_path, text + SALES + SUPPORT), {})
    svc = service.Service(
        settings.model_copy(update={"records": settings.records.model_copy(update={"path": ""})})
    )
    assert list(svc.registrations) == ["sales", "support"]
    call_ids = {r.core.call_id for r in svc.registrations.values()}
    assert len(call_ids) == 2
    assert svc.registration is svc.registrations["sales"]
    assert [c.route for c in svc.bridge.routes] == ["sales", "support"]
    assert not svc.registered
    assert set(svc.admin.route_checks) == {"sales", "support"}


# -- the call manager picks the route -------------------------------------------------------------


class _Engine:
    """Just what CallManager's constructor reads."""

    class config:  # stands in for TransportConfig
        via_host = "127.0.0.9"


def manager(*routes: BridgeConfig) -> CallManager:
    return CallManager(_Engine(), routes[0], media=None, routes=routes)  # type: ignore[arg-type]


def route(name: str, extension: str, number: str) -> BridgeConfig:
    return BridgeConfig(
        extension=extension, retell=RetellTarget("r", None, "tcp", number), route=name
    )


def invite(uri_user: str, to_user: str, from_user: str = "caller") -> Request:
    raw = (
        f"INVITE sip:{uri_user}@127.0.0.9 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK1\r\n"
        f"From: <sip:{from_user}@127.0.0.1>;tag=a\r\n"
        f"To: <sip:{to_user}@127.0.0.9>\r\n"
        "Call-ID: c1\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    message = parse_message(raw)
    assert isinstance(message, Request)
    return message


SALES_ROUTE = route("sales", "1001", "+14155550101")
SUPPORT_ROUTE = route("support", "1002", "+14155550102")


@pytest.mark.parametrize(
    ("uri_user", "to_user", "expected"),
    [
        ("1001", "1001", "sales"),
        ("1002", "1002", "support"),
        ("1002", "9999", "support"),  # the registered Contact's user decides
        ("3cx", "1002", "support"),  # else the To user
        ("1003", "1003", None),  # no route: 404
    ],
)
def test_pbx_invite_routed_by_extension(uri_user: str, to_user: str, expected: Any) -> None:
    found = manager(SALES_ROUTE, SUPPORT_ROUTE).route_for_pbx(invite(uri_user, to_user))
    assert (found.route if found else None) == expected


@pytest.mark.parametrize(
    ("from_user", "to_user", "expected"),
    [
        ("+14155550102", "200", "support"),  # the number Retell calls from
        ("14155550102", "200", "support"),  # written without its +
        ("+19999999999", "+14155550102", "support"),  # else the To user
        ("+19999999999", "200", "sales"),  # else the first route
    ],
)
def test_retell_invite_routed_by_number(from_user: str, to_user: str, expected: str) -> None:
    calls = manager(SALES_ROUTE, SUPPORT_ROUTE)
    assert calls.route_for_retell(invite(to_user, to_user, from_user)).route == expected


def test_single_config_is_one_route() -> None:
    calls = CallManager(_Engine(), SALES_ROUTE, media=None)  # type: ignore[arg-type]
    assert calls.routes == (SALES_ROUTE,)
    assert calls.route_for_retell(invite("200", "200")) is SALES_ROUTE


def test_limit_per_route_and_for_all_routes_together() -> None:
    limited = BridgeConfig(
        extension="1002",
        retell=RetellTarget("r", None, "tcp", "+14155550102"),
        route="support",
        max_concurrent=1,
        max_total=3,
    )
    first = BridgeConfig(
        extension="1001",
        retell=RetellTarget("r", None, "tcp", "+14155550101"),
        route="sales",
        max_total=3,
    )
    calls = manager(first, limited)
    request = invite("1002", "1002")
    calls._check_capacity(request, limited)  # room
    calls.route_active["support"] = 1
    with pytest.raises(ServiceUnavailable) as refused:
        calls._check_capacity(request, limited)
    assert ("Retry-After", "30") in refused.value.headers
    calls._check_capacity(request, first)  # the other route still has room
    calls.calls = dict.fromkeys("abc")  # type: ignore[assignment] # three calls in all
    with pytest.raises(ServiceUnavailable):
        calls._check_capacity(request, first)


# -- reload ----------------------------------------------------------------------------------------


def test_reload_keeps_the_routes_names_their_changes_and_applies_live_fallbacks(
    tmp_path: Path,
) -> None:
    text = SHARED.replace("[calls]", '[records]\npath = ""\n[calls]')
    svc = service.Service(load_settings(write(tmp_path, text + SALES + SUPPORT), {}))
    changed = (
        text.replace('X-Called = "{called}"', 'X-Called = "v2-{called}"')
        + SALES.replace("+14155550101", "+14155550109")
        + SUPPORT.replace('"support"', '"support2"', 1)
    )
    live, frozen = svc.reload(load_settings(write(tmp_path, changed), {}))
    assert live == ["headers.X-Called"]
    assert "routes.sales.number" in frozen
    assert "routes.support.name" in frozen and "routes.support2.name" in frozen
    sales, support = svc.bridge.routes
    # The running routes stay; the route falling back to [headers] takes the new templates.
    assert (sales.route, sales.retell.number, support.route) == ("sales", "+14155550101", "support")
    assert [t.source for t in sales.headers.templates] == ["v2-{called}"]
    assert [t.header for t in support.headers.templates] == ["X-Route"]
    assert svc.bridge.config is sales
    assert svc.bridge.route_for_pbx(invite("1002", "1002")) is support


# -- readiness and metrics by route ----------------------------------------------------------------


async def test_readyz_per_route_and_404_for_an_unknown_route() -> None:
    import aiohttp

    from sbc.ops.admin import AdminServer
    from sbc.ops.metrics import Metrics

    state = {"sales": True, "support": False}
    admin = AdminServer(
        "127.0.0.1",
        0,
        metrics=Metrics(),
        ready_checks={"registered": lambda: all(state.values())},
        route_checks={name: functools.partial(state.__getitem__, name) for name in state},
    )
    await admin.start()
    assert admin.address is not None
    base = f"http://127.0.0.1:{admin.address[1]}/readyz"
    got = []
    try:
        async with aiohttp.ClientSession() as session:
            for query in ("", "?route=sales", "?route=support", "?route=nope"):
                async with session.get(base + query) as response:
                    got.append((response.status, await response.text()))
    finally:
        await admin.stop()
    assert got == [
        (503, "registered: failing\n"),
        (200, "route sales registered: ok\n"),
        (503, "route support registered: failing\n"),
        (404, "no route 'nope' (routes: sales, support)\n"),
    ]


def test_metrics_by_route_and_registered_only_when_every_route_is() -> None:
    from sbc.b2bua.events import CallEnded, CallRecord, CallStarted
    from sbc.ops.metrics import Metrics

    metrics = Metrics()
    sales, support = metrics.route_observer("sales"), metrics.route_observer("support")
    sales.set_registered(True)
    support.register_attempted()
    support.register_failed(401, "Unauthorized")
    text = metrics.render().decode()
    assert "sbc_registered 0.0" in text
    assert 'sbc_route_registered{route="sales"} 1.0' in text
    assert 'sbc_route_registered{route="support"} 0.0' in text
    assert 'sbc_route_register_failures_total{reason="401",route="support"} 1.0' in text
    assert 'sbc_register_failures_total{reason="401"} 1.0' in text
    support.set_registered(True)
    metrics.on_call_event(CallStarted("u1", "support"))
    record = CallRecord("u1", "p", "r", "c", "1002", 1.0, 2.0, 3.0, 200, 200, "pbx_bye")
    metrics.on_call_event(
        CallEnded(
            record.__class__(
                **{**{f: getattr(record, f) for f in record.__slots__}, "route": "support"}
            )
        )
    )
    text = metrics.render().decode()
    assert "sbc_registered 1.0" in text
    assert 'sbc_route_calls_started_total{route="support"} 1.0' in text
    assert 'sbc_route_calls_active{route="support"} 0.0' in text
    assert 'sbc_route_calls_ended_total{outcome="answered",route="support"} 1.0' in text


def test_config_show_prints_each_route_and_never_its_password(tmp_path: Path) -> None:
    import tomllib

    from sbc.ops.config_show import render

    path = write(tmp_path, SHARED + SALES + SUPPORT)
    text = render(load_with_sources(path, {"SBC_ROUTES__SALES__PASSWORD": "env-secret"}), path)
    assert "pw-1002" not in text and "env-secret" not in text
    assert 'password = "<set>"  # environment SBC_ROUTES__SALES__PASSWORD' in text
    assert "# max_concurrent is unset  # default: the top-level setting" in text
    routes = tomllib.loads(text)["routes"]
    assert [(r["name"], r["extension"], r["number"]) for r in routes] == [
        ("sales", "1001", "+14155550101"),
        ("support", "1002", "+14155550102"),
    ]
    assert routes[1]["headers"] == {"X-Route": "support"}


# -- calls through the manager, on the scripted engine ---------------------------------------------


async def test_each_call_takes_its_routes_number_extension_and_name() -> None:
    """3CX's INVITE to 102 goes to route 2's number; Retell's INVITE from route 2's number goes
    to the PBX from extension 102 with route 2's credentials; both calls carry the route."""
    import dataclasses
    import ipaddress

    from sbc.b2bua.events import CallEvent, CallStarted
    from sbc.media.base import PassthroughBackend
    from sbc.net.addresses import Destination
    from sbc.net.engine import IncomingRequest
    from sbc.sip.digest import Credentials
    from sbc.sip.uri import parse_uri
    from tests.unit.call_harness import PBX_SOURCE, FakeEngine, a_invite, config
    from tests.unit.test_inbound import retell_invite

    nets = {
        "trusted": (ipaddress.ip_network("10.0.0.0/24"),),
        "retell_trusted": (ipaddress.ip_network("192.0.2.0/24"),),
    }
    first = config(route="sales", **nets)
    second = config(
        route="support",
        extension="102",
        retell=RetellTarget("retell.test", 5060, "tcp", "+14155550102"),
        pbx_credentials=Credentials("auth-102", "pw-102"),
        **nets,
    )
    engine = FakeEngine()
    calls = CallManager(engine, first, PassthroughBackend(), routes=(first, second))  # type: ignore[arg-type]
    events: list[CallEvent] = []
    calls.events.subscribe(events.append)
    to_102 = a_invite()
    to_102 = dataclasses.replace(
        to_102,
        uri=parse_uri("sip:102@10.0.0.5:5060"),
        headers=to_102.headers.set("To", "<sip:102@10.0.0.5>"),
    )
    calls.handle_request(IncomingRequest(engine, "k1", to_102, PBX_SOURCE, None))
    await engine.wait(lambda: engine.requests("INVITE"))
    (to_retell,) = engine.requests("INVITE")
    assert uri_user_of(to_retell.request.uri) == "+14155550102"
    from_retell = retell_invite("800")
    from_retell = dataclasses.replace(
        from_retell,
        headers=from_retell.headers.set("From", "<sip:+14155550102@sip.retellai.com>;tag=r"),
    )
    retell_source = Destination("tcp", "192.0.2.9", 5060)
    calls.handle_request(IncomingRequest(engine, "k2", from_retell, retell_source, None))
    await engine.wait(lambda: len(engine.requests("INVITE")) == 2)
    to_pbx = engine.requests("INVITE")[1].request
    assert uri_user_of(to_pbx.uri) == "800"
    assert uri_user_of(to_pbx.from_.uri) == "102"
    assert sorted(c.config.route for c in calls.calls.values()) == ["support", "support"]
    assert calls.route_active == {"support": 2}
    await calls.stop()
    assert calls.route_active["support"] == 0
    started = [e.route for e in events if isinstance(e, CallStarted)]
    assert started == ["support", "support"]
    assert sorted(r.route for r in calls.records) == ["support", "support"]


def uri_user_of(uri: object) -> str | None:
    from sbc.b2bua.messages import uri_user

    return uri_user(uri)  # type: ignore[arg-type]
