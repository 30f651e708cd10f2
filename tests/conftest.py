"""Shared fixtures: small tokenizers built in code (no downloads) with the decoders real models use."""
from __future__ import annotations

import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


@pytest.fixture(autouse=True)
def cpu_without_native_bfloat16(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process engines resolve `--dtype auto` as on a CPU without AMX or AVX512-BF16 (float32), so that what a
    test compares with transformers' float32 does not depend on the CPU of the machine it runs on; tests of
    bfloat16 ask for it. Servers in child processes are told `--dtype` where it matters."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)


# Scripts where one character is several UTF-8 bytes, so tokens split characters.
ALPHABETS = [
    "abcdefghijklmnopqrstuvwxyz ,.!?",
    "你好世界中文字符测试模型服务器",
    "こんにちはカタカナ",
    "éèàüößçñ",
    "🎉😀🚀👍🏽👨‍👩‍👧",
]


def random_text(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(rng.choice(ALPHABETS)) for _ in range(length))


@pytest.fixture(scope="session")
def byte_level_tokenizer() -> Tokenizer:
    """GPT-2 style byte-level BPE (as SmolLM2, Llama 3, Qwen): merges cut multi-byte characters apart."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|im_end|>"],
        show_progress=False,
    )
    rng = random.Random(1)
    tok.train_from_iterator([random_text(rng, 40) for _ in range(300)], trainer=trainer)
    return tok


@pytest.fixture(scope="session")
def byte_fallback_tokenizer() -> Tokenizer:
    """SentencePiece style (Llama 2, Mistral): characters outside the vocabulary become <0xNN> tokens."""
    pieces = ["<unk>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += ["▁", "a", "b", "c", "h", "e", "l", "o", "▁h", "he", "ll", "llo", "你", "好", "é"]
    vocab = {p: i for i, p in enumerate(pieces)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "h"), ("h", "e"), ("l", "l"), ("ll", "o")],
                               unk_token="<unk>", byte_fallback=True))
    tok.add_special_tokens(["</s>"])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    return tok


CHATML = (
    "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def hf_tokenizer(byte_level_tokenizer: Tokenizer):
    """The byte-level tokenizer as transformers wraps it, with a ChatML chat template."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=byte_level_tokenizer, eos_token="<|im_end|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = CHATML
    return tok
