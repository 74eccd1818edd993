"""Particle extraction from micrographs and coordinate files with ``relion_preprocess``.

Besides the particles, :func:`extract_particles` can cut *negatives*: boxes at centres a
caller chooses from each micrograph's size and picks (the corpus build chooses regions far from
every pick: :mod:`particleseg_model.corpus.negatives`), handed to ``relion_preprocess`` as a
second coordinate set so that RELION cuts them exactly as it cuts the particles (same box,
downscaling, normalisation and contrast inversion).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from particleseg_model.em.star import write_loop_blocks
from particleseg_model.relion.runner import (
    LogTarget,
    RelionError,
    _emitter,
    _read_blocks,
    run_relion,
)

__all__ = [
    "Extraction",
    "NegativeCentres",
    "extract_particles",
]

NegativeCentres = Callable[[str, tuple[int, int], np.ndarray], np.ndarray]
"""Chooses a micrograph's negatives: ``(name, (rows, columns), picks)`` -> centres. ``name`` is
the micrograph's name in the project (``Micrographs/mic_0001.mrc``), ``picks`` its pick
coordinates ``(m, 2)`` and the result the negative box centres ``(n, 2)``, both x (column), y
(row) of the box centre in micrograph pixels (RELION's ``rlnCoordinateX/Y``); ``n`` may be 0."""


# ------------------------------------------------------------------------------ extraction


@dataclass(frozen=True)
class Extraction:
    """What :func:`extract_particles` made.

    ``particles_star`` has image names relative to ``project_dir``. ``box_px`` is the box cut
    from the micrographs; ``image_size_px`` the box of the written particles (``rescale_px``
    when rescaled); ``pixel_size_a`` theirs; ``bg_radius_px`` the normalisation radius in
    pixels of the written particles (None without normalisation).

    With negatives asked for: ``negatives_star`` (image names relative to ``project_dir``, in
    ``Negatives/``), ``n_negatives`` boxes from ``negative_micrographs`` micrographs (those
    given at least one); ``negatives_star`` is None and ``n_negatives`` 0 otherwise.
    """

    particles_star: Path
    project_dir: Path
    n_particles: int
    n_micrographs: int
    box_px: int
    rescale_px: int | None
    image_size_px: int
    pixel_size_a: float
    micrograph_pixel_size_a: float
    normalise: bool
    invert_contrast: bool
    bg_radius_px: int | None
    skipped_micrographs: tuple[str, ...] = ()
    command: tuple[str, ...] = ()
    negatives_star: Path | None = None
    n_negatives: int = 0
    negative_micrographs: int = 0


_COORD_EXTRA = ("rlnAutopickFigureOfMerit", "rlnClassNumber", "rlnAnglePsi")


def _read_coordinates(path: Path) -> pd.DataFrame:
    """Coordinates of one micrograph as RELION reads them (``rlnCoordinateX/Y``: box centre,
    pixels) from a RELION STAR file or an EMAN ``.box`` file (lower-left corner, width,
    height: centre = corner + size / 2)."""
    if path.suffix.lower() == ".box":
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            try:
                x, y, w, h = (float(v) for v in (words + ["0", "0"])[:4])
            except ValueError:
                raise ValueError(
                    f"{path}, line {number}: not an EMAN .box row (x y width height): {line!r}"
                ) from None
            if len(words) < 4 or w <= 0 or h <= 0:
                raise ValueError(
                    f"{path}, line {number}: an EMAN .box row needs x, y and a "
                    f"positive width and height: {line!r}"
                )
            rows.append((x + w / 2, y + h / 2))
        return pd.DataFrame(rows, columns=["rlnCoordinateX", "rlnCoordinateY"], dtype=float)
    blocks = _read_blocks(path)
    for block in blocks.values():
        if isinstance(block, dict):
            block = pd.DataFrame([block])
        if "rlnCoordinateX" in block and "rlnCoordinateY" in block:
            keep = ["rlnCoordinateX", "rlnCoordinateY", *[c for c in _COORD_EXTRA if c in block]]
            table = block[keep].copy()
            table[["rlnCoordinateX", "rlnCoordinateY"]] = table[
                ["rlnCoordinateX", "rlnCoordinateY"]
            ].astype(float)
            return table.reset_index(drop=True)
    if not blocks:  # an empty coordinate file (a micrograph without picks)
        return pd.DataFrame(columns=["rlnCoordinateX", "rlnCoordinateY"], dtype=float)
    raise ValueError(f"{path}: no block with rlnCoordinateX and rlnCoordinateY")


def _coordinate_index(coordinates: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    if isinstance(coordinates, str | os.PathLike):
        root = Path(coordinates)
        if root.is_dir():
            files = sorted(
                p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in (".star", ".box")
            )
            if not files:
                raise FileNotFoundError(f"{root}: no coordinate files (.star or .box) in it")
            return files
        if not root.is_file():
            raise FileNotFoundError(f"{root}: coordinate directory or file not found")
        return [root]
    files = [Path(p) for p in coordinates]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"coordinate files not found: {', '.join(missing[:5])}")
    return files


def _match_coordinates(stem: str, files: list[Path], suffix: str | None) -> Path | None:
    """The coordinate file of the micrograph named ``stem``: ``stem + suffix`` when a suffix is
    given, else ``stem.star``, ``stem.box``, or a single ``stem_*.star`` / ``stem_*.box``
    (``_autopick.star``, ``_manualpick.star``, ...); STAR wins over .box."""
    if suffix is not None:
        hits = [p for p in files if p.name == stem + suffix]
    else:
        hits = [p for p in files if p.name in (stem + ".star", stem + ".box")]
        if not hits:
            hits = [p for p in files if p.name.startswith(stem + "_")]
    if not hits:
        return None
    stars = [p for p in hits if p.suffix.lower() == ".star"]
    hits = stars or hits
    if len(hits) > 1:
        raise ValueError(
            f"several coordinate files match micrograph {stem!r}: "
            f"{', '.join(str(p) for p in hits[:4])}; pass coord_suffix to choose"
        )
    return hits[0]


def _micrograph_table(
    micrographs: str | os.PathLike | Sequence[str | os.PathLike],
    pixel_size_a: float | None,
    voltage_kv: float,
    cs_mm: float,
    amplitude_contrast: float,
) -> tuple[pd.DataFrame, pd.DataFrame, Path]:
    """(optics block, micrographs block with absolute ``_source`` paths, base directory)."""
    if isinstance(micrographs, str | os.PathLike) and Path(micrographs).suffix == ".star":
        path = Path(micrographs)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: micrographs STAR file not found")
        blocks = _read_blocks(path)
        table = next(
            (
                b
                for b in blocks.values()
                if isinstance(b, pd.DataFrame) and "rlnMicrographName" in b
            ),
            None,
        )
        if table is None:
            raise ValueError(f"{path}: no block with rlnMicrographName")
        table = table.reset_index(drop=True).copy()
        optics = blocks.get("optics")
        if isinstance(optics, dict):
            optics = pd.DataFrame([optics])
        base = path.parent
    else:
        items = [micrographs] if isinstance(micrographs, str | os.PathLike) else list(micrographs)
        if not items:
            raise ValueError("no micrographs given")
        table = pd.DataFrame({"rlnMicrographName": [str(p) for p in items]})
        optics = None
        base = Path.cwd()
    sources = []
    for name in table["rlnMicrographName"].astype(str):
        source = Path(name) if Path(name).is_absolute() else base / name
        if not source.is_file():
            raise FileNotFoundError(f"micrograph {name} not found (looked for {source})")
        sources.append(source.resolve())
    table["_source"] = sources
    if optics is None or "rlnMicrographPixelSize" not in optics:
        pixel = pixel_size_a
        if pixel is None:
            pixel = _mrc_pixel(sources[0])  # the header's voxel size
        if not pixel or pixel <= 0:
            raise ValueError(f"{sources[0]}: no pixel size in the header; pass pixel_size_a")
        group = {
            "rlnOpticsGroup": 1,
            "rlnOpticsGroupName": "opticsGroup1",
            "rlnMicrographOriginalPixelSize": float(pixel),
            "rlnVoltage": voltage_kv,
            "rlnSphericalAberration": cs_mm,
            "rlnAmplitudeContrast": amplitude_contrast,
            "rlnMicrographPixelSize": float(pixel),
        }
        if optics is not None and len(optics) > 0:  # keep what a 3.1 optics block gives
            merged = optics.iloc[[0]].to_dict("records")[0]
            group.update({str(k): v for k, v in merged.items() if k in group})
        optics = pd.DataFrame([group])
        table["rlnOpticsGroup"] = 1
    elif "rlnOpticsGroup" not in table:
        table["rlnOpticsGroup"] = int(optics["rlnOpticsGroup"].iloc[0])
    return optics.reset_index(drop=True), table, base


def _mrc_pixel(path: Path) -> float:
    import mrcfile

    with mrcfile.open(path, mode="r", permissive=True, header_only=True) as mrc:
        return float(mrc.voxel_size.x)


def _mrc_shape(path: Path) -> tuple[int, int]:
    """(rows, columns) of a single-frame micrograph, from its MRC header."""
    import mrcfile

    with mrcfile.open(path, mode="r", permissive=True, header_only=True) as mrc:
        header = mrc.header
        if header is None:  # permissive mode gives None for a file with no MRC header
            raise ValueError(f"{path}: no MRC header")
        nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    if nz != 1 or nx < 1 or ny < 1:
        raise ValueError(f"{path}: not a single 2D micrograph (MRC header {nx} x {ny} x {nz})")
    return ny, nx


def _whole_boxes(name: str, centres: np.ndarray, shape: tuple[int, int], box: int) -> np.ndarray:
    """``centres`` (n, 2) rounded to whole pixels, each box wholly inside the micrograph
    (RELION's box at centre x spans x - box/2 .. x + box/2 - 1); ValueError naming the
    micrograph and the first box that is not."""
    xy = np.round(np.asarray(centres, dtype=np.float64).reshape(-1, 2))
    half = box // 2
    outside = (
        (xy[:, 0] < half)
        | (xy[:, 1] < half)
        | (xy[:, 0] + half > shape[1])
        | (xy[:, 1] + half > shape[0])
    )
    if outside.any():
        x, y = xy[np.flatnonzero(outside)[0]]
        raise ValueError(
            f"{name}: negative box at ({x:.0f}, {y:.0f}) reaches outside the "
            f"{shape[1]} x {shape[0]} px micrograph (box {box})"
        )
    return xy


def _preprocess_command(
    micrographs_star: str,
    coord_dir: str,
    part_dir: str,
    part_star: str,
    box_px: int,
    rescale_px: int | None,
    radius: int | None,
    invert_contrast: bool,
) -> list[str]:
    """The ``relion_preprocess --extract`` command (one per coordinate set: the particles and
    the negatives get the same settings)."""
    command = [
        "relion_preprocess",
        "--i",
        micrographs_star,
        "--coord_dir",
        coord_dir,
        "--coord_suffix",
        ".star",
        "--part_dir",
        part_dir,
        "--part_star",
        part_star,
        "--extract",
        "--extract_size",
        str(box_px),
    ]
    if rescale_px is not None and rescale_px != box_px:
        command += ["--scale", str(rescale_px)]
    if radius is not None:
        command += ["--norm", "--bg_radius", str(radius)]
    if invert_contrast:
        command += ["--invert_contrast"]
    return command


def _run_preprocess(
    command: list[str],
    tmp: Path,
    part_dir: str,
    total: int,
    desc: str,
    transcript: str,
    *,
    progress: bool | None,
    log: LogTarget,
    timeout_s: float | None,
) -> None:
    """Run one extraction in the project ``tmp`` with a bar over micrographs (stacks written
    under ``part_dir``)."""
    from particleseg_model.progress import progress as progress_bar

    bar = progress_bar(
        total=total, desc=desc, unit="mic", disable=None if progress is None else not progress
    )
    stacks = tmp / part_dir

    def tick() -> None:
        done = sum(1 for _ in stacks.rglob("*.mrcs")) if stacks.is_dir() else 0
        if done > bar.n:
            bar.update(done - bar.n)

    try:
        run_relion(
            command, cwd=tmp, log=log, transcript=tmp / transcript, tick=tick, timeout_s=timeout_s
        )
    finally:
        bar.close()


def _count_rows(star_path: Path, command: list[str], tmp: Path) -> int:
    """Rows of the ``particles`` block of the STAR file an extraction wrote (RelionError when
    it wrote none)."""
    if not star_path.is_file():
        raise RelionError(
            f"relion_preprocess wrote no {star_path.name} in {tmp}", command=command, cwd=tmp
        )
    parts = _read_blocks(star_path).get("particles")
    return 0 if parts is None or isinstance(parts, dict) else len(parts)


def _project_name(name: str, source: Path) -> str:
    """The micrograph's name inside the project: its relative name when it has one without
    '..', else ``Micrographs/<file name>``."""
    path = Path(name)
    if not path.is_absolute() and ".." not in path.parts:
        return path.as_posix()
    return f"Micrographs/{source.name}"


def extract_particles(  # noqa: C901 - to split (pyproject: mccabe)
    micrographs: str | os.PathLike | Sequence[str | os.PathLike],
    coordinates: str | os.PathLike | Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    box_px: int,
    rescale_px: int | None = None,
    invert_contrast: bool = True,
    normalise: bool = True,
    bg_radius_px: int | None = None,
    coord_suffix: str | None = None,
    pixel_size_a: float | None = None,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
    overwrite: bool = False,
    progress: bool | None = None,
    log: LogTarget = None,
    timeout_s: float | None = None,
    negatives: NegativeCentres | None = None,
) -> Extraction:
    """Extract particles with ``relion_preprocess --extract`` into the project ``out_dir``.

    Args:
        micrographs: a micrographs STAR file (RELION 3.1 with ``data_optics``, e.g. a CTF
            estimation's output; names relative to the file's directory) or a list of MRC
            micrographs (one optics group from ``pixel_size_a`` or the first header, with
            ``voltage_kv``/``cs_mm``/``amplitude_contrast``; no CTF columns).
        coordinates: a directory (searched recursively) or a list of coordinate files, RELION
            STAR (``rlnCoordinateX/Y``: box centre, 0-based pixels) or EMAN ``.box``
            (lower-left corner, width, height). A micrograph's file is ``<stem><coord_suffix>``,
            by default ``<stem>.star``, ``<stem>.box`` or one ``<stem>_*.star|box``.
            Micrographs without a coordinate file are skipped (listed in the result).
        out_dir: the project directory to create (refused if it exists, unless ``overwrite``);
            built under a temporary name and renamed into place, so a failure leaves nothing.
        box_px: box cut from the micrographs (even, pixels).
        rescale_px: rescale the particles to this box (``--scale``, even), or None.
        invert_contrast: ``--invert_contrast`` (raw micrographs have dark particles).
        normalise: ``--norm``: background (outside ``bg_radius_px``, default 37.5% of the final
            box, RELION's GUI default) to mean 0, std 1 after removing a fitted ramp.
        progress: a bar over micrographs (stacks written); None shows it on a terminal only.
        log: where RELION's output lines go (see :func:`run_relion`).
        negatives: also cut negatives: called once per micrograph with picks (see
            :data:`NegativeCentres`; micrographs without picks get none, nobody looked at
            them), its centres rounded to whole pixels (RELION cuts there) and extracted by a
            second ``relion_preprocess`` run with the same settings into ``Negatives/`` and
            ``negatives.star``. Each box must lie wholly inside its micrograph (ValueError
            naming the micrograph otherwise).
    Returns:
        :class:`Extraction`.
    Raises:
        RelionError: relion_preprocess failed (RELION's message and the command).
        FileNotFoundError, ValueError: missing micrographs/coordinates, bad sizes, no particle.
    """
    if box_px < 8 or box_px % 2:
        raise ValueError(f"box_px {box_px} must be even and at least 8")
    if rescale_px is not None and (rescale_px < 8 or rescale_px % 2):
        raise ValueError(f"rescale_px {rescale_px} must be even and at least 8")
    final_box = rescale_px or box_px
    if normalise:
        radius = int(bg_radius_px) if bg_radius_px is not None else int(round(0.375 * final_box))
        if not 0 < radius < final_box // 2:
            raise ValueError(f"bg_radius_px {radius} must be in (0, {final_box // 2})")
    else:
        radius = None
    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass overwrite=True to replace it)")
    emit = _emitter(log)

    optics, table, _ = _micrograph_table(
        micrographs, pixel_size_a, voltage_kv, cs_mm, amplitude_contrast
    )
    files = _coordinate_index(coordinates)
    out.parent.mkdir(parents=True, exist_ok=True)
    # a folder swap (built under a temporary name, then one rename), not a file write
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        names, keep, skipped, seen = [], [], [], set()
        negative_names: list[str] = []  # micrographs with at least one negative
        n_negative_centres = 0
        for row, (name, source) in enumerate(
            zip(table["rlnMicrographName"].astype(str), table["_source"], strict=True)
        ):
            rel = _project_name(name, source)
            if rel in seen:
                raise ValueError(f"two micrographs map to {rel} in the project")
            seen.add(rel)
            coord_file = _match_coordinates(source.stem, files, coord_suffix)
            if coord_file is None:
                skipped.append(name)
                continue
            coords = _read_coordinates(coord_file)
            if len(coords) == 0:
                skipped.append(name)
                continue
            link = tmp / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(source)
            # RELION 3.1: coordinates of "Micrographs/x.mrc" are <coord_dir>Micrographs/x<suffix>
            coord_name = rel.rsplit(".", 1)[0] + ".star"
            write_loop_blocks(tmp / "Coordinates" / coord_name, {"": coords})
            names.append(rel)
            keep.append(row)
            if negatives is not None:
                shape = _mrc_shape(source)
                picks = coords[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(dtype=float)
                centres = _whole_boxes(rel, negatives(rel, shape, picks), shape, box_px)
                if len(centres):
                    table_xy = pd.DataFrame(centres, columns=["rlnCoordinateX", "rlnCoordinateY"])
                    write_loop_blocks(tmp / "NegativeCoordinates" / coord_name, {"": table_xy})
                    negative_names.append(rel)
                    n_negative_centres += len(centres)
        if not keep:
            raise ValueError(
                f"no micrograph has particle coordinates (looked in "
                f"{len(files)} files for {len(table)} micrographs)"
            )
        if skipped:
            emit(
                f"{len(skipped)} micrographs have no coordinates and are skipped: "
                f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}"
            )
        mics = table.iloc[keep].drop(columns="_source").reset_index(drop=True)
        mics["rlnMicrographName"] = names
        write_loop_blocks(tmp / "micrographs.star", {"optics": optics, "micrographs": mics})
        command = _preprocess_command(
            "micrographs.star",
            "Coordinates/",
            "Particles/",
            "particles.star",
            box_px,
            rescale_px,
            radius,
            invert_contrast,
        )
        settings = {"progress": progress, "log": log, "timeout_s": timeout_s}
        _run_preprocess(command, tmp, "Particles", len(names), "extract", "extract.log", **settings)
        n = _count_rows(tmp / "particles.star", command, tmp)
        if n == 0:
            raise ValueError(
                f"relion_preprocess extracted no particle from {len(names)} micrographs"
            )
        n_negatives, negatives_star = 0, None
        if negative_names:
            # the same micrographs table (optics, CTF), restricted to those with negatives
            negative_mics = mics[mics["rlnMicrographName"].isin(negative_names)]
            write_loop_blocks(
                tmp / "micrographs_negatives.star",
                {"optics": optics, "micrographs": negative_mics.reset_index(drop=True)},
            )
            negative_command = _preprocess_command(
                "micrographs_negatives.star",
                "NegativeCoordinates/",
                "Negatives/",
                "negatives.star",
                box_px,
                rescale_px,
                radius,
                invert_contrast,
            )
            _run_preprocess(
                negative_command,
                tmp,
                "Negatives",
                len(negative_names),
                "negatives",
                "extract_negatives.log",
                **settings,
            )
            n_negatives = _count_rows(tmp / "negatives.star", negative_command, tmp)
            if n_negatives != n_negative_centres:
                raise RelionError(
                    f"relion_preprocess cut {n_negatives} of the {n_negative_centres} "
                    "negative boxes, all wholly inside their micrographs",
                    command=negative_command,
                    cwd=tmp,
                )
            negatives_star = out / "negatives.star"
        elif negatives is not None:
            emit(f"no room for a negative box on any of the {len(names)} micrographs")
        mic_pixel = float(optics["rlnMicrographPixelSize"].iloc[0])
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final_pixel = mic_pixel * box_px / final_box
    return Extraction(
        particles_star=out / "particles.star",
        project_dir=out,
        n_particles=n,
        n_micrographs=len(names),
        box_px=box_px,
        rescale_px=rescale_px if rescale_px != box_px else None,
        image_size_px=final_box,
        pixel_size_a=final_pixel,
        micrograph_pixel_size_a=mic_pixel,
        normalise=normalise,
        invert_contrast=invert_contrast,
        bg_radius_px=radius,
        skipped_micrographs=tuple(skipped),
        command=tuple(command),
        negatives_star=negatives_star,
        n_negatives=n_negatives,
        negative_micrographs=len(negative_names),
    )
