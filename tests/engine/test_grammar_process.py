"""The grammar process against the engine's own matchers: the same masks after the same tokens, rows reordered and
requests coming and going; completion and refused tokens flagged at the next fill; no shared memory left behind;
a dead child reported."""
from __future__ import annotations

import os
import random

import pytest
import torch

from minisrv import structured_output
from minisrv.config import EngineConfig
from minisrv.engine.grammar import GrammarCompiler, host_bitmasks
from minisrv.engine.grammar_process import GrammarProcess, GrammarProcessGone
from minisrv.models.source import resolve_source
from minisrv.sampling_params import SamplingParams
from minisrv.scheduler.request import Request, RequestStatus
from minisrv.tokenizer.loading import load_fast_tokenizer

VOCAB, EOS = 49152, [2]
NUMBERS = structured_output.regex(r"([0-9]{1,3}, ){50}", "test").text
OBJECT = structured_output.json_schema({"type": "object", "properties": {"a": {"type": "integer"}},
                                        "required": ["a"], "additionalProperties": False}, "test").text


@pytest.fixture(scope="module")
def tokenizer():
    return load_fast_tokenizer(resolve_source(EngineConfig()))


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(lambda: tokenizer, VOCAB, EOS)


@pytest.fixture(params=[1, 2], ids=["one process", "two processes"])
def process(tokenizer, request):
    grammar_process = GrammarProcess(tokenizer.to_str(), VOCAB, EOS, max_rows=16, processes=request.param)
    yield grammar_process
    grammar_process.close()


def request(rid: int, grammar: str | None, compiler: GrammarCompiler) -> Request:
    return Request(rid=rid, prompt_ids=[1], params=SamplingParams(grammar=grammar), seed=0,
                   grammar=None if grammar is None else compiler.compile(grammar), status=RequestStatus.RUNNING)


def allowed_tokens(mask_row: torch.Tensor) -> list[int]:
    bits = (mask_row.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.view(-1).nonzero().squeeze(1).tolist()


def test_masks_follow_the_engine_matchers(process, compiler):
    rng = random.Random(0)
    requests = [request(i, [NUMBERS, None, OBJECT][i % 3], compiler) for i in range(9)]
    for step in range(25):
        live = [r for r in requests if not r.finished]
        batch = rng.sample(live, rng.randint(1, len(live)))   # rows in another order every step
        filled = process.fill(batch).result()
        expected = host_bitmasks(batch, VOCAB, torch.device("cpu"))
        if expected is None:   # no row with a grammar: every row allows everything
            expected = torch.full_like(filled.masks, -1)
        assert torch.equal(filled.masks, expected), step
        assert filled.completed == []
        for row, req in enumerate(batch):   # each constrained request takes an allowed token
            if req.grammar is not None:
                token = rng.choice([t for t in allowed_tokens(expected[row]) if t not in EOS])
                req.output_ids.append(token)
                if req.grammar.advance(token):   # complete: the engine finishes it (tested below)
                    req.status = RequestStatus.FINISHED
        if step == 10:   # one finishes, another arrives
            requests[1].status = RequestStatus.FINISHED
            requests = requests[2:] + [request(100, NUMBERS, compiler)]


def test_completion_and_refused_tokens_are_flagged_at_the_next_fill(process, compiler, tokenizer):
    done = request(1, structured_output.regex("yes", "test").text, compiler)
    wrong = request(2, NUMBERS, compiler)
    plain = request(3, NUMBERS, compiler)
    assert process.fill([done, wrong, plain]).result().completed == []
    done.output_ids += tokenizer.encode("yes", add_special_tokens=False).ids
    wrong.output_ids.append(tokenizer.encode("x", add_special_tokens=False).ids[0])
    filled = process.fill([plain, wrong, done]).result()
    assert sorted(filled.completed) == [1, 2] and filled.refused == [2]


def test_a_grammar_whose_mask_fails_is_flagged_refused_with_its_mask(compiler, tokenizer):
    """llguidance's lexer has limits: past them the mask allows only an end, and the row is flagged at once. One
    process, so that both requests meet the same matchers."""
    heavy = structured_output.regex("(b{1000}){1000}", "test").text
    process = GrammarProcess(tokenizer.to_str(), VOCAB, EOS, max_rows=16, processes=1)
    try:
        first = request(1, heavy, compiler)
        assert process.fill([first]).result().refused == []
        first.output_ids += tokenizer.encode("bb", add_special_tokens=False).ids   # the only token its mask allows
        assert process.fill([first]).result().refused == [1]
        # The regex's lexer states are shared with later requests of it, whose first mask then fails.
        filled = process.fill([request(2, heavy, compiler)]).result()
        assert filled.refused == [2] and allowed_tokens(filled.masks[0]) == EOS
    finally:
        process.close()


def test_a_drawn_token_is_taken_from_the_published_draw(process, compiler, tokenizer):
    """Under overlap a step's masks are asked for before the last step's tokens are recorded: each row names its
    token's row in the published draw, after the tokens it recorded since the last fill."""
    rng = random.Random(1)
    requests = [request(i, NUMBERS, compiler) for i in range(5)]
    process.fill(requests).result()
    for step in range(6):
        expected = host_bitmasks(requests, VOCAB, torch.device("cpu"))
        last_tokens = torch.tensor([rng.choice([t for t in allowed_tokens(row) if t not in EOS])
                                    for row in expected], dtype=torch.int64)
        if step == 3:   # one request's token was recorded before this fill: taken from its output instead
            requests[0].output_ids.append(int(last_tokens[0]))
        draw = process.publish(last_tokens)
        order = requests[::-1] if step % 2 else requests
        filled = process.fill(order, {r.rid: r.rid for r in requests[step == 3:]}, draw).result()
        for req in requests:   # the engine records them after
            if not (step == 3 and req.rid == 0):
                req.output_ids.append(int(last_tokens[req.rid]))
            req.grammar.advance(int(last_tokens[req.rid]))
        assert torch.equal(filled.masks, host_bitmasks(order, VOCAB, torch.device("cpu"))), step
    with pytest.raises(RuntimeError, match="not recorded"):   # a drawn token the engine then lost
        process.fill(requests, {0: 0}, process.publish(last_tokens)).result()
        process.fill(requests).result()
    with pytest.raises(RuntimeError, match="no draw was published"):
        process.fill([request(50, NUMBERS, compiler)], {50: 0})


def test_a_new_request_catches_up_with_its_output(process, compiler, tokenizer):
    late = request(1, NUMBERS, compiler)
    for token in tokenizer.encode("12, 7", add_special_tokens=False).ids:
        late.output_ids.append(token)
        late.grammar.advance(token)
    filled = process.fill([late]).result()
    assert torch.equal(filled.masks, host_bitmasks([late], VOCAB, torch.device("cpu")))


def test_nothing_is_left_in_dev_shm_and_a_dead_child_is_reported(tokenizer, compiler):
    shm_names = (lambda: set(os.listdir("/dev/shm"))) if os.path.isdir("/dev/shm") else set
    before = shm_names()
    grammar_process = GrammarProcess(tokenizer.to_str(), VOCAB, EOS, max_rows=4, processes=2)
    try:
        assert not shm_names() - before   # unlinked once the processes have it mapped
        requests = [request(1, NUMBERS, compiler), request(2, NUMBERS, compiler)]   # one in each process
        grammar_process.fill(requests).result()
        grammar_process._processes[1].kill()
        grammar_process._processes[1].join()
        with pytest.raises((GrammarProcessGone, OSError)):
            grammar_process.fill(requests).result()
    finally:
        grammar_process.close()


SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                           "coastal": {"type": "boolean"}},
          "required": ["city", "coastal"], "additionalProperties": False}
PROMPTS = ["The largest city of France, as JSON:", "A city:", "Describe Tokyo in JSON.", "{"]


@pytest.fixture(scope="module")
def llm():
    from minisrv.llm import LLM

    return LLM(dtype="float32", quantization="none")


def test_the_engine_gives_the_same_outputs_with_the_grammars_in_a_process(llm, capfd):
    """Greedy and seeded rows, beside unconstrained and penalised ones, in the plain loop and under overlap: the
    same tokens and finish reasons as with the matchers in the engine's process, though a grammar's completion
    is learnt a step later there (the sample drawn after it is dropped)."""
    from minisrv.engine.llm_engine import LLMEngine

    kinds = [structured_output.json_schema(SCHEMA, "test").text,
             structured_output.regex(r"[a-z]+( [a-z]+){2,6}\.", "test").text, None]

    def run(grammar_process: str, overlap: bool) -> dict[int, tuple[list[int], str]]:
        engine = LLMEngine(EngineConfig(grammar_process=grammar_process), loaded=llm.engine.loaded, overlap=overlap,
                           load_tokenizer=lambda: load_fast_tokenizer(llm.source))
        assert (engine.runner.grammar_process is not None) == (grammar_process == "on")
        draws_read: list[int] = []
        if engine.runner.grammar_process is not None:
            fill = engine.runner.grammar_process.fill
            engine.runner.grammar_process.fill = lambda *a: draws_read.append(a[2] if len(a) > 2 else 0) or fill(*a)
        for rid in range(6):
            engine.add_request(rid, llm.tokenizer.encode(PROMPTS[rid % 4], add_special_tokens=False), SamplingParams(
                temperature=0.0 if rid % 2 else 0.9, seed=rid, max_tokens=40, grammar=kinds[rid % 3],
                repetition_penalty=1.2 if rid == 5 else 1.0))
        tokens: dict[int, list[int]] = {rid: [] for rid in range(6)}
        reasons: dict[int, str] = {}
        while engine.has_unfinished():
            for out in engine.step():
                tokens[out.rid] += out.new_token_ids
                if out.finished:
                    reasons[out.rid] = out.finish_reason.name
        if engine.runner.grammar_process is not None:
            # under overlap, the masks were filled from the drawn tokens while the steps ran
            assert any(draw for draw in draws_read) == overlap
            engine.runner.grammar_process.close()
        return {rid: (tokens[rid], reasons[rid]) for rid in range(6)}

    in_process = run("off", overlap=False)
    assert any(reason == "STOP" for _, reason in in_process.values())   # some grammar completes
    assert run("on", overlap=False) == in_process
    assert run("on", overlap=True) == in_process
    assert "refused" not in capfd.readouterr().err   # no token a grammar refused, not even one drawn past its end


def test_a_process_that_cannot_start_is_reported_and_leaves_nothing():
    shm_names = (lambda: set(os.listdir("/dev/shm"))) if os.path.isdir("/dev/shm") else set
    before = shm_names()
    with pytest.raises(GrammarProcessGone, match="did not start"):
        GrammarProcess("not a tokenizer", VOCAB, EOS, max_rows=4)   # the child fails to build its tokenizer
    assert not shm_names() - before
