"""The byte-level tokenizer that dummy presets are served with."""
from __future__ import annotations

from minisrv.tokenizer.byte_tokenizer import CHATML_TEMPLATE, build_byte_tokenizer


def test_byte_tokenizer_round_trips_any_text():
    tokenizer = build_byte_tokenizer()
    text = "héllo wörld 🎉\n\t<|im_start|>x"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids[:2] == [ord("h"), 0xC3] and tokenizer.convert_tokens_to_ids("<|im_start|>") in ids
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) == 259 and tokenizer.chat_template == CHATML_TEMPLATE
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
