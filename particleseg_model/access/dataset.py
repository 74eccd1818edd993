"""Fetch what one EMPIAR entry needs for the corpus, and nothing more.

An entry ships either extracted particles (a ``picked particles`` imageset: a particle STAR file
and the stacks its ``rlnImageName`` column names, or, without a particle STAR file, a cryoSPARC
``.cs`` particle file and the ``.mrc`` stacks its ``blob/path`` names) or micrographs with
particle coordinates (``micrographs_file_pattern`` / ``picked_particles_file_pattern``, RELION
STAR or EMAN ``.box``). :func:`fetch_entry_files` downloads exactly those files into ``dest``
with the archive's relative paths kept (``dest/data/...``), plus the small side files an entry
may carry:
maps and masks deposited in the archive (``Map/``: rare in real entries, whose maps are in EMDB;
see :mod:`particleseg_model.corpus.reference`), a ``ground_truth.csv`` and ``simulation.json``
(simulated entries). Stacks that the particle file does not reference are never downloaded.

Downloads are resumable, size-checked and atomic (:mod:`particleseg_model.access.archive`), so
running it again after a cut fetches only what is missing. Only a 404 (or a missing local
folder) means a folder or file is absent; any other failure while listing or fetching (a 5xx
after the client's retries, a refused connection, a reply that is not a listing) raises
:class:`ListingError` or :class:`~particleseg_model.access.archive.DownloadError` naming the
URL and the status.
"""

from __future__ import annotations

import contextvars
import fnmatch
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from particleseg_model.access.archive import DownloadError, RemoteFile, download, list_directory
from particleseg_model.access.empiar import Entry, Imageset, partition_key
from particleseg_model.access.http import HttpClient, HttpError, NotFoundError
from particleseg_model.em.cryosparc import CryosparcError, read_cs
from particleseg_model.em.star import StarError, read_star

__all__ = ["EntryFiles", "ListingError", "NothingToFetch", "fetch_entry_files", "entry_url"]

SIDE_FILES = ("ground_truth.csv", "simulation.json", "micrographs_ctf.star")
MAP_SUFFIXES = (".map", ".mrc", ".map.gz")


class NothingToFetch(ValueError):
    """The entry ships neither particles nor micrographs with coordinates we can read."""


class ListingError(HttpError):
    """An archive folder that could not be listed for another reason than its absence (404);
    ``url`` and ``status`` (None without an HTTP reply) say which."""


@dataclass
class EntryFiles:
    """The local copy of what an entry needs. Paths are absolute, under ``root``.

    ``particles_star`` is the deposited particle STAR file; ``particles_cs`` the cryoSPARC
    particle file of an entry that ships one and no particle STAR file (one of the two is set
    for a particle entry). ``imageset`` is the imageset the files come from."""

    empiar_id: str
    kind: Literal["particles", "micrographs"]
    root: Path
    particles_star: Path | None = None
    particles_cs: Path | None = None
    imageset: Imageset | None = None
    stacks: list[Path] = field(default_factory=list)
    micrographs: list[Path] = field(default_factory=list)
    coordinates: list[Path] = field(default_factory=list)
    maps: list[Path] = field(default_factory=list)
    side_files: dict[str, Path] = field(default_factory=dict)
    pixel_size_a: float | None = None

    @property
    def nbytes(self) -> int:
        files = [
            *self.stacks,
            *self.micrographs,
            *self.coordinates,
            *self.maps,
            *self.side_files.values(),
        ]
        if self.particles_star:
            files.append(self.particles_star)
        if self.particles_cs:
            files.append(self.particles_cs)
        return sum(p.stat().st_size for p in files if p.exists())


def entry_url(archive_base: str, empiar_id: str | int) -> str:
    """``.../world_availability/10028/``."""
    return f"{archive_base.rstrip('/')}/{partition_key(empiar_id)}/"


def _clean(directory: str) -> str:
    """Imageset directories are not always exact: drop a leading slash and the entry number."""
    parts = [p for p in directory.strip().strip("/").split("/") if p and p != "."]
    if parts and parts[0].isdigit():
        parts = parts[1:]
    return "/".join(parts)


_LISTINGS: contextvars.ContextVar[dict[str, list[RemoteFile]] | None] = contextvars.ContextVar(
    "particleseg_dataset_listings", default=None
)
"""The folders listed by the :func:`fetch_entry_files` call in progress (``data/`` is both a
parent of the particle folder and where the side files are: one request, not two)."""


def _list(url: str, http: HttpClient | None) -> list[RemoteFile]:
    """The folder's files; an absent folder (404, or missing locally) is empty, any other
    failure raises :class:`ListingError` with the URL and status (after the retries)."""
    cache = _LISTINGS.get()
    if cache is not None and url in cache:
        return cache[url]
    listing = _list_uncached(url, http)
    if cache is not None:
        cache[url] = listing
    return listing


def _list_uncached(url: str, http: HttpClient | None) -> list[RemoteFile]:
    try:
        return list_directory(url, http)
    except (NotFoundError, FileNotFoundError, NotADirectoryError):
        return []  # an optional folder (Map/, a parent of the imageset) that is not there
    except HttpError as exc:
        raise ListingError(f"listing {url} failed: {exc}", url=url, status=exc.status) from exc
    except ValueError as exc:  # a reply that is not an autoindex page
        raise ListingError(f"listing {url} failed: {exc}", url=url) from exc


def _relative(entry: str, remote: RemoteFile) -> str:
    return remote.url[len(entry) :] if remote.url.startswith(entry) else remote.name


def _glob(entry: str, folder: str, pattern: str, http: HttpClient | None) -> list[RemoteFile]:
    """Files of ``entry + folder`` whose entry-relative path matches ``pattern``."""
    listing = _list(entry + (folder.rstrip("/") + "/" if folder else ""), http)
    return sorted(
        (f for f in listing if not f.is_dir and fnmatch.fnmatch(_relative(entry, f), pattern)),
        key=lambda f: f.url,
    )


def _fetch(
    entry: str, remote: RemoteFile, dest: Path, http: HttpClient | None, progress: bool
) -> Path:
    relative = _relative(entry, remote)
    target = dest.joinpath(*relative.split("/"))
    target.parent.mkdir(parents=True, exist_ok=True)
    # listing sizes are rounded ("5.7K"): the download checks Content-Length instead
    return download(remote.url, target, http=http, progress=progress)


def _side_files(
    entry: str,
    data_dir: str,
    dest: Path,
    files: EntryFiles,
    http: HttpClient | None,
    progress: bool,
) -> None:
    for remote in _list(entry + data_dir + "/", http):
        if not remote.is_dir and remote.name in SIDE_FILES:
            files.side_files[remote.name] = _fetch(entry, remote, dest, http, progress)
    for remote in _list(entry + data_dir + "/Map/", http):
        if not remote.is_dir and remote.name.endswith(MAP_SUFFIXES):
            files.maps.append(_fetch(entry, remote, dest, http, progress))


def _particle_file(
    entry: str, folders: list[str], dest: Path, http: HttpClient | None, progress: bool
) -> tuple[Literal["star", "cs"], Path]:
    """The particle file: among the STAR files in the imageset folder and its parents, the one
    with ``rlnImageName`` and the most rows; without one, among the cryoSPARC ``.cs`` files
    there, the one with the fields needed (``read_cs``) and the most rows."""
    problems: list[str] = []
    seen: set[str] = set()
    listed: list[RemoteFile] = []
    for folder in folders:
        for remote in _list(entry + (folder + "/" if folder else ""), http):
            if not remote.is_dir and remote.url not in seen:
                seen.add(remote.url)
                listed.append(remote)
    for suffix, reader, errors in (
        (".star", lambda p: read_star(p).particles, StarError),
        (".cs", lambda p: read_cs(p).particles, CryosparcError),
    ):
        best: tuple[int, Path] | None = None
        for remote in listed:
            if not remote.name.endswith(suffix):
                continue
            local = _fetch(entry, remote, dest, http, progress)
            try:
                rows = len(reader(local))
            except errors as exc:
                problems.append(str(exc))
                continue
            if best is None or rows > best[0]:
                best = (rows, local)
        if best is not None:
            return ("star" if suffix == ".star" else "cs"), best[1]
    detail = "; ".join(problems[:3]) or "none found"
    raise NothingToFetch(
        f"no particle STAR or cryoSPARC .cs file in {entry} ({', '.join(folders)}): {detail}"
    )


_STACK_RULES = ("beside the particle file", "under data/", "as written", "by name beside it")


def _stack_candidates(entry: str, star_relative: str, stack_path: str) -> list[tuple[str, str]]:
    """``(rule, URL)`` of where a stack named in a particle file may be (see
    :func:`_stack_url`), duplicates and paths climbing out of the entry left out."""
    clean = stack_path.lstrip("/")
    star_dir = posixpath.dirname(star_relative)
    candidates = [
        posixpath.normpath(posixpath.join(star_dir, clean)),
        posixpath.normpath(posixpath.join("data", clean)),
        posixpath.normpath(clean),
        posixpath.normpath(posixpath.join(star_dir, posixpath.basename(clean))),
    ]
    seen: dict[str, str] = {}
    for rule, relative in zip(_STACK_RULES, candidates, strict=True):
        if not relative.startswith("..") and relative not in seen:
            seen[relative] = rule
    return [(rule, entry + relative) for relative, rule in seen.items()]


def _stack_url(entry: str, star_relative: str, stack_path: str) -> list[str]:
    """Where a stack named in a particle file may be: relative to its folder, or to the
    entry's ``data/`` folder (RELION paths are relative to the project directory), or, last,
    by its bare name in the particle file's folder (cryoSPARC paths are relative to a
    cryoSPARC project, ``J12/extract/...``, which depositors seldom keep)."""
    return [url for _, url in _stack_candidates(entry, star_relative, stack_path)]


def _fetch_particles(
    entry: str,
    imageset: Imageset,
    dest: Path,
    files: EntryFiles,
    http: HttpClient | None,
    progress: bool,
) -> None:
    directory = _clean(imageset.directory)
    parent = posixpath.dirname(directory)
    folders = list(dict.fromkeys([directory, parent] + ([] if parent == "" else [""])))
    kind, star_path = _particle_file(entry, folders, dest, http, progress)
    if kind == "star":
        files.particles_star = star_path
        table = read_star(star_path).particles
    else:
        files.particles_cs = star_path
        table = read_cs(star_path).particles
    star_relative = star_path.relative_to(dest).as_posix()
    found_by: str | None = None  # the rule that found the last stack: tried first for the next
    for stack in sorted(table["stack_path"].unique()):
        target = star_path.parent / stack
        if target.exists() and target.stat().st_size > 0:
            files.stacks.append(target)
            continue
        errors = []
        candidates = _stack_candidates(entry, star_relative, stack)
        # the stacks of one file sit the same way: one 404 per entry, not one per stack
        candidates.sort(key=lambda candidate: candidate[0] != found_by)
        for rule, url in candidates:
            try:
                files.stacks.append(download(url, target, http=http, progress=progress))
                found_by = rule
                break
            except DownloadError as exc:
                absent = exc.status == 404 or isinstance(exc.__cause__, FileNotFoundError)
                if not absent:
                    raise  # a server failure is not "not here": it names the URL and status
                errors.append(f"{url}: {exc}")  # try the next candidate location
        else:
            raise NothingToFetch(
                f"{star_path.name} names stack {stack!r}, which is not in the "
                f"archive ({'; '.join(errors[:2])})"
            )
    pixel = table["pixel_size_a"].dropna()
    files.pixel_size_a = float(pixel.iloc[0]) if len(pixel) else imageset.pixel_width_a


def _fetch_micrographs(
    entry: str,
    imageset: Imageset,
    dest: Path,
    files: EntryFiles,
    http: HttpClient | None,
    progress: bool,
) -> None:
    pattern = _clean(imageset.micrographs_file_pattern) or (_clean(imageset.directory) + "/*")
    micrographs = _glob(entry, posixpath.dirname(pattern), pattern, http)
    micrographs = [m for m in micrographs if m.name.endswith((".mrc", ".mrcs", ".tif", ".tiff"))]
    coord_pattern = _clean(imageset.picked_particles_file_pattern)
    coord_dir = _clean(imageset.picked_particles_directory) or posixpath.dirname(coord_pattern)
    coordinates = _glob(entry, coord_dir, coord_pattern or coord_dir + "/*.star", http)
    if not coordinates:  # the STAR pattern found nothing: EMAN .box files in the same folder
        coordinates = _glob(entry, coord_dir, coord_dir + "/*.box", http)
    if not micrographs or not coordinates:
        raise NothingToFetch(
            f"{files.empiar_id}: {len(micrographs)} micrographs matching "
            f"{pattern!r} and {len(coordinates)} coordinate files in "
            f"{coord_dir!r}: need both"
        )
    files.micrographs = [_fetch(entry, m, dest, http, progress) for m in micrographs]
    files.coordinates = [_fetch(entry, c, dest, http, progress) for c in coordinates]
    files.pixel_size_a = imageset.pixel_width_a


def fetch_entry_files(
    entry: Entry,
    archive_base: str,
    dest: str | os.PathLike[str],
    *,
    http: HttpClient | None = None,
    progress: bool = True,
) -> EntryFiles:
    """Download what ``entry`` needs for the corpus into ``dest`` (archive-relative paths).

    Particles are preferred over micrographs when an entry ships both (no extraction needed).
    Raises :class:`NothingToFetch` naming the entry when neither can be found.
    """
    token = _LISTINGS.set({})
    try:
        return _fetch_entry_files(entry, archive_base, Path(dest), http, progress)
    finally:
        _LISTINGS.reset(token)


def _fetch_entry_files(
    entry: Entry, archive_base: str, dest: Path, http: HttpClient | None, progress: bool
) -> EntryFiles:
    dest.mkdir(parents=True, exist_ok=True)
    if "://" not in archive_base:  # a plain mirror path: listings name files by file:// URI
        archive_base = Path(archive_base).absolute().as_uri()
    base = entry_url(archive_base, entry.empiar_id)
    particles = [s for s in entry.imagesets if s.is_particles]
    micrographs = [s for s in entry.imagesets if s.is_micrographs and s.has_coordinates]
    if particles:
        files = EntryFiles(entry.empiar_id, "particles", dest, imageset=particles[0])
        _fetch_particles(base, particles[0], dest, files, http, progress)
        particle_file = files.particles_star or files.particles_cs
        data_dir = particle_file.relative_to(dest).parts[0] if particle_file else "data"
    elif micrographs:
        files = EntryFiles(entry.empiar_id, "micrographs", dest, imageset=micrographs[0])
        _fetch_micrographs(base, micrographs[0], dest, files, http, progress)
        data_dir = "data"
    else:
        raise NothingToFetch(
            f"{entry.empiar_id} ships neither particles nor micrographs with coordinates"
        )
    _side_files(base, data_dir, dest, files, http, progress)
    return files
