"""`minisrv chat`: a terminal chat against a running server, streaming each reply as it is generated.

Uses only the standard library (urllib) so the command works wherever minisrv is installed.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Iterator, TextIO

HELP = "Type a message and press Enter. /reset clears the history, /exit (or Ctrl-D) quits."


class ChatError(Exception):
    """The server could not be reached or refused the request; the message says which."""


@dataclass
class ChatSession:
    url: str
    model: str | None = None
    api_key: str | None = None
    system: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    history: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def ask(self, text: str) -> Iterator[str]:
        """Stream the reply to `text`; the exchange joins the history only once the reply is complete."""
        messages = self.history + [{"role": "user", "content": text}]
        parts: list[str] = []
        for piece in self._stream(messages):
            parts.append(piece)
            yield piece
        self.history = messages + [{"role": "assistant", "content": "".join(parts)}]

    def _request(self, messages: list[dict]) -> urllib.request.Request:
        body: dict = {"messages": messages, "stream": True}
        for key, value in (("model", self.model), ("max_tokens", self.max_tokens),
                           ("temperature", self.temperature)):
            if value is not None:
                body[key] = value
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return urllib.request.Request(f"{self.url}/v1/chat/completions", data=json.dumps(body).encode(),
                                      headers=headers, method="POST")

    def _stream(self, messages: list[dict]) -> Iterator[str]:
        try:
            response = urllib.request.urlopen(self._request(messages), timeout=600)
        except urllib.error.HTTPError as exc:
            raise ChatError(f"server said {exc.code}: {_error_message(exc.read())}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ChatError(f"cannot reach {self.url}: {getattr(exc, 'reason', exc)}") from None
        with response:
            for line in response:
                if not line.startswith(b"data: "):
                    continue
                data = line[len(b"data: "):].strip()
                if data == b"[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise ChatError(f"server error: {event['error'].get('message')}")
                for choice in event.get("choices", []):
                    content = choice.get("delta", {}).get("content")
                    if content:
                        yield content


def _error_message(body: bytes) -> str:
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace")[:200]


def run_chat(session: ChatSession, read_line: Callable[[str], str], out: TextIO) -> int:
    """The read-reply loop; `read_line` is `input` in the terminal and a scripted feed in tests."""
    out.write(f"minisrv chat with {session.url}. {HELP}\n")
    while True:
        try:
            text = read_line(">>> ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return 0
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            out.write("(history cleared)\n")
            continue
        if not text:
            continue
        try:
            for piece in session.ask(text):
                out.write(piece)
                out.flush()
            out.write("\n")
        except KeyboardInterrupt:
            out.write("\n(interrupted; this exchange is not kept)\n")
        except ChatError as exc:
            out.write(f"\nerror: {exc}\n")
