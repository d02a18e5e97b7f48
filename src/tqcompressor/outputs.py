"""Where tqcompressor may write, and how: never into, or over, files it did not write itself.

Three rules, each enforced here and nowhere else:

- **Ownership by marker, for one place only.** Every directory tqcompressor writes carries the marker
  file ``.tqcompressor``: JSON naming the path it was written as, what kind of output it is and (for
  outputs written whole) the files it wrote. A directory may be written when it does not exist, is
  empty, or carries a marker for *that* path and the same kind, and holds no file the marker does not
  list. A copy, a move or a download keeps the marker but not the path: it is the user's until the
  user says otherwise (``adopt``, the CLI's ``--adopt``), and even then only the files the marker lists
  are ever deleted. An output may never be, hold, or sit inside an input the same command reads.
- **Swapped in whole.** A model dir is written completely (metadata included) into its
  ``.partial`` sibling and then exchanged with the final name in one atomic ``renameat2`` call,
  so at every instant the final name holds the old complete output or the new one. A single file
  (an ONNX graph, a JSON report) is written in a ``.partial`` directory beside it and renamed over it.
- **One writer at a time.** A writer holds an advisory ``flock`` on a lock file named after the
  output (in a per-user folder of the system's temporary directory, so nothing is left beside the
  output if it is killed) for as long as it writes; a second writer is refused with the holder's pid.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from tqcompressor.errors import TQCError

MARKER = ".tqcompressor"
MARKER_PARTIAL = MARKER + ".partial"  # the marker being written: renamed over the marker in one step
NAME_MAX = 255  # bytes in one path component on the file systems we run on
STAGING = "staging"  # the kind of a .partial directory being filled
# the kinds of output directory: one never replaces another (a GenAI folder is not a model dir)
MODEL, RUN, GENAI = "model", "run", "onnx-genai"


def read_marker(path: Path) -> dict | None:
    """What the marker of the directory ``path`` says: ``{"path", "kind", "files"}`` (``files`` is None
    for a directory written file by file); None where there is no marker. A marker of an older
    tqcompressor (plain text) names no path, so it counts for no place."""
    marker = Path(path) / MARKER
    if not marker.is_file() or marker.is_symlink():
        return None
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        record = None
    if not isinstance(record, dict) or record.get("written_by") != "tqcompressor":
        return {"path": None, "kind": None, "files": None}
    files = record.get("files")
    return {
        "path": record.get("path") if isinstance(record.get("path"), str) else None,
        "kind": record.get("kind") if isinstance(record.get("kind"), str) else None,
        "files": [f for f in files if isinstance(f, str)] if isinstance(files, list) else None,
    }


def written_by_us(path: Path, written_as: Path | None = None) -> bool:
    """Whether ``path`` is a directory tqcompressor wrote *there* (or as ``written_as``, for a
    directory it renamed itself), not a copy or a move of one."""
    record = read_marker(path)
    if record is None or record["path"] is None:
        return False
    places = {str(Path(path).resolve())} | ({str(Path(written_as).resolve())} if written_as else set())
    return record["path"] in places


def mark(path: Path, kind: str, written_as: Path | None = None, files: list[str] | None = None) -> None:
    """Write the marker of the directory ``path``: ours, as ``written_as`` (default: where it is)."""
    record = {
        "written_by": "tqcompressor",
        "path": str(Path(written_as or path).resolve()),
        "kind": kind,
        "files": files,
    }
    partial = Path(path) / MARKER_PARTIAL
    partial.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(partial, Path(path) / MARKER)  # a kill leaves the old marker or the new one, never half of one


def check_writable(
    path: str | Path, inputs: Iterable[str | Path | None] = (), kind: str = MODEL, adopt: bool = False
) -> Path:
    """``path`` (resolved) if tqcompressor may write a directory of ``kind`` there, else a
    :class:`TQCError`. ``inputs``: what the command reads (local paths; hub ids and aliases are ignored).
    ``adopt``: the user says a copied or moved output of ours may be written as if it were written here."""
    path = output_path(path, "--out")
    if path.exists() and not path.is_dir():
        raise TQCError(f"{path} is a file, not a directory; choose a directory for --out")
    if path.is_dir() and any(path.iterdir()):
        check_ours(path, kind, adopt)
    check_not_an_input(path, inputs)
    return path


def check_ours(path: Path, kind: str, adopt: bool = False) -> None:
    """Refuse a non-empty directory unless its marker says tqcompressor wrote it here, as ``kind``,
    and every file in it is one the marker lists."""
    record = read_marker(path)
    if record is None:
        raise TQCError(
            f"{path} already holds files that tqcompressor did not write (no {MARKER} marker); "
            "choose a new or empty directory for --out"
        )
    if not adopt and not written_by_us(path):
        where = f"as {record['path']}" if record["path"] else "by an older tqcompressor"
        raise TQCError(
            f"{path} was written by tqcompressor {where} and copied or moved here, so it is yours now: "
            "choose a new --out, or pass --adopt to let tqcompressor replace the files it wrote there"
        )
    if record["kind"] not in (None, kind):
        raise TQCError(f"{path} holds a tqcompressor {record['kind']} output, not a {kind} one; choose another --out")
    foreign = sorted(foreign_entries(path, record))
    if foreign:
        raise TQCError(
            f"{path} holds {foreign[0]}{' and more' if len(foreign) > 1 else ''}, which tqcompressor did not "
            "write; move it away or choose another --out"
        )


def foreign_entries(path: Path, record: dict) -> set[str]:
    """The names in ``path`` its marker does not list (none where it lists no files)."""
    if record["files"] is None:
        return set()
    return {entry.name for entry in path.iterdir()} - set(record["files"]) - {MARKER, MARKER_PARTIAL}


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


def claim_directory(
    path: str | Path, inputs: Iterable[str | Path | None] = (), kind: str = RUN, adopt: bool = False
) -> Path:
    """Create (or reuse) an output directory written file by file, after :func:`check_writable`, and
    mark it as ours, here."""
    path = check_writable(path, inputs, kind, adopt)
    path.mkdir(parents=True, exist_ok=True)
    record = read_marker(path)
    if record is None or not written_by_us(path) or record["kind"] != kind:
        mark(path, kind, files=record["files"] if record else None)
    return path


def remove_ours(path: Path, written_as: Path | None = None) -> None:
    """Delete a directory tqcompressor wrote (refuses, with one line, one it did not)."""
    if path.exists() or path.is_symlink():
        if path.is_symlink() or not path.is_dir() or not written_by_us(path, written_as):
            if path.is_dir() and not path.is_symlink() and {e.name for e in path.iterdir()} <= {MARKER_PARTIAL}:
                (path / MARKER_PARTIAL).unlink(missing_ok=True)  # killed while marking the dir it had just made
                path.rmdir()
                return
            raise TQCError(f"{path} holds files that tqcompressor did not write; move it away and run again")
        delete_ours(path)


def delete_ours(path: Path) -> None:
    """Delete a directory of ours with its marker last: a kill part-way leaves it still marked, so the
    next run removes it instead of refusing it as someone else's. Only the files its marker lists go
    (every file, for a directory written file by file); anything else keeps the directory in place."""
    record = read_marker(path) or {"files": None}
    listed = None if record["files"] is None else set(record["files"])
    for entry in path.iterdir():
        if entry.name == MARKER or (listed is not None and entry.name not in listed | {MARKER_PARTIAL}):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    left = sorted(entry.name for entry in path.iterdir() if entry.name != MARKER)
    if left:
        raise TQCError(f"{path} was kept: it holds {left[0]}, which tqcompressor did not write; move it away")
    (path / MARKER).unlink(missing_ok=True)
    path.rmdir()


# -- one writer at a time -------------------------------------------------------------------------

_HELD: dict[Path, int] = {}  # lock file -> how many nested holders in this process


def lock_path(path: Path) -> Path:
    """The lock file of the output ``path``: named after its resolved path, in a per-user folder of the
    temporary directory, so that a writer killed with -9 leaves nothing beside the output."""
    digest = hashlib.sha256(os.fsencode(Path(path).resolve())).hexdigest()[:40]
    return Path(tempfile.gettempdir()) / f"tqcompressor-locks-{os.getuid()}" / f"{digest}.lock"


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
    descriptor = _acquire(lock, Path(path).resolve())
    _HELD[lock] = 1
    try:
        yield
    finally:
        del _HELD[lock]
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still held: a waiter that opened it sees a stale inode and retries
        os.close(descriptor)


def _acquire(lock: Path, output: Path) -> int:
    import fcntl

    lock.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    while True:
        descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(descriptor)
            os.close(descriptor)
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
            os.write(descriptor, f"{os.getpid()}\n{output}\n".encode())
            return descriptor
        os.close(descriptor)


def _read_pid(descriptor: int) -> str:
    text = os.pread(descriptor, 32, 0).decode(errors="replace").split("\n")[0].strip()
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
    remove_ours(aside, written_as=final)
    os.replace(final, aside)
    os.replace(partial, final)
    delete_ours(aside)


@contextlib.contextmanager
def staged_directory(
    final: str | Path, inputs: Iterable[str | Path | None] = (), kind: str = MODEL, adopt: bool = False
) -> Iterator[Path]:
    """Write a whole output directory: yields an empty marked ``.partial`` sibling to fill; when the
    block ends without error it is marked as ``final`` with the files it holds and replaces ``final``
    atomically; on error it is removed."""
    final = check_writable(final, inputs, kind, adopt)
    with writer_lock(final):
        check_writable(final, inputs, kind, adopt)  # again, now that no other writer can change it
        with _staging(final) as partial:
            yield partial
            mark(partial, kind, written_as=final, files=sorted(e.name for e in partial.iterdir() if e.name != MARKER))
            swap_in(partial, final)


@contextlib.contextmanager
def _staging(final: Path) -> Iterator[Path]:
    """The marked, empty ``.partial`` directory beside ``final`` (a killed writer's one is removed
    first); removed again if the block fails."""
    partial = final.with_name(final.name + ".partial")
    remove_ours(partial, written_as=final)
    partial.mkdir(parents=True)
    mark(partial, STAGING)
    try:
        yield partial
    except BaseException:
        with contextlib.suppress(OSError, TQCError):
            remove_ours(partial, written_as=final)
        raise


@contextlib.contextmanager
def staged_file(
    final: str | Path, option: str, ours: Callable[[Path], bool], inputs: Iterable[str | Path | None] = ()
) -> Iterator[Path]:
    """Write one file through the same door as a directory: locked, never over a file ``ours`` does
    not recognise, written whole. Yields the path to write, inside a marked ``.partial`` directory
    beside ``final``; any other file the block leaves there (each under a new name, such as an ONNX
    graph's external weights) is moved beside ``final`` first, then the file replaces ``final`` in one
    rename. The staging directory is removed after, whatever happened."""
    final = output_path(final, option)
    if final.is_dir():
        raise TQCError(f"{option} {final} is a directory; name the file to write, e.g. {final / 'out'}")
    check_not_an_input(final, inputs)
    with writer_lock(final):
        if final.exists() and not ours(final):
            raise TQCError(f"{option} {final} exists and was not written by tqcompressor; choose another file name")
        with _staging(final) as partial:
            yield partial / final.name
            for companion in sorted(partial.iterdir()):
                if companion.name not in (final.name, MARKER):
                    if (final.parent / companion.name).exists():
                        raise TQCError(f"{final.parent / companion.name} exists; choose another file name")
                    os.replace(companion, final.parent / companion.name)
            os.replace(partial / final.name, final)
        remove_ours(final.with_name(final.name + ".partial"))


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Replace one file we own (inside a directory the run claimed) in a single step: ``write`` writes the
    path it is given, beside ``path``, which it then replaces; a reader sees the old file or the new one."""
    partial = path.with_name(path.name + ".partial")
    write(partial)
    os.replace(partial, path)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda partial: partial.write_text(text))


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def is_main_process() -> bool:
    """True in a single process, and in rank 0 of a multi-process run (torchrun, accelerate
    launch): the one process that writes results, models and caches."""
    # read from the launcher's environment: building accelerate's PartialState here, before the
    # Accelerator, would fix the distributed state too early (on CPU it then sees one process)
    return int(os.environ.get("RANK", "0")) == 0
