"""`minisrv chat` against the in-process app: streamed replies, history, /reset, errors."""
from __future__ import annotations

import io

from tests.server.fake_engine_client import REPLY, FakeEngineClient
from tests.server.inprocess_server import InProcessServer
from tests.server.live_server import free_port

from minisrv.config import ServerConfig
from minisrv.chat import ChatSession, run_chat


def scripted(lines: list[str]):
    feed = iter(lines)

    def read_line(prompt: str) -> str:
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    return read_line


def test_chat_streams_keeps_history_and_resets() -> None:
    with InProcessServer(FakeEngineClient()) as server:
        session = ChatSession(server.url, system="be kind", temperature=0.0, max_tokens=5)
        out = io.StringIO()
        assert run_chat(session, scripted(["hello", "again", "/reset", "", "fresh", "/exit", "never"]), out) == 0
        inputs = server.client.inputs
        assert len(inputs) == 3
        assert inputs[1].messages == [("system", "be kind"), ("user", "hello"), ("assistant", REPLY[:5]),
                                    ("user", "again")]
        assert inputs[2].messages == [("system", "be kind"), ("user", "fresh")]
        assert out.getvalue().count(REPLY[:5] + "\n") == 3 and "history cleared" in out.getvalue()


def test_chat_reports_errors_and_goes_on() -> None:
    with InProcessServer(FakeEngineClient(), ServerConfig(api_key="k")) as server:
        out = io.StringIO()
        session = ChatSession(server.url, api_key="wrong")
        assert run_chat(session, scripted(["hi"]), out) == 0
        assert "401" in out.getvalue() and "API key" in out.getvalue()
        assert session.history == []   # a failed exchange is not kept
    out = io.StringIO()
    run_chat(ChatSession(f"http://127.0.0.1:{free_port()}"), scripted(["hi"]), out)
    assert "cannot reach" in out.getvalue()
