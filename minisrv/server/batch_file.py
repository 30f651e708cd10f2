"""OpenAI's batch file format, as `vllm run-batch` reads and writes it, answered by the server's own routes.

Each input line is a request, `{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions", "body":
{...}}`; each output line, in the input's order, `{"id": ..., "custom_id": ..., "response": {"status_code": ...,
"request_id": ..., "body": {...}}, "error": null}`. The body goes to the same Starlette app `minisrv serve`
serves, called in process through ASGI (no socket), so a batch request is validated and answered exactly as
over HTTP: a request the server refuses gets its 4xx and OpenAI-style error body in `response`. A line that is
no request at all (not JSON, a field missing, an endpoint that is not one of BATCH_URLS, `stream` asked for)
gets `"response": null` and `"error": {"code", "message"}`, as OpenAI's batch output has it.
"""
from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import dataclass
from typing import IO, Any, Awaitable, Callable

BATCH_URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings")


@dataclass(frozen=True)
class BatchRequest:
    custom_id: str
    url: str
    body: dict[str, Any]


class BatchLineError(ValueError):
    """A line that is not a batch request; `custom_id` when the line had one."""

    def __init__(self, message: str, custom_id: str | None = None) -> None:
        super().__init__(message)
        self.custom_id = custom_id


def parse_line(line: str, number: int) -> BatchRequest:
    """The request on input line `number` (1-based); BatchLineError naming the line and the field otherwise."""
    try:
        request = json.loads(line)
    except json.JSONDecodeError as exc:
        # The position within the line: json's "line 1 column c", or "line 2" when the break after it is what ends
        # a line cut short.
        raise BatchLineError(f"line {number}: not JSON: {exc.msg} at column {exc.colno}"
                             if exc.lineno == 1 else f"line {number}: not JSON: {exc.msg} at its end") from None
    if not isinstance(request, dict):
        raise BatchLineError(f"line {number}: a JSON object is expected, got {type(request).__name__}")
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str):
        raise BatchLineError(f"line {number}: custom_id: a string is required")
    url, body = request.get("url"), request.get("body")
    if request.get("method", "POST") != "POST":
        problem = f"method: only POST is supported, got {request['method']!r}"
    elif url not in BATCH_URLS:
        problem = f"url: {url!r} is not one of {', '.join(BATCH_URLS)}"
    elif not isinstance(body, dict):
        problem = "body: a JSON object is required"
    elif body.get("stream"):
        problem = "body.stream: a batch request is answered whole; leave stream out or false"
    else:
        return BatchRequest(custom_id, url, body)
    raise BatchLineError(f"line {number}: {problem}", custom_id)


def output_line(custom_id: str | None, status: int | None, body: Any, error: str | None = None) -> str:
    """One output line: the response (`status`, `body`), or, with `error`, none."""
    response = None if error is not None else {
        "status_code": status, "request_id": (body.get("id") if isinstance(body, dict) else None) or _new_id("req"),
        "body": body}
    return json.dumps({"id": _new_id("batch_req"), "custom_id": custom_id, "response": response,
                       "error": None if error is None else {"code": "invalid_request", "message": error}},
                      ensure_ascii=False)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


AsgiApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


async def call_app(app: AsgiApp, url: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> tuple[int, Any]:
    """POST `body` to `url` of the ASGI `app`: (status, the JSON answer, or its text when it is not JSON)."""
    request_sent = False
    never_disconnects = asyncio.Event()   # the app may watch for the client leaving while it works: it never does
    status, chunks = 500, []

    async def receive() -> dict:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await never_disconnects.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": url, "raw_path": url.encode(), "query_string": b"", "root_path": "", "client": None,
             "server": None, "headers": [(b"content-type", b"application/json"),
                                         (b"content-length", str(len(body)).encode()), *headers]}
    await app(scope, receive, send)
    text = b"".join(chunks).decode("utf-8", "replace")
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


class OrderedWriter:
    """Writes output lines in input order as they complete out of order, holding only those that ran ahead."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.written = 0
        self._held: dict[int, str] = {}

    def put(self, index: int, line: str) -> None:
        self._held[index] = line
        while self.written in self._held:
            self.out.write(self._held.pop(self.written) + "\n")
            self.written += 1
        self.out.flush()
