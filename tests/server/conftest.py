from __future__ import annotations

import pytest
from tests.server.fake_engine_client import FakeEngineClient
from tests.server.inprocess_server import InProcessServer

FAKE_MODEL = "fake-model"


@pytest.fixture(scope="module")
def fake_server():
    """The real app on hypercorn in a thread, a FakeEngineClient behind it (one per test module)."""
    with InProcessServer(FakeEngineClient(FAKE_MODEL)) as s:
        yield s
