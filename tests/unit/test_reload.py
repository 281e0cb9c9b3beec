"""SIGHUP and SIGTERM without sockets: what a reload applies and names, that new calls get the
new BridgeConfig while calls in progress keep theirs, draining, and outages of a peer logged
once (sbc/b2bua/reachability.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import structlog

from sbc.b2bua.reachability import Reachability
from sbc.ops import service
from sbc.ops.settings import ConfigError, Settings, load_settings
from sbc.ops.systemd import Notifier


def settings(**sections: dict[str, Any]) -> Settings:
    data: dict[str, dict[str, Any]] = {
        "pbx": {"host": "10.0.0.1", "extension": "101", "password": "secret"},
        "retell": {"number": "+14155550100"},
        "sip": {"bind": "10.0.0.5"},
        "headers": {"X-Version": "v1"},
    }
    if "records" in Settings.model_fields:
        data["records"] = {"path": ""}  # no call records database
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return Settings(**data)  # type: ignore[arg-type]


def _lifecycle(svc: service.Service, loader: Any) -> service._Lifecycle:
    return service._Lifecycle(svc, asyncio.Event(), Notifier({}), loader)


async def test_reload_applies_live_sections_and_names_what_needs_a_restart() -> None:
    svc = service.Service(settings())
    before = svc.bridge.config
    new = settings(
        headers={"X-Version": "v2"},
        calls={"max_concurrent": 3, "retry_after": 7, "drain_timeout": 5},
        transfer={"targets": {"sales": "800"}},
        retell={"answer_timeout": 20, "port": 5080},
        sip={"port": 5070},
        pbx={"password": "other"},
    )
    live, frozen = svc.reload(new)
    assert live == [
        "calls.drain_timeout",
        "calls.max_concurrent",
        "calls.retry_after",
        "headers.X-Version",
        "retell.answer_timeout",
        "transfer.targets.sales",
    ]
    assert frozen == ["pbx.password", "retell.port", "sip.port"]
    after = svc.bridge.config
    assert after is not before
    assert [(t.header, t.source) for t in before.headers.templates] == [("X-Version", "v1")]
    assert [(t.header, t.source) for t in after.headers.templates] == [("X-Version", "v2")]
    assert (after.max_concurrent, after.retry_after, after.answer_timeout) == (3, 7, 20)
    assert after.transfer.targets == {"sales": "800"}
    # Not applied: the running values stay.
    assert after.retell.port == before.retell.port == 5060
    assert after.pbx_credentials == before.pbx_credentials
    assert after.trusted == before.trusted
    assert svc.settings.sip.port == 5060 and svc.settings.calls.drain_timeout == 5
    # New calls take the new config; a call made before holds the one it was given.
    assert svc.bridge._call_kwargs()["config"] is after
    assert svc.bridge._call_media.retry_after == 7


def test_reload_with_a_bad_file_changes_nothing_and_logs_one_line() -> None:
    svc = service.Service(settings())
    before = svc.bridge.config

    def broken() -> Settings:
        raise ConfigError(["headers.X-Version: unknown variable {nope} (known: ...)"])

    with structlog.testing.capture_logs() as logs:
        _lifecycle(svc, broken).reload_requested()
    assert svc.bridge.config is before
    assert logs == [
        {
            "event": "config_reload_refused",
            "log_level": "error",
            "problems": ["headers.X-Version: unknown variable {nope} (known: ...)"],
            "detail": "the running settings stay",
        }
    ]


def test_reload_logs_applied_and_not_applied_keys() -> None:
    svc = service.Service(settings())
    new = settings(headers={"X-Version": "v2"}, media={"mode": "passthrough"})
    with structlog.testing.capture_logs() as logs:
        _lifecycle(svc, lambda: new).reload_requested()
    (line,) = logs
    assert line["event"] == "config_reloaded" and line["log_level"] == "warning"
    assert line["applied"] == ["headers.X-Version"] and line["not_applied"] == ["media.mode"]
    # Read again: media.mode is still waiting for a restart.
    with structlog.testing.capture_logs() as logs:
        _lifecycle(svc, lambda: new).reload_requested()
    assert logs[0]["applied"] == [] and logs[0]["not_applied"] == ["media.mode"]
    # Back to the running mode: nothing to apply, nothing waiting; info.
    same = settings(headers={"X-Version": "v2"})
    with structlog.testing.capture_logs() as logs:
        _lifecycle(svc, lambda: same).reload_requested()
    assert logs[0]["log_level"] == "info" and logs[0]["applied"] == []
    assert "not_applied" not in logs[0]


def test_reload_without_a_file_to_read_again_is_logged() -> None:
    svc = service.Service(settings())
    with structlog.testing.capture_logs() as logs:
        _lifecycle(svc, None).reload_requested()
    assert logs[0]["event"] == "config_reload_unavailable"


def test_a_second_stop_signal_hurries_the_drain() -> None:
    import signal

    life = _lifecycle(service.Service(settings()), None)
    life.stop_requested(signal.SIGTERM)
    assert life.stop.is_set() and not life.hurry.is_set()
    life.stop_requested(signal.SIGINT)
    assert life.hurry.is_set()


async def test_drain_without_calls_returns_at_once_and_refuses_new_ones() -> None:
    svc = service.Service(settings())
    assert await asyncio.wait_for(svc.bridge.drain(30), 1) == 0
    assert svc.bridge.draining


def test_settings_from_the_environment_reload_the_same() -> None:
    env = {
        "SBC_PBX__HOST": "10.0.0.1",
        "SBC_PBX__EXTENSION": "101",
        "SBC_PBX__PASSWORD": "x",
        "SBC_RETELL__NUMBER": "+14155550100",
    }
    assert service._changed_keys(load_settings(None, env), load_settings(None, env)) == []


# -- reachability ----------------------------------------------------------------------------


def test_an_outage_is_one_warning_then_one_line_with_the_count() -> None:
    now = [100.0]
    retell = Reachability("retell", clock=lambda: now[0])
    with structlog.testing.capture_logs() as logs:
        retell.answered()  # reachable: nothing to say
        retell.failed("connect failed: [Errno 111] Connection refused")
        now[0] += 5
        retell.failed("connect failed: [Errno 111] Connection refused")
        retell.failed("timeout")
        now[0] += 7
        retell.summary()
        retell.answered()
        retell.answered()
        retell.summary()
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("retell_unreachable", "warning"),
        ("retell_still_unreachable", "warning"),
        ("retell_reachable_again", "warning"),
    ]
    assert logs[0]["error"] == "connect failed: [Errno 111] Connection refused"
    assert logs[0]["calls_refused"] == 1
    assert (logs[1]["calls_refused"], logs[1]["outage_s"]) == (3, 12.0)
    assert (logs[2]["calls_refused"], logs[2]["outage_s"]) == (3, 12.0)
    assert retell.reachable and retell.outages == 1 and retell.refused == 0


@pytest.mark.parametrize("failure", [None, "timeout"])
def test_the_manager_routes_leg_b_outcomes_to_the_peer(failure: str | None) -> None:
    svc = service.Service(settings())
    from sbc.b2bua.messages import Peer

    svc.bridge._b_reached(Peer.RETELL, failure)
    assert svc.bridge.reachability[Peer.RETELL].reachable is (failure is None)
    assert svc.bridge.reachability[Peer.PBX].reachable
