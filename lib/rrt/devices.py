"""Which device computes (`resolve_device`: CUDA when present, a clear error when asked for and absent), and what it
computes fast: bf16 matmuls on bf16 hardware or not (then fp32 is the fast path)."""
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


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str | None = "auto") -> torch.device:
    """Return the torch device a `device` parameter names: "auto" (or None) is CUDA when torch sees a GPU, else the
    CPU; "cuda" (or "cuda:N") when torch sees none stops here with what to check, never silently on the CPU."""
    name = "auto" if device is None else str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.split(":")[0] not in DEVICES:
        raise ValueError(f"device={device!r}: valid values are {', '.join(DEVICES)} (or cuda:N)")
    if name.startswith("cuda") and not torch.cuda.is_available():
        built = torch.version.cuda
        raise RuntimeError(
            f"device={device!r} but torch {torch.__version__} sees no GPU: "
            + (f"this torch is a CPU-only build; install the CUDA build the README names for your driver"
               if built is None else
               f"it is built for CUDA {built}, which needs a matching NVIDIA driver (CUDA 13.x: R580 or newer; "
               f"check `nvidia-smi`), or the job has no GPU allocated (SLURM: --gres=gpu:N)"))
    return torch.device(name)
