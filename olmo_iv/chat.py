"""Prompts as a model expects them: its own chat template, rendered with jinja2 as transformers renders it, or a
plain format for base models.

    text = format_prompt(model, "Write a haiku about rain.")                 # the checkpoint's chat template
    text = format_prompt(model, "Write a haiku about rain.", style="qa")     # "Q: ...\nA:" for a base model

The template is the `chat_template` of the checkpoint's tokenizer_config.json (OLMo-2-Instruct's Tülu format,
OLMo-3's ChatML with its default system prompt, or any other). It runs in jinja2's immutable sandbox: a template
is data from a checkpoint, so it may not call arbitrary Python.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from olmo_iv.errors import OlmoIVError

STYLES = ("auto", "chat", "plain", "qa")
"""auto: the chat template where the checkpoint has one, else plain. chat: the template (an error without one).
plain: the message as it is. qa: "Q: {message}\\nA:", the usual base-model format."""


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<|endoftext|>", ...} in some tokenizer configs
        return value.get("content")
    return value


def read_chat_config(folder: str | Path) -> tuple[str | None, dict[str, str]]:
    """(chat template or None, special tokens) from a checkpoint folder's tokenizer_config.json."""
    path = Path(folder) / "tokenizer_config.json"
    jinja = Path(folder) / "chat_template.jinja"  # where recent transformers versions save the template
    if not path.exists():
        return (jinja.read_text(encoding="utf-8") if jinja.exists() else None), {}
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise OlmoIVError(f"{path} is not valid JSON text: {err}") from None
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: the "default" one is the chat template
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None and jinja.exists():
        template = jinja.read_text(encoding="utf-8")
    if template is not None and not isinstance(template, str):
        raise OlmoIVError(f"{path}: chat_template must be a string or a list of named templates")
    tokens = {k: _token_text(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return template, {k: v for k, v in tokens.items() if v is not None}


@lru_cache(maxsize=16)
def _compile(template: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise OlmoIVError(f"the chat template refused the messages: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as err:
        raise OlmoIVError(f"the chat template is not valid jinja: {err}") from None


def render_chat(template: str, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True,
                special_tokens: dict[str, str] | None = None) -> str:
    """The text of `messages` ([{"role": "user", "content": ...}, ...]) under `template`, with the assistant's
    turn opened when add_generation_prompt (the generation prompt), as transformers' apply_chat_template."""
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise OlmoIVError(f"messages= holds {m!r}: each message is a dict with 'role' and 'content'")
    return _compile(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                     **(special_tokens or {}))


def format_prompt(model, message: str, *, style: str = "auto", system: str | None = None) -> str:
    """One user message as the prompt text for `model` (see STYLES). A system message, if given, goes first."""
    if style not in STYLES:
        raise OlmoIVError(f"style={style!r}: use one of {', '.join(STYLES)}")
    template = getattr(model, "chat_template", None)
    if style == "chat" and template is None:
        raise OlmoIVError(f"model {getattr(model, 'name_or_path', None)!r} has no chat template (no chat_template "
                          "in its tokenizer_config.json): use style='plain' or style='qa' for a base model")
    if style == "qa":
        return f"Q: {message}\nA:"
    if style == "plain" or template is None:
        return message
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": message}]
    return render_chat(template, messages, special_tokens=getattr(model, "special_tokens", None))
