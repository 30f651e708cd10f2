from __future__ import annotations

import json
import random

import pytest

from minisrv.server.errors import APIError
from minisrv.server.protocol import parse_request
from minisrv.server.sglang import DEFAULT_MAX_NEW_TOKENS, SGLangGenerateRequest
from minisrv.wire.records import PromptRequest

VOCAB = 1000


def generate(body: dict) -> PromptRequest:
    return parse_request(SGLangGenerateRequest, json.dumps(body).encode()).to_prompt_request(VOCAB)


def test_sglang_names_reach_sampling_params() -> None:
    rng = random.Random(7)
    for _ in range(10):
        max_new, n = rng.randint(1, 200), rng.randint(1, 16)
        stop = [f"s{rng.randint(0, 9)}" for _ in range(rng.randint(1, 3))]
        inp = generate({"text": "hi", "sampling_params": {"max_new_tokens": max_new, "min_new_tokens": max_new // 2,
                                                          "temperature": 0, "stop": stop, "n": n}})
        assert inp.text == "hi" and inp.params.max_tokens == max_new and inp.params.min_tokens == max_new // 2
        assert inp.params.temperature == 0.0 and inp.stop == stop and inp.n == n and inp.messages is None
    ids = [rng.randrange(VOCAB) for _ in range(4)]
    assert generate({"input_ids": ids}).prompt_ids == ids
    assert generate({"text": "hi", "sampling_params": {"stop": "x"}}).stop == ["x"]
    assert generate({"text": "hi"}).params.max_tokens == DEFAULT_MAX_NEW_TOKENS


@pytest.mark.parametrize("body, param", [
    ({"text": "a", "input_ids": [1]}, "text"),
    ({}, "text"),
    ({"text": ""}, "text"),
    ({"input_ids": []}, "input_ids"),
    ({"input_ids": [VOCAB]}, "input_ids"),
    ({"text": "a", "sampling_params": {"max_new_tokens": 0}}, "sampling_params.max_new_tokens"),
    ({"text": "a", "sampling_params": {"min_new_tokens": 5, "max_new_tokens": 2}}, "sampling_params.min_new_tokens"),
    ({"text": "a", "sampling_params": {"top_p": 2.0}}, "sampling_params.top_p"),
    ({"text": "a", "sampling_params": {"n": 17}}, "sampling_params.n"),
    ({"text": "a", "sampling_params": {"stop": ["", "x"]}}, "sampling_params.stop"),
    ({"text": "a", "sampling_params": {"stop_token_ids": [VOCAB]}}, "sampling_params.stop_token_ids"),
    ({"text": "a", "sampling_params": {"bogus": 1}}, "sampling_params.bogus"),
    ({"text": "a", "return_logprob": True, "logprob_start_len": 0}, "logprob_start_len"),
    ({"text": "a", "return_logprob": True, "top_logprobs_num": 21}, "top_logprobs_num"),
    ({"text": "a", "lora_path": "my-adapter"}, "lora_path"),
    ({"text": "a", "image_data": "cat.png"}, "image_data"),
    ({"text": "a", "return_routed_experts": True}, "return_routed_experts"),
    ({"text": "a", "rid": "r" * 257}, "rid"),
    ({"text": "a", "rid": ""}, "rid"),
])
def test_rejects(body: dict, param: str) -> None:
    with pytest.raises(APIError) as exc:
        generate(body)
    assert exc.value.status == 400 and exc.value.param == param and param in exc.value.message


def test_sglang_output_text_options_reach_the_prompt_request() -> None:
    plain = generate({"text": "hi"})
    assert plain.skip_special_tokens and not plain.include_stop_str_in_output
    kept = generate({"text": "hi", "sampling_params": {"skip_special_tokens": False, "no_stop_trim": True,
                                                       "spaces_between_special_tokens": False}})
    assert not kept.skip_special_tokens and kept.include_stop_str_in_output


def test_bench_serving_payload_is_taken_and_return_logprob_asks_for_logprobs() -> None:
    """SGLang's bench_serving sends lora_path null, return_logprob false and logprob_start_len -1 along."""
    plain = generate({"text": "hi", "sampling_params": {"temperature": 0.0, "max_new_tokens": 8, "ignore_eos": True},
                      "stream": True, "lora_path": None, "return_logprob": False, "logprob_start_len": -1,
                      "return_routed_experts": False, "image_data": None, "rid": "r1"})
    assert plain.params.max_tokens == 8 and plain.params.ignore_eos and plain.params.logprobs is None
    assert generate({"text": "hi", "return_logprob": True}).params.logprobs == 0
    assert generate({"text": "hi", "return_logprob": True, "top_logprobs_num": 3}).params.logprobs == 3

