"""A local EMPIAR/EMDB mirror directory: what the loopback server serves and ``file://`` reads.

Layout (all JSON exactly as the public APIs return it)::

    ROOT/empiar/EMPIAR-10028.json  {"EMPIAR-10028": {...}}  GET /empiar/api/entry/10028
    ROOT/emdb/EMD-2660.json        {...EMDB entry...}       GET /emdb/api/entry/EMD-2660
    ROOT/archive/10028/data/...    the entry's files        /empiar/world_availability/10028/...
    ROOT/emdb_files/structures/EMD-2660/map/emd_2660.map.gz   /pub/databases/emdb/structures/...
                 .../EMD-2660/header/emd-2660.xml, other/ (half maps), masks/

The ``emdb_files`` tree is EMDB's own file layout (``ftp.ebi.ac.uk/pub/databases/emdb``): the
map gzipped, the header XML, half maps under ``other/`` and masks under ``masks/``.

The search (``/emdb/api/empiar/search/<solr query>``) is answered from the entry files; the query
language understood is the part the platform uses: terms joined by ``AND`` among
``database:EMPIAR``, ``*`` / ``*:*``, ``empiar_id:10028`` (or ``EMPIAR-10028``) and date ranges
``update_date:[FROM TO UNTIL]`` / ``release_date:[...]`` with ``*`` for an open end.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from particleseg_model.atomic import atomic_path, atomic_write_text

__all__ = ["Mirror", "emdb_header_xml", "parse_id_list", "parse_query"]

log = logging.getLogger("particleseg.mirror")

_RANGE = re.compile(r"^(update_date|release_date):\[\s*(\S+)\s+TO\s+(\S+)\s*\]$", re.I)
_ID_TERM = re.compile(r"^(?:empiar_id:)?(?:EMPIAR-)?(\d+)$", re.I)
_ENTRY_FILE = re.compile(r"^EMPIAR-(\d+)\.json$")


def _entry_key(empiar_id: str | int) -> str:
    text = str(empiar_id).strip().upper()
    if text.startswith("EMPIAR-"):
        text = text[7:]
    if not text.isdigit():
        raise KeyError(f"not an EMPIAR id: {empiar_id!r}")
    return f"EMPIAR-{int(text):05d}"


def _emd_key(emd_id: str | int) -> str:
    text = str(emd_id).strip().upper().replace("EMD_", "EMD-")
    if text.startswith("EMD-"):
        text = text[4:]
    if not text.isdigit():
        raise KeyError(f"not an EMDB id: {emd_id!r}")
    return f"EMD-{int(text):04d}"


_ANGSTROM = "\u00c5"


def _emd_number(emd_id: str | int) -> str:
    return _emd_key(emd_id)[4:]


def emdb_header_xml(
    emd_id: str | int,
    *,
    resolution_a: float | None = None,
    voxel_size_a: float | None = None,
    box: Sequence[int] | None = None,
) -> str:
    """A minimal EMDB header XML (schema v3 element names) for a mirror: ``<emd emdb_id=..>``
    with ``final_reconstruction/resolution`` (Angstrom), ``map/dimensions`` (col, row, sec)
    and ``map/pixel_spacing`` (x, y, z in Angstrom); absent values are left out."""
    key = _emd_key(emd_id)
    lines = ['<?xml version="1.0" encoding="UTF-8"?>', f'<emd emdb_id="{key}" version="3.0.0.0">']
    if resolution_a is not None:
        lines += [
            "  <structure_determination_list>",
            "    <structure_determination>",
            "      <method>singleParticle</method>",
            "      <singleparticle_processing>",
            "        <final_reconstruction>",
            f'          <resolution res_type="BY AUTHOR" units="{_ANGSTROM}">'
            f"{resolution_a:g}</resolution>",
            "        </final_reconstruction>",
            "      </singleparticle_processing>",
            "    </structure_determination>",
            "  </structure_determination_list>",
        ]
    lines.append("  <map>")
    lines.append(f"    <file>emd_{_emd_number(key)}.map.gz</file>")
    if box is not None:
        col, row, sec = (int(n) for n in box)
        lines += [
            "    <dimensions>",
            f"      <col>{col}</col>",
            f"      <row>{row}</row>",
            f"      <sec>{sec}</sec>",
            "    </dimensions>",
        ]
    if voxel_size_a is not None:
        lines.append("    <pixel_spacing>")
        lines += [f'      <{a} units="{_ANGSTROM}">{voxel_size_a:g}</{a}>' for a in "xyz"]
        lines.append("    </pixel_spacing>")
    lines += ["  </map>", "</emd>", ""]
    return "\n".join(lines)


def parse_id_list(spec: str) -> list[str]:
    """``"10050, 10054, 10060-10072"`` -> EMPIAR ids (the POST endpoint's id list)."""
    ids: list[str] = []
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        low, sep, high = part.partition("-")
        if sep and low.upper() != "EMPIAR":
            if not (low.isdigit() and high.isdigit()) or int(high) < int(low):
                raise ValueError(f"bad id range {part!r}")
            if int(high) - int(low) > 100_000:
                raise ValueError(f"id range {part!r} is too wide")
            ids.extend(f"EMPIAR-{n:05d}" for n in range(int(low), int(high) + 1))
        else:
            try:
                ids.append(_entry_key(part))
            except KeyError as exc:
                raise ValueError(f"bad id {part!r}") from exc
    return ids


def parse_query(query: str) -> list[tuple[str, str, str]]:
    """The query's conditions as ``(field, low, high)``; ``("id", n, n)`` for an id term."""
    conditions: list[tuple[str, str, str]] = []
    text = query.strip()
    if not text:
        raise ValueError("empty search query")
    for term in re.split(r"\s+AND\s+", text, flags=re.I):
        term = term.strip().strip("()")
        if term in ("*", "*:*") or term.lower() == "database:empiar":
            continue
        if match := _RANGE.match(term):
            conditions.append((match.group(1).lower(), match.group(2), match.group(3)))
        elif match := _ID_TERM.match(term):
            key = _entry_key(match.group(1))
            conditions.append(("id", key, key))
        else:
            raise ValueError(f"unsupported search term {term!r} in {query!r}")
    return conditions


def _date(value: Any) -> str:
    return str(value or "")[:10]


def _matches(key: str, record: Any, conditions: list[tuple[str, str, str]]) -> bool:
    for field_name, low, high in conditions:
        if field_name == "id":
            if key != low:
                return False
            continue
        value = _date(record.get(field_name) if isinstance(record, dict) else None)
        if not value:
            return False
        if low != "*" and value < _date(low):
            return False
        if high != "*" and value > _date(high):
            return False
    return True


class Mirror:
    """Read and write a mirror directory (see the module docstring for the layout)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._index: dict[str, tuple[int, int, Any]] = {}  # key -> (mtime_ns, size, record)
        self._lock = threading.Lock()

    # -- paths ------------------------------------------------------------------------------
    def entry_path(self, empiar_id: str | int) -> Path:
        return self.root / "empiar" / f"{_entry_key(empiar_id)}.json"

    def emdb_path(self, emd_id: str | int) -> Path:
        return self.root / "emdb" / f"{_emd_key(emd_id)}.json"

    def archive_path(self, relative: str) -> Path:
        """A file or directory under ``ROOT/archive``; refuses paths that climb out of it."""
        base = (self.root / "archive").resolve()
        parts = [p for p in relative.replace("\\", "/").split("/") if p not in ("", ".")]
        if any(p == ".." for p in parts):
            raise KeyError(f"path climbs out of the archive: {relative!r}")
        return base.joinpath(*parts)

    def emdb_files_path(self, relative: str) -> Path:
        """A file or directory under ``ROOT/emdb_files`` (EMDB's file layout, ``structures/
        EMD-<n>/...``); refuses paths that climb out of it."""
        base = (self.root / "emdb_files").resolve()
        parts = [p for p in relative.replace("\\", "/").split("/") if p not in ("", ".")]
        if any(p == ".." for p in parts):
            raise KeyError(f"path climbs out of the EMDB files: {relative!r}")
        return base.joinpath(*parts)

    def emdb_structure_path(self, emd_id: str | int) -> Path:
        """``ROOT/emdb_files/structures/EMD-<n>``."""
        return self.emdb_files_path(f"structures/{_emd_key(emd_id)}")

    # -- EMPIAR entries ---------------------------------------------------------------------
    def entry_ids(self) -> list[str]:
        folder = self.root / "empiar"
        if not folder.is_dir():
            return []
        return sorted(
            f"EMPIAR-{m.group(1)}" for name in os.listdir(folder) if (m := _ENTRY_FILE.match(name))
        )

    def entry_bytes(self, empiar_id: str | int) -> bytes:
        """The entry file as stored (KeyError when absent)."""
        path = self.entry_path(empiar_id)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise KeyError(_entry_key(empiar_id)) from exc

    def entry(self, empiar_id: str | int) -> dict[str, Any]:
        """``{"EMPIAR-x": record}`` (KeyError when absent, ValueError naming the file if broken)."""
        path = self.entry_path(empiar_id)
        raw = self.entry_bytes(empiar_id)
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"{path}: invalid JSON ({exc})") from exc

    def _record(self, key: str) -> Any:
        """The inner record of an entry, re-read only when its file changed."""
        path = self.entry_path(key)
        stat = path.stat()
        with self._lock:
            cached = self._index.get(key)
            if cached and cached[0] == stat.st_mtime_ns and cached[1] == stat.st_size:
                return cached[2]
        wrapped = self.entry(key)
        record = (
            wrapped.get(key, next(iter(wrapped.values()), None))
            if isinstance(wrapped, dict)
            else wrapped
        )
        with self._lock:
            self._index[key] = (stat.st_mtime_ns, stat.st_size, record)
        return record

    def entries(self, spec: str) -> dict[str, Any]:
        """Records of the ids in ``spec`` (``"10050,10054,10060-10072"``); absent ids skipped."""
        found: dict[str, Any] = {}
        for key in parse_id_list(spec):
            try:
                found[key] = self._record(key)
            except (FileNotFoundError, KeyError):
                continue
            except ValueError as exc:
                log.warning("skipping %s", exc)
        return found

    def search(self, query: str, rows: int = 100, page: int = 1) -> dict[str, Any]:
        """One page of matching entries, keyed by id in ascending order; ``{}`` past the end."""
        if rows < 1 or page < 1:
            raise ValueError(f"rows and page must be positive (rows={rows}, page={page})")
        conditions = parse_query(query)
        matched: list[tuple[str, Any]] = []
        for key in self.entry_ids():
            try:
                record = self._record(key)
            except FileNotFoundError:
                continue
            except ValueError as exc:
                log.warning("search skips %s", exc)
                continue
            if _matches(key, record, conditions):
                matched.append((key, record))
        start = (page - 1) * rows
        return dict(matched[start : start + rows])

    def put_entry(self, empiar_id: str | int, record: Any) -> Path:
        key = _entry_key(empiar_id)
        path = self.entry_path(key)
        atomic_write_text(path, json.dumps({key: record}, ensure_ascii=False, indent=1))
        return path

    def put_entry_text(self, empiar_id: str | int, text: str) -> Path:
        """Store an entry file verbatim (malformed fixtures)."""
        path = self.entry_path(empiar_id)
        atomic_write_text(path, text)
        return path

    # -- EMDB ---------------------------------------------------------------------------------
    def emdb_entry(self, emd_id: str | int) -> dict[str, Any]:
        path = self.emdb_path(emd_id)
        try:
            raw = path.read_bytes()
        except FileNotFoundError as exc:
            raise KeyError(_emd_key(emd_id)) from exc
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"{path}: invalid JSON ({exc})") from exc

    def put_emdb(self, emd_id: str | int, record: Any) -> Path:
        path = self.emdb_path(emd_id)
        atomic_write_text(path, json.dumps(record, ensure_ascii=False, indent=1))
        return path

    # -- EMDB files -------------------------------------------------------------------------
    def put_emdb_map(
        self,
        emd_id: str | int,
        source: str | os.PathLike | bytes,
        *,
        header_xml: str | None = None,
        half_maps: Sequence[str | os.PathLike | bytes] = (),
        masks: Sequence[str | os.PathLike | bytes] = (),
    ) -> Path:
        """Put a map into the EMDB file layout: ``structures/EMD-<n>/map/emd_<n>.map.gz``.

        Parameters
        ----------
        emd_id
            ``"EMD-1832"``, ``1832``, ...
        source
            The uncompressed map (an MRC file's path or its bytes); it is gzipped with
            ``mtime=0`` and no file name, so equal maps give equal bytes.
        header_xml
            The header XML's text (``header/emd-<n>.xml``, see :func:`emdb_header_xml`);
            None writes no header, as for an entry whose header is missing.
        half_maps, masks
            Further maps: ``other/emd_<n>_half_map_<k>.map.gz`` (gzipped, as EMDB ships them)
            and ``masks/emd_<n>_msk_<k>.map`` (uncompressed, as EMDB ships them), k from 1.

        Returns
        -------
        Path
            The ``.map.gz`` written. Every file is written atomically.
        """
        key = _emd_key(emd_id)
        number = _emd_number(key)
        folder = self.emdb_structure_path(key)
        target = folder / "map" / f"emd_{number}.map.gz"
        _write_gzip(source, target)
        if header_xml is not None:
            atomic_write_text(folder / "header" / f"emd-{number}.xml", header_xml)
        for k, half in enumerate(half_maps, 1):
            _write_gzip(half, folder / "other" / f"emd_{number}_half_map_{k}.map.gz")
        for k, mask in enumerate(masks, 1):
            out = folder / "masks" / f"emd_{number}_msk_{k}.map"
            with atomic_path(out) as tmp:
                if isinstance(mask, bytes):
                    tmp.write_bytes(mask)
                else:
                    shutil.copyfile(mask, tmp)
        return target


def _write_gzip(source: str | os.PathLike | bytes, target: Path) -> None:
    """Gzip ``source`` (bytes or a file, streamed) into ``target`` atomically, deterministically
    (``mtime=0``, no name in the gzip header, level 6)."""
    with (
        atomic_path(target) as tmp,
        open(tmp, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as out,
    ):
        if isinstance(source, bytes):
            out.write(source)
        else:
            with open(source, "rb") as handle:
                shutil.copyfileobj(handle, out, 1 << 20)
