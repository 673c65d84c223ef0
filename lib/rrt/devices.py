"""What the device computes fast: bf16 matmuls on bf16 hardware or not (then fp32 is the fast path)."""
from __future__ import annotations

import torch


def native_bf16(device: str | torch.device | None = None) -> bool:
    """Whether bf16 matmuls run on bf16 hardware on `device` (None: the GPU if there is one, else the CPU): a GPU,
    or a CPU with AVX512-BF16 or AMX (through oneDNN). There bf16 trains 2.4× faster than fp32 (SmolLM2-135M B=2,
    2-core EPYC) and serves 2.2–2.5× faster, its small-batch matmuls bound by reading the weights rather than by
    arithmetic (LOG.md)."""
    kind = torch.device(device).type if device is not None else "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        return True
    return kind == "cpu" and bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
