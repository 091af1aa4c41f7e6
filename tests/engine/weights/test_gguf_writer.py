"""GGUF files written by `loraserve quantize` (weights/convert.py, gguf_writer.py, gguf_vocab.py), read back
by our loader, gguf-py's reader and (when llama-cpp-python is installed) llama.cpp itself, whose own quantizer
makes the same file from the float weights."""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from loraserve.engine.config import EngineConfig, Quantization
from loraserve.engine.kernels.qlinear import load_qlinear
from loraserve.engine.llm_engine import LLMEngine
from loraserve.engine.loader import load_engine
from loraserve.engine.sources import embedded_gguf_path
from loraserve.engine.weights.convert import convert
from loraserve.engine.weights.gguf_file import load_gguf
from loraserve.engine.weights.gguf_writer import PlannedTensor, write_gguf
from loraserve.engine.weights.hf import hf_tensors
from loraserve.engine.weights.quant import QuantTensor
from loraserve.engine.weights.quantize import load_hf_quantized, quant_type, quantize
from loraserve.engine.weights.tokenizer import GGUFTokenType, Tokenizer

from gguf_helpers import llama_cpp_permute
from quantize_helpers import (
    assert_same_weights,
    prompt_logits,
    tiny_hf_dir,
    train_sentencepiece,
    write_byte_level_tokenizer,
    write_sentencepiece_tokenizer,
)

needs_kernel = pytest.mark.skipif(load_qlinear() is None, reason="no C compiler: no quantized kernel")
needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed")
Q = gguf.GGMLQuantizationType
TEXTS = ["Hello, world!", "hello  123 4567", "<|im_start|>user\nhi<|im_end|>", "😀 你好 café\n\ttabs", ""]
PROMPT = list(range(3, 45))
HYPERPARAMETERS = ("context_length", "embedding_length", "block_count", "feed_forward_length",
                   "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
                   "rope.freq_base", "rope.dimension_count", "vocab_size")


@pytest.fixture(scope="module", params=list(Quantization), ids=lambda q: q.name)
def written(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Quantization]:
    root = tiny_hf_dir(tmp_path_factory.mktemp("hf"))
    write_byte_level_tokenizer(root)
    out = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    convert(str(root), out, request.param)
    return root, out, request.param


def test_file_holds_the_quantized_checkpoint(written: tuple[Path, Path, Quantization]) -> None:
    """Read back, the file is exactly what quantizing the directory at load gives."""
    root, out, quantization = written
    _, from_dir = load_hf_quantized(root, torch.float32, quantization)
    _, from_file, _ = load_gguf(out, torch.float32, keep_quantized=True)
    assert_same_weights(from_file, from_dir)


def test_metadata_and_tensors_as_llama_cpp_names_them(written: tuple[Path, Path, Quantization]) -> None:
    root, out, quantization = written
    reader = gguf.GGUFReader(out)
    for field in reader.fields.values():  # every key parses to a value
        assert field.data is not None and field.types
    fields = reader.fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    assert all(f"llama.{key}" in fields for key in HYPERPARAMETERS)
    for key in ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id"):
        assert f"tokenizer.ggml.{key}" in fields
    assert "tokenizer.chat_template" in fields
    types = {t.name: t.tensor_type for t in reader.tensors}
    chosen = Q(quant_type(quantization).value)
    # q4_k_m, q5_k_m: v and down in Q6_K in the second of the two layers (llama.cpp's use_more_bits); q4_k
    # (llama.cpp's Q4_K_S): v of the first 4 layers in Q5_K
    more = {Quantization.Q4_K_M: {"blk.1.attn_v": Q.Q6_K, "blk.1.ffn_down": Q.Q6_K},
            Quantization.Q5_K_M: {"blk.1.attn_v": Q.Q6_K, "blk.1.ffn_down": Q.Q6_K},
            Quantization.Q4_K: {"blk.0.attn_v": Q.Q5_K, "blk.1.attn_v": Q.Q5_K}}.get(quantization, {})
    for name in ("token_embd", "blk.0.attn_q", "blk.1.attn_k", "blk.0.attn_output", "blk.0.attn_v",
                 "blk.1.attn_v", "blk.0.ffn_down", "blk.1.ffn_down", "blk.1.ffn_up"):
        assert types[f"{name}.weight"] == more.get(name, chosen), name
    assert types["output.weight"] == (Q.Q8_0 if quantization is Quantization.Q8_0 else Q.Q6_K)
    file_types = {Quantization.Q8_0: 7, Quantization.Q4_0: 2, Quantization.Q4_1: 3, Quantization.Q4_K: 14,
                  Quantization.Q4_K_M: 15, Quantization.Q5_K_M: 17}  # LLAMA_FTYPE_MOSTLY_*: q4_k is Q4_K_S
    assert int(fields["general.file_type"].parts[-1][0]) == file_types[quantization]
    for name in ("output_norm", "blk.0.attn_norm", "blk.1.ffn_norm"):
        assert types[f"{name}.weight"] == Q.F32, name
    assert len(types) == 3 + 2 * 9
    # q and k rows in llama.cpp's RoPE order: gguf-py's blocks of the HF weight, rows permuted as its
    # converter permutes them.
    hf = load_file(str(root / "model.safetensors"))
    for name, heads, hf_name in (("blk.1.attn_q.weight", 4, "model.layers.1.self_attn.q_proj.weight"),
                                 ("blk.0.attn_k.weight", 2, "model.layers.0.self_attn.k_proj.weight")):
        tensor = next(t for t in reader.tensors if t.name == name)
        blocks = quantize(hf[hf_name], quant_type(quantization)).blocks.numpy()  # gguf-py's but for Q4_K
        expected = llama_cpp_permute(blocks, heads)
        assert np.array_equal(np.asarray(tensor.data).reshape(expected.shape), expected)


@needs_kernel
def test_dtype_gguf_on_the_file_is_quantize_at_load_bit_for_bit(
        written: tuple[Path, Path, Quantization]) -> None:
    root, out, quantization = written
    options = dict(dtype="gguf", threads=1, block_size=4)
    at_load, _ = load_engine(str(root), EngineConfig(quantize=quantization,
                                                     **options))  # type: ignore[arg-type]
    from_file, _ = load_engine(str(out), EngineConfig(**options))  # type: ignore[arg-type]
    assert torch.equal(prompt_logits(from_file, PROMPT), prompt_logits(at_load, PROMPT))


def test_float32_on_the_file_is_the_dequantized_quantization(
        written: tuple[Path, Path, Quantization]) -> None:
    root, out, quantization = written
    cfg, state = load_hf_quantized(root, torch.float32, quantization)
    dequantized = {name: w.dequantize() if isinstance(w, QuantTensor) else w for name, w in state.items()}
    options = dict(threads=1, block_size=4)
    reference = LLMEngine(cfg, dequantized, EngineConfig(**options))  # type: ignore[arg-type]
    from_file, _ = load_engine(str(out), EngineConfig(dtype="float32", **options))  # type: ignore[arg-type]
    assert torch.equal(prompt_logits(from_file, PROMPT), prompt_logits(reference, PROMPT))


def test_byte_level_tokenizer_round_trip(written: tuple[Path, Path, Quantization]) -> None:
    root, out, _ = written
    ours, theirs = Tokenizer.from_gguf(gguf.GGUFReader(out)), Tokenizer.from_hf_dir(root)
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
    assert (ours.bos_token_id, ours.eos_token_ids[0], ours.add_bos) == (258, 259, False)
    assert ours.chat_template.source == theirs.chat_template.source is not None


@pytest.mark.parametrize("pre", ["gpt-2", "smollm"])
def test_pre_tokenizer_named_as_llama_cpp_names_it(pre: str, tmp_path: Path) -> None:
    root = tiny_hf_dir(tmp_path / "hf")
    write_byte_level_tokenizer(root, pre)
    convert(str(root), tmp_path / "t.gguf", Quantization.Q8_0)
    reader = gguf.GGUFReader(tmp_path / "t.gguf")
    assert bytes(reader.fields["tokenizer.ggml.pre"].parts[-1]).decode() == pre
    ours, theirs = Tokenizer.from_gguf(reader), Tokenizer.from_hf_dir(root)
    assert ours.encode("a 1234 b") == theirs.encode("a 1234 b")


def test_sentencepiece_tokenizer_round_trip(tmp_path: Path) -> None:
    """Llama 2's kind: pieces, scores from tokenizer.json's merge ranks, byte tokens; sentencepiece itself
    is the oracle."""
    sp = train_sentencepiece()
    root = tiny_hf_dir(tmp_path / "hf", vocab_size=sp.get_piece_size() + 16)  # rows past the vocabulary
    write_sentencepiece_tokenizer(root, sp)
    theirs = Tokenizer.from_hf_dir(root)
    texts = ["the quick brown fox 123", "hello world café naïve", "你好 世界", "zebra ÿ 😀", "  two  spaces "]
    assert all(theirs.encode(t, add_bos=False) == sp.encode(t) for t in texts)  # the directory is right
    convert(str(root), tmp_path / "spm.gguf", Quantization.Q4_0)
    reader = gguf.GGUFReader(tmp_path / "spm.gguf")
    ours = Tokenizer.from_gguf(reader)
    for text in texts:
        assert ours.encode(text, add_bos=False) == sp.encode(text), text
        assert ours.decode(ours.encode(text)) == text
    assert ours.add_bos and ours.bos_token_id == 1 and ours.eos_token_ids[0] == 2
    types = list(reader.fields["tokenizer.ggml.token_type"].data)
    kinds = [int(reader.fields["tokenizer.ggml.token_type"].parts[i][0]) for i in types]
    assert kinds.count(GGUFTokenType.BYTE) == 256 and kinds[0] == GGUFTokenType.UNKNOWN
    assert kinds[-16:] == [GGUFTokenType.UNUSED] * 16  # placeholders up to the embedding's rows


@needs_kernel
def test_random_model_written_as_served(tmp_path: Path) -> None:
    """random:NAME:TYPE: its blocks as they are and the embedded tokenizer's metadata, so that the file
    and the in-memory model are one model."""
    out = tmp_path / "random.gguf"
    convert("random:tiny:q4_0", out, None)
    options = dict(dtype="gguf", threads=1, block_size=4)
    from_file, tokenizer = load_engine(str(out), EngineConfig(**options))  # type: ignore[arg-type]
    in_memory, embedded = load_engine("random:tiny:q4_0", EngineConfig(**options))  # type: ignore[arg-type]
    assert torch.equal(prompt_logits(from_file, PROMPT), prompt_logits(in_memory, PROMPT))
    for text in [*TEXTS, "<|im_start|>assistant\nsure<|im_end|>"]:
        assert tokenizer.encode(text) == embedded.encode(text)
    source = gguf.GGUFReader(embedded_gguf_path())
    copied = {k for k in gguf.GGUFReader(out).fields if k.startswith("tokenizer.")}
    assert copied == {k for k in source.fields if k.startswith("tokenizer.")}


@needs_kernel
def test_random_k_quant_mix_written_as_served(tmp_path: Path) -> None:
    """A Q4_K_M-like random model (Q4_K and Q6_K tensors) goes to a file and back as the same model, a
    Q5_K_M-like one has Q5_K where it has Q4_K, and an all-Q4_K one is named as llama.cpp names such files
    (Q4_K_S)."""
    out = tmp_path / "mix.gguf"
    convert("random:small:q4_k_m", out, None)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert types["blk.3.attn_v.weight"] == Q.Q6_K and types["blk.0.attn_q.weight"] == Q.Q4_K
    options = dict(dtype="gguf", threads=1, block_size=4)
    from_file, _ = load_engine(str(out), EngineConfig(**options))  # type: ignore[arg-type]
    in_memory, _ = load_engine("random:small:q4_k_m", EngineConfig(**options))  # type: ignore[arg-type]
    assert torch.equal(prompt_logits(from_file, PROMPT), prompt_logits(in_memory, PROMPT))
    field = gguf.GGUFReader(out).fields["general.file_type"]
    assert int(field.parts[-1][0]) == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    convert("random:small:q5_k_m", tmp_path / "q5.gguf", None)  # Q5_K_M: the same layers' v and down in Q6_K
    types5 = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "q5.gguf").tensors}
    assert {k: Q.Q5_K if v == Q.Q4_K else v for k, v in types.items()} == types5
    field = gguf.GGUFReader(tmp_path / "q5.gguf").fields["general.file_type"]
    assert int(field.parts[-1][0]) == int(gguf.LlamaFileType.MOSTLY_Q5_K_M)
    convert("random:small:q4_k", tmp_path / "q4_k.gguf", None)
    field = gguf.GGUFReader(tmp_path / "q4_k.gguf").fields["general.file_type"]
    assert int(field.parts[-1][0]) == int(gguf.LlamaFileType.MOSTLY_Q4_K_S)


def test_refusals_leave_no_file(tmp_path: Path) -> None:
    root = tiny_hf_dir(tmp_path / "hf")  # no tokenizer.json
    out = tmp_path / "x.gguf"
    with pytest.raises(ValueError, match=r"has no tokenizer\.json"):
        convert(str(root), out, Quantization.Q8_0)
    assert list(tmp_path.glob("x.gguf*")) == []  # nor a .partial
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="--force replaces it"):
        convert(str(root), out, Quantization.Q8_0)
    assert out.read_bytes() == b"keep me"
    with pytest.raises(ValueError, match="--type is required for a Hugging Face directory"):
        convert(str(root), tmp_path / "y.gguf", None)
    with pytest.raises(ValueError, match="is a GGUF file already"):
        convert(str(embedded_gguf_path()), tmp_path / "y.gguf", Quantization.Q8_0)
    with pytest.raises(ValueError, match="is random q4_0 blocks already"):
        convert("random:tiny:q4_0", tmp_path / "y.gguf", Quantization.Q8_0)
    with pytest.raises(ValueError, match=r"is random q4_k_m blocks already; .* random:tiny:q4_k\)"):
        convert("random:tiny:q4_k_m", tmp_path / "y.gguf", Quantization.Q4_K)
    with pytest.raises(FileNotFoundError, match="neither a Hugging Face directory"):
        convert(str(tmp_path / "nothing"), tmp_path / "y.gguf", Quantization.Q8_0)


@needs_llama_cpp
@needs_kernel
def test_llama_cpp_reads_the_file_and_agrees(written: tuple[Path, Path, Quantization]) -> None:
    """llama.cpp loads the file, tokenizes as we do, and its logits match ours within the int8 rounding of
    activations that both apply to quantized matmuls."""
    import llama_cpp

    _, out, _ = written
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, n_threads=1, logits_all=True, verbose=False)
    try:
        tokens = {text: llm.tokenize(text.encode(), add_bos=False, special=True) for text in TEXTS}
        llm.eval(PROMPT)
        theirs = torch.from_numpy(np.array(llm.scores[:len(PROMPT)], dtype=np.float32))
    finally:
        llm.close()
    ours, tokenizer = load_engine(str(out), EngineConfig(dtype="gguf", threads=1, block_size=4))
    assert tokens == {text: tokenizer.encode(text, add_bos=False) for text in TEXTS}
    mine = prompt_logits(ours, PROMPT)
    rel = (mine - theirs).norm(dim=1) / theirs.norm(dim=1)
    assert rel.mean() < 0.06 and rel.max() < 0.15, (rel.mean().item(), rel.max().item())
    assert (mine.argmax(1) == theirs.argmax(1)).float().mean() > 0.9


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def float_file(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny checkpoint (its head untied, or tied) and the same weights as an F32 GGUF file."""
    root = tiny_hf_dir(tmp_path_factory.mktemp("hf"), tie=request.param)
    write_byte_level_tokenizer(root)
    config, lazy = hf_tensors(root)
    out = tmp_path_factory.mktemp("f32") / "f32.gguf"
    write_gguf(out, config, root, [PlannedTensor(n, t.shape, None, t.load) for n, t in lazy.items()])
    return root, out


@needs_llama_cpp
@needs_kernel
@pytest.mark.parametrize("quantization", list(Quantization), ids=lambda q: q.name)
def test_llama_cpps_quantizer_makes_the_same_file(float_file: tuple[Path, Path], quantization: Quantization,
                                                  tmp_path: Path) -> None:
    """llama.cpp's own quantizer (llama_model_quantize, no importance matrix), run on the float weights for
    the file type we name, chooses each tensor's type as we do (the head Q6_K but for Q8_0, a tied
    embedding as the head, Q4_K_M's and Q5_K_M's v and down, Q4_K_S's first layers' v in Q5_K) and writes
    the same bytes."""
    import llama_cpp

    root, f32 = float_file
    ours = tmp_path / "ours.gguf"
    convert(str(root), ours, quantization)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf.GGUFReader(ours).fields["general.file_type"].parts[-1][0])
    params.nthread = 1
    theirs = tmp_path / "theirs.gguf"
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    mine = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    made = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    assert {name: t.tensor_type for name, t in mine.items()} == \
        {name: t.tensor_type for name, t in made.items()}
    head = "token_embd.weight" if "output.weight" not in mine else "output.weight"
    assert mine[head].tensor_type == (Q.Q8_0 if quantization is Quantization.Q8_0 else Q.Q6_K)
    if quantization is Quantization.Q4_K:
        assert mine["blk.1.attn_v.weight"].tensor_type == Q.Q5_K
    for name in mine:
        assert np.array_equal(np.asarray(mine[name].data), np.asarray(made[name].data)), name
