"""GGUF files written as llama.cpp's converter does (permuted q/k rows for llama) read back as the HF checkpoint."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hf_tiny import GGUF_EOS, GGUF_VOCAB, hf_logits, make_hf_model, tiny_config, write_tiny_gguf

from minisrv.config import EngineConfig
from minisrv.engine.model_runner import ModelRunner
from minisrv.layers.forward_context import ForwardContext, forward_context
from minisrv.models.config import ModelConfig
from minisrv.models.gguf import GGUFCheckpoint, hf_tensor_name, quantized_bits
from minisrv.models.loader import load_model
from minisrv.models.source import resolve_source
from minisrv.sampling_params import SamplingParams
from minisrv.scheduler.batch import ScheduledBatch, ScheduledSeq
from minisrv.scheduler.request import Request
from minisrv.tokenizer.loading import load_tokenizer
from minisrv.tokenizer.prompts import resolve_chat_template


def gguf_spec(name: str) -> dict:
    return tiny_config(name, vocab_size=GGUF_VOCAB, eos_token_id=GGUF_EOS, bos_token_id=GGUF_EOS - 1)


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_checkpoint_reads_back_config_and_exact_weights(tmp_path, name):
    spec = gguf_spec(name)
    hf = make_hf_model(spec, seed=3)
    write_tiny_gguf(tmp_path / "m.gguf", spec, hf)
    checkpoint = GGUFCheckpoint(tmp_path / "m.gguf")
    assert ModelConfig.from_hf_dict(checkpoint.hf_config) == ModelConfig.from_hf_dict(spec)
    tensors = dict(checkpoint.tensors())
    state = hf.state_dict()
    expected_names = set(state) - ({"lm_head.weight"} if spec["tie_word_embeddings"] else set())
    assert set(tensors) == expected_names
    for key, tensor in tensors.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, state[key]), key   # the q/k row permutation is undone exactly


def test_quantized_tensors_dequantize_within_q8_error(tmp_path):
    spec = gguf_spec("llama")
    hf = make_hf_model(spec, seed=4)
    write_tiny_gguf(tmp_path / "q.gguf", spec, hf, quantize=True)
    write_tiny_gguf(tmp_path / "f.gguf", spec, hf)
    # What --quantization auto reads: how many bits the projections were stored in.
    assert GGUFCheckpoint(tmp_path / "q.gguf").projection_bits == 8
    assert load_model(EngineConfig(model=str(tmp_path / "q.gguf"))).checkpoint_bits == 8
    assert GGUFCheckpoint(tmp_path / "f.gguf").projection_bits is None
    assert [quantized_bits(t) for t in ("Q4_1", "Q4_K", "IQ4_XS", "IQ2_XXS", "Q8_0", "F16", "BF16", "F32")] == \
        [4, 4, 4, 2, 8, None, None, None]
    state = hf.state_dict()
    for key, tensor in GGUFCheckpoint(tmp_path / "q.gguf").tensors():
        if tensor.dim() == 1:
            assert torch.equal(tensor, state[key])   # norms stay float32, as llama.cpp keeps them
            continue
        # Q8_0: blocks of 32 int8 values sharing one float16 scale amax/127: within a step of the original,
        # and far from exact (a test that compared exactly would not be reading quantized data).
        step = state[key].abs().max().item() / 127
        error = (tensor - state[key]).abs().max().item()
        assert step / 100 < error <= step, key


def test_load_model_from_gguf_file(tmp_path):
    spec = gguf_spec("llama")
    hf = make_hf_model(spec, seed=5)
    path = tmp_path / "tiny-llama.gguf"
    write_tiny_gguf(path, spec, hf)
    config = EngineConfig(model=str(path), max_model_len=64)
    source = resolve_source(config)
    loaded = load_model(config, source)
    assert (loaded.name, source.path, loaded.max_model_len) == ("tiny-llama", path, 64)
    assert loaded.eos_token_ids == [GGUF_EOS]
    tokenizer = load_tokenizer(source)
    assert "<|im_start|>" in resolve_chat_template(None, tokenizer)
    tokens = tokenizer.encode("héllo to", add_special_tokens=False)
    assert tokenizer.decode(tokens) == "héllo to" and 256 in tokens   # the merge "Ġt" applied
    runner = ModelRunner(EngineConfig(num_pages=8), loaded,
                         sampler=lambda logits, reqs, positions=None, bitmask=None: [])
    request = Request(0, tokens, SamplingParams(temperature=0.0), seed=0)
    request.pages = [3, 1]
    step = runner.prepare(ScheduledBatch([ScheduledSeq(request, 0, len(tokens), True)]))
    with torch.inference_mode(), forward_context(ForwardContext(step.attn)):
        logits = loaded.model.compute_logits(loaded.model(step.input_ids, step.positions))
    torch.testing.assert_close(logits, hf_logits(hf, tokens), atol=2e-5, rtol=2e-5)


def test_tensor_names():
    assert hf_tensor_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_tensor_name("blk.0.attn_k.bias") == "model.layers.0.self_attn.k_proj.bias"
    assert hf_tensor_name("blk.11.ffn_norm.weight") == "model.layers.11.post_attention_layernorm.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("rope_freqs.weight") is None


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        GGUFCheckpoint(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(np.random.default_rng(0).bytes(256))
    with pytest.raises(ValueError, match="not a readable GGUF"):
        GGUFCheckpoint(junk)
    with pytest.raises(ValueError, match="model: .*missing.gguf"):
        load_model(EngineConfig(model=str(tmp_path / "missing.gguf")))


def test_unsupported_gguf_architecture_and_rope_freqs(tmp_path):
    import gguf

    path = tmp_path / "phi.gguf"
    writer = gguf.GGUFWriter(str(path), "phi2")
    writer.add_tensor("token_embd.weight", np.ones((4, 4), dtype=np.float32))
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        step()
    with pytest.raises(ValueError, match="architecture 'phi2'"):
        GGUFCheckpoint(path)

    spec = gguf_spec("llama")
    hf = make_hf_model(spec)
    path = tmp_path / "llama31.gguf"
    write_tiny_gguf(path, spec, hf)
    rewritten = tmp_path / "with_rope_freqs.gguf"
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(str(rewritten), "llama")
    writer.add_block_count(spec["num_hidden_layers"])
    writer.add_tensor("rope_freqs.weight", np.ones(8, dtype=np.float32))
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data).reshape([int(d) for d in reversed(tensor.shape)]))
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        step()
    with pytest.raises(ValueError, match="rope_freqs"):
        GGUFCheckpoint(rewritten)


def test_config_quirks_survive_gguf(tmp_path):
    """head_dim from attention.key_length (Qwen3 here: 24, not hidden/heads = 16) and tying by absence of output."""
    spec = gguf_spec("qwen3")
    write_tiny_gguf(tmp_path / "q3.gguf", spec, make_hf_model(spec))
    config = ModelConfig.from_hf_dict(GGUFCheckpoint(tmp_path / "q3.gguf").hf_config)
    assert (config.head_dim, config.qk_norm, config.tie_word_embeddings) == (24, True, False)
    assert dataclasses.asdict(config)["eos_token_ids"] == (GGUF_EOS,)
