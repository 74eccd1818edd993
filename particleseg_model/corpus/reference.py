"""The reference map of a partition: which map labels it, where it comes from, what it is.

The map that labels a partition should be the one its particle set was refined against. The
EMPIAR entry JSON links maps only per entry (``cross_references``: ``[{"name": "EMD-n"}]``,
no field ties an imageset to a map: see the deposition schema), so the choice is, in order:

1. ``"deposited in the archive"``: a density map in the entry's ``data/Map/`` folder (the
   depositors put it beside the particles; a file named "mask" is not a density map). Its
   EMDB id is the linked one whose number its file name carries (``emd_<n>.map``), if any.
   Of several such files, the best-resolution one named after a linked map; several none of
   which is named after one are left to the rules below.
2. ``"named in the imageset's details"``: the linked maps that the particle (or micrograph)
   imageset's ``name`` or ``details`` name (``EMD-1234``); the best-resolution one when the
   text names several.
3. ``"the entry's only linked map"``: one EMDB cross-reference.
4. ``"best of N linked maps"``: the best (smallest) resolution the EMDB API gives among the N
   cross-references; ties go to the one listed first among the tied. Never "the first one
   listed" alone: with no resolution known for any of them, the build refuses.

A map from EMDB is fetched with :func:`particleseg_model.access.emdb_files.fetch_emdb_map`
(streamed, gunzipped, size-checked, cached once per EMDB id). Units: Angstrom, voxels.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from particleseg_model.access.dataset import EntryFiles, NothingToFetch
from particleseg_model.access.emdb_files import EmdbFileError, fetch_emdb_map
from particleseg_model.access.empiar import EmdbClient, Entry, Imageset, normalize_emd_id
from particleseg_model.access.http import HttpClient, HttpError

__all__ = [
    "DEPOSITED",
    "NAMED_IN_DETAILS",
    "ONLY_LINKED",
    "MapChoice",
    "ReferenceMap",
    "choose_linked_map",
    "named_emdb_ids",
    "reference_map",
]

DEPOSITED = "deposited in the archive"
NAMED_IN_DETAILS = "named in the imageset's details"
ONLY_LINKED = "the entry's only linked map"
_EMD_IN_TEXT = re.compile(r"\bEMD[-_ ]?(\d{4,})\b", re.IGNORECASE)
_EMD_IN_NAME = re.compile(r"emd[-_]?(\d{4,})", re.IGNORECASE)

Log = Callable[[str], None]


@dataclass(frozen=True)
class MapChoice:
    """Which linked EMDB map labels the partition and why (``chosen``: one of the rules of
    the module doc, ``"best of N linked maps"`` spelled with N); ``candidates``: the linked
    maps looked at, with the resolutions (A) known, None where unknown or not asked."""

    emdb_id: str
    chosen: str
    candidates: dict[str, float | None] = field(default_factory=dict)


@dataclass(frozen=True)
class ReferenceMap:
    """The map a partition is labelled with, as the stacks manifest records it.

    ``path``: the local MRC map (the EMDB cache, or the archive's download); ``source``:
    ``"emdb"`` or ``"archive"``; ``chosen``: the rule that picked it; ``emdb_id``: its EMDB id
    (None for an archive file that names none); ``resolution_a`` and ``voxel_size_a`` in
    Angstrom, ``box_px`` voxels along each axis; ``sha256`` of the (gunzipped) map; ``url``
    where it came from; ``candidates``: the linked maps and their resolutions;
    ``downloaded_bytes``: compressed bytes this build fetched (0 from the cache).
    """

    path: Path
    source: Literal["emdb", "archive"]
    chosen: str
    emdb_id: str | None
    resolution_a: float | None
    voxel_size_a: float
    box_px: int
    sha256: str
    url: str
    candidates: dict[str, float | None] = field(default_factory=dict)
    downloaded_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "source": self.source,
            "chosen": self.chosen,
            "emdb_id": self.emdb_id,
            "resolution_a": self.resolution_a,
            "voxel_size_a": self.voxel_size_a,
            "box_px": self.box_px,
            "sha256": self.sha256,
            "url": self.url,
            "candidates": dict(self.candidates),
            "downloaded_bytes": self.downloaded_bytes,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ReferenceMap:
        return cls(
            path=Path(data["path"]),
            source=data["source"],
            chosen=data["chosen"],
            emdb_id=data.get("emdb_id"),
            resolution_a=data.get("resolution_a"),
            voxel_size_a=float(data["voxel_size_a"]),
            box_px=int(data["box_px"]),
            sha256=str(data["sha256"]),
            url=str(data.get("url", "")),
            candidates=dict(data.get("candidates") or {}),
            downloaded_bytes=int(data.get("downloaded_bytes", 0)),
        )

    def summary(self) -> dict[str, Any]:
        """Flat figures for the UI (``map_*`` keys; empty text where unknown)."""
        return {
            "map": str(self.path),
            "map_emdb_id": self.emdb_id or "",
            "map_chosen": self.chosen,
            "map_source": self.source,
            "map_resolution_a": float(self.resolution_a)
            if self.resolution_a is not None
            else float("nan"),
            "map_voxel_size_a": self.voxel_size_a,
            "map_box_px": self.box_px,
            "map_sha256": self.sha256,
        }


def named_emdb_ids(imageset: Imageset | None, linked: tuple[str, ...]) -> list[str]:
    """The linked EMDB ids that the imageset's name or details name, in the entry's order."""
    if imageset is None:
        return []
    text = f"{imageset.name} {imageset.details}"
    named = {f"EMD-{m.group(1)}" for m in _EMD_IN_TEXT.finditer(text)}
    return [emd for emd in linked if emd in named]


def _best(ids: list[str], resolutions: dict[str, float | None]) -> str | None:
    known = [(resolutions[e], k, e) for k, e in enumerate(ids) if resolutions.get(e) is not None]
    return min(known)[2] if known else None  # ties: the one listed first


def choose_linked_map(
    entry: Entry,
    imageset: Imageset | None,
    resolution_of: Callable[[str], float | None],
) -> MapChoice:
    """The linked EMDB map that labels the partition (rules 2-4 of the module doc).

    Parameters
    ----------
    entry
        The EMPIAR entry (its ``emdb_ids``, from ``cross_references``).
    imageset
        The imageset the particles come from (its name and details may name the map).
    resolution_of
        The resolution of an EMDB id in Angstrom (None when unknown); asked only when a choice
        among several maps is needed.

    Returns
    -------
    MapChoice

    Raises
    ------
    NothingToFetch
        No linked map, or several and none with a known resolution (the message names them).
    """
    linked = tuple(dict.fromkeys(normalize_emd_id(e) for e in entry.emdb_ids))
    if not linked:
        raise NothingToFetch(
            f"{entry.empiar_id}: no reference map: no density map in the archive's Map/ "
            "folder and no EMDB map linked (cross_references)"
        )
    named = named_emdb_ids(imageset, linked)
    if len(named) == 1:
        return MapChoice(named[0], NAMED_IN_DETAILS, {named[0]: None})
    if len(linked) == 1:
        return MapChoice(linked[0], ONLY_LINKED, {linked[0]: None})
    pool = named or list(linked)
    resolutions = {e: resolution_of(e) for e in pool}
    best = _best(pool, resolutions)
    if best is None:
        raise NothingToFetch(
            f"{entry.empiar_id}: cannot choose the reference map among {len(pool)} linked "
            f"maps ({', '.join(pool)}): none states a resolution"
        )
    rule = (
        f"best of {len(pool)} maps {NAMED_IN_DETAILS}"
        if named
        else f"best of {len(pool)} linked maps"
    )
    return MapChoice(best, rule, resolutions)


def _api_resolution(emdb: EmdbClient | None) -> Callable[[str], float | None]:
    def ask(emd_id: str) -> float | None:
        if emdb is None:
            return None
        try:
            return emdb.resolution_a(emd_id)
        except (HttpError, ValueError):
            return None  # an unresolvable map is reported by the catalog; here it is unknown

    return ask


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _deposited(
    entry: Entry, files: EntryFiles, ask: Callable[[str], float | None]
) -> ReferenceMap | None:
    """The density map deposited in the archive (rule 1), None when there is none or no way to
    tell which of several it is (then the linked EMDB maps decide)."""
    density = sorted(p for p in files.maps if "mask" not in p.name.lower())
    if not density:
        return None
    linked = {normalize_emd_id(e) for e in entry.emdb_ids}
    named: dict[Path, str] = {}
    for path in density:
        match = _EMD_IN_NAME.search(path.name)
        if match and f"EMD-{match.group(1)}" in linked:
            named[path] = f"EMD-{match.group(1)}"
    resolutions: dict[str, float | None] = {}
    if len(density) == 1:
        path, chosen = density[0], DEPOSITED
    elif named:
        resolutions = {emd: ask(emd) for emd in named.values()}
        unknown = float("inf")  # a map without a known resolution ranks last

        def rank(path: Path) -> tuple[float, int]:
            found = resolutions[named[path]]
            return (found if found is not None else unknown, density.index(path))

        best = min(named, key=rank)
        path, chosen = best, f"{DEPOSITED}, best of {len(named)} named after linked maps"
    else:
        return None  # several files, none named after a linked map: rules 2-4 choose
    from particleseg_model.em import maps

    volume = maps.load_map(path)
    emd = named.get(path)
    resolution = resolutions.get(emd) if emd in resolutions else (ask(emd) if emd else None)
    return ReferenceMap(
        path=path,
        source="archive",
        chosen=chosen,
        emdb_id=emd,
        resolution_a=resolution,
        voxel_size_a=float(volume.pixel_size_a),
        box_px=int(volume.box),
        sha256=_sha256(path),
        url=path.as_uri(),
        candidates=resolutions or ({emd: resolution} if emd else {}),
    )


def reference_map(
    entry: Entry,
    files: EntryFiles,
    cache_dir: Path,
    *,
    emdb_files_url: str | None = None,
    emdb: EmdbClient | None = None,
    http: HttpClient | None = None,
    log: Log | None = None,
) -> ReferenceMap:
    """The partition's reference map: deposited in the archive, else fetched from EMDB.

    Parameters
    ----------
    entry
        The EMPIAR entry.
    files
        What :func:`~particleseg_model.access.dataset.fetch_entry_files` fetched (deposited
        maps, the imageset used).
    cache_dir
        The EMDB map cache (``<work>/emdb``): each map once per EMDB id.
    emdb_files_url
        The root of EMDB's file tree (default ``PARTICLESEG_EMDB_FILES_URL``, else EBI's).
    emdb
        The EMDB API client, asked for resolutions (the choice among several maps, and the
        resolution recorded; the header XML's otherwise).
    http
        The polite client for the map download.
    log
        Receives one line naming the map, how it was chosen and its figures.

    Returns
    -------
    ReferenceMap

    Raises
    ------
    NothingToFetch
        No map in the archive and none linked, or no way to choose among several.
    particleseg_model.access.emdb_files.EmdbFileError
        The EMDB map cannot be fetched or used (404, a corrupt or truncated ``.map.gz``, a
        map that is not cubic or has no voxel size); the message names the EMPIAR entry, the
        EMDB id and the URL.
    """
    ask = _api_resolution(emdb)
    found = _deposited(entry, files, ask)
    if found is None:
        choice = choose_linked_map(entry, files.imageset, ask)
        resolution = choice.candidates.get(choice.emdb_id)
        if resolution is None:
            resolution = ask(choice.emdb_id)
        try:
            fetched = fetch_emdb_map(
                choice.emdb_id,
                cache_dir,
                base_url=emdb_files_url,
                http=http,
                resolution_a=resolution,
                progress=False,
            )
        except EmdbFileError as exc:
            raise EmdbFileError(
                f"{entry.empiar_id}: reference map {choice.emdb_id} ({choice.chosen}): {exc}",
                emdb_id=exc.emdb_id,
                url=exc.url,
                status=exc.status,
            ) from exc
        found = ReferenceMap(
            path=fetched.path,
            source="emdb",
            chosen=choice.chosen,
            emdb_id=fetched.emdb_id,
            resolution_a=fetched.resolution_a,
            voxel_size_a=fetched.voxel_size_a,
            box_px=fetched.box,
            sha256=fetched.sha256,
            url=fetched.url,
            candidates={**choice.candidates, choice.emdb_id: fetched.resolution_a},
            downloaded_bytes=fetched.bytes_downloaded,
        )
    if log is not None:
        resolution_text = (
            f"{found.resolution_a:g} A" if found.resolution_a is not None else "resolution unknown"
        )
        cached = " (cached)" if found.source == "emdb" and not found.downloaded_bytes else ""
        log(
            f"reference map {found.emdb_id or found.path.name} ({found.chosen}): "
            f"{found.box_px}^3 at {found.voxel_size_a:g} A/voxel, {resolution_text}, "
            f"sha256 {found.sha256[:12]}{cached}"
        )
    return found
