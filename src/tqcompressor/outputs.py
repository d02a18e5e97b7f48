"""Where tqcompressor may write, and how: never into, or over, files it did not write itself.

Three rules, each enforced here and nowhere else:

- **Ownership by marker only.** Every directory tqcompressor creates carries the marker file
  ``.tqcompressor``. A directory may be written when it does not exist, is empty, or carries the
  marker; no other file name makes a directory ours. An output may never be, hold, or sit inside
  an input the same command reads.
- **Swapped in whole.** A model dir is written completely (metadata included) into its
  ``.partial`` sibling and then exchanged with the final name in one atomic ``renameat2`` call,
  so at every instant the final name holds the old complete output or the new one.
- **One writer at a time.** A writer holds an advisory ``flock`` on a lock file beside the
  output for as long as it writes; a second writer is refused with the holder's pid.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from tqcompressor.errors import TQCError

MARKER = ".tqcompressor"
NAME_MAX = 255  # bytes in one path component on the file systems we run on


def written_by_us(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def check_writable(path: str | Path, inputs: Iterable[str | Path | None] = ()) -> Path:
    """``path`` (resolved) if tqcompressor may write a directory there, else a :class:`TQCError`.
    ``inputs``: what the command reads (local paths; hub ids and aliases are ignored)."""
    path = output_path(path, "--out")
    if path.exists() and not path.is_dir():
        raise TQCError(f"{path} is a file, not a directory; choose a directory for --out")
    if path.is_dir() and any(path.iterdir()) and not written_by_us(path):
        raise TQCError(
            f"{path} already holds files that tqcompressor did not write (no {MARKER} marker); "
            "choose a new or empty directory for --out"
        )
    check_not_an_input(path, inputs)
    return path


def check_not_an_input(path: Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuse an output that is, holds, or sits inside something the command reads."""
    for source in inputs:
        if source is None or not Path(source).exists():
            continue  # a hub id or an alias: nothing on disk to overwrite
        source = Path(source).resolve()
        if path == source or path in source.parents or source in path.parents:
            raise TQCError(f"--out {path} would overwrite the input {source}; choose another directory for --out")


def output_path(path: str | Path, option: str) -> Path:
    """The absolute path of an output named by ``option``, after the checks that would otherwise fail
    deep inside a write: each name short enough, the nearest existing parent a writable directory."""
    path = Path(path).expanduser()
    for part in path.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise TQCError(f"{option}: the name {part[:40]}... is longer than {NAME_MAX} bytes; choose a shorter one")
    path = path.resolve()
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise TQCError(f"{option} {path}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK):
                raise TQCError(f"{option} {path}: {parent} is not writable")
            break
    return path


def claim_directory(path: str | Path, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Create (or reuse) an output directory after :func:`check_writable`, and mark it as ours."""
    path = check_writable(path, inputs)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("written by tqcompressor\n")
    return path


def remove_ours(path: Path) -> None:
    """Delete a directory tqcompressor wrote (refuses, with one line, one it did not)."""
    if path.exists() or path.is_symlink():
        if path.is_symlink() or not path.is_dir() or not written_by_us(path):
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
                return
            raise TQCError(f"{path} holds files that tqcompressor did not write; move it away and run again")
        delete_ours(path)


def delete_ours(path: Path) -> None:
    """Delete a directory of ours with its marker last: a kill part-way leaves it still marked, so the
    next run removes it instead of refusing it as someone else's."""
    for entry in path.iterdir():
        if entry.name == MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (path / MARKER).unlink(missing_ok=True)
    path.rmdir()


# -- one writer at a time -------------------------------------------------------------------------

_HELD: dict[Path, int] = {}  # lock file -> how many nested holders in this process


def lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def writer_lock(path: str | Path) -> Iterator[None]:
    """Hold the advisory lock on the output ``path`` (re-entrant within one process; only the
    process that writes holds it)."""
    if not is_main_process():  # under torchrun only rank 0 writes: the other ranks must not wait on its lock
        yield
        return
    lock = lock_path(Path(path).resolve())
    if lock in _HELD:
        _HELD[lock] += 1
        try:
            yield
        finally:
            _HELD[lock] -= 1
        return
    descriptor = _acquire(lock)
    _HELD[lock] = 1
    try:
        yield
    finally:
        del _HELD[lock]
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still held: a waiter that opened it sees a stale inode and retries
        os.close(descriptor)


def _acquire(lock: Path) -> int:
    import fcntl

    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(descriptor)
            os.close(descriptor)
            output = lock.with_name(lock.name[1 : -len(".lock")])
            raise TQCError(
                f"{output} is being written by another tqcompressor process (pid {holder}); "
                "wait for it to finish or choose another --out"
            ) from None
        try:
            same = os.fstat(descriptor).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file the previous holder unlinked as we opened it
            os.ftruncate(descriptor, 0)
            os.write(descriptor, f"{os.getpid()}\n".encode())
            return descriptor
        os.close(descriptor)


def _read_pid(descriptor: int) -> str:
    text = os.pread(descriptor, 32, 0).decode(errors="replace").strip()
    return text if text.isdigit() else "unknown"


# -- swapped in whole -------------------------------------------------------------------------------

RENAME_EXCHANGE = 2  # linux/fs.h


def exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_cwd = -100
    result = renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False  # the file system cannot exchange: the fallback below
    raise OSError(code, os.strerror(code), str(first))


def swap_in(partial: Path, final: Path) -> None:
    """Put the complete ``partial`` under ``final``; an older ``final`` (ours) is deleted after."""
    if not final.exists():
        os.replace(partial, final)
        return
    if exchange(partial, final):  # partial now holds the old output
        delete_ours(partial)
        return
    aside = final.with_name(final.name + ".old")  # no exchange here: the short gap is unavoidable
    remove_ours(aside)
    os.replace(final, aside)
    os.replace(partial, final)
    delete_ours(aside)


@contextlib.contextmanager
def staged_directory(final: str | Path, inputs: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """Write a whole output directory: yields an empty marked ``.partial`` sibling to fill; when the
    block ends without error it replaces ``final`` atomically, and on error it is removed."""
    final = check_writable(final, inputs)
    with writer_lock(final):
        check_writable(final, inputs)  # again, now that no other writer can change it
        partial = final.with_name(final.name + ".partial")
        remove_ours(partial)
        claim_directory(partial)
        try:
            yield partial
        except BaseException:
            with contextlib.suppress(OSError, TQCError):
                remove_ours(partial)
            raise
        swap_in(partial, final)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace one file we own in a single step: a reader sees the old text or the new one."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def is_main_process() -> bool:
    """True in a single process, and in rank 0 of a multi-process run (torchrun, accelerate
    launch): the one process that writes results, models and caches."""
    # read from the launcher's environment: building accelerate's PartialState here, before the
    # Accelerator, would fix the distributed state too early (on CPU it then sees one process)
    return int(os.environ.get("RANK", "0")) == 0
