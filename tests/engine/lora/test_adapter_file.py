"""Reading adapter files: memory-mapped views (no copy), malformed files refused, the range check exact."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraserve.engine.config import ModelConfig, module_name
from loraserve.engine.lora.adapter_file import load_adapter, map_safetensors
from loraserve.engine.lora.gemm import GemmLora
from loraserve.engine.lora.pool import LoraPool, LoraWeights
from loraserve.engine.lora.sgmv import SgmvLora
from loraserve.tools.bench.workload import WorkloadSpec, write_adapters
from loraserve.types import AdapterRef

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8)
SMOL = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                   num_kv_heads=3, head_dim=64)


def _tensors(rank: int = 4, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(CFG.num_layers):
        for target, (fan_in, fan_out) in CFG.lora_shapes().items():
            name = f"base_model.model.{module_name(layer, target)}"
            out[f"{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g).to(dtype)
            out[f"{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g).to(dtype)
    return out


def _folder(root: Path, tensors: dict[str, torch.Tensor], rank: int = 4, alpha: float = 8) -> AdapterRef:
    root.mkdir(parents=True, exist_ok=True)
    (root / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": alpha}))
    save_file(tensors, str(root / "adapter_model.safetensors"))
    return AdapterRef(root.name, str(root))


def test_views_of_the_file_hold_its_values(tmp_path: Path) -> None:
    ref = _folder(tmp_path / "a", _tensors())
    path = Path(ref.path) / "adapter_model.safetensors"
    mapped, data = map_safetensors(path)
    expected = load_file(str(path))
    assert mapped.keys() == expected.keys()
    for name, t in expected.items():
        assert torch.equal(mapped[name], t)
    assert data is not None and data.numel() == sum(t.numel() for t in expected.values())
    w = load_adapter(ref, CFG, torch.float32)
    assert w.scales[(1, "v_proj")] == 8 / 4 and w.rank == 4
    assert w.nbytes == sum(t.nbytes for t in expected.values())


def test_loading_copies_nothing(tmp_path: Path) -> None:
    """A SmolLM2-sized adapter (19.5 MB) held in the host tier adds file pages to the process, not anonymous
    memory: a copy (as load_file made) would add ~19.5 MB of it. In a fresh interpreter, so that no freed
    memory of other tests can be reused unseen."""
    refs = write_adapters(tmp_path, SMOL, WorkloadSpec(adapters=2, registered=2), torch.float32)
    code = f"""
import torch
from loraserve.engine.lora.adapter_file import load_adapter
from loraserve.engine.config import ModelConfig
from loraserve.types import AdapterRef
def anon():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssAnon:"))
cfg = ModelConfig(**{SMOL.__dict__!r})
held = [load_adapter(AdapterRef("a", {refs[0].path!r}), cfg, torch.float32)]  # first-call costs
before = anon()
held.append(load_adapter(AdapterRef("b", {refs[1].path!r}), cfg, torch.float32))
print(anon() - before, held[1].nbytes)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    grown_kb, nbytes = (int(v) for v in out.split())
    assert nbytes > 19_000_000
    assert grown_kb * 1024 < nbytes // 10, (grown_kb, nbytes)


def test_mixed_and_half_precision_files_fill_slots_like_float32(tmp_path: Path) -> None:
    """bf16 / fp16 weights (and a file mixing dtypes, which has no single flat view) are widened when a
    slot is written; the scale is applied in float32 either way."""
    base = _tensors(seed=1)
    mixed = {k: v.half() if "lora_A" in k else v for k, v in base.items()}
    for name, tensors in (("bf16", {k: v.bfloat16() for k, v in base.items()}), ("mixed", mixed)):
        ref = _folder(tmp_path / name, tensors)
        if name == "mixed":
            assert map_safetensors(Path(ref.path) / "adapter_model.safetensors")[1] is None
        w = load_adapter(ref, CFG, torch.float32)
        widened = LoraWeights("f", {m: (a.float(), b.float()) for m, (a, b) in w.modules.items()},
                              dict(w.scales))
        for sgmv in (None, _kernel()):
            backend = SgmvLora(sgmv) if sgmv is not None else GemmLora()
            got, want = LoraPool(CFG, 8, 1, torch.float32, torch.device("cpu"), backend), \
                LoraPool(CFG, 8, 1, torch.float32, torch.device("cpu"), backend)
            got.write(0, w)
            want.write(0, widened)
            for g, e in zip(got.a + got.b, want.a + want.b, strict=True):
                assert torch.equal(g[:, 0], e[:, 0])


def _kernel() -> object:
    from loraserve.engine.kernels.cpu import load_lora_sgmv

    return load_lora_sgmv()


def test_the_range_check_is_exact(tmp_path: Path) -> None:
    """Only B is scaled: a large A beside a large alpha/r is fine in fp16 (the whole-file bound says maybe,
    the per-module check says yes); B times it past 65504 is refused, and so is a NaN anywhere."""
    loud_a = _tensors()
    loud_a["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"][0, 0] = 1000.0
    w = load_adapter(_folder(tmp_path / "loud-a", loud_a, alpha=400), CFG, torch.float16)  # scale 100
    assert w.scales[(0, "q_proj")] == 100
    loud_b = _tensors()
    loud_b["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"][3, 1] = -1000.0
    ref = _folder(tmp_path / "loud-b", loud_b, alpha=400)
    assert load_adapter(ref, CFG, torch.float32).rank == 4
    with pytest.raises(ValueError, match=r"layer 1 up_proj: .*\(100\) overflow torch\.float16"):
        load_adapter(ref, CFG, torch.float16)
    nan = _tensors()
    nan["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"][2, 5] = float("nan")
    with pytest.raises(ValueError, match="layer 1 k_proj"):
        load_adapter(_folder(tmp_path / "nan", nan), CFG, torch.float32)


def _raw(root: Path, header: bytes, data: bytes = b"") -> AdapterRef:
    root.mkdir(parents=True)
    (root / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    (root / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + data)
    return AdapterRef(root.name, str(root))


@pytest.mark.parametrize(("header", "data", "match"), [
    (b"", None, "not a safetensors file"),
    (b"{}", b"", "header length"),
    (b"[1, 2]", b"", "not an object"),
    (b"{not json", b"", "malformed header"),
    (b'{"x": {"dtype": "I32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4,
     "not F64, F32, F16 or BF16"),
    (b'{"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}', b"\0" * 4, "do not fit"),
    (b'{"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', b"\0" * 4, "do not fit"),
    (b'{"x": {"dtype": "F32", "shape": [1]}}', b"\0" * 4, "malformed header"),
    (b'{"x": {"dtype": "F32", "shape": [-1, 0], "data_offsets": [0, 0]}}', b"", "do not fit"),
])
def test_malformed_files_are_refused(tmp_path: Path, header: bytes, data: bytes | None, match: str) -> None:
    ref = _raw(tmp_path / "bad", header, data if data is not None else b"")
    if data is None:  # shorter than the 8-byte length itself
        (Path(ref.path) / "adapter_model.safetensors").write_bytes(b"\1\0")
    if match == "header length":  # a length pointing past the end of the file
        (Path(ref.path) / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ValueError, match=match):
        load_adapter(ref, CFG, torch.float32)


def test_tensors_that_do_not_pair_up_are_refused(tmp_path: Path) -> None:
    tensors = _tensors()
    del tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"]
    with pytest.raises(ValueError, match="layer 0 down_proj: lora_A and lora_B must come together"):
        load_adapter(_folder(tmp_path / "half", tensors), CFG, torch.float32)


def test_rank_zero_and_misshapen_modules_are_refused(tmp_path: Path) -> None:
    tensors = _tensors()
    key = "base_model.model.model.layers.1.self_attn.o_proj"
    zero = {**tensors, f"{key}.lora_A.weight": torch.zeros(0, 32), f"{key}.lora_B.weight": torch.zeros(32, 0)}
    with pytest.raises(ValueError, match="layer 1 o_proj have shapes"):
        load_adapter(_folder(tmp_path / "rank0", zero), CFG, torch.float32)
    wide = {**tensors, f"{key}.lora_A.weight": torch.zeros(4, 33)}
    with pytest.raises(ValueError, match="layer 1 o_proj have shapes"):
        load_adapter(_folder(tmp_path / "wide", wide), CFG, torch.float32)
