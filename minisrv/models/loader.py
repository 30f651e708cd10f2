"""One entry point, `load_model(EngineConfig) -> LoadedModel`, for every source of weights.

Sources: "embedded" (SmolLM2-135M-Instruct, converted once into a cached HF directory), a Hugging Face
directory (config.json, *.safetensors, tokenizer files), a .gguf file, or with load_format="dummy" a preset
name (or an HF directory's config) with random weights and, for presets, an offline byte-level tokenizer.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from minisrv.config import EngineConfig
from minisrv.models.config import ModelConfig, as_id_list
from minisrv.models.llama import CausalLM
from minisrv.models.weights import load_weights
from minisrv.tokenizer.prompts import resolve_chat_template

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOAD_FORMATS = ("auto", "dummy")


@dataclass
class LoadedModel:
    model: CausalLM
    model_config: ModelConfig
    tokenizer: Any                  # a transformers PreTrainedTokenizerFast
    eos_token_ids: list[int]
    chat_template: str | None
    max_model_len: int
    name: str                       # what the server reports as the model id
    path: Path | None = None        # the HF directory or GGUF file the weights came from; None for dummy


def resolve_dtype(config: EngineConfig) -> torch.dtype:
    name = config.resolved_dtype()
    if name not in DTYPES:
        raise ValueError(f"dtype: {name!r} is not one of auto, {', '.join(DTYPES)}")
    if name == "float16" and config.resolved_device() == "cpu":
        raise ValueError("dtype: float16 is only supported on CUDA; use float32 or bfloat16 on the CPU")
    return DTYPES[name]


def load_model(config: EngineConfig) -> LoadedModel:
    if config.load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format: {config.load_format!r} is not one of {', '.join(LOAD_FORMATS)}")
    dtype, device = resolve_dtype(config), torch.device(config.resolved_device())
    if config.load_format == "dummy":
        return _load_dummy(config, dtype, device)
    source = config.model
    if source == "embedded":
        from minisrv.models.embedded import EMBEDDED_MODEL_NAME, embedded_model_dir

        return _load_hf_dir(embedded_model_dir(), config, dtype, device, name=EMBEDDED_MODEL_NAME)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        return _load_gguf(path, config, dtype, device)
    if path.is_dir():
        return _load_hf_dir(path, config, dtype, device, name=path.name)
    from minisrv.models.dummy import preset_names

    if source in preset_names():
        raise ValueError(f"model: {source!r} is a preset config without weights; pass load_format='dummy' "
                         "(--load-format dummy) for random weights")
    raise ValueError(f"model: {source!r} is not 'embedded', a Hugging Face directory, a .gguf file or a preset")


def build_model(model_config: ModelConfig, max_model_len: int, dtype: torch.dtype, device: torch.device) -> CausalLM:
    """Allocate the model on `device` without initializing it (weights are about to be overwritten)."""
    with torch.device("meta"):
        model = CausalLM(model_config, max_model_len, device)
    model = model.to(dtype).to_empty(device=device).eval()
    model.tie_weights()
    return model


def _finish(model_config: ModelConfig, weights: Iterable[tuple[str, torch.Tensor]] | None, tokenizer: Any,
            config: EngineConfig, dtype: torch.dtype, device: torch.device, name: str,
            extra_eos: Iterable[int] = (), path: Path | None = None) -> LoadedModel:
    max_model_len = _max_model_len(config, model_config)
    model = build_model(model_config, max_model_len, dtype, device)
    if weights is None:
        from minisrv.models.dummy import init_dummy_weights

        init_dummy_weights(model, config.seed)
    else:
        load_weights(model, weights)
    eos = sorted({*model_config.eos_token_ids, *extra_eos})
    if not eos and tokenizer.eos_token_id is not None:
        eos = [tokenizer.eos_token_id]
    return LoadedModel(model, model_config, tokenizer, eos, resolve_chat_template(config.chat_template, tokenizer), max_model_len, name,
                       path)


def _max_model_len(config: EngineConfig, model_config: ModelConfig) -> int:
    limit = model_config.context_length
    if config.max_model_len is None:
        return limit
    if not 1 <= config.max_model_len <= limit:
        raise ValueError(f"max_model_len: must be in [1, {limit}] (the model's context length), "
                         f"got {config.max_model_len}")
    return config.max_model_len


def _load_hf_dir(path: Path, config: EngineConfig, dtype: torch.dtype, device: torch.device,
                 name: str) -> LoadedModel:
    from transformers import AutoTokenizer

    model_config = ModelConfig.from_hf_dict(_read_json(path / "config.json", "model"))
    generation = path / "generation_config.json"
    # generation_config.json is what HF generate() stops on; it often lists more ids than config.json.
    extra_eos = as_id_list(json.loads(generation.read_text()).get("eos_token_id")) if generation.is_file() else []
    weights = _safetensors_weights(path, _safetensors_files(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return _finish(model_config, weights, tokenizer, config, dtype, device, name, extra_eos, path)


def _load_gguf(path: Path, config: EngineConfig, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    from minisrv.models.gguf import GGUFCheckpoint, load_gguf_tokenizer

    checkpoint = GGUFCheckpoint(path)
    model_config = ModelConfig.from_hf_dict(checkpoint.hf_config)
    weights = tqdm(checkpoint.tensors(), total=len(checkpoint), desc="Loading GGUF", unit="tensor")
    return _finish(model_config, weights, load_gguf_tokenizer(path), config, dtype, device, path.stem, path=path)


def _load_dummy(config: EngineConfig, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    from minisrv.models.byte_tokenizer import build_byte_tokenizer
    from minisrv.models.dummy import load_preset

    path = Path(config.model).expanduser()
    if path.is_dir():   # an HF directory's shapes and tokenizer, random weights
        from transformers import AutoTokenizer

        hf_config, name = _read_json(path / "config.json", "model"), path.name
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    else:
        name = "smollm2-135m" if config.model == "embedded" else config.model
        hf_config, tokenizer = load_preset(name), build_byte_tokenizer()
        # The byte tokenizer's own end-of-turn ids replace the preset's, which index a vocabulary we lack.
        hf_config = {**hf_config, "eos_token_id": tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])}
    return _finish(ModelConfig.from_hf_dict(hf_config), None, tokenizer, config, dtype, device, name)


def _read_json(path: Path, field: str) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{field}: {str(path.parent)!r} has no {path.name}")
    return json.loads(path.read_text())


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        names = sorted(p.name for p in path.glob("*.safetensors"))
    if not names:
        raise ValueError(f"model: {str(path)!r} has no *.safetensors weights")
    return [path / name for name in names]


def _safetensors_weights(path: Path, files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    with tqdm(desc=f"Loading {path.name}", unit="tensor") as bar:
        for file in files:
            with safe_open(str(file), framework="pt") as shard:
                for key in shard.keys():
                    yield key, shard.get_tensor(key)
                    bar.update()
