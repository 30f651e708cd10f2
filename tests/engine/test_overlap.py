"""Overlap scheduling on the CPU engine (float32, exact): step N+1 scheduled and launched before step N's tokens
are read gives the plain loop's outputs token for token, including under preemption in a tiny KV pool.
tests/engine/test_engine_on_device.py runs the same workload on the GPU with CUDA graphs."""
from __future__ import annotations

import pytest
import torch

from minisrv.config import EngineConfig
from minisrv.engine.llm_engine import LLMEngine
from minisrv.models.config import ModelConfig
from minisrv.models.dummy import init_dummy_weights
from minisrv.models.loader import LoadedModel, build_model
from minisrv.sampling_params import SamplingParams
from tests.engine.mixed_workload import ABORT_AFTER_TOKENS, ABORTED_RID, assert_same_outputs, generate, mixed_requests

TINY = dict(architectures=["LlamaForCausalLM"], vocab_size=211, hidden_size=64, intermediate_size=96,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            tie_word_embeddings=False, eos_token_id=3)


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    model_config = ModelConfig.from_hf_dict(TINY)
    model = build_model(model_config, 512, torch.float32, torch.device("cpu"))
    init_dummy_weights(model, seed=3, std=0.2)
    return LoadedModel(model, model_config, eos_token_ids=[3], max_model_len=512, name="tiny")


def run(loaded: LoadedModel, overlap: bool, stop_token: int | None = None, **config):
    engine = LLMEngine(EngineConfig(page_size=4, **config), loaded=loaded, overlap=overlap)
    return generate(engine, mixed_requests(TINY["vocab_size"], seed=1, stop_token=stop_token)), engine


def test_overlap_is_off_on_the_cpu_by_default(loaded):
    assert not LLMEngine(EngineConfig(num_pages=64), loaded=loaded).overlap


@pytest.mark.parametrize("config", [dict(num_pages=400), dict(num_pages=400, max_num_batched_tokens=16),
                                    dict(num_pages=400, enable_prefix_caching=False)])
def test_overlap_equals_the_plain_loop(loaded, config):
    plain, _ = run(loaded, overlap=False, **config)
    # A stop token that fires mid-stream: request 0's seventh greedy token.
    stop = plain[0][0][6]
    plain, _ = run(loaded, overlap=False, stop_token=stop, **config)
    overlapped, engine = run(loaded, overlap=True, stop_token=stop, **config)
    assert_same_outputs(overlapped, plain, 1e-4)
    assert plain[0][1] == "stop" and len(plain[0][0]) <= 7
    assert plain[4][0] and len(plain[4][0]) == 1 and plain[4][1] == "length"
    assert len(plain[ABORTED_RID][0]) == ABORT_AFTER_TOKENS and plain[ABORTED_RID][1] == "abort"
    assert plain[1][0] != plain[2][0]          # n > 1: the seeds differ
    assert len(plain[6][0]) >= 12              # min_tokens held EOS off
    assert not engine.has_unfinished() and engine.scheduler.pool.num_in_use == 0


def test_overlap_under_preemption_equals_the_plain_loop(loaded):
    # 12 pages of 4 tokens cannot hold the running requests: the newest are preempted and recompute.
    plain, plain_engine = run(loaded, overlap=False, num_pages=40, enable_prefix_caching=False)
    overlapped, engine = run(loaded, overlap=True, num_pages=40, enable_prefix_caching=False)
    assert plain_engine.scheduler.num_preemptions > 0 and engine.scheduler.num_preemptions > 0
    assert_same_outputs(overlapped, plain, 1e-4)


def test_a_request_is_never_computed_past_its_length(loaded):
    """The in-flight token that reaches max_tokens is known to end the request: no step feeds it back."""
    engine = LLMEngine(EngineConfig(page_size=4, num_pages=64), loaded=loaded, overlap=True)
    ends = []
    launch = engine.runner.launch

    def recording_launch(batch, previous=None, **options):
        ends.extend(seq.start + seq.num_tokens for seq in batch.seqs)
        return launch(batch, previous, **options)

    engine.runner.launch = recording_launch
    engine.add_request(0, [5, 6, 7, 8], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    tokens = [t for _ in range(20) if engine.has_unfinished() for out in engine.step() for t in out.new_token_ids]
    assert len(tokens) == 3 and max(ends) == 4 + 3 - 1
