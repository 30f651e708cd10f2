"""Engine and server configuration: one dataclass each, shared by the CLI, the offline API and workers."""
from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MODEL = "embedded"  # SmolLM2-135M-Instruct, fetched and converted on first use


@dataclass
class EngineConfig:
    """Everything the engine (model, KV cache, scheduler, sampler) needs; picklable for spawn."""

    model: str = DEFAULT_MODEL          # "embedded", a HF directory, a .gguf file, or a preset name
    load_format: str = "auto"           # "auto" | "dummy" (random weights for a preset config)
    device: str = "auto"                # "auto" | "cpu" | "cuda"
    dtype: str = "auto"                 # "auto" | "float32" | "bfloat16" | "float16"
    tp_size: int = 1
    page_size: int = 16
    kv_cache_memory: float | None = None   # GiB for the KV pool; None: a default (CPU) or a fraction (CUDA)
    num_pages: int | None = None           # explicit pool size in pages; wins over kv_cache_memory
    gpu_memory_fraction: float = 0.85      # share of free GPU memory for the KV pool when not given
    max_num_batched_tokens: int = 2048     # per-step token budget (prefill chunks + decode tokens)
    max_running_requests: int = 256
    max_model_len: int | None = None       # None: the model's context length
    enable_prefix_cache: bool = True
    chat_template: str | None = None       # a Jinja template string or a path to one
    seed: int = 0                          # seeds dummy weights and unseeded requests' seed draw
    cpu_threads: int | None = None         # CPU device: PyTorch intra-op threads; None: every core

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.resolved_device() == "cuda" else "float32"


@dataclass
class ServerConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None   # None: derived from the model path
    num_tokenizers: int = 1
    api_key: str | None = None
    log_level: str = "info"
