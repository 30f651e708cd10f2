"""The model's tokenizer without its weights, for the tokenizer workers and the detokenizer.

Mirrors the sources of minisrv/models/loader.py `load_model` (which the scheduler runs, and which
reports a bad --model precisely); only the tokenizer is built here. The detokenizer needs only the
`tokenizers` library's Tokenizer: read straight from tokenizer.json it costs 0.25 s and 76 MB, against
3.7 s and 395 MB through transformers (which imports torch), measured on the embedded model.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer

from minisrv.config import EngineConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def load_fast_tokenizer(config: EngineConfig) -> Tokenizer:
    """The `tokenizers` Tokenizer alone (decoding needs no chat template), without transformers when it can."""
    json_file = Path(config.model).expanduser() / "tokenizer.json"
    if config.load_format != "dummy" and json_file.is_file():
        return Tokenizer.from_file(str(json_file))
    return load_tokenizer(config).backend_tokenizer


def load_tokenizer(config: EngineConfig) -> PreTrainedTokenizerBase:
    path = Path(config.model).expanduser()
    if config.load_format == "dummy":
        if path.is_dir():
            return _from_hf_dir(path)
        from minisrv.models.byte_tokenizer import build_byte_tokenizer

        return build_byte_tokenizer()
    if config.model == "embedded":
        from minisrv.models.embedded import embedded_model_dir

        return _from_hf_dir(embedded_model_dir())
    if path.suffix == ".gguf":
        from minisrv.models.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    if path.is_dir():
        return _from_hf_dir(path)
    raise ValueError(f"model: {config.model!r} is not 'embedded', a Hugging Face directory or a .gguf file")


def _from_hf_dir(path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer   # here, not at import: the launcher imports this module's users

    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise ValueError(f"model: {str(path)!r} has no tokenizer (tokenizer.json or tokenizer_config.json)")
    return AutoTokenizer.from_pretrained(str(path))
