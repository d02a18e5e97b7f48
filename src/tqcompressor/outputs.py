"""Where tqcompressor may write: never into, or over, files it did not write itself.

Every directory it creates (a saved model, a run dir, a dense export, the ``.partial`` sibling of
an atomic save) gets a small marker file. A directory is then writable when it does not exist,
is empty, or carries the marker (an earlier tqcompressor output, which may be replaced or
continued). Anything else is refused with one line that says what to do.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tqcompressor.errors import TQCError

MARKER = ".tqcompressor"
# outputs written before the marker existed
EARLIER_OUTPUTS = ("tqcompressor.json", "metrics.jsonl", "results.json")


def written_by_us(path: Path) -> bool:
    return any((path / name).is_file() for name in (MARKER, *EARLIER_OUTPUTS))


def check_writable(path: str | Path) -> Path:
    """``path`` (resolved) if tqcompressor may write there, else a :class:`TQCError`."""
    path = Path(path).resolve()
    if path.exists() and not path.is_dir():
        raise TQCError(f"{path} is a file, not a directory; choose a directory for --out")
    if path.is_dir() and any(path.iterdir()) and not written_by_us(path):
        raise TQCError(
            f"{path} already holds files that tqcompressor did not write; choose a new or empty directory for --out"
        )
    return path


def claim_directory(path: str | Path) -> Path:
    """Create (or reuse) an output directory after :func:`check_writable`, and mark it as ours."""
    path = check_writable(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("written by tqcompressor\n")
    return path


def remove_ours(path: Path) -> None:
    """Delete a directory tqcompressor wrote (refuses, with one line, one it did not)."""
    if path.exists():
        check_writable(path)
        shutil.rmtree(path)


def is_main_process() -> bool:
    """True in a single process, and in rank 0 of a multi-process run (torchrun, accelerate
    launch): the one process that writes results, models and caches."""
    # read from the launcher's environment: building accelerate's PartialState here, before the
    # Accelerator, would fix the distributed state too early (on CPU it then sees one process)
    return int(os.environ.get("RANK", "0")) == 0
