"""The versions a result depends on, recorded beside it (results.json, bench/results/*.json)."""

from __future__ import annotations

import functools
import os
import platform

import torch
import transformers

__version__ = "0.1.0"  # tqcompressor's own; pyproject.toml holds the same


def library_versions() -> dict[str, str]:
    """Python, tqcompressor, torch and transformers, as imported by this process."""
    return {
        "python": platform.python_version(),
        "tqcompressor": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def machine_record() -> dict:
    """The machine a result was measured on: CPU cores and architecture, the widest vector instructions
    PyTorch's CPU kernels use here (``AVX512``, ``AVX2``: the same run differs by about 2x between the two on 2
    cores), and the accelerator, where one is visible."""
    found = {
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_native_bf16(),
    }
    if torch.cuda.is_available():
        found["accelerator"] = torch.cuda.get_device_name(0)
    return found


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX). Elsewhere PyTorch emulates it,
    at about ten times the cost of float32 (AVX2, 2 cores: a 1536x576 matrix on 1024 tokens in 100-130 ms
    against 11 ms)."""
    # private torch helpers (present since 2.1): absent ones mean "no"
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
