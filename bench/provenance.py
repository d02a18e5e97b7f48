"""What every result file records about the code it measured."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


def git_commit() -> str:
    """HEAD, marked ``+uncommitted`` when tracked files differ from it. Call it when a run starts:
    that is the code the run imports. Where the tree is a copy without ``.git``, the caller states
    the commit in ``BENCH_COMMIT``."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    if not head:  # a copy of the tree without .git (a lent GPU machine): the commit it was copied from, if given
        return os.environ.get("BENCH_COMMIT", "unknown (no git repository, BENCH_COMMIT unset)")
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE, capture_output=True,
                           text=True).stdout.strip()
    return head + ("+uncommitted" if dirty else "")


def versions() -> dict[str, str]:
    """The versions of what a result depends on most: Python, torch, transformers."""
    import platform

    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
