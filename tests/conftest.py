"""Suite-wide test settings.

Under CI (``CI=true``) hypothesis runs derandomized: the same examples on every run, so a red
CI run can be reproduced exactly and a green one is not luck. Developers keep random search.

sbc keeps its call records in its state directory (``$STATE_DIRECTORY``, else /var/lib/sbc):
during the tests that is a temporary directory (one for the session, inherited by the ``sbc``
processes tests start), never the machine's. A test that counts rows sets its own
``records.path``.
"""

import logging
import os
from collections.abc import Iterator

import pytest
import structlog
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI", "").lower() in {"1", "true", "yes"} else "dev")


@pytest.fixture(autouse=True, scope="session")
def _state_directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STATE_DIRECTORY", str(tmp_path_factory.mktemp("state")))
        yield


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Logging is process-wide: a test that configures it (sbc's configure_logging, a bench run
    in process) must not change what later tests capture (structlog.testing.capture_logs sees
    no debug line once a level filter is configured). Put the root handlers, the level and
    structlog's defaults back after every test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
