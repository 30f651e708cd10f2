"""Run the real app on real hypercorn + uvloop in a background thread, with a FakeEngineClient behind it."""
from __future__ import annotations

import asyncio
import ssl
import threading
from dataclasses import dataclass, field

import httpx
import uvloop
from tests.server.fake_engine_client import FakeEngineClient
from tests.server.live_server import free_port

from minisrv.config import EngineConfig, ServerConfig
from minisrv.models.source import resolve_source
from minisrv.server.app import build_app, run_http
from minisrv.tokenizer.prompts import PromptTokenizer, load_prompt_tokenizer


def byte_prompt_tokenizer() -> PromptTokenizer:
    """The byte-level tokenizer (and chat template) minisrv serves dummy presets with: /tokenize's in these tests."""
    return load_prompt_tokenizer(resolve_source(EngineConfig(model="smollm2-135m", load_format="dummy")), None)


@dataclass
class InProcessServer:
    client: FakeEngineClient
    config: ServerConfig = field(default_factory=ServerConfig)
    request_defaults: dict = field(default_factory=dict)
    verify: ssl.SSLContext | bool = True   # how the start-up probe checks the certificate of an HTTPS server
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.config.url

    def __enter__(self) -> InProcessServer:
        self.config.port = free_port()
        started = threading.Event()

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            started.set()
            app = build_app(self.client, self.config, byte_prompt_tokenizer, self.request_defaults)
            await run_http(app, self.config, self._stop)

        self._thread = threading.Thread(target=uvloop.run, args=(main(),), daemon=True)
        self._thread.start()
        started.wait(10)
        for _ in range(200):
            try:
                httpx.get(f"{self.url}/health", timeout=1, verify=self.verify)
                return self
            except httpx.TransportError:
                threading.Event().wait(0.02)
        raise RuntimeError("in-process server did not start")

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
