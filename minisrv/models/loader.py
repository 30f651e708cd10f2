"""One entry point, `load_model(EngineConfig) -> LoadedModel`, for every source of weights (models/source.py).

The loader reads weights and shapes only; tokenizers are the tokenizer side's (minisrv/tokenizer/loading.py).
"""
from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from minisrv.config import EngineConfig
from minisrv.layers.parallel import TensorParallel
from minisrv.models.config import ModelConfig, as_id_list
from minisrv.models.llama import CausalLM
from minisrv.models.source import ModelSource, resolve_source
from minisrv.models.weights import load_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: CausalLM
    model_config: ModelConfig
    eos_token_ids: list[int]
    max_model_len: int
    name: str                       # what the server reports as the model id
    checkpoint_bits: int | None = None   # bits per weight of the checkpoint's projections when it was quantized


def resolve_dtype(config: EngineConfig) -> torch.dtype:
    name = config.resolved_dtype()
    if name == "float16" and config.resolved_device() == "cpu":
        raise ValueError("dtype: float16 is only supported on CUDA; use float32 or bfloat16 on the CPU")
    return DTYPES[name]


def load_model(config: EngineConfig, source: ModelSource | None = None,
               tp: TensorParallel = TensorParallel()) -> LoadedModel:
    """The model `config` names (resolved here unless the caller resolved it already), on its device; under
    tensor parallelism, this rank's part of it (every checkpoint tensor is read, its part kept)."""
    source = source or resolve_source(config)
    dtype, device = resolve_dtype(config), torch.device(config.resolved_device())
    tokenizer_path = source.tokenizer_path
    # vLLM stops on its tokenizer's end of sequence too: --tokenizer's adds to the model's own.
    tokenizer_eos = () if tokenizer_path is None else _tokenizer_eos_ids(tokenizer_path)
    load = functools.partial(_finish, config=config, dtype=dtype, device=device, tp=tp, tokenizer_eos=tokenizer_eos)
    if source.format == "preset":
        from minisrv.models.dummy import BYTE_VOCAB_EOS_IDS, load_preset

        # The vocabulary's end-of-turn ids (the byte-level one's, or --tokenizer's) replace the preset's, which
        # index a vocabulary we lack.
        eos = BYTE_VOCAB_EOS_IDS if tokenizer_path is None else _tokenizer_eos_ids(tokenizer_path)
        hf_config = {**load_preset(source.name), "eos_token_id": eos}
        return load(ModelConfig.from_hf_dict(hf_config), None, name=source.name)
    if source.format == "gguf":
        from minisrv.models.gguf import GGUFCheckpoint

        checkpoint = GGUFCheckpoint(source.path)
        weights = tqdm(checkpoint.tensors(), total=len(checkpoint), desc="Loading GGUF", unit="tensor")
        return load(ModelConfig.from_hf_dict(checkpoint.hf_config), weights, name=source.name,
                    checkpoint_bits=checkpoint.projection_bits)
    path = source.path
    model_config = ModelConfig.from_hf_dict(_read_json(path / "config.json", "model"))
    weights = None if source.dummy else _safetensors_weights(path, _safetensors_files(path))
    return load(model_config, weights, name=source.name, extra_eos=_extra_eos_ids(path, model_config),
                checkpoint_bits=None if source.dummy else source.converted_from_bits)


def build_model(model_config: ModelConfig, max_model_len: int, dtype: torch.dtype, device: torch.device,
                tp: TensorParallel = TensorParallel()) -> CausalLM:
    """Allocate the model (this rank's part) on `device` without initializing it (weights are about to be
    overwritten)."""
    with torch.device("meta"):
        model = CausalLM(model_config, max_model_len, device, tp)
    model = model.to(dtype).to_empty(device=device).eval()
    model.tie_weights()
    return model


def _finish(model_config: ModelConfig, weights: Iterable[tuple[str, torch.Tensor]] | None, *, config: EngineConfig,
            dtype: torch.dtype, device: torch.device, tp: TensorParallel, name: str,
            extra_eos: Iterable[int] = (), tokenizer_eos: Iterable[int] = (),
            checkpoint_bits: int | None = None) -> LoadedModel:
    max_model_len = _max_model_len(config, model_config)
    model = build_model(model_config, max_model_len, dtype, device, tp)
    if weights is None:
        from minisrv.models.dummy import init_dummy_weights

        init_dummy_weights(model, config.seed)
    else:
        load_weights(model, weights)
    eos = sorted({*model_config.eos_token_ids, *extra_eos, *tokenizer_eos})
    return LoadedModel(model, model_config, eos, max_model_len, name, checkpoint_bits)


def _max_model_len(config: EngineConfig, model_config: ModelConfig) -> int:
    limit = model_config.context_length
    if config.max_model_len is None:
        return limit
    if not 1 <= config.max_model_len <= limit:
        raise ValueError(f"max_model_len: must be in [1, {limit}] (the model's context length), "
                         f"got {config.max_model_len}")
    return config.max_model_len


def _extra_eos_ids(path: Path, model_config: ModelConfig) -> list[int]:
    """End-of-sequence ids beyond config.json's: generation_config.json's (what HF generate() stops on, often
    more than config.json lists); where neither names one, the tokenizer's eos_token, looked up in tokenizer.json."""
    found = _generation_eos_ids(path)
    return found if found or model_config.eos_token_ids else _eos_token_id(path)


def _tokenizer_eos_ids(path: Path) -> list[int]:
    """--tokenizer's end-of-sequence ids: its eos_token, and its generation_config.json's when the directory (a Hub
    model's, fetched for its tokenizer) has one."""
    return sorted({*_generation_eos_ids(path), *_eos_token_id(path)})


def _generation_eos_ids(path: Path) -> list[int]:
    generation = path / "generation_config.json"
    return as_id_list(json.loads(generation.read_text()).get("eos_token_id")) if generation.is_file() else []


def _eos_token_id(path: Path) -> list[int]:
    """The tokenizer's eos_token (tokenizer_config.json) as its id in tokenizer.json, when both files are there."""
    tokenizer_config, tokenizer_json = path / "tokenizer_config.json", path / "tokenizer.json"
    if not (tokenizer_config.is_file() and tokenizer_json.is_file()):
        return []
    eos = json.loads(tokenizer_config.read_text()).get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    vocab = json.loads(tokenizer_json.read_text())
    ids = dict((vocab.get("model") or {}).get("vocab") or {})
    ids.update({t["content"]: t["id"] for t in vocab.get("added_tokens", [])})
    return [ids[eos]] if isinstance(eos, str) and isinstance(ids.get(eos), int) else []


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
