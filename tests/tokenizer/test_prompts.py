from __future__ import annotations

import random

import pytest

from minisrv.tokenizer.prompts import PromptError, PromptTokenizer, resolve_chat_template
from tests.conftest import CHATML, random_text


def test_chat_is_rendered_with_the_template_and_tokenized(hf_tokenizer) -> None:
    rng = random.Random(3)
    messages = [("system", random_text(rng, 12)), ("user", random_text(rng, 20))]
    ids = PromptTokenizer(hf_tokenizer, CHATML).token_ids(messages, is_chat=True)
    expected = "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in messages) + "<|im_start|>assistant\n"
    assert hf_tokenizer.decode(ids) == expected
    assert ids.count(hf_tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3


def test_generation_prompt_can_be_left_out(hf_tokenizer) -> None:
    ids = PromptTokenizer(hf_tokenizer, CHATML).token_ids([("user", "hé 你好")], True, add_generation_prompt=False)
    assert hf_tokenizer.decode(ids) == "<|im_start|>user\nhé 你好<|im_end|>\n"


def test_text_and_token_prompts(hf_tokenizer) -> None:
    prompts = PromptTokenizer(hf_tokenizer, None)
    text = random_text(random.Random(5), 30)
    assert hf_tokenizer.decode(prompts.token_ids(text, is_chat=False)) == text
    ids = [random.Random(6).randrange(300) for _ in range(9)]
    assert prompts.token_ids(ids, is_chat=False) == ids


def test_chat_errors_are_client_errors(hf_tokenizer) -> None:
    with pytest.raises(PromptError, match="no chat template.*--chat-template"):
        PromptTokenizer(hf_tokenizer, None).token_ids([("user", "hi")], is_chat=True)
    with pytest.raises(PromptError, match="rejected.*unknown role tool"):
        PromptTokenizer(hf_tokenizer, CHATML).token_ids([("tool", "hi")], is_chat=True)
    with pytest.raises(PromptError, match="messages must not be empty"):
        PromptTokenizer(hf_tokenizer, CHATML).token_ids([], is_chat=True)


def test_chat_template_option(hf_tokenizer, tmp_path) -> None:
    assert resolve_chat_template(None, hf_tokenizer) == CHATML
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[0]['content'] }}")
    assert resolve_chat_template(str(path), hf_tokenizer) == "{{ messages[0]['content'] }}"
    assert resolve_chat_template("{% for m in messages %}x{% endfor %}", hf_tokenizer).startswith("{%")
    with pytest.raises(ValueError, match="--chat-template"):
        resolve_chat_template(str(tmp_path / "missing.jinja"), hf_tokenizer)


def test_continue_final_message_leaves_the_last_message_open(hf_tokenizer) -> None:
    prompts = PromptTokenizer(hf_tokenizer, CHATML)
    messages = [("user", "hi"), ("assistant", "The answer is")]
    ids = prompts.token_ids(messages, True, add_generation_prompt=False, continue_final_message=True)
    assert hf_tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nThe answer is"


def test_chat_template_kwargs_reach_the_template(hf_tokenizer) -> None:
    template = CHATML + "{% if enable_thinking is defined and not enable_thinking %}<no-think>{% endif %}"
    prompts = PromptTokenizer(hf_tokenizer, template)
    plain = hf_tokenizer.decode(prompts.token_ids([("user", "hi")], True))
    off = hf_tokenizer.decode(prompts.token_ids([("user", "hi")], True, template_kwargs={"enable_thinking": False}))
    assert off == plain + "<no-think>"
