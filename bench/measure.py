"""Timing, the machine's matmul limit, model FLOPs, and the machine/version record every result carries."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch


def timed(fn: Callable[[Any], Any], inputs: Iterable[Any], warmup: int = 0) -> tuple[list[float], list[Any]]:
    """Call ``fn`` on each input, the first ``warmup`` calls untimed. Returns (seconds per timed call, outputs)."""
    return interleaved([fn], list(inputs), warmup)[0]


def interleaved(
    fns: list[Callable[[Any], Any]], inputs: list[Any], warmup: int = 0
) -> list[tuple[list[float], list[Any]]]:
    """``timed`` for several functions on the same inputs, round-robin (input k through every function before input
    k+1), so drift on a shared machine hits all of them alike and their ratios stay fair."""
    out: list[tuple[list[float], list[Any]]] = [([], []) for _ in fns]
    for k, x in enumerate(inputs):
        for fn, (secs, outs) in zip(fns, out, strict=True):
            t0 = time.perf_counter()
            result = fn(x)
            dt = time.perf_counter() - t0
            if k >= warmup:
                secs.append(dt)
                outs.append(result)
    return out


def rate(items_per_call: int, secs: list[float]) -> float:
    """Items per second from the median call time (robust to the odd descheduled call on a shared machine)."""
    return items_per_call / statistics.median(secs) if secs else float("nan")


def matmul_peak(dtype: torch.dtype, shapes: list[tuple[int, int, int]], min_s: float = 0.5) -> dict[str, Any]:
    """The best of (M, K) @ (K, N) GFLOP/s over ``shapes``: what this machine's GEMM library delivers in ``dtype``."""
    best: dict[str, Any] = {"gflops": 0.0}
    with torch.inference_mode():
        for m, k, n in shapes:
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            a @ b  # warm-up
            calls, t0 = 0, time.perf_counter()
            samples = []
            while time.perf_counter() - t0 < min_s or calls < 3:
                t = time.perf_counter()
                a @ b
                samples.append(time.perf_counter() - t)
                calls += 1
            gflops = 2 * m * k * n / min(samples) / 1e9  # the limit: best call, not the typical one
            if gflops > best["gflops"]:
                best = {"gflops": gflops, "shape": [m, k, n]}
    return best


def flops_per_image(vision: torch.nn.Module, projection: torch.nn.Module, image_size: int = 224) -> int:
    """FLOPs of one image through the vision tower and projection (matmuls, attention), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    param = next(vision.parameters())
    x = torch.zeros(1, 3, image_size, image_size, dtype=param.dtype)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        projection(vision(pixel_values=x)[1])
    return int(counter.get_total_flops())


def machine() -> dict[str, Any]:
    """Where and with what this run was measured."""
    import diffusers
    import ray
    import transformers

    cpu = ""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = float("nan")
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(mem_gib, 1),
        "isa": sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma")),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "diffusers": diffusers.__version__,
            "ray": ray.__version__,
        },
        "git": _git(),
    }


def _git() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + ("+dirty" if dirty.strip() else "") if out.returncode == 0 else None
