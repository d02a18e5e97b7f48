"""What every result file records about the code it measured."""

from __future__ import annotations

import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


def git_commit() -> str:
    """HEAD, marked ``+uncommitted`` when tracked files differ from it. Call it when a run starts:
    that is the code the run imports."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE, capture_output=True,
                           text=True).stdout.strip()
    return head + ("+uncommitted" if dirty else "")
