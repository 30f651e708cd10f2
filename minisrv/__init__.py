"""minisrv: a small, fast LLM inference server."""
from __future__ import annotations

__version__ = "0.1.0"

from minisrv.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # LLM pulls in torch and the engine; keep `import minisrv` (and `minisrv --help`) light.
    if name == "LLM":
        from minisrv.llm import LLM

        return LLM
    raise AttributeError(name)
