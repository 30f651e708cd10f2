"""CallReader and CallDeltas on their own: calls found in JSON text however it is cut, and their deltas."""
from __future__ import annotations

import json
import random

from minisrv.server.call_reader import CallDeltas, CallReader

# Strings holding every character that means something outside a string; the arguments before the name once.
OBJECTS = [{"name": "a", "arguments": {"s": "}],{[\\\"", "n": [1, {"k": None}], "t": True}},
           {"parameters": {"x": "\u00e9\\n"}, "name": "b\\\"c"},
           {"name": "d", "arguments": "{\"quoted\": 1}"},
           {"name": "e", "arguments": 7}]


def test_every_call_is_found_with_its_raw_arguments_however_the_text_is_cut() -> None:
    for depth, text in ((2, json.dumps(OBJECTS)), (1, " <x> ".join(json.dumps(o, indent=1) for o in OBJECTS))):
        for seed in range(40):
            rng, reader, i = random.Random(seed), CallReader(depth), 0
            while i < len(text):
                step = rng.randint(1, 7)
                reader.feed(text[i : i + step])
                i += step
                for j, name in enumerate(reader.names):   # what is known so far is never wrong
                    assert name in (None, OBJECTS[j]["name"])
            assert reader.names == [o["name"] for o in OBJECTS]
            assert all(reader.complete(j) for j in range(len(OBJECTS)))
            assert [json.loads(reader.arguments(j)) for j in range(len(OBJECTS))] == \
                [o.get("arguments", o.get("parameters")) for o in OBJECTS]


def test_arguments_so_far_only_grow_and_deltas_carry_the_name_once() -> None:
    text = json.dumps([{"name": "f", "parameters": {"a": "x y", "b": [1, 2]}}, {"name": "g", "parameters": {}}])
    reader, deltas, seen, sent = CallReader(2), CallDeltas(), [], {}
    for ch in text:
        reader.feed(ch)
        found = [(name, reader.arguments(j)) for j, name in enumerate(reader.names) if name]
        for j, (_, arguments) in enumerate(found):
            assert arguments.startswith(sent.get(j, ""))
            sent[j] = arguments
        seen += deltas.update(found)
    assert [d["function"]["name"] for d in seen if "id" in d] == ["f", "g"]
    assert len(deltas.ids) == 2 and deltas.ids[0] != deltas.ids[1]
    assert "".join(d["function"]["arguments"] for d in seen if d["index"] == 0) == '{"a": "x y", "b": [1, 2]}'
