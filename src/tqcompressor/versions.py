"""The versions a result depends on, recorded beside it (results.json, bench/results/*.json)."""

from __future__ import annotations

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
