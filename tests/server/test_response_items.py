"""response_items.py alone: what a stream sends when the request fails after its first events."""
from __future__ import annotations

import asyncio
import json

from minisrv.server.engine_handle import OutputDelta, RequestError
from minisrv.server.response_items import response_stream
from minisrv.server.responses_api import ResponsesRequest
from minisrv.server.streams import ChoiceDelta, ResponseContext


def test_an_error_after_the_stream_began_is_an_error_event_then_the_failed_response() -> None:
    async def deltas():
        yield ChoiceDelta(0, 0, OutputDelta(0, "He", [1, 2], None, None, 3, 0, 2))
        raise RequestError(503, "the scheduler died")

    async def events() -> list[dict]:
        req = ResponsesRequest.model_validate({"input": "x"})
        stream = response_stream(req, ResponseContext.new("resp", "m"), deltas())
        return [json.loads(chunk.split(b"data: ", 1)[1]) async for chunk in stream]

    sent = asyncio.run(events())
    assert [e["type"] for e in sent][-3:] == ["response.output_text.delta", "error", "response.failed"]
    assert sent[-2]["message"] == "the scheduler died" and sent[-1]["response"]["status"] == "failed"
    assert sent[-1]["response"]["error"]["message"] == "the scheduler died"
