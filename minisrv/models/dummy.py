"""Dummy weights: named preset configs (published config.json contents) with seeded random weights.

For benchmarks on machines that have no checkpoint (and possibly no network): the model has the real
shapes, so speed and memory are the real ones, while the text is noise.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from minisrv.models.llama import CausalLM

PRESETS_DIR = Path(__file__).parent / "presets"
DEFAULT_INIT_STD = 0.02


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def load_preset(name: str) -> dict[str, Any]:
    """The config.json dict of a preset; ValueError listing the presets when `name` is not one."""
    path = PRESETS_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"model: {name!r} is not a preset; presets are {', '.join(preset_names())}")
    return json.loads(path.read_text())


@torch.no_grad()
def init_dummy_weights(model: CausalLM, seed: int, std: float = DEFAULT_INIT_STD) -> None:
    """Fill every parameter from one seeded generator on the model's device (fast even for 8B on a GPU).

    Norm weights are 1 and everything else N(0, std): with unit-RMS hidden states the logits then have a
    standard deviation of about std * sqrt(hidden_size), neither flat nor one-hot.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith("qk_norm"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, std, generator=generator)
