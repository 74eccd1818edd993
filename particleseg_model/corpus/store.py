"""The training corpus: one Zarr v3 group per EMPIAR dataset, written atomically.

Layout under the storage root (a local path, ``file://`` URL, or any fsspec URL)::

    <root>/<id>.zarr/                 Zarr v3 group; attributes: provenance (below)
        images/c.<k>.0.0              float16 (N, S, S), normalised per particle; chunk k
        labels/c.<k>.0.0              uint8 (N, S, S): 0 background, 1 signal, 2 edge
        particles.parquet             one row per particle, in array order
    <root>/<id>.zarr.tmp-<hex>/       a write in progress (removed on failure / by the next writer)
    <root>/.<id>.zarr.lock            the partition's writer lock (flock; local roots only)

On a remote root (an fsspec URL other than ``file://``) the committed version is named by a
pointer object instead (see "Remote roots" below)::

    <root>/<id>.zarr.current          JSON: {"version": "<id>.zarr.v-<ms>-<hex>", ...}
    <root>/<id>.zarr.v-<ms>-<hex>/    one version (the same group as above); <ms>: creation
                                      time, milliseconds since 1970 (UTC)

The Parquet table lives *inside* the group directory, so the arrays and the table of one
partition are one directory and one rename commits both. It has the caller's columns (the
canonical particle columns of :mod:`particleseg_model.em.star`: image name, angles, origins, CTF,
...) plus ``particle_index`` (the row in the arrays) and ``split`` (``train``/``val``/``test``).
A boolean ``negative`` column, where a partition has one, marks *negatives*: boxes cut from
micrograph regions far from every pick, labelled all background (``corpus/negatives.py``);
they share the arrays, the splits and the hash with the particles, and
:attr:`CorpusDataset.negative` / :func:`negative_mask` tell them apart (a table without the
column holds particles only).

Arrays are chunked along N only (whole particles per chunk, about 4 MiB uncompressed of images
a chunk; the labels use the same particle count per chunk, so chunk k of both arrays holds the
same particles) and compressed with zstd (Zarr v3 ``ZstdCodec``). Chunk files sit side by
side (chunk key separator ``.``): no directory per chunk, which made deleting a replaced version
slow (1.1 s for 665 directories on a loaded disk). Group attributes:
``format``, ``format_version``, ``empiar_id``, ``box``, ``pixel_size_a``, ``threshold`` and
``edge_px`` (the label rule's parameters as
:func:`particleseg_model.corpus.labels.labels_from_projection` takes them: 10 and an 11 px square by
default), ``source_star``, ``code_version``, ``created``, ``updated`` (UTC ISO 8601),
``n_particles``, ``image_dtype``, ``normalisation``, ``chunk_particles``, ``split_fractions``,
``split_hash``, ``label_codes``, ``history`` (one entry per write: time, particles added,
source), ``n_negatives`` (rows marked ``negative``, counted from the table on every commit)
and any other provenance the caller passes; ``complete`` is set on commit.

Atomic writes (local roots)
    :class:`CorpusWriter` writes into ``<id>.zarr.tmp-<hex>`` and commits by a directory rename.
    Over an existing version it swaps the two directories with one ``renameat2(RENAME_EXCHANGE)``
    (Linux; atomic: a reader sees the old or the new version, never neither) and then deletes
    the old one; where that call is missing it renames the old version aside
    (``<id>.zarr.old-<hex>``), renames the new one in and deletes the old; a run killed between
    those two renames is rolled back to the old version by the next writer, and readers fall
    back to it meanwhile. An exception inside the ``with`` block deletes the temporary
    directory; a killed process leaves it behind, and the next writer of that partition (which
    holds the partition's ``flock``, so no live writer can own a temporary directory it sees)
    deletes it. Crash safety against process death, not power loss: the Zarr chunks and the
    directory renames are not fsync'ed (the table and un-shared files go through
    :mod:`particleseg_model.atomic`).

Appending (copy-on-write by hard links, measured)
    ``mode="a"`` (:func:`append_to_corpus`) builds the temporary version by hard-linking every
    file of the current one (a new directory tree, no data copied), appends into it and commits
    as above. The old files are never modified: Zarr's ``LocalStore`` (3.1) writes every key to
    a new file and renames it over the old name, so a rewritten chunk gets a new inode; for
    other versions the files an append rewrites (the ``zarr.json`` metadata and the last,
    partial, chunk of each array) are un-shared (copied) before writing anyway, and the table
    is written to a new file. Hard links fall back to copies across devices. Measured (an
    append of 1,000 to 20,000 particles: links 0.004 s, a copy 0.24 s):
    ``docs/corpus_storage.md``. The chosen way: hard links.

Remote roots (fsspec URLs, e.g. ``s3://bucket/corpus``, ``memory://corpus``)
    Object stores have no rename (``mv`` is a copy and a delete, object by object), but a
    single-object PUT is atomic. So each write goes through ``zarr.storage.FsspecStore`` to a
    version of its own, ``<id>.zarr.v-<ms>-<hex>`` (never visible by itself), and commits by
    writing the one small pointer object ``<id>.zarr.current`` naming it; readers
    (:func:`open_corpus`, :func:`list_corpus`) follow the pointer, so they see the old version
    or the new one, complete, never a half-written or missing partition. After the pointer
    has moved the writer deletes the previous version: a reader that opened it before the
    commit and reads chunks after that deletion gets FileNotFoundError (open again to get the
    new version). An exception in the ``with`` block deletes the new version; a killed writer
    leaves it behind, unreferenced and so invisible, and the next writer of the partition
    deletes unreferenced versions older than ``stale_after_s`` (default 6 h; younger ones may
    belong to a live writer, as there is no lock on an object store: run one writer per
    partition at a time, which Dagster does for a partition's run). Appends copy the committed
    version to the new name first (a server-side copy on S3) and commit the same way. A plain
    ``<id>.zarr`` group with no pointer (a local corpus synced to a bucket) is read as the
    committed version, and replaced by a pointer-managed version on the next write. Pointer
    freshness relies on the store's read-after-write consistency (S3, GCS and Azure give it).

Splits
    :func:`assign_split` hashes ``"<empiar_id>\\0<image_name>"`` with BLAKE2b (64 bits) into
    [0, 1) and cuts at the cumulative fractions (default 0.8/0.1/0.1): a particle's split depends
    on nothing else, so appending particles or adding datasets never moves an old particle.
    IDs like ``EMPIAR-10028`` are normalised to ``10028`` first.

Stored dtype and box
    Images are stored as float16 (``dtype="float32"`` keeps full precision; the loader hands
    float32 to the model either way), labels as uint8, at the box as extracted (the
    dataset's own box, not the model's size: labels stay exact and the corpus does not
    depend on the model). This departs from DESIGN section 3 ("float32") on measurements
    (float16 halves the corpus at an error 500x below the noise; resizing on the fly costs
    nothing that shows): ``docs/corpus_storage.md``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd

from particleseg_model.atomic import atomic_path
from particleseg_model.storage import is_remote, local_path
from particleseg_model.version import code_version

__all__ = [
    "DEFAULT_FRACTIONS",
    "FORMAT",
    "LABEL_CODES",
    "SPLITS",
    "CorpusDataset",
    "CorpusWriter",
    "append_to_corpus",
    "NEGATIVE_COLUMN",
    "assign_split",
    "assign_splits",
    "chunk_particles_for",
    "list_corpus",
    "negative_mask",
    "normalise_id",
    "open_corpus",
    "write_corpus",
]

FORMAT = "particleseg-corpus"
FORMAT_VERSION = 1
SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)
LABEL_CODES = {0: "background", 1: "signal", 2: "edge"}
TABLE_NAME = "particles.parquet"
NEGATIVE_COLUMN = "negative"
"""The table's column marking negatives (True), boxes without a particle, labelled all
background; missing or empty means a particle."""
POINTER_SUFFIX = ".current"  # <id>.zarr.current: the commit pointer of a remote root
STALE_AFTER_S = 6 * 3600.0  # an unreferenced remote version this old belongs to no live writer
SPLIT_HASH = "blake2b-64(empiar_id + NUL + image_name) / 2**64, cut at cumulative fractions"
NORMALISATION = "per particle: mean 0, std 1 over the whole box"
CHUNK_TARGET_BYTES = 4 << 20  # uncompressed image bytes per chunk (1-8 MiB asked)
_DTYPES = ("float16", "float32")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_EMPIAR = re.compile(r"(?i)empiar[-_]?(\d+)")


# ------------------------------------------------------------------------------ ids and splits


def normalise_id(empiar_id: str | int) -> str:
    """The partition key of a dataset: ``"EMPIAR-10028"``, ``10028`` -> ``"10028"``; other
    names (simulated sets such as ``"sim-globular"``) are kept as they are."""
    text = str(empiar_id).strip()
    match = _EMPIAR.fullmatch(text)
    if match:
        text = match.group(1)
    if not _ID.fullmatch(text) or text.endswith(".zarr") or ".zarr." in text:
        raise ValueError(f"bad dataset id {empiar_id!r}: use letters, digits, '.', '_', '-'")
    return text


def negative_mask(table: pd.DataFrame) -> np.ndarray:
    """Boolean mask over the table's rows: True for negatives (:data:`NEGATIVE_COLUMN`), False
    for particles (also where the column is missing or empty: tables written before negatives,
    or rows appended without the column)."""
    if NEGATIVE_COLUMN not in table.columns:
        return np.zeros(len(table), dtype=bool)
    column = table[NEGATIVE_COLUMN]
    return column.where(column.notna(), False).to_numpy(dtype=bool)


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if (
        len(values) != 3
        or any(not (0.0 <= f <= 1.0) for f in values)
        or abs(sum(values) - 1.0) > 1e-9
    ):
        raise ValueError(
            f"split fractions {fractions!r} must be three numbers in [0, 1] "
            "(train, val, test) summing to 1"
        )
    return values  # type: ignore[return-value]


def _unit_hash(empiar_id: str, image_name: str) -> float:
    digest = hashlib.blake2b(f"{empiar_id}\0{image_name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def assign_split(
    empiar_id: str | int, image_name: str, fractions: Sequence[float] = DEFAULT_FRACTIONS
) -> str:
    """``"train"``, ``"val"`` or ``"test"`` for one particle, from a stable hash of the dataset
    id and the image name only (never Python's salted ``hash()``)."""
    train, val, _ = _check_fractions(fractions)
    u = _unit_hash(normalise_id(empiar_id), str(image_name))
    return "train" if u < train else ("val" if u < train + val else "test")


def assign_splits(
    empiar_id: str | int, image_names: Iterable[str], fractions: Sequence[float] = DEFAULT_FRACTIONS
) -> np.ndarray:
    """:func:`assign_split` for many particles: an object array of split names."""
    train, val, _ = _check_fractions(fractions)
    key = normalise_id(empiar_id)
    u = np.fromiter((_unit_hash(key, str(name)) for name in image_names), dtype=np.float64)
    out = np.full(len(u), "test", dtype=object)
    out[u < train + val] = "val"
    out[u < train] = "train"
    return out


def chunk_particles_for(
    box: int, dtype: str = "float16", target_bytes: int = CHUNK_TARGET_BYTES
) -> int:
    """Particles per chunk so that a chunk of images holds about ``target_bytes``
    (uncompressed): 128 at box 128 float16, 32 at box 256."""
    per = box * box * np.dtype(dtype).itemsize
    return max(1, int(round(target_bytes / per)))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------ storage places


class _Place:
    """Where partitions live: a local directory or an fsspec URL."""

    def __init__(self, root: str | os.PathLike[str], storage_options: Mapping[str, Any] | None):
        self.storage_options = dict(storage_options or {})
        text = os.fspath(root)
        self.local: Path | None = None
        self.fs: Any = None
        if is_remote(text):
            import fsspec

            self.fs, path = fsspec.core.url_to_fs(text, **self.storage_options)
            self.url = text.rstrip("/")
            self.path = path.rstrip("/")
        else:
            self.local = local_path(text)
        self.root = str(self.local) if self.local is not None else self.url

    # names
    def name(self, key: str, suffix: str = "") -> str:
        return f"{key}.zarr{suffix}"

    def where(self, name: str) -> str:
        """Local path or URL of an entry of the root."""
        if self.local is not None:
            return str(self.local / name)
        return f"{self.url}/{name}"

    def fs_path(self, name: str) -> str:
        return f"{self.path}/{name}"

    def store(self, name: str, read_only: bool) -> Any:
        from zarr.storage import FsspecStore, LocalStore

        if self.local is not None:
            return LocalStore(self.local / name, read_only=read_only)
        return FsspecStore.from_url(
            self.where(name), storage_options=self.storage_options or None, read_only=read_only
        )

    # listing and file operations
    def entries(self) -> list[str]:
        if self.local is not None:
            if not self.local.is_dir():
                return []
            return sorted(p.name for p in self.local.iterdir())
        # a listing cache (s3fs keeps one) would hide what other processes wrote
        self.fs.invalidate_cache(self.path)
        if not self.fs.exists(self.path):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False))

    def exists(self, name: str) -> bool:
        if self.local is not None:
            return (self.local / name).exists()
        return bool(self.fs.exists(self.fs_path(name)))

    def remove(self, name: str) -> None:
        if self.local is not None:
            shutil.rmtree(self.local / name, ignore_errors=True)
        elif self.fs.exists(self.fs_path(name)):
            self.fs.rm(self.fs_path(name), recursive=True)

    def write_table(self, name: str, table: pd.DataFrame) -> None:
        if self.local is not None:
            # a new file renamed in: never writes into a hard-linked one
            with atomic_path(self.local / name / TABLE_NAME, mkdir=False) as part:
                table.to_parquet(part, index=False)
        else:
            with self.fs.open(f"{self.fs_path(name)}/{TABLE_NAME}", "wb") as handle:
                table.to_parquet(handle, index=False)

    def stored_bytes(self, name: str) -> int:
        """Bytes of every file of an entry (a version directory)."""
        if self.local is not None:
            return sum(p.stat().st_size for p in (self.local / name).rglob("*") if p.is_file())
        return int(self.fs.du(self.fs_path(name), total=True))

    def read_table(self, name: str) -> pd.DataFrame:
        if self.local is not None:
            return pd.read_parquet(self.local / name / TABLE_NAME)
        with self.fs.open(f"{self.fs_path(name)}/{TABLE_NAME}", "rb") as handle:
            return pd.read_parquet(handle)

    # the commit pointer of remote roots
    def read_pointer(self, key: str) -> str | None:
        """The version ``<id>.zarr.current`` names (remote roots), None without a pointer."""
        try:
            data = self.fs.cat_file(self.fs_path(self.name(key, POINTER_SUFFIX)))
        except FileNotFoundError:
            return None
        version = json.loads(data)["version"]
        if not (
            isinstance(version, str)
            and version.startswith(self.name(key, ".v-"))
            and "/" not in version
        ):
            raise ValueError(
                f"{key}: {self.where(self.name(key, POINTER_SUFFIX))} names "
                f"{version!r}, not a version of this partition"
            )
        return version

    def write_pointer(self, key: str, version: str, n_particles: int) -> None:
        """Commit ``version`` (remote roots): one small object, written by a single PUT."""
        body = {
            "format": FORMAT,
            "version": version,
            "n_particles": int(n_particles),
            "committed": _now(),
        }
        self.fs.pipe_file(self.fs_path(self.name(key, POINTER_SUFFIX)), json.dumps(body).encode())

    def remove_pointer(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.fs_path(self.name(key, POINTER_SUFFIX)))


def _resolve(place: _Place, key: str) -> str | None:
    """The committed version of a partition: ``<id>.zarr``, or (after a run killed between the
    two renames of a non-atomic swap) the old version set aside; on a remote root, the version
    the pointer names (else a plain ``<id>.zarr`` group)."""
    live = place.name(key)
    if place.local is None:
        version = place.read_pointer(key)
        if version is not None:
            return version
        return live if place.exists(f"{live}/zarr.json") else None
    if place.exists(live):
        return live
    olds = [e for e in place.entries() if e.startswith(live + ".old-")]
    return olds[0] if olds else None


# ------------------------------------------------------------------------------ reading


@dataclass
class CorpusDataset:
    """One committed partition: lazy Zarr arrays, attributes, and the particle table."""

    empiar_id: str
    location: str
    images: Any  # zarr.Array (N, S, S), float16 or float32
    labels: Any  # zarr.Array (N, S, S), uint8
    attrs: dict[str, Any]
    _place: _Place = field(repr=False)
    _name: str = field(repr=False)

    @property
    def n_particles(self) -> int:
        return int(self.images.shape[0])

    @property
    def box(self) -> int:
        return int(self.images.shape[-1])

    @property
    def chunk_particles(self) -> int:
        return int(self.images.chunks[0])

    @property
    def n_chunks(self) -> int:
        return -(-self.n_particles // self.chunk_particles)

    def stored_bytes(self) -> int:
        """Bytes the partition takes in the store (compressed arrays, table, metadata)."""
        return self._place.stored_bytes(self._name)

    @cached_property
    def table(self) -> pd.DataFrame:
        """The per-particle table (read on first use)."""
        return self._place.read_table(self._name)

    @cached_property
    def negative(self) -> np.ndarray:
        """Boolean mask over the rows: True for negatives (:func:`negative_mask`)."""
        return negative_mask(self.table)

    @property
    def n_negatives(self) -> int:
        return int(self.negative.sum())

    def split_indices(self, split: str | None) -> np.ndarray:
        """Array rows of the particles in ``split`` (all of them for None), ascending."""
        if split is None:
            return np.arange(self.n_particles)
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
        return np.flatnonzero(self.table["split"].to_numpy() == split)

    def read_chunk(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Chunk ``k`` of both arrays (whole chunks are what Zarr decodes anyway)."""
        c = self.chunk_particles
        stop = min((k + 1) * c, self.n_particles)
        return self.images[k * c : stop], self.labels[k * c : stop]


def open_corpus(
    root: str | os.PathLike[str],
    empiar_id: str | int,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> CorpusDataset:
    """Open the committed version of a partition (read only)."""
    import zarr

    place = _Place(root, storage_options)
    key = normalise_id(empiar_id)
    for attempt in range(3):
        name = _resolve(place, key)
        if name is None:
            raise FileNotFoundError(f"{key}: no corpus partition under {place.root}")
        try:
            group = zarr.open_group(place.store(name, read_only=True), mode="r")
            break
        except FileNotFoundError:
            # remote: a commit moved the pointer and deleted this version meanwhile
            if place.local is not None or attempt == 2:
                raise
    attrs = dict(group.attrs)
    if attrs.get("format") != FORMAT or not attrs.get("complete"):
        raise ValueError(f"{key}: {place.where(name)} is not a complete {FORMAT} group")
    return CorpusDataset(
        key, place.where(name), group["images"], group["labels"], attrs, place, name
    )


def list_corpus(
    root: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> list[str]:
    """The ids of the committed partitions under ``root``, sorted (temporary versions left by
    a killed writer are not listed)."""
    place = _Place(root, storage_options)
    keys = set()
    for entry in place.entries():
        match = re.fullmatch(r"(.+)\.zarr(?:\.old-[0-9a-f]+|\.current)?", entry)
        if match and _ID.fullmatch(match.group(1)):
            keys.add(match.group(1))
    return sorted(k for k in keys if _resolve(place, k) is not None)


def remove_corpus(
    root: str | os.PathLike[str],
    empiar_id: str | int,
    *,
    storage_options: Mapping[str, Any] | None = None,
    lock_timeout_s: float = 60.0,
) -> bool:
    """Delete a partition (its committed version and anything a killed writer left), under
    the partition's writer lock; the other partitions are not touched. False when there was
    nothing to delete."""
    place = _Place(root, storage_options)
    key = normalise_id(empiar_id)
    live = place.name(key)
    lock = (
        _Lock(place.local / f".{key}.zarr.lock", key, lock_timeout_s)
        if place.local is not None
        else None
    )
    if lock is not None:
        lock.acquire()
    try:
        if place.local is None:
            place.remove_pointer(key)  # un-commit first: readers see no partition, not half
        doomed = [
            e
            for e in place.entries()
            if e == live
            or e.startswith(live + ".old-")
            or e.startswith(live + ".tmp-")
            or e.startswith(live + ".v-")
            or e == live + POINTER_SUFFIX
        ]
        for entry in doomed:
            place.remove(entry)
        # the lock file stays: a writer waiting on it must keep locking the same inode
        return bool(doomed)
    finally:
        if lock is not None:
            lock.release()


# ------------------------------------------------------------------------------ local commit


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    call or the file system does not support it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, f"exchanging {a} and {b}: {os.strerror(code)}")


def _swap_in(tmp: Path, live: Path) -> None:
    # a folder swap: a version is a directory, so atomic.atomic_path (one file) does not apply
    if not live.exists():
        os.rename(tmp, live)
        return
    if _exchange(tmp, live):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old version
        return
    old = live.with_name(f"{live.name}.old-{uuid.uuid4().hex}")
    os.rename(live, old)
    os.rename(tmp, live)
    shutil.rmtree(old, ignore_errors=True)


def _version_age_s(name: str) -> float | None:
    """Seconds since a remote version ``<id>.zarr.v-<ms>-<hex>`` was started (its name)."""
    match = re.search(r"\.v-(\d+)-[0-9a-f]+$", name)
    return time.time() - int(match.group(1)) / 1000 if match else None


def _recover_remote(place: _Place, key: str, stale_after_s: float) -> None:
    """Delete the unreferenced versions of a remote partition older than ``stale_after_s``
    (killed writers' and superseded ones whose deletion failed); younger ones may be a live
    writer's. Temporary folders of the older remote layout (``.tmp-``) go too."""
    live = place.name(key)
    committed = _resolve(place, key)
    for entry in place.entries():
        if entry == committed:
            continue
        age = _version_age_s(entry) if entry.startswith(live + ".v-") else None
        if (
            (age is not None and age >= stale_after_s)
            or entry.startswith(live + ".tmp-")
            or entry == live
        ):  # a plain group the pointer superseded
            place.remove(entry)


def _recover(place: _Place, key: str) -> None:
    """Under the partition lock: roll back a swap killed between its renames, and delete the
    temporary and old versions that killed writers left behind."""
    live = place.name(key)
    entries = place.entries()
    olds = [e for e in entries if e.startswith(live + ".old-")]
    if olds and not place.exists(live) and place.local is not None:
        os.rename(place.local / olds[0], place.local / live)
        olds = olds[1:]
    for entry in entries:
        if entry.startswith(live + ".tmp-") or entry in olds:
            place.remove(entry)


def _hardlink_tree(src: Path, dst: Path) -> None:
    """A copy of ``src`` at ``dst`` sharing the files' data (hard links; copies across
    devices or where links are refused)."""

    def link(source: str, target: str) -> None:
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)

    shutil.copytree(src, dst, copy_function=link)


def _unshare(path: Path) -> None:
    """Give a hard-linked file its own copy, so writing it cannot touch the old version."""
    if path.exists() and path.stat().st_nlink > 1:
        with atomic_path(path, mkdir=False) as part:
            shutil.copy2(path, part)


class _Lock:
    """An exclusive ``flock`` on ``<root>/.<id>.zarr.lock``, released on close or death."""

    def __init__(self, path: Path, key: str, timeout_s: float):
        self.path, self.key, self.timeout_s = path, key, timeout_s
        self.handle: Any = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "a+b")  # noqa: SIM115 - held until release
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self.release()
                    raise TimeoutError(f"{self.key}: another writer holds {self.path}") from None
                time.sleep(0.05)

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing drops the flock
            self.handle = None


# ------------------------------------------------------------------------------ writing


def _as_table(rows: Any, n: int, key: str) -> pd.DataFrame:
    table = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    if len(table) != n:
        raise ValueError(f"{key}: {len(table)} table rows for {n} particle images")
    if "image_name" not in table.columns:
        raise ValueError(f"{key}: the particle table needs an 'image_name' column")
    names = table["image_name"]
    if names.isna().any():
        raise ValueError(f"{key}: empty image_name in the particle table")
    table["image_name"] = names.astype(str)
    # the corpus assigns these (a table copied from another corpus brings its own)
    table = table.drop(columns=["particle_index", "split"], errors="ignore")
    return table.reset_index(drop=True)


class CorpusWriter:
    """Stream one partition into the corpus; commits atomically on a clean exit.

    ``mode="w"`` writes a new version (replacing the old one on commit); ``mode="a"`` appends
    to the committed version (creating it when there is none): old particles, their chunks and
    their splits are untouched. ``attrs`` carries provenance: ``pixel_size_a`` (required),
    ``threshold``, ``edge_px``, ``source_star`` and anything else JSON-serialisable.

    >>> with CorpusWriter(root, "10028", 128, attrs={"pixel_size_a": 1.34}) as w:
    ...     for images, labels, rows in batches:
    ...         w.append(images, labels, rows)

    At most one chunk of particles (plus the batch being added) is held in memory: whole chunks
    are written as soon as they are complete. The table rows are kept until the commit (a few
    hundred bytes a particle).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        empiar_id: str | int,
        box: int,
        *,
        attrs: Mapping[str, Any] | None = None,
        dtype: str | None = None,
        mode: str = "w",
        fractions: Sequence[float] = DEFAULT_FRACTIONS,
        normalise: bool = True,
        chunk_particles: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
        lock_timeout_s: float = 600.0,
        stale_after_s: float = STALE_AFTER_S,
    ):
        self.key = normalise_id(empiar_id)
        if mode not in ("w", "a"):
            raise ValueError(f"{self.key}: mode must be 'w' or 'a', got {mode!r}")
        if dtype is not None and str(np.dtype(dtype)) not in _DTYPES:
            raise ValueError(f"{self.key}: image dtype must be one of {_DTYPES}, got {dtype!r}")
        if int(box) != box or box < 2:
            raise ValueError(f"{self.key}: bad box {box!r}")
        self.place = _Place(root, storage_options)
        self.box, self.mode, self.normalise = int(box), mode, normalise
        self.fractions = _check_fractions(fractions)
        self.dtype = str(np.dtype(dtype)) if dtype is not None else None
        self.chunk = chunk_particles
        self.user_attrs = dict(attrs or {})
        self.stale_after_s = float(stale_after_s)  # remote roots: see _recover_remote
        self._lock = (
            _Lock(self.place.local / f".{self.key}.zarr.lock", self.key, lock_timeout_s)
            if self.place.local is not None
            else None
        )
        self._tmp: str | None = None
        self._open = False
        self._tables: list[pd.DataFrame] = []
        self._names: set[str] = set()
        self._buf: list[tuple[np.ndarray, np.ndarray]] = []
        self._buffered = 0
        self.n_existing = 0
        self.n_written = 0  # particles in the arrays of the temporary version
        self.n_added = 0  # particles accepted by append (written or buffered)
        self.source_note = self.user_attrs.get("source_star")

    # -- context manager ----------------------------------------------------------------------
    def __enter__(self) -> CorpusWriter:
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False

    @property
    def n_particles(self) -> int:
        """Particles in the partition once committed (old ones plus those appended so far)."""
        return self.n_existing + self.n_added

    def __contains__(self, image_name: object) -> bool:
        """Whether a particle of that image name is in the partition (committed or appended
        in this write): with ``mode="a"``, skip these (appending one again is an error)."""
        return str(image_name) in self._names

    @property
    def temp_location(self) -> str | None:
        return self.place.where(self._tmp) if self._tmp else None

    @property
    def _chunk_size(self) -> int:
        """Particles per chunk (``chunk_particles``, or chosen by :meth:`open`)."""
        assert self.chunk is not None, f"{self.key}: the writer is not open"
        return self.chunk

    @property
    def _version(self) -> str:
        """The name of the version being written (set by :meth:`open`, cleared on commit)."""
        assert self._tmp is not None, f"{self.key}: the writer is not open"
        return self._tmp

    def open(self) -> None:
        import zarr

        if self._open:
            raise RuntimeError(f"{self.key}: writer already open")
        if self._lock is not None:
            self._lock.acquire()
        try:
            if self.place.local is not None:
                _recover(self.place, self.key)
                self._tmp = self.place.name(self.key, f".tmp-{uuid.uuid4().hex}")
            else:
                _recover_remote(self.place, self.key, self.stale_after_s)
                stamp = int(time.time() * 1000)
                self._tmp = self.place.name(self.key, f".v-{stamp:013d}-{uuid.uuid4().hex[:12]}")
            current = _resolve(self.place, self.key) if self.mode == "a" else None
            if current is not None:
                self._start_append(current)
            else:
                self._start_new(zarr)
            self._open = True
        except BaseException:
            self._cleanup()
            raise

    def _start_new(self, zarr: Any) -> None:
        from zarr.codecs import ZstdCodec

        if "pixel_size_a" not in self.user_attrs:
            raise ValueError(f"{self.key}: attrs need 'pixel_size_a' (Angstrom per pixel)")
        pixel = float(self.user_attrs["pixel_size_a"])
        if not pixel > 0:
            raise ValueError(f"{self.key}: pixel_size_a must be positive, got {pixel}")
        dtype = self.dtype or "float16"
        chunk = int(self.chunk or chunk_particles_for(self.box, dtype))
        if chunk < 1:
            raise ValueError(f"{self.key}: chunk_particles must be positive")
        if self.place.local is not None:
            self.place.local.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(self.place.store(self._version, read_only=False), mode="w")
        shape, chunks = (0, self.box, self.box), (chunk, self.box, self.box)
        # chunk files c.<k>.0.0 side by side: no directory per chunk (directories are what
        # made deleting an old version slow: 1.1 s for 665 of them, under load)
        flat = {"name": "default", "separator": "."}
        self._images = group.create_array(
            "images",
            shape=shape,
            chunks=chunks,
            dtype=dtype,
            compressors=ZstdCodec(level=1),
            fill_value=0,
            chunk_key_encoding=flat,
            dimension_names=("particle", "y", "x"),
        )
        self._labels = group.create_array(
            "labels",
            shape=shape,
            chunks=chunks,
            dtype="uint8",
            compressors=ZstdCodec(level=3),
            fill_value=0,
            chunk_key_encoding=flat,
            dimension_names=("particle", "y", "x"),
        )
        now = _now()
        attrs = {
            "threshold": None,
            "edge_px": None,
            "source_star": None,
            **self.user_attrs,
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "empiar_id": self.key,
            "box": self.box,
            "pixel_size_a": pixel,
            "image_dtype": dtype,
            "normalisation": NORMALISATION if self.normalise else "as given",
            "chunk_particles": chunk,
            "split_fractions": list(self.fractions),
            "split_hash": SPLIT_HASH,
            "label_codes": {str(k): v for k, v in LABEL_CODES.items()},
            "code_version": code_version(),
            "created": now,
            "updated": now,
            "n_particles": 0,
            "history": [],
            "complete": False,
        }
        group.attrs.update(_jsonable(attrs, self.key))
        self._group, self._attrs = group, attrs
        self._existing_table: pd.DataFrame | None = None
        self.dtype, self.chunk = dtype, chunk

    def _start_append(self, current: str) -> None:
        import zarr

        if self.place.local is not None:
            src, dst = self.place.local / current, self.place.local / self._version
            _hardlink_tree(src, dst)
            for path in dst.rglob("zarr.json"):
                _unshare(path)
        else:
            fs = self.place.fs
            fs.copy(self.place.fs_path(current), self.place.fs_path(self._version), recursive=True)
        group = zarr.open_group(self.place.store(self._version, read_only=False), mode="r+")
        attrs: dict[str, Any] = dict(group.attrs)
        where = self.place.where(current)
        if attrs.get("format") != FORMAT or not attrs.get("complete"):
            raise ValueError(f"{self.key}: {where} is not a complete {FORMAT} group")
        if int(attrs["box"]) != self.box:
            raise ValueError(
                f"{self.key}: box mismatch: appending box {self.box} particles to "
                f"a partition of box {attrs['box']} ({where})"
            )
        if self.dtype is not None and self.dtype != attrs["image_dtype"]:
            raise ValueError(
                f"{self.key}: image dtype {self.dtype} differs from the stored "
                f"{attrs['image_dtype']} ({where})"
            )
        if tuple(attrs["split_fractions"]) != self.fractions:
            raise ValueError(
                f"{self.key}: split fractions {self.fractions} differ from the "
                f"stored {tuple(attrs['split_fractions'])}: old particles would "
                "move between splits"
            )
        stored_norm = attrs.get("normalisation") == NORMALISATION
        if stored_norm != self.normalise:
            raise ValueError(
                f"{self.key}: normalise={self.normalise} differs from the stored "
                f"normalisation {attrs.get('normalisation')!r}"
            )
        pixel = self.user_attrs.get("pixel_size_a")
        if pixel is not None and not np.isclose(float(pixel), float(attrs["pixel_size_a"])):
            raise ValueError(
                f"{self.key}: pixel size {pixel} differs from the stored {attrs['pixel_size_a']} A"
            )
        for name in ("threshold", "edge_px"):
            value = self.user_attrs.get(name)
            if value is not None and attrs.get(name) is not None and value != attrs[name]:
                raise ValueError(
                    f"{self.key}: {name} {value} differs from the stored "
                    f"{attrs[name]}: labels would not be comparable"
                )
        self._group, self._attrs = group, attrs
        # zarr types group[...] as Array | Group; these two are the arrays create_array made
        self._images = cast("zarr.Array", group["images"])
        self._labels = cast("zarr.Array", group["labels"])
        self.dtype, self.chunk = attrs["image_dtype"], int(self._images.chunks[0])
        self.n_existing = self.n_written = int(self._images.shape[0])
        if self.place.local is not None:
            self._unshare_tail()
        self._existing_table = self.place.read_table(self._version)
        self._names = set(self._existing_table["image_name"].astype(str))

    def _unshare_tail(self) -> None:
        """Un-share the last, partial, chunk file of each array: the append rewrites it."""
        c, local = self._chunk_size, self.place.local
        assert local is not None  # called for local roots only
        if self.n_written % c == 0:
            return
        k = self.n_written // c
        for array in ("images", "labels"):
            # Zarr v3 array metadata (this format writes no v2 arrays)
            encoding = self._group[array].metadata.chunk_key_encoding  # pyright: ignore[reportAttributeAccessIssue]
            key = encoding.encode_chunk_key((k, 0, 0))
            _unshare(local / self._version / array / key)

    # -- appending ----------------------------------------------------------------------------
    def append(self, images: np.ndarray, labels: np.ndarray, table_rows: Any) -> None:
        """Add a batch: ``images`` (b, S, S) real, ``labels`` (b, S, S) with codes 0/1/2,
        ``table_rows`` (DataFrame, dict of columns or list of dicts; b rows with
        ``image_name``)."""
        if not self._open:
            raise RuntimeError(f"{self.key}: writer is not open (use it as a context manager)")
        images = np.asarray(images)
        labels = np.asarray(labels)
        key, box = self.key, self.box
        if images.ndim != 3 or images.shape[1:] != (box, box):
            raise ValueError(
                f"{key}: images must be (n, {box}, {box}) for box {box}, got {images.shape}"
            )
        if labels.shape != images.shape:
            raise ValueError(
                f"{key}: labels shape {labels.shape} differs from images shape {images.shape}"
            )
        if not (
            np.issubdtype(images.dtype, np.floating) or np.issubdtype(images.dtype, np.integer)
        ):
            raise ValueError(f"{key}: images must be real numbers, got {images.dtype}")
        if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
            raise ValueError(f"{key}: labels must be integer codes, got {labels.dtype}")
        n = images.shape[0]
        if labels.size:
            codes = np.unique(labels)
            bad = codes[(codes < 0) | (codes > 2)]
            if bad.size:
                raise ValueError(
                    f"{key}: labels contain codes {bad.tolist()[:10]} outside "
                    "{0, 1, 2} (0 background, 1 signal, 2 edge)"
                )
        table = _as_table(table_rows, n, key)
        names = table["image_name"].tolist()
        seen = set()
        dup = [x for x in names if x in self._names or x in seen or seen.add(x)]
        if dup:
            raise ValueError(f"{key}: image names already in the partition: {dup[:5]}")
        data = self._prepare_images(images)
        start = self.n_existing + self.n_added
        table.insert(0, "particle_index", np.arange(start, start + n, dtype=np.int64))
        table["split"] = assign_splits(key, names, self.fractions)
        self._names.update(names)
        self._tables.append(table)
        self._buf.append((data, labels.astype(np.uint8, copy=False)))
        self._buffered += n
        self.n_added += n
        self._flush(final=False)

    def _prepare_images(self, images: np.ndarray) -> np.ndarray:
        data = images.astype(np.float32, copy=False)
        if not np.isfinite(data).all():
            bad = np.flatnonzero(~np.isfinite(data).all(axis=(1, 2)))
            raise ValueError(
                f"{self.key}: non-finite pixels in images {bad[:5].tolist()} of the batch"
            )
        if self.normalise:
            mean = data.mean(axis=(1, 2), keepdims=True, dtype=np.float64)
            std = data.std(axis=(1, 2), keepdims=True, dtype=np.float64)
            data = ((data - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)
        out = data.astype(self.dtype)
        if not np.isfinite(out).all():
            raise ValueError(
                f"{self.key}: image values overflow {self.dtype} (normalise them or store float32)"
            )
        return out

    def _flush(self, final: bool) -> None:
        """Write every complete chunk that is buffered (and the rest when ``final``)."""
        if not self._buffered:
            return
        c = self._chunk_size
        need = (self.n_written // c + 1) * c - self.n_written  # to the next chunk boundary
        if self._buffered < need and not final:
            return
        images = (
            np.concatenate([b[0] for b in self._buf]) if len(self._buf) > 1 else self._buf[0][0]
        )
        labels = (
            np.concatenate([b[1] for b in self._buf]) if len(self._buf) > 1 else self._buf[0][1]
        )
        total = len(images)
        take = total if final else need + (total - need) // c * c
        start, stop = self.n_written, self.n_written + take
        shape = (stop, self.box, self.box)
        self._images.resize(shape)
        self._labels.resize(shape)
        self._images[start:stop] = images[:take]
        self._labels[start:stop] = labels[:take]
        self.n_written = stop
        rest = total - take
        self._buf = [(images[take:], labels[take:])] if rest else []
        self._buffered = rest

    # -- commit / abort -----------------------------------------------------------------------
    def commit(self) -> CorpusDataset | None:
        """Write what is buffered, the table and the attributes; swap the new version in
        (remote roots: write the pointer to it). Returns the committed dataset (None for an
        append that added nothing)."""
        if not self._open:
            raise RuntimeError(f"{self.key}: writer is not open")
        try:
            if self.n_added == 0:
                if self.n_existing == 0:
                    raise ValueError(f"{self.key}: no particles were written")
                self._cleanup()  # an empty append: the committed version stays as it is
                return None
            self._flush(final=True)
            parts = (
                [self._existing_table] if self._existing_table is not None else []
            ) + self._tables
            table = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
            total = self.n_existing + self.n_added
            if (self.n_written, len(table), int(self._labels.shape[0])) != (total,) * 3:
                raise RuntimeError(f"{self.key}: internal count mismatch before commit")
            self.place.write_table(self._version, table)
            now = _now()
            history = list(self._attrs.get("history", [])) + [
                {
                    "time": now,
                    "mode": self.mode,
                    "n_added": self.n_added,
                    "source_star": self.source_note,
                    "code_version": code_version(),
                }
            ]
            extra = {
                k: v
                for k, v in self.user_attrs.items()
                if k not in self._attrs or self._attrs[k] is None
            }
            update = {
                **extra,
                "n_particles": total,
                "n_negatives": int(negative_mask(table).sum()),
                "updated": now,
                "history": history,
                "complete": True,
            }
            self._group.attrs.update(_jsonable(update, self.key))
            self._swap(total)
            self._open = False
        except BaseException:
            self._cleanup()
            raise
        self._cleanup()
        return open_corpus(self.place.root, self.key, storage_options=self.place.storage_options)

    def _swap(self, n_particles: int) -> None:
        live = self.place.name(self.key)
        if self.place.local is not None:
            _swap_in(self.place.local / self._version, self.place.local / live)
            self._tmp = None
            return
        # remote: the pointer write is the commit; the version is complete before it
        previous = _resolve(self.place, self.key)
        try:
            self.place.write_pointer(self.key, self._version, n_particles)
        except Exception:
            # an error after the PUT took effect (a lost reply): committed all the same, and
            # the version must stay
            if self.place.read_pointer(self.key) != self._tmp:
                raise
        self._tmp = None
        if previous is not None:
            # unreferenced now; a failed delete is retried by a later writer (stale_after_s)
            with contextlib.suppress(Exception):
                self.place.remove(previous)

    def abort(self) -> None:
        """Discard the temporary version; the committed one is untouched."""
        self._cleanup()

    def _cleanup(self) -> None:
        self._open = False
        self._buf, self._buffered, self._tables = [], 0, []
        if self._tmp is not None:
            with contextlib.suppress(Exception):
                self.place.remove(self._tmp)
            self._tmp = None
        if self._lock is not None:
            self._lock.release()


def _jsonable(attrs: Mapping[str, Any], key: str) -> dict[str, Any]:
    """Attributes as JSON values (numpy scalars to Python ones); a clear error otherwise."""

    def convert(value: Any) -> Any:
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, Mapping):
            return {str(k): convert(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [convert(v) for v in value]
        return value

    out = {k: convert(v) for k, v in attrs.items()}
    try:
        json.dumps(out, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{key}: attributes must be JSON values: {error}") from None
    return out


# ------------------------------------------------------------------------------ one-shot helpers


def _write(
    root: str | os.PathLike[str],
    empiar_id: str | int,
    images: np.ndarray,
    labels: np.ndarray,
    table_rows: Any,
    mode: str,
    batch: int,
    **kwargs: Any,
) -> CorpusDataset | None:
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"{normalise_id(empiar_id)}: images must be (n, S, S), got {images.shape}")
    table = _as_table(table_rows, len(images), normalise_id(empiar_id))
    with CorpusWriter(root, empiar_id, images.shape[-1], mode=mode, **kwargs) as writer:
        for start in range(0, len(images), batch):
            stop = start + batch
            writer.append(
                images[start:stop], np.asarray(labels)[start:stop], table.iloc[start:stop]
            )
    return open_corpus(root, empiar_id, storage_options=kwargs.get("storage_options"))


def write_corpus(
    root: str | os.PathLike[str],
    empiar_id: str | int,
    images: np.ndarray,
    labels: np.ndarray,
    table_rows: Any,
    *,
    batch: int = 1024,
    **kwargs: Any,
) -> CorpusDataset:
    """Write (or replace) a partition from arrays in memory (or memory-mapped); keywords as
    :class:`CorpusWriter`."""
    result = _write(root, empiar_id, images, labels, table_rows, "w", batch, **kwargs)
    assert result is not None
    return result


def append_to_corpus(
    root: str | os.PathLike[str],
    empiar_id: str | int,
    images: np.ndarray,
    labels: np.ndarray,
    table_rows: Any,
    *,
    batch: int = 1024,
    **kwargs: Any,
) -> CorpusDataset:
    """Append particles to a partition (creating it if needed), atomically: the old particles,
    their chunks and their splits are untouched; a failure leaves the old version as it was.
    For streaming appends use ``CorpusWriter(..., mode="a")``."""
    result = _write(root, empiar_id, images, labels, table_rows, "a", batch, **kwargs)
    assert result is not None
    return result
