"""The catalog's table: Workers AI's text-generation models this server knows by id, with their properties.

Context windows and `lora` are what Workers AI's model pages list (gathered 2026-12), unless a comment
says otherwise. They are data only; `loraserve.catalog` answers questions about them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from loraserve.chat_template import TemplateKind

EMBEDDED_SOURCE = "embedded"
# Workers AI names the LoRA-capable variant of an older model "<base>-lora"; newer ids take adapters as is.
LORA_SUFFIX = "-lora"


@dataclass(frozen=True)
class CatalogEntry:
    id: str
    description: str
    template: TemplateKind
    lora: bool
    context_window: int  # tokens, prompt and output together, as Workers AI lists the model
    # The model_type of the decoder Workers AI serves under this id (its text model's for a multimodal
    # one): what adapters made for the id say, and what `serve` expects the weights given for it to be.
    family: str
    # Where the weights are found when `--model ID` names no source: an environment variable
    # holding a local directory, or a source that ships with the package.
    weights_env: str | None = None
    default_source: str | None = None
    hf_repo: str | None = None  # the public weights on the Hugging Face hub, for hints

    def __post_init__(self) -> None:
        if (self.weights_env is None) == (self.default_source is None):
            raise ValueError(f"{self.id}: give exactly one of weights_env and default_source")
        if self.context_window < 1:
            raise ValueError(f"{self.id}: context_window must be >= 1")
        if not self.family or self.family != self.family.lower():
            raise ValueError(f"{self.id}: family must be a lower-case model_type, not {self.family!r}")


def weights_env_for(model_id: str) -> str:
    """The environment variable naming a catalog model's weights directory, derived from its id so that
    nobody has to look it up: `@cf/google/gemma-2b-it-lora` -> LORASERVE_GEMMA_2B_IT_PATH."""
    name = model_id.rsplit("/", 1)[-1].removesuffix(LORA_SUFFIX)
    return f"LORASERVE_{re.sub(r'[^A-Z0-9]+', '_', name.upper()).strip('_')}_PATH"


def _hf(model_id: str, description: str, context_window: int, family: str, hf_repo: str, lora: bool = True,
        template: TemplateKind = TemplateKind.JINJA) -> CatalogEntry:
    """A model served from a Hugging Face directory (or GGUF file) the operator provides."""
    return CatalogEntry(model_id, description, template, lora, context_window, family,
                        weights_env=weights_env_for(model_id), hf_repo=hf_repo)


# The seed's two ids keep the variable names their users already set.
LLAMA2_LORA = CatalogEntry(
    id="@cf/meta-llama/llama-2-7b-chat-hf-lora",
    description="Llama 2 7B chat (Hugging Face format), dedicated to inference with LoRA adapters.",
    template=TemplateKind.LLAMA2,
    lora=True,
    context_window=8192,
    family="llama",
    weights_env="LORASERVE_LLAMA2_PATH",
    hf_repo="meta-llama/Llama-2-7b-chat-hf",
)
MISTRAL_LORA = CatalogEntry(
    id="@cf/mistral/mistral-7b-instruct-v0.2-lora",
    description="Mistral 7B Instruct v0.2, dedicated to inference with LoRA adapters.",
    template=TemplateKind.MISTRAL,
    lora=True,
    context_window=32768,  # the sources at hand give no Workers AI figure: the model's own 32k
    family="mistral",
    weights_env="LORASERVE_MISTRAL_PATH",
    hf_repo="mistralai/Mistral-7B-Instruct-v0.2",
)
SMOLLM2 = CatalogEntry(
    id="@cf/huggingfacetb/smollm2-135m-instruct",
    description="SmolLM2 135M Instruct, shipped with loraserve: the default model, LoRA supported.",
    template=TemplateKind.JINJA,
    lora=True,
    context_window=8192,  # not a Workers AI model: its own max_position_embeddings
    family="llama",
    default_source=EMBEDDED_SOURCE,
)

GEMMA = (
    _hf("@cf/google/gemma-2b-it-lora", "Gemma 2B instruct, dedicated to inference with LoRA adapters. Gemma "
        "is a family of lightweight open models from Google, built from the research behind Gemini.",
        8192, "gemma", "google/gemma-2b-it"),
    _hf("@cf/google/gemma-7b-it-lora", "Gemma 7B instruct, dedicated to inference with LoRA adapters. Gemma "
        "is a family of lightweight open models from Google, built from the research behind Gemini.",
        3500, "gemma", "google/gemma-7b-it"),
    # Multimodal on Workers AI; its text model here.
    _hf("@cf/google/gemma-3-12b-it", "Gemma 3 12B instruct, Google's multilingual model (over 140 "
        "languages) for question answering, summarization and reasoning.", 80000, "gemma3_text",
        "google/gemma-3-12b-it"),
)
QWEN = (
    _hf("@cf/qwen/qwen2.5-coder-32b-instruct", "Qwen2.5-Coder 32B Instruct, the code-specific Qwen "
        "model (formerly CodeQwen): code generation, reasoning and fixing.", 32768, "qwen2",
        "Qwen/Qwen2.5-Coder-32B-Instruct"),
    _hf("@cf/qwen/qwq-32b", "QwQ 32B, the reasoning model of the Qwen series: it thinks before it "
        "answers, for markedly better results on hard problems.", 24000, "qwen2", "Qwen/QwQ-32B"),
    # Its model page shows no LoRA badge; Workers AI's LoRA documentation lists it (contract section 6).
    _hf("@cf/deepseek-ai/deepseek-r1-distill-qwen-32b", "DeepSeek-R1-Distill-Qwen-32B, distilled from "
        "DeepSeek-R1 on Qwen2.5: state-of-the-art results for a dense model.", 80000, "qwen2",
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"),
)
MISTRAL3 = (
    # As above: no LoRA badge on its page, listed by the LoRA documentation. Served as a text model.
    _hf("@cf/mistralai/mistral-small-3.1-24b-instruct", "Mistral Small 3.1 (2503) 24B instruct: long "
        "context up to 128k tokens and strong text performance.", 128000, "mistral",
        "mistralai/Mistral-Small-3.1-24B-Instruct-2503"),
)
LLAMA3 = (
    # No LoRA badge on its page either; the LoRA documentation lists it.
    _hf("@cf/meta/llama-3.1-8b-instruct", "Llama 3.1 8B instruct, Meta's multilingual model tuned for "
        "dialogue.", 7968, "llama", "meta-llama/Llama-3.1-8B-Instruct"),
    _hf("@cf/meta/llama-3.2-1b-instruct", "Llama 3.2 1B instruct, text only, tuned for multilingual "
        "dialogue, agentic retrieval and summarization.", 60000, "llama", "meta-llama/Llama-3.2-1B-Instruct",
        lora=False),
    # No Workers AI figure in the sources at hand: Meta's documented 128K (131,072 positions).
    _hf("@cf/meta/llama-3.2-3b-instruct", "Llama 3.2 3B instruct, text only, tuned for multilingual "
        "dialogue, agentic retrieval and summarization.", 131072, "llama", "meta-llama/Llama-3.2-3B-Instruct",
        lora=False),
    # Workers AI serves it in fp8; the same weights in any dtype here.
    _hf("@cf/meta/llama-3.3-70b-instruct-fp8-fast", "Llama 3.3 70B instruct (fp8 and faster on Workers "
        "AI).", 24000, "llama", "meta-llama/Llama-3.3-70B-Instruct"),
    _hf("@cf/meta/llama-guard-3-8b", "Llama Guard 3 8B, Llama 3.1 8B fine-tuned to classify the safety "
        "of LLM prompts and responses, naming the categories violated.", 131072, "llama",
        "meta-llama/Llama-Guard-3-8B"),
)

CATALOG: tuple[CatalogEntry, ...] = (LLAMA2_LORA, MISTRAL_LORA, SMOLLM2, *GEMMA, *QWEN, *MISTRAL3, *LLAMA3)
DEFAULT_MODEL = SMOLLM2
