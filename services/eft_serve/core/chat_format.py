"""Chat prompts → one model's prompt token ids, in the format that model should see.

Owns the three prompt formats a recipe can give each of its models (`RecipeConfig.prompt_format`):

* ``own`` (the default for every role): the model's own chat template (the tokenizer's
  ``chat_template``, applied by transformers' ``apply_chat_template`` with
  ``add_generation_prompt=True``; control tokens typed inside messages are encoded as plain text);
  a tokenizer without a template falls back to ``plain``.
* ``plain``: the transcript ``System: …\\nUser: …\\nAssistant: …\\nAssistant:`` (one line per
  message, ending with the generation prompt ``Assistant:``), encoded exactly as the same text
  sent as a plain ``prompt`` would be.
* a Jinja template string: rendered with ``messages`` (list of ``{role, content}``),
  ``add_generation_prompt`` (always true), ``bos_token``, ``eos_token`` and ``raise_exception``, in
  a sandbox with the same whitespace rules as Hugging Face chat templates (``trim_blocks``,
  ``lstrip_blocks``); the text is encoded without adding special tokens (the template places
  its own, as a chat template does).

Does NOT know recipes, pools, requests or the config tree: callers hand in the messages, the
format and the model's tokenizer. Validation of message roles is the caller's
(`coordinator.validate`); a template that fails to compile or render raises `ValueError`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal, Protocol

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant")
PLAIN_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
FormatKind = Literal["own", "plain", "template"]


class ChatTurn(Protocol):
    """Anything with a role and a content (`coordinator.request.ChatMessage`)."""

    @property
    def role(self) -> str: ...

    @property
    def content(self) -> str: ...


def plain_transcript(messages: Sequence[ChatTurn]) -> str:
    """The documented fallback format: one ``Role: content`` line per message, then ``Assistant:``."""
    lines = [f"{PLAIN_NAMES[m.role]}: {m.content}" for m in messages]
    return "\n".join([*lines, f"{PLAIN_NAMES['assistant']}:"])


def _raise(message: str) -> None:
    # What HF chat templates call to reject a conversation (e.g. roles out of order).
    raise ValueError(message)


@functools.lru_cache(maxsize=64)
def compile_template(source: str) -> Any:
    """The compiled template (cached); `ValueError` naming the problem when it does not compile."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise ValueError(f"prompt template does not compile: {e}") from e


def render_template(source: str, messages: Sequence[ChatTurn], tokenizer: Any) -> str:
    """The text of a Jinja prompt template for `messages` (see the module docstring for its variables)."""
    try:
        return str(
            compile_template(source).render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=True,
                bos_token=getattr(tokenizer, "bos_token", None) or "",
                eos_token=getattr(tokenizer, "eos_token", None) or "",
            )
        )
    except TemplateError as e:
        raise ValueError(f"prompt template failed to render: {e}") from e


def has_own_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) and hasattr(tokenizer, "apply_chat_template")


def effective_kind(kind: FormatKind, tokenizer: Any) -> FormatKind:
    """What `kind` means for this tokenizer: ``own`` without a chat template is ``plain``."""
    return "plain" if kind == "own" and not has_own_template(tokenizer) else kind


def _encode_verbatim(tokenizer: Any, text: str) -> list[int]:
    # The text already holds every special token it needs; tokenizers without the keyword
    # (test tokenizers) add none anyway.
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:
        return list(tokenizer.encode(text))


def render_chat(
    messages: Sequence[ChatTurn], kind: FormatKind, tokenizer: Any, template: str | None = None
) -> list[int]:
    """Prompt token ids of `messages` for a model with `tokenizer`, in format `kind`."""
    kind = effective_kind(kind, tokenizer)
    if kind == "own":
        try:
            ids = tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
                # Control tokens typed by a user (e.g. "<|endoftext|>") stay text, never real specials.
                sanitize_control_tokens=True,
            )
        except TemplateError as e:  # the template rejected the conversation (raise_exception)
            raise ValueError(f"the model's chat template rejected the messages: {e}") from e
        return [int(i) for i in ids]
    if kind == "plain":
        return list(tokenizer.encode(plain_transcript(messages)))
    if template is None:
        raise ValueError("a template prompt format needs its template string")
    return _encode_verbatim(tokenizer, render_template(template, messages, tokenizer))
