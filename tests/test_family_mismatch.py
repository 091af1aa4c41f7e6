"""`serve`'s warning when the weights given for a catalog id are of another family than the id's: the real
catalog against the model_type of models loaded as `serve` loads them, and one real `loraserve serve`."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraserve import catalog
from loraserve.chat_template import TemplateKind
from loraserve.engine.async_engine import model_info
from loraserve.engine.config import EngineConfig
from loraserve.engine.loader import load_engine
from loraserve.engine.weights.hf import hf_config

from hf_family_helpers import random_model
from serve_helpers import ServeProcess

GEMMA_2B = "@cf/google/gemma-2b-it-lora"
GEMMA_3 = "@cf/google/gemma-3-12b-it"
LLAMA_31 = "@cf/meta/llama-3.1-8b-instruct"
MISTRAL_7B = "@cf/mistral/mistral-7b-instruct-v0.2-lora"
SMOL = "@cf/huggingfacetb/smollm2-135m-instruct"


def test_the_catalog_says_each_ids_family() -> None:
    families = {e.id: e.family for e in catalog.CATALOG}
    assert families[GEMMA_2B] == "gemma" and families[GEMMA_3] == "gemma3_text"
    assert families["@cf/qwen/qwq-32b"] == families["@cf/deepseek-ai/deepseek-r1-distill-qwen-32b"] == "qwen2"
    assert families["@cf/mistralai/mistral-small-3.1-24b-instruct"] == families[MISTRAL_7B] == "mistral"
    assert families[LLAMA_31] == families[SMOL] == "llama"
    with pytest.raises(ValueError, match="lower-case model_type"):
        catalog.CatalogEntry("@cf/x/y", "", TemplateKind.JINJA, True, 4096, "Llama", weights_env="X")


def test_a_random_llama_under_a_gemma_id() -> None:
    engine, _ = load_engine("random:tiny", EngineConfig(threads=1))
    architecture = model_info(engine).architecture  # what the server and the registry are told
    assert architecture == "llama"
    warning = catalog.family_mismatch(GEMMA_2B, architecture)
    assert warning is not None
    assert warning.startswith(f"{GEMMA_2B} is a gemma model in the Workers AI catalog, but the weights "
                              f"loaded for it are a llama model: adapters for {GEMMA_2B} are checked "
                              f"against the loaded model (model_type one of llama, its shapes)")
    assert warning.endswith("chats use the loaded model's own chat template")
    # The id's family, another id of it, or no catalog id at all: nothing to warn of.
    for model_id in (LLAMA_31, SMOL, "@cf/someone/custom"):
        assert catalog.family_mismatch(model_id, architecture) is None, model_id


@pytest.mark.parametrize(("name", "model_id", "loaded"), [
    ("qwen2", LLAMA_31, "qwen2"),
    ("qwen2", MISTRAL_7B, "qwen2"),
    ("gemma", GEMMA_3, "gemma"),  # Gemma 1 weights under the Gemma 3 id: another decoder
    ("gemma3", GEMMA_3, None),  # the multimodal checkpoint, served as its text model
    ("mistral3", "@cf/mistralai/mistral-small-3.1-24b-instruct", None),
    ("qwen2", "@cf/qwen/qwq-32b", None),
])
def test_hugging_face_directories_under_catalog_ids(tmp_path: Path, name: str, model_id: str,
                                                    loaded: str | None) -> None:
    random_model(name).save_pretrained(tmp_path)
    architecture = hf_config(tmp_path).architecture  # the config load_hf_dir builds the engine from
    warning = catalog.family_mismatch(model_id, architecture)
    if loaded is None:
        assert warning is None
        return
    assert warning is not None and architecture == loaded
    entry = catalog.find(model_id)
    assert entry is not None
    assert f"{model_id} is a {entry.family} model" in warning and f"are a {loaded} model" in warning
    if entry.template is not TemplateKind.JINJA:  # the id's fixed template, not the model's
        assert warning.endswith(f"the id's {entry.template.value} chat template, whatever the weights were "
                                "tuned on")


def test_serve_warns_once_and_serves(tmp_path: Path) -> None:
    """Two ids over one random Llama: the Gemma id is warned of, once; both are served."""
    models = [f"{GEMMA_2B}=random:tiny", f"{SMOL}=random:tiny"]
    with ServeProcess(tmp_path, tmp_path / "serve.log", models) as server:
        server.start()
        assert server.stop() == 0
    warnings = [line for line in server.log().splitlines() if " WARNING " in line]
    assert len(warnings) == 1, server.log()
    assert f"{GEMMA_2B} is a gemma model in the Workers AI catalog" in warnings[0]
    assert SMOL not in warnings[0]
