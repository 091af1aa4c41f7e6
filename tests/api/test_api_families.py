"""Gemma and Qwen2 models served end to end under Workers AI's ids: a Hugging Face directory (random weights,
a SentencePiece tokenizer, the model's own published chat template) loaded by the real loader, a real server
on a socket, a finetune uploaded as wrangler does, and /run and the OpenAI API answering with what
transformers + PEFT generate for the same tokens."""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sentencepiece as spm
import torch
from openai import OpenAI
from peft import PeftModel
from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM, Qwen2Config, Qwen2ForCausalLM

from loraserve.api import BackgroundServer, ServerSettings, create_app
from loraserve.engine.config import EngineConfig
from loraserve.engine.loader import load_backend
from loraserve.engine.weights.tokenizer import Tokenizer
from loraserve.registry import Registry

from conftest import LiveServer, create_finetune, ok
from engine_helpers import ALL_TARGETS, make_adapter
from quantize_helpers import write_sentencepiece_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

GEMMA_ID = "@cf/google/gemma-2b-it-lora"
QWEN_ID = "@cf/qwen/qwen2.5-coder-32b-instruct"
TEMPLATES = Path(__file__).parent.parent / "chat_templates"
SHAPE: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                             max_position_embeddings=256, initializer_range=0.1, bos_token_id=1,
                             eos_token_id=2, pad_token_id=0)


def _sentencepiece() -> spm.SentencePieceProcessor:
    """Pieces of plain ASCII words only (no byte fallback): whatever a random model emits decodes to the
    same text in our detokenizer and in transformers', so texts can be compared exactly."""
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world", "story"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(500)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=120,
        byte_fallback=False, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, character_coverage=1.0, minloglevel=2, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def _save(model: Any, root: Path, template: str, sp: spm.SentencePieceProcessor, add_bos: bool) -> Path:
    model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-0.3, 0.3)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.3)
    model.save_pretrained(root)
    write_sentencepiece_tokenizer(root, sp)
    config = json.loads((root / "tokenizer_config.json").read_text())
    config["chat_template"] = json.loads((TEMPLATES / template).read_text())["chat_template"]
    config["add_bos_token"] = add_bos  # Gemma's tokenizer adds <bos>, Qwen's has none
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    sp = _sentencepiece()
    vocab = sp.get_piece_size()
    root = tmp_path_factory.mktemp("families")
    torch.manual_seed(5)  # Gemma 2's layers (sandwich norms, soft-capping, sliding window) under a Gemma id
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=vocab, sliding_window=8, query_pre_attn_scalar=24,
                                           attn_logit_softcapping=20.0, final_logit_softcapping=10.0,
                                           **SHAPE))
    torch.manual_seed(6)
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, tie_word_embeddings=False, **SHAPE))
    return {GEMMA_ID: _save(gemma, root / "gemma", "gemma-2b-it.json", sp, add_bos=True),
            QWEN_ID: _save(qwen, root / "qwen", "qwen2.5-instruct.json", sp, add_bos=False)}


@pytest.fixture(scope="module")
def server(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    backends = {model_id: load_backend(str(path), EngineConfig(threads=1, max_num_seqs=4))
                for model_id, path in models.items()}
    registry = Registry.open(tmp_path_factory.mktemp("families-registry"))
    with BackgroundServer(create_app(registry, backends, ServerSettings(rate_limit_per_minute=0))) as live:
        yield LiveServer(live.base_url, registry, backends)
    registry.close()
    for backend in backends.values():
        backend.shutdown()


def _reference(path: Path, adapter: Path | None, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=2, pad_token_id=0,
                             attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    ids: list[int] = out[0, len(prompt_ids):].tolist()
    return ids


@pytest.mark.parametrize("model_id", [GEMMA_ID, QWEN_ID])
def test_a_finetune_answers_as_transformers_and_peft(model_id: str, models: dict[str, Path],
                                                     server: LiveServer, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base: Any = AutoModelForCausalLM.from_pretrained(models[model_id], attn_implementation="eager")
    folder = make_adapter(base, tmp_path / "adapter", seed=3, r=8, targets=ALL_TARGETS, std=0.1)
    account = server.new_account()
    create_finetune(server, account, "tuned", folder, model=model_id)
    # Our tokenizer for the ids (its parity with transformers' is tests/engine/weights/test_tokenizer.py's;
    # this helper's tokenizer.json has no post-processor, which transformers 5 reads without BOS).
    tokenizer = Tokenizer.from_hf_dir(models[model_id])
    prompt = "the quick brown fox jumps over the lazy dog and the quick brown fox"  # past Gemma's window
    ids = tokenizer.encode(prompt)
    for lora, adapter in ((None, None), ("tuned", folder)):
        body: dict[str, Any] = {"prompt": prompt, "raw": True, "max_tokens": 12, "temperature": 0}
        if lora:
            body["lora"] = lora
        out = ok(httpx.post(server.run_url(account, model_id), headers=account.headers, json=body,
                            timeout=60))
        expected = _reference(models[model_id], adapter, ids, 12)
        # the continuation of the prompt's text (a first piece's space is kept after a prompt)
        text = tokenizer.decode(ids + expected)
        assert text.startswith(tokenizer.decode(ids))
        assert out["response"] == text[len(tokenizer.decode(ids)):], lora
        assert out["usage"]["prompt_tokens"] == len(ids)


@pytest.mark.parametrize("model_id", [GEMMA_ID, QWEN_ID])
def test_chat_messages_render_with_the_models_own_template(model_id: str, models: dict[str, Path],
                                                          server: LiveServer) -> None:
    """Gemma's template has no system role: the system message joins the first user turn (as Workers AI
    takes system messages for Gemma) instead of failing; Qwen's ChatML keeps it as its own turn."""
    account = server.new_account()
    template = AutoTokenizer.from_pretrained(models[model_id])
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    shown = messages if model_id == QWEN_ID else [{"role": "user", "content": "be brief\n\nhello world"}]
    rendered = template.apply_chat_template(shown, tokenize=False, add_generation_prompt=True)
    prompt_ids = Tokenizer.from_hf_dir(models[model_id]).encode(rendered, add_bos=False)
    out = ok(httpx.post(server.run_url(account, model_id), headers=account.headers,
                        json={"messages": messages, "max_tokens": 6, "temperature": 0}, timeout=60))
    assert out["usage"]["prompt_tokens"] == len(prompt_ids)
    with OpenAI(api_key=account.token, base_url=f"{server.ai_url(account)}/v1", max_retries=0) as client:
        chat = client.chat.completions.create(model=model_id, messages=messages,  # type: ignore[arg-type]
                                              max_tokens=6, temperature=0)
    assert chat.choices[0].message.content == out["response"]
    assert chat.usage is not None and chat.usage.prompt_tokens == len(prompt_ids)
