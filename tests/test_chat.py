"""Chat templates render exactly as transformers renders them; the prompt styles; a template saved with a model
loads back."""

from __future__ import annotations

import pytest

import olmo_iv
from olmo_iv import OlmoIVError
from olmo_iv.chat import format_prompt, render_chat

# Our own wording of the two formats the issue names: OLMo-2-Instruct's Tülu turns, and ChatML with a default
# system prompt as OLMo-3 uses.
TULU = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ '<|system|>\\n' + message['content'] + '\\n' }}{% elif message['role'] == 'user' %}"
        "{{ '<|user|>\\n' + message['content'] + '\\n' }}{% elif message['role'] == 'assistant' %}"
        "{{ '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}{% endif %}"
        "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}{% endfor %}")
CHATML = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
          "{% endif %}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
MESSAGES = [
    [{"role": "user", "content": "Write a haiku about rain."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour, in French."}],
]


@pytest.mark.parametrize("template", [TULU, CHATML], ids=["tulu", "chatml"])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_rendering_equals_transformers(template, generation_prompt):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=olmo_iv.load("toy").tokenizer, bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>")
    tok.chat_template = template
    for messages in MESSAGES:
        want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        got = render_chat(template, messages, add_generation_prompt=generation_prompt,
                          special_tokens={"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"})
        assert got == want


def test_styles_and_a_saved_template(tmp_path):
    model = olmo_iv.load("toy")
    assert model.chat_template is None
    assert format_prompt(model, "Hi") == "Hi" and format_prompt(model, "Hi", style="qa") == "Q: Hi\nA:"
    with pytest.raises(OlmoIVError, match="no chat template"):
        format_prompt(model, "Hi", style="chat")
    model.chat_template, model.special_tokens = TULU, {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    olmo_iv.save(model, tmp_path / "m")
    again = olmo_iv.load(tmp_path / "m")
    assert format_prompt(again, "Hi") == "<|endoftext|><|user|>\nHi\n<|assistant|>\n"  # the last token: "\n"
    with pytest.raises(OlmoIVError, match="style="):
        format_prompt(again, "Hi", style="tulu")
    with pytest.raises(OlmoIVError, match="role"):
        render_chat(TULU, [{"content": "no role"}])


def test_a_template_cannot_reach_python():
    with pytest.raises(Exception, match="unsafe|not safely|access"):
        render_chat("{{ messages.__class__.__mro__[1].__subclasses__() }}", [{"role": "user", "content": "x"}])
