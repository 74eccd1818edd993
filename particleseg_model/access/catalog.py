"""The EMPIAR catalog: one row per entry, refreshed incrementally, and the eligibility rule.

An entry is *eligible* for the particleSeg corpus when it is not obsolete, its best linked EMDB
map is better (strictly lower) than ``max_resolution_a`` (3.5 A by default), and it has a
fetchable particle set in EMPIAR's own vocabulary: a ``picked particles - single frame - ...``
imageset, or a micrograph imageset with ``picked_particles_file_pattern`` /
``picked_particles_directory``, in a single-particle experiment (no tilt series or
subtomograms; particle movies do not count). Free text is never a reason: it only sets the
``mentions_particles_in_text`` flag shown to people. An entry that passes on resolution but has
no fetchable particle set carries the reason in ``not_fetchable_reason``
(:func:`select_not_fetchable` lists them). Every linked map is kept with its resolution
(``emdb_resolutions``, JSON ``{"EMD-x": A or null}`` in the entry's order), the best one in
``best_emdb_id``/``best_resolution_a``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from particleseg_model.access.empiar import (
    EmdbClient,
    EmpiarClient,
    Entry,
    EntryError,
    parse_entry,
    partition_key,
)
from particleseg_model.access.http import HttpError, NotFoundError
from particleseg_model.atomic import atomic_path

log = logging.getLogger("particleseg.catalog")

DEFAULT_MAX_RESOLUTION_A = 3.5

CATALOG_COLUMNS: dict[str, str] = {
    "empiar_id": "string",
    "partition_key": "string",
    "title": "string",
    "status": "string",
    "release_date": "string",
    "update_date": "string",
    "dataset_size_bytes": "Int64",
    "experiment_type": "string",
    "emdb_ids": "string",
    "best_emdb_id": "string",
    "best_resolution_a": "float64",
    "ships_particles": "bool",
    "ships_coordinates": "bool",
    "is_single_particle": "bool",
    "mentions_particles_in_text": "bool",
    "not_fetchable_reason": "string",
    "emdb_resolutions": "string",
    "particle_images": "Int64",
    "pixel_size_a": "float64",
    "categories": "string",
    "doi": "string",
    "error": "string",
    "fetched_at": "string",
}


# Columns added after catalogs were first written: what an older file's rows get on reading
# (the reason is empty: such rows were judged by ships_particles/ships_coordinates).
_LATER_COLUMN_DEFAULTS: dict[str, Any] = {
    "is_single_particle": True,
    "mentions_particles_in_text": False,
    "not_fetchable_reason": "",
    "emdb_resolutions": "",
}


_OLDER_FILE_ATTR = "catalog_lacks_columns"


@dataclass
class CatalogRefresh:
    """What a refresh produced: the full table and what changed."""

    table: pd.DataFrame
    since: str | None
    updated_ids: list[str] = field(default_factory=list)
    new_ids: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0


def empty_catalog() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in CATALOG_COLUMNS.items()})


def _typed(rows: list[dict[str, Any]]) -> pd.DataFrame:
    if not rows:
        return empty_catalog()
    frame = pd.DataFrame(rows, columns=list(CATALOG_COLUMNS))
    return frame.astype(CATALOG_COLUMNS)


def entry_row(entry: Entry, resolutions: dict[str, float | None], error: str = "") -> dict:
    """One catalog row; ``resolutions`` maps EMDB id -> resolution (A) for the entry's maps."""
    known = [(r, e) for e in entry.emdb_ids if (r := resolutions.get(e)) is not None]
    best_resolution, best_emd = min(known) if known else (None, "")
    particle_sets = [s for s in entry.imagesets if s.is_particles]
    pixel_sizes = [s.pixel_width_a for s in particle_sets if s.pixel_width_a]
    if not pixel_sizes:
        pixel_sizes = [s.pixel_width_a for s in entry.imagesets if s.pixel_width_a]
    counts = [s.num_images for s in particle_sets if s.num_images is not None]
    return {
        "empiar_id": entry.empiar_id,
        "partition_key": partition_key(entry.empiar_id),
        "title": entry.title,
        "status": entry.status,
        "release_date": entry.release_date,
        "update_date": entry.update_date,
        "dataset_size_bytes": entry.dataset_size_bytes,
        "experiment_type": entry.experiment_type,
        "emdb_ids": ",".join(entry.emdb_ids),
        "best_emdb_id": best_emd,
        "best_resolution_a": best_resolution,
        "ships_particles": entry.ships_particles,
        "ships_coordinates": entry.ships_coordinates,
        "is_single_particle": entry.is_single_particle,
        "mentions_particles_in_text": entry.mentions_particles_in_text,
        "not_fetchable_reason": entry.not_fetchable_reason,
        "emdb_resolutions": json.dumps({e: resolutions.get(e) for e in entry.emdb_ids}),
        "particle_images": sum(counts) if counts else None,
        "pixel_size_a": pixel_sizes[0] if pixel_sizes else None,
        "categories": "; ".join(sorted({s.category for s in entry.imagesets})),
        "doi": entry.doi,
        "error": error,
        "fetched_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def resolve_resolutions(
    emdb: EmdbClient, emd_ids: Iterable[str], cache: dict[str, float | None] | None = None
) -> tuple[dict[str, float | None], dict[str, str]]:
    """Resolution (A) of each EMDB map, and an error text per map that could not be read."""
    cache = {} if cache is None else cache
    errors: dict[str, str] = {}
    for emd in emd_ids:
        if emd in cache:
            continue
        try:
            cache[emd] = emdb.resolution_a(emd)
        except NotFoundError:
            cache[emd] = None
            errors[emd] = f"{emd} not found in EMDB"
        except ValueError as exc:
            cache[emd] = None
            errors[emd] = str(exc)
        except HttpError as exc:
            # Not cached: a later refresh asks again (rows with an error are re-fetched).
            errors[emd] = f"{emd}: {exc}"
    return cache, errors


def refresh_catalog(
    empiar: EmpiarClient,
    emdb: EmdbClient,
    previous: pd.DataFrame | None = None,
    *,
    full: bool = False,
    map_workers: int = 4,
    on_progress: Callable[[int, int], None] | None = None,
) -> CatalogRefresh:
    """Bring the catalog up to date.

    Incremental: asks the search API only for entries updated since the newest ``update_date``
    in ``previous`` (inclusive, so nothing released later on that same day is missed), plus the
    entries whose previous row carried an error. An entry whose new payload is bad keeps its
    previous row (nothing is lost) and is reported in ``errors``; so is a map whose resolution
    cannot be read. EMDB lookups (one per map, the bulk of a full refresh) run ``map_workers``
    at a time: they are latency-bound, and the client's polite delay still spaces them.
    """
    started = time.perf_counter()
    if previous is not None and previous.attrs.get(_OLDER_FILE_ATTR):
        log.info(
            "the previous catalog lacks %s (an older eligibility rule): refreshing in full",
            ", ".join(previous.attrs[_OLDER_FILE_ATTR]),
        )
        full = True
    previous = empty_catalog() if previous is None or full else previous
    since = None
    if len(previous):
        dates = previous["update_date"].dropna()
        dates = dates[dates.str.len() > 0]
        since = str(dates.max()) if len(dates) else None

    records: dict[str, Any] = dict(empiar.updated(since=since))
    retry_ids = [
        i for i in previous.loc[previous["error"].fillna("") != "", "empiar_id"] if i not in records
    ]
    # Search hits may be summaries: fetch full records for those without imagesets.
    need_full = [
        i for i, r in records.items() if not isinstance(r, dict) or "imagesets" not in r
    ] + retry_ids
    if need_full:
        records.update(empiar.entry_records(need_full))

    errors: list[str] = []
    entries: list[Entry] = []
    # Entries whose refresh failed and that keep their previous row: the row is marked with
    # the error so that the next refresh asks for them again, even once newer entries have
    # moved the update-date watermark past them (else their update would be lost for good).
    stale: dict[str, str] = {}
    for key in sorted(records):
        try:
            entries.append(parse_entry(key, records[key]))
        except EntryError as exc:
            errors.append(str(exc))
            stale[key] = str(exc)
            log.warning("skipping %s", exc)

    emd_ids = sorted({e for entry in entries for e in entry.emdb_ids})
    resolutions: dict[str, float | None] = {}
    map_errors: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=max(1, map_workers)) as pool:
        lookups = pool.map(lambda emd: resolve_resolutions(emdb, [emd]), emd_ids)
        for done, (found, failed) in enumerate(lookups, 1):
            resolutions.update(found)
            map_errors.update(failed)
            if on_progress:
                on_progress(done, len(emd_ids))

    previous_ids = set(previous["empiar_id"])
    rows = []
    for entry in entries:
        entry_errors = [
            f"{entry.empiar_id}: {map_errors[e]}" for e in entry.emdb_ids if e in map_errors
        ]
        errors.extend(entry_errors)
        unresolved = any(e not in resolutions for e in entry.emdb_ids)
        if unresolved and entry.empiar_id in previous_ids:
            # EMDB did not answer: keep the previous row rather than lose its resolution
            stale[entry.empiar_id] = "; ".join(entry_errors) or "EMDB map unresolved"
            continue
        rows.append(entry_row(entry, resolutions, "; ".join(entry_errors)))

    fresh = _typed(rows)
    kept = previous[~previous["empiar_id"].isin(fresh["empiar_id"])].copy()
    retry = kept["empiar_id"].isin(list(stale))
    if retry.any():
        kept.loc[retry, "error"] = kept.loc[retry, "empiar_id"].map(
            # map() passes the ids of these rows, which are the keys of stale
            lambda i: f"refresh failed, previous row kept: {stale[i]}"  # pyright: ignore[reportArgumentType]
        )
    table = pd.concat([kept, fresh], ignore_index=True) if len(kept) else fresh
    table = table.sort_values("empiar_id", kind="stable").reset_index(drop=True)
    return CatalogRefresh(
        table=table.astype(CATALOG_COLUMNS),
        since=since,
        updated_ids=sorted(set(fresh["empiar_id"]) & previous_ids),
        new_ids=sorted(set(fresh["empiar_id"]) - previous_ids),
        errors=errors,
        seconds=time.perf_counter() - started,
    )


def select_eligible(
    catalog: pd.DataFrame,
    max_resolution_a: float = DEFAULT_MAX_RESOLUTION_A,
    *,
    inclusive: bool = False,
    require_particles: bool = True,
) -> pd.DataFrame:
    """Entries worth using: not obsolete, best map better than ``max_resolution_a`` (strictly,
    unless ``inclusive``: the original particleSeg list kept maps at exactly 3.5 A), and (by
    default) with a fetchable particle set (single-frame particles or micrographs with
    declared coordinates, single-particle, ``not_fetchable_reason`` empty)."""
    mask = _resolution_ok(catalog, max_resolution_a, inclusive)
    if require_particles:
        mask &= _fetchable(catalog)
    return catalog[mask].reset_index(drop=True)


def select_not_fetchable(
    catalog: pd.DataFrame,
    max_resolution_a: float = DEFAULT_MAX_RESOLUTION_A,
    *,
    inclusive: bool = False,
) -> pd.DataFrame:
    """Entries that pass on status and resolution but have no fetchable particle set, with
    their ``not_fetchable_reason``: listed for people, never requested as runs."""
    mask = _resolution_ok(catalog, max_resolution_a, inclusive) & ~_fetchable(catalog)
    return catalog[mask].reset_index(drop=True)


def _resolution_ok(catalog: pd.DataFrame, max_resolution_a: float, inclusive: bool) -> pd.Series:
    status = catalog["status"].fillna("").str.upper()
    resolution = catalog["best_resolution_a"]
    good = resolution <= max_resolution_a if inclusive else resolution < max_resolution_a
    return ~status.str.startswith("OBS") & resolution.notna() & good.fillna(False)


def _fetchable(catalog: pd.DataFrame) -> pd.Series:
    ships = catalog["ships_particles"] | catalog["ships_coordinates"]
    if "not_fetchable_reason" in catalog:
        ships &= catalog["not_fetchable_reason"].fillna("") == ""
    return ships.astype(bool)


def write_parquet(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write atomically (:func:`particleseg_model.atomic.atomic_path`)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return path


def read_catalog(path: str | Path) -> pd.DataFrame | None:
    """The catalog stored at ``path``, or None when there is none yet."""
    path = Path(path)
    if not path.exists():
        return None
    frame = pd.read_parquet(path)
    missing = [c for c in CATALOG_COLUMNS if c not in frame]
    for column, dtype in CATALOG_COLUMNS.items():
        if column in _LATER_COLUMN_DEFAULTS and column not in frame:
            frame[column] = _LATER_COLUMN_DEFAULTS[column]
        elif column not in frame:
            frame[column] = pd.Series(dtype=dtype, index=frame.index)
    out = frame[list(CATALOG_COLUMNS)].astype(CATALOG_COLUMNS)
    # rows of an older file were judged by an older rule: refresh_catalog rebuilds them all
    out.attrs[_OLDER_FILE_ATTR] = [c for c in missing if c in _LATER_COLUMN_DEFAULTS]
    return out


@dataclass
class UpdateCursor:
    """Where the last look at the API stopped: the newest ``update_date`` seen, the ids seen
    with that date (the window is inclusive, so they come back and must not count as new) and
    a digest of each one's record, so that a second update of an id on that same date (the
    API's dates have no time) is found by its changed record, not missed."""

    update_date: str
    ids: list[str] = field(default_factory=list)
    digests: dict[str, str] = field(default_factory=dict)
    """id -> :func:`record_digest` of its record at ``update_date`` (empty for a cursor made
    from a stored catalog, whose records are not kept: those ids count as seen)."""

    def to_json(self) -> str:
        return json.dumps(
            {
                "update_date": self.update_date,
                "ids": sorted(self.ids),
                "digests": dict(sorted(self.digests.items())),
            }
        )

    @classmethod
    def from_json(cls, text: str | None) -> UpdateCursor | None:
        if not text:
            return None
        data = json.loads(text)
        return cls(
            update_date=data["update_date"],
            ids=list(data.get("ids", [])),
            digests=dict(data.get("digests", {})),
        )

    @classmethod
    def from_catalog(cls, catalog: pd.DataFrame | None) -> UpdateCursor | None:
        if catalog is None or not len(catalog):
            return None
        newest = str(catalog["update_date"].max())
        return cls(newest, catalog.loc[catalog["update_date"] == newest, "empiar_id"].tolist())


def record_digest(record: Any) -> str:
    """A short fingerprint of an entry's search record (sha1 of its sorted JSON)."""
    text = json.dumps(record, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def find_updates(
    empiar: EmpiarClient, cursor: UpdateCursor | None
) -> tuple[list[str], UpdateCursor | None]:
    """Entries created or updated since ``cursor`` (one search query, no EMDB call), and the
    cursor to store next. Nothing new gives an empty list and the same cursor.

    The window starts at the cursor's date, inclusive: an id seen on that date counts again
    when its record differs from the digest the cursor keeps (a second update the same day).
    """
    since = cursor.update_date if cursor else None
    seen = set(cursor.ids) if cursor else set()
    digests = dict(cursor.digests) if cursor else {}
    changed: list[str] = []
    newest = since or ""
    at_newest: set[str] = set(seen)
    newest_digests = dict(digests)
    for empiar_id, record in empiar.updated(since=since):
        date = (
            str(record.get("update_date") or record.get("release_date") or "")[:10]
            if isinstance(record, dict)
            else ""
        )
        digest = record_digest(record)
        known = digests.get(empiar_id)
        again = date == since and known is not None and known != digest
        if since is None or date > since or empiar_id not in seen or again:
            changed.append(empiar_id)
        if date > newest:
            newest, at_newest, newest_digests = date, {empiar_id}, {empiar_id: digest}
        elif date == newest:
            at_newest.add(empiar_id)
            newest_digests[empiar_id] = digest
    if not changed:
        return [], cursor
    kept = {k: v for k, v in newest_digests.items() if k in at_newest}
    return sorted(changed), UpdateCursor(newest, sorted(at_newest), kept)
