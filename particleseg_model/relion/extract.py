"""Particle extraction from micrographs and coordinate files with ``relion_preprocess``."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

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
    "extract_particles",
]


# ------------------------------------------------------------------------------ extraction


@dataclass(frozen=True)
class Extraction:
    """What :func:`extract_particles` made.

    ``particles_star`` has image names relative to ``project_dir``. ``box_px`` is the box cut
    from the micrographs; ``image_size_px`` the box of the written particles (``rescale_px``
    when rescaled); ``pixel_size_a`` theirs; ``bg_radius_px`` the normalisation radius in
    pixels of the written particles (None without normalisation).
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
            write_loop_blocks(tmp / "Coordinates" / (rel.rsplit(".", 1)[0] + ".star"), {"": coords})
            names.append(rel)
            keep.append(row)
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
        command = [
            "relion_preprocess",
            "--i",
            "micrographs.star",
            "--coord_dir",
            "Coordinates/",
            "--coord_suffix",
            ".star",
            "--part_dir",
            "Particles/",
            "--part_star",
            "particles.star",
            "--extract",
            "--extract_size",
            str(box_px),
        ]
        if rescale_px is not None and rescale_px != box_px:
            command += ["--scale", str(rescale_px)]
        if normalise:
            command += ["--norm", "--bg_radius", str(radius)]
        if invert_contrast:
            command += ["--invert_contrast"]

        from particleseg_model.progress import progress as progress_bar

        bar = progress_bar(
            total=len(names),
            desc="extract",
            unit="mic",
            disable=None if progress is None else not progress,
        )

        def tick() -> None:
            done = (
                sum(1 for _ in (tmp / "Particles").rglob("*.mrcs"))
                if (tmp / "Particles").is_dir()
                else 0
            )
            if done > bar.n:
                bar.update(done - bar.n)

        try:
            run_relion(
                command,
                cwd=tmp,
                log=log,
                transcript=tmp / "extract.log",
                tick=tick,
                timeout_s=timeout_s,
            )
        finally:
            bar.close()
        star_path = tmp / "particles.star"
        if not star_path.is_file():
            raise RelionError(
                f"relion_preprocess wrote no particles.star in {tmp}", command=command, cwd=tmp
            )
        blocks = _read_blocks(star_path)
        parts = blocks.get("particles")
        n = 0 if parts is None or isinstance(parts, dict) else len(parts)
        if n == 0:
            raise ValueError(
                f"relion_preprocess extracted no particle from {len(names)} micrographs"
            )
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
    )
