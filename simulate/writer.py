"""Write a :class:`~simulate.protocol.Simulation` in the split format ``reproduce`` reads, as one whole folder.

``x_{train,val,test}_3_{V}.txt`` hold one ``user item`` pair per line (0-based),
``y_..._3_{V}.txt`` one 0/1 label per line, as in the BADR authors' processed splits;
``meta.json`` describes the matrix; ``labels.npy``, ``propensities.npy``, ``clicks.npy``
and ``ratings.npy`` are the full ground truth; ``summary.json`` the statistics.

The folder appears whole or not at all. Everything is written into a temporary sibling
folder (same parent, hidden name ``.{name}.simulate-{host}-{pid}-{random}.tmp``), each file
and the folder fsynced, and the folder is then renamed into place (``rename`` replaces a
missing or empty ``out`` atomically) and the parent fsynced. A non-empty ``out`` is refused
unless ``overwrite``; then it must hold only files this writer writes (so that a mistyped
``--out`` never deletes other work), and it is replaced in three steps: the old folder is
renamed aside (``...old``), the new one renamed in, the old one renamed to ``...del`` and
deleted. A kill at any moment leaves ``out`` the old complete folder or the new complete
one, except in the window between the first two renames (two system calls back to back),
where ``out`` is absent and both complete folders sit under their hidden names; the next
write into the same parent, or :func:`recover` of the parent, then renames the old one back.

Files honour the umask (``0o666 & ~umask``; the folder ``0o777 & ~umask``). The temporary
folder is removed if writing fails; temporaries left by writers on this host whose process
no longer runs (killed) are removed by the next write into the same parent (:func:`recover`).

:func:`write_folder` is that machinery for any set of files (``python -m simulate ctcvr``
streams its arrays through it, :mod:`simulate.ctcvr`); :func:`write` is it with this
module's files.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator

import numpy as np

from simulate.protocol import THRESHOLD, Simulation

# What this writer puts in a folder (the per-file temporaries of older versions included):
# only a folder of these is replaced with --overwrite.
_OURS = re.compile(r"[xy]_(?:train|val|test)_\d+_\d+\.txt|meta\.json|summary\.json"
                   r"|(?:labels|propensities|clicks|ratings)\.npy|\..+\.\d+\.tmp")
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32]


# This writer's temporary folders: .{name}.simulate-{host}-{pid}-{random}.{tmp|old|del}
_TEMPORARY = re.compile(r"\.(.+)\.simulate-([A-Za-z0-9]*)-(\d+)-[a-z0-9_]+\.(tmp|old|del)")


def _umask() -> int:
    """The process's umask, read without changing it where /proc allows."""
    try:
        found = re.search(r"^Umask:\s*([0-7]+)$", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        found = None
    if found:
        return int(found[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (True when unsure)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: it exists
        return True
    return True


def _fsync_dir(path: Path) -> None:
    """Flush a folder's entries (new names, renames) to disk; a file system without it is skipped."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _absolute(out_dir: str | os.PathLike) -> Path:
    """``out_dir`` as an absolute path with symbolic links resolved (a link's target is what is replaced)."""
    out = Path(os.path.realpath(os.path.expanduser(os.fspath(out_dir))))
    if not out.name:
        raise ValueError(f"--out {os.fspath(out_dir)!r} names no folder (the file system root); choose a folder")
    return out


def recover(parent: str | os.PathLike) -> None:
    """Clean up after writers into the folder ``parent`` that were killed (their process on this host is gone).

    A dead writer's old folder (``.{name}...old``, set aside for a replacement) is renamed
    back to ``name`` if ``name`` is absent (the writer was killed between its two renames);
    every other temporary folder of dead writers is deleted. Temporaries of live writers,
    or of writers on other hosts, are left alone. :func:`write` calls it on the parent of
    its output folder.
    """
    parent = Path(parent)
    if not parent.is_dir():
        return
    dead = []
    for entry in parent.iterdir():
        match = _TEMPORARY.fullmatch(entry.name)
        if match and match[2] == _HOST and not _alive(int(match[3])):
            dead.append((match[4] != "old", match[1], entry))
    for _, name, entry in sorted(dead):  # old folders first: they may be put back
        if entry.name.endswith(".old") and not os.path.lexists(parent / name):
            os.rename(entry, parent / name)
            _fsync_dir(parent)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def check_out(out_dir: str | os.PathLike, overwrite: bool = False, *, ours: re.Pattern[str] = _OURS,
              command: str = "python -m simulate") -> None:
    """Check that ``out_dir`` can take a new output folder; a ValueError naming --out and the fix.

    Refused: a file (or a path through a file) instead of a folder; a non-empty folder
    without ``overwrite``; with ``overwrite``, a folder holding anything but files whose
    names ``ours`` matches (by default those :func:`write` writes; ``command`` is the
    command named in that message). A missing or empty folder is fine (the parents are
    created as needed).
    """
    out = _absolute(out_dir)
    shown = os.fspath(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {shown} is a file, not a folder: choose another --out")
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"--out {shown}: {ancestor} is a file, not a folder: choose another --out")
    if not out.is_dir():
        return
    entries = sorted(os.listdir(out))
    if not entries:
        return
    if not overwrite:
        listed = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise ValueError(f"--out {shown} is not empty (it holds {listed}): pass --overwrite to replace it, "
                         "or choose a new or empty folder")
    foreign = [e for e in entries if not (ours.fullmatch(e) and (out / e).is_file() and not (out / e).is_symlink())]
    if foreign:
        raise ValueError(f"--out {shown} holds {foreign[0]!r}, which {command} does not write: "
                         "--overwrite replaces only a folder it wrote; remove the folder yourself or choose "
                         "another --out")


def _text(lines: str) -> Callable[[IO[bytes]], None]:
    return lambda handle: handle.write(lines.encode("ascii"))


def _json(obj: dict) -> Callable[[IO[bytes]], None]:
    return _text(json.dumps(obj, indent=2) + "\n")


def _npy(array: np.ndarray) -> Callable[[IO[bytes]], None]:
    return lambda handle: np.save(handle, array, allow_pickle=False)


def _files(sim: Simulation) -> dict[str, Callable[[IO[bytes]], None]]:
    """Every file of the output folder, by name, as a function writing its bytes."""
    suffix = f"{THRESHOLD}_{sim.val_pct}"
    files = {}
    for name, (x, y) in sim.splits.items():
        files[f"x_{name}_{suffix}.txt"] = _text(("%d %d\n" * len(x)) % tuple(x.ravel().tolist()))
        files[f"y_{name}_{suffix}.txt"] = _text(("%d\n" * len(y)) % tuple(y.tolist()))
    meta = {key: sim.summary[key] for key in ("n_users", "n_items", "threshold", "val_pct", "source",
                                              "seed", "truth_seed", "alpha", "k")}
    files["meta.json"] = _json(meta)
    files["labels.npy"] = _npy(sim.labels)
    files["propensities.npy"] = _npy(sim.propensities)
    files["clicks.npy"] = _npy(sim.clicks)
    files["ratings.npy"] = _npy(sim.ratings)
    files["summary.json"] = _json(sim.summary)
    return files


@contextmanager
def create(path: Path) -> Iterator[IO[bytes]]:
    """A new binary file at ``path`` (refused if it exists; mode ``0o666 & ~umask``), flushed and
    fsynced when the block ends without an error."""
    with open(path, "xb") as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def write(sim: Simulation, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``sim`` to the folder ``out_dir``, whole or not at all, and return ``out_dir`` as a Path.

    ``out_dir`` may be missing (its parents are created) or empty; a non-empty one is
    refused unless ``overwrite=True`` (``--overwrite``), and then replaced only if it holds
    nothing but this writer's files (:func:`check_out`). See the module docstring for the
    steps and the one short window of a replacement; stale temporaries of killed writers
    in the parent are cleaned up first (:func:`recover`).
    """
    def fill(tmp: Path) -> None:
        for name, content in _files(sim).items():
            with create(tmp / name) as handle:
                content(handle)
    return write_folder(out_dir, fill, overwrite)


def write_folder(out_dir: str | os.PathLike, fill: Callable[[Path], None], overwrite: bool = False, *,
                 ours: re.Pattern[str] = _OURS, command: str = "python -m simulate") -> Path:
    """Make ``out_dir`` the folder that ``fill`` writes, whole or not at all; return ``out_dir`` as a Path.

    ``fill(tmp)`` writes every file into the empty temporary folder ``tmp`` (with
    :func:`create`, so each is fsynced); an exception from it removes ``tmp`` and
    propagates, leaving ``out_dir`` as it was. ``ours`` and ``command`` are those of
    :func:`check_out`: with ``overwrite``, only a folder of files ``ours`` matches is
    replaced. The steps are those of the module docstring.
    """
    out = _absolute(out_dir)
    check_out(out_dir, overwrite, ours=ours, command=command)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out.parent)
    check_out(out_dir, overwrite, ours=ours, command=command)  # again: recover may have put an old folder back
    umask = _umask()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.simulate-{_HOST}-{os.getpid()}-", suffix=".tmp",
                                dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~umask)
        fill(tmp)
        _fsync_dir(tmp)
        _move_in(tmp, out, lambda: check_out(out_dir, overwrite, ours=ours, command=command))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left there once renamed into place
    return Path(out_dir)


def _move_in(tmp: Path, out: Path, recheck: Callable[[], None]) -> None:
    """Rename the complete folder ``tmp`` to ``out``, replacing a non-empty ``out`` only if ``recheck`` passes."""
    try:
        os.rename(tmp, out)  # atomic onto a missing or empty folder
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    else:
        _fsync_dir(out.parent)
        return
    recheck()  # again (check_out): files may have appeared in out while we wrote
    old = tmp.with_suffix(".old")
    os.rename(out, old)
    # The window: out is absent until the next rename (recover() puts the old folder back).
    os.rename(tmp, out)
    _fsync_dir(out.parent)
    gone = tmp.with_suffix(".del")
    os.rename(old, gone)
    shutil.rmtree(gone)
