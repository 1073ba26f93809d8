"""Chat prompts: the checkpoint's jinja2 chat template (as HF's ``apply_chat_template`` renders it),
with the Jamba-1.5 format as the fallback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Jamba-1.5: <|startoftext|><|bom|><|system|> {sys}<|eom|><|bom|><|user|> {msg}<|eom|><|bom|><|assistant|>
JAMBA_15_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|bom|><|{{ m['role'] }}|> {{ m['content'] }}<|eom|>{% endfor %}"
    "{% if add_generation_prompt %}<|bom|><|assistant|>{% endif %}"
)
DEFAULT_SPECIAL_TOKENS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>"}


def _raise(message):
    raise TemplateError(message)


def _token_text(value):
    """``tokenizer_config.json`` stores special tokens as strings or as ``{"content": ...}`` objects."""
    return value.get("content") if isinstance(value, dict) else value


def load_chat_template(checkpoint_dir: str | Path | None) -> tuple[str, dict[str, str]]:
    """(template, special tokens) from ``tokenizer_config.json`` (or ``chat_template.jinja``), else the
    Jamba-1.5 fallback."""
    template, tokens = JAMBA_15_TEMPLATE, dict(DEFAULT_SPECIAL_TOKENS)
    if checkpoint_dir is None:
        return template, tokens
    directory = Path(checkpoint_dir)
    config_file = directory / "tokenizer_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            if config.get(name) is not None:
                tokens[name] = _token_text(config[name])
        chat_template = config.get("chat_template")
        if isinstance(chat_template, list):  # named templates: take "default"
            chat_template = {t["name"]: t["template"] for t in chat_template}.get("default")
        if chat_template:
            template = chat_template
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        template = jinja_file.read_text()
    return template, tokens


MAX_RENDERED_CHARS = 1 << 24  # a rendered prompt longer than this is refused (a template can loop)


def render_chat(messages: Sequence[dict], template: str = JAMBA_15_TEMPLATE,
                special_tokens: dict[str, str] | None = None, add_generation_prompt: bool = True,
                max_chars: int = MAX_RENDERED_CHARS) -> str:
    """The prompt text for ``messages`` (``[{"role": ..., "content": ...}, ...]``); rendering stops with a
    ``ValueError`` once the text passes ``max_chars`` characters."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content'")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    try:
        pieces = env.from_string(template).generate(messages=list(messages),
                                                    add_generation_prompt=add_generation_prompt,
                                                    **(special_tokens or DEFAULT_SPECIAL_TOKENS))
        text, size = [], 0
        for piece in pieces:  # streamed, so an unbounded template is stopped, not rendered whole
            text.append(piece)
            size += len(piece)
            if size > max_chars:
                raise ValueError(f"the chat template rendered more than {max_chars:,} characters; "
                                 "check the template and the messages")
        return "".join(text)
    except (TemplateError, OverflowError, RecursionError) as e:  # the sandbox's limits raise the last two
        raise ValueError(f"chat template error: {e}") from None
