"""The sbc command, run in-process (main(argv)) and once as `python -m sbc`."""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import structlog

import sbc
from sbc.ops import cli

ORIGINAL_TUNE_GC = cli.tune_gc  # the autouse fixture replaces it

GOOD = """
[pbx]
host = "pbx.example.com"
extension = "1000"
password = "hunter2-secret"
[retell]
number = "+14155550100"
[log]
format = "json"
"""


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "sbc.toml"
    path.write_text(GOOD)
    return path


@pytest.fixture(autouse=True)
def gc_tuned(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    # `run` tunes the collector for the whole process; record the call instead of doing it.
    calls: list[bool] = []
    monkeypatch.setattr(cli, "tune_gc", lambda: calls.append(True))
    return calls


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("SBC_CONFIG", raising=False)


@pytest.fixture(autouse=True)
def _restore_logging():
    # `run` and `demo` configure logging for the process; undo it for the tests that follow.
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


def test_version(capsys):
    assert cli.main(["version"]) == 0
    assert capsys.readouterr().out == f"sbc {sbc.__version__}\n"


def test_check_config_ok(good, capsys):
    assert cli.main(["check-config", "--config", str(good)]) == cli.EXIT_OK
    captured = capsys.readouterr()
    assert captured.out == "config OK\n"
    assert captured.err == ""


def test_check_config_reads_sbc_config(good, capsys, monkeypatch):
    monkeypatch.setenv("SBC_CONFIG", str(good))
    assert cli.main(["check-config"]) == 0
    assert capsys.readouterr().out == "config OK\n"


def test_check_config_one_line_per_problem(tmp_path, capsys, monkeypatch):
    path = tmp_path / "bad.toml"
    path.write_text(
        GOOD.replace('"+14155550100"', '"4155550100"').replace('password = "hunter2-secret"', "")
        + '[headers]\nX-Foo = "{calller}"\n'
    )
    assert cli.main(["check-config", "--config", str(path)]) == cli.EXIT_CONFIG
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert lines[0] == "pbx.password: required"
    assert lines[1] == "retell.number: must be E.164 like +14155550100, got '4155550100'"
    assert lines[2].startswith("headers.X-Foo: unknown variable {calller} (known: ")
    assert len(lines) == 3
    assert "Traceback" not in captured.err


def test_check_config_env_override_makes_it_valid(tmp_path, capsys, monkeypatch):
    path = tmp_path / "nopw.toml"
    path.write_text(GOOD.replace('password = "hunter2-secret"', ""))
    monkeypatch.setenv("SBC_PBX__PASSWORD", "from-env")
    assert cli.main(["check-config", "--config", str(path)]) == 0


def test_check_config_never_prints_secrets(tmp_path, capsys, monkeypatch):
    path = tmp_path / "s.toml"
    path.write_text(GOOD.replace("[log]", '[sip]\nport = "x"\n[log]'))
    monkeypatch.setenv("SBC_PBX__PASSWORD", "env-hunter3")
    assert cli.main(["check-config", "--config", str(path)]) == cli.EXIT_CONFIG
    captured = capsys.readouterr()
    assert captured.err.startswith("sip.port: input should be a valid integer")
    assert "hunter" not in captured.out + captured.err


def test_check_config_missing_file(tmp_path, capsys):
    path = tmp_path / "nope.toml"
    assert cli.main(["check-config", "--config", str(path)]) == cli.EXIT_CONFIG
    assert capsys.readouterr().err == f"{path}: no such file\n"


def test_check_config_syntax_error(tmp_path, capsys):
    path = tmp_path / "syntax.toml"
    path.write_text('[pbx]\nhost = "unterminated\n')
    assert cli.main(["check-config", "--config", str(path)]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.startswith(f"{path}: TOML syntax error: ")
    assert err.count("\n") == 1


def test_usage_errors_exit_2(capsys):
    assert cli.main([]) == cli.EXIT_USAGE
    assert cli.main(["frobnicate"]) == cli.EXIT_USAGE
    assert "usage: sbc" in capsys.readouterr().err


def test_help_exits_0(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "check-config" in out and "78" in out


def test_check_config_and_bad_run_never_load_the_service(tmp_path, good):
    # `check-config` stays quick: the SIP stack, media and aiohttp are imported by `run` only,
    # and `run` with an unusable configuration stops before importing them.
    code = (
        "import sys\n"
        "from sbc.ops import cli\n"
        f"assert cli.main(['check-config', '--config', {str(good)!r}]) == 0\n"
        f"assert cli.main(['run', '--config', {str(tmp_path / 'absent.toml')!r}]) == 78\n"
        "print(sorted(m for m in ('sbc.ops.service', 'sbc.ops.demo', 'sbc.net.engine',"
        " 'sbc.media.relay', 'aiohttp') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"


def _fake_serve(
    monkeypatch: pytest.MonkeyPatch, module: str, result: int = 0, exc: BaseException | None = None
) -> list[Any]:
    """Replace ``serve`` of sbc.ops.<module>; returns the settings it was called with."""
    import importlib

    target = importlib.import_module(f"sbc.ops.{module}")
    seen: list[Any] = []

    async def serve(settings: object, **kwargs: Any) -> int:
        seen.append(settings)
        loader = kwargs.get("loader")
        if loader is not None:  # `run` reads the same file again on SIGHUP
            assert loader() == settings
        if exc is not None:
            raise exc
        return result

    monkeypatch.setattr(target, "serve", serve)
    return seen


def test_run_calls_service_serve_with_settings(good, capsys, monkeypatch):
    seen = _fake_serve(monkeypatch, "service")
    assert cli.main(["run", "--config", str(good)]) == 0
    (settings,) = seen
    assert settings.pbx.host == "pbx.example.com"
    assert settings.pbx.password.get_secret_value() == "hunter2-secret"
    err = capsys.readouterr().err
    assert "sbc_starting" in err and "sbc_stopped" in err
    assert "hunter2" not in err


def test_run_tunes_the_collector_and_demo_does_not(good, monkeypatch, gc_tuned):
    _fake_serve(monkeypatch, "service")
    assert cli.main(["run", "--config", str(good)]) == 0
    assert gc_tuned == [True]
    _fake_serve(monkeypatch, "demo")
    monkeypatch.setenv("SBC_LOG__FORMAT", "json")
    assert cli.main(["demo"]) == 0
    assert gc_tuned == [True]


def test_tune_gc_freezes_start_up_objects_and_sets_thresholds():
    before = gc.get_threshold()
    frozen = gc.get_freeze_count()
    interval = sys.getswitchinterval()
    try:
        ORIGINAL_TUNE_GC()
        assert gc.get_threshold() == cli.GC_THRESHOLD
        assert gc.get_freeze_count() > frozen
        assert sys.getswitchinterval() == interval  # left as it was
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
        sys.setswitchinterval(interval)


def test_run_returns_serve_exit_status(good, monkeypatch):
    _fake_serve(monkeypatch, "service", result=3)
    assert cli.main(["run", "--config", str(good)]) == 3


def test_run_logs_unexpected_error_and_exits_1(good, capsys, monkeypatch):
    _fake_serve(monkeypatch, "service", exc=RuntimeError("kaputt"))
    assert cli.main(["run", "--config", str(good)]) == cli.EXIT_FAILURE
    err = capsys.readouterr().err
    assert "sbc_crashed" in err and "kaputt" in err


def test_run_interrupted(good, capsys, monkeypatch):
    _fake_serve(monkeypatch, "service", exc=KeyboardInterrupt())
    assert cli.main(["run", "--config", str(good)]) == cli.EXIT_INTERRUPTED


def _local_config(tmp_path: Path, sip_port: int, retell: str = "") -> Path:
    """A config for the real service on 127.0.0.1: SIP on ``sip_port``, the admin API on a free
    port, pass-through media; ``retell``: lines added to [retell]."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as admin:
        admin.bind(("127.0.0.1", 0))
        admin_port = admin.getsockname()[1]
    path = tmp_path / "taken.toml"
    path.write_text(
        GOOD.replace('"pbx.example.com"', '"127.0.0.1"').replace(
            "[retell]\n", "[retell]\n" + retell, 1
        )
        + f'[sip]\nbind = "127.0.0.1"\nport = {sip_port}\n'
        + f'[admin]\nlisten = "127.0.0.1:{admin_port}"\n'
        + '[media]\nmode = "passthrough"\n'
    )
    return path


def test_run_that_cannot_start_exits_1_with_one_clear_line(tmp_path, capsys):
    # The real service: its SIP port is taken, so it cannot start; no traceback, exit 1.
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        path = _local_config(tmp_path, port)
        assert cli.main(["run", "--config", str(path)]) == cli.EXIT_FAILURE
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "sbc_start_failed" in line]
    assert f"cannot start SIP listener on 127.0.0.1:{port}" in line
    assert "Traceback" not in err and "sbc_crashed" not in err


def test_run_uses_asyncio_loop_when_uvloop_is_absent(good, monkeypatch):
    monkeypatch.setattr(cli, "_loop_factory", lambda: None)
    _fake_serve(monkeypatch, "service", result=0)
    assert cli.main(["run", "--config", str(good)]) == 0


def test_loop_factory_without_uvloop(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # makes `import uvloop` raise ImportError
    assert cli._loop_factory() is None


def test_loop_factory_prefers_uvloop():
    if os.environ.get("CI", "").lower() != "true":  # CI installs the "fast" extra: no skip there
        pytest.importorskip("uvloop")
    import uvloop

    assert cli._loop_factory() is uvloop.new_event_loop


def test_demo_uses_builtin_config_and_demo_serve(monkeypatch, capsys):
    seen = _fake_serve(monkeypatch, "demo", result=1)
    monkeypatch.setenv("SBC_LOG__FORMAT", "json")
    assert cli.main(["demo"]) == 1  # the demo's own status (1: a check failed)
    (settings,) = seen
    assert settings.pbx.host == "127.0.0.21"
    assert settings.calls.country_code == "31"


def test_demo_with_bad_config_exits_78(tmp_path, capsys):
    assert cli.main(["demo", "--config", str(tmp_path / "absent.toml")]) == cli.EXIT_CONFIG
    assert capsys.readouterr().err == f"{tmp_path / 'absent.toml'}: no such file\n"


def test_demo_config_file_is_shipped():
    path = cli.demo_config_path()
    assert path.name == "demo.toml" and path.is_file()


def test_python_dash_m_sbc_version():
    done = subprocess.run(
        [sys.executable, "-m", "sbc", "version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"sbc {sbc.__version__}\n"


# -- issue 14: an honest check-config, and config show ------------------------------------------


@pytest.mark.parametrize(
    ("password_line", "expected"),
    [
        ('password = ""', "pbx.password: must not be empty"),
        (
            'password = "hun\\u0000ter2"',
            "pbx.password: must not contain control characters (found U+0000)",
        ),
    ],
)
def test_check_config_refuses_empty_and_control_character_passwords(
    tmp_path, capsys, password_line, expected
):
    path = tmp_path / "sbc.toml"
    path.write_text(GOOD.replace('password = "hunter2-secret"', password_line))
    assert cli.main(["check-config", "--config", str(path)]) == cli.EXIT_CONFIG
    captured = capsys.readouterr()
    assert captured.err == expected + "\n"
    assert "hun" not in captured.err and captured.out == ""


def test_check_config_of_an_empty_file_names_each_missing_key(tmp_path, capsys):
    path = tmp_path / "empty.toml"
    path.write_text("")
    assert cli.main(["check-config", "--config", str(path)]) == cli.EXIT_CONFIG
    assert capsys.readouterr().err.splitlines() == [
        "pbx.host: required",
        "pbx.extension: required",
        "pbx.password: required",
        "retell.number: required",
    ]


def test_config_show_names_sources_and_prints_no_secret(tmp_path, capsys, monkeypatch):
    import tomllib

    path = tmp_path / "sbc.toml"
    path.write_text(GOOD + '[headers]\nX-Tenant = "acme"\n[transfer.targets]\nsales = "800"\n')
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "pbx_password").write_text("cred-hunter4\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    monkeypatch.setenv("SBC_SIP__PORT", "5070")
    monkeypatch.setenv("SBC_RETELL__AUTH_USERNAME", "retell")
    monkeypatch.setenv("SBC_RETELL__AUTH_PASSWORD", "env-hunter5")
    assert cli.main(["config", "show", "--config", str(path)]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "hunter" not in out  # neither the file's, the credential's nor the environment's
    lines = out.splitlines()
    assert 'password = "<set>"  # credential pbx_password' in lines
    assert 'auth_password = "<set>"  # environment SBC_RETELL__AUTH_PASSWORD' in lines
    assert "port = 5070  # environment SBC_SIP__PORT" in lines
    assert 'host = "pbx.example.com"  # file' in lines
    assert 'X-Tenant = "acme"  # file' in lines
    assert 'sales = "800"  # file' in lines
    assert "drain_timeout = 30.0  # default" in lines
    assert "# tls_port is unset  # default" in lines
    shown = tomllib.loads(out)  # the output is TOML
    assert shown["sip"]["port"] == 5070 and shown["pbx"]["password"] == "<set>"
    assert shown["transfer"]["targets"] == {"sales": "800"}


def test_config_show_without_secrets_says_unset(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SBC_PBX__HOST", "pbx.example.com")
    monkeypatch.setenv("SBC_PBX__EXTENSION", "1000")
    monkeypatch.setenv("SBC_PBX__PASSWORD", "env-hunter6")
    monkeypatch.setenv("SBC_RETELL__NUMBER", "+14155550100")
    assert cli.main(["config", "show"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith("# sbc effective settings (no file: environment and defaults)")
    assert 'auth_password = "<unset>"  # default' in out.splitlines()
    assert "hunter" not in out


def test_config_show_of_a_bad_file_prints_the_problems(tmp_path, capsys):
    path = tmp_path / "empty.toml"
    path.write_text("")
    assert cli.main(["config", "show", "--config", str(path)]) == cli.EXIT_CONFIG
    captured = capsys.readouterr()
    assert captured.out == "" and "pbx.host: required" in captured.err


def test_run_whose_retell_socket_port_is_taken_says_so_and_frees_the_sip_port(tmp_path, capsys):
    # Retell's own UDP socket opens after the SIP port: its failure names it, and the SIP
    # port bound just before is released (a second start on it works).
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        busy = taken.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            sip_port = probe.getsockname()[1]
        retell = f'transport = "udp"\nlocal_udp_port = {busy}\n'
        path = _local_config(tmp_path, sip_port, retell=retell)
        assert cli.main(["run", "--config", str(path)]) == cli.EXIT_FAILURE
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "sbc_start_failed" in line]
    assert f"Retell's UDP socket on port {busy}" in line
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
        again.bind(("127.0.0.1", sip_port))  # released by the failed start
