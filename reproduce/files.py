"""Files that are written as results come: whole or not at all, under a lock, honouring the umask.

Every file ``reproduce`` writes (results.csv, history.csv, table3.md, tuning logs, configs,
propensity-cache entries) goes through :func:`replace` or :func:`replace_with`: the content goes
to a temporary file created next to the target (``mkstemp``: a new file, never an existing one
or a link planted at its name), is flushed to disk, gets the mode a plain ``open`` would give it
(``0o666`` less the umask; ``mkstemp`` makes ``0o600``) and is renamed over the target, so a
reader or a killed writer never sees half a file.  A read-modify-write of a file shared by
processes (several ``table3`` or ``tune`` on one ``--out``) holds :func:`locked`, an exclusive
``flock`` on a ``.<name>.lock`` file beside it, so no writer's change is lost.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path
from typing import Callable, IO, Iterator

_TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666`` less the process's umask."""
    return 0o666 & ~_umask()


@contextlib.contextmanager
def locked(path: str | os.PathLike, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive lock for ``path`` (an ``flock`` on ``.<name>.lock`` in its folder); with
    ``wait`` False, raise ``BlockingIOError`` at once when another process holds it."""
    path = Path(path)
    lock = path.with_name(f".{path.name}.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, file_mode())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)  # releases the lock


def replace_with(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` whole or not at all: ``write`` fills a new temporary file beside it, which is
    fsynced, given the umask's mode and renamed over ``path``; on any error it is removed."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; it must be a file this tool writes (move the folder away)")
    # The writer's pid in the name: remove_stale_temporaries can tell a dead writer's leftover.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace(path: str | os.PathLike, text: str) -> None:
    """:func:`replace_with` for a text file (UTF-8)."""
    replace_with(path, lambda f: f.write(text.encode("utf-8")))


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of :func:`replace_with` that writers killed mid-write left in
    ``folder`` (those whose writer's pid is no longer alive); return them."""
    removed = []
    for tmp in Path(folder).glob(f".*{_TMP_SUFFIX}"):
        parts = tmp.name.split(".")
        pid = next((int(p) for p in reversed(parts[:-2]) if p.isdigit()), None)
        if pid is None or pid == os.getpid() or _alive(pid):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def check_folder(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a folder to write into, created if missing; ``ValueError`` if it is a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file, not a folder; pass a folder")
    path.mkdir(parents=True, exist_ok=True)
    return path
