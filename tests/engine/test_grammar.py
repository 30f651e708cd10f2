"""Structured output in the engine: the bitmask ops against plain references, then grammars on the embedded model
(every output valid; greedy rows equal to a hand-masked greedy decode; preemption keeps the grammar's state)."""
from __future__ import annotations

import collections
import ctypes
import json
import random
import re
import threading
from functools import partial

import numpy as np
import pytest
import torch

from minisrv import structured_output
from minisrv.config import EngineConfig
from minisrv.engine.grammar import MaskFiller, bitmask_biases, bitmask_words, grammar_biases, grammar_bitmasks
from minisrv.engine.llm_engine import LLMEngine
from minisrv.llm import LLM
from minisrv.sampling_params import SamplingParams
from minisrv.scheduler.request import Request
from minisrv.tokenizer.loading import load_fast_tokenizer

# Bounded strings and numbers: the grammar itself then ends every output within max_tokens.
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                           "population": {"type": "integer", "minimum": 0, "maximum": 99999999},
                                           "coastal": {"type": "boolean"}},
          "required": ["city", "population", "coastal"], "additionalProperties": False}
PROMPTS = ["The largest city of France, as JSON:", "A city:", "Describe Tokyo in JSON.", "{"]


class AllowedSet:
    """A TokenConstraint allowing a fixed set of tokens, for testing the mask without llguidance."""

    def __init__(self, allowed: set[int]) -> None:
        self.allowed = allowed

    def fill_bitmask(self, address: int, num_bytes: int) -> None:
        words = [0] * (num_bytes // 4)
        for t in self.allowed:
            words[t // 32] |= 1 << (t % 32)
        packed = np.array(words, dtype=np.uint32)   # held while copied: .ctypes.data does not keep it alive
        ctypes.memmove(address, packed.ctypes.data, num_bytes)

    def advance(self, token_id: int) -> bool:
        return False


def test_bitmask_biases_match_bit_arithmetic() -> None:
    rng = random.Random(0)
    vocab = 1000
    words = [[rng.getrandbits(32) for _ in range(bitmask_words(vocab))] for _ in range(3)]
    signed = torch.tensor([[w - (1 << 32) if w >= 1 << 31 else w for w in row] for row in words], dtype=torch.int32)
    expected = torch.tensor([[0.0 if row[t // 32] >> (t % 32) & 1 else float("-inf") for t in range(vocab)]
                             for row in words])
    assert torch.equal(bitmask_biases(signed, vocab), expected)
    assert torch.equal(bitmask_biases(signed[:, ::2], 500, torch.bfloat16), expected[:, [t for t in range(vocab)
                       if t // 32 % 2 == 0]][:, :500].bfloat16())   # a strided view of the words


def test_masks_touch_only_constrained_rows_and_their_disallowed_tokens() -> None:
    rng = random.Random(1)
    vocab = 300
    logits = torch.randn(3, vocab)
    allowed = [set(rng.sample(range(vocab), 40)), None, set(rng.sample(range(vocab), 3))]
    requests = [Request(i, [1], SamplingParams(), 0, grammar=None if a is None else AllowedSet(a))
                for i, a in enumerate(allowed)]
    masked = logits + grammar_biases(logits, requests)
    for row, a in enumerate(allowed):
        expected = logits[row].clone()
        if a is not None:
            expected[[t for t in range(vocab) if t not in a]] = float("-inf")
        assert torch.equal(masked[row], expected)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(dtype="float32", quantization="none")   # one test decodes by hand with transformers' float32 model


def grammar(kind: str, value) -> str:
    return getattr(structured_output, kind)(value, "test").text


def test_json_schema_outputs_are_valid_greedy_and_sampled(llm: LLM) -> None:
    g = grammar("json_schema", SCHEMA)
    params = [SamplingParams(temperature=0.0, max_tokens=80, grammar=g)] + \
             [SamplingParams(temperature=1.0, seed=seed, max_tokens=80, grammar=g) for seed in range(6)]
    outs = llm.generate([PROMPTS[i % len(PROMPTS)] for i in range(len(params))], params)
    for out in outs:
        assert out.finish_reason == "stop", out
        city = json.loads(out.text)
        assert set(city) == {"city", "population", "coastal"} and len(city["city"]) <= 16
        assert isinstance(city["population"], int) and 0 <= city["population"] <= 99999999
        assert isinstance(city["coastal"], bool)


def test_greedy_with_a_grammar_is_the_argmax_of_the_allowed_tokens(llm: LLM) -> None:
    """The engine's constrained greedy decode equals one by hand with transformers' model on the same weights:
    a full forward per token, the grammar's mask, argmax."""
    from llguidance import LLMatcher, LLTokenizer
    from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask
    from transformers import AutoModelForCausalLM

    pattern = r"(red|green|blue)( and (red|green|blue)){0,3}\."
    g = grammar("regex", pattern)
    prompt = "My favourite colours are"
    ours = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, grammar=g))[0]
    loaded = llm.engine.loaded
    vocab = loaded.model_config.vocab_size
    matcher = LLMatcher(LLTokenizer(load_fast_tokenizer(llm.source).to_str(), n_vocab=vocab,
                                    eos_token=loaded.eos_token_ids), g)
    bitmask = allocate_token_bitmask(1, vocab)
    hf = AutoModelForCausalLM.from_pretrained(llm.source.path, dtype=torch.float32).eval()
    ids = llm.tokenizer.encode(prompt, add_special_tokens=False)
    by_hand: list[int] = []
    with torch.inference_mode():
        while not matcher.is_stopped() and len(by_hand) < 24:
            logits = hf(torch.tensor([ids + by_hand])).logits[0, -1, :vocab]
            fill_next_token_bitmask(matcher, bitmask, 0)
            token = int((logits + bitmask_biases(bitmask, vocab)[0]).argmax())
            if token in loaded.eos_token_ids:
                break
            by_hand.append(token)
            assert matcher.consume_token(token)
    assert ours.token_ids == by_hand
    assert re.fullmatch(pattern, ours.text)


@pytest.mark.parametrize("overlap", [False, True])
def test_choices_and_preemption_keep_every_output_valid(llm: LLM, overlap: bool) -> None:
    """A tiny KV pool preempts constrained requests mid-output; each resumes with its grammar state intact, also
    when under overlap scheduling a preempted request's token is still in flight (drawn after the step's masks)."""
    clone = object.__new__(LLM)
    clone.engine = LLMEngine(EngineConfig(page_size=4, num_pages=40, enable_prefix_caching=False),
                             loaded=llm.engine.loaded, load_tokenizer=partial(load_fast_tokenizer, llm.source),
                             overlap=overlap)
    clone.tokenizer, clone._next_rid, clone.source = llm.tokenizer, 0, llm.source
    pattern = r"\[[0-9]{1,3}(, [0-9]{1,3}){3,9}\]"
    params = [SamplingParams(temperature=0.9, seed=s, max_tokens=60, grammar=grammar("regex", pattern))
              for s in range(8)]
    outs = clone.generate(["Ten numbers: " * (1 + i % 3) for i in range(8)], params)
    assert clone.engine.scheduler.num_preemptions > 0
    for out in outs:
        assert out.finish_reason == "stop" and re.fullmatch(pattern, out.text), out


def test_the_mask_thread_fills_what_the_engine_thread_fills(llm: LLM) -> None:
    """MaskFiller (one llguidance call on a worker thread) against grammar_bitmasks (row by row, here): equal masks for
    matchers in many states, rows without a grammar all ones, on a thread other than the caller's; too few
    constrained rows are left to the draw."""
    compiler = LLMEngine(EngineConfig(), loaded=llm.engine.loaded,
                         load_tokenizer=partial(load_fast_tokenizer, llm.source)).grammars
    kinds = [grammar("json_schema", SCHEMA), grammar("regex", r"[a-z]+( [a-z]+){2,6}\."), None]
    texts = ['{"city": "Paris", "population": 2100000, "coastal": false}', "abc def ghi jkl."]
    rng = random.Random(3)
    requests = []
    for i in range(24):
        g = kinds[i % 3] and compiler.compile(kinds[i % 3])
        if g is not None:   # advance it some way into a valid output
            ids = llm.tokenizer.encode(texts[i % 3], add_special_tokens=False)
            for token in ids[: rng.randrange(len(ids))]:
                assert not g.advance(token)
        requests.append(Request(i, [1], SamplingParams(), 0, grammar=g))
    vocab = llm.engine.loaded.model_config.vocab_size
    assert MaskFiller(min_rows=17).start(requests, vocab, torch.device("cpu")) is None   # too few to hand over
    assert MaskFiller(min_rows=0).start(requests[2::3], vocab, torch.device("cpu")) is None   # none with a grammar
    filler = MaskFiller(min_rows=16)
    pending = filler.start(requests, vocab, torch.device("cpu"))
    assert filler._worker.submit(threading.get_ident).result() != threading.get_ident()
    assert torch.equal(pending.result(), grammar_bitmasks(requests, vocab, torch.device("cpu")))
    assert bool((pending.result()[2::3] == -1).all())


def test_overlap_scheduling_gives_the_plain_loops_outputs(llm: LLM) -> None:
    """Overlap draws a constrained step's tokens after recording the previous step, its masks filled on the
    engine thread or the mask thread: same tokens as the plain loop (float32 CPU, exact), for greedy and seeded
    rows, beside unconstrained and penalised ones."""
    def run(overlap: bool, mask_thread_rows: int = 1) -> dict[int, list[int]]:
        engine = LLMEngine(EngineConfig(), loaded=llm.engine.loaded, overlap=overlap,
                           load_tokenizer=partial(load_fast_tokenizer, llm.source))
        engine.runner.mask_filler.min_rows = mask_thread_rows
        kinds = [grammar("json_schema", SCHEMA), grammar("regex", r"[a-z]+( [a-z]+){2,6}\."), None]
        for rid in range(6):
            engine.add_request(rid, llm.tokenizer.encode(PROMPTS[rid % 4], add_special_tokens=False), SamplingParams(
                temperature=0.0 if rid % 2 else 0.9, seed=rid, max_tokens=40, grammar=kinds[rid % 3],
                repetition_penalty=1.2 if rid == 5 else 1.0))
        out: dict[int, list[int]] = {rid: [] for rid in range(6)}
        while engine.has_unfinished():
            for o in engine.step():
                out[o.rid] += o.new_token_ids
        assert (engine.runner.mask_filler._worker is not None) == (overlap and mask_thread_rows == 1)
        return out

    plain = run(overlap=False)
    assert run(overlap=True) == plain
    assert run(overlap=True, mask_thread_rows=1000) == plain


def test_an_engine_without_a_tokenizer_or_with_a_bad_grammar_refuses_the_request(llm: LLM) -> None:
    bare = LLMEngine(EngineConfig(), loaded=llm.engine.loaded)
    with pytest.raises(ValueError, match="grammar: .*tokenizer"):
        bare.add_request(0, [1, 2], SamplingParams(grammar=grammar("regex", "a+")))
    with pytest.raises(ValueError, match="grammar: "):
        llm.engine.add_request(0, [1, 2], SamplingParams(grammar='start: "a" undefined_rule'))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.cuda
@needs_cuda
def test_the_fused_sampler_picks_only_allowed_tokens() -> None:
    """On the GPU the fused kernel takes the masks: greedy rows take the masked argmax, sampled rows only ever an
    allowed token; rows without a grammar are untouched."""
    from minisrv.engine.sampling import FusedSampler
    from minisrv.kernels import select_ops

    rng = random.Random(2)
    vocab, rows = 49152, 12
    sampler = FusedSampler(vocab, [0], "cuda", select_ops("cuda", torch.device("cuda")))
    logits = torch.randn(rows, vocab, device="cuda") * 4
    allowed = [set(rng.sample(range(vocab), rng.choice([1, 7, 500]))) if i % 3 else None for i in range(rows)]
    requests = [Request(i, [1], SamplingParams(temperature=0.0 if i % 2 else 1.0, top_k=50 if i % 4 == 1 else -1),
                        seed=i, grammar=None if a is None else AllowedSet(a)) for i, a in enumerate(allowed)]
    for position in range(4):
        tokens = [r.token_id for r in sampler.launch(logits, requests, [position] * rows).results()]
        for i, (token, a) in enumerate(zip(tokens, allowed)):
            if a is not None:
                assert token in a, (i, token)
                if requests[i].params.temperature == 0.0:
                    assert token == max(a, key=lambda t: float(logits[i, t]))
            elif requests[i].params.temperature == 0.0:
                assert token == int(logits[i].argmax())


def dummy_cuda_engine(**config) -> LLMEngine:
    """smollm2-135m's shapes with dummy weights on CUDA (graphs and overlap on), its byte-level tokenizer."""
    from minisrv.models.source import resolve_source

    engine_config = EngineConfig(model="smollm2-135m", load_format="dummy", device="cuda", max_model_len=512, **config)
    source = resolve_source(engine_config)
    return LLMEngine(engine_config, source, load_tokenizer=partial(load_fast_tokenizer, source))


def run_to_end(engine: LLMEngine) -> tuple[dict[int, list[int]], dict[int, str]]:
    """Each request's output token ids and finish reason, stepping until none is left."""
    outputs: dict[int, list[int]] = collections.defaultdict(list)
    finish = {}
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.rid] += out.new_token_ids
            if out.finished:
                finish[out.rid] = out.finish_reason.api_name
    return outputs, finish


@pytest.mark.cuda
@needs_cuda
def test_graphs_and_overlap_follow_grammars_on_cuda() -> None:
    """A dummy-weight bf16 model with CUDA graphs and overlap scheduling: every constrained output is valid,
    greedy and sampled, beside unconstrained requests in the same batches."""
    engine = dummy_cuda_engine()
    pattern = r"[0-9]{2,5}(,[0-9]{2,5}){2}"
    g = grammar("regex", pattern)
    for rid in range(16):
        constrained = rid % 4 != 3
        engine.add_request(rid, list(b"Numbers: ") + [rid], SamplingParams(
            temperature=0.0 if rid % 2 else 1.0, seed=rid, max_tokens=40, ignore_eos=not constrained,
            grammar=g if constrained else None))
    outputs, finish = run_to_end(engine)
    for rid in range(16):
        ids = outputs[rid]
        if rid % 4 != 3:
            assert finish[rid] == "stop" and re.fullmatch(pattern, bytes(ids).decode()), (rid, ids)
        else:
            assert finish[rid] == "length" and len(ids) == 40


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("grammar_process", ["on", "off"])
def test_preempted_constrained_requests_stay_valid_on_cuda(grammar_process: str) -> None:
    """The GPU's way (graphs, overlap, the grammars in processes of their own or in the engine's) with a KV pool
    too small for the batch: requests are preempted mid-output and recomputed, and every output is still valid."""
    engine = dummy_cuda_engine(page_size=4, num_pages=60, enable_prefix_caching=False,
                               grammar_process=grammar_process)
    assert (engine.runner.grammar_process is not None) == (grammar_process == "on") and engine.overlap
    pattern = r"\[[0-9]{1,3}(, [0-9]{1,3}){3,9}\]"
    g = grammar("regex", pattern)
    for rid in range(12):
        engine.add_request(rid, list(b"Ten numbers: " * (1 + rid % 3)), SamplingParams(
            temperature=0.0 if rid % 2 else 0.9, seed=rid, max_tokens=60, grammar=g))
    outputs, finish = run_to_end(engine)
    assert engine.scheduler.num_preemptions > 0
    for rid in range(12):
        assert finish[rid] == "stop" and re.fullmatch(pattern, bytes(outputs[rid]).decode()), (rid, outputs[rid])


@pytest.mark.cuda
@needs_cuda
def test_the_masked_draw_graph_draws_what_the_launched_kernel_draws() -> None:
    """A decode step with grammars replays its forward's graph, then draws under their masks in a graph of its own
    (ModelRunner.sample_deferred): the same tokens as the sampling kernel launched on that step's logits with the
    same masks and parameters; in a bucket with padding rows, greedy and sampled rows, rows without a grammar."""
    from minisrv.engine.model_runner import ModelRunner
    from minisrv.models.loader import load_model
    from minisrv.scheduler.batch import ScheduledBatch, ScheduledSeq

    config = EngineConfig(model="smollm2-135m", load_format="dummy", device="cuda", max_model_len=512,
                          cuda_graph_max_bs=16)
    runner = ModelRunner(config, load_model(config))
    rng = random.Random(5)
    vocab, rows = runner.model_config.vocab_size, 13
    allowed = [set(rng.sample(range(vocab), rng.choice([1, 7, 500]))) if i % 3 else None for i in range(rows)]
    requests = [Request(i, [rng.randrange(vocab) for _ in range(20)],
                        SamplingParams(temperature=0.0 if i % 2 else 1.0, top_k=50 if i % 4 == 1 else -1), seed=i,
                        grammar=None if a is None else AllowedSet(a)) for i, a in enumerate(allowed)]
    for i, r in enumerate(requests):
        r.pages = list(range(i * 4, i * 4 + 4))
    for r, res in zip(requests, runner.execute(ScheduledBatch([ScheduledSeq(r, 0, 20, True) for r in requests]))):
        r.output_ids.append(res.token_id)
    for _ in range(3):
        step = runner.launch(ScheduledBatch([ScheduledSeq(r, r.num_tokens - 1, 1, True) for r in requests]),
                             defer_sampling=True)
        deferred = step.samples
        assert deferred.bucket == 16
        launched = runner.sampler.launch(deferred.logits, requests, deferred.positions, params=deferred.params)
        expected = [r.token_id for r in launched.results()]
        tokens = [r.token_id for r in runner.collect(step)]
        assert tokens == expected
        for token, a, r in zip(tokens, allowed, requests):
            assert a is None or token in a
            r.output_ids.append(token)


@pytest.mark.cuda
@needs_cuda
def test_the_published_draw_graph_draws_under_the_processes_masks_and_publishes_its_tokens() -> None:
    """With grammar processes a constrained decode step's masked draw is one graph that copies their masks in, draws,
    and copies the tokens back to them (DecodeGraphs.draw_published): each replay draws what the sampling kernel
    draws on the same logits, parameters and masks, and the tokens and the draw's number reach the shared segment."""
    from minisrv.engine.cuda_graph import SAMPLER_ROWS
    from minisrv.models.source import resolve_source

    config = EngineConfig(model="smollm2-135m", load_format="dummy", device="cuda", max_model_len=512,
                          cuda_graph_max_bs=16)
    source = resolve_source(config)
    engine = LLMEngine(config, source, load_tokenizer=partial(load_fast_tokenizer, source))
    runner, graphs = engine.runner, engine.runner.graphs
    process = runner.grammar_process
    assert process is not None and set(graphs.published_draws) == set(graphs.graphs)
    replays = []
    draw_published = graphs.draw_published

    def checked(bucket: int) -> None:
        torch.cuda.synchronize()
        if replays and replays[-1][0] == process._draws:   # the last replay's tokens and number, if last published
            assert int(process._published[0]) == replays[-1][0]
            assert torch.equal(process._tokens[: len(replays[-1][1])], replays[-1][1])
        expected = torch.empty(bucket, dtype=torch.int64, device="cuda")
        runner.sampler.draw(graphs.logits[:bucket], graphs.floats[:, :bucket], graphs.ints[SAMPLER_ROWS, :bucket],
                            out=expected, bitmasks=process.masks[:bucket].cuda())
        draw_published(bucket)
        torch.cuda.synchronize()
        assert torch.equal(graphs.last_tokens[:bucket], expected)
        replays.append((process._draws + 1, expected.cpu()))

    graphs.draw_published = checked
    pattern = r"[0-9]{2,5}(,[0-9]{2,5}){3}"
    g = grammar("regex", pattern)
    outputs: dict[int, list[int]] = {rid: [] for rid in range(11)}
    for rid in outputs:
        engine.add_request(rid, list(b"Numbers: ") + [rid], SamplingParams(
            temperature=0.0 if rid % 2 else 1.0, seed=rid, max_tokens=40, ignore_eos=rid % 5 == 4,
            grammar=None if rid % 5 == 4 else g))
    finish = {}
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.rid] += out.new_token_ids
            finish[out.rid] = out.finish_reason
    assert len(replays) >= 5
    for rid, ids in outputs.items():
        if rid % 5 != 4:
            assert finish[rid].api_name == "stop" and re.fullmatch(pattern, bytes(ids).decode()), (rid, ids)
    process.close()
