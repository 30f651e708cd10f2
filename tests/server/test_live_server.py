"""Against a live `minisrv serve` of the embedded model (CPU, float32), through the official SDK and raw HTTP.

One server for the whole module, started with an API key, so every request here also proves the key
works and the 401 cases need no second server. Generation lengths stay short: CPU time is the budget.
"""
from __future__ import annotations

import asyncio
import json
import random
import re
import time

import httpx
import openai
import pytest
from tests.server.live_server import LiveServer

API_KEY = "test-key-" + "".join(random.Random(5).choice("abcdef0123456789") for _ in range(16))
MAX_MODEL_LEN = 256
AUTH = {"Authorization": f"Bearer {API_KEY}"}
GREEDY = {"temperature": 0.0}
IGNORE_EOS = {"ignore_eos": True}   # not an OpenAI field: the SDK sends it through extra_body


@pytest.fixture(scope="module")
def server():
    # float32 on every CPU, whatever it multiplies natively: the logits and seeded samples these tests compare are
    # then the same on every machine CI runs on.
    with LiveServer(["--max-model-len", str(MAX_MODEL_LEN), "--log-level", "warning", "--dtype", "float32"],
                    env={"MINISRV_API_KEY": API_KEY}) as s:
        yield s
        assert httpx.get(f"{s.url}/health").status_code == 200, "the server stopped serving during the tests"


@pytest.fixture(scope="module")
def sdk(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(sdk) -> str:
    return sdk.models.list().data[0].id


def metrics(server) -> dict[str, float]:
    samples = {}
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[re.sub(r',?model_name="[^"]*"', "", name).replace("{}", "")] = float(value)
    return samples


def post(server, path: str, body: bytes | dict, headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.url}{path}", content=content, timeout=120,
                      headers={"Content-Type": "application/json", **AUTH, **(headers or {})})


def chat_messages(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_chat_greedy_streaming_equals_whole(sdk, model) -> None:
    kwargs = dict(model=model, messages=chat_messages("Name three colors."), max_tokens=8, **GREEDY)
    whole = sdk.chat.completions.create(**kwargs)
    assert whole.id.startswith("chatcmpl-") and whole.object == "chat.completion" and whole.model == model
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    chunks = list(sdk.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [choice.finish_reason]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens > 5
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # The same prompt again: it finds its full pages in the prefix cache.
    assert 0 < usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens
    if choice.finish_reason == "length":
        assert whole.usage.completion_tokens == 8


def test_completions_prompt_forms_and_usage(sdk, model) -> None:
    prompts = ["The capital of France is", "Once upon a time"]
    one = sdk.completions.create(model=model, prompt=prompts[0], max_tokens=4, **GREEDY)
    assert one.object == "text_completion" and one.id.startswith("cmpl-")
    assert one.choices[0].finish_reason in ("stop", "length") and one.usage.completion_tokens <= 4
    both = sdk.completions.create(model=model, prompt=prompts, max_tokens=4, **GREEDY)
    assert [c.index for c in both.choices] == [0, 1] and both.choices[0].text == one.choices[0].text
    assert both.usage.prompt_tokens > one.usage.prompt_tokens
    ids = sdk.completions.create(model=model, prompt=[[504, 3575, 282], [4649, 314]], max_tokens=1, **GREEDY)
    assert ids.usage.prompt_tokens == 5 and len(ids.choices) == 2
    echoed = sdk.completions.create(model=model, prompt=prompts[0], max_tokens=4, echo=True, **GREEDY)
    assert echoed.choices[0].text == prompts[0] + one.choices[0].text


def test_stop_string_spanning_tokens(sdk, model) -> None:
    prompt = "Write the numbers from one to twenty in words:"
    kwargs = dict(model=model, prompt=prompt, max_tokens=16, extra_body=IGNORE_EOS, **GREEDY)
    base = sdk.completions.create(logprobs=0, **kwargs)
    tokens = base.choices[0].logprobs.tokens
    full = base.choices[0].text
    # A stop string from the middle of one token into the next, first seen there: only text matching finds it.
    stop, end = None, 0
    for token, following in zip(tokens, tokens[1:]):
        end += len(token)
        if len(token) >= 2 and following and full.find(full[end - 1:end + 1]) == end - 1:
            stop = full[end - 1:end + 1]
            break
    assert stop is not None, tokens
    out = sdk.completions.create(stop=[stop], **kwargs)
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == full[: full.index(stop)] and stop not in out.choices[0].text
    chunks = list(sdk.completions.create(stop=stop, stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == out.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"
    # vLLM's include_stop_str_in_output: the output ends with the stop string instead.
    kwargs["extra_body"] = {**IGNORE_EOS, "include_stop_str_in_output": True}
    kept = sdk.completions.create(stop=[stop], **kwargs)
    assert kept.choices[0].text == full[: full.index(stop) + len(stop)] and kept.choices[0].finish_reason == "stop"


def test_truncate_prompt_tokens_and_continue_final_message(sdk, model) -> None:
    prompt = "The quick brown fox jumps over the lazy dog. " * 4
    full = sdk.completions.create(model=model, prompt=prompt, max_tokens=2, **GREEDY)
    cut = sdk.completions.create(model=model, prompt=prompt, max_tokens=2, extra_body={"truncate_prompt_tokens": 6},
                                 **GREEDY)
    assert cut.usage.prompt_tokens == 6 < full.usage.prompt_tokens
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "My favourite is"}]
    open_end = sdk.chat.completions.create(model=model, messages=messages, max_tokens=3, **GREEDY, extra_body={
        "add_generation_prompt": False, "continue_final_message": True})
    closed = sdk.chat.completions.create(model=model, messages=messages, max_tokens=3, **GREEDY)
    assert open_end.usage.prompt_tokens < closed.usage.prompt_tokens   # no end-of-turn, no new assistant header
    # Template arguments the model's template does not read change nothing (Qwen3's enable_thinking would).
    with_kwargs = sdk.chat.completions.create(model=model, messages=messages, max_tokens=3, **GREEDY,
                                              extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert with_kwargs.choices[0].message.content == closed.choices[0].message.content


def test_n_and_seeds(sdk, model) -> None:
    kwargs = dict(model=model, messages=chat_messages("Tell me a word."), max_tokens=4, temperature=1.0,
                  extra_body=IGNORE_EOS)
    # The prompt's prefix cached first, so every run below reads it from the cache: a fresh prefill's attention
    # (causal flash) and one over cached pages (masked) differ in the last float bits, which at temperature 1
    # can flip a draw that lands at a boundary (it did, for this seed, on a CPU without AMX).
    sdk.chat.completions.create(seed=0, **kwargs)
    first = sdk.chat.completions.create(n=2, seed=1234, **kwargs)
    again = sdk.chat.completions.create(n=2, seed=1234, **kwargs)
    other = sdk.chat.completions.create(n=2, seed=99, **kwargs)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1] and first.usage.completion_tokens == 8
    assert texts == [c.message.content for c in again.choices]     # a seed fixes every choice
    assert texts[0] != texts[1]                                     # yet the choices are different samples
    assert texts != [c.message.content for c in other.choices]


def test_logprobs(sdk, model) -> None:
    out = sdk.chat.completions.create(model=model, messages=chat_messages("Hi"), max_tokens=5, logprobs=True,
                                      top_logprobs=3, **GREEDY)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        # Greedy picks the most likely token, so it heads its own alternatives.
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs), abs=1e-4)
        assert bytes(entry.bytes).decode(errors="replace") == entry.token or "\ufffd" in entry.token
    comp = sdk.completions.create(model=model, prompt="Hello", max_tokens=4, logprobs=2, **GREEDY)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == comp.usage.completion_tokens
    assert all(len(top) <= 2 for top in lp.top_logprobs)


def test_prompt_logprobs_echoed_and_in_vllm_shape(server, sdk, model) -> None:
    prompt = "The capital of France is Paris, and the capital of Italy is"
    ids = post(server, "/tokenize", {"model": model, "prompt": prompt}).json()["tokens"]
    body = dict(model=model, prompt=prompt, max_tokens=3, logprobs=2, echo=True, **GREEDY)
    comp = post(server, "/v1/completions", dict(body, prompt_logprobs=4)).json()
    choice = comp["choices"][0]
    lp = choice["logprobs"]
    assert comp["usage"]["prompt_tokens"] == len(ids)
    assert len(lp["tokens"]) == len(ids) + comp["usage"]["completion_tokens"]
    assert choice["text"].startswith(prompt) and "".join(lp["tokens"]) == choice["text"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v <= 0 for v in lp["token_logprobs"][1:]) and all(len(t) <= 2 for t in lp["top_logprobs"][1:])
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(lp["tokens"]))]
    # vLLM's prompt_logprobs: null, then per token {id: {logprob, rank, decoded_token}} with 4 alternatives
    shaped = choice["prompt_logprobs"]
    assert len(shaped) == len(ids) and shaped[0] is None
    for i, entry in enumerate(shaped[1:], 1):
        mine = entry[str(ids[i])]
        assert mine["logprob"] == pytest.approx(lp["token_logprobs"][i], abs=1e-6) and mine["rank"] >= 1
        ranked = sorted(entry.values(), key=lambda e: e["rank"])
        assert [e["rank"] for e in ranked][:4] == [1, 2, 3, 4] and len(entry) <= 5
        assert all(a["logprob"] >= b["logprob"] for a, b in zip(ranked, ranked[1:]))
    # Streamed, the echo's logprobs come with the first chunk and add up to the same lists.
    with httpx.stream("POST", f"{server.url}/v1/completions", json=dict(body, stream=True), headers=AUTH,
                      timeout=120) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: {")]
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    assert sum((s["tokens"] for s in streamed), []) == lp["tokens"]
    assert sum((s["text_offset"] for s in streamed), []) == lp["text_offset"]
    assert sum((s["token_logprobs"] for s in streamed), [])[1:] == pytest.approx(lp["token_logprobs"][1:], abs=1e-5)
    # Chat: one prompt_logprobs list for the response, as vLLM's; streaming cannot carry it.
    chat = post(server, "/v1/chat/completions", {"model": model, "messages": chat_messages("Hi"), "max_tokens": 2,
                                                 "prompt_logprobs": 0}).json()
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    assert all(len(e) == 1 for e in chat["prompt_logprobs"][1:])
    refused = post(server, "/v1/chat/completions", {"model": model, "messages": chat_messages("Hi"),
                                                    "stream": True, "prompt_logprobs": 1})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt_logprobs"
    # More logprobs than a response may carry: a clear 400, not a broken ring.
    long_prompt = " ".join(["word"] * 200)
    too_many = post(server, "/v1/completions", {"model": model, "prompt": long_prompt, "max_tokens": 1, "n": 16,
                                                "prompt_logprobs": 20})
    assert too_many.status_code == 400 and "prompt_logprobs" in too_many.json()["error"]["message"]


def test_generate_endpoint(server) -> None:
    r = post(server, "/generate", {"text": "The capital of France is",
                                   "sampling_params": {"max_new_tokens": 5, "temperature": 0}})
    body = r.json()
    assert r.status_code == 200 and body["meta_info"]["completion_tokens"] == len(body["output_ids"]) <= 5
    # SGLang's bench_serving's payload, and output logprobs as SGLang gives them: (logprob, token id, text).
    bench = {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 5, "temperature": 0.0,
                                                                     "ignore_eos": True},
             "lora_path": None, "return_logprob": True, "logprob_start_len": -1, "top_logprobs_num": 2,
             "return_text_in_logprobs": True, "rid": "bench-1"}
    whole = post(server, "/generate", bench).json()
    meta = whole["meta_info"]
    assert meta["id"] == "bench-1" and [t[1] for t in meta["output_token_logprobs"]] == whole["output_ids"]
    assert all(lp <= 0 and isinstance(text, str) for lp, _, text in meta["output_token_logprobs"])
    assert [len(top) for top in meta["output_top_logprobs"]] == [2] * 5
    assert all(top[0][0] >= top[1][0] for top in meta["output_top_logprobs"])
    with httpx.stream("POST", f"{server.url}/generate", json={**bench, "stream": True}, headers=AUTH) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events[-1]["meta_info"]["output_token_logprobs"] == meta["output_token_logprobs"]   # cumulative


def test_logit_bias_steers_the_output(server, sdk, model) -> None:
    """A +100 bias makes a token every greedy choice; -100 on the unbiased choice makes it never appear."""
    plain = post(server, "/generate", {"text": "The capital of France is",
                                       "sampling_params": {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}})
    first = plain.json()["output_ids"][0]
    forced = post(server, "/generate", {"text": "The capital of France is", "sampling_params": {
        "max_new_tokens": 4, "temperature": 0, "ignore_eos": True, "logit_bias": {"1234": 100}}}).json()
    assert forced["output_ids"] == [1234] * 4
    banned = sdk.completions.create(model=model, prompt="The capital of France is", max_tokens=4, logprobs=0,
                                    extra_body={"logit_bias": {str(first): -100}, "ignore_eos": True}, **GREEDY)
    chosen = banned.choices[0].logprobs.tokens
    assert len(chosen) == 4 and plain.json()["text"][: len(chosen[0])] != chosen[0]


def test_32_concurrent_streams(server, model) -> None:
    rng = random.Random(6)
    prompts = [f"Count from {rng.randint(1, 50)}:" for _ in range(32)]

    async def one(client: httpx.AsyncClient, prompt: str) -> tuple[str, dict]:
        body = {"model": model, "prompt": prompt, "max_tokens": 6, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}, **GREEDY}
        text, usage = "", None
        async with client.stream("POST", "/v1/completions", json=body, headers=AUTH) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event["choices"]:
                    text += event["choices"][0]["text"]
                else:
                    usage = event["usage"]
        return text, usage

    async def main() -> list[tuple[str, dict]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    results = asyncio.run(main())
    assert all(usage["completion_tokens"] == 6 for _, usage in results)
    assert all(text for text, _ in results)


def test_disconnect_aborts_and_frees_pages(server, model) -> None:
    body = {"model": model, "prompt": "Tell me a very long story.", "max_tokens": MAX_MODEL_LEN - 16,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert metrics(server)["minisrv:num_requests_running"] >= 1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = metrics(server)
        if m["minisrv:num_requests_running"] == 0 and m["minisrv:kv_cache_usage_perc"] == 0:
            break
        time.sleep(0.1)
    assert m["minisrv:num_requests_running"] == 0 and m["minisrv:kv_cache_usage_perc"] == 0


def test_metrics(server, sdk, model) -> None:
    prompt = "A shared prefix that is long enough to fill at least one full page of the KV cache, twice over."
    for _ in range(2):
        sdk.completions.create(model=model, prompt=prompt, max_tokens=2)
    m = metrics(server)
    assert m["minisrv:prefix_cache_hits_total"] > 0 and m["minisrv:prefix_cache_queries_total"] >= \
        m["minisrv:prefix_cache_hits_total"]
    assert m["minisrv:prompt_tokens_total"] > 0 and m["minisrv:generation_tokens_total"] > 0
    for hist in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"):
        assert m[f"minisrv:{hist}_count"] > 0
    assert 0 <= m["minisrv:kv_cache_usage_perc"] <= 1 and m["minisrv:num_requests_waiting"] >= 0


TOO_LONG = " ".join(["word"] * (MAX_MODEL_LEN + 10))


@pytest.mark.parametrize("path, body, status", [
    ("/v1/chat/completions", b'{"messages": ', 400),                                     # invalid JSON
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\xff"}]}', 400),   # invalid UTF-8
    ("/v1/chat/completions", {"messages": "hello"}, 400),                              # wrong type
    ("/v1/chat/completions", {"messages": []}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_p": 1.5}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_k": -2}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 17}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 21}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "presence_penalty": 3}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "stream_options": {"include_usage": True}}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "no-such-model"}, 404),
    ("/v1/completions", {"prompt": TOO_LONG, "max_tokens": 4}, 400),                  # longer than the context
    ("/v1/completions", {"prompt": "hi", "max_tokens": MAX_MODEL_LEN}, 400),          # prompt + max_tokens too long
    ("/v1/completions", {"prompt": [1, 2, 10_000_000]}, 400),                         # outside the vocabulary
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": TOO_LONG}], "stream": True}, 400),
])
def test_errors(server, path: str, body, status: int) -> None:
    r = post(server, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_wrong_methods_paths_and_keys(server) -> None:
    assert httpx.get(f"{server.url}/v1/chat/completions", headers=AUTH).status_code == 405
    assert httpx.get(f"{server.url}/v1/nothing-here", headers=AUTH).status_code == 404
    body = {"prompt": "hi", "max_tokens": 1}
    assert post(server, "/v1/completions", body, headers={"Authorization": ""}).status_code == 401
    assert post(server, "/v1/completions", body, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_edge_inputs_are_served_or_refused_never_5xx(server, model) -> None:
    """Odd but well-formed requests reach the workers; each ends in a 200 or a 4xx and the server stays up."""
    vocab = 49152   # SmolLM2's vocabulary
    long_stop = "x" * 300
    cases = [
        ("/v1/chat/completions", {"messages": chat_messages("Hi!"), **GREEDY}),   # no max_tokens: up to the context
        ("/v1/chat/completions", {"messages": chat_messages("你好 🙂 \u0000 ü"), "max_tokens": 2}),
        ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "first"}], "max_tokens": 1}),
        ("/v1/chat/completions", {"messages": [{"role": "system", "content": ""}], "max_tokens": 1}),
        ("/v1/chat/completions", {"messages": chat_messages("x"), "add_generation_prompt": False, "max_tokens": 1}),
        ("/v1/chat/completions", {"messages": [{"role": "developer", "content": "d"}, {"role": "user", "content": [
            {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "max_tokens": 1}),
        ("/v1/chat/completions", {"messages": chat_messages("x"), "n": 16, "max_tokens": 1, "logprobs": True,
                                  "top_logprobs": 20}),
        ("/v1/chat/completions", {"messages": chat_messages("x"), "stop": [long_stop] + [str(i) for i in range(15)],
                                  "max_tokens": 2}),
        ("/v1/completions", {"prompt": [vocab - 1, 0, 1], "max_tokens": 1, "echo": True}),
        ("/v1/completions", {"prompt": [vocab], "max_tokens": 1}),
        ("/v1/completions", {"prompt": [1] * (MAX_MODEL_LEN - 1), "max_tokens": 1}),   # exactly fills the context
        ("/v1/completions", {"prompt": "hi", "max_tokens": None, "min_tokens": MAX_MODEL_LEN}),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 1, "stop_token_ids": [0, vocab - 1],
                             "min_tokens": 1, "seed": 2**63 - 1, "top_k": 0, "min_p": 1.0, "top_p": 1e-9}),
        ("/generate", {"input_ids": [1] * (MAX_MODEL_LEN + 1)}),
        ("/generate", {"text": "\U0010ffff" * 10, "sampling_params": {"max_new_tokens": 1}}),
    ]
    for path, body in cases:
        r = post(server, path, body)
        assert r.status_code == 200 or 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
        if r.status_code != 200:
            assert r.json()["error"]["message"]
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_stream_interval_and_sse_timestamps_through_every_process() -> None:
    """--stream-interval 4: the first token alone, then 4 a chunk; --sse-timestamps: each chunk says when the
    scheduler sent its first token, on this host's monotonic clock."""
    with LiveServer(["--max-model-len", str(MAX_MODEL_LEN), "--log-level", "warning", "--stream-interval", "4",
                     "--sse-timestamps"]) as s:
        body = {"prompt": "Once upon a time", "max_tokens": 13, "ignore_eos": True, "logprobs": 1, "stream": True,
                "temperature": 0.0}
        before = time.monotonic_ns()
        lines = httpx.post(f"{s.url}/v1/completions", json=body, timeout=120).text.split("\n")
        after = time.monotonic_ns()
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert [len(c["choices"][0]["logprobs"]["tokens"]) for c in chunks] == [1, 4, 4, 4]
    stamps = [int(line.split()[-1]) for line in lines if line.startswith(": emitted ")]
    assert len(stamps) == len(chunks) and before < stamps[0] < stamps[1] < stamps[2] < stamps[3] < after


def test_speculative_decoding_serves_the_same_text_and_counts_its_drafts() -> None:
    """--speculative-config ngram: several tokens a step for a stream that repeats its prompt, the same text and
    logprobs as without (float32 weights: every row takes the same arithmetic), streamed or whole, a stop string cut
    as without, and vLLM's spec_decode counters."""
    prompt = "Copy the list exactly.\nList: apples, pears, plums, figs, limes, dates.\nCopy: apples, pears,"
    bodies = [{"prompt": prompt, "max_tokens": 24, "temperature": 0.0, "logprobs": 1},
              {"prompt": prompt, "max_tokens": 24, "temperature": 0.0, "stop": [" figs"]},
              {"prompt": prompt, "max_tokens": 24, "temperature": 0.8, "seed": 3}]
    flags = ["--max-model-len", str(MAX_MODEL_LEN), "--log-level", "warning", "--dtype", "float32",
             "--quantization", "none"]
    with (LiveServer(flags, env={"MINISRV_API_KEY": API_KEY}) as plain_server,
          LiveServer([*flags, "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 4}'],
                     env={"MINISRV_API_KEY": API_KEY}) as drafting):
        for body in bodies:
            plain = post(plain_server, "/v1/completions", body).json()["choices"][0]
            whole = post(drafting, "/v1/completions", body).json()["choices"][0]
            lines = post(drafting, "/v1/completions", {**body, "stream": True}).text.split("\n")
            chunks = [json.loads(line[6:])["choices"][0] for line in lines if line.startswith("data: {")]
            assert (whole["text"], whole["finish_reason"]) == (plain["text"], plain["finish_reason"])
            assert "".join(c["text"] for c in chunks) == plain["text"]
            assert [c["finish_reason"] for c in chunks if c["finish_reason"]] == [plain["finish_reason"]]
            if body.get("logprobs"):
                assert whole["logprobs"]["tokens"] == plain["logprobs"]["tokens"]
                assert whole["logprobs"]["token_logprobs"] == pytest.approx(plain["logprobs"]["token_logprobs"],
                                                                             abs=1e-3)
        counted = metrics(drafting)
    drafted, accepted = (counted[f"minisrv:spec_decode_num_{name}_tokens_total"] for name in ("draft", "accepted"))
    assert drafted >= accepted > 4 and counted["minisrv:spec_decode_num_drafts_total"] > 0


def test_tokenize_counts_what_the_engine_gets(server, sdk, model) -> None:
    prompt = "The quick brown fox jumps over the lazy dog."
    tokens = post(server, "/tokenize", {"model": model, "prompt": prompt}).json()
    out = sdk.completions.create(model=model, prompt=prompt, max_tokens=1, **GREEDY)
    assert tokens["count"] == out.usage.prompt_tokens == len(tokens["tokens"])
    assert post(server, "/detokenize", {"tokens": tokens["tokens"]}).json()["prompt"].endswith(prompt)
    chat = post(server, "/tokenize", {"messages": chat_messages("Hi")}).json()
    reply = sdk.chat.completions.create(model=model, messages=chat_messages("Hi"), max_tokens=1, **GREEDY)
    assert chat["count"] == reply.usage.prompt_tokens


PERSON_SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                   "age": {"type": "integer", "minimum": 0, "maximum": 150}},
                 "required": ["name", "age"], "additionalProperties": False}


def assert_person(text: str) -> None:
    person = json.loads(text)
    assert set(person) == {"name", "age"} and isinstance(person["name"], str) and len(person["name"]) <= 20
    assert isinstance(person["age"], int) and 0 <= person["age"] <= 150


def test_response_format_json_schema_is_followed(sdk, model) -> None:
    """Greedy and sampled, whole and streamed: every output that stops is JSON valid against the schema."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}
    whole = sdk.chat.completions.create(model=model, messages=chat_messages("Describe Ada Lovelace as JSON."),
                                        response_format=fmt, max_tokens=60, **GREEDY)
    assert whole.choices[0].finish_reason == "stop", whole.choices[0]
    assert_person(whole.choices[0].message.content)
    sampled = sdk.chat.completions.create(model=model, messages=chat_messages("A person, as JSON:"), n=3, seed=11,
                                          response_format=fmt, max_tokens=60, temperature=1.0)
    for choice in sampled.choices:
        assert choice.finish_reason == "stop", choice
        assert_person(choice.message.content)
    stream = sdk.chat.completions.create(model=model, messages=chat_messages("Describe Ada Lovelace as JSON."),
                                         response_format=fmt, max_tokens=60, stream=True, **GREEDY)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == whole.choices[0].message.content


def test_a_grammar_process_gives_the_same_structured_output(sdk, model) -> None:
    """`--grammar-process on` (the default on a GPU): the grammars' matchers in a process of their own give the
    greedy JSON the in-process matchers give, whole and streamed, and the server stops cleanly with it."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}
    ask = dict(model=model, messages=chat_messages("Describe Ada Lovelace as JSON."), response_format=fmt,
               max_tokens=60, **GREEDY)
    expected = sdk.chat.completions.create(**ask).choices[0]
    with LiveServer(["--max-model-len", str(MAX_MODEL_LEN), "--log-level", "warning", "--dtype", "float32",
                     "--grammar-process", "on"], env={"MINISRV_API_KEY": API_KEY}) as other:
        client = openai.OpenAI(base_url=f"{other.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        whole = client.chat.completions.create(**ask).choices[0]
        assert (whole.message.content, whole.finish_reason) == (expected.message.content, expected.finish_reason)
        stream = client.chat.completions.create(**ask, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == whole.message.content
        # A grammar its matcher cannot follow fails the request here too: refused token, then failed mask.
        for _ in range(2):
            with pytest.raises(openai.BadRequestError, match="llguidance could not follow it"):
                client.completions.create(model=model, prompt="x", max_tokens=5,
                                          extra_body={"guided_regex": "(b{1000}){1000}"})
    assert other.process.returncode == 0


def test_guided_choice_regex_and_json_object(server, sdk, model) -> None:
    yes_no = sdk.completions.create(model=model, prompt="Is the sky green? Answer:", max_tokens=8, n=4, seed=3,
                                    temperature=1.0, extra_body={"guided_choice": ["yes", "no", "it depends"]})
    assert {c.text for c in yes_no.choices} <= {"yes", "no", "it depends"}
    assert all(c.finish_reason == "stop" for c in yes_no.choices)
    date = sdk.completions.create(model=model, prompt="Today's date is", max_tokens=16, temperature=0.7, seed=5,
                                  extra_body={"structured_outputs": {"regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"}})
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", date.choices[0].text), date.choices[0].text
    obj = sdk.chat.completions.create(model=model, messages=chat_messages("Give me a JSON object."), max_tokens=48,
                                      response_format={"type": "json_object"}, **GREEDY)
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    else:   # cut by max_tokens: still a prefix of a JSON object
        assert obj.choices[0].message.content.lstrip().startswith("{")
    generated = post(server, "/generate", {"text": "Ada Lovelace as JSON:", "sampling_params": {
        "max_new_tokens": 60, "temperature": 0, "json_schema": json.dumps(PERSON_SCHEMA)}}).json()
    assert generated["meta_info"]["finish_reason"] == {"type": "stop"}
    assert_person(generated["text"])
    gbnf = post(server, "/generate", {"text": "Pick a colour:", "sampling_params": {
        "max_new_tokens": 8, "temperature": 0, "ebnf": 'root ::= "red" | "green" | "blue"'}}).json()
    assert gbnf["text"] in ("red", "green", "blue")
    year = post(server, "/generate", {"text": "The year the war ended:", "sampling_params": {
        "max_new_tokens": 8, "temperature": 0.8, "regex": "(19|20)[0-9]{2}"}}).json()
    assert re.fullmatch("(19|20)[0-9]{2}", year["text"]), year["text"]
    allowed = [post(server, "/tokenize", {"model": model, "prompt": word}).json()["tokens"][-1] for word in "AB"]
    only = sdk.completions.create(model=model, prompt="Letters:", max_tokens=6, temperature=1.0, seed=2, n=3,
                                  extra_body={"allowed_token_ids": allowed})
    assert all(re.fullmatch("[AB]*", c.text) for c in only.choices), [c.text for c in only.choices]


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
    ({"guided_regex": "[a-z"}, "guided_regex"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs.grammar"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex"),
    ({"allowed_token_ids": [10**9]}, "allowed_token_ids"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"allowed_token_ids": [5], "guided_regex": "a"}, "allowed_token_ids"),
])
def test_invalid_grammars_are_400s_naming_the_field(server, model, body: dict, param: str) -> None:
    r = post(server, "/v1/chat/completions", {"model": model, "messages": chat_messages("x"), **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_a_grammar_llguidance_cannot_follow_fails_its_request_with_a_400_streamed_or_not(server, model) -> None:
    """Its lexer's limits are met only while generating: the request fails (its text so far is no match), the
    client is told why, and the server serves on. The second request meets the lexer states the first built."""
    body = {"model": model, "prompt": "x", "max_tokens": 5, "guided_regex": "(b{1000}){1000}"}
    for extra in ({}, {"stream": True}):
        r = post(server, "/v1/completions", {**body, **extra})
        assert r.status_code == 400, r.text
        assert "llguidance could not follow it" in r.json()["error"]["message"]
    assert post(server, "/v1/completions", {"model": model, "prompt": "x", "max_tokens": 2}).status_code == 200


def test_the_fields_sdks_send_along_are_accepted_and_change_nothing(sdk, model) -> None:
    """What the OpenAI SDK, LangChain and LiteLLM send for OpenAI's platform is taken and ignored: the reply is the
    one without them, streamed too, with the usage so far in every chunk as guidellm asks for it."""
    lenient = dict(store=False, metadata={"run": "ci"}, service_tier="auto", user="user-7", reasoning_effort="low",
                   parallel_tool_calls=True, modalities=["text"])
    plain = sdk.chat.completions.create(model=model, messages=chat_messages("Name a colour."), max_tokens=12,
                                        **GREEDY)
    given = sdk.chat.completions.create(model=model, messages=chat_messages("Name a colour."), max_tokens=12,
                                        **GREEDY, **lenient)
    assert given.choices[0].message.content == plain.choices[0].message.content
    chunks = list(sdk.chat.completions.create(
        model=model, messages=chat_messages("Name a colour."), max_tokens=12, **GREEDY, **lenient, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert all(c.usage is not None for c in chunks)
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


@pytest.mark.parametrize("sampling_params, param", [
    ({"json_schema": '{"type": "bogus"}'}, "sampling_params.json_schema"),
    ({"json_schema": "{not json"}, "sampling_params.json_schema"),
    ({"regex": "[a-z"}, "sampling_params.regex"),
    ({"ebnf": "root ::= undefined_rule"}, "sampling_params.ebnf"),
    ({"regex": "a", "ebnf": 'root ::= "a"'}, "sampling_params.ebnf"),   # the second names the conflict
])
def test_invalid_grammars_on_generate_are_400s_naming_the_field(server, sampling_params: dict, param: str) -> None:
    r = post(server, "/generate", {"text": "x", "sampling_params": {"max_new_tokens": 4, **sampling_params}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def bounded_schemas():
    """JSON objects' schemas whose every value is bounded (strings, numbers, arrays), so the grammar ends each
    output."""
    from hypothesis import strategies as st

    leaves = st.one_of(
        st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(1, 8)),
        st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
                  st.integers(-1000, 1000), st.integers(0, 5000)),
        st.just({"type": "boolean"}),
        st.builds(lambda values: {"enum": values}, st.lists(st.text("abcxyz _", min_size=1, max_size=6),
                                                             min_size=1, max_size=4, unique=True)),
        st.builds(lambda n: {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                             "maxItems": n}, st.integers(0, 4)))
    names = st.text("abcdefghij_", min_size=1, max_size=6)

    def obj(children):
        return st.dictionaries(names, children, min_size=1, max_size=4).map(
            lambda props: {"type": "object", "properties": props, "required": sorted(props),
                           "additionalProperties": False})

    return st.recursive(leaves, obj, max_leaves=6).filter(lambda s: s.get("type") == "object")


def conforms(value, schema: dict) -> bool:
    """Whether `value` follows `schema` (the subset bounded_schemas draws)."""
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema["type"]
    if kind == "string":
        return isinstance(value, str) and len(value) <= schema["maxLength"]
    if kind == "integer":
        return type(value) is int and schema["minimum"] <= value <= schema["maximum"]
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "array":
        return isinstance(value, list) and len(value) <= schema["maxItems"] and all(
            conforms(v, schema["items"]) for v in value)
    return (isinstance(value, dict) and set(value) == set(schema["properties"])
            and all(conforms(value[k], s) for k, s in schema["properties"].items()))


def test_random_schemas_give_valid_json_streamed_and_whole(server, model) -> None:
    """50 schemas drawn by hypothesis (two draws of 25, sent at once), half streamed: every output stops and
    follows its schema."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    async def one(client: openai.AsyncOpenAI, schema: dict, stream: bool, seed: int) -> tuple[str, str]:
        args = dict(model=model, messages=chat_messages("Fill in this JSON."), max_tokens=200, seed=seed,
                    temperature=0.7, response_format={"type": "json_schema", "json_schema": {
                        "name": "s", "schema": schema}})
        if not stream:
            choice = (await client.chat.completions.create(**args)).choices[0]
            return choice.message.content, choice.finish_reason
        text, finish = [], None
        async for chunk in await client.chat.completions.create(stream=True, **args):
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        return "".join(text), finish

    @settings(max_examples=2, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.lists(bounded_schemas(), min_size=25, max_size=25))
    def check(schemas: list[dict]) -> None:
        async def all_of_them():   # a client per event loop: each asyncio.run makes a new one
            async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0,
                                          timeout=300) as client:
                return await asyncio.gather(*(one(client, s, i % 2 == 0, i) for i, s in enumerate(schemas)))

        for schema, (text, finish) in zip(schemas, asyncio.run(all_of_them())):
            assert finish == "stop", (schema, text)
            assert conforms(json.loads(text), schema), (schema, text)

    check()


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}},
                                       "required": ["zone"], "additionalProperties": False}}}


def test_forced_tool_calls_parse_whole_and_streamed(sdk, model) -> None:
    """tool_choice "required" and a named function: the arguments always parse and follow the parameters;
    a stream's tool_calls deltas reassemble to the whole response's."""
    messages = chat_messages("What is the weather in Paris?")
    for choice, parallel in (("required", False), ("required", True),
                             ({"type": "function", "function": {"name": "get_weather"}}, True)):
        args = dict(model=model, messages=messages, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice=choice,
                    parallel_tool_calls=parallel, max_tokens=120, **GREEDY)
        whole = sdk.chat.completions.create(**args).choices[0]
        assert whole.finish_reason == ("stop" if isinstance(choice, dict) else "tool_calls"), whole
        calls = whole.message.tool_calls
        assert calls and whole.message.content is None and (parallel or len(calls) == 1)
        for call in calls:
            arguments = json.loads(call.function.arguments)
            if call.function.name == "get_weather":
                assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("celsius", "fahrenheit")
            else:
                assert call.function.name == "get_time" and arguments["zone"] in ("UTC", "CET", "PST")
            assert call.id.startswith("call_") and call.type == "function"
        if isinstance(choice, dict):
            assert [c.function.name for c in calls] == ["get_weather"]
        streamed: dict[int, dict] = {}
        finish = None
        for chunk in sdk.chat.completions.create(stream=True, **args):
            delta = chunk.choices[0].delta
            assert not delta.content   # a forced call never streams as text
            for call in delta.tool_calls or []:
                if call.index not in streamed:   # named in its first delta, and only there
                    assert call.id.startswith("call_") and call.type == "function" and call.function.name
                    streamed[call.index] = {"name": call.function.name, "arguments": "", "pieces": 0}
                else:
                    assert call.id is None and call.function.name is None
                streamed[call.index]["arguments"] += call.function.arguments or ""
                streamed[call.index]["pieces"] += bool(call.function.arguments)
            finish = chunk.choices[0].finish_reason or finish
        assert finish == whole.finish_reason
        assert [(e["name"], json.loads(e["arguments"])) for _, e in sorted(streamed.items())] == \
            [(c.function.name, json.loads(c.function.arguments)) for c in calls]
        assert all(e["pieces"] > 1 for e in streamed.values())   # the arguments stream as they are written


def test_a_tool_round_trip_is_rendered_and_answered(sdk, model) -> None:
    """The assistant's tool_calls (content null) and the tool's answer go through the chat template; auto
    with a model that writes no call gives plain content; tool_choice none ignores the tools."""
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    messages = [{"role": "user", "content": "What is the weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "clear"}'}]
    answer = sdk.chat.completions.create(model=model, messages=messages, tools=[WEATHER_TOOL], max_tokens=24,
                                         **GREEDY).choices[0]
    assert answer.message.content and answer.message.role == "assistant"
    assert (answer.message.tool_calls is None) == (answer.finish_reason != "tool_calls")
    none = sdk.chat.completions.create(model=model, messages=chat_messages("Hi"), tools=[WEATHER_TOOL],
                                       tool_choice="none", max_tokens=8, **GREEDY).choices[0]
    plain = sdk.chat.completions.create(model=model, messages=chat_messages("Hi"), max_tokens=8, **GREEDY).choices[0]
    assert none.message.content == plain.message.content and none.message.tool_calls is None


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tools": [WEATHER_TOOL], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER_TOOL, {"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}],
      "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tools.1.function.parameters"),
    ({"tools": [WEATHER_TOOL, {"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": []}, "tools"),
    ({"tools": [WEATHER_TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format"),
    ({"messages": [{"role": "assistant", "content": None}]}, "messages.0.content"),
    ({"messages": [{"role": "tool", "content": "21 C"}]}, "messages.0.tool_call_id"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]},
     "messages.0.tool_calls.0.function.arguments"),
])
def test_invalid_tool_requests_are_400s_naming_the_field(server, model, body: dict, param: str) -> None:
    r = post(server, "/v1/chat/completions", {"model": model, "messages": chat_messages("x"), **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_responses_api_answers_as_chat_does(sdk, model) -> None:
    """/v1/responses renders the same prompt as chat: the same greedy text, whole and streamed; a forced call's
    arguments follow the tool's parameters, and a call and its result go back in the input."""
    chat = sdk.chat.completions.create(model=model, messages=[{"role": "system", "content": "Be brief."},
                                                               *chat_messages("Name a colour.")],
                                       max_tokens=12, **GREEDY).choices[0].message.content
    kwargs = dict(model=model, instructions="Be brief.", input="Name a colour.", max_output_tokens=12, **GREEDY)
    whole = sdk.responses.create(**kwargs)
    assert whole.output_text == chat and whole.usage.output_tokens <= 12
    streamed = "".join(e.delta for e in sdk.responses.create(stream=True, **kwargs)
                       if e.type == "response.output_text.delta")
    assert streamed == chat
    tool = {"type": "function", **WEATHER_TOOL["function"]}
    forced = sdk.responses.create(model=model, input="What is the weather in Paris?", tools=[tool],
                                  tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=60,
                                  **GREEDY)
    (call,) = forced.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert set(json.loads(call.arguments)) == {"city", "unit"}
    answer = sdk.responses.create(model=model, tools=[tool], max_output_tokens=16, **GREEDY, input=[
        {"role": "user", "content": "What is the weather in Paris?"}, call.model_dump(),
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 21}'}])
    assert answer.status in ("completed", "incomplete") and answer.output


def test_anthropic_messages_api_answers_as_chat_does(server, sdk, model) -> None:
    """/v1/messages renders the same prompt as chat: the same greedy text, whole and streamed, the input tokens
    count_tokens counts; a forced tool use follows the tool's schema and goes back with its result."""
    import anthropic

    claude = anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=120)
    chat = sdk.chat.completions.create(model=model, messages=[{"role": "system", "content": "Be brief."},
                                                               *chat_messages("Name a colour.")],
                                       max_tokens=12, **GREEDY)
    kwargs = dict(model=model, system="Be brief.", messages=chat_messages("Name a colour."), max_tokens=12,
                  extra_body=GREEDY)
    whole = claude.messages.create(**kwargs)
    assert whole.content[0].text == chat.choices[0].message.content
    assert whole.usage.input_tokens + whole.usage.cache_read_input_tokens == chat.usage.prompt_tokens
    with claude.messages.stream(**kwargs) as stream:
        assert "".join(stream.text_stream) == whole.content[0].text
    counted = claude.messages.count_tokens(model=model, system="Be brief.", messages=chat_messages("Name a colour."))
    assert counted.input_tokens == chat.usage.prompt_tokens
    tool = {"name": "get_weather", "description": WEATHER_TOOL["function"]["description"],
            "input_schema": WEATHER_TOOL["function"]["parameters"]}
    forced = claude.messages.create(model=model, messages=chat_messages("What is the weather in Paris?"),
                                    tools=[tool], tool_choice={"type": "tool", "name": "get_weather"},
                                    max_tokens=60, extra_body=GREEDY)
    (use,) = forced.content
    assert use.type == "tool_use" and use.name == "get_weather" and set(use.input) == {"city", "unit"}
    answer = claude.messages.create(model=model, tools=[tool], max_tokens=16, extra_body=GREEDY, messages=[
        *chat_messages("What is the weather in Paris?"), {"role": "assistant", "content": forced.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": '{"temp": 21}'}]}])
    assert answer.stop_reason in ("end_turn", "max_tokens") and answer.content
