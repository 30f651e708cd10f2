"""Tensor parallelism on the CPU (gloo, 2 ranks): the same tokens as one rank, and ranks that cannot diverge."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import numpy as np
import pytest

from minisrv.llm import LLM
from minisrv.runtime.channels import RingChannels
from minisrv.runtime.tensor_parallel import FollowerLoop, RankDiverged, step_digest
from minisrv.sampling_params import SamplingParams
from minisrv.scheduler.request import RequestOutput
from minisrv.wire.records import Abort, Shutdown, Step, TokenizedRequest
from minisrv.wire.terms import FinishReason
from tests.faults.harness import Server
from tests.server.live_server import free_port

PROMPTS = ["The capital of France is", "Write a haiku about the sea:", "def fibonacci(n):",
           "A long prompt, prefilled in several chunks: " + "one two three four five six seven " * 40]
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
# Token-for-token comparisons run float32 weights and activations: int4's sums depend on the kernel's thread
# count (the ranks share the cores) and on where the shards cut the rows; bfloat16 (the default where the CPU
# multiplies it) rounds.
FLOAT32_ARGS = {"dtype": "float32", "quantization": "none"}
FLOAT32 = tuple(arg for name, value in FLOAT32_ARGS.items() for arg in (f"--{name}", value))


@pytest.fixture(scope="module")
def one_rank() -> list[list[int]]:
    llm = LLM(device="cpu", max_num_batched_tokens=128, max_model_len=1024, **FLOAT32_ARGS)
    return [out.token_ids for out in llm.generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("speculative", [None, '{"method": "ngram", "num_speculative_tokens": 3}'],
                         ids=["plain", "drafting"])
def test_two_ranks_generate_what_one_does(one_rank: list[list[int]], speculative: str | None) -> None:
    """The embedded model split over two gloo ranks (uneven: 9 heads, 3 KV heads), prompts chunked over steps;
    with drafts too, which every rank proposes alike from the same tokens."""
    llm = LLM(device="cpu", tp_size=2, max_num_batched_tokens=128, max_model_len=1024, speculative_config=speculative,
              **FLOAT32_ARGS)
    try:
        assert [out.token_ids for out in llm.generate(PROMPTS, GREEDY)] == one_rank
        # Sampled, seeded requests. Rank 1 checks every step's digest (the batch scheduled, the tokens drawn)
        # against rank 0's and exits on a difference: alive at the end means every batch was the same.
        sampled = llm.generate(PROMPTS, SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=16))
        assert all(len(out.token_ids) >= 1 for out in sampled)
        assert [p.is_alive() for p in llm._ranks.processes] == [True]
        assert (llm.engine.engine.scheduler.num_accepted_tokens > 0) == bool(speculative)
    finally:
        llm.close()


def test_two_ranks_in_int4_stay_in_step() -> None:
    """The default on this model, int4, each rank quantizing its own shards: every step's batch and tokens agree
    between the ranks (rank 1 exits on a difference), and the text is the model's (it knows Paris)."""
    llm = LLM(device="cpu", tp_size=2, max_model_len=1024)
    try:
        assert llm.engine.engine.runner.quantization == "int4"   # rank 0's engine behind the leader
        outs = llm.generate(PROMPTS, SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=16))
        assert all(len(out.token_ids) >= 1 for out in outs)
        greedy = llm.generate(PROMPTS[:1], GREEDY)[0].text
        assert "Paris" in greedy, greedy
        assert [p.is_alive() for p in llm._ranks.processes] == [True]
    finally:
        llm.close()


def test_a_served_two_rank_model_answers_like_one_rank(one_rank: list[list[int]]) -> None:
    server = Server("--tp-size", "2", "--device", "cpu", "--max-num-batched-tokens", "128", *FLOAT32)
    try:
        assert "scheduler-1" in server.log()
        llm_tokens = LLM(device="cpu").tokenizer
        for prompt, expected in zip(PROMPTS[:2], one_rank):
            ids = llm_tokens.encode(prompt, add_special_tokens=False)
            body = {"prompt": ids, "max_tokens": 32, "temperature": 0, "ignore_eos": True, "logprobs": 0}
            reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
            assert reply["choices"][0]["text"] == llm_tokens.decode(expected, skip_special_tokens=True), reply
    finally:
        server.close()


def _one_token(rid: int) -> RequestOutput:
    return RequestOutput(rid=rid, new_token_ids=[42], new_samples=[], finish_reason=FinishReason.NONE,
                         num_prompt_tokens=2, num_cached_tokens=0, num_output_tokens=1)


def test_ranks_on_two_nodes_serve_like_one_rank(one_rank: list[list[int]]) -> None:
    """`--nnodes 2` on one host: node 1 runs rank 1 alone and gets rank 0's records over gloo; it leaves with
    node 0 (exit 0)."""
    address = f"127.0.0.1:{free_port()}"
    nodes = ["--device", "cpu", "--tp-size", "2", "--nnodes", "2", "--dist-init-addr", address,
             "--max-num-batched-tokens", "128", "--max-model-len", "1024", *FLOAT32]
    node1 = subprocess.Popen([sys.executable, "-m", "minisrv.cli", "serve", *nodes, "--node-rank", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = None
    try:
        server = Server(*nodes)
        ids = LLM(device="cpu").tokenizer.encode(PROMPTS[3], add_special_tokens=False)
        body = {"prompt": ids, "max_tokens": 32, "temperature": 0, "ignore_eos": True}
        reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
        assert reply["choices"][0]["text"] == LLM(device="cpu").tokenizer.decode(one_rank[3], skip_special_tokens=True), reply
        server.process.send_signal(signal.SIGINT)
        assert server.wait_exit() == 0
        assert node1.wait(10) == 0, node1.stdout.read()
        assert "node 1 of 2: ranks 1" in node1.stdout.read()
    finally:
        node1.kill()
        if server is not None:
            server.close()


def test_nodes_started_with_different_engine_flags_refuse_to_start() -> None:
    address = f"127.0.0.1:{free_port()}"
    nodes = ["--device", "cpu", "--tp-size", "2", "--nnodes", "2", "--dist-init-addr", address]
    node1 = subprocess.Popen([sys.executable, "-m", "minisrv.cli", "serve", *nodes, "--node-rank", "1",
                              "--max-num-batched-tokens", "128"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        node0 = subprocess.run([sys.executable, "-m", "minisrv.cli", "serve", *nodes, "--port", str(free_port())],
                               capture_output=True, text=True, timeout=120)
        assert node0.returncode != 0
        assert ("max_num_batched_tokens (--max-num-batched-tokens): rank 0 has 2048, rank 1 has 128; every node "
                "must be started with the same engine flags") in node0.stderr, node0.stderr
        assert node1.wait(30) != 0
    finally:
        node1.kill()


class RecordingEngine:
    """Stands in for a rank's LLMEngine: records the calls, answers each step with one token."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.last_batch = None

    def add_request(self, rid: int, prompt_ids: list[int], params: SamplingParams, priority: int = 0) -> None:
        self.calls.append(("add", rid, prompt_ids, priority))

    def abort(self, rid: int) -> None:
        self.calls.append(("abort", rid))

    def step(self) -> list[RequestOutput]:
        self.calls.append(("step",))
        return [_one_token(1)]


def _follow(records: list) -> RecordingEngine:
    channels = RingChannels()
    try:
        ends = channels.create("tp", 1 << 16)
        leader = ends.producer.open()
        loop = FollowerLoop(ends.reader, None, "scheduler-1")
        loop.engine = engine = RecordingEngine()
        leader.send_many(records)
        try:
            loop.run()
        finally:
            loop.close()
            leader.close()
    finally:
        channels.unlink()
    return engine


def test_a_follower_applies_rank_0s_records_in_order() -> None:
    one_token = step_digest(RecordingEngine(), [_one_token(1)])
    engine = _follow([TokenizedRequest(1, SamplingParams(), np.array([5, 6], dtype=np.int32), priority=-3), Step(0),
                      Abort(1), Step(one_token), Shutdown()])
    assert engine.calls == [("add", 1, [5, 6], -3), ("step",), ("abort", 1), ("step",)]   # queued as rank 0 does


def test_a_follower_whose_results_differ_from_rank_0s_stops() -> None:
    with pytest.raises(RankDiverged, match="scheduler-1: its step results differ from rank 0's"):
        _follow([Step(0), Step(12345), Shutdown()])


def _two_gpus() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


GPU_MODEL = dict(model="llama-3.2-1b", load_format="dummy", device="cuda", max_model_len=512)
GPU_PROMPTS = [[(7 * i + 3 * j) % 250 for j in range(5 + 9 * i)] for i in range(6)]


def _generate_on_gpus(params: SamplingParams, prompts: list[list[int]] = GPU_PROMPTS, **engine_args):
    import torch

    llm = LLM(**GPU_MODEL, **engine_args)
    try:
        return llm.generate(prompts, params)
    finally:
        llm.close()
        del llm
        torch.cuda.empty_cache()


@pytest.mark.cuda
@pytest.mark.skipif(not _two_gpus(), reason="needs two CUDA devices")
def test_two_gpus_compute_what_one_does_in_float32() -> None:
    """llama-3.2-1b (dummy weights), float32, NCCL: the same greedy tokens and their logprobs within tolerance."""
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)
    one = _generate_on_gpus(params, dtype="float32")
    two = _generate_on_gpus(params, dtype="float32", tp_size=2)
    for a, b in zip(one, two):
        assert a.token_ids == b.token_ids
        assert [s.logprob for s in b.logprobs] == pytest.approx([s.logprob for s in a.logprobs], abs=2e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not _two_gpus(), reason="needs two CUDA devices")
def test_two_gpus_with_cuda_graphs_and_the_one_shot_all_reduce_match_eager_nccl_in_bfloat16() -> None:
    """bfloat16: the decode graphs (all-reduces captured inside) with the one-shot all-reduce give the very tokens
    and logprobs of eager steps through NCCL; against one GPU, logprobs within bfloat16's rounding of the
    partial sums (near ties may then flip a token, so tokens are not compared there)."""
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
    one = _generate_on_gpus(params)
    fast = _generate_on_gpus(params, tp_size=2)
    plain = _generate_on_gpus(params, tp_size=2, enable_cuda_graph=False, custom_all_reduce=False)
    for a, b in zip(fast, plain):
        assert a.token_ids == b.token_ids
        assert [s.logprob for s in a.logprobs] == [s.logprob for s in b.logprobs]
    first = [out.logprobs[0].logprob for out in one]
    assert [out.logprobs[0].logprob for out in fast] == pytest.approx(first, abs=0.15)


@pytest.mark.cuda
@pytest.mark.skipif(not _two_gpus(), reason="needs two CUDA devices")
def test_two_nodes_with_one_gpu_each_serve_what_two_local_ranks_compute(monkeypatch) -> None:
    """`--nnodes 2` simulated on one host, each "node" seeing one GPU: rank 1 gets rank 0's records over gloo
    and the logprobs of a greedy completion are those of the same two ranks run by the offline LLM (on the
    same prompt alone: batched with others, bfloat16 GEMMs round differently)."""
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
    [expected] = _generate_on_gpus(params, [GPU_PROMPTS[3]], tp_size=2, custom_all_reduce=False)
    address = f"127.0.0.1:{free_port()}"
    nodes = ["--model", "llama-3.2-1b", "--load-format", "dummy", "--tp-size", "2", "--nnodes", "2",
             "--dist-init-addr", address, "--max-model-len", "512"]
    node1 = subprocess.Popen([sys.executable, "-m", "minisrv.cli", "serve", *nodes, "--node-rank", "1"],
                             env={**os.environ, "CUDA_VISIBLE_DEVICES": "1"}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    server = None
    try:
        server = Server(*nodes)
        body = {"prompt": GPU_PROMPTS[3], "max_tokens": 8, "temperature": 0, "ignore_eos": True, "logprobs": 0}
        reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120).json()
        served = reply["choices"][0]["logprobs"]["token_logprobs"]
        assert served == pytest.approx([s.logprob for s in expected.logprobs], abs=1e-3), reply
        server.process.send_signal(signal.SIGINT)
        assert server.wait_exit() == 0
        assert node1.wait(30) == 0, node1.stdout.read()
    finally:
        node1.kill()
        if server is not None:
            server.close()
