"""cryoSPARC ``.cs`` particle files read into the canonical particle table of :mod:`.star`.

A ``.cs`` file is a numpy structured array (``np.load``; no cryoSPARC needed), one row per
particle, with fields such as ``blob/path`` (the stack, bytes), ``blob/idx`` (0-based image in
it), ``blob/shape`` ((ny, nx) px), ``blob/psize_A``, ``ctf/df1_A``, ``ctf/df2_A``,
``ctf/df_angle_rad``, ``ctf/accel_kv``, ``ctf/cs_mm``, ``ctf/amp_contrast``,
``ctf/exp_group_id``, ``alignments3D/pose`` (axis-angle, radians), ``alignments3D/shift``
(pixels), ``alignments3D/class``, ``alignments3D/split``, ``location/micrograph_path``,
``location/center_x_frac``/``center_y_frac`` and ``location/micrograph_shape`` ((ny, nx)).

Conversions (the table's units and conventions are :mod:`.star`'s):

- Image names are RELION's ``"<idx + 1>@<blob/path>"`` (a leading ``>`` of a cryoSPARC
  project-relative path is dropped).
- Poses follow pyem's ``csparc2star`` (``pyem/metadata/cryosparc2.py``: ``rot2euler(expmap(
  pose))``, whose ``expmap`` returns the *transpose* of the Rodrigues matrix): RELION's Euler
  matrix is ``A = R(pose).T`` with ``R`` the rotation by ``|pose|`` radians about
  ``pose / |pose|``, decomposed into ZYZ (rot, tilt, psi) in degrees as RELION's
  ``Euler_matrix2angles`` does. A pose about z by t radians is the in-plane angle
  ``rot + psi = degrees(t)``. :func:`euler_to_pose` is the inverse, for writing ``.cs`` back.
- Origins: pyem copies ``alignments3D/shift`` to ``rlnOriginX/Y`` (pixels) as they are, so
  ``origin_x_a = shift_x * psize`` with RELION's sign; the pixel size is
  ``alignments3D/psize_A`` where present, else ``blob/psize_A``.
- ``defocus_angle_deg`` is ``degrees(ctf/df_angle_rad)``; optics groups are
  ``ctf/exp_group_id + 1``; classes and random subsets 1-based (``+ 1``), as pyem does.
- Coordinates: ``center_x_frac * nx``, ``center_y_frac * ny`` of the micrograph (no flip).
- float32 values become the float64 of their shortest decimal (15301.1, not 15301.0996...).

The array as read stays in :attr:`CryosparcParticles.raw`, so a writer can update fields and
save it again without losing any.

Writing back (:func:`write_cs_subset`): a subset of the rows goes back to cryoSPARC without
re-extraction as cryoSPARC's own jobs hand particles on: ``<name>.cs`` holds the kept rows
with every field and the dtype as read, and ``<name>_passthrough.cs`` the fields passed
through (``uid`` first, then the stack, CTF and micrograph-location fields: ``blob/*``,
``ctf/*``, ``location/*``, and the pick's ``pick_stats/*``), or, when the input came with
its own passthrough file (cryoSPARC's ``J12_passthrough_particles.cs`` beside
``J12_particles.cs``), that file's rows for the kept ``uid`` values, in the same order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from particleseg_model.atomic import atomic_path
from particleseg_model.em.geometry import euler_matrices
from particleseg_model.em.star import CANONICAL_COLUMNS

__all__ = [
    "CTF_FIELDS",
    "CryosparcError",
    "CryosparcParticles",
    "IMAGE_FIELDS",
    "euler_to_pose",
    "passthrough_path",
    "pose_to_euler",
    "read_cs",
    "write_cs",
    "write_cs_subset",
]

IMAGE_FIELDS: tuple[str, ...] = ("blob/path", "blob/idx", "blob/psize_A")
CTF_FIELDS: tuple[str, ...] = (
    "ctf/df1_A",
    "ctf/df2_A",
    "ctf/df_angle_rad",
    "ctf/accel_kv",
    "ctf/cs_mm",
    "ctf/amp_contrast",
)


class CryosparcError(ValueError):
    """A ``.cs`` file that cannot be read as particles; the message names the file (and the
    fields it lacks)."""


@dataclass
class CryosparcParticles:
    """A cryoSPARC particle file: the canonical table and the array it came from.

    Attributes
    ----------
    particles
        Canonical particle table (:data:`particleseg_model.em.star.CANONICAL_COLUMNS`), one row
        per row of ``raw``, index 0..n-1.
    raw
        The structured array as ``np.load`` gave it (every field, cryoSPARC's units).
    source
        The file read.
    """

    particles: pd.DataFrame
    raw: np.ndarray
    source: Path

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self.raw.dtype.names or ())


def _decimal(values: np.ndarray) -> np.ndarray:
    """float32 as the float64 of their shortest decimal; other floats as float64."""
    array = np.asarray(values)
    if array.dtype == np.float32:
        return array.astype(str).astype(np.float64)
    return array.astype(np.float64)


def _text(values: np.ndarray) -> list[str]:
    out = []
    for value in values:
        text = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
        out.append(text[1:] if text.startswith(">") else text)
    return out


def pose_to_euler(pose: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CryoSPARC axis-angle poses ``(n, 3)`` (radians) as RELION's (rot, tilt, psi) in degrees.

    The convention is pyem's (see the module docstring): RELION's matrix is the transpose of
    the Rodrigues matrix of ``pose``, decomposed as RELION's ``Euler_matrix2angles``.
    """
    from scipy.spatial.transform import Rotation

    vectors = np.atleast_2d(np.asarray(pose, dtype=np.float64))
    a = np.transpose(Rotation.from_rotvec(vectors).as_matrix(), (0, 2, 1))
    eps = np.finfo(np.float64).eps
    abs_sb = np.hypot(a[:, 0, 2], a[:, 1, 2])
    general = abs_sb > 16 * eps
    psi = np.arctan2(a[:, 1, 2], -a[:, 0, 2])
    rot = np.arctan2(a[:, 2, 1], a[:, 2, 0])
    sin_psi = np.sin(psi)
    with np.errstate(divide="ignore", invalid="ignore"):
        sign_sb = np.where(
            np.abs(sin_psi) < eps,
            np.sign(-a[:, 0, 2]) / np.cos(psi),
            np.where(sin_psi > 0, np.sign(a[:, 1, 2]), -np.sign(a[:, 1, 2])),
        )
    tilt = np.arctan2(sign_sb * abs_sb, a[:, 2, 2])
    # tilt 0 or 180: only rot + psi (or rot - psi) is defined; RELION puts it all in psi
    up = a[:, 2, 2] > 0
    rot = np.where(general, rot, 0.0)
    tilt = np.where(general, tilt, np.where(up, 0.0, np.pi))
    psi = np.where(
        general,
        psi,
        np.where(up, np.arctan2(-a[:, 1, 0], a[:, 0, 0]), np.arctan2(a[:, 1, 0], -a[:, 0, 0])),
    )
    return np.degrees(rot), np.degrees(tilt), np.degrees(psi)


def euler_to_pose(rot: np.ndarray, tilt: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """RELION's (rot, tilt, psi) in degrees as cryoSPARC axis-angle poses ``(n, 3)`` (radians);
    the inverse of :func:`pose_to_euler`."""
    from scipy.spatial.transform import Rotation

    matrices = np.transpose(euler_matrices(rot, tilt, psi), (0, 2, 1))
    return Rotation.from_matrix(matrices).as_rotvec()


def _missing(names: Sequence[str], needed: Sequence[str]) -> list[str]:
    return [f for f in needed if f not in names]


def read_cs(
    path: str | os.PathLike, *, require_ctf: bool = True, require_pixel_size: bool = True
) -> CryosparcParticles:
    """Read a cryoSPARC ``.cs`` particle file into the canonical particle table.

    Parameters
    ----------
    path
        The ``.cs`` file (a numpy structured array).
    require_ctf
        Refuse a file without :data:`CTF_FIELDS` (the corpus needs the CTF).
    require_pixel_size
        Refuse a file without ``blob/psize_A`` (else ``pixel_size_a`` is NaN, to be completed
        from the stacks by :func:`particleseg_model.em.particles.complete_from_stacks`).

    Returns
    -------
    CryosparcParticles
        The table (same columns, dtypes and units as :func:`particleseg_model.em.star.read_star`;
        poses and origins NaN without ``alignments3D``) and the raw array.

    Raises
    ------
    CryosparcError
        The file is missing, not a numpy structured array, or lacks the fields needed (the
        message names the file, the missing fields and the fields it has); images that are
        not square.
    """
    path = Path(path)
    if not path.is_file():
        raise CryosparcError(f"{path}: cryoSPARC file not found")
    try:
        with open(path, "rb") as handle:
            raw = np.load(handle, allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError/OSError/EOFError on other files
        raise CryosparcError(f"{path}: not a cryoSPARC .cs file (numpy array): {exc}") from exc
    names = raw.dtype.names if isinstance(raw, np.ndarray) else None
    if not names or raw.ndim != 1:
        raise CryosparcError(f"{path}: not a cryoSPARC .cs file (no structured array of rows)")
    needed = list(IMAGE_FIELDS if require_pixel_size else IMAGE_FIELDS[:2])
    if require_ctf:
        needed += CTF_FIELDS
    missing = _missing(names, needed)
    if missing:
        raise CryosparcError(
            f"{path}: not a usable cryoSPARC particle file: missing fields "
            f"{', '.join(missing)} (needed: {', '.join(needed)}; it has: {', '.join(names)})"
        )
    n = len(raw)
    nan = np.full(n, np.nan)

    def field(name: str) -> np.ndarray:
        return _decimal(raw[name]) if name in names else nan

    stacks = _text(raw["blob/path"])
    index = raw["blob/idx"].astype(np.int64) + 1
    table = pd.DataFrame(index=pd.RangeIndex(n))
    table["image_name"] = pd.Series([f"{i}@{s}" for i, s in zip(index, stacks, strict=True)])
    table["image_index"] = index
    table["stack_path"] = pd.Series(stacks)
    if "alignments3D/pose" in names:
        rot, tilt, psi = pose_to_euler(np.asarray(raw["alignments3D/pose"], dtype=np.float64))
    elif "alignments2D/pose" in names:  # 2D classification: an in-plane angle only
        rot, tilt, psi = nan, nan, np.degrees(_decimal(raw["alignments2D/pose"]))
    else:
        rot = tilt = psi = nan
    table["rot_deg"], table["tilt_deg"], table["psi_deg"] = rot, tilt, psi
    pixel = field("blob/psize_A")
    shift_pixel = field("alignments3D/psize_A") if "alignments3D/psize_A" in names else pixel
    if "alignments3D/shift" in names:
        shift = np.asarray(raw["alignments3D/shift"], dtype=np.float64)
        table["origin_x_a"] = _decimal(shift[:, 0].astype(np.float32)) * shift_pixel
        table["origin_y_a"] = _decimal(shift[:, 1].astype(np.float32)) * shift_pixel
    else:
        table["origin_x_a"] = table["origin_y_a"] = nan
    table["pixel_size_a"] = pixel
    if "blob/shape" in names:
        shape = np.asarray(raw["blob/shape"], dtype=np.int64).reshape(n, -1)
        if shape.shape[1] >= 2 and (shape[:, -1] != shape[:, -2]).any():
            row = int(np.flatnonzero(shape[:, -1] != shape[:, -2])[0])
            raise CryosparcError(
                f"{path}: particle {row + 1} is {shape[row, -1]} x {shape[row, -2]} px; "
                "particles must be square"
            )
        table["image_size_px"] = pd.array(shape[:, -1], dtype="Int64")
    else:
        table["image_size_px"] = pd.array([pd.NA] * n, dtype="Int64")
    groups = (
        raw["ctf/exp_group_id"].astype(np.int64) + 1
        if "ctf/exp_group_id" in names
        else np.ones(n, np.int64)
    )
    table["optics_group"] = groups
    table["defocus_u_a"] = field("ctf/df1_A")
    table["defocus_v_a"] = field("ctf/df2_A")
    angle = field("ctf/df_angle_rad")
    # degrees of a float32 angle, rounded as float32: 5.28, not 5.27999...
    table["defocus_angle_deg"] = _decimal(np.degrees(angle).astype(np.float32))
    table["voltage_kv"] = field("ctf/accel_kv")
    table["spherical_aberration_mm"] = field("ctf/cs_mm")
    table["amplitude_contrast"] = field("ctf/amp_contrast")
    if "location/micrograph_path" in names:
        table["micrograph_name"] = pd.Series(_text(raw["location/micrograph_path"]))
    else:
        table["micrograph_name"] = pd.Series([None] * n, dtype=table["image_name"].dtype)
    if {"location/center_x_frac", "location/micrograph_shape"} <= set(names):
        mic = np.asarray(raw["location/micrograph_shape"], dtype=np.float64).reshape(n, -1)
        table["coordinate_x_px"] = field("location/center_x_frac") * mic[:, -1]
        table["coordinate_y_px"] = field("location/center_y_frac") * mic[:, -2]
    else:
        table["coordinate_x_px"] = table["coordinate_y_px"] = nan
    for column, name in (
        ("class_number", "alignments3D/class"),
        ("random_subset", "alignments3D/split"),
    ):
        values = (
            pd.array(raw[name].astype(np.int64) + 1, dtype="Int64")
            if name in names
            else pd.array([pd.NA] * n, dtype="Int64")
        )
        table[column] = values
    return CryosparcParticles(particles=table[list(CANONICAL_COLUMNS)], raw=raw, source=path)


PASSTHROUGH_PREFIXES: tuple[str, ...] = ("blob/", "ctf/", "location/", "pick_stats/")


def write_cs(path: str | os.PathLike, rows: np.ndarray) -> Path:
    """Write a structured array as a cryoSPARC ``.cs`` file (``np.save`` format, no pickle),
    atomically; the name is kept as given (``np.save`` would add ``.npy``)."""
    path = Path(path)
    if rows.dtype.names is None or rows.ndim != 1:
        raise CryosparcError(f"{path}: a .cs file holds a 1-D structured array")
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, rows, allow_pickle=False)
    return path


def passthrough_path(path: str | os.PathLike) -> Path:
    """The passthrough file that goes with ``path``: cryoSPARC names a job's
    ``J12_particles.cs`` companion ``J12_passthrough_particles.cs``; other names get
    ``<stem>_passthrough.cs``."""
    path = Path(path)
    stem = path.stem
    parts = stem.split("_", 1)
    if len(parts) == 2 and parts[0][:1] == "J" and parts[0][1:].isdigit():
        return path.with_name(f"{parts[0]}_passthrough_{parts[1]}.cs")
    return path.with_name(f"{stem}_passthrough.cs")


def write_cs_subset(
    particles: CryosparcParticles,
    keep: np.ndarray,
    out: str | os.PathLike,
    *,
    passthrough_in: str | os.PathLike | None = None,
) -> tuple[Path, Path]:
    """Write the rows ``keep`` (a boolean mask over ``particles.raw``) to ``out`` and their
    passthrough file; returns both paths.

    ``out`` gets every field of the kept rows, same dtype and order as read. The passthrough
    file (:func:`passthrough_path` of ``out``) gets, when ``passthrough_in`` (default: the
    input's own :func:`passthrough_path`, if it exists) is given, that file's rows for the
    kept ``uid`` values; else ``uid`` and the :data:`PASSTHROUGH_PREFIXES` fields of the kept
    rows. Raises :class:`CryosparcError` naming the file when the rows have no ``uid`` while
    a passthrough file is to be matched, or when a kept ``uid`` is missing from it.
    """
    out = Path(out)
    raw = particles.raw
    keep = np.asarray(keep, dtype=bool)
    if keep.shape != raw.shape:
        raise CryosparcError(
            f"{particles.source}: a keep mask of {keep.shape} for {len(raw)} rows"
        )
    kept = raw[keep]
    names = raw.dtype.names or ()
    source_pass = (
        Path(passthrough_in) if passthrough_in is not None else passthrough_path(particles.source)
    )
    if passthrough_in is not None or source_pass.is_file():
        if "uid" not in names:
            raise CryosparcError(
                f"{particles.source}: no uid field, needed to match rows of {source_pass}"
            )
        try:
            with open(source_pass, "rb") as handle:
                given = np.load(handle, allow_pickle=False)
        except Exception as exc:
            raise CryosparcError(f"{source_pass}: not a cryoSPARC .cs file: {exc}") from exc
        if given.dtype.names is None or "uid" not in given.dtype.names:
            raise CryosparcError(f"{source_pass}: passthrough file without a uid field")
        order = np.argsort(given["uid"], kind="stable")
        found = np.searchsorted(given["uid"][order], kept["uid"])
        found = np.clip(found, 0, max(len(given) - 1, 0))
        if len(given) == 0 or (given["uid"][order][found] != kept["uid"]).any():
            raise CryosparcError(f"{source_pass}: some kept particles' uid values are missing")
        passed = given[order][found]
    else:
        fields = [n for n in names if n == "uid" or n.startswith(PASSTHROUGH_PREFIXES)]
        passed = np.empty(len(kept), dtype=np.dtype([(n, raw.dtype[n]) for n in fields]))
        for name in fields:
            passed[name] = kept[name]
    pass_out = passthrough_path(out)
    write_cs(pass_out, passed)
    write_cs(out, kept)
    return out, pass_out
