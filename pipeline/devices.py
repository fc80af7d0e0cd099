"""Where and in what precision models run, and a digest of their weights that neither changes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .errors import InvalidInput


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InvalidInput(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInput(f"device {device!r} was requested but CUDA is not available on this machine")
    return torch.device(device)


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bfloat16 matmul (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if dtype not in _DTYPES:
        raise InvalidInput(f"dtype must be one of {['auto', *_DTYPES]}, got {dtype!r}")
    if dtype == "float16" and device.type == "cpu":
        raise InvalidInput("dtype 'float16' is for CUDA; on CPU use 'bfloat16' or 'float32'")
    return _DTYPES[dtype]


def weights_digest(*modules: torch.nn.Module) -> str:
    """sha256 of the parameters and buffers, by name, as float32 bytes (device and dtype independent)."""
    h = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()
