"""resolve_source: the one resolver of --model, for the engine and the tokenizer side alike."""
from __future__ import annotations

from pathlib import Path

import pytest

from minisrv.config import EngineConfig
from minisrv.models import embedded
from minisrv.models.source import DUMMY_EMBEDDED_PRESET, ModelSource, resolve_source


def test_every_kind_of_model_resolves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "embedded_model_dir", lambda: tmp_path / "cached")
    assert resolve_source(EngineConfig()) == ModelSource("hf", embedded.EMBEDDED_MODEL_NAME, tmp_path / "cached",
                                                         converted_from_bits=4)   # Q4_1
    assert resolve_source(EngineConfig(model=str(tmp_path))) == ModelSource("hf", tmp_path.name, tmp_path)
    gguf = tmp_path / "tiny.gguf"
    assert resolve_source(EngineConfig(model=str(gguf))) == ModelSource("gguf", "tiny", gguf)
    assert resolve_source(EngineConfig(model="qwen3-0.6b", load_format="dummy")) == ModelSource(
        "preset", "qwen3-0.6b", dummy=True)
    # The embedded model's shapes with random weights, and an HF directory's shapes and tokenizer.
    assert resolve_source(EngineConfig(load_format="dummy")) == ModelSource("preset", DUMMY_EMBEDDED_PRESET,
                                                                             dummy=True)
    assert resolve_source(EngineConfig(model=str(tmp_path), load_format="dummy")) == ModelSource(
        "hf", tmp_path.name, tmp_path, dummy=True)


@pytest.mark.parametrize("settings, message", [
    (dict(model="nowhere/at/all"), "model: 'nowhere/at/all' is not 'embedded'"),
    (dict(model="qwen3-0.6b"), "load_format='dummy'"),
    (dict(model="gpt-5", load_format="dummy"), "presets are"),
])
def test_what_is_no_model_is_an_error_naming_the_field(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_source(EngineConfig(**settings))
