"""loraserve.catalog: ids, LoRA routing, templates, and where weights come from (no server, no torch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loraserve import catalog
from loraserve.chat_template import TemplateKind
from loraserve.errors import LoraNotSupported, NoSuchModel

LLAMA = "@cf/meta-llama/llama-2-7b-chat-hf-lora"
MISTRAL = "@cf/mistral/mistral-7b-instruct-v0.2-lora"
SMOL = "@cf/huggingfacetb/smollm2-135m-instruct"


def test_the_catalog() -> None:
    assert [e.id for e in catalog.CATALOG] == [LLAMA, MISTRAL, SMOL]
    assert catalog.DEFAULT_MODEL.id == SMOL and catalog.DEFAULT_MODEL.default_source == "embedded"
    assert catalog.template_kind(LLAMA) is TemplateKind.LLAMA2
    assert catalog.template_kind(MISTRAL) is TemplateKind.MISTRAL
    assert catalog.template_kind(SMOL) is TemplateKind.JINJA
    assert catalog.template_kind("@cf/someone/custom") is TemplateKind.JINJA
    assert all(catalog.supports_lora(e.id) for e in catalog.CATALOG)
    assert catalog.supports_lora("@cf/someone/custom-lora") and not catalog.supports_lora(
        "@cf/someone/custom"
    )


def test_chat_templates_for_serve() -> None:
    llama2 = catalog.chat_template(TemplateKind.LLAMA2)
    mistral = catalog.chat_template(TemplateKind.MISTRAL)
    assert llama2 is not None and llama2.kind is TemplateKind.LLAMA2
    assert mistral is not None and mistral.kind is TemplateKind.MISTRAL
    assert catalog.chat_template(TemplateKind.JINJA) is None


def test_entries_need_exactly_one_weights_origin() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        catalog.CatalogEntry("@cf/x/y", "", TemplateKind.JINJA, True)
    with pytest.raises(ValueError, match="exactly one"):
        catalog.CatalogEntry(
            "@cf/x/y", "", TemplateKind.JINJA, True, weights_env="X", default_source="embedded"
        )


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
    assert "--quantize" in message
    with pytest.raises(NoSuchModel, match=r"^No such model @cf/x/y or task$"):
        catalog.resolve("@cf/x/y", set(), lora=False)
