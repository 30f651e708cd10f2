"""resolve_source: the one resolver of --model, for the engine and the tokenizer side alike; and the sampling
defaults a model's files give requests."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from minisrv.config import EngineConfig, ServerConfig
from minisrv.models import embedded
from minisrv.models.source import DUMMY_EMBEDDED_PRESET, ModelSource, request_defaults, resolve_source


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


def test_a_tokenizer_resolves_to_a_directory_or_a_hub_snapshot(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "tokenizer.json").write_text("{}")
    preset = dict(model="qwen3-0.6b", load_format="dummy")
    assert resolve_source(EngineConfig(**preset, tokenizer=str(tmp_path / "local"))) == ModelSource(
        "preset", "qwen3-0.6b", dummy=True, tokenizer_path=tmp_path / "local")
    snapshot = cached_repo(tmp_path, "org/tok", {"tokenizer_config.json": "{}"})
    assert resolve_source(EngineConfig(**preset, tokenizer="org/tok", download_dir=str(tmp_path))).tokenizer_path \
        == snapshot
    (tmp_path / "empty").mkdir()
    for tokenizer, message in ((str(tmp_path / "empty"), "has no tokenizer"),
                               (str(tmp_path / "no" / "such" / "dir"), "neither a directory nor a Hugging Face"),
                               ("org/missing", "'org/missing' could not be fetched from the Hugging Face Hub")):
        with pytest.raises(ValueError, match=f"^tokenizer: .*{message}.*\\(--tokenizer\\)$"):
            resolve_source(EngineConfig(**preset, tokenizer=tokenizer, download_dir=str(tmp_path)))


def test_request_defaults_come_from_generation_config_unless_vllm(tmp_path: Path) -> None:
    source = ModelSource("hf", "m", tmp_path)
    assert request_defaults(ServerConfig(), source) == {}   # no file
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.05, "max_new_tokens": 512,
         "do_sample": True, "eos_token_id": [2], "min_p": None}))
    assert request_defaults(ServerConfig(), source) == {"temperature": 0.6, "top_p": 0.9, "top_k": 20,
                                                        "repetition_penalty": 1.05}
    assert request_defaults(ServerConfig(generation_config="vllm"), source) == {}
    assert request_defaults(ServerConfig(), ModelSource("preset", "smollm2-135m", dummy=True)) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 0}))
    with pytest.raises(ValueError, match=r"generation_config.json: top_p .*--generation-config vllm"):
        request_defaults(ServerConfig(), source)


def test_override_generation_config_wins_over_the_models_defaults(tmp_path: Path) -> None:
    source = ModelSource("hf", "m", tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.9}))
    override = '{"temperature": 0.2, "top_k": 5}'
    assert request_defaults(ServerConfig(override_generation_config=override), source) == \
        {"temperature": 0.2, "top_p": 0.9, "top_k": 5}
    assert request_defaults(ServerConfig(generation_config="vllm", override_generation_config=override), source) \
        == {"temperature": 0.2, "top_k": 5}
    preset = ModelSource("preset", "smollm2-135m", dummy=True)
    assert request_defaults(ServerConfig(override_generation_config='{"min_p": 0.1}'), preset) == {"min_p": 0.1}
    for bad, message in (("{", "not JSON"), ('{"max_new_tokens": 5}', "a JSON object of temperature"),
                         ("[0.5]", "a JSON object of"), ('{"top_p": 2}', "top_p")):
        with pytest.raises(ValueError, match=rf"^override_generation_config \(--override-generation-config\): "
                                             rf".*{message}"):
            request_defaults(ServerConfig(override_generation_config=bad), source)


def cached_repo(cache: Path, repo_id: str, files: dict[str, str]) -> Path:
    """A repository as huggingface_hub leaves it in its cache: refs/main naming a snapshot of the files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    return snapshot


def test_a_hub_id_resolves_to_its_cached_snapshot_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    snapshot = cached_repo(tmp_path, "org/tiny", {"config.json": "{}", "model.safetensors": ""})
    hub = dict(model="org/tiny", download_dir=str(tmp_path))
    assert resolve_source(EngineConfig(**hub)) == ModelSource("hf", "org/tiny", snapshot)
    assert resolve_source(EngineConfig(**hub, load_format="dummy")) == ModelSource("hf", "org/tiny", snapshot,
                                                                                   dummy=True)
    with pytest.raises(ValueError, match=r"'org/missing' could not be fetched from the Hugging Face Hub: .*--model"):
        resolve_source(EngineConfig(model="org/missing", download_dir=str(tmp_path)))
    monkeypatch.chdir(tmp_path)   # a directory that exists under that name is a directory, not a Hub id
    (tmp_path / "org" / "local").mkdir(parents=True)
    assert resolve_source(EngineConfig(model="org/local")) == ModelSource("hf", "local", Path("org/local"))


def test_a_hub_fetch_asks_for_the_revision_and_skips_weights_it_will_not_load(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kwargs: asked.append((repo_id, kwargs)) or str(tmp_path))
    resolve_source(EngineConfig(model="org/m", revision="v2", download_dir="/models"))
    resolve_source(EngineConfig(model="org/m", load_format="dummy"))
    (repo, real), (_, dummy) = asked
    assert (repo, real["revision"], real["cache_dir"], dummy["revision"], dummy["cache_dir"]) == \
        ("org/m", "v2", "/models", None, None)
    assert "*.safetensors" in real["allow_patterns"] and "*.safetensors" not in dummy["allow_patterns"]
    assert {"*.json", "*.jinja"} <= set(dummy["allow_patterns"]) and "original/*" in real["ignore_patterns"]
