"""load_model: sharded HF directories, overrides, dummy presets, and errors that name the field."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from hf_tiny import hf_logits, make_hf_model, make_request, tiny_config

from minisrv.config import EngineConfig
from minisrv.engine.model_runner import ModelRunner
from minisrv.layers.forward_context import ForwardContext, forward_context
from minisrv.models.loader import load_model
from minisrv.models.source import resolve_source
from minisrv.scheduler.batch import ScheduledBatch, ScheduledSeq
from minisrv.tokenizer.byte_tokenizer import build_byte_tokenizer
from minisrv.tokenizer.loading import load_tokenizer
from minisrv.tokenizer.prompts import resolve_chat_template


def all_logits(loaded, tokens: list[int]) -> torch.Tensor:
    runner = ModelRunner(EngineConfig(num_pages=16), loaded,
                         sampler=lambda logits, reqs, positions=None, bitmask=None: [])
    step = runner.prepare(ScheduledBatch([ScheduledSeq(make_request(0, tokens, [5, 2, 9]), 0, len(tokens), True)]))
    with torch.inference_mode(), forward_context(ForwardContext(step.attn)):
        return loaded.model.compute_logits(loaded.model(step.input_ids, step.positions))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A Qwen2 checkpoint (biases, tied embeddings) in several safetensors shards with an index."""
    spec = tiny_config("qwen2")
    hf = make_hf_model(spec, seed=11)
    path = tmp_path_factory.mktemp("ckpt") / "tiny-qwen2"
    hf.save_pretrained(path, max_shard_size="40KB")
    build_byte_tokenizer().save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    return path, hf


def test_sharded_hf_directory(hf_dir):
    path, hf = hf_dir
    assert len(list(path.glob("*.safetensors"))) > 2 and (path / "model.safetensors.index.json").is_file()
    config = EngineConfig(model=str(path))
    source = resolve_source(config)
    loaded = load_model(config, source)
    assert (loaded.name, source.path, loaded.max_model_len) == ("tiny-qwen2", path, 128)
    assert loaded.eos_token_ids == [2, 7]             # config.json's 2 united with generation_config's
    tokenizer = load_tokenizer(source)
    assert resolve_chat_template(None, tokenizer) == tokenizer.chat_template
    assert "<|im_start|>" in tokenizer.chat_template
    assert loaded.model_config.qkv_bias and loaded.model_config.tie_word_embeddings
    tokens = [3, 14, 15, 92, 65, 35, 89, 79]
    torch.testing.assert_close(all_logits(loaded, tokens), hf_logits(hf, tokens), atol=2e-5, rtol=2e-5)


def test_overrides_max_len_and_dtype(hf_dir):
    path, _ = hf_dir
    loaded = load_model(EngineConfig(model=str(path), max_model_len=32, dtype="bfloat16"))
    assert loaded.max_model_len == 32 and loaded.model.rope.max_positions == 32
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


def test_eos_from_the_tokenizer_files_when_the_configs_name_none(hf_dir, tmp_path):
    path, _ = hf_dir
    bare = tmp_path / "bare"
    shutil.copytree(path, bare)
    (bare / "generation_config.json").unlink()
    config = json.loads((bare / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({**config, "eos_token_id": None}))
    eos = build_byte_tokenizer().eos_token   # <|im_end|>, which the saved tokenizer_config.json names
    assert load_model(EngineConfig(model=str(bare))).eos_token_ids == [load_tokenizer(resolve_source(
        EngineConfig(model=str(bare)))).convert_tokens_to_ids(eos)]


@pytest.mark.parametrize("overrides, field", [
    (dict(max_model_len=129), "max_model_len"),
    (dict(max_model_len=0), "max_model_len"),
    (dict(dtype="float64"), "dtype"),
    (dict(dtype="float16", device="cpu"), "dtype"),
    (dict(load_format="pt"), "load_format"),
])
def test_bad_settings_name_the_field(hf_dir, overrides, field):
    path, _ = hf_dir
    with pytest.raises(ValueError, match=field):
        load_model(EngineConfig(model=str(path), **overrides))


def test_bad_checkpoints(hf_dir, tmp_path):
    from safetensors.torch import save_file

    path, hf = hf_dir
    with pytest.raises(ValueError, match="model: 'nowhere/at/all'"):
        load_model(EngineConfig(model="nowhere/at/all"))
    with pytest.raises(ValueError, match="load_format='dummy'"):
        load_model(EngineConfig(model="qwen3-0.6b"))
    with pytest.raises(ValueError, match="no config.json"):
        load_model(EngineConfig(model=str(tmp_path)))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((path / "config.json").read_text())
    build_byte_tokenizer().save_pretrained(broken)
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        load_model(EngineConfig(model=str(broken)))
    state = {k: v.clone() for k, v in hf.state_dict().items()
             if k not in ("model.layers.1.mlp.up_proj.weight", "lm_head.weight")}
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match="missing model.layers.1.mlp.up_proj.weight"):
        load_model(EngineConfig(model=str(broken)))
    save_file({**state, "model.layers.1.mlp.up_proj.weight": torch.randn(96, 64),
               "model.layers.0.mlp.extra.weight": torch.randn(2)}, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match="mlp.extra.weight"):
        load_model(EngineConfig(model=str(broken)))
    save_file({**state, "model.layers.1.mlp.up_proj.weight": torch.randn(64, 64)}, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match="shape \\(64, 64\\).*\\(96, 64\\)"):
        load_model(EngineConfig(model=str(broken)))
    config = json.loads((path / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="architectures"):
        load_model(EngineConfig(model=str(broken)))


def test_dummy_weights_from_an_hf_directory_are_seeded(hf_dir):
    path, _ = hf_dir
    first = load_model(EngineConfig(model=str(path), load_format="dummy", seed=1))
    again = load_model(EngineConfig(model=str(path), load_format="dummy", seed=1))
    other = load_model(EngineConfig(model=str(path), load_format="dummy", seed=2))
    weights = [dict(m.model.named_parameters()) for m in (first, again, other)]
    name = "layers.0.self_attn.qkv_proj.weight"
    assert torch.equal(weights[0][name], weights[1][name]) and not torch.equal(weights[0][name], weights[2][name])
    source = resolve_source(EngineConfig(model=str(path), load_format="dummy"))
    assert source.dummy and load_tokenizer(source).chat_template is not None


def test_a_tokenizer_of_its_own_brings_its_end_of_sequence(tmp_path):
    """--tokenizer: the model's end-of-sequence ids are joined by the tokenizer's eos_token and the ids its
    directory's generation_config.json names (a Hub model's, fetched for its tokenizer)."""
    byte_tokenizer = build_byte_tokenizer()
    model, tokenizer = tmp_path / "model", tmp_path / "tokenizer"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(tiny_config("llama", vocab_size=len(byte_tokenizer) + 5)))
    byte_tokenizer.save_pretrained(tokenizer)
    (tokenizer / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    config = EngineConfig(model=str(model), load_format="dummy", tokenizer=str(tokenizer))
    im_end = byte_tokenizer.convert_tokens_to_ids(byte_tokenizer.eos_token)
    assert load_model(config).eos_token_ids == sorted({2, 9, im_end})   # config.json's 2
    assert load_tokenizer(resolve_source(config)).chat_template == byte_tokenizer.chat_template
