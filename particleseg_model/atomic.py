"""Atomic file writes: a reader sees the old file or the new one, never half of either.

The one policy of the project, used by every site that writes a file in place of another:

1. the new content goes to a temporary name in the *same folder* as the target (the same file
   system, so the rename below is atomic), ``.<name>.<host>-<pid>-<random>.tmp``: hidden,
   recognisable by :func:`is_temporary`, and naming the process that writes it, so that
   :func:`remove_stale_temporaries` can tell a write killed on this host (its process is gone)
   from one in progress;
2. the temporary file is flushed and ``fsync``-ed, so the rename never publishes a file whose
   blocks are not on disk yet;
3. ``os.replace`` puts it in place (atomic on POSIX, replaces an existing target), then the
   folder is ``fsync``-ed so that the rename itself survives a power cut;
4. on any exception the temporary file is removed and the target is untouched; an ``OSError``
   that names no file (``ENOSPC`` from a ``write``) is raised again naming the target.

A kill (SIGKILL, a power cut) skips step 4: the next run of the command calls
:func:`remove_stale_temporaries` on its targets, which removes the temporaries of processes that
are gone from this host, and any older than :data:`STALE_TEMPORARY_S` (another host's).

Folders (a Zarr version, a model version) follow the same idea one level up: they are built
under a temporary name and renamed (see :mod:`particleseg_model.corpus.store` and
:mod:`particleseg_model.model.registry`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "TEMPORARY_SUFFIX",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_dir",
    "is_temporary",
    "remove_stale_temporaries",
    "temporary_name",
]

TEMPORARY_SUFFIX = ".tmp"
STALE_TEMPORARY_S = 24 * 3600.0
"""A temporary file of another host (whose processes cannot be asked) is stale after a day."""


def _host_tag() -> str:
    """Six hex digits naming this host in temporary names (a hash: host names hold dots)."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def temporary_name(target: str | os.PathLike[str]) -> Path:
    """A fresh temporary path beside ``target``:
    ``<folder>/.<name>.<host>-<pid>-<16 hex>.tmp`` (host: :func:`_host_tag`)."""
    target = Path(target)
    tag = f"{_host_tag()}-{os.getpid()}-{secrets.token_hex(8)}"
    return target.with_name(f".{target.name}.{tag}{TEMPORARY_SUFFIX}")


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def remove_stale_temporaries(
    target: str | os.PathLike[str], *, max_age_s: float = STALE_TEMPORARY_S
) -> list[Path]:
    """Remove the temporaries of ``target`` that a killed write left beside it.

    A temporary (:func:`temporary_name`, or a folder named so) is stale when it names a process
    of this host that no longer runs, or, whatever it names (another host's, or the old
    ``.<name>.<16 hex>.tmp`` form), when it was last modified over ``max_age_s`` seconds ago.
    A write in progress, here or on another host sharing the folder, is never touched.

    Parameters
    ----------
    target
        The file (or folder) whose temporaries to look for; a missing folder has none.
    max_age_s
        Age in seconds past which any temporary of ``target`` is stale.

    Returns
    -------
    list of Path
        The temporaries removed.
    """
    import shutil

    target = Path(target)
    prefix = f".{target.name}."
    try:
        candidates = [
            p for p in target.parent.iterdir() if p.name.startswith(prefix) and is_temporary(p)
        ]
    except (FileNotFoundError, NotADirectoryError):
        return []
    host, now, removed = _host_tag(), time.time(), []
    for path in candidates:
        tag = path.name[len(prefix) : -len(TEMPORARY_SUFFIX)].split("-")
        ours = len(tag) == 3 and tag[0] == host and tag[1].isdigit()
        try:
            age = now - path.lstat().st_mtime
        except FileNotFoundError:
            continue
        if not ((ours and _process_gone(int(tag[1]))) or age > max_age_s):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _naming(exc: OSError, target: Path) -> OSError:
    """``exc`` naming ``target`` when it names no file (a full disk's ``write``, pyarrow's
    ``Error writing bytes``) or only a temporary name (a writer that writes atomically too)."""
    named = exc.filename is not None and not is_temporary(exc.filename)
    if named or (exc.filename is None and str(target) in str(exc)):  # named, or our own
        return exc
    code, reason = exc.errno, exc.strerror
    if code is None:  # a message only (pyarrow's "... [errno 28] ..."): keep it, find the errno
        found = re.search(r"errno (\d+)", str(exc), re.IGNORECASE)
        code = int(found.group(1)) if found else errno.EIO
        reason = os.strerror(code) if found else str(exc)
    reason = reason or os.strerror(code)
    try:
        return type(exc)(code, reason, str(target))
    except Exception:  # an OSError subclass with another signature
        return OSError(code, reason, str(target))


def is_temporary(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is named like a :func:`temporary_name` (a write in progress or killed)."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(TEMPORARY_SUFFIX)


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """``fsync`` a folder, so that a rename in it is durable (a no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (and Windows) cannot fsync a directory
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], *, mkdir: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target``.

    For writers that want a path of their own (``write_mrc``, ``DataFrame.to_parquet``,
    ``Figure.savefig``)::

        with atomic_path(out / "mask.mrc") as tmp:
            write_mrc(tmp, mask, pixel_size_a)

    Parameters
    ----------
    target
        The file to write. Its folder is created when ``mkdir`` is true.
    mkdir
        Create the target's folder (and parents) first.

    Yields
    ------
    Path
        Where to write; it must exist as a file when the block ends.

    Raises
    ------
    FileNotFoundError
        The block ended without writing the temporary file.
    """
    target = Path(target)
    if mkdir:
        target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(target)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"{target}: nothing was written to {tmp.name}")
        _fsync_file(tmp)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        named = _naming(exc, target)
        if named is exc:
            raise
        raise named from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically (see the module's policy); returns ``target``."""
    target = Path(target)
    with atomic_path(target) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
    return target


def atomic_write_text(
    target: str | os.PathLike[str], text: str, *, encoding: str = "utf-8"
) -> Path:
    """Write ``text`` to ``target`` atomically (see the module's policy); returns ``target``."""
    return atomic_write_bytes(target, text.encode(encoding))


def atomic_write_json(target: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (``default=str`` for paths, dates) atomically; returns ``target``."""
    return atomic_write_text(target, json.dumps(obj, indent=indent, default=str))
