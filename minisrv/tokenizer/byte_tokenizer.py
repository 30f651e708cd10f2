"""An offline tokenizer for dummy-weight models: 256 byte tokens plus the ChatML special tokens.

Machines that run `load_format="dummy"` benchmarks may have no network and no tokenizer files, yet the
server still has to tokenize, apply a chat template and detokenize. Byte-level BPE without merges encodes
any text (one token per UTF-8 byte) and decodes incrementally like any real byte-level tokenizer.
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from minisrv.models.dummy import BYTE_VOCAB_SPECIALS

ENDOFTEXT, IM_START, IM_END = BYTE_VOCAB_SPECIALS

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """Token id b is byte b (in GPT-2's printable byte alphabet); specials follow at 256.."""
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(BYTE_VOCAB_SPECIALS))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=IM_END, pad_token=ENDOFTEXT,
                                        unk_token=None, bos_token=None)
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer
