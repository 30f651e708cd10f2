"""The ops the model and the sampler run on: the PyTorch reference (every device) or the CUDA kernels of csrc/.

Both modules, `reference` and `cuda`, offer the same functions with the same signatures; `select_ops`
picks one for the model runner, which binds it to the model's layers.
"""
from __future__ import annotations

from types import ModuleType

import torch

from minisrv.kernels import reference


def select_ops(backend: str, device: torch.device) -> ModuleType:
    """`backend` is EngineConfig.kernel_backend: "torch", "cuda", or "auto" (CUDA kernels on a CUDA device when
    CuPy is installed, else the reference). Asking for "cuda" where it cannot run is a ValueError saying why."""
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return reference
    from minisrv.kernels import cuda

    problem = "the device is not a CUDA device" if device.type != "cuda" else cuda.unsupported()
    if problem is None:
        return cuda
    if backend == "cuda":
        raise ValueError(f"kernel_backend (--kernel-backend) cuda: {problem}")
    return reference
