"""The detokenizer's per-choice state machine, fed STEP_TOKENS records as the scheduler would send them."""
from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
from tokenizers import Tokenizer

from minisrv.tokenizer.detokenizer import Detokenizer
from minisrv.wire.records import DetokenizeRequest, StepTokens, TextDeltas
from minisrv.wire.terms import FinishReason, api_base_ids, api_server_of, choice_rid
from tests.conftest import random_text


def step(rows: list[tuple[int, int, int]], prompt: int = 7, logprobs: dict[int, tuple[float, list[int]]] | None = None,
         emitted_ns: int = 0) -> StepTokens:
    """rows: (rid, token id, finish); logprobs: rid -> (logprob, alternative ids)."""
    logprobs = logprobs or {}
    lps = [logprobs[r][0] if r in logprobs else math.nan for r, _, _ in rows]
    tops = [logprobs[r][1] if r in logprobs else [] for r, _, _ in rows]
    return StepTokens(
        rids=[r for r, _, _ in rows], token_ids=[t for _, t, _ in rows], finish_reasons=[f for _, _, f in rows],
        num_prompt_tokens=[prompt] * len(rows), num_cached_tokens=[3] * len(rows), num_output_tokens=[1] * len(rows),
        logprobs=lps, top_counts=[len(t) for t in tops], top_ids=[i for t in tops for i in t],
        top_logprobs=[-1.5 - k for t in tops for k in range(len(t))], emitted_ns=emitted_ns,
        in_prompt=[False] * len(rows), ranks=[0] * len(rows))


def run(detok: Detokenizer, steps: list[StepTokens]) -> tuple[list[TextDeltas], list[int]]:
    texts, stopped = [], []
    for tokens in steps:
        batch = TextDeltas()
        stopped += detok.process(StepTokens.decode(tokens.encode()), [batch])
        if batch.rids:
            texts.append(TextDeltas.decode(batch.encode()))
    return texts, stopped


def joined(texts: list[TextDeltas], rid: int) -> str:
    return "".join(t for text in texts for r, t in zip(text.rids.tolist(), text.texts) if r == rid)


def test_choices_stream_independently_to_their_finish(byte_level_tokenizer: Tokenizer) -> None:
    rng = random.Random(2)
    detok = Detokenizer(byte_level_tokenizer)
    detok.add_request(DetokenizeRequest(rid=9, n=2))
    outputs = [byte_level_tokenizer.encode(random_text(rng, 25)).ids for _ in range(2)]
    rids = [choice_rid(9, 0), choice_rid(9, 1)]
    steps = []
    for i in range(max(map(len, outputs))):
        rows = []
        for rid, ids in zip(rids, outputs):
            if i < len(ids):
                rows.append((rid, ids[i], FinishReason.LENGTH if i == len(ids) - 1 else FinishReason.NONE))
        steps.append(step(rows))
    texts, stopped = run(detok, steps)
    assert not stopped and not detok.streams
    for rid, ids in zip(rids, outputs):
        assert joined(texts, rid) == byte_level_tokenizer.decode(ids)
        rows = [(f, n) for t in texts for r, f, n in zip(t.rids.tolist(), t.finish_reasons.tolist(),
                                                         t.num_tokens.tolist()) if r == rid]
        assert [f for f, _ in rows].count(FinishReason.LENGTH) == 1 and rows[-1][0] == FinishReason.LENGTH
        assert sum(n for _, n in rows) == len(ids)
    all_ids = [i for t in texts for i in t.token_ids.tolist()]
    assert sorted(all_ids) == sorted(outputs[0] + outputs[1])


def test_stop_string_finishes_the_choice_and_asks_for_an_abort(byte_level_tokenizer: Tokenizer) -> None:
    tok = byte_level_tokenizer
    detok = Detokenizer(tok)
    detok.add_request(DetokenizeRequest(rid=4, n=1, stop=["xyz", "你好"]))
    rid = choice_rid(4, 0)
    ids = tok.encode("abc 你好 def").ids
    texts, stopped = run(detok, [step([(rid, t, FinishReason.NONE)]) for t in ids])
    assert stopped == [rid]
    assert joined(texts, rid) == "abc "
    assert texts[-1].finish_reasons.tolist() == [FinishReason.STOP]
    # The scheduler's rows after the abort (and its ABORT finish) are dropped.
    more, _ = run(detok, [step([(rid, ids[0], FinishReason.NONE)]), step([(rid, -1, FinishReason.ABORT)])])
    assert more == []


def test_a_stop_string_on_the_last_token_needs_no_abort(byte_level_tokenizer: Tokenizer) -> None:
    tok = byte_level_tokenizer
    detok = Detokenizer(tok)
    detok.add_request(DetokenizeRequest(rid=5, stop=["end"]))
    ids = tok.encode("the end").ids
    rows = [step([(choice_rid(5, 0), t, FinishReason.LENGTH if i == len(ids) - 1 else FinishReason.NONE)])
            for i, t in enumerate(ids)]
    texts, stopped = run(detok, rows)
    assert stopped == [] and joined(texts, choice_rid(5, 0)) == "the "
    assert texts[-1].finish_reasons.tolist() == [FinishReason.STOP]


def test_echo_prefixes_the_prompt_text(byte_level_tokenizer: Tokenizer) -> None:
    tok = byte_level_tokenizer
    detok = Detokenizer(tok)
    prompt = tok.encode("prompt 🚀 text").ids
    detok.add_request(DetokenizeRequest(rid=1, n=2, echo=True,
                                   prompt_ids=np.array(prompt, np.int32)))
    reply = tok.encode(" reply").ids
    steps = [step([(choice_rid(1, c), t, FinishReason.STOP if i == len(reply) - 1 else FinishReason.NONE)
                   for c in range(2)]) for i, t in enumerate(reply)]
    texts, _ = run(detok, steps)
    for c in range(2):
        assert joined(texts, choice_rid(1, c)) == "prompt 🚀 text reply"


def test_prompt_logprobs_go_out_with_the_first_output_row(byte_level_tokenizer: Tokenizer) -> None:
    tok = byte_level_tokenizer
    detok = Detokenizer(tok)
    prompt = tok.encode("ab cd").ids
    detok.add_request(DetokenizeRequest(rid=1, echo=True, echo_logprobs=True, prompt_ids=np.array(prompt, np.int32)))
    rid = choice_rid(1, 0)
    prompt_rows = step([(rid, t, 0) for t in prompt[1:]], logprobs={rid: (-0.75, [prompt[0]])})
    prompt_rows.in_prompt = [True] * (len(prompt) - 1)
    prompt_rows.ranks = list(range(2, len(prompt) + 1))
    texts, _ = run(detok, [prompt_rows, step([(rid, prompt[0], FinishReason.LENGTH)])])
    [row] = texts    # nothing goes out before the first output token
    assert row.texts == ["ab cda"]
    assert row.num_tokens.tolist() == [len(prompt) + 1]
    assert row.token_ids.tolist() == prompt + [prompt[0]]
    assert row.token_in_prompt.tolist() == [1] * len(prompt) + [0]
    assert row.token_ranks.tolist() == [0, *range(2, len(prompt) + 1), 0]
    # The echoed first token has no logprob but its bytes; the output token asked for no logprobs.
    lps = row.token_logprobs.tolist()
    assert math.isnan(lps[0]) and lps[1:-1] == [-0.75] * (len(prompt) - 1) and math.isnan(lps[-1])
    assert b"".join(row.token_bytes) == b"ab cd"


def test_logprob_rows_carry_token_bytes_and_others_do_not(byte_level_tokenizer: Tokenizer) -> None:
    tok = byte_level_tokenizer
    detok = Detokenizer(tok)
    detok.add_request(DetokenizeRequest(rid=2, n=2))
    with_lp, without = choice_rid(2, 0), choice_rid(2, 1)
    ids = tok.encode("龍!").ids            # a character split over byte tokens
    texts, _ = run(detok, [step([(with_lp, t, 0), (without, t, 0)], logprobs={with_lp: (-0.25, [t, ids[-1]])})
                           for t in ids])
    for text in texts:
        assert len(text.token_bytes) == len(text.token_ids) and len(text.top_bytes) == len(text.top_ids)
        lps = text.token_logprobs.tolist()
        assert math.isnan(lps[1]) and lps[0] == -0.25
        assert text.token_bytes[1] == b""
    raw = b"".join(text.token_bytes[0] for text in texts)
    assert raw.decode() == "龍!"


def test_rows_without_logprobs_send_no_token_bytes(byte_level_tokenizer: Tokenizer) -> None:
    detok = Detokenizer(byte_level_tokenizer)
    detok.add_request(DetokenizeRequest(rid=3))
    texts, _ = run(detok, [step([(choice_rid(3, 0), t, 0)]) for t in byte_level_tokenizer.encode("hi there").ids])
    assert all(set(text.token_bytes) <= {b""} and text.top_bytes == [] for text in texts)


def test_unknown_and_dropped_requests_are_ignored(byte_level_tokenizer: Tokenizer) -> None:
    detok = Detokenizer(byte_level_tokenizer)
    detok.add_request(DetokenizeRequest(rid=6, n=2))
    detok.drop(choice_rid(6, 1))   # the scheduler refused this choice (ERROR)
    texts, _ = run(detok, [step([(choice_rid(6, 1), 40, 0), (choice_rid(77, 0), 41, 0), (choice_rid(6, 0), 42, 0)])])
    assert texts[0].rids.tolist() == [choice_rid(6, 0)]


@pytest.mark.parametrize("interval", [1, 3, 8])
def test_stream_interval_sends_the_first_token_at_once_then_every_interval_tokens(
        byte_level_tokenizer: Tokenizer, interval: int) -> None:
    rng = random.Random(interval)
    tok = byte_level_tokenizer
    detok = Detokenizer(tok, stream_interval=interval)
    detok.add_request(DetokenizeRequest(rid=3, n=1))
    rid = choice_rid(3, 0)
    ids = tok.encode(random_text(rng, 20)).ids
    logprobs = {rid: (-0.25, [5, 6])}
    steps = [step([(rid, t, FinishReason.LENGTH if i == len(ids) - 1 else FinishReason.NONE)], logprobs=logprobs,
                  emitted_ns=1000 + i) for i, t in enumerate(ids)]
    texts, _ = run(detok, steps)
    counts = [n for t in texts for n in t.num_tokens.tolist()]
    rest = len(ids) - 1
    assert counts == [1] + [interval] * (rest // interval) + ([rest % interval] if rest % interval else [])
    assert joined(texts, rid) == tok.decode(ids)
    assert [i for t in texts for i in t.token_ids.tolist()] == ids
    assert [t.finish_reasons.tolist()[-1] for t in texts][-1] == FinishReason.LENGTH
    # Each row carries the emission time of its first token, and every token its logprob and alternatives.
    firsts = [0] + list(itertools.accumulate(counts))[:-1]
    assert [e for t in texts for e in t.emitted_ns.tolist()] == [1000 + i for i in firsts]
    assert [n for t in texts for n in t.top_counts.tolist()] == [2] * len(ids)
    assert all(lp == -0.25 for t in texts for lp in t.token_logprobs.tolist())


def test_stream_interval_flushes_held_tokens_when_a_stop_string_ends_the_choice(byte_level_tokenizer: Tokenizer) -> None:
    tok = byte_level_tokenizer
    detok = Detokenizer(tok, stream_interval=16)
    detok.add_request(DetokenizeRequest(rid=4, n=1, stop=["xyz"]))
    rid = choice_rid(4, 0)
    ids = tok.encode("abcdefg xyz tail").ids
    texts, stopped = run(detok, [step([(rid, t, FinishReason.NONE)]) for t in ids])
    assert stopped == [rid] and joined(texts, rid) == "abcdefg "
    assert texts[-1].finish_reasons.tolist() == [FinishReason.STOP] and not detok.streams


def test_rows_go_to_the_api_server_process_that_numbered_their_request(byte_level_tokenizer: Tokenizer) -> None:
    """With three API server processes, each request's rows (every choice) land in its process's batch only."""
    count = 3
    bases = {api: list(itertools.islice(api_base_ids(api, count), 2)) for api in range(count)}
    detok = Detokenizer(byte_level_tokenizer)
    for base in (b for ids in bases.values() for b in ids):
        detok.add_request(DetokenizeRequest(rid=base, n=2))
    token = byte_level_tokenizer.encode("a").ids[0]
    rows = [(choice_rid(base, i), token, FinishReason.NONE) for ids in bases.values() for base in ids for i in range(2)]
    random.Random(3).shuffle(rows)
    outs = [TextDeltas() for _ in range(count)]
    detok.process(StepTokens.decode(step(rows).encode()), outs)
    for api, out in enumerate(outs):
        assert sorted(out.rids) == sorted(choice_rid(base, i) for base in bases[api] for i in range(2))
        assert all(api_server_of(rid, count) == api for rid in out.rids)


@pytest.mark.parametrize("include_stop", [False, True])
def test_the_token_that_stops_the_output_is_not_rendered_unless_asked(byte_level_tokenizer: Tokenizer,
                                                                      include_stop: bool) -> None:
    """vLLM's rule: EOS (special) or a stop token id ends the output without its text, unless
    include_stop_str_in_output; a grammar's last token, which also finishes with STOP, keeps its text."""
    end = byte_level_tokenizer.token_to_id("<|im_end|>")
    words = byte_level_tokenizer.encode("ab cd").ids
    stop_id = words[-1]
    detok = Detokenizer(byte_level_tokenizer)
    for rid, last in ((1, end), (2, stop_id), (3, words[0])):   # 3: a token outside both, as a grammar's last
        detok.add_request(DetokenizeRequest(rid=rid, skip_special_tokens=False, include_stop_str_in_output=include_stop,
                                            stop_token_ids=[stop_id]))
    choice = {rid: choice_rid(rid, 0) for rid in (1, 2, 3)}
    rows = [[(choice[rid], token, FinishReason.NONE) for rid in (1, 2, 3)] for token in words[:-1]]
    last = [(choice[1], end, FinishReason.STOP), (choice[2], stop_id, FinishReason.STOP),
            (choice[3], words[0], FinishReason.STOP)]
    texts, _ = run(detok, [step(r) for r in rows] + [step(last)])
    head = byte_level_tokenizer.decode(words[:-1])
    assert joined(texts, choice[1]) == head + ("<|im_end|>" if include_stop else "")
    assert joined(texts, choice[2]) == head + (byte_level_tokenizer.decode([stop_id]) if include_stop else "")
    assert joined(texts, choice[3]) == byte_level_tokenizer.decode(words[:-1] + [words[0]])
    last_row = texts[-1]
    assert last_row.num_tokens.tolist() == [1, 1, 1] and last_row.token_ids.tolist() == [end, stop_id, words[0]]
