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

from minisrv.config import flag_name
from minisrv.models.source import TOKENIZER_FILES, ModelSource, model_vocab_size

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def load_fast_tokenizer(source: ModelSource) -> Tokenizer:
    """The `tokenizers` Tokenizer alone (decoding needs no chat template), without transformers when it can."""
    folder = _tokenizer_dir(source)
    if folder is not None and (folder / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    return load_tokenizer(source).backend_tokenizer


def check_vocabulary(source: ModelSource) -> None:
    """ValueError naming --tokenizer when the tokenizer given there has ids the model has no embedding row for."""
    if source.tokenizer_path is None:   # the model's own tokenizer fits it
        return
    tokens, rows = load_fast_tokenizer(source).get_vocab_size(with_added_tokens=True), model_vocab_size(source)
    if tokens > rows:
        raise ValueError(f"tokenizer: {str(source.tokenizer_path)!r} has {tokens} tokens, more than the model's "
                         f"{rows} ({flag_name('tokenizer')})")


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    if source.tokenizer_path is not None:
        return _from_hf_dir(source.tokenizer_path)
    if source.format == "preset":
        from minisrv.tokenizer.byte_tokenizer import build_byte_tokenizer

        return build_byte_tokenizer()
    if source.format == "gguf":
        from minisrv.models.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(source.path)
    return _from_hf_dir(source.path)


def _from_hf_dir(path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer   # here, not at import: the launcher imports this module's users

    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"model: {str(path)!r} has no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    return AutoTokenizer.from_pretrained(str(path))


def _tokenizer_dir(source: ModelSource) -> Path | None:
    return source.tokenizer_path or (source.path if source.format == "hf" else None)
