"""SamplingParams is the one table of sampling options: its ranges name the field, and every option reaches the
API schemas under its names and survives the records, with no other list to edit."""
from __future__ import annotations

import dataclasses
import json
import math
import random
import re

import pytest

from minisrv.sampling_params import OPTIONS, SamplingParams, api_names
from minisrv.server.protocol import ChatCompletionRequest, CompletionRequest, parse_request
from minisrv import structured_output
from minisrv.server.sglang import SGLangGenerateRequest
from minisrv.wire.records import PromptRequest, TokenizedRequest, decode


def some_value(option: dataclasses.Field, rng: random.Random) -> object:
    """A valid value of `option` other than its default."""
    wire, allowed = option.metadata["wire"], option.metadata["range"]
    if wire == "ids":
        return [rng.randrange(1000) for _ in range(3)]
    if wire == "bias":   # values exact in float32, as records carry them
        return {rng.randrange(1000): rng.choice([-100.0, -2.5, 0.5, 7.25, 100.0]) for _ in range(3)}
    if wire == "?":
        return not option.default
    if wire == "text":   # the one such option is grammar
        return structured_output.regex(f"[a-z]{{{rng.randint(1, 9)}}}", "test").text
    high = allowed.high if allowed.high is not None and allowed.high < 1000 else (allowed.low or 0) + 1000
    if wire == "d":
        return round(rng.uniform(allowed.low + 0.01, high), 3)
    return rng.choice([v for v in range(int(allowed.low) + 1, int(high) + 1) if v != option.default])


def every_option(seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    values = {option.name: some_value(option, rng) for option in OPTIONS}
    values["min_tokens"] = rng.randint(1, min(16, values["max_tokens"]))   # within every default max_tokens
    return values


@pytest.mark.parametrize("option", OPTIONS, ids=[o.name for o in OPTIONS])
def test_each_range_is_enforced_and_names_the_field(option: dataclasses.Field) -> None:
    allowed = option.metadata["range"]
    if allowed is None:
        return
    beyond = allowed.low - 1 if allowed.low is not None else allowed.high + 1
    with pytest.raises(ValueError, match=rf"^{option.name} must be {re.escape(str(allowed))}"):
        SamplingParams(**{option.name: beyond})
    if option.metadata["wire"] == "d":
        with pytest.raises(ValueError, match=option.name):
            SamplingParams(**{option.name: math.nan})


@pytest.mark.parametrize("seed", range(5))
def test_every_option_survives_both_request_records(seed: int) -> None:
    params = SamplingParams(**every_option(seed))
    assert decode(PromptRequest(1, params=params, text="x").encode()).params == params
    assert decode(TokenizedRequest(2, params, [1, 2]).encode()).params == params


@pytest.mark.parametrize("seed", range(5))
def test_every_option_reaches_each_api_under_its_names(seed: int) -> None:
    values = every_option(seed)
    openai = {name: values[option] for name, option in api_names("openai").items()}
    chat = parse_request(ChatCompletionRequest, json.dumps(
        {"messages": [{"role": "user", "content": "hi"}], **openai}).encode()).to_prompt_request(1000, 4096)
    completion, = parse_request(CompletionRequest, json.dumps({"prompt": "hi", **openai}).encode()
                                ).to_prompt_requests(1000, 4096, 256)
    sglang = {name: values[option] for name, option in api_names("sglang").items()}
    generate = parse_request(SGLangGenerateRequest, json.dumps(
        {"text": "hi", "sampling_params": sglang}).encode()).to_prompt_request(1000)
    for request, names in ((chat, api_names("openai")), (completion, api_names("openai")),
                           (generate, api_names("sglang"))):
        for option in names.values():
            assert getattr(request.params, option) == values[option], option
    # Every option is reachable somewhere; those the OpenAI endpoints declare themselves are max_tokens and logprobs,
    # and grammar comes from each API's structured-output fields (tests/server/test_protocol.py).
    assert {o.name for o in OPTIONS} - set(api_names("openai").values()) == {"max_tokens", "logprobs", "grammar"}
