"""The versions a result depends on, recorded beside it (results.json, bench/results/*.json)."""

from __future__ import annotations

import platform


def library_versions() -> dict[str, str]:
    """Python, tqcompressor, torch and transformers, as imported by this process."""
    import torch
    import transformers

    from tqcompressor import __version__

    return {
        "python": platform.python_version(),
        "tqcompressor": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
