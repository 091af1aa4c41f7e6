"""Reading a PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`) for the engine.

The weights are not copied: the file is memory-mapped and every A and B is a view of it, so the host
tier of the adapter cache holds page-cache pages (already resident after the upload wrote them), and
loading an adapter allocates nothing. Copying it into fresh memory page-faulted every page of it, in
system time that outweighed the rest of its loading and slowed the step threads beside it. Slots are
filled from the views (lora/pool.py), scale and dtype applied there.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path

import torch

from loraserve.engine.config import ModelConfig
from loraserve.engine.lora.pool import LoraWeights
from loraserve.peft import LoraFactor, LoraScaling, TensorKeyError, parse_tensor_key
from loraserve.types import AdapterRef

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_MAX_HEADER = 100 << 20  # safetensors' own limit


def map_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The float tensors of a safetensors file as views of a private, copy-on-write memory map (writable,
    so torch takes it without a warning; nothing writes to it), and the whole data section as one flat
    view when a single dtype fills it. The registry installs files by rename, so a mapped file is never
    truncated under a running engine."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size < 8:
            raise ValueError(f"{path.name}: not a safetensors file")
        mm = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    (n,) = struct.unpack("<Q", mm[:8])
    if n > min(_MAX_HEADER, size - 8):
        raise ValueError(f"{path.name}: safetensors header length {n} out of range")
    header = json.loads(bytes(mm[8:8 + n]))
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: safetensors header is not an object")
    start, data = 8 + n, size - 8 - n
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(str(info.get("dtype"))) if isinstance(info, dict) else None
        if dtype is None:
            raise ValueError(f"{path.name}: tensor {name} is not F64, F32, F16 or BF16")
        shape, (begin, end) = [int(d) for d in info["shape"]], [int(o) for o in info["data_offsets"]]
        count = math.prod(shape)
        fits = 0 <= begin <= end <= data and end - begin == count * dtype.itemsize
        if min(shape, default=0) < 0 or not fits:
            raise ValueError(f"{path.name}: tensor {name}'s data_offsets do not fit its shape or the file")
        out[name] = (torch.frombuffer(mm, dtype=dtype, count=count, offset=start + begin).view(shape) if count
                     else torch.empty(shape, dtype=dtype))
    dtypes = {t.dtype for t in out.values()}
    if len(dtypes) != 1 or data == 0 or data % (one := dtypes.pop()).itemsize:
        return out, None
    return out, torch.frombuffer(mm, dtype=one, count=data // one.itemsize, offset=start)


def load_adapter(ref: AdapterRef, cfg: ModelConfig, dtype: torch.dtype) -> LoraWeights:
    """Parse a PEFT adapter folder. The registry validated it at upload; this re-checks shapes and that the
    weights, B times its scale, are finite in `dtype` (the slots' dtype)."""
    folder = Path(ref.path)
    scaling = LoraScaling.from_json(json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")))
    try:
        tensors, data = map_safetensors(folder / "adapter_model.safetensors")
    except (KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"adapter_model.safetensors: malformed header ({exc!r})") from exc
    shapes = cfg.lora_shapes()
    pairs: dict[tuple[int, str], dict[LoraFactor, torch.Tensor]] = {}
    for name, t in tensors.items():
        try:  # the registry's rule for names (loraserve.peft), so what it accepted loads here
            key = parse_tensor_key(name, shapes, cfg.num_layers)
        except TensorKeyError:
            raise ValueError(f"adapter tensor {name} does not belong to this model") from None
        ab = pairs.setdefault((key.layer, key.target), {})
        if key.factor in ab:  # with and without the prefix or ".default": PEFT would keep either one
            raise ValueError(f"adapter tensor {name} repeats layer {key.layer} {key.target}'s "
                             f"{key.factor.value}")
        ab[key.factor] = t
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    scales: dict[tuple[int, str], float] = {}
    for (layer, target), ab in pairs.items():
        if set(ab) != set(LoraFactor):
            raise ValueError(f"layer {layer} {target}: lora_A and lora_B must come together")
        a, b = ab[LoraFactor.A], ab[LoraFactor.B]  # a: [r, in], b: [out, r]
        r = a.shape[0] if a.dim() == 2 else -1
        fan_in, fan_out = shapes[target]
        if r < 1 or a.shape != (r, fan_in) or b.shape != (fan_out, r):
            raise ValueError(f"adapter tensors for layer {layer} {target} have shapes {a.shape}, {b.shape}")
        modules[(layer, target)] = (a, b)
        scales[(layer, target)] = scaling.scale(layer, target, r)
    w = LoraWeights(ref.key, modules, scales)
    _check_range(w, data, dtype)
    return w


def _extremes(t: torch.Tensor) -> torch.Tensor:
    """[min, max] of t as float32; NaN if t holds one (min and max propagate it)."""
    lo, hi = torch.aminmax(t)
    return torch.stack([lo, hi]).float()


def _check_range(w: LoraWeights, data: torch.Tensor | None, dtype: torch.dtype) -> None:
    """Finite at upload can still overflow here: B times a large alpha/r, cast to fp16 or bf16. A module's
    extremes decide (rounding is monotonic), but at ~40 us a module (8 ms a 210-module adapter) a bound
    over the whole file's data (`data`, when one dtype holds it all: one pass) is tried first."""
    if not w.modules:
        return
    if data is not None and data.numel():
        bound = _extremes(data).abs().max() * max(1.0, *(abs(s) for s in w.scales.values()))
        if bool(torch.isfinite(bound.to(dtype))):
            return
    for module, (a, b) in w.modules.items():  # exact, and names the culprit
        scale = w.scales[module]
        if not (bool(torch.isfinite(_extremes(a).to(dtype)).all())
                and bool(torch.isfinite((_extremes(b) * scale).to(dtype)).all())):
            layer, target = module
            hint = " (float32 adapter slots keep them: lora_dtype float32)" if dtype is torch.float16 else ""
            raise ValueError(f"layer {layer} {target}: weights times lora_alpha/r ({scale:g}) overflow "
                             f"{dtype} or are not finite{hint}")
