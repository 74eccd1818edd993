"""Atomic file writes: a reader sees the old file or the new one, never half of either.

The one policy of the project, used by every site that writes a file in place of another:

1. the new content goes to a temporary name in the *same folder* as the target (the same file
   system, so the rename below is atomic), ``.<name>.<random>.tmp``: hidden, and recognisable
   by :func:`is_temporary` for clean-up;
2. the temporary file is flushed and ``fsync``-ed, so the rename never publishes a file whose
   blocks are not on disk yet;
3. ``os.replace`` puts it in place (atomic on POSIX, replaces an existing target), then the
   folder is ``fsync``-ed so that the rename itself survives a power cut;
4. on any exception the temporary file is removed and the target is untouched.

Folders (a Zarr version, a model version) follow the same idea one level up: they are built
under a temporary name and renamed (see :mod:`particleseg_model.corpus.store` and
:mod:`particleseg_model.model.registry`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
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
    "temporary_name",
]

TEMPORARY_SUFFIX = ".tmp"


def temporary_name(target: str | os.PathLike[str]) -> Path:
    """A fresh temporary path beside ``target``: ``<folder>/.<name>.<16 hex>.tmp``."""
    target = Path(target)
    return target.with_name(f".{target.name}.{secrets.token_hex(8)}{TEMPORARY_SUFFIX}")


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
