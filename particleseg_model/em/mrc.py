"""MRC image stacks and density maps: memory-mapped reading, RELION particle look-up, writing.

Conventions:

- A stack is an array ``[n, y, x]``: ``n`` is the section (particle) index, 0-based in the
  array and 1-based in RELION names (``"12@stack.mrcs"`` is ``stack[11]``); a single 2D image
  is a stack of one. The header's ``mapc/mapr/maps`` are ignored for stacks, as RELION does.
- A map is a float32 array ``[z, y, x]`` (re-ordered by ``mapc/mapr/maps`` when those are not
  the usual 1, 2, 3); its pixel size is the header's voxel size along x, in Angstrom.
- Relative stack paths in image names are relative to ``base_dir`` (RELION: the project
  directory), else to the current directory.
- Written files are float32 (MRC mode 2), little-endian, with the pixel size in the header and
  no time stamp in the labels, so equal data give equal bytes; they are written to a
  temporary name beside the target and renamed over it.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import mrcfile
import mrcfile.utils
import numpy as np
import numpy.typing as npt
import pandas as pd

from particleseg_model.atomic import atomic_path
from particleseg_model.em.star import split_image_name

__all__ = [
    "MrcError",
    "clear_cache",
    "open_stack",
    "read_map",
    "read_particles",
    "read_particles_table",
    "write_map",
    "write_stack",
]

_HEADER_BYTES = 1024
_CACHE_SIZE = 32  # open memory maps kept (each holds one file descriptor)
_LABEL = b"particleSeg"


class MrcError(ValueError):
    """An MRC file that cannot be read or written; the message names the file (and particle)."""


# ----------------------------------------------------------------------------------- reading


def _header(path: Path) -> np.recarray:
    """The file's header (mrcfile record array); MrcError for anything that is not MRC."""
    if not path.is_file():
        raise MrcError(f"{path}: MRC file not found")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh":
        raise MrcError(
            f"{path}: compressed MRC file; decompress it first (memory mapping needs the raw file)"
        )
    size = path.stat().st_size
    if size < _HEADER_BYTES:
        raise MrcError(
            f"{path}: truncated MRC file: {size} bytes, shorter than the "
            f"{_HEADER_BYTES}-byte header"
        )
    try:
        with warnings.catch_warnings():
            # permissive: files without the "MAP " id or machine stamp (old tools) still open
            warnings.simplefilter("ignore", RuntimeWarning)
            with mrcfile.open(path, mode="r", permissive=True, header_only=True) as mrc:
                return mrc.header.copy()  # pyright: ignore[reportOptionalMemberAccess] - opened
    except Exception as exc:  # mrcfile raises ValueError/OSError on broken headers
        raise MrcError(f"{path}: cannot read the MRC header: {exc}") from exc


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _open_cached(path: str, inode: int, mtime_ns: int, size: int) -> np.ndarray:
    """Read-only memory map of ``path`` as ``[n, y, x]``; the stat values key the cache."""
    file = Path(path)
    header = _header(file)
    try:
        dtype = mrcfile.utils.data_dtype_from_header(header)
    except ValueError as exc:
        raise MrcError(f"{file}: unsupported MRC mode {int(header.mode)}: {exc}") from exc
    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    if min(nx, ny, nz) < 1:
        raise MrcError(f"{file}: not a valid MRC file (dimensions nx, ny, nz = {nx}, {ny}, {nz})")
    offset = _HEADER_BYTES + int(header.nsymbt)
    expected = offset + nx * ny * nz * dtype.itemsize
    if size < expected:
        raise MrcError(
            f"{file}: truncated MRC file: the header says {nz} x {ny} x {nx} "
            f"{dtype.name} values, {expected} bytes in all, but the file has "
            f"{size} bytes"
        )
    data = np.memmap(file, dtype=dtype, mode="r", offset=offset, shape=(nz, ny, nx))
    return data


def open_stack(path: str | os.PathLike) -> np.ndarray:
    """Memory-mapped, read-only ``[n, y, x]`` view of an MRC stack (a 2D image gives n = 1).

    Nothing is read until the array is indexed; the dtype is the file's (byte order included).
    Open maps are cached (least recently used, keyed by the resolved path, inode, modification
    time and size), so reading many particles of one stack opens it once, and a replaced or
    rewritten file is opened afresh. Replace files (as :func:`write_stack` does) rather than
    truncating them in place while arrays of theirs are in use: reading a page that is gone
    from a memory map kills the process (SIGBUS).

    Raises:
        MrcError: missing file, not MRC, unsupported mode, compressed, or truncated (fewer
            bytes than the header's dimensions need); the message names the file.
    """
    resolved = Path(path).resolve()
    try:
        st = resolved.stat()
    except FileNotFoundError:
        raise MrcError(f"{path}: MRC file not found") from None
    try:
        return _open_cached(str(resolved), st.st_ino, st.st_mtime_ns, st.st_size)
    except MrcError as exc:
        if Path(path) == resolved:
            raise
        # name the path as given, once; a link's target after it
        reason = str(exc).removeprefix(f"{resolved}: ")
        linked = os.path.realpath(os.path.abspath(path)) != os.path.abspath(path)
        named = f"{path} (a link to {resolved})" if linked else str(path)
        raise MrcError(f"{named}: {reason}") from None


def clear_cache() -> None:
    """Forget every cached memory map (they close once no array refers to them)."""
    _open_cached.cache_clear()


def read_particles(
    image_names: Sequence[str],
    base_dir: str | os.PathLike | None = None,
    dtype: npt.DTypeLike = np.float32,
) -> np.ndarray:
    """Read RELION particles ``"N@stack"`` (N 1-based) into an ``[n, y, x]`` array, in order.

    Names are grouped by stack so each stack is opened once and read with one fancy index.
    An empty list gives an array of shape ``(0, 0, 0)``.

    Raises:
        MrcError: a malformed name, a missing or broken stack, an index beyond the stack
            (naming the image and the stack size), or stacks of different image sizes.
    """
    names = [str(n) for n in image_names]
    base = Path(base_dir) if base_dir is not None else None
    by_stack: dict[str, list[tuple[int, int, str]]] = {}  # stack -> (output row, index, name)
    for row, name in enumerate(names):
        try:
            index, stack = split_image_name(name)
        except ValueError as exc:
            raise MrcError(f"image {row + 1}: {exc}") from None
        by_stack.setdefault(stack, []).append((row, index, name))

    out: np.ndarray | None = None
    first_stack = ""
    for stack, entries in by_stack.items():
        file = Path(stack)
        if base is not None and not file.is_absolute():
            file = base / file
        data = open_stack(file)
        n = data.shape[0]
        indices = np.array([index for _, index, _ in entries], dtype=np.int64)
        beyond = indices > n
        if beyond.any():
            name = entries[int(np.flatnonzero(beyond)[0])][2]
            raise MrcError(
                f"{file}: image {name!r} is beyond the stack, which holds {n} "
                f"image{'s' if n != 1 else ''} (1-based, 1..{n})"
                + (f"; {int(beyond.sum())} names are beyond it" if beyond.sum() > 1 else "")
            )
        if out is None:
            out = np.empty((len(names), *data.shape[1:]), dtype=dtype)
            first_stack = str(file)
        elif data.shape[1:] != out.shape[1:]:
            raise MrcError(
                f"{file}: images are {data.shape[2]} x {data.shape[1]} px, but those "
                f"of {first_stack} are {out.shape[2]} x {out.shape[1]} px"
            )
        rows = np.array([row for row, _, _ in entries], dtype=np.int64)
        order = np.argsort(indices, kind="stable")  # ascending offsets read the file forwards
        try:
            out[rows[order]] = data[indices[order] - 1]
        except OSError as exc:  # the file changed under the memory map
            raise MrcError(f"{file}: cannot read images: {exc}") from exc
    if out is None:
        return np.zeros((0, 0, 0), dtype=dtype)
    return out


def read_particles_table(
    particles: pd.DataFrame,
    base_dir: str | os.PathLike | None = None,
    dtype: npt.DTypeLike = np.float32,
) -> np.ndarray:
    """:func:`read_particles` for the ``image_name`` column of a canonical particle table."""
    if "image_name" not in particles:
        raise MrcError(
            "particle table has no image_name column (expected the canonical table "
            "of particleseg_model.em.star.read_star)"
        )
    return read_particles(particles["image_name"].tolist(), base_dir=base_dir, dtype=dtype)


def _zyx(data: np.ndarray, header) -> np.ndarray:
    """Re-order ``[section, row, column]`` to ``[z, y, x]`` by the header's mapc/mapr/maps."""
    axes = (int(header.maps), int(header.mapr), int(header.mapc))  # axis (1=x, 2=y, 3=z) per dim
    if sorted(axes) != [1, 2, 3] or axes == (3, 2, 1):
        return data
    where = {axis: dim for dim, axis in enumerate(axes)}
    return np.transpose(data, (where[3], where[2], where[1]))


def read_map(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Read a density map: ``(volume[z, y, x] as float32, pixel size in Angstrom)``.

    The pixel size is the header's voxel size along x (cella.x / mx, a float32 given back as its
    shortest decimal); 0.0 means the header gives none. A 2D image comes back as a volume of
    one section.

    Raises:
        MrcError: as :func:`open_stack`.
    """
    path = Path(path)
    data = open_stack(path)
    header = _header(path)
    mx = int(header.mx)
    # the header holds float32: its shortest decimal gives back the value written (5.7, not
    # 5.69999981)
    pixel = float(str(np.float32(np.float32(header.cella.x) / np.float32(mx)))) if mx > 0 else 0.0
    try:
        volume = np.array(_zyx(data, header), dtype=np.float32)
    except OSError as exc:
        raise MrcError(f"{path}: cannot read the map: {exc}") from exc
    return volume, pixel


# ----------------------------------------------------------------------------------- writing


def _atomic_write(path: Path, data: np.ndarray, pixel_size_a: float, stack: bool) -> Path:
    if not np.isfinite(pixel_size_a) or pixel_size_a <= 0:
        raise MrcError(
            f"{path}: pixel size must be a positive number of Angstrom, got {pixel_size_a!r}"
        )
    # the folder must exist (mkdir=False): as before, a missing folder is the caller's error
    with atomic_path(path, mkdir=False) as tmp, mrcfile.new(tmp, overwrite=False) as mrc:
        mrc.set_data(data)
        header = mrc.header
        assert header is not None  # mrcfile types it Optional; a new file has one
        if stack:
            mrc.set_image_stack()
        else:
            mrc.set_volume()
            # RELION and EMDB put the origin of a map in its centre
            header.nxstart, header.nystart, header.nzstart = (
                -(n // 2) for n in (data.shape[2], data.shape[1], data.shape[0])
            )
        mrc.voxel_size = (pixel_size_a, pixel_size_a, pixel_size_a)
        header.label[:] = b""  # mrcfile's default label holds the creation time
        header.label[0] = _LABEL
        header.nlabl = 1
    return path


def write_stack(path: str | os.PathLike, images: np.ndarray, pixel_size_a: float) -> Path:
    """Write ``images`` (``[n, y, x]`` or one ``[y, x]`` image) as a float32 MRC stack.

    The header marks an image stack (space group 0) with ``pixel_size_a`` Angstrom per pixel.
    The write is atomic: a failure leaves any existing file as it was and no temporary file.
    """
    path = Path(path)
    data = np.asarray(images)
    if data.ndim == 2:
        data = data[np.newaxis]
    if data.ndim != 3 or 0 in data.shape:
        raise MrcError(f"{path}: a stack must be [n, y, x] images, got shape {data.shape}")
    return _atomic_write(path, np.ascontiguousarray(data, dtype=np.float32), pixel_size_a, True)


def write_map(path: str | os.PathLike, volume: np.ndarray, pixel_size_a: float) -> Path:
    """Write ``volume[z, y, x]`` as a float32 MRC map (space group 1, origin at the centre).

    The write is atomic: a failure leaves any existing file as it was and no temporary file.
    """
    path = Path(path)
    data = np.asarray(volume)
    if data.ndim != 3 or 0 in data.shape:
        raise MrcError(f"{path}: a map must be a [z, y, x] volume, got shape {data.shape}")
    return _atomic_write(path, np.ascontiguousarray(data, dtype=np.float32), pixel_size_a, False)
