"""loraserve.catalog: ids, LoRA routing, templates, and where weights come from (no server, no torch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loraserve import catalog
from loraserve.catalog_entries import weights_env_for
from loraserve.chat_template import TemplateKind
from loraserve.errors import LoraNotSupported, NoSuchModel

LLAMA = "@cf/meta-llama/llama-2-7b-chat-hf-lora"
MISTRAL = "@cf/mistral/mistral-7b-instruct-v0.2-lora"
SMOL = "@cf/huggingfacetb/smollm2-135m-instruct"


# Workers AI's ids of the other families: (lora, context window) as Workers AI lists them (catalog_entries.py
# says where a figure is not Workers AI's own).
FAMILIES = {
    "@cf/google/gemma-2b-it-lora": (True, 8192),
    "@cf/google/gemma-7b-it-lora": (True, 3500),
    "@cf/google/gemma-3-12b-it": (True, 80000),
    "@cf/qwen/qwen2.5-coder-32b-instruct": (True, 32768),
    "@cf/qwen/qwq-32b": (True, 24000),
    "@cf/deepseek-ai/deepseek-r1-distill-qwen-32b": (True, 80000),
    "@cf/mistralai/mistral-small-3.1-24b-instruct": (True, 128000),
    "@cf/meta/llama-3.1-8b-instruct": (True, 7968),
    "@cf/meta/llama-3.2-1b-instruct": (False, 60000),
    "@cf/meta/llama-3.2-3b-instruct": (False, 131072),
    "@cf/meta/llama-3.3-70b-instruct-fp8-fast": (True, 24000),
    "@cf/meta/llama-guard-3-8b": (True, 131072),
}


def test_the_catalog() -> None:
    assert [e.id for e in catalog.CATALOG] == [LLAMA, MISTRAL, SMOL, *FAMILIES]
    assert catalog.DEFAULT_MODEL.id == SMOL and catalog.DEFAULT_MODEL.default_source == "embedded"
    assert catalog.template_kind(LLAMA) is TemplateKind.LLAMA2
    assert catalog.template_kind(MISTRAL) is TemplateKind.MISTRAL
    assert catalog.template_kind(SMOL) is TemplateKind.JINJA
    assert catalog.template_kind("@cf/someone/custom") is TemplateKind.JINJA
    assert all(catalog.supports_lora(e) for e in (LLAMA, MISTRAL, SMOL))
    assert catalog.supports_lora("@cf/someone/custom-lora") and not catalog.supports_lora(
        "@cf/someone/custom"
    )


def entry(model_id: str) -> catalog.CatalogEntry:
    found = catalog.find(model_id)
    assert found is not None, model_id
    return found


def test_the_families_under_workers_ai_ids() -> None:
    for model_id, (lora, window) in FAMILIES.items():
        entry_ = entry(model_id)
        assert (catalog.supports_lora(model_id), entry_.context_window) == (lora, window), model_id
        # Their own Jinja templates, rendered from the weights' tokenizer files.
        assert entry_.template is TemplateKind.JINJA and catalog.chat_template(entry_.template) is None
        assert entry_.description and entry_.hf_repo and entry_.default_source is None
    envs = [e.weights_env for e in catalog.CATALOG if e.weights_env is not None]
    assert len(envs) == len(set(envs)) == len(catalog.CATALOG) - 1


def test_weights_variables_are_derived_from_the_ids() -> None:
    assert weights_env_for("@cf/google/gemma-2b-it-lora") == "LORASERVE_GEMMA_2B_IT_PATH"
    qwen = "@cf/qwen/qwen2.5-coder-32b-instruct"
    assert weights_env_for(qwen) == "LORASERVE_QWEN2_5_CODER_32B_INSTRUCT_PATH"
    assert entry("@cf/meta/llama-guard-3-8b").weights_env == "LORASERVE_LLAMA_GUARD_3_8B_PATH"
    # The seed's two keep the names their users set.
    assert entry(LLAMA).weights_env == "LORASERVE_LLAMA2_PATH"
    gemma = "@cf/google/gemma-7b-it-lora"
    assert catalog.parse_model_arg(gemma, {"LORASERVE_GEMMA_7B_IT_PATH": "/m/g"}) == catalog.ModelSource(
        gemma, "/m/g", TemplateKind.JINJA
    )
    with pytest.raises(catalog.ModelSourceError, match="LORASERVE_GEMMA_7B_IT_PATH") as missing:
        catalog.parse_model_arg(gemma, {})
    assert f"--model {gemma}=google/gemma-7b-it fetches" in str(missing.value)


def test_newer_ids_take_adapters_without_a_suffix() -> None:
    gemma3, gemma2b = "@cf/google/gemma-3-12b-it", "@cf/google/gemma-2b-it-lora"
    small = "@cf/meta/llama-3.2-1b-instruct"
    served = {gemma3, gemma2b, small}
    assert catalog.resolve(gemma3, served, lora=True) == gemma3
    assert catalog.resolve("@cf/google/gemma-2b-it", served, lora=True) == gemma2b
    with pytest.raises(LoraNotSupported):
        catalog.resolve(small, served, lora=True)
    assert catalog.resolve(small, served, lora=False) == small


def test_listed_context_window_is_the_smaller_promise() -> None:
    assert catalog.listed_context_window("@cf/meta/llama-3.1-8b-instruct", 131072) == 7968  # Workers AI's
    assert catalog.listed_context_window("@cf/meta/llama-3.1-8b-instruct", 2048) == 2048  # what is held
    assert catalog.listed_context_window("@cf/someone/custom", 4096) == 4096


def test_chat_templates_for_serve() -> None:
    llama2 = catalog.chat_template(TemplateKind.LLAMA2)
    mistral = catalog.chat_template(TemplateKind.MISTRAL)
    assert llama2 is not None and llama2.kind is TemplateKind.LLAMA2
    assert mistral is not None and mistral.kind is TemplateKind.MISTRAL
    assert catalog.chat_template(TemplateKind.JINJA) is None


def test_entries_need_exactly_one_weights_origin() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        catalog.CatalogEntry("@cf/x/y", "", TemplateKind.JINJA, True, 4096, "llama")
    with pytest.raises(ValueError, match="exactly one"):
        catalog.CatalogEntry(
            "@cf/x/y", "", TemplateKind.JINJA, True, 4096, "llama", weights_env="X", default_source="embedded"
        )
    with pytest.raises(ValueError, match="context_window"):
        catalog.CatalogEntry("@cf/x/y", "", TemplateKind.JINJA, True, 0, "llama", weights_env="X")


def test_resolve() -> None:
    served = {LLAMA, "@cf/test/plain", "@cf/test/both", "@cf/test/both-lora"}
    assert catalog.resolve(LLAMA, served, lora=False) == LLAMA
    assert catalog.resolve(LLAMA, served, lora=True) == LLAMA
    # The base name routes to the -lora model only when a lora is given.
    assert catalog.resolve("@cf/meta-llama/llama-2-7b-chat-hf", served, lora=True) == LLAMA
    with pytest.raises(NoSuchModel):
        catalog.resolve("@cf/meta-llama/llama-2-7b-chat-hf", served, lora=False)
    assert catalog.resolve("@cf/test/both", served, lora=False) == "@cf/test/both"
    assert catalog.resolve("@cf/test/both", served, lora=True) == "@cf/test/both-lora"
    with pytest.raises(LoraNotSupported):
        catalog.resolve("@cf/test/plain", served, lora=True)
    with pytest.raises(NoSuchModel, match="No such model @cf/x/y or task"):
        catalog.resolve("@cf/x/y", served, lora=True)


def test_parse_model_arg() -> None:
    env = {"LORASERVE_LLAMA2_PATH": "/models/llama2"}
    assert catalog.parse_model_arg(f"{LLAMA}=/w", env) == catalog.ModelSource(
        LLAMA, "/w", TemplateKind.LLAMA2
    )
    assert catalog.parse_model_arg(LLAMA, env).source == "/models/llama2"
    assert catalog.parse_model_arg(SMOL, {}).source == "embedded"
    assert catalog.parse_model_arg("@cf/me/x-lora=random:tiny", {}) == catalog.ModelSource(
        "@cf/me/x-lora", "random:tiny", TemplateKind.JINJA
    )
    with pytest.raises(catalog.ModelSourceError, match="LORASERVE_MISTRAL_PATH") as missing:
        catalog.parse_model_arg(MISTRAL, {})
    assert MISTRAL in str(missing.value)
    for bad in ("@cf/me/x", "=random:tiny", f"{LLAMA}="):
        with pytest.raises(catalog.ModelSourceError):
            catalog.parse_model_arg(bad, {})


def test_locate(tmp_path: Path) -> None:
    assert catalog.locate("embedded") == "embedded"
    assert catalog.locate("random:tiny") == "random:tiny"
    (tmp_path / "hf").mkdir()
    with pytest.raises(catalog.ModelSourceError, match=r"no config\.json"):
        catalog.locate(str(tmp_path / "hf"))
    (tmp_path / "hf" / "config.json").write_text(json.dumps({}))
    assert catalog.locate(str(tmp_path / "hf")) == str(tmp_path / "hf")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert catalog.locate(str(tmp_path / "m.gguf")) == str(tmp_path / "m.gguf")
    (tmp_path / "m.bin").write_bytes(b"")
    with pytest.raises(catalog.ModelSourceError, match=r"\.gguf"):
        catalog.locate(str(tmp_path / "m.bin"))
    with pytest.raises(catalog.ModelSourceError, match="no such file"):
        catalog.locate(str(tmp_path / "missing" / "dir"))


def test_the_api_layer_never_imports_torch() -> None:
    code = (
        "import sys\n"
        "import loraserve.api, loraserve.catalog, loraserve.cli, loraserve.client, loraserve.registry\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_known_shapes_without_loading_a_model() -> None:
    assert catalog.known_shape("embedded") == catalog.RANDOM_SHAPES["smollm2-135m"]
    assert catalog.known_shape("random:tiny") == catalog.RANDOM_SHAPES["tiny"]
    for other in ("random:nope", "/models/llama.gguf", "org/repo"):
        assert catalog.known_shape(other) is None


def test_an_unserved_catalog_model_says_how_to_serve_it() -> None:
    """The seed's model id on a server started without its weights: 5007 with Workers AI's message,
    then the command that serves it."""
    with pytest.raises(NoSuchModel) as err:
        catalog.resolve(LLAMA, {"@cf/huggingfacetb/smollm2-135m-instruct"}, lora=True)
    message = str(err.value)
    assert message.startswith(f"No such model {LLAMA} or task: ")
    assert f"loraserve serve --model {LLAMA}=PATH" in message and "LORASERVE_LLAMA2_PATH" in message
    assert "--quantize" in message and "meta-llama/Llama-2-7b-chat-hf on the Hugging Face hub" in message
    qwq = str(NoSuchModel("@cf/qwen/qwq-32b", catalog.how_to_serve("@cf/qwen/qwq-32b")))
    assert "--model @cf/qwen/qwq-32b=PATH" in qwq and "LORASERVE_QWQ_32B_PATH" in qwq
    assert "Qwen/QwQ-32B" in qwq
    with pytest.raises(NoSuchModel, match=r"^No such model @cf/x/y or task$"):
        catalog.resolve("@cf/x/y", set(), lora=False)
