"""Files written whole or not at all (a reader, or a run killed half-way, sees the old file or the new one), told
apart by their content, and a folder's own files."""
from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_file", "atomic_write", "content_sample", "current_umask", "is_temp_file", "visible_files"]


def content_sample(path: str | os.PathLike, block: int = 1 << 16) -> str:
    """SHA-256 (hex) of a file's size, first and last ``block`` bytes: which file it is, where name, size and
    modification time alike are no proof (two slides of a fixed size, extracted from one archive), without
    reading a whole slide. OSError for anything but a regular file (a FIFO, a device), never waiting on it."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO opened to read would wait for a writer
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
    except BaseException:
        os.close(fd)
        raise
    with open(fd, "rb") as fh:
        size = st.st_size
        h.update(size.to_bytes(8, "little") + fh.read(block))
        fh.seek(max(0, size - block))
        h.update(fh.read(block))
    return h.hexdigest()


def current_umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: a temporary ``.NAME.XXXXXXXX.tmp`` in the same folder,
    fsynced and renamed over ``path`` when the block ends without error (deleted otherwise), so a
    reader or a killed run only ever sees the old or the new file whole.

    The file gets the usual permissions (0666 less the umask), not mkstemp's private 0600.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically (see atomic_file). A file name's byte that is not
    UTF-8 (Python holds it as a lone surrogate) is written as its escape, \\udcXX: in JSON text the same
    string again when read back."""
    with atomic_file(path) as f:
        f.write(data.encode("utf-8", "backslashreplace") if isinstance(data, str) else data)


def is_temp_file(name: str, targets=None) -> bool:
    """Whether ``name`` is a temporary file that atomic_write makes for one of ``targets`` (file names)."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return False
    stem = name[1:-4]  # "NAME.XXXXXXXX"
    base, _, rand = stem.rpartition(".")
    return bool(base and rand) and (targets is None or base in targets)


def visible_files(folder: str | os.PathLike) -> Iterator[Path]:
    """The files under ``folder``, its sub-folders' included through symbolic links (each real folder once: a link
    back up the tree is no loop), hidden files and folders (named with a leading '.': a killed run's temporary files,
    .DS_Store, a Mac's ._ files on a share) left out."""
    seen = set()
    for d, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(d)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        yield from (Path(d, f) for f in files if not f.startswith("."))
