"""Decode steps replayed as CUDA graphs against the same steps run eagerly, and overlap scheduling on the GPU.

Dummy-weight presets in bfloat16 (head sizes 64 and 128). Where a batch fills its bucket, the graph runs the very
kernels the eager step runs on the same shapes, so logits must be bitwise equal; a padded bucket runs the
matmuls on more rows, which may round differently: logits within bfloat16 tolerance, greedy tokens equal
wherever the top two logits are further apart than that.
"""
from __future__ import annotations

import random

import pytest
import torch

from minisrv.config import EngineConfig
from minisrv.engine.cuda_graph import INT_ROWS, PADDING, graph_buckets
from minisrv.engine.llm_engine import LLMEngine
from minisrv.engine.model_runner import ModelRunner
from minisrv.layers.forward_context import ForwardContext, forward_context
from minisrv.models.loader import LoadedModel, load_model
from minisrv.sampling_params import SamplingParams
from minisrv.scheduler.batch import ScheduledBatch, ScheduledSeq
from minisrv.scheduler.request import Request
from tests.engine.mixed_workload import ABORT_AFTER_TOKENS, generate, mixed_requests

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

LOGIT_TOLERANCE = 0.25   # bfloat16 logits of spread ~3 after 30 layers: a few ulps of the largest
RESCORE_TOLERANCE = 0.5  # a prefill scores with other attention kernels (tests/engine/test_engine_on_device.py's)
MAX_BS = 64


def config(**overrides) -> EngineConfig:
    return EngineConfig(**{**dict(model="smollm2-135m", load_format="dummy", device="cuda", max_model_len=2048,
                                  num_pages=4096, cuda_graph_max_bs=MAX_BS, max_running_requests=MAX_BS),
                           **overrides})


@pytest.fixture(scope="module", params=["smollm2-135m", "qwen3-0.6b"])
def loaded(request) -> LoadedModel:
    return load_model(config(model=request.param))


def eager_logits(runner: ModelRunner, batch: ScheduledBatch) -> torch.Tensor:
    step = runner.prepare(batch)
    with torch.inference_mode(), forward_context(ForwardContext(step.attn)):
        hidden = runner.model(step.input_ids, step.positions)
        return runner.model.compute_logits(hidden.index_select(0, step.sample_rows))


def test_buckets_and_capture_report(loaded):
    runner = ModelRunner(config(model=loaded.name), loaded)
    assert runner.graphs is not None and runner.graphs.buckets == graph_buckets(MAX_BS)
    assert set(runner.graphs.graphs) == set(graph_buckets(MAX_BS))
    assert runner.graph_capture_seconds > 0 and runner.graph_memory_bytes > 0
    print(f"{loaded.name}: {len(runner.graphs.buckets)} graphs in {runner.graph_capture_seconds:.2f} s, "
          f"{runner.graph_memory_bytes / 2**20:.0f} MiB")


def test_graph_replay_equals_eager_for_every_bucket(loaded):
    runner = ModelRunner(config(model=loaded.name), loaded)
    rng = random.Random(3)
    vocab = loaded.model_config.vocab_size
    sizes = sorted(set(runner.graphs.buckets) | {b - 1 for b in runner.graphs.buckets if b > 2} | {3, 13})
    for size in sizes:
        requests = [Request(rid=i, prompt_ids=[rng.randrange(vocab) for _ in range(rng.randint(1, 600))],
                            params=SamplingParams(temperature=0.0), seed=i) for i in range(size)]
        for i, r in enumerate(requests):
            r.pages = list(range(i * 40, i * 40 + 40))
        prefill = runner.execute(ScheduledBatch([ScheduledSeq(r, 0, len(r.prompt_ids), True) for r in requests]))
        for r, res in zip(requests, prefill):
            r.output_ids.append(res.token_id)
        batch = ScheduledBatch([ScheduledSeq(r, r.num_tokens - 1, 1, True) for r in requests])
        bucket = runner.graphs.bucket(size)
        launched = runner.launch(batch)
        graph = runner.graphs.logits[:size].clone()
        tokens = [res.token_id for res in runner.collect(launched)]
        eager = eager_logits(runner, batch)
        if bucket == size:
            assert torch.equal(graph, eager), f"batch {size}"
        top2 = eager.topk(2, dim=-1).values
        separated = (top2[:, 0] - top2[:, 1]) > 2 * LOGIT_TOLERANCE
        assert (graph - eager).abs().max().item() <= LOGIT_TOLERANCE, f"batch {size} in bucket {bucket}"
        assert (torch.tensor(tokens, device="cuda") == eager.argmax(-1))[separated].all(), f"batch {size}"


def test_the_inputs_of_consecutive_steps_take_turns_in_two_pinned_buffers(loaded):
    """A step's inputs are written while the copies of the step before may still wait on the device: host_inputs
    alternates two pinned buffers, and before writing one it waits for the copies queued from it."""
    runner = ModelRunner(config(model=loaded.name), loaded)
    graphs, rng = runner.graphs, random.Random(5)
    # Rows that store, read and attend to nothing (slot -1, length 0, no token in flight), real in every other field.
    rows = {name: [rng.randrange(1, 1000) for _ in range(3)] for name in INT_ROWS}
    rows |= dict(slots=[-1] * 3, seq_lens=[0] * 3, prev_rows=[-1] * 3)
    floats = [[rng.random() for _ in range(3)] for _ in range(3)]
    first = graphs.host_inputs(4, rows, floats, [[7], [8, 9], [10]])
    assert first.ints.is_pinned() and first.floats.is_pinned() and first.page_table.is_pinned()
    assert first.ints.tolist() == [rows[name] + [PADDING[name]] for name in INT_ROWS]
    assert first.floats.tolist() == [torch.tensor(row + [0.0]).tolist() for row in floats]
    assert first.page_table.tolist() == [[7, 0], [8, 9], [10, 0], [0, 0]]
    torch.cuda._sleep(200_000_000)   # the copies queued next wait behind this (~0.1 s) on the stream
    graphs.run(first)
    second = graphs.host_inputs(4, rows, floats, [[1]] * 3)
    assert second.ints.data_ptr() != first.ints.data_ptr() and not first.copied.query()
    third = graphs.host_inputs(4, rows, floats, [[2]] * 3)
    assert third.ints.data_ptr() == first.ints.data_ptr() and first.copied.query()
    torch.cuda.synchronize()
    assert graphs.page_table[:4, :2].tolist() == [[7, 0], [8, 9], [10, 0], [0, 0]]   # what was copied is first's


def test_a_deferred_step_replays_only_its_forward_and_draws_the_same_tokens_later(loaded):
    """A step that draws later (grammars, penalties) replays the forward graph but not the draw graph; drawn
    afterwards, its tokens are those a step drawing at once gets, for seeded random sampling too."""
    runner = ModelRunner(config(model=loaded.name), loaded)
    rng = random.Random(4)
    vocab = loaded.model_config.vocab_size
    requests = [Request(rid=i, prompt_ids=[rng.randrange(vocab) for _ in range(rng.randint(5, 90))],
                        params=SamplingParams(temperature=0.9, top_p=0.95), seed=50 + i) for i in range(13)]
    for i, r in enumerate(requests):
        r.pages = list(range(i * 8, i * 8 + 8))
    for r, res in zip(requests, runner.execute(ScheduledBatch([ScheduledSeq(r, 0, len(r.prompt_ids), True)
                                                               for r in requests]))):
        r.output_ids.append(res.token_id)
    batch = ScheduledBatch([ScheduledSeq(r, r.num_tokens - 1, 1, True) for r in requests])
    drawn = [res.token_id for res in runner.collect(runner.launch(batch))]
    runner.last_tokens.fill_(-1)
    deferred = runner.launch(batch, defer_sampling=True)
    assert deferred.samples.bucket == runner.graphs.bucket(len(requests))
    assert (runner.last_tokens[: len(requests)] == -1).all()   # the forward left the draw to later
    assert [res.token_id for res in runner.collect(deferred)] == drawn


def sampled_requests(n: int, vocab: int) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(9)
    kinds = [dict(temperature=0.8, top_p=0.9, top_k=50), dict(temperature=1.0), dict(temperature=0.7, min_p=0.05),
             dict(temperature=0.0)]
    return [([rng.randrange(vocab) for _ in range(30)],
             SamplingParams(**kinds[i % len(kinds)], seed=100 + i, max_tokens=40, ignore_eos=True)) for i in range(n)]


def run_all(engine: LLMEngine, requests) -> dict[int, list[int]]:
    for rid, (prompt, params) in enumerate(requests):
        engine.add_request(rid, prompt, params)
    out: dict[int, list[int]] = {rid: [] for rid in range(len(requests))}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.rid] += o.new_token_ids
    return out


@pytest.mark.parametrize("batch", [1, 8])
def test_seeded_sampling_gives_the_same_tokens_with_graphs_on_and_off(loaded, batch):
    """Every decode batch fills its bucket (same prompt lengths and max_tokens), so the tokens are equal."""
    requests = sampled_requests(batch, loaded.model_config.vocab_size)
    on = LLMEngine(config(model=loaded.name), loaded=loaded)
    assert on.runner.graphs is not None and on.overlap
    with_graphs = run_all(on, requests)
    off = LLMEngine(config(model=loaded.name, enable_cuda_graph=False, overlap_schedule=False), loaded=loaded)
    assert off.runner.graphs is None and not off.overlap
    assert run_all(off, requests) == with_graphs


def rescored_deficits(runner: ModelRunner, prompt: list[int], output: list[int]) -> torch.Tensor:
    """Teacher-forced: for each output token, the best logit minus its logit, from one eager prefill of it all."""
    request = Request(rid=0, prompt_ids=prompt + output, params=SamplingParams(), seed=0)
    request.pages = list(range(-(-len(request.prompt_ids) // runner.page_size)))
    step = runner.prepare(ScheduledBatch([ScheduledSeq(request, 0, len(request.prompt_ids), True)]))
    with torch.inference_mode(), forward_context(ForwardContext(step.attn)):
        hidden = runner.model(step.input_ids, step.positions)[len(prompt) - 1: -1]
        logits = runner.model.compute_logits(hidden)
    chosen = logits.gather(1, torch.tensor(output, device=logits.device)[:, None])[:, 0]
    return logits.max(dim=1).values - chosen


@pytest.mark.parametrize("settings", [dict(), dict(max_num_batched_tokens=24), dict(num_pages=60, page_size=4,
                                                                                   enable_prefix_caching=False)])
def test_overlap_with_graphs_on_a_mixed_workload(loaded, settings):
    """Stop tokens, an abort, n > 1, max_tokens of 1, penalties, logprobs; chunked prefill; preemption.

    Token-for-token equality with the plain loop is proven exactly on the CPU (tests/engine/test_overlap.py); here
    batch shapes differ between the two loops (a row computed for a request its last token stopped), and bfloat16
    matmuls of other shapes may round differently, so what must hold is: the same ends (finish reasons, lengths
    set by max_tokens, the abort), and every greedy token the model's best choice within tolerance when its
    whole sequence is scored again in one eager pass.
    """
    vocab = loaded.model_config.vocab_size
    first = generate(LLMEngine(config(model=loaded.name, overlap_schedule=False, **settings), loaded=loaded),
                     mixed_requests(vocab, seed=4))
    stop = first[0][0][6]
    requests = mixed_requests(vocab, seed=4, stop_token=stop)
    plain = generate(LLMEngine(config(model=loaded.name, overlap_schedule=False, **settings), loaded=loaded), requests)
    engine = LLMEngine(config(model=loaded.name, **settings), loaded=loaded)
    assert engine.overlap and engine.runner.graphs is not None
    overlapped = generate(engine, requests)
    if "num_pages" in settings:
        assert engine.scheduler.num_preemptions > 0
    assert not engine.has_unfinished() and engine.scheduler.pool.num_in_use == 0
    same = sum(overlapped[rid][0] == plain[rid][0] for rid in plain)
    print(f"{loaded.name} {settings}: {same} of {len(plain)} requests token for token equal to the plain loop")
    eager = ModelRunner(config(model=loaded.name, enable_cuda_graph=False), loaded)
    for rid, (prompt, params) in enumerate(requests):
        tokens, finish, _ = overlapped[rid]
        assert finish == plain[rid][1], rid
        if finish == "length":
            assert len(tokens) == params.max_tokens, rid
        if finish == "stop":
            assert tokens[-1] in {stop, *loaded.eos_token_ids} and len(tokens) >= params.min_tokens, rid
        if finish == "abort":
            assert len(tokens) == ABORT_AFTER_TOKENS, rid
        if params.temperature == 0.0 and params.repetition_penalty == 1.0:
            assert rescored_deficits(eager, prompt, tokens).max().item() <= RESCORE_TOLERANCE, rid
