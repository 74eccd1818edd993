"""EMPIAR and EMDB clients: entries, paged search, EMDB resolutions, and parsing.

Conventions
- EMPIAR ids are normalised to ``"EMPIAR-10028"``; partition keys use the bare number ``"10028"``.
- Dates are ISO ``YYYY-MM-DD`` strings (what the API returns), compared lexically.
- ``dataset_size`` strings ("26.8 GB", "1.9 TB") are decimal SI units, as EMPIAR displays them.
- Resolutions are in Angstrom; EMDB returns them as strings ("3.97"), sometimes with a unit.

Base URLs come from the environment (``PARTICLESEG_EMPIAR_URL``, ``PARTICLESEG_EMDB_URL``,
``PARTICLESEG_ARCHIVE_URL``, and ``PARTICLESEG_EMDB_FILES_URL`` for EMDB's map files); a
``file://`` URL points at a local mirror directory (see
:mod:`particleseg_model.access.mirror`) and is read without any server.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlparse

from particleseg_model.access.http import BadPayloadError, HttpClient, NotFoundError
from particleseg_model.access.mirror import Mirror

EMPIAR_URL_ENV = "PARTICLESEG_EMPIAR_URL"
EMDB_URL_ENV = "PARTICLESEG_EMDB_URL"
ARCHIVE_URL_ENV = "PARTICLESEG_ARCHIVE_URL"
EMDB_FILES_URL_ENV = "PARTICLESEG_EMDB_FILES_URL"
DEFAULT_EMPIAR_URL = "https://www.ebi.ac.uk/empiar/api"
DEFAULT_EMDB_URL = "https://www.ebi.ac.uk/emdb/api"
DEFAULT_ARCHIVE_URL = "https://ftp.ebi.ac.uk/empiar/world_availability"
# EMDB's file tree (structures/EMD-<n>/{map,other,masks,header}/...), mirrored by the wwPDB sites
DEFAULT_EMDB_FILES_URL = "https://ftp.ebi.ac.uk/pub/databases/emdb"

# The API answers POST entry/<ids> for many ids at once; keep the path (and reply) moderate.
POST_BATCH = 50

_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15}
_SIZE_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "PIB": 2**50})
_EMPIAR_ID = re.compile(r"^\s*(?:EMPIAR[-_]?)?(\d{5,})\s*$", re.IGNORECASE)
_EMD_ID = re.compile(r"^\s*(?:EMD[-_]?)?(\d{4,})\s*$", re.IGNORECASE)
_RESOLUTION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:Å|A|ANG|ANGSTROMS?)?\s*$", re.IGNORECASE)
# Free-text hints that an imageset's details speak of particles or coordinates: a flag shown to
# people (catalog column mentions_particles_in_text), never a reason to download anything
# ("Coordinates not deposited." matches too).
_COORDINATE_HINT = re.compile(
    r"coordinat|\.box\b|\.star\b|\.coord|picked particle|particle pick", re.IGNORECASE
)
# EMPIAR's category vocabulary (the deposition schema's T1-T14): single-frame picked particles
# are particle images; multiframe ones are particle movies; these two are tomography.
PARTICLE_CATEGORIES = (
    "picked particles - single frame - unprocessed",
    "picked particles - single frame - processed",
)
PARTICLE_MOVIE_CATEGORIES = (
    "picked particles - multiframe - unprocessed",
    "picked particles - multiframe - processed",
)
TOMOGRAPHY_CATEGORIES = ("tilt series", "subtomograms")


class EntryError(ValueError):
    """An EMPIAR entry whose payload cannot be used; the message names the entry."""

    def __init__(self, empiar_id: str, reason: str):
        super().__init__(f"{empiar_id}: {reason}")
        self.empiar_id = empiar_id
        self.reason = reason


def empiar_url() -> str:
    return os.environ.get(EMPIAR_URL_ENV) or DEFAULT_EMPIAR_URL


def emdb_url() -> str:
    return os.environ.get(EMDB_URL_ENV) or DEFAULT_EMDB_URL


def archive_url() -> str:
    return os.environ.get(ARCHIVE_URL_ENV) or DEFAULT_ARCHIVE_URL


def emdb_files_url() -> str:
    """The root of EMDB's file tree (``.../structures/EMD-<n>/map/emd_<n>.map.gz`` below it)."""
    return os.environ.get(EMDB_FILES_URL_ENV) or DEFAULT_EMDB_FILES_URL


def normalize_empiar_id(value: str | int) -> str:
    """``10028``, ``"10028"``, ``"EMPIAR-10028"`` -> ``"EMPIAR-10028"``."""
    match = _EMPIAR_ID.match(str(value))
    if not match:
        raise ValueError(f"not an EMPIAR id: {value!r}")
    return f"EMPIAR-{match.group(1)}"


def partition_key(value: str | int) -> str:
    """The Dagster partition key of an entry: the bare number, e.g. ``"10028"``."""
    return normalize_empiar_id(value).split("-", 1)[1]


def normalize_emd_id(value: str | int) -> str:
    """``"EMD-1832"``, ``"emd_1832"``, ``1832`` -> ``"EMD-1832"``."""
    match = _EMD_ID.match(str(value))
    if not match:
        raise ValueError(f"not an EMDB id: {value!r}")
    return f"EMD-{match.group(1)}"


def parse_dataset_size(text: str | int | float | None) -> int | None:
    """``"26.8 GB"`` -> 26_800_000_000 bytes; missing -> ``None``; garbage -> ValueError."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if isinstance(text, int | float):
        return int(text)
    match = re.match(r"^\s*([\d.,]+)\s*([KMGTP]?I?B)?\s*$", text.strip(), re.IGNORECASE)
    if not match:
        raise ValueError(f"dataset_size {text!r} is not a size such as '26.8 GB'")
    number = float(match.group(1).replace(",", ""))
    unit = (match.group(2) or "B").upper()
    return int(round(number * _SIZE_UNITS[unit]))


def parse_resolution(value: Any) -> float | None:
    """EMDB resolution in Angstrom from ``"3.5"``, ``"3.5 Å"``, ``3.5``; missing -> ``None``.

    Text that is present but not a resolution raises ValueError (the caller names the entry).
    """
    if value is None:
        return None
    if isinstance(value, dict):  # {"valueOf_": "3.5", "units": "Å"}
        return parse_resolution(value.get("valueOf_"))
    if isinstance(value, int | float) and not isinstance(value, bool):
        result = float(value)
    else:
        text = str(value).strip()
        if not text:
            return None
        match = _RESOLUTION.match(text)
        if not match:
            raise ValueError(f"resolution {value!r} does not parse as Angstrom")
        result = float(match.group(1))
    if not 0 < result < 1000:
        raise ValueError(f"resolution {value!r} is out of range")
    return result


def parse_cross_references(value: Any) -> tuple[str, ...]:
    """EMDB ids from ``["EMD-1234"]`` or ``[{"name": "EMD-1234"}]`` (both occur), de-duplicated."""
    if value is None or value == "":
        return ()
    if not isinstance(value, list):
        raise ValueError(f"cross_references is {type(value).__name__}, expected a list")
    ids: list[str] = []
    for item in value:
        name = item.get("name") if isinstance(item, dict) else item
        if name is None:
            continue
        try:
            emd = normalize_emd_id(str(name))
        except ValueError:
            continue  # PDB ids and other databases appear here too; they are not maps
        if emd not in ids:
            ids.append(emd)
    return tuple(ids)


def _int_or_none(value: Any) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None  # "variable", "", None


def _float_or_none(value: Any) -> float | None:
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if result > 0 else None


@dataclass(frozen=True)
class Imageset:
    """One EMPIAR imageset; pixel width in Angstrom, sizes in pixels (None when 'variable')."""

    name: str
    directory: str
    category: str
    header_format: str = ""
    data_format: str = ""
    num_images: int | None = None
    frames_per_image: int | None = None
    voxel_type: str = ""
    pixel_width_a: float | None = None
    image_width_px: int | None = None
    image_height_px: int | None = None
    details: str = ""
    micrographs_file_pattern: str = ""
    picked_particles_file_pattern: str = ""
    picked_particles_directory: str = ""

    @property
    def _category(self) -> str:
        return " ".join(self.category.lower().split())

    @property
    def is_particles(self) -> bool:
        """Extracted single-frame particle images: the ``picked particles - single frame -
        unprocessed|processed`` categories (not particle movies)."""
        return self._category.startswith("picked particles - single frame")

    @property
    def is_particle_movies(self) -> bool:
        """Particle movies (``picked particles - multiframe - ...``): not usable as particles."""
        return self._category.startswith("picked particles - multiframe")

    @property
    def is_micrographs(self) -> bool:
        return self._category.startswith("micrographs")

    @property
    def is_tomography(self) -> bool:
        """Tilt series or subtomograms: not a single-particle experiment."""
        return self._category in TOMOGRAPHY_CATEGORIES

    @property
    def has_coordinates(self) -> bool:
        """Particle coordinates ship with these micrographs: there is no category for them, so
        they are the ``picked_particles_file_pattern`` / ``picked_particles_directory`` fields
        of a micrograph imageset. Free text never counts (see
        :attr:`mentions_particles_in_text`)."""
        declared = self.picked_particles_file_pattern.strip() or (
            self.picked_particles_directory.strip()
        )
        return self.is_micrographs and bool(declared)

    @property
    def mentions_particles_in_text(self) -> bool:
        """The details speak of coordinates, picks or STAR/box files: shown to people only
        ("Coordinates not deposited." mentions them too)."""
        return bool(_COORDINATE_HINT.search(self.details))


def parse_imageset(raw: Any) -> Imageset:
    if not isinstance(raw, dict):
        raise ValueError(f"imageset is {type(raw).__name__}, expected an object")
    category = raw.get("category")
    if not isinstance(category, str):
        raise ValueError(f"imageset {raw.get('name')!r} has no category")

    def text(key: str) -> str:
        value = raw.get(key)
        return "" if value is None else str(value)

    return Imageset(
        name=text("name"),
        directory=text("directory"),
        category=category.strip(),
        header_format=text("header_format"),
        data_format=text("data_format"),
        num_images=_int_or_none(raw.get("num_images_or_tilt_series")),
        frames_per_image=_int_or_none(raw.get("frames_per_image")),
        voxel_type=text("voxel_type"),
        pixel_width_a=_float_or_none(raw.get("pixel_width")),
        image_width_px=_int_or_none(raw.get("image_width")),
        image_height_px=_int_or_none(raw.get("image_height")),
        details=text("details"),
        micrographs_file_pattern=text("micrographs_file_pattern"),
        picked_particles_file_pattern=text("picked_particles_file_pattern"),
        picked_particles_directory=text("picked_particles_directory"),
    )


@dataclass(frozen=True)
class Entry:
    """An EMPIAR entry as the catalog needs it."""

    empiar_id: str
    title: str
    status: str
    release_date: str
    update_date: str
    dataset_size_bytes: int | None
    experiment_type: str
    emdb_ids: tuple[str, ...]
    imagesets: tuple[Imageset, ...] = field(default_factory=tuple)
    doi: str = ""

    @property
    def is_obsolete(self) -> bool:
        return self.status.upper().startswith("OBS")

    @property
    def ships_particles(self) -> bool:
        """A ``picked particles - single frame`` imageset."""
        return any(s.is_particles for s in self.imagesets)

    @property
    def ships_coordinates(self) -> bool:
        """A micrograph imageset with ``picked_particles_file_pattern``/``_directory``."""
        return any(s.has_coordinates for s in self.imagesets)

    @property
    def is_single_particle(self) -> bool:
        """No tilt series or subtomograms (those are tomography)."""
        return not any(s.is_tomography for s in self.imagesets)

    @property
    def mentions_particles_in_text(self) -> bool:
        """Some imageset's details speak of particles or coordinates (a flag for people)."""
        return any(s.mentions_particles_in_text for s in self.imagesets)

    @property
    def not_fetchable_reason(self) -> str:
        """Why no particle set can be fetched from this entry; ``""`` when one can.

        Only EMPIAR's own vocabulary counts: single-frame picked particles, or micrographs
        with declared coordinates, in a single-particle experiment."""
        if not self.is_single_particle:
            kinds = sorted({s._category for s in self.imagesets if s.is_tomography})
            return f"tomography ({', '.join(kinds)}), not a single-particle experiment"
        if self.ships_particles or self.ships_coordinates:
            return ""
        if any(s.is_particle_movies for s in self.imagesets):
            return (
                "particle movies only (picked particles - multiframe); no single-frame "
                "particles and no micrographs with coordinates"
            )
        base = (
            "no 'picked particles - single frame' imageset and no micrograph imageset with "
            "picked_particles_file_pattern/picked_particles_directory"
        )
        if self.mentions_particles_in_text:
            return base + " (the details mention particles or coordinates: free text only)"
        return base


def parse_entry(empiar_id: str | int, record: Any) -> Entry:
    """Parse one entry's inner record; any defect raises :class:`EntryError` naming the entry."""
    key = normalize_empiar_id(empiar_id)
    if not isinstance(record, dict):
        raise EntryError(key, f"record is {type(record).__name__}, expected an object")
    try:
        title = record.get("title")
        if not isinstance(title, str) or not title.strip():
            raise ValueError("missing title")
        imagesets_raw = record.get("imagesets") or []
        if not isinstance(imagesets_raw, list):
            raise ValueError(f"imagesets is {type(imagesets_raw).__name__}, expected a list")
        citation = record.get("citation") or []
        doi = ""
        if isinstance(citation, list) and citation and isinstance(citation[0], dict):
            doi = str(citation[0].get("doi") or "")
        return Entry(
            empiar_id=key,
            title=title.strip(),
            status=str(record.get("status") or "REL"),
            release_date=str(record.get("release_date") or "")[:10],
            update_date=str(record.get("update_date") or record.get("release_date") or "")[:10],
            dataset_size_bytes=parse_dataset_size(record.get("dataset_size")),
            experiment_type=str(record.get("experiment_type") or ""),
            emdb_ids=parse_cross_references(record.get("cross_references")),
            imagesets=tuple(parse_imageset(s) for s in imagesets_raw),
            doi=doi,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise EntryError(key, str(exc)) from exc


def compress_ids(ids: Iterable[str | int]) -> str:
    """Numbers as the POST endpoint takes them: ``10050,10054,10060-10072``."""
    numbers = sorted({int(partition_key(i)) for i in ids})
    parts: list[str] = []
    start = prev = None
    for n in numbers + [None]:
        # start is not None implies prev is not None (set together)
        if start is not None and n == prev + 1:  # pyright: ignore[reportOptionalOperand]
            prev = n
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = n
    return ",".join(parts)


def date_window_query(
    since: str | None = None, until: str | None = None, field_name: str = "update_date"
) -> str:
    """The solr query the EMDB search endpoint takes for EMPIAR entries updated in a window."""
    if since is None and until is None:
        return "database:EMPIAR"
    return f"database:EMPIAR AND {field_name}:[{since or '*'} TO {until or '*'}]"


def _mirror_root(url: str) -> Path | None:
    if url.startswith("file://"):
        return Path(unquote(urlparse(url).path))
    return None


class EmpiarClient:
    """EMPIAR entries (EMPIAR API) and their listing (the EMDB search API)."""

    def __init__(
        self,
        base_url: str | None = None,
        search_url: str | None = None,
        *,
        http: HttpClient | None = None,
        **http_options: Any,
    ):
        self.base_url = (base_url or empiar_url()).rstrip("/")
        self.search_url = (search_url or emdb_url()).rstrip("/")
        root = _mirror_root(self.base_url)
        self._mirror = Mirror(root) if root is not None else None
        search_root = _mirror_root(self.search_url)
        self._search_mirror = Mirror(search_root) if search_root is not None else None
        self.http = http or HttpClient(self.base_url, **http_options)
        self._search_http = (
            self.http
            if self.search_url == self.base_url
            else HttpClient(self.search_url, **http_options)
        )

    def entry_record(self, empiar_id: str | int) -> dict:
        """The entry's inner record (raises NotFoundError)."""
        key = normalize_empiar_id(empiar_id)
        if self._mirror is not None:
            try:
                reply = self._mirror.entry(key)
            except KeyError as exc:
                raise NotFoundError(
                    f"{self.base_url}: {key} not found", url=self.base_url, status=404
                ) from exc
        else:
            reply = self.http.get_json(f"entry/{partition_key(key)}")
        return _unwrap(reply, key, self.base_url)

    def entry(self, empiar_id: str | int) -> Entry:
        key = normalize_empiar_id(empiar_id)
        return parse_entry(key, self.entry_record(key))

    def entry_records(self, ids: Sequence[str | int]) -> dict[str, Any]:
        """Inner records of several entries, ``POST_BATCH`` ids a request; missing ids absent."""
        keys = sorted({normalize_empiar_id(i) for i in ids})
        records: dict[str, Any] = {}
        for start in range(0, len(keys), POST_BATCH):
            spec = compress_ids(keys[start : start + POST_BATCH])
            if self._mirror is not None:
                reply = self._mirror.entries(spec)
            else:
                reply = self.http.post_json(f"entry/{quote(spec, safe=',-')}")
            if not isinstance(reply, dict):
                raise BadPayloadError(
                    f"{self.base_url}/entry/{spec}: expected an object",
                    url=self.base_url,
                    status=200,
                )
            for key, record in reply.items():
                try:
                    records[normalize_empiar_id(key)] = record
                except ValueError:
                    continue
        return records

    def search(self, query: str = "database:EMPIAR", rows: int = 100) -> Iterator[tuple[str, Any]]:
        """Every ``(EMPIAR id, record)`` the search returns, page after page until an empty page."""
        page = 1
        while True:
            if self._search_mirror is not None:
                reply = self._search_mirror.search(query, rows=rows, page=page)
            else:
                reply = self._search_http.get_json(
                    f"empiar/search/{quote(query, safe='')}", params={"rows": rows, "page": page}
                )
            if not isinstance(reply, dict):
                raise BadPayloadError(
                    f"{self.search_url}/empiar/search: page {page} is not an object",
                    url=self.search_url,
                    status=200,
                )
            if not reply:
                return
            for key, record in reply.items():
                try:
                    yield normalize_empiar_id(key), record
                except ValueError:
                    continue
            if len(reply) < rows:
                return
            page += 1

    def updated(
        self, since: str | None = None, until: str | None = None, rows: int = 100
    ) -> Iterator[tuple[str, Any]]:
        """Entries whose ``update_date`` lies in ``[since, until]`` (inclusive; None = open)."""
        return self.search(date_window_query(since, until), rows=rows)


def _unwrap(reply: Any, key: str, url: str) -> Any:
    if not isinstance(reply, dict):
        raise BadPayloadError(f"{url}: reply for {key} is not an object", url=url, status=200)
    if key in reply:
        return reply[key]
    if len(reply) == 1:
        return next(iter(reply.values()))
    raise BadPayloadError(f"{url}: reply for {key} does not contain it", url=url, status=200)


class EmdbClient:
    """EMDB entries: the resolution of a map."""

    def __init__(
        self, base_url: str | None = None, *, http: HttpClient | None = None, **http_options: Any
    ):
        self.base_url = (base_url or emdb_url()).rstrip("/")
        root = _mirror_root(self.base_url)
        self._mirror = Mirror(root) if root is not None else None
        self.http = http or HttpClient(self.base_url, **http_options)

    def entry(self, emd_id: str | int) -> dict:
        key = normalize_emd_id(emd_id)
        if self._mirror is not None:
            try:
                return self._mirror.emdb_entry(key)
            except KeyError as exc:
                raise NotFoundError(
                    f"{self.base_url}: {key} not found", url=self.base_url, status=404
                ) from exc
        reply = self.http.get_json(f"entry/{key}")
        if not isinstance(reply, dict):
            raise BadPayloadError(
                f"{self.base_url}/entry/{key}: not an object", url=self.base_url, status=200
            )
        return reply

    def resolution_a(self, emd_id: str | int) -> float | None:
        """Final reconstruction resolution in Angstrom, ``None`` when the entry gives none.

        Raises NotFoundError for an unknown map and ValueError for a resolution that does not
        parse (the message names the map)."""
        key = normalize_emd_id(emd_id)
        return resolution_from_emdb(key, self.entry(key))


def resolution_from_emdb(emd_id: str, record: dict) -> float | None:
    """Read ``structure_determination_list.structure_determination[0].image_processing[0]
    .final_reconstruction.resolution.valueOf_`` (a string in the API)."""
    try:
        determinations = record["structure_determination_list"]["structure_determination"]
        processing = determinations[0]["image_processing"]
        if isinstance(processing, dict):
            processing = [processing]
        value = processing[0]["final_reconstruction"]["resolution"]
    except (KeyError, IndexError, TypeError):
        return None
    try:
        return parse_resolution(value)
    except ValueError as exc:
        raise ValueError(f"{emd_id}: {exc}") from exc
