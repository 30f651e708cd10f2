"""Dummy weights: named preset configs (published config.json contents) with seeded random weights.

For benchmarks on machines that have no checkpoint (and possibly no network): the model has the real
shapes, so speed and memory are the real ones, while the text is noise. A preset has no tokenizer files, so
it is served with a byte-level vocabulary declared here (built by minisrv/tokenizer/byte_tokenizer.py):
ids 0-255 are the bytes, then the special tokens, and generation ends at <|im_end|> or <|endoftext|>.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from minisrv.models.config import ModelConfig
from minisrv.models.llama import CausalLM
from minisrv.models.weights import checkpoint_targets, load_weights

PRESETS_DIR = Path(__file__).parent / "presets"
DEFAULT_INIT_STD = 0.02
LOGIT_STD = 3.0
_VOCAB_MATRICES = ("model.embed_tokens.weight", "lm_head.weight")

NUM_BYTE_TOKENS = 256
BYTE_VOCAB_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")   # ids 256, 257, 258
BYTE_VOCAB_EOS_IDS = [NUM_BYTE_TOKENS + BYTE_VOCAB_SPECIALS.index(t) for t in ("<|im_end|>", "<|endoftext|>")]


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def load_preset(name: str) -> dict[str, Any]:
    """The config.json dict of a preset; ValueError listing the presets when `name` is not one."""
    path = PRESETS_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"model: {name!r} is not a preset; presets are {', '.join(preset_names())}")
    return json.loads(path.read_text())


def dummy_checkpoint(config: ModelConfig, seed: int, device: torch.device,
                     std: float = DEFAULT_INIT_STD) -> Iterator[tuple[str, torch.Tensor]]:
    """A seeded random checkpoint of `config`, tensor by tensor, under Hugging Face's names (fast even for 8B on
    a GPU). Every rank of a tensor-parallel group draws the same whole tensors and keeps its part, so a model
    split over ranks is the very model one rank would hold.

    Norm weights are 1, projections N(0, std). The embedding / LM head rows get std LOGIT_STD / sqrt(hidden):
    the final norm makes the hidden state unit-RMS, so logits then spread with a standard deviation of about
    LOGIT_STD, like a trained model's: sampling neither degenerates to uniform noise nor to one token.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    vocab_std = LOGIT_STD / math.sqrt(config.hidden_size)
    for name, target in checkpoint_targets(config).items():
        if name.endswith("norm.weight"):
            yield name, torch.ones(target.shape, device=device)
        else:
            tensor = torch.empty(target.shape, device=device)
            yield name, tensor.normal_(0.0, vocab_std if name in _VOCAB_MATRICES else std, generator=generator)


def init_dummy_weights(model: CausalLM, seed: int, std: float = DEFAULT_INIT_STD) -> None:
    """Fill `model` (this rank's part) from dummy_checkpoint on the model's device."""
    device = next(model.parameters()).device
    load_weights(model, dummy_checkpoint(model.config, seed, device, std))
