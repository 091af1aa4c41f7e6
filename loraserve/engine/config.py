"""Configs: the model's shape (from HF config.json or GGUF metadata) and the engine's knobs."""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass, field
from typing import Any

from loraserve.peft import module_name as module_name  # re-exported: the loader and tests name it from here


@dataclass(frozen=True)
class ModelConfig:
    """A pre-norm decoder's shape (Llama 2/3, Mistral, SmolLM2, Gemma 1/2/3, Qwen2/3): RMSNorm, RoPE, GQA,
    a gated MLP; `architecture` names its `Family` (models/family.py), whose layers differ in the ways
    that family's entry describes. The fields after `architecture` are attention options some families
    use; their defaults are Llama's."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # HF's `rope_scaling` dict: {"rope_type": "llama3", ...} (Llama 3.1+) or "linear" (Gemma 3's global
    # layers); any other type is refused rather than served with the wrong positions.
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    architecture: str = "llama"  # adapter_config.json's model_type for adapters of this model
    # q.k is multiplied by query_pre_attn_scalar ** -0.5 (Gemma 2/3) instead of head_dim ** -0.5.
    query_pre_attn_scalar: float | None = None
    # Scores become cap * tanh(scores / cap) before the softmax (Gemma 2), logits likewise (Gemma 2).
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    # Layers marked in `sliding_layers` attend to their last `sliding_window` positions only (own token
    # included, as transformers masks them); an empty tuple with a window set means every layer (Mistral
    # v0.1's config), no window means none.
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()
    # Sliding layers' own RoPE base (Gemma 3: 10k locally, `rope_theta` and `rope_scaling` globally).
    rope_local_theta: float | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads (GQA groups)")
        for name in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                     "sliding_window", "rope_local_theta"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"ModelConfig.{name} must be > 0 (or unset)")
        if self.sliding_layers and len(self.sliding_layers) != self.num_layers:
            raise ValueError(f"ModelConfig.sliding_layers has {len(self.sliding_layers)} entries for "
                             f"{self.num_layers} layers")
        scaling = self.rope_scaling or {}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ("default", "llama3", "linear"):
            raise ValueError(f"RoPE scaling {kind!r} is not supported (served: llama3, linear)")
        if any(self.sliding_layers) and self.sliding_window is None:
            raise ValueError("ModelConfig.sliding_layers marks sliding layers but sliding_window is unset")

    def is_sliding(self, layer: int) -> bool:
        """Whether `layer` attends through the sliding window."""
        if self.sliding_window is None:
            return False
        return self.sliding_layers[layer] if self.sliding_layers else True

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def lora_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each projection, the shapes an adapter must match."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_size),
            "k_proj": (h, self.kv_size),
            "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """From a Hugging Face `config.json` of any served family, as transformers reads it (a multimodal
        Gemma 3 / Mistral 3 as its text model); ValueError for what the engine would compute otherwise."""
        # Imported here: the families' description needs torch, and this module must not.
        from loraserve.engine.weights.hf_config import model_config

        return model_config(cfg)

    def to_hf(self) -> dict[str, Any]:
        """The equivalent HF config dict of this architecture (tests build a transformers oracle from it)."""
        from loraserve.engine.weights.hf_config import hf_dict

        return hf_dict(self)


class Quantization(enum.Enum):
    """A block type a Hugging Face checkpoint's projections are quantized to at load (`--quantize`) or in a
    file (`loraserve quantize --type`), or llama.cpp's mix of them; the head is Q6_K but for q8_0
    (weights/quantize.py target_type)."""

    Q8_0 = "q8_0"
    Q4_0 = "q4_0"
    Q4_1 = "q4_1"
    # llama.cpp's Q4_K_S: Q4_K, v of the first 4 layers and down of the first eighth in Q5_K; tensors whose
    # rows are not a multiple of 256 values (SmolLM2's 576) get Q4_1 (weights/quantize.py)
    Q4_K = "q4_k"
    # llama.cpp's Q4_K_M mix: Q4_K, with v and down in Q6_K in the first and last eighth of the layers and
    # every third between (weights/quant.py use_more_bits)
    Q4_K_M = "q4_k_m"
    # llama.cpp's Q5_K_M mix: Q5_K, with v and down in Q6_K in the same layers
    Q5_K_M = "q5_k_m"


def _default_threads() -> int:
    return int(os.environ.get("LORASERVE_THREADS", "0")) or (os.cpu_count() or 1)


def physical_memory() -> int:
    """The machine's physical memory in bytes: what memory-sized defaults and refusals measure against."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class EngineConfig:
    device: str = "cpu"
    # fp32 on CPU: bf16 matmul on an AVX2 CPU is ~300x slower; CUDA runs bf16.
    dtype: str = "auto"
    block_size: int = 16  # tokens per KV block: small enough that the last block wastes little
    # KV cache budget; 0 means enough for max_num_seqs full context windows, capped on the CPU at 1 GiB or
    # 8192 tokens, whichever is more, and a quarter of the machine's memory (llm_engine.cpu_kv_budget), on
    # a GPU at half its free memory; never under one full window.
    kv_cache_bytes: int = 0
    # K/V cache elements: "auto" is float16 for GGUF blocks multiplied as stored (dtype gguf: half the
    # memory, so twice the tokens in a budget, and half what attention reads; llama.cpp's default too), the
    # compute dtype otherwise (float32 on the CPU keeps PEFT parity exact); "float16" on the CPU with any
    # dtype; "float32". Attention still sums in float32: each value is widened as it is read.
    kv_dtype: str = "auto"
    max_num_seqs: int = 64  # the running batch; more requests wait
    max_num_batched_tokens: int = 1024  # per step: prefill chunks are cut to fit, decodes go first
    max_queue: int = 256  # waiting requests beyond this are refused (the server answers 3040)
    max_loras: int = 32  # adapters resident in device slots at once (per rank bucket)
    max_lora_rank: int = 256
    # Device memory for adapter slots, per rank bucket; a bucket holds min(max_loras, this / slot size)
    # adapters.
    lora_slot_bytes: int = 2 << 30
    # Adapters kept mapped and checked (LRU, page cache); the disk holds the rest.
    adapter_host_cache_bytes: int = 2 << 30
    # Adapter weights in device slots (the host tier maps the files as stored): "auto" is float16 beside
    # quantized weights (dtype gguf) and the model's dtype otherwise; "float16" halves what the CPU LoRA
    # kernel streams each step (decode LoRA is bound by reading it: ~600 MB a step with 31 distinct SmolLM2
    # adapters), at fp16's rounding of each weight (relative 2^-11 at most) and its range (an adapter whose
    # weights times lora_alpha/r pass 65504 fails to load; "float32" keeps it). Another type than the
    # model's: CPU float32 or gguf with the native kernels only.
    lora_dtype: str = "auto"
    # Reuse the K/V of cached prompt prefixes (same tokens, adapter and salt); off only to compare.
    prefix_caching: bool = True
    # CUDA only: replay pure decode steps as captured CUDA graphs (decode_graphs.py); off to compare.
    cuda_graphs: bool = True
    # CPU float32 only: projections, attention (decode and prefill; K/V read in place through block
    # tables), multi-LoRA (packed adapter slots) and residual/RMSNorm/RoPE/silu in C kernels built at first
    # start (kernels/build.py); off (or no C compiler) for torch's MKL, gather + SDPA, padded-GEMM and
    # operator paths.
    native_kernels: bool = True
    # Quantize a Hugging Face directory's projections and embedding at load (weights/quantize.py), then
    # multiply them as stored like a GGUF file's: dtype gguf, CPU only.
    quantize: Quantization | None = None
    threads: int = field(default_factory=_default_threads)
    # CPU: step with fewer than `threads` while the engine's threads wait for cores other work holds, and
    # take them back once a core stays idle (thread_governor.py); off: always `threads`.
    adaptive_threads: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_queue", "max_loras",
                     "max_lora_rank", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            # Otherwise running decodes past the budget would stall until earlier sequences finish.
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs")
        if min(self.kv_cache_bytes, self.adapter_host_cache_bytes, self.lora_slot_bytes) < 0:
            raise ValueError("cache budgets must be >= 0")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16", "gguf"):
            raise ValueError("dtype must be auto, float32, bfloat16, float16 or gguf")
        if self.dtype == "gguf" and self.device != "cpu":
            raise ValueError("dtype gguf (a GGUF file's own quantization) runs on the CPU only")
        if self.quantize is not None and not isinstance(self.quantize, Quantization):
            raise ValueError(f"quantize must be one of {', '.join(q.value for q in Quantization)}")
        if self.quantize is not None and self.device != "cpu":
            raise ValueError("quantize (blocks multiplied as stored) runs on the CPU only")
        if self.quantize is not None and self.dtype != "gguf":
            raise ValueError(f"quantize {self.quantize.value} serves GGUF blocks: it needs dtype gguf, "
                             f"not {self.dtype}")
        if self.kv_dtype not in ("auto", "float32", "float16"):
            raise ValueError("kv_dtype must be auto, float32 or float16")
        if self.kv_dtype != "auto" and self.device != "cpu":
            raise ValueError("kv_dtype is for the CPU: CUDA keeps K/V in the model's dtype")
        if self.lora_dtype not in ("auto", "float32", "float16"):
            raise ValueError("lora_dtype must be auto, float32 or float16")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be cpu, cuda or cuda:N, not {self.device!r}")
