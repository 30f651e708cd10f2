"""The served tokenizer: the model's own, or --tokenizer's, which must fit the model's vocabulary."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.models.hf_tiny import tiny_config

from minisrv.config import EngineConfig
from minisrv.models.source import resolve_source
from minisrv.tokenizer.byte_tokenizer import build_byte_tokenizer
from minisrv.tokenizer.loading import check_vocabulary, load_fast_tokenizer, load_tokenizer


def model_dir(path: Path, vocab_size: int) -> str:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(tiny_config("llama", vocab_size=vocab_size)))
    return str(path)


def test_tokenizer_replaces_the_models_and_must_fit_its_vocabulary(tmp_path: Path) -> None:
    byte_tokenizer = build_byte_tokenizer()
    byte_tokenizer.save_pretrained(tmp_path / "tokenizer")
    tokenizer = str(tmp_path / "tokenizer")
    text = "tokens ßé 🙂"
    fits = resolve_source(EngineConfig(model=model_dir(tmp_path / "wide", len(byte_tokenizer)), load_format="dummy",
                                       tokenizer=tokenizer))
    check_vocabulary(fits)
    assert load_tokenizer(fits).encode(text) == byte_tokenizer.encode(text)
    assert load_fast_tokenizer(fits).encode(text).ids == byte_tokenizer.encode(text)
    preset = resolve_source(EngineConfig(model="qwen3-0.6b", load_format="dummy", tokenizer=tokenizer))
    assert load_tokenizer(preset).chat_template == byte_tokenizer.chat_template
    narrow = resolve_source(EngineConfig(model=model_dir(tmp_path / "narrow", 97), load_format="dummy",
                                         tokenizer=tokenizer))
    with pytest.raises(ValueError, match=rf"tokenizer: .* has {len(byte_tokenizer)} tokens, more than the "
                                         r"model's 97 \(--tokenizer\)"):
        check_vocabulary(narrow)
    check_vocabulary(resolve_source(EngineConfig(model=model_dir(tmp_path / "own", 97), load_format="dummy")))
