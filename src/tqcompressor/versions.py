"""The versions a result depends on, recorded beside it (results.json, bench/results/*.json)."""

from __future__ import annotations

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
    }
    if torch.cuda.is_available():
        found["accelerator"] = torch.cuda.get_device_name(0)
    return found
