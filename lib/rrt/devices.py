"""Which device computes (`resolve_device`: CUDA when present, a clear error when asked for and absent), and what it
computes fast: bf16 matmuls on bf16 hardware or not (then fp32 is the fast path)."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

# The CPU flags that decide the fast precision (Linux /proc/cpuinfo names): bf16 matmuls need AVX512-BF16 or AMX
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def native_bf16(device: str | torch.device | None = None) -> bool:
    """Whether bf16 matmuls run on bf16 hardware on `device` (None: the GPU if there is one, else the CPU): a GPU,
    or a CPU with AVX512-BF16 or AMX (through oneDNN). There bf16 trains 2.4× faster than fp32 (SmolLM2-135M B=2,
    2-core EPYC) and serves 2.2–2.5× faster, its small-batch matmuls bound by reading the weights rather than by
    arithmetic (LOG.md)."""
    kind = torch.device(device).type if device is not None else "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        return True
    return kind == "cpu" and bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """Return "<CPU model>; <the CPU_FLAGS it has>" (e.g. "AMD EPYC; avx2 avx512f avx512_bf16"), what a CPU
    measurement must name: the same code runs bf16 or fp32, about 2.4× apart, by these flags alone."""
    model, flags = platform.processor() or platform.machine(), set()
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    present = [f for f in CPU_FLAGS if f in flags]
    return f"{model}; {' '.join(present) or 'none of ' + '/'.join(CPU_FLAGS)}"


def machine_report() -> dict:
    """What this machine computes and how (`python -m rrt machine`): the CPU and its flags, torch's build, the
    GPU if any, and the precision `precision="auto"` (training) and `--dtype auto` (serving) pick."""
    bf16 = native_bf16()
    return {"cpu": cpu_description(), "cores": os.cpu_count(),
            "torch": f"{torch.__version__} ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU build'})",
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
            "bf16 matmuls": "yes" if bf16 else "no (AVX512-BF16 or AMX needed on a CPU)",
            "training precision (auto)": "bf16 autocast" if bf16 else "fp32",
            "serving dtype (auto)": "bfloat16" if bf16 else "float32",
            "tests skipped here": "none for precision" if bf16 else
            "the prepacked-bf16 engine tests (tests/test_serving.py: packing_supported is False)"}


def machine_text() -> str:
    """`machine_report` as aligned "key  value" lines (`python -m rrt machine`, the end of `make setup`)."""
    report = machine_report()
    width = max(map(len, report))
    return "\n".join(f"{key:{width}}  {value}" for key, value in report.items())


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
