"""/tokenize and /detokenize (vLLM's shapes) on the real app, with the byte-level tokenizer of dummy presets."""
from __future__ import annotations

import random

import httpx
import pytest
from tests.conftest import random_text
from tests.server.conftest import FAKE_MODEL
from tests.server.fake_engine_client import MAX_MODEL_LEN, VOCAB_SIZE, FakeEngineClient
from tests.server.inprocess_server import InProcessServer, byte_prompt_tokenizer

from minisrv.tokenizer.prompts import PromptTokenizer

MODEL = FAKE_MODEL


@pytest.fixture(scope="module")
def server(fake_server):
    return fake_server


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=30)


def test_tokenize_and_detokenize_round_trip(server) -> None:
    prompts = byte_prompt_tokenizer()
    for seed in range(5):
        text = random_text(random.Random(seed), 30)
        r = post(server, "/tokenize", {"model": MODEL, "prompt": text})
        body = r.json()
        assert r.status_code == 200 and body["tokens"] == prompts.tokenizer.encode(text)
        assert body["count"] == len(body["tokens"]) and body["max_model_len"] == MAX_MODEL_LEN
        assert post(server, "/detokenize", {"tokens": body["tokens"]}).json() == {"prompt": text}


def test_tokenize_a_chat_with_the_chat_template(server) -> None:
    prompts = byte_prompt_tokenizer()
    messages = [{"role": "user", "content": "héllo"}, {"role": "assistant", "content": "Hi, I am"}]
    pairs = [(m["role"], m["content"]) for m in messages]
    r = post(server, "/tokenize", {"messages": messages})
    assert r.json()["tokens"] == prompts.token_ids(pairs, True)
    r = post(server, "/tokenize", {"messages": messages, "add_generation_prompt": False,
                                   "continue_final_message": True})
    assert r.json()["tokens"] == prompts.token_ids(pairs, True, False, True)


def test_a_chat_tokenizes_with_its_tools_and_template_arguments_as_a_chat_request_renders(monkeypatch) -> None:
    import tests.server.inprocess_server as inprocess

    plain = inprocess.byte_prompt_tokenizer()
    template = plain.chat_template + "{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}" \
                                     "{% if mood %}<mood>{{ mood }}</mood>{% endif %}"
    monkeypatch.setattr(inprocess, "byte_prompt_tokenizer", lambda: PromptTokenizer(plain.tokenizer, template))
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    messages = [{"role": "user", "content": "time?"}]
    with InProcessServer(FakeEngineClient(MODEL)) as s:
        r = post(s, "/tokenize", {"messages": messages, "tools": [tool], "chat_template_kwargs": {"mood": "calm"},
                                  "return_token_strs": True})
        chat = httpx.post(f"{s.url}/v1/chat/completions", json={"model": MODEL, "messages": messages, "tools": [tool],
                                                                "chat_template_kwargs": {"mood": "calm"},
                                                                "max_tokens": 1})
    body = r.json()
    expected = PromptTokenizer(plain.tokenizer, template).token_ids(
        [("user", "time?")], True, template_kwargs={"mood": "calm"},
        tools=[{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}])
    assert body["tokens"] == expected and chat.status_code == 200
    assert "".join(body["token_strs"]).endswith("<mood>calm</mood>")
    assert body["token_strs"] == plain.tokenizer.convert_ids_to_tokens(expected)


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "model": "other"}, 404, "model"),
    ("/tokenize", {"prompt": "x", "unknown": 1}, 400, "unknown"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "tools": []}, 400, "tools"),
    ("/tokenize", {"messages": []}, 400, "messages"),
    ("/tokenize", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "continue_final_message": True}, 400,
     "continue_final_message"),
    ("/detokenize", {"tokens": [VOCAB_SIZE]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens.0"),
    ("/detokenize", {}, 400, "tokens"),
])
def test_bad_requests_name_the_field(server, path: str, body: dict, status: int, param: str) -> None:
    r = post(server, path, body)
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text
