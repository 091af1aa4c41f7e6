"""Turning chat messages into the one prompt string a model was trained on (contract section 2).

Llama 2 and Mistral are rendered by hand, the way the public Workers AI service renders them (which
is not what their Hugging Face Jinja templates do for the first turn). Every other model brings its
own Jinja template, rendered the way `transformers`' `apply_chat_template` does, so a prompt built
here tokenizes exactly as it would there; system messages a template refuses are folded into the next
user turn (SystemRole). No torch here: the server renders prompts itself.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from loraserve.types import ChatMessage

DEFAULT_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def unscoped_messages(prompt: str) -> list[ChatMessage]:
    """An "unscoped" prompt (`{prompt}` without `raw`) as the public service sees it."""
    return [
        ChatMessage(role="system", content=DEFAULT_SYSTEM_PROMPT),
        ChatMessage(role="user", content=prompt),
    ]


class TemplateKind(enum.Enum):
    LLAMA2 = "llama2"
    MISTRAL = "mistral"
    JINJA = "jinja"


class SystemRole(enum.Enum):
    """What a Jinja template does with system messages.

    Workers AI takes system messages for every text model (its examples send one to gemma-7b-it-lora),
    and an unscoped `{prompt}` always brings one (unscoped_messages). Gemma's templates have no system
    role: Gemma 1 and 2's raise on one; Gemma 3's prepends a leading one to the first user turn
    ("S\n\nU") and raises on a later one. So a system message a template refuses is folded the way
    Gemma 3's own template folds it, into the next user turn, which is also Google's advice for Gemma
    (system instructions go in the user's prompt): no request fails for carrying a system message, and
    Gemma 3's own rendering is kept where it has one.
    """

    NATIVE = "native"  # the template renders every system message (ChatML, Llama 3, ...)
    LEADING = "leading"  # a leading one only, later ones are folded (Gemma 3)
    FOLDED = "folded"  # none: all are folded (Gemma 1 and 2)


def fold_system(messages: Sequence[ChatMessage], keep_leading: bool = False) -> list[ChatMessage]:
    """Each system message (but a leading one, with keep_leading) prepended to the next user turn with a
    blank line between; system text with no user turn after it becomes a user turn of its own."""
    folded: list[ChatMessage] = []
    pending: list[str] = []
    for i, message in enumerate(messages):
        if message.role == "system" and not (keep_leading and i == 0):
            pending.append(message.content)
        elif message.role == "user" and pending:
            folded.append(ChatMessage("user", "\n\n".join([*pending, message.content])))
            pending = []
        else:
            folded.append(message)
    if pending:
        folded.append(ChatMessage("user", "\n\n".join(pending)))
    return folded


_PROBE_LEADING = (ChatMessage("system", "s"), ChatMessage("user", "u"))
_PROBE_LATER = (ChatMessage("user", "u"), ChatMessage("assistant", "a"), ChatMessage("system", "s"),
                ChatMessage("user", "u"))


@dataclass(frozen=True)
class _TurnFormat:
    """The pieces of a hand-written [INST] template; see contract section 2."""

    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str


_LLAMA2 = _TurnFormat(
    system_prefix="[INST] <<SYS>>\n",
    system_suffix="\n<</SYS>>\n\n",
    user_prefix="<s>[INST] ",
    user_suffix=" [/INST]",
    assistant_prefix=" ",
    assistant_suffix="</s>",
)
_MISTRAL = _TurnFormat(
    system_prefix="<s>[INST] ",
    system_suffix=" ",
    user_prefix="[INST] ",
    user_suffix=" [/INST]",
    assistant_prefix=" ",
    assistant_suffix="</s>",
)


def _render_inst(fmt: _TurnFormat, messages: Sequence[ChatMessage]) -> str:
    parts: list[str] = []
    previous: str | None = None
    for message in messages:
        if message.role == "system":
            parts.append(fmt.system_prefix + message.content + fmt.system_suffix)
        elif message.role == "user":
            # The system block already opened the [INST] of the turn that follows it.
            prefix = "" if previous == "system" else fmt.user_prefix
            parts.append(prefix + message.content + fmt.user_suffix)
        elif message.role == "assistant":
            parts.append(fmt.assistant_prefix + message.content + fmt.assistant_suffix)
        else:
            raise ValueError(f"unknown chat role {message.role!r} (expected system, user or assistant)")
        previous = message.role
    return "".join(parts)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None,
    separators: tuple[str, str] | None = None, sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes `<` and `&`, which would change the prompt; HF overrides it likewise.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _jinja_env() -> ImmutableSandboxedEnvironment:
    # Templates come from model files, i.e. from strangers: sandboxed, and set up as transformers does.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """Renders messages into a prompt that ends with the assistant's turn open."""

    def __init__(
        self, kind: TemplateKind, source: str | None = None, bos_token: str = "", eos_token: str = ""
    ) -> None:
        if (kind is TemplateKind.JINJA) != (source is not None):
            raise ValueError("a Jinja chat template needs its source, and only a Jinja one takes it")
        self.kind = kind
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._template = _jinja_env().from_string(source) if source is not None else None
        self.system_role = self._probe_system_role() if source is not None else SystemRole.NATIVE

    @classmethod
    def llama2(cls) -> ChatTemplate:
        return cls(TemplateKind.LLAMA2)

    @classmethod
    def mistral(cls) -> ChatTemplate:
        return cls(TemplateKind.MISTRAL)

    @classmethod
    def from_jinja(cls, source: str, bos_token: str, eos_token: str) -> ChatTemplate:
        """A template shipped with a model (tokenizer_config.json or GGUF `tokenizer.chat_template`).

        Raises ValueError when the source is not valid Jinja, so a broken model file fails at load time.
        """
        try:
            return cls(TemplateKind.JINJA, source, bos_token, eos_token)
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise ValueError(f"invalid chat template: {exc}") from exc

    def render(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt text. Raises ValueError for a conversation the template refuses."""
        if self.kind is TemplateKind.LLAMA2:
            return _render_inst(_LLAMA2, messages)
        if self.kind is TemplateKind.MISTRAL:
            return _render_inst(_MISTRAL, messages)
        if self.system_role is not SystemRole.NATIVE:
            messages = fold_system(messages, keep_leading=self.system_role is SystemRole.LEADING)
        return self._render_jinja(messages)

    def _probe_system_role(self) -> SystemRole:
        """Decided once, from whether the template renders a system message first and later on."""
        for probe, role in ((_PROBE_LEADING, SystemRole.FOLDED), (_PROBE_LATER, SystemRole.LEADING)):
            try:
                self._render_jinja(probe)
            except ValueError:
                return role
        return SystemRole.NATIVE

    def _render_jinja(self, messages: Sequence[ChatMessage]) -> str:
        assert self._template is not None  # the constructor ties JINJA to a compiled template
        try:
            return self._template.render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                add_generation_prompt=True,
                tools=None,
                documents=None,
            )
        except jinja2.exceptions.TemplateError as exc:
            # raise_exception() in a template means "this conversation is not allowed", i.e. bad input.
            raise ValueError(str(exc)) from exc

    def __repr__(self) -> str:
        if self.kind is TemplateKind.JINJA:
            return f"ChatTemplate({self.kind.value}, system={self.system_role.value})"
        return f"ChatTemplate({self.kind.value})"
