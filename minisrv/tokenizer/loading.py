"""The model's tokenizer without its weights, for the tokenizer workers, the detokenizer and the offline API.

The source is resolved once, by minisrv/models/source.py, for the engine and this side alike. The
detokenizer needs only the `tokenizers` library's Tokenizer: read straight from tokenizer.json it costs
0.25 s and 76 MB, against 3.7 s and 395 MB through transformers (which imports torch), measured on the
embedded model.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer

from minisrv.models.source import ModelSource

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def load_fast_tokenizer(source: ModelSource) -> Tokenizer:
    """The `tokenizers` Tokenizer alone (decoding needs no chat template), without transformers when it can."""
    if source.format == "hf" and (source.path / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(source.path / "tokenizer.json"))
    return load_tokenizer(source).backend_tokenizer


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    if source.format == "preset":
        from minisrv.tokenizer.byte_tokenizer import build_byte_tokenizer

        return build_byte_tokenizer()
    if source.format == "gguf":
        from minisrv.models.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(source.path)
    return _from_hf_dir(source.path)


def _from_hf_dir(path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer   # here, not at import: the launcher imports this module's users

    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise ValueError(f"model: {str(path)!r} has no tokenizer (tokenizer.json or tokenizer_config.json)")
    return AutoTokenizer.from_pretrained(str(path))
