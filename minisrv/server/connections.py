"""Open HTTP connections, counted and capped (--max-connections): hypercorn does neither itself.

Hypercorn serves each accepted connection with a TCPServer made in hypercorn.asyncio.run; `install` swaps in
a subclass that counts it and, once `limit` connections are open, answers the new one at once with a 503 (an
OpenAI error body, `Connection: close`) and closes it, so an idle or slow client can hold at most its share of
the process's file descriptors instead of making accept() fail for everyone. It also closes a connection as
soon as its client has closed it, and an idle TLS connection at once when the server closes it.
"""
from __future__ import annotations

import json
import resource
from dataclasses import dataclass

import hypercorn.asyncio.run as hypercorn_run
from hypercorn.asyncio.tcp_server import TCPServer

from minisrv.server.errors import error_body

# File descriptors kept for the process's own use (rings, semaphores, logs, the tokenizer) when the default cap is
# derived from the process's limit.
RESERVED_FDS = 256


def default_limit() -> int:
    """The process's open-file limit, less what it needs for itself."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, soft - RESERVED_FDS) if soft != resource.RLIM_INFINITY else 65536


@dataclass
class Connections:
    limit: int
    open: int = 0
    refused: int = 0   # connections answered with the 503, since start

    def refusal(self) -> bytes:
        body = json.dumps(error_body(503, f"the server has {self.limit} open connections, its limit "
                                          "(--max-connections); retry later")).encode()
        return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
                b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(body)) + body


def install(connections: Connections) -> None:
    """Count and cap the connections of every hypercorn server this process starts from now on."""

    class CountedTCPServer(TCPServer):
        counted = False

        async def run(self) -> None:
            if connections.open >= connections.limit:
                connections.refused += 1
                try:
                    self.writer.write(connections.refusal())
                    await self.writer.drain()
                except OSError:   # gone already
                    pass
                self.writer.close()
                return
            connections.open, self.counted = connections.open + 1, True
            try:
                await super().run()
            finally:
                self._uncount()

        async def _read_data(self) -> None:
            await super()._read_data()
            # The client has gone (or stalled past the read timeout), and hypercorn has ended the request; left
            # to hypercorn, the socket would wait in CLOSE_WAIT until the keep-alive timer ends (5 s).
            self._uncount()
            await self._close()

        async def _initiate_server_close(self) -> None:
            await super()._initiate_server_close()
            if self.writer.get_extra_info("ssl_object") is not None:
                # Closing TLS waits for the client's close_notify, which an idle keep-alive client never sends: a
                # shutdown would wait out its grace period for it, then log the cancelled connections as errors.
                self.writer.transport.abort()

        def _uncount(self) -> None:
            if self.counted:
                connections.open, self.counted = connections.open - 1, False

    hypercorn_run.TCPServer = CountedTCPServer
