"""``sbc demo`` keeps the bridge's log lines out of its story: they go to a file it names."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from sbc.ops import cli, demo


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


@pytest.fixture
def story(monkeypatch: pytest.MonkeyPatch) -> None:
    """A demo that tells one line of story and logs one line of the bridge's."""

    async def serve(settings: Any, **kwargs: Any) -> int:
        print("[  0.00 s] the story", flush=True)
        structlog.get_logger("sbc.test").info("bridge_line", call_uuid="u-1")
        return 0

    monkeypatch.setattr(demo, "serve", serve)


def test_log_lines_go_to_the_named_file(
    tmp_path: Path, story: None, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "demo.log"
    assert cli.main(["demo", "--log-file", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"sbc's log: {path}", "[  0.00 s] the story", f"sbc's log: {path}"]
    assert "bridge_line" not in out + err
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    events = [line["event"] for line in lines]
    assert "sbc_starting" in events and "bridge_line" in events
    assert next(line for line in lines if line["event"] == "bridge_line")["call_uuid"] == "u-1"


def test_default_log_file_is_a_new_temporary_file(
    story: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first.startswith("sbc's log: ")
    path = Path(first.removeprefix("sbc's log: "))
    try:
        assert path.name.startswith("sbc-demo-") and path.suffix == ".log"
        assert "bridge_line" in path.read_text() and "bridge_line" not in out
        assert path.stat().st_mode & 0o077 == 0  # the log may name numbers: owner only
    finally:
        path.unlink()


def test_dash_keeps_the_log_on_stderr(story: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--log-file", "-"]) == 0
    out, err = capsys.readouterr()
    assert out == "[  0.00 s] the story\n"
    assert "bridge_line" in err
