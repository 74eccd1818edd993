"""RELION STAR particle files: every flavour read into one canonical particle table.

Reads RELION 3.0 (no optics block; ``rlnOriginX/Y`` in *pixels*), 3.1/4.0 (``data_optics`` before
or after ``data_particles``, joined per particle through ``rlnOpticsGroup``; ``rlnOriginX/YAngst``
in Angstrom) and 5.0 (``# version 50001``), and writes RELION 3.1-format files (optics block,
Angstrom origins, ``# version 30001`` stamps; a 5.0 file keeps its ``50001`` stamp).

Conventions of the canonical table (:data:`CANONICAL_COLUMNS`):

- Euler angles are RELION's ZYZ (rot, tilt, psi), in degrees, as written in the file.
- Origins are in Angstrom; pixel origins are multiplied by the particle's pixel size.
- Pixel sizes are Angstrom per pixel of the particle image; coordinates are micrograph pixels.
- Defocus is in Angstrom, voltage in kV, spherical aberration in mm.
- ``image_index`` is RELION's 1-based position in the stack named by ``stack_path``.
- A quantity the file does not give is NaN (``<NA>`` in the nullable integer columns).

The original blocks are kept with their RELION column names, so :func:`write_star` loses nothing.
"""

from __future__ import annotations

import csv
import linecache
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import starfile

from particleseg_model.atomic import atomic_path, atomic_write_text

__all__ = [
    "CANONICAL_COLUMNS",
    "ParticleStar",
    "StarError",
    "format_loop_blocks",
    "has_poses",
    "read_star",
    "split_image_name",
    "write_loop_blocks",
    "write_star",
    "write_star_as_read",
]

CANONICAL_COLUMNS: tuple[str, ...] = (
    "image_name",  # str, "N@stack" exactly as in the file
    "image_index",  # int64, 1-based N
    "stack_path",  # str, the stack path as written (relative to the project directory)
    "rot_deg",
    "tilt_deg",
    "psi_deg",
    "origin_x_a",  # Angstrom
    "origin_y_a",  # Angstrom
    "pixel_size_a",  # Angstrom per pixel
    "image_size_px",  # Int64, box size
    "optics_group",  # int64
    "defocus_u_a",
    "defocus_v_a",
    "defocus_angle_deg",
    "voltage_kv",
    "spherical_aberration_mm",
    "amplitude_contrast",
    "micrograph_name",  # str
    "coordinate_x_px",
    "coordinate_y_px",
    "class_number",  # Int64
    "random_subset",  # Int64
)

# canonical pose columns and the RELION labels write_star maps them back to
_ANGLE_LABELS = {"rot_deg": "rlnAngleRot", "tilt_deg": "rlnAngleTilt", "psi_deg": "rlnAnglePsi"}
_ORIGIN_AXES = {"origin_x_a": "X", "origin_y_a": "Y"}

# Per-particle or per-optics-group quantities copied as they are: canonical name -> label.
_FLOAT_LABELS = {
    "defocus_u_a": "rlnDefocusU",
    "defocus_v_a": "rlnDefocusV",
    "defocus_angle_deg": "rlnDefocusAngle",
    "voltage_kv": "rlnVoltage",
    "spherical_aberration_mm": "rlnSphericalAberration",
    "amplitude_contrast": "rlnAmplitudeContrast",
    "coordinate_x_px": "rlnCoordinateX",
    "coordinate_y_px": "rlnCoordinateY",
}
_INT_LABELS = {
    "image_size_px": "rlnImageSize",
    "class_number": "rlnClassNumber",
    "random_subset": "rlnRandomSubset",
}

# Names that look like numbers (e.g. micrograph "0001") must stay text, exactly as written.
_TEXT_LABELS = [
    "rlnImageName",
    "rlnImageOriginalName",
    "rlnReconstructImageName",
    "rlnMicrographName",
    "rlnMicrographNameNoDW",
    "rlnMicrographMovieName",
    "rlnMicrographMetadata",
    "rlnOpticsGroupName",
    "rlnGroupName",
    "rlnMtfFileName",
    "rlnCtfImage",
    "rlnTomoName",
    "rlnTomoParticleName",
]

# Labels that only RELION 5 writes (tomography particles); the "# version 50001" comment is the
# usual marker, these catch files whose comments were stripped.
_RELION5_LABELS = {
    "rlnTomoName",
    "rlnTomoParticleName",
    "rlnTomoSubtomogramBinning",
    "rlnTomoVisibleFrames",
    "rlnCenteredCoordinateXAngst",
    "rlnCenteredCoordinateYAngst",
    "rlnCenteredCoordinateZAngst",
}

# RELION 3.1+ stamps every block with "# version 30001" (3.1 and 4.0) or "# version 50001" (5.0).
# Other comments ("# RELION; version 3.0.6", "# Created by the starfile Python package
# (version 0.5)") are not stamps and change nothing.
_VERSION_STAMP = re.compile(r"^#\s*version\s+(\S+)\s*$", re.MULTILINE)
_STAMP_VERSIONS = {3: "3.1", 4: "3.1", 5: "5.0"}  # stamp // 10000 -> flavour
_WRITE_STAMPS = {"3.1": "30001", "5.0": "50001"}
_IMAGE_NAME = re.compile(r"^(\d+)@(.+)$")

# DataFrame.attrs key marking a one-row table read from a key-value block (data_general, ...):
# write_star writes such a block back as key-value pairs
_PAIRS_ATTR = "star_key_value_block"


class StarError(ValueError):
    """A STAR file that cannot be read or written as particles; the message names the file."""


@dataclass
class ParticleStar:
    """A particle STAR file: the canonical table plus everything needed to write it back.

    Attributes:
        particles: canonical particle table (:data:`CANONICAL_COLUMNS`), one row per row of the
            particle block, same index.
        optics: the optics block as read (RELION column names), None when the file has none.
        version: RELION flavour of the file: "3.0", "3.1" (also 4.0) or "5.0".
        source: the file read.
        blocks: every block of the file with its original RELION columns, by block name
            ("" for a bare ``data_``).
        particles_block: name of the particle block ("particles", "images", "", ...).
    """

    particles: pd.DataFrame
    optics: pd.DataFrame | None
    version: str
    source: Path
    blocks: dict[str, pd.DataFrame] = field(default_factory=dict)
    particles_block: str = "particles"


def split_image_name(name: str) -> tuple[int, str]:
    """Split a RELION image name ``N@stack.mrcs`` into ``(N, "stack.mrcs")``; N is 1-based.

    Raises ValueError for anything else (no ``@``, N not a positive integer, empty path).
    """
    match = _IMAGE_NAME.match(str(name).strip())
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"malformed image name {name!r} (expected N@stack with N >= 1)")
    return int(match.group(1)), match.group(2)


def has_poses(particles: pd.DataFrame) -> bool:
    """True if the table is non-empty and every row has finite rot/tilt/psi and origins."""
    cols = [*_ANGLE_LABELS, *_ORIGIN_AXES]
    if len(particles) == 0 or any(c not in particles for c in cols):
        return False
    values = particles[cols].to_numpy(dtype=float, na_value=np.nan)
    return bool(np.isfinite(values).all())


# --------------------------------------------------------------------------------------- reading


def read_star(path: str | os.PathLike) -> ParticleStar:
    """Read a RELION 3.0, 3.1/4.0 or 5.0 particle STAR file into a :class:`ParticleStar`.

    Origins in pixels (``rlnOriginX``) are converted to Angstrom with the particle's pixel size,
    taken from ``rlnImagePixelSize``, else ``rlnPixelSize``, else
    ``rlnDetectorPixelSize * 10000 / rlnMagnification`` (detector pixel in micrometres).
    For a file without optics groups, ``optics_group`` numbers the distinct combinations of
    voltage, Cs, amplitude contrast, pixel size and box size (1, 2, ... in order of appearance),
    the groups :func:`write_star` creates when converting to 3.1.

    The flavour comes from RELION's ``# version NNNNN`` stamps (30001: 3.1/4.0, 50001: 5.0),
    else from the layout (an optics block, ``rlnOpticsGroup`` or Angstrom origins: 3.1), with
    RELION 5 tomography labels forcing 5.0.

    Raises:
        StarError: the file is missing, empty or not STAR; an unknown version stamp; the last
            row cut short (truncated file); no block has ``rlnImageName`` or several do; an
            image name is not ``N@stack``; a particle's optics group has no optics row; pixel
            origins without a pixel size; a non-numeric value in a numeric column.
    """
    path = Path(path)
    if not path.is_file():
        raise StarError(f"{path}: STAR file not found")
    if path.stat().st_size == 0:
        raise StarError(f"{path}: empty file, no data blocks")
    try:
        # always_dict=True: a dict of blocks (starfile's return type also allows one block)
        raw: dict[str, Any] = starfile.read(  # pyright: ignore[reportAssignmentType]
            path, always_dict=True, parse_as_string=_TEXT_LABELS
        )
    except TypeError as exc:  # starfile's parser finds nothing after a "data_x" line
        raise StarError(
            f"{path}: cannot parse as STAR: a data_ block has no loop_ and no values"
        ) from exc
    except Exception as exc:  # starfile raises bare pandas/ValueErrors on malformed loops
        raise StarError(f"{path}: cannot parse as STAR: {str(exc).strip()}") from exc
    finally:
        # starfile reads lines through linecache and clears it only when parsing succeeds: a
        # failed parse would leave the old lines there for the next read of the same path
        linecache.clearcache()
    if not raw:
        raise StarError(f"{path}: no data blocks (empty or not a STAR file)")

    blocks: dict[str, pd.DataFrame] = {}
    for name, block in raw.items():
        if isinstance(block, pd.DataFrame):
            blocks[name] = block
        elif isinstance(block, dict):
            # key-value blocks (data_general, ...) become one-row tables, marked for write_star
            table = pd.DataFrame([block])
            table.attrs[_PAIRS_ATTR] = True
            blocks[name] = table
        else:
            raise StarError(f"{path}: block data_{name} is malformed (no loop_ and no values)")
    _check_labels(path, blocks)
    _check_last_row(path, blocks)
    _check_short_rows(path, blocks)

    particles_block = _find_particles_block(blocks, path)
    parts = blocks[particles_block]
    optics = blocks.get("optics") if particles_block != "optics" else None
    version = _detect_version(path, blocks, particles_block, optics)
    table = _canonical_table(parts, optics, f"{path} (data_{particles_block})", path)
    return ParticleStar(
        particles=table,
        optics=optics,
        version=version,
        source=path,
        blocks=blocks,
        particles_block=particles_block,
    )


def _check_labels(path: Path, blocks: dict[str, pd.DataFrame]) -> None:
    """A label given twice in one block: RELION keeps one of the two columns silently; refuse
    it, naming the label."""
    for name, block in blocks.items():
        twice = block.columns[block.columns.duplicated()]
        if len(twice):
            labels = ", ".join(dict.fromkeys(f"_{label}" for label in twice))
            raise StarError(
                f"{path}: data_{name} names the column {labels} more than once; "
                "each label may appear once in a block"
            )


def _row_lines(path: Path, block: str) -> list[tuple[int, str]]:
    """(line number, text) of each data row of the loop of ``data_<block>``, in order."""
    rows: list[tuple[int, str]] = []
    current, state = None, ""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, raw in enumerate(fh, start=1):
            line = raw.strip()
            if line.startswith("data_"):
                if current == block and state == "rows":
                    break
                current, state = line[5:], ""
                continue
            if current != block or not line or line.startswith("#"):
                continue
            if line.startswith("loop_"):
                state = "labels"
            elif line.startswith("_"):
                if state == "rows":
                    break
            elif state in ("labels", "rows"):
                state = "rows"
                rows.append((number, line))
    return rows


def _values(line: str) -> int:
    """How many values a loop row holds (quoted values count once)."""
    if '"' not in line and "'" not in line:
        return len(line.split("#", 1)[0].split())
    try:
        return len(shlex.split(line, comments=True))
    except ValueError:  # an unbalanced quote: count plain words instead
        return len(line.split("#", 1)[0].split())


def _check_short_rows(path: Path, blocks: dict[str, pd.DataFrame]) -> None:
    """A row with fewer values than the loop has labels reads as values shifted into NaN
    (RELION refuses such a file): refuse it, naming the row. Only rows whose last value is
    missing are looked up in the file, so a normal file is not read again."""
    for name, block in blocks.items():
        if block.attrs.get(_PAIRS_ATTR) or block.shape[1] < 2:
            continue
        suspects = np.flatnonzero(block.iloc[:, -1].isna().to_numpy())
        if not len(suspects):
            continue
        lines = _row_lines(path, name)
        if len(lines) != len(block):
            continue  # a layout this scan does not follow; starfile's table stands
        for row in suspects:
            number, text = lines[row]
            count = _values(text)
            if count < block.shape[1]:
                raise StarError(
                    f"{path}: data_{name}, row {row + 1} (line {number}) has {count} of "
                    f"{block.shape[1]} values (the labels' count): a value is missing "
                    "(RELION refuses such a file)"
                )


def _check_last_row(path: Path, blocks: dict[str, pd.DataFrame]) -> None:
    """A file cut in the middle of its last row reads as NaN-padded values: refuse it.

    Only the last row of the last loop is checked (the tail of the file), which catches a
    truncated download or copy; pandas already refuses rows with too many values.
    """
    last_name, last = next(reversed(blocks.items()))
    if last.attrs.get(_PAIRS_ATTR) or last.shape[1] == 0:
        return
    size = path.stat().st_size
    with open(path, "rb") as fh:
        fh.seek(max(0, size - 65536))
        tail = fh.read().decode("utf-8", errors="replace")
    for line in reversed(tail.splitlines()):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("_", "data_", "loop_")):
            return
        try:
            values = shlex.split(line, comments=True)
        except ValueError:  # an unbalanced quote: count plain words instead
            values = line.split("#", 1)[0].split()
        if 0 < len(values) < last.shape[1]:
            raise StarError(
                f"{path}: truncated file: the last row of data_{last_name} has "
                f"{len(values)} of {last.shape[1]} values"
            )
        return


def _find_particles_block(blocks: dict[str, pd.DataFrame], path: Path) -> str:
    with_images = [name for name, df in blocks.items() if "rlnImageName" in df.columns]
    if not with_images:
        names = ", ".join(f"data_{n}" for n in blocks)
        raise StarError(
            f"{path}: no particle block: no block has an rlnImageName column (blocks: {names})"
        )
    if "particles" in with_images:
        return "particles"
    if len(with_images) == 1:
        return with_images[0]
    names = ", ".join(f"data_{n}" for n in with_images)
    raise StarError(
        f"{path}: ambiguous layout: several blocks have rlnImageName ({names}) "
        "and none is data_particles"
    )


def _detect_version(
    path: Path, blocks: dict[str, pd.DataFrame], particles_block: str, optics: pd.DataFrame | None
) -> str:
    parts = blocks[particles_block]
    structural = (
        "3.1"
        if (
            optics is not None
            or "rlnOpticsGroup" in parts
            or "rlnOriginXAngst" in parts
            or "rlnOriginYAngst" in parts
        )
        else "3.0"
    )
    stamped = _stamped_version(path)
    if stamped == "5.0" or any(_RELION5_LABELS & set(df.columns) for df in blocks.values()):
        return "5.0"
    return stamped or structural


def _stamped_version(path: Path) -> str | None:
    """The flavour named by the file's ``# version NNNNN`` stamps; None when it has none.

    RELION writes a stamp before every block; the first ones are in the head of the file, but
    the optics block may come last, so the tail is read too (both at most 64 KiB).
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        text = fh.read(65536)
        if size > 65536:
            fh.seek(max(65536, size - 65536))
            text += b"\n" + fh.read()
    found: list[str] = []
    for match in _VERSION_STAMP.finditer(text.decode("utf-8", errors="replace")):
        stamp = match.group(1)
        flavour = (
            _STAMP_VERSIONS.get(int(stamp) // 10000) if re.fullmatch(r"\d{5}", stamp) else None
        )
        if flavour is None:
            raise StarError(
                f"{path}: unknown STAR version stamp '# version {stamp}' (known: "
                "30001 = RELION 3.1/4.0, 50001 = RELION 5.0)"
            )
        found.append(flavour)
    return max(found, key=float) if found else None


def _num(values: pd.Series, label: str, where: str) -> pd.Series:
    """Column as float64; text that is not a number is an error, not a silent NaN."""
    out = pd.to_numeric(values, errors="coerce").astype(float)
    bad = out.isna() & values.notna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise StarError(
            f"{where}: column {label}, row {row + 1}: not a number: {values.iloc[row]!r}"
        )
    return out


def _text(values: pd.Series | None, like: pd.Series) -> pd.Series:
    """Text column with the dtype of ``like`` (pandas' string dtype), missing values NaN."""
    if values is None:
        return pd.Series(np.nan, index=like.index, dtype=like.dtype)
    return values.astype(str).where(values.notna(), np.nan).astype(like.dtype)


def _rows(mask: np.ndarray, limit: int = 5) -> str:
    rows = [str(i + 1) for i in np.flatnonzero(mask)[:limit]]
    more = int(mask.sum()) - len(rows)
    return ", ".join(rows) + (f" and {more} more" if more > 0 else "")


def _per_particle_optics(
    parts: pd.DataFrame, optics: pd.DataFrame | None, where: str, path: Path
) -> tuple[pd.Series | None, pd.DataFrame | None]:
    """Each particle's optics group and its optics row (None, None for a file without groups)."""
    index = parts.index
    if "rlnOpticsGroup" in parts:
        groups = _num(parts["rlnOpticsGroup"], "rlnOpticsGroup", where)
        if groups.isna().any() or (groups != groups.round()).any():
            raise StarError(
                f"{where}: rlnOpticsGroup is missing or not an integer in rows "
                f"{_rows((groups.isna() | (groups != groups.round())).to_numpy())}"
            )
        groups = groups.astype(np.int64)
    elif optics is not None and len(optics) == 1:
        # a single optics group applies to every particle even if they do not name it
        value = optics["rlnOpticsGroup"].iloc[0] if "rlnOpticsGroup" in optics else 1
        groups = pd.Series(int(value), index=index, dtype=np.int64)
    elif optics is not None:
        raise StarError(
            f"{where}: ambiguous layout: {len(optics)} optics groups but the "
            "particles have no rlnOpticsGroup column"
        )
    else:
        return None, None
    if optics is None:
        return groups, None

    optics_where = f"{path} (data_optics)"
    if "rlnOpticsGroup" in optics:
        keys = _num(optics["rlnOpticsGroup"], "rlnOpticsGroup", optics_where)
    elif len(optics) == 1:
        keys = pd.Series([1.0])  # RELION numbers groups from 1
    else:
        raise StarError(
            f"{optics_where}: ambiguous layout: {len(optics)} optics rows but no "
            "rlnOpticsGroup column"
        )
    if keys.duplicated().any():
        dup = sorted({int(k) for k in keys[keys.duplicated()]})
        raise StarError(f"{optics_where}: optics group(s) {dup} appear more than once")
    known = set(keys.astype(np.int64).tolist())
    missing = sorted(set(groups.tolist()) - known)
    if missing:
        rows = _rows(groups.isin(missing).to_numpy())
        raise StarError(
            f"{path}: rlnOpticsGroup {', '.join(map(str, missing))} (particle rows "
            f"{rows}) has no row in data_optics (groups there: {sorted(known)})"
        )
    table = optics.copy()
    table.index = keys.astype(np.int64).to_numpy()
    per_particle = table.loc[groups.to_numpy()]
    per_particle.index = index
    return groups, per_particle


def _canonical_table(
    parts: pd.DataFrame, optics: pd.DataFrame | None, where: str, path: Path
) -> pd.DataFrame:
    index = parts.index
    nan = pd.Series(np.nan, index=index, dtype=float)

    names = parts["rlnImageName"].astype(str).str.strip()
    split = names.str.extract(_IMAGE_NAME.pattern)
    image_index = pd.to_numeric(split[0], errors="coerce")
    bad = (split[1].isna() | image_index.isna() | (image_index < 1)).to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise StarError(
            f"{where}: row {row + 1}: malformed rlnImageName "
            f"{parts['rlnImageName'].iloc[row]!r} (expected N@stack with N >= 1)"
            + (f"; {int(bad.sum())} rows are malformed" if bad.sum() > 1 else "")
        )

    groups, optics_rows = _per_particle_optics(parts, optics, where, path)

    def lookup(label: str) -> pd.Series:
        # a value in the particle block overrides the particle's optics group
        out = nan
        if optics_rows is not None and label in optics_rows:
            out = _num(optics_rows[label], label, f"{path} (data_optics)")
        if label in parts:
            own = _num(parts[label], label, where)
            out = own.where(own.notna(), out)
        return out

    det, mag = lookup("rlnDetectorPixelSize"), lookup("rlnMagnification")
    from_detector = (det * 1e4 / mag).where(mag > 0)
    pixel = lookup("rlnImagePixelSize").fillna(lookup("rlnPixelSize")).fillna(from_detector)

    table = pd.DataFrame(index=index)
    table["image_name"] = names
    table["image_index"] = image_index.astype(np.int64)
    table["stack_path"] = split[1]
    for col, label in _ANGLE_LABELS.items():
        table[col] = _num(parts[label], label, where) if label in parts else nan
    for col, axis in _ORIGIN_AXES.items():
        table[col] = _origin_angstrom(parts, axis, pixel, where)
    table["pixel_size_a"] = pixel
    table["image_size_px"] = lookup("rlnImageSize").round().astype("Int64")
    for col, label in _FLOAT_LABELS.items():
        table[col] = lookup(label)
    if groups is None:
        keys = table[
            [
                "voltage_kv",
                "spherical_aberration_mm",
                "amplitude_contrast",
                "pixel_size_a",
                "image_size_px",
            ]
        ].astype(float)
        groups = keys.groupby(list(keys.columns), dropna=False, sort=False).ngroup() + 1
    table["optics_group"] = groups.astype(np.int64)
    micrographs = parts.get("rlnMicrographName")
    table["micrograph_name"] = _text(micrographs, table["image_name"])
    for col in ("class_number", "random_subset"):
        table[col] = lookup(_INT_LABELS[col]).round().astype("Int64")
    return table[list(CANONICAL_COLUMNS)]


def _origin_angstrom(parts: pd.DataFrame, axis: str, pixel: pd.Series, where: str) -> pd.Series:
    angst, px = f"rlnOrigin{axis}Angst", f"rlnOrigin{axis}"
    if angst in parts:  # RELION 3.1+ writes only these; they win if both are present
        return _num(parts[angst], angst, where)
    if px not in parts:
        return pd.Series(np.nan, index=parts.index, dtype=float)
    shift = _num(parts[px], px, where)
    # a zero shift is zero in any unit, so it needs no pixel size
    unknown = (shift.notna() & (shift != 0) & pixel.isna()).to_numpy()
    if unknown.any():
        raise StarError(
            f"{where}: {px} is in pixels but no pixel size can be determined "
            f"(rlnImagePixelSize, rlnPixelSize or rlnDetectorPixelSize with "
            f"rlnMagnification) for rows {_rows(unknown)}; cannot convert the "
            "origins to Angstrom"
        )
    return (shift * pixel).where(shift != 0, shift)


# --------------------------------------------------------------------------------------- writing


def write_star(
    path: str | os.PathLike, star: ParticleStar, particles: pd.DataFrame | None = None
) -> Path:
    """Write ``star`` as a RELION 3.1 STAR file (``data_optics`` + ``data_particles``).

    Every original column and the optics table are kept. ``particles`` (default: all of
    ``star.particles``) selects and orders the rows to write by its index, which must refer to
    rows of ``star.particles``; its canonical angle and origin columns (degrees, Angstrom) are
    written to ``rlnAngleRot/Tilt/Psi`` and ``rlnOriginX/YAngst``. Other canonical columns are
    derived views and are not written back; edit ``star.blocks`` to change those.

    A file without optics groups (RELION 3.0) gets an optics table built from the particles'
    voltage, Cs, amplitude contrast, pixel size and box size, and its pixel origins become
    ``rlnOriginX/YAngst``. A quantity the file does not give is left out of that table rather
    than invented; RELION 3.0 files carry no box size, and RELION 3.1 wants ``rlnImageSize``:
    set ``star.particles["image_size_px"]`` (e.g. from the stack's header) before writing.
    Other blocks of the original file are written after the particles. The file is written to
    a temporary name beside ``path`` and renamed over it, so a failure never leaves a partial
    file.

    Every block gets RELION's ``# version 30001`` stamp (``50001`` for a RELION 5.0 file, whose
    layout is the same); floats are written with the shortest text that reads back to the same
    value, missing values as ``nan``, so writing and reading again changes no value.
    """
    path = Path(path)
    blocks = _relion31_blocks(star, particles)
    text = _format_star(blocks, _WRITE_STAMPS.get(star.version, "30001"))
    return _write_atomic(path, text)


def _write_atomic(path: Path, text: str) -> Path:
    """``text`` into ``path`` by the project's atomic write (:mod:`particleseg_model.atomic`);
    the folder must exist (a STAR file's folder is the caller's to make)."""
    with atomic_path(path, mkdir=False) as tmp:
        tmp.write_bytes(text.encode("utf-8"))
    return path


def _loop_value(value: object, decimals: int | None, strict_text: bool) -> str:
    if isinstance(value, bool | np.bool_ | int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return repr(float(value)) if decimals is None else f"{float(value):.{decimals}f}"
    text = str(value)
    if not text or any(c.isspace() for c in text):
        if strict_text:
            raise ValueError(f"STAR value {text!r} is empty or has white space")
        return '"' + text + '"'
    return text


def format_loop_blocks(
    blocks: dict[str, pd.DataFrame | dict],
    *,
    decimals: int | None = None,
    strict_text: bool = False,
) -> str:
    """The text :func:`write_loop_blocks` writes (see there), for a caller that stores it.

    Parameters
    ----------
    blocks
        Block name (without ``data_``) to a table, or to a dict written as a one-row loop.
    decimals
        Places of every float (None: the shortest text that reads back to the same value).
        Values already formatted as text are written as they are.
    strict_text
        Refuse empty or white-space text instead of quoting it.

    Returns
    -------
    str
        Each block as ``\n# version 30001\n\ndata_<name>\n\nloop_\n``, its labels
        ``_<label> #<k>``, one line per row (values separated by one space) and a blank line.

    Raises
    ------
    ValueError
        Empty or white-space text with ``strict_text``.
    """
    lines: list[str] = []
    for name, block in blocks.items():
        table = pd.DataFrame([block]) if isinstance(block, dict) else block
        lines += ["", "# version 30001", "", f"data_{name}", "", "loop_"]
        lines += [f"_{column} #{k}" for k, column in enumerate(table.columns, start=1)]
        columns = [table[c].to_numpy() for c in table.columns]
        lines += [
            " ".join(_loop_value(col[r], decimals, strict_text) for col in columns)
            for r in range(len(table))
        ]
        lines.append("")
    return "\n".join(lines) + "\n"


def write_loop_blocks(
    path: str | os.PathLike,
    blocks: dict[str, pd.DataFrame | dict],
    *,
    decimals: int | None = None,
    strict_text: bool = False,
) -> Path:
    """Write plain tables as RELION 3.1 loop blocks (``# version 30001``); a dict block becomes
    a one-row loop. Floats get ``decimals`` places (None: full precision); empty or
    white-space text is quoted, or refused with ``strict_text``. No time stamp, so equal
    tables give equal bytes. For particle files with optics use :func:`write_star`. The
    text is :func:`format_loop_blocks`'s, written atomically (the folder is made)."""
    return atomic_write_text(
        path, format_loop_blocks(blocks, decimals=decimals, strict_text=strict_text)
    )


def _quote(values: pd.Series) -> pd.Series:
    """Text values as STAR tokens: empty or whitespace-holding strings in double quotes."""
    text = values.astype(object)
    needs = text.map(lambda v: isinstance(v, str) and (v == "" or any(c.isspace() for c in v)))
    return text.where(~needs, '"' + text.astype(str) + '"')


def _format_star(blocks: dict[str, pd.DataFrame], stamp: str) -> str:
    parts: list[str] = []
    for name, block in blocks.items():
        parts.append(f"\n# version {stamp}\n\ndata_{name}\n\n")
        if block.attrs.get(_PAIRS_ATTR) and len(block) == 1:
            row = block.iloc[0]
            for label in block.columns:
                value = _quote(pd.Series([row[label]])).iloc[0]
                parts.append(f"_{label} {value!s}\n")
            parts.append("\n")
            continue
        parts.append("loop_\n")
        parts.extend(f"_{label} #{i}\n" for i, label in enumerate(block.columns, 1))
        if len(block):
            table = block.copy()
            for label in table.columns:
                if not pd.api.types.is_numeric_dtype(table[label]):
                    table[label] = _quote(table[label])
            parts.append(
                table.to_csv(
                    sep="\t",
                    header=False,
                    index=False,
                    na_rep="nan",
                    quoting=csv.QUOTE_NONE,
                    escapechar="\\",
                    lineterminator="\n",
                )
            )
        parts.append("\n")
    return "".join(parts)


def _relion31_blocks(star: ParticleStar, particles: pd.DataFrame | None) -> dict[str, pd.DataFrame]:
    """The blocks of a RELION 3.1 file (optics, particles, then any others) for the given rows."""
    original = star.particles
    chosen = original if particles is None else particles
    foreign = chosen.index.difference(original.index)
    if len(foreign):
        raise StarError(
            f"{star.source}: cannot write rows {list(foreign[:5])}: the index of "
            "the table to write must refer to rows of the STAR file's particles"
        )
    rows = chosen.index
    out = star.blocks[star.particles_block].loc[rows].reset_index(drop=True)

    def values(col: str) -> np.ndarray:
        source = chosen if col in chosen else original.loc[rows]
        return source[col].to_numpy(dtype=float, na_value=np.nan)

    for col, label in _ANGLE_LABELS.items():
        new = values(col)
        if label in out or np.isfinite(new).any():
            out[label] = new
    for col, axis in _ORIGIN_AXES.items():
        angst, px = f"rlnOrigin{axis}Angst", f"rlnOrigin{axis}"
        new = values(col)
        if px in out:  # pixel origins become Angstrom origins, in the same place
            position = out.columns.get_loc(px)
            out = out.drop(columns=px)
            if angst not in out:
                # the columns are unique, so get_loc gave an int
                out.insert(position, angst, new)  # pyright: ignore[reportArgumentType]
        if angst in out or np.isfinite(new).any():
            out[angst] = new
    if "rlnOpticsGroup" not in out:
        out["rlnOpticsGroup"] = original.loc[rows, "optics_group"].to_numpy(dtype=np.int64)

    if star.optics is not None:
        optics = star.optics.copy()
        if "rlnOpticsGroup" not in optics:  # read_star allows that for a single group only
            optics.insert(0, "rlnOpticsGroup", 1)
    else:
        optics = _optics_from_particles(original)

    blocks = {"optics": optics, "particles": out}
    for name, block in star.blocks.items():
        if name in (star.particles_block, "optics"):
            continue
        if name in blocks:
            raise StarError(
                f"{star.source}: cannot write block data_{name}: the 3.1 layout "
                f"uses that name for the particles of data_{star.particles_block}"
            )
        blocks[name] = block
    return blocks


def _optics_from_particles(particles: pd.DataFrame) -> pd.DataFrame:
    """One optics row per optics group, from the group's first particle."""
    first = particles.groupby("optics_group", sort=True).first()
    groups = first.index.to_numpy(dtype=np.int64)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": groups,
            "rlnOpticsGroupName": [f"opticsGroup{g}" for g in groups],
        }
    )
    for col, label in (
        ("voltage_kv", "rlnVoltage"),
        ("spherical_aberration_mm", "rlnSphericalAberration"),
        ("amplitude_contrast", "rlnAmplitudeContrast"),
        ("pixel_size_a", "rlnImagePixelSize"),
        ("image_size_px", "rlnImageSize"),
    ):
        column = first[col]
        # RELION cannot read a missing value: leave out a quantity some group lacks
        if len(column) and column.notna().all():
            optics[label] = column.to_numpy()
    optics["rlnImageDimensionality"] = 2
    return optics


def write_star_as_read(
    path: str | os.PathLike, star: ParticleStar, rows: pd.Index | np.ndarray | list | None = None
) -> Path:
    """Write ``star`` back in its own RELION flavour, with only the particle rows ``rows``.

    Unlike :func:`write_star` (always RELION 3.1), every block is written as read: same block
    names and order, same columns with their original values (pixel origins stay in pixels),
    the optics table unchanged. A 3.0 file gets no ``# version`` stamps (which would make it
    3.1), a 3.1 file ``30001``, a 5.0 file ``50001``. ``rows`` selects particle rows: a boolean
    mask over the particle block, or labels of ``star.particles.index`` (written in the order
    given); None writes them all. Written to a temporary name beside ``path`` and renamed
    over it, so a failure never leaves a partial file.
    """
    path = Path(path)
    block = star.blocks[star.particles_block]
    if rows is not None:
        chosen = np.asarray(rows)
        if chosen.dtype == np.bool_:
            if chosen.shape != (len(block),):
                raise StarError(
                    f"{star.source}: row mask of shape {chosen.shape}, the particle "
                    f"block has {len(block)} rows"
                )
            block = block[chosen]
        else:
            foreign = pd.Index(chosen).difference(block.index)
            if len(foreign):
                raise StarError(
                    f"{star.source}: cannot write rows {list(foreign[:5])}: not "
                    "rows of the STAR file's particles"
                )
            block = block.loc[chosen]
    blocks = {
        name: (block.reset_index(drop=True) if name == star.particles_block else table)
        for name, table in star.blocks.items()
    }
    stamp = _WRITE_STAMPS.get(star.version)
    if stamp is None:
        # _format_star stamps every block; for 3.0, format block by block and cut the stamp off
        prefix = "\n# version 0\n"
        text = "".join(
            _format_star({name: table}, "0")[len(prefix) :] for name, table in blocks.items()
        )
    else:
        text = _format_star(blocks, stamp)
    return _write_atomic(path, text)
