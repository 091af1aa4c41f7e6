"""Process-wide settings an engine runs best with, applied by one explicit call at startup.

Constructing an engine changes nothing outside it; whoever starts one (`loader.load_engine`, a benchmark,
a test) calls `configure_process` first, on the thread that will step it: torch's thread count and the
current CUDA device are per thread.
"""

from __future__ import annotations

import torch

from loraserve.engine.config import EngineConfig
from loraserve.engine.kernels.host_malloc import keep_heap


def configure_process(ecfg: EngineConfig) -> None:
    device = torch.device(ecfg.device)
    if device.type == "cpu":
        torch.set_num_threads(ecfg.threads)
        keep_heap()  # a CPU step's activation pages stay in the process (kernels/host_malloc.py)
        return
    if device.index is not None:  # cuda:N: CUDA graphs capture on this (step) thread's current device
        torch.cuda.set_device(device)
    # cuDNN's attention plans anew for each context length (~2 ms of CPU per call on an H100); prefill
    # then uses the memory-efficient kernel, decode the graph-friendly `ops.attention.decode_attention`.
    torch.backends.cuda.enable_cudnn_sdp(False)
