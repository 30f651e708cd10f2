"""Where a model comes from: the one resolver of --model for the engine and the tokenizer side.

"embedded" (SmolLM2-135M-Instruct, converted once into a cached HF directory), a Hugging Face directory
(config.json, *.safetensors, tokenizer files) or Hub model id (fetched into such a directory), a .gguf file,
or with load_format "dummy" a preset name (or an HF directory's config) with random weights. The launcher
resolves once and hands the result to every worker, so a model is fetched by one process, and every process
reads the same files.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from minisrv.config import EngineConfig, ServerConfig, flag_name
from minisrv.models import hub
from minisrv.sampling_params import SamplingParams

DUMMY_EMBEDDED_PRESET = "smollm2-135m"   # `--model embedded --load-format dummy`: the embedded model's shapes
# generation_config.json's keys that vLLM takes as defaults for the sampling options a request leaves out (its
# max_new_tokens too, capped by the room the prompt leaves; here max_tokens keeps its default, all that room).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")   # either makes a directory a Hugging Face tokenizer
GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass(frozen=True)
class ModelSource:
    """A resolved --model. `format`: "hf" (a Hugging Face directory), "gguf" (a file) or "preset" (a named
    config; its vocabulary is the byte-level one of minisrv/models/dummy.py)."""

    format: Literal["hf", "gguf", "preset"]
    name: str                   # the model id the server reports; a preset's name
    path: Path | None = None    # the directory or file; None for a preset
    dummy: bool = False         # random weights instead of the checkpoint's
    # Bits per weight of the projections of the checkpoint the files were converted from, when quantized
    # (the embedded model's GGUF); a GGUF file's own come from the file (LoadedModel.checkpoint_bits).
    converted_from_bits: int | None = None
    # --tokenizer's directory, whose tokenizer, chat template and end-of-sequence ids replace the model's
    tokenizer_path: Path | None = None


def resolve_source(config: EngineConfig) -> ModelSource:
    """Resolve `config.model` and `config.tokenizer`; ValueError naming the field when one is none of the accepted
    kinds (whether the tokenizer fits the model: minisrv/tokenizer/loading.py's check_vocabulary)."""
    source = _resolve_model(config)
    return source if config.tokenizer is None else replace(source, tokenizer_path=_resolve_tokenizer(config))


def _resolve_model(config: EngineConfig) -> ModelSource:
    model, path = config.model, Path(config.model).expanduser()
    dummy = config.load_format == "dummy"
    if not path.exists() and hub.is_repo_id(model):   # served under its id, as vLLM names it
        return ModelSource("hf", model, hub.fetch(model, config.revision, config.download_dir, weights=not dummy),
                           dummy=dummy)
    if dummy:
        if path.is_dir():   # an HF directory's shapes and tokenizer, random weights
            return ModelSource("hf", path.name, path, dummy=True)
        from minisrv.models.dummy import load_preset

        name = DUMMY_EMBEDDED_PRESET if model == "embedded" else model
        load_preset(name)   # raises, listing the presets, when it is not one
        return ModelSource("preset", name, dummy=True)
    if model == "embedded":
        from minisrv.models.embedded import EMBEDDED_GGUF_TYPE, EMBEDDED_MODEL_NAME, embedded_model_dir
        from minisrv.models.gguf import quantized_bits

        return ModelSource("hf", EMBEDDED_MODEL_NAME, embedded_model_dir(),
                           converted_from_bits=quantized_bits(EMBEDDED_GGUF_TYPE))
    if path.suffix == ".gguf":
        return ModelSource("gguf", path.stem, path)
    if path.is_dir():
        return ModelSource("hf", path.name, path)
    from minisrv.models.dummy import preset_names

    if model in preset_names():
        raise ValueError(f"model: {model!r} is a preset config without weights; pass load_format='dummy' "
                         "(--load-format dummy) for random weights")
    raise ValueError(f"model: {model!r} is not 'embedded', a Hugging Face directory or Hub id (org/name), a .gguf "
                     "file or a preset")


def _resolve_tokenizer(config: EngineConfig) -> Path:
    """--tokenizer as a directory holding a Hugging Face tokenizer, as vLLM takes it: a directory or a Hub id."""
    name, path = config.tokenizer, Path(config.tokenizer).expanduser()
    if not path.exists() and hub.is_repo_id(name):
        path = hub.fetch(name, config.tokenizer_revision, config.download_dir, weights=False, field="tokenizer")
    elif not path.is_dir():
        raise ValueError(f"tokenizer: {name!r} is neither a directory nor a Hugging Face Hub id (org/name) "
                         f"({flag_name('tokenizer')})")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(f"tokenizer: {name!r} has no tokenizer ({' or '.join(TOKENIZER_FILES)}) "
                         f"({flag_name('tokenizer')})")
    return path


def model_vocab_size(source: ModelSource) -> int:
    """The rows of the model's embedding, read from its config (a GGUF file's metadata) without its weights."""
    if source.format == "preset":
        from minisrv.models.dummy import load_preset

        return load_preset(source.name)["vocab_size"]
    if source.format == "gguf":
        from minisrv.models.gguf import GGUFCheckpoint

        return GGUFCheckpoint(source.path).hf_config["vocab_size"]
    from minisrv.models.config import ModelConfig

    return ModelConfig.from_hf_dict(json.loads((source.path / "config.json").read_text())).vocab_size


def request_defaults(config: ServerConfig, source: ModelSource) -> dict[str, Any]:
    """The sampling options a request leaves out take these (SamplingParams' names): with --generation-config
    auto (vLLM's default) those a Hugging Face directory's generation_config.json sets, else none; then
    --override-generation-config's. ValueError naming the file or the flag when one is out of range."""
    defaults = generation_config_defaults(config, source)
    overrides = config.override_generation_config
    if overrides is None:
        return defaults
    flag = flag_name("override_generation_config")
    try:
        written = json.loads(overrides)
    except ValueError as exc:
        raise ValueError(f"override_generation_config ({flag}): not JSON ({exc})") from None
    if not isinstance(written, dict) or set(written) - set(GENERATION_DEFAULTS):
        raise ValueError(f"override_generation_config ({flag}): a JSON object of {', '.join(GENERATION_DEFAULTS)} "
                         f"is expected, got {overrides!r}")
    return {**defaults, **_checked(written, f"override_generation_config ({flag})")}


def generation_config_defaults(config: ServerConfig, source: ModelSource) -> dict[str, Any]:
    """The defaults a Hugging Face directory's generation_config.json sets, with --generation-config auto."""
    if config.generation_config == "vllm" or source.format != "hf" or source.path is None:
        return {}
    path = source.path / "generation_config.json"
    if not path.is_file():
        return {}
    ignored = f"{flag_name('generation_config')} vllm ignores the file"
    try:
        written = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: not JSON ({exc}); {ignored}") from None
    return _checked({key: written[key] for key in GENERATION_DEFAULTS if written.get(key) is not None},
                    str(path), f"; {ignored}")


def _checked(defaults: dict[str, Any], where: str, hint: str = "") -> dict[str, Any]:
    """`defaults`, once SamplingParams takes them; ValueError naming `where` otherwise."""
    try:
        SamplingParams(**defaults)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}{hint}") from None
    return defaults
