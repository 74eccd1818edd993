"""Reference maps from EMDB's file tree, as EMDB publishes them.

EMDB serves every entry under ``<files URL>/structures/EMD-<n>/`` (``PARTICLESEG_EMDB_FILES_URL``,
default ``https://ftp.ebi.ac.uk/pub/databases/emdb``; the wwPDB sites mirror the same tree)::

    map/emd_<n>.map.gz          the primary map, a gzipped CCP4/MRC file
    header/emd-<n>.xml          the header XML (resolution, pixel spacing, dimensions)
    other/emd_<n>_half_map_1.map.gz, ..._2.map.gz   half maps (when deposited)
    masks/emd_<n>_msk_1.map     masks (when deposited)

:func:`fetch_emdb_map` streams the ``.map.gz`` (bounded memory: 1 MiB of compressed input and at
most 4 MiB of output at a time), gunzips it on the fly into a temporary file beside the cached
map, checks the compressed size against ``Content-Length`` and the map's size against its MRC
header (``1024 + nsymbt + nx*ny*nz*`` bytes per value of the mode), and only then renames it to
``<cache>/EMD-<n>/emd_<n>.map`` (:mod:`particleseg_model.atomic`); a small JSON record written
after it (``emd_<n>.json``) marks the cached map complete, so each map is downloaded once. A
connection cut mid-body resumes with ``Range`` from the compressed byte reached (the gunzip
state is kept); 429 and 5xx are retried by :class:`~particleseg_model.access.http.HttpClient`.
Only a 404 means "absent" (no map: an error; no header: ``header_path`` None).

Units: resolutions and voxel sizes in Angstrom, the box in voxels, sizes in bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import warnings
import xml.etree.ElementTree as ET
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import mrcfile
import mrcfile.utils
import numpy as np
import requests
import urllib3

from particleseg_model.access.archive import RemoteFile, list_directory
from particleseg_model.access.empiar import emdb_files_url, normalize_emd_id
from particleseg_model.access.http import HttpClient, HttpError, NotFoundError
from particleseg_model.atomic import atomic_path, atomic_write_json, atomic_write_text
from particleseg_model.progress import Bar
from particleseg_model.progress import progress as progress_bar
from particleseg_model.storage import is_remote, local_path

__all__ = [
    "EmdbFileError",
    "EmdbFileUrls",
    "EmdbHeader",
    "EmdbMap",
    "cached_map",
    "emdb_file_urls",
    "emdb_number",
    "fetch_emdb_map",
    "header_url",
    "map_cache_path",
    "map_url",
    "parse_header_xml",
    "structure_url",
]

log = logging.getLogger("particleseg.emdb_files")

_MRC_HEADER_BYTES = 1024
_OUT_CHUNK = 4 << 20  # most gunzipped bytes held at once (a map of zeros expands ~1000x)
_STREAM_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, OSError)
_RECORD_VERSION = 1


class EmdbFileError(ValueError):
    """A map that cannot be fetched or used; the message names the EMDB entry and the file.

    ``status`` is the HTTP status when a reply caused it (404: no such map), else None.
    """

    def __init__(self, message: str, *, emdb_id: str, url: str = "", status: int | None = None):
        super().__init__(message)
        self.emdb_id = emdb_id
        self.url = url
        self.status = status


@dataclass(frozen=True)
class EmdbHeader:
    """What the header XML says (None where it says nothing)."""

    resolution_a: float | None
    voxel_size_a: float | None
    box: tuple[int, int, int] | None  # (col, row, sec) = (nx, ny, nz)


@dataclass(frozen=True)
class EmdbMap:
    """A map in the local cache.

    Attributes
    ----------
    emdb_id
        ``"EMD-1832"``.
    path
        The gunzipped MRC map, ``<cache>/EMD-<n>/emd_<n>.map``.
    resolution_a
        Resolution in Angstrom: the caller's (from the EMDB API) where given, else the
        header XML's; None when neither says. ``resolution_source`` is ``"api"``,
        ``"header"`` or ``""``.
    voxel_size_a
        Angstrom per voxel (the MRC header's, else the header XML's pixel spacing).
    box
        Voxels along each axis (the map is cubic).
    sha256
        Of the gunzipped map.
    bytes_downloaded
        Compressed bytes transferred by this call (0 when the map came from the cache).
    url
        The ``.map.gz`` it came from.
    gz_bytes, map_bytes
        Sizes of the ``.map.gz`` and of the map.
    header_path
        The cached header XML, None when EMDB has none (404) or it was not asked for.
    from_cache
        Whether this call found the map already cached.
    """

    emdb_id: str
    path: Path
    resolution_a: float | None
    voxel_size_a: float
    box: int
    sha256: str
    bytes_downloaded: int
    url: str
    gz_bytes: int
    map_bytes: int
    header_path: Path | None = None
    resolution_source: str = ""
    from_cache: bool = False

    def to_json(self) -> dict[str, Any]:
        """JSON-ready fields (paths as strings), for manifests and UI metadata."""
        out = asdict(self)
        out["path"] = str(self.path)
        out["header_path"] = str(self.header_path) if self.header_path else None
        return out


@dataclass(frozen=True)
class EmdbFileUrls:
    """Where an entry's files are. ``half_maps``, ``masks`` and ``other`` are filled only when
    the folders were listed (:func:`emdb_file_urls` with ``list_folders=True``)."""

    emdb_id: str
    map: str
    header: str
    half_maps: tuple[str, ...] = ()
    masks: tuple[str, ...] = ()
    other: tuple[str, ...] = ()


# -- names and URLs -----------------------------------------------------------------------------
def emdb_number(emd_id: str | int) -> str:
    """``"EMD-1832"``, ``"emd_1832"``, ``1832`` -> ``"1832"`` (the digits in EMDB's file names)."""
    return normalize_emd_id(emd_id)[4:]


def _base(base_url: str | None) -> str:
    return str(base_url or emdb_files_url()).rstrip("/")


def structure_url(emd_id: str | int, base_url: str | None = None) -> str:
    """``<files URL>/structures/EMD-<n>``."""
    return f"{_base(base_url)}/structures/{normalize_emd_id(emd_id)}"


def map_url(emd_id: str | int, base_url: str | None = None) -> str:
    """``<files URL>/structures/EMD-<n>/map/emd_<n>.map.gz``."""
    return f"{structure_url(emd_id, base_url)}/map/emd_{emdb_number(emd_id)}.map.gz"


def header_url(emd_id: str | int, base_url: str | None = None) -> str:
    """``<files URL>/structures/EMD-<n>/header/emd-<n>.xml``."""
    return f"{structure_url(emd_id, base_url)}/header/emd-{emdb_number(emd_id)}.xml"


def map_cache_path(cache_dir: str | os.PathLike, emd_id: str | int) -> Path:
    """``<cache_dir>/EMD-<n>/emd_<n>.map``: where :func:`fetch_emdb_map` keeps the map."""
    key = normalize_emd_id(emd_id)
    return Path(cache_dir) / key / f"emd_{emdb_number(key)}.map"


def _local_root(base: str) -> Path | None:
    return None if is_remote(base) else local_path(base)


def _list_folder(url: str, http: HttpClient | None) -> list[RemoteFile]:
    """A folder's files; a folder that does not exist (404, or locally missing) is empty."""
    try:
        return [f for f in list_directory(url, http) if not f.is_dir]
    except (NotFoundError, FileNotFoundError):
        return []


def emdb_file_urls(
    emd_id: str | int,
    base_url: str | None = None,
    *,
    http: HttpClient | None = None,
    list_folders: bool = True,
) -> EmdbFileUrls:
    """The URLs of an entry's map, header XML, half maps and masks.

    Parameters
    ----------
    emd_id
        ``"EMD-1832"``, ``1832``, ...
    base_url
        The root of EMDB's file tree (default ``PARTICLESEG_EMDB_FILES_URL`` or EBI's); a
        ``file://`` URL or a path lists a local mirror.
    http
        The client for the listings (retries, polite delay).
    list_folders
        List ``other/`` and ``masks/`` (two requests); False gives only the map and header
        URLs, which follow from the id.

    Returns
    -------
    EmdbFileUrls
        Half maps are the files of ``other/`` named ``*half_map*``; ``other`` holds every file
        of ``other/``. A folder that is absent (404) is empty.

    Raises
    ------
    HttpError
        A listing that failed otherwise than 404 (after the client's retries).
    """
    key = normalize_emd_id(emd_id)
    base = _base(base_url)
    root = structure_url(key, base)
    urls = EmdbFileUrls(key, map_url(key, base), header_url(key, base))
    if not list_folders:
        return urls
    local = _local_root(base)
    if local is not None:
        root = (local / "structures" / key).absolute().as_uri()
    other = _list_folder(f"{root}/other/", http)
    masks = _list_folder(f"{root}/masks/", http)
    return EmdbFileUrls(
        key,
        urls.map,
        urls.header,
        half_maps=tuple(f.url for f in other if "half_map" in f.name),
        masks=tuple(f.url for f in masks),
        other=tuple(f.url for f in other),
    )


# -- the header XML -----------------------------------------------------------------------------
def _local_name(tag: str) -> str:
    return tag.rsplit("}", 1)[-1].lower()


def _float(text: str | None) -> float | None:
    match = re.search(r"[-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?", text or "")
    if match is None:
        return None
    value = float(match.group(0))
    return value if value > 0 else None


def parse_header_xml(text: str | bytes, where: str = "header XML") -> EmdbHeader:
    """Resolution, voxel size and dimensions from an EMDB header XML.

    Reads schema v3 (``final_reconstruction/resolution``, ``map/pixel_spacing/x``,
    ``map/dimensions/col|row|sec``) and the older v1.9 names (``resolutionByAuthor``,
    ``pixelSpacing/pixelX``, ``dimensions/numColumns|numRows|numSections``).

    Raises
    ------
    ValueError
        Text that is not XML (the message names ``where``).
    """
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise ValueError(f"{where}: not XML ({exc})") from exc
    resolution = voxel = None
    box: tuple[int, int, int] | None = None
    for element in root.iter():
        name = _local_name(element.tag)
        children = {_local_name(c.tag): c for c in element}
        if resolution is None and name == "final_reconstruction":
            for child_name in ("resolution", "resolutionbyauthor"):
                if child_name in children:
                    resolution = _float(children[child_name].text)
                    break
        if resolution is None and name == "resolutionbyauthor":
            resolution = _float(element.text)
        if voxel is None and name in ("pixel_spacing", "pixelspacing"):
            for child_name in ("x", "pixelx"):
                if child_name in children:
                    voxel = _float(children[child_name].text)
                    break
        if box is None and name == "dimensions":
            for names in (("col", "row", "sec"), ("numcolumns", "numrows", "numsections")):
                values = [_float(children[n].text) if n in children else None for n in names]
                if all(values):
                    box = tuple(int(v) for v in values)  # type: ignore[assignment, arg-type]
                    break
    return EmdbHeader(resolution, voxel, box)


# -- streaming gunzip -----------------------------------------------------------------------------
class _Gunzip:
    """Gunzip a stream into ``out`` chunk by chunk, hashing what it writes; several gzip members
    in a row (as ``cat a.gz b.gz`` makes) are one stream, as ``gunzip`` reads them."""

    def __init__(self, out: IO[bytes], where: str, key: str, url: str):
        self.out, self.where, self.key, self.url = out, where, key, url
        self.restart()

    def restart(self) -> None:
        self.out.seek(0)
        self.out.truncate()
        self.decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self.sha = hashlib.sha256()
        self.written = 0
        self.started = False

    def _emit(self, data: bytes) -> None:
        if data:
            self.out.write(data)
            self.sha.update(data)
            self.written += len(data)

    def feed(self, chunk: bytes) -> None:
        data = chunk
        try:
            while data:
                if self.decompressor.eof:  # the next gzip member
                    self.decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
                self.started = True
                self._emit(self.decompressor.decompress(data, _OUT_CHUNK))
                while self.decompressor.unconsumed_tail:
                    self._emit(
                        self.decompressor.decompress(self.decompressor.unconsumed_tail, _OUT_CHUNK)
                    )
                data = self.decompressor.unused_data
        except zlib.error as exc:
            raise EmdbFileError(
                f"{self.key}: {self.where} is not valid gzip data ({exc}; from {self.url})",
                emdb_id=self.key,
                url=self.url,
            ) from exc

    def finish(self) -> None:
        try:
            self._emit(self.decompressor.flush())
        except zlib.error as exc:  # pragma: no cover - flush rarely raises
            raise EmdbFileError(
                f"{self.key}: {self.where} is not valid gzip data ({exc})",
                emdb_id=self.key,
                url=self.url,
            ) from exc
        if not self.started or not self.decompressor.eof:
            raise EmdbFileError(
                f"{self.key}: {self.where} is truncated: the gzip stream ends early "
                f"({self.written} bytes gunzipped; from {self.url})",
                emdb_id=self.key,
                url=self.url,
            )


def _bar(show: bool, **kwargs: Any) -> Bar:
    return progress_bar(**kwargs) if show else Bar(disable=True, **kwargs)


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    match = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", value or "")
    if match is None:
        return None, None
    return int(match.group(1)), (int(match.group(2)) if match.group(2) != "*" else None)


def _stream_http(
    client: HttpClient, url: str, gunzip: _Gunzip, key: str, bar: Bar, chunk_bytes: int
) -> tuple[int, int | None]:
    """GET ``url`` into ``gunzip``, resuming cuts with Range.

    Returns ``(compressed bytes received, Content-Length or None)``."""
    received = 0
    total: int | None = None
    failures = 0
    last = ""
    while True:
        if failures > client.retries:
            raise EmdbFileError(
                f"{key}: download of {url} failed: {last}; gave up after {failures} attempts",
                emdb_id=key,
                url=url,
            )
        headers = {"Accept-Encoding": "identity"}
        if received:
            headers["Range"] = f"bytes={received}-"
        try:
            response = client.request("GET", url, headers=headers, stream=True)
        except NotFoundError as exc:
            raise EmdbFileError(
                f"{key}: no map at {url}", emdb_id=key, url=url, status=404
            ) from exc
        except HttpError as exc:
            raise EmdbFileError(f"{key}: {exc}", emdb_id=key, url=url, status=exc.status) from exc
        with response:
            status = response.status_code
            if status == 206 and received:
                start, size = _content_range(response.headers.get("Content-Range"))
                if start != received:
                    raise EmdbFileError(
                        f"{key}: {url}: asked for bytes from {received}, the server sent "
                        f"from {start}",
                        emdb_id=key,
                        url=url,
                        status=status,
                    )
                if size is not None and total is not None and size != total:
                    raise EmdbFileError(
                        f"{key}: {url} changed size during the download ({total} -> {size} bytes)",
                        emdb_id=key,
                        url=url,
                        status=status,
                    )
            elif status == 200:
                if received:  # the server ignored the Range: start over from zero
                    log.warning("%s ignored the Range request; downloading from zero", url)
                    gunzip.restart()
                    received = 0
                    bar.reset(total=total)
                encoded = response.headers.get("Content-Encoding", "identity") != "identity"
                length = response.headers.get("Content-Length")
                if not encoded and length is not None and length.isdigit():
                    total = int(length)
                    bar.reset(total=total)
            else:
                raise EmdbFileError(
                    f"{key}: {url}: unexpected reply HTTP {status}",
                    emdb_id=key,
                    url=url,
                    status=status,
                )
            got = 0
            cut: BaseException | None = None
            stream = response.raw.stream(chunk_bytes, decode_content=False)
            while True:
                try:
                    chunk = next(stream, None)
                except _STREAM_ERRORS as exc:
                    cut = exc
                    break
                if chunk is None:
                    break
                gunzip.feed(chunk)
                got += len(chunk)
                bar.update(len(chunk))
            received += got
        if total is not None and received > total:
            raise EmdbFileError(
                f"{key}: {url}: received {received} bytes, Content-Length said {total}",
                emdb_id=key,
                url=url,
            )
        if cut is None and (total is None or received == total):
            return received, total
        failures = 0 if got else failures + 1
        last = (
            f"connection cut at byte {received} ({type(cut).__name__})"
            if cut is not None
            else f"body ended at byte {received} of {total}"
        )
        log.warning("%s: %s; resuming from byte %d", url, last, received)


def _stream_local(source: Path, gunzip: _Gunzip, bar: Bar, chunk_bytes: int) -> tuple[int, int]:
    total = source.stat().st_size
    bar.reset(total=total)
    received = 0
    with open(source, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            gunzip.feed(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    return received, total


# -- the MRC header check -------------------------------------------------------------------------
def _check_map(
    path: Path, key: str, where: str, url: str, header: EmdbHeader | None
) -> tuple[float, int]:
    """``(voxel size, box)`` of the gunzipped map at ``path``; EmdbFileError when its size
    disagrees with its header, it is not cubic or has no voxel size."""

    def fail(reason: str) -> EmdbFileError:
        return EmdbFileError(f"{key}: {where}: {reason} (from {url})", emdb_id=key, url=url)

    size = path.stat().st_size
    if size < _MRC_HEADER_BYTES:
        raise fail(f"{size} bytes gunzipped, shorter than the {_MRC_HEADER_BYTES}-byte MRC header")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with mrcfile.open(path, mode="r", permissive=True, header_only=True) as mrc:
                mrc_header = mrc.header.copy()  # pyright: ignore[reportOptionalMemberAccess]
        dtype = mrcfile.utils.data_dtype_from_header(mrc_header)
    except Exception as exc:  # mrcfile raises ValueError/OSError on broken headers
        raise fail(f"not an MRC map ({exc})") from exc
    nx, ny, nz = int(mrc_header.nx), int(mrc_header.ny), int(mrc_header.nz)
    if min(nx, ny, nz) < 1:
        raise fail(f"not an MRC map (dimensions {nx} x {ny} x {nz})")
    expected = _MRC_HEADER_BYTES + int(mrc_header.nsymbt) + nx * ny * nz * dtype.itemsize
    if size != expected:
        raise fail(
            f"size mismatch: the MRC header says {nx} x {ny} x {nz} {dtype.name} values "
            f"({expected} bytes with the header), the gunzipped map has {size} bytes"
        )
    if not nx == ny == nz:
        raise fail(f"the map is not cubic ({nx} x {ny} x {nz} voxels)")
    cell = [float(mrc_header.cella[a]) for a in "xyz"]
    grid = [int(mrc_header.mx), int(mrc_header.my), int(mrc_header.mz)]
    sizes = [c / m if m > 0 and c > 0 else 0.0 for c, m in zip(cell, grid, strict=True)]
    if all(s > 0 for s in sizes):
        if max(sizes) - min(sizes) > 1e-3 * max(sizes):
            raise fail(f"the voxels are not cubic ({sizes[0]:g} x {sizes[1]:g} x {sizes[2]:g} A)")
        # the header holds float32: its shortest decimal gives back the value deposited
        voxel = float(str(np.float32(sizes[0])))
    elif header is not None and header.voxel_size_a:
        log.warning(
            "%s: the MRC header gives no voxel size; using the header XML's %g A",
            where,
            header.voxel_size_a,
        )
        voxel = header.voxel_size_a
    else:
        raise fail("the map has no voxel size (cell or sampling zero in the MRC header)")
    return voxel, nx


# -- the cache ------------------------------------------------------------------------------------
def _record_path(map_path: Path) -> Path:
    return map_path.with_suffix(".json")


def cached_map(cache_dir: str | os.PathLike, emd_id: str | int) -> EmdbMap | None:
    """The cached map of ``emd_id``, or None when it is not (completely) cached.

    A map counts as cached when its record (``emd_<n>.json``, written after the map) is there
    and the map has the size the record says."""
    key = normalize_emd_id(emd_id)
    path = map_cache_path(cache_dir, key)
    try:
        record = json.loads(_record_path(path).read_text(encoding="utf-8"))
        size = path.stat().st_size
    except (FileNotFoundError, ValueError):
        return None
    if record.get("version") != _RECORD_VERSION or size != record.get("map_bytes"):
        return None
    header = path.parent / f"emd-{emdb_number(key)}.xml"
    return EmdbMap(
        emdb_id=key,
        path=path,
        resolution_a=record.get("resolution_a"),
        voxel_size_a=float(record["voxel_size_a"]),
        box=int(record["box"]),
        sha256=str(record["sha256"]),
        bytes_downloaded=0,
        url=str(record["url"]),
        gz_bytes=int(record["gz_bytes"]),
        map_bytes=size,
        header_path=header if header.is_file() else None,
        resolution_source=str(record.get("resolution_source", "")),
        from_cache=True,
    )


def _fetch_header(
    key: str, base: str, client: HttpClient | None, folder: Path
) -> tuple[EmdbHeader | None, Path | None]:
    """The header XML (cached beside the map); ``(None, None)`` when EMDB has none (404)."""
    url = header_url(key, base)
    local = _local_root(base)
    if local is not None:
        source = local / "structures" / key / "header" / f"emd-{emdb_number(key)}.xml"
        if not source.is_file():
            return None, None
        raw = source.read_bytes()
    else:
        assert client is not None
        try:
            response = client.request("GET", url, headers={"Accept": "application/xml"})
        except NotFoundError:
            return None, None
        except HttpError as exc:
            raise EmdbFileError(f"{key}: {exc}", emdb_id=key, url=url, status=exc.status) from exc
        with response:
            raw = response.content
    try:
        parsed = parse_header_xml(raw, f"{key}: {url}")
    except ValueError as exc:
        raise EmdbFileError(str(exc), emdb_id=key, url=url) from exc
    path = folder / f"emd-{emdb_number(key)}.xml"
    atomic_write_text(path, raw.decode("utf-8", errors="replace"))
    return parsed, path


def fetch_emdb_map(
    emd_id: str | int,
    cache_dir: str | os.PathLike,
    *,
    base_url: str | None = None,
    http: HttpClient | None = None,
    resolution_a: float | None = None,
    header: bool = True,
    progress: bool = True,
    chunk_bytes: int = 1 << 20,
) -> EmdbMap:
    """Download, gunzip, check and cache the primary map of an EMDB entry (once per id).

    Parameters
    ----------
    emd_id
        ``"EMD-1832"``, ``1832``, ...
    cache_dir
        The cache folder; the map goes to ``<cache_dir>/EMD-<n>/emd_<n>.map``, the header XML
        beside it, then the record ``emd_<n>.json`` that marks it complete.
    base_url
        The root of EMDB's file tree (default: ``PARTICLESEG_EMDB_FILES_URL``, else EBI's);
        a ``file://`` URL or a path reads a local mirror (``ROOT/emdb_files``).
    http
        The polite client to use (retries on 429/5xx, backoff, delay); one is made if None.
    resolution_a
        The resolution from the EMDB API (Angstrom), recorded in place of the header's.
    header
        Fetch the header XML too (a 404 means the entry has none; that is not an error).
    progress
        A byte bar over the compressed download (shown on a terminal).
    chunk_bytes
        Compressed bytes read at a time.

    Returns
    -------
    EmdbMap
        The cached map; ``bytes_downloaded`` 0 and ``from_cache`` True when it was cached.

    Raises
    ------
    EmdbFileError
        No map (404: ``"EMD-<n>: no map at <url>"``); any other failed request (URL and
        status, after the client's retries); a truncated or corrupt ``.map.gz`` (gzip error,
        fewer bytes than ``Content-Length``); a map whose size disagrees with its MRC header;
        a map that is not cubic or has no voxel size. The cache then holds no new map (the
        temporary file is removed); a map cached before is left as it was.
    """
    key = normalize_emd_id(emd_id)
    cached = cached_map(cache_dir, key)
    if cached is not None:
        if resolution_a is not None and cached.resolution_a != resolution_a:
            return _replace_resolution(cached, resolution_a)
        return cached
    base = _base(base_url)
    url = map_url(key, base)
    path = map_cache_path(cache_dir, key)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    local = _local_root(base)
    client = None if local is not None else (http or HttpClient(base))
    parsed, header_path = _fetch_header(key, base, client, folder) if header else (None, None)

    where = f"emd_{emdb_number(key)}.map.gz"
    bar = _bar(progress, total=None, desc=key, unit="B", unit_scale=True, unit_divisor=1024)
    try:
        with atomic_path(path) as tmp, open(tmp, "w+b") as out:
            gunzip = _Gunzip(out, where, key, url)
            if local is not None:
                source = local / "structures" / key / "map" / where
                if not source.is_file():
                    raise EmdbFileError(f"{key}: no map at {url}", emdb_id=key, url=url, status=404)
                received, total = _stream_local(source, gunzip, bar, chunk_bytes)
            else:
                assert client is not None
                received, total = _stream_http(client, url, gunzip, key, bar, chunk_bytes)
            gunzip.finish()
            out.flush()
            voxel, box = _check_map(Path(tmp), key, where, url, parsed)
            sha256, map_bytes = gunzip.sha.hexdigest(), gunzip.written
    finally:
        bar.close()
    if resolution_a is not None:
        resolution, source_name = resolution_a, "api"
    elif parsed is not None and parsed.resolution_a is not None:
        resolution, source_name = parsed.resolution_a, "header"
    else:
        resolution, source_name = None, ""
    result = EmdbMap(
        emdb_id=key,
        path=path,
        resolution_a=resolution,
        voxel_size_a=voxel,
        box=box,
        sha256=sha256,
        bytes_downloaded=received,
        url=url,
        gz_bytes=total if total is not None else received,
        map_bytes=map_bytes,
        header_path=header_path,
        resolution_source=source_name,
        from_cache=False,
    )
    _write_record(result)
    log.info(
        "%s: %d bytes downloaded, %d gunzipped, %d^3 at %g A/voxel into %s",
        key,
        received,
        map_bytes,
        box,
        voxel,
        path,
    )
    return result


def _write_record(result: EmdbMap) -> None:
    record = {
        "version": _RECORD_VERSION,
        "emdb_id": result.emdb_id,
        "url": result.url,
        "sha256": result.sha256,
        "gz_bytes": result.gz_bytes,
        "map_bytes": result.map_bytes,
        "voxel_size_a": result.voxel_size_a,
        "box": result.box,
        "resolution_a": result.resolution_a,
        "resolution_source": result.resolution_source,
    }
    atomic_write_json(_record_path(result.path), record)


def _replace_resolution(cached: EmdbMap, resolution_a: float) -> EmdbMap:
    updated = EmdbMap(
        **{
            **asdict(cached),
            "resolution_a": resolution_a,
            "resolution_source": "api",
        }
    )
    with contextlib.suppress(OSError):  # the record is a cache: a read-only one still serves
        _write_record(updated)
    return updated
