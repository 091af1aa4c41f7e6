"""The models this server knows by Workers AI id, and where their weights come from.

No torch here: `serve` asks the catalog what to load and with which chat template, and the API asks
it which model a request names, whether that model takes LoRA adapters and what the models search lists.
The table of ids and their properties is catalog_entries.py.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraserve.catalog_entries import (
    CATALOG,
    DEFAULT_MODEL,
    EMBEDDED_SOURCE,
    LORA_SUFFIX,
    CatalogEntry,
)
from loraserve.chat_template import ChatTemplate, TemplateKind
from loraserve.errors import LoraNotSupported, NoSuchModel
from loraserve.peft import accepted_model_types, canonical_model_type

__all__ = ["CATALOG", "DEFAULT_MODEL", "EMBEDDED_SOURCE", "LORA_SUFFIX", "CatalogEntry"]

RANDOM_SOURCE_PREFIX = "random:"
# Random-weight Llamas ("random:NAME") for tests and benchmarks, as ModelConfig fields; they borrow
# SmolLM2's tokenizer and chat template. Here, not in the engine, so that torch-free tools (loraserve
# loadtest) know their LoRA shapes too.
RANDOM_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16),
    "small": dict(hidden_size=256, intermediate_size=512, num_layers=4, num_heads=8, num_kv_heads=4,
                  head_dim=32),
    # SmolLM2-135M's shape (the embedded model's): benchmarks without loading the GGUF.
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
                         head_dim=64),
    # Llama-2-7B's shape, for GPU benchmarks with random weights.
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32,
                      head_dim=128),
    # One shape of each other family Workers AI serves adapters on, as their config.json files say (the
    # vocabulary is the borrowed tokenizer's, not theirs: Gemma's 256k-entry head is ~5x larger).
    "gemma-2b": dict(architecture="gemma", hidden_size=2048, intermediate_size=16384, num_layers=18,
                     num_heads=8, num_kv_heads=1, head_dim=256),
    "gemma2-2b": dict(architecture="gemma2", hidden_size=2304, intermediate_size=9216, num_layers=26,
                      num_heads=8, num_kv_heads=4, head_dim=256, query_pre_attn_scalar=256.0,
                      attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096,
                      sliding_layers=[i % 2 == 0 for i in range(26)]),
    "gemma3-1b": dict(architecture="gemma3_text", hidden_size=1152, intermediate_size=6912, num_layers=26,
                      num_heads=4, num_kv_heads=1, head_dim=256, query_pre_attn_scalar=256.0,
                      sliding_window=512, sliding_layers=[(i + 1) % 6 != 0 for i in range(26)],
                      rope_theta=1e6, rope_local_theta=1e4),
    "qwen2.5-0.5b": dict(architecture="qwen2", hidden_size=896, intermediate_size=4864, num_layers=24,
                         num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1e6),
    "mistral-7b": dict(architecture="mistral", hidden_size=4096, intermediate_size=14336, num_layers=32,
                       num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1e6),
}


def known_shape(source: str) -> dict[str, Any] | None:
    """The shape of the embedded model or a random:NAME source, without loading it; None for others."""
    if source == EMBEDDED_SOURCE:
        return RANDOM_SHAPES["smollm2-135m"]
    # random:NAME or random:NAME:TYPE (random blocks of a GGUF type, same shape)
    name = source.removeprefix(RANDOM_SOURCE_PREFIX).partition(":")[0]
    return RANDOM_SHAPES.get(name) if source.startswith(RANDOM_SOURCE_PREFIX) else None


_HUB_REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def find(model_id: str) -> CatalogEntry | None:
    for entry in CATALOG:
        if entry.id == model_id:
            return entry
    return None


def supports_lora(model_id: str) -> bool:
    entry = find(model_id)
    return entry.lora if entry is not None else model_id.endswith(LORA_SUFFIX)


def template_kind(model_id: str) -> TemplateKind:
    """The catalog's template, or the model's own (Jinja) one for ids outside the catalog."""
    entry = find(model_id)
    return entry.template if entry is not None else TemplateKind.JINJA


def family_mismatch(model_id: str, architecture: str) -> str | None:
    """What `serve` warns of when the weights loaded for a catalog id are of another family than the id's
    (`architecture`: the loaded model's model_type); None when they agree or the id is not in the catalog.
    Not refused: people serve other checkpoints under an id."""
    entry = find(model_id)
    if entry is None or canonical_model_type(entry.family) == canonical_model_type(architecture):
        return None
    template = ("the loaded model's own chat template" if entry.template is TemplateKind.JINJA
                else f"the id's {entry.template.value} chat template, whatever the weights were tuned on")
    return (f"{model_id} is a {entry.family} model in the Workers AI catalog, but the weights loaded for it "
            f"are a {architecture} model: adapters for {model_id} are checked against the loaded model "
            f"(model_type one of {', '.join(accepted_model_types(architecture))}, its shapes), not as "
            f"{entry.family} adapters, and chats use {template}")


def listed_context_window(model_id: str, engine_window: int) -> int:
    """The context window the models search reports: Workers AI's for a catalog id, unless the engine
    serving it holds less. The smaller of the two is never a promise the server breaks: a prompt that
    fits it runs here as it does on Workers AI."""
    entry = find(model_id)
    return engine_window if entry is None else min(entry.context_window, engine_window)


def chat_template(kind: TemplateKind) -> ChatTemplate | None:
    """What `serve` passes to load_backend: None lets the engine use the template the model ships."""
    if kind is TemplateKind.LLAMA2:
        return ChatTemplate.llama2()
    if kind is TemplateKind.MISTRAL:
        return ChatTemplate.mistral()
    return None


def resolve(model: str, served: Collection[str], lora: bool) -> str:
    """The served model id that handles a /run for `model`.

    A base name with a `lora` goes to its "-lora" variant (`@cf/x/y` -> `@cf/x/y-lora`), as the
    public service routes it. Raises NoSuchModel (5007) or LoraNotSupported (5005).
    """
    if lora:
        if model in served and supports_lora(model):
            return model
        variant = model + LORA_SUFFIX
        if variant in served and supports_lora(variant):
            return variant
        if model in served:
            raise LoraNotSupported(model)
    elif model in served:
        return model
    raise NoSuchModel(model, how_to_serve(model))


def how_to_serve(model: str) -> str | None:
    """For a catalog model this server was not started with: the command that serves it."""
    entry = find(model) or find(model + LORA_SUFFIX)
    if entry is None:
        return None
    if entry.default_source is not None:
        return f"this server was not started with it; `loraserve serve --model {entry.id}` serves it"
    weights = f" ({entry.hf_repo} on the Hugging Face hub)" if entry.hf_repo else ""
    return (f"this server was not started with it; serve its weights{weights} with `loraserve serve --model "
            f"{entry.id}=PATH`, PATH a Hugging Face directory (add `--quantize q4_0` to fit a CPU "
            f"machine's memory) or a GGUF file (served as quantized), or set {entry.weights_env}=DIR")


class ModelSourceError(ValueError):
    """A --model argument that cannot be served; the message says what is missing and how to fix it."""


@dataclass(frozen=True)
class ModelSource:
    """One model to serve: its id, where its weights are, and the template the catalog wants."""

    id: str
    source: str
    template: TemplateKind


def parse_model_arg(arg: str, env: Mapping[str, str] | None = None) -> ModelSource:
    """`ID=SOURCE`, or a catalog `ID` alone (its weights from its environment variable or shipped)."""
    env = os.environ if env is None else env
    model_id, sep, source = arg.partition("=")
    model_id, source = model_id.strip(), source.strip()
    if not model_id:
        raise ModelSourceError(f"--model {arg!r}: expected ID=SOURCE")
    entry = find(model_id)
    if not sep:
        if entry is None:
            raise ModelSourceError(
                f"--model {arg!r}: {model_id!r} is not in the catalog, so it needs a source: ID=SOURCE "
                f"(a local HF directory, a .gguf file, {EMBEDDED_SOURCE!r} or a Hugging Face repo id)"
            )
        source = _default_source(entry, env)
    if not source:
        raise ModelSourceError(f"--model {arg!r}: empty SOURCE")
    return ModelSource(model_id, source, template_kind(model_id))


def _default_source(entry: CatalogEntry, env: Mapping[str, str]) -> str:
    if entry.default_source is not None:
        return entry.default_source
    assert entry.weights_env is not None  # CatalogEntry checks that one of the two is set
    path = env.get(entry.weights_env, "").strip()
    if not path:
        raise ModelSourceError(
            f"missing weights for {entry.id}: pass --model {entry.id}=/path/to/hf-model-dir "
            f"or set {entry.weights_env} to a local Hugging Face directory (config.json, tokenizer, "
            f"*.safetensors)" + (f"; --model {entry.id}={entry.hf_repo} fetches the public weights from the "
                                 f"hub when huggingface_hub is installed" if entry.hf_repo else "")
        )
    return path


def locate(source: str) -> str:
    """Check `source` and return what load_backend takes; a Hub repo id is fetched when possible."""
    if source == EMBEDDED_SOURCE or source.startswith(RANDOM_SOURCE_PREFIX):
        return source
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{source}: not a Hugging Face model directory (no config.json)")
        return str(path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelSourceError(f"{source}: a model file must be a .gguf")
        return str(path)
    if _HUB_REPO_RE.fullmatch(source) and not source.endswith(".gguf"):
        return _fetch_from_hub(source)
    raise ModelSourceError(f"{source}: no such file or directory")


def _fetch_from_hub(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise ModelSourceError(
            f"{repo_id}: not a local path, and huggingface_hub is not installed to fetch it; "
            f"download the model and pass its directory"
        ) from exc
    try:
        return str(
            snapshot_download(
                repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"]
            )
        )
    except Exception as exc:  # the hub raises many kinds (offline, gated, not found)
        raise ModelSourceError(
            f"{repo_id}: could not fetch it from the Hugging Face hub ({type(exc).__name__}: {exc}); "
            f"download the model and pass its directory"
        ) from exc
