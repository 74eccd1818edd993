"""The embedded demo archive: simulated EMPIAR entries with ground truth, in a mirror directory.

``write_demo_archive(out)`` writes, for each map, one entry in the layout the local
EMPIAR-compatible server serves (:mod:`particleseg_model.access.mirror`)::

    OUT/empiar/EMPIAR-30001.json     entry record (picked-particles or micrographs imageset),
                                     cross-referencing EMD-95001
    OUT/emdb/EMD-95001.json          EMDB record with a (nominal) resolution of 3.2 A
    OUT/emdb_files/structures/EMD-95001/   EMDB's file layout, as real maps are published:
        map/emd_95001.map.gz         the map as projected (particle box and pixel size)
        header/emd-95001.xml         resolution, voxel size, dimensions
        masks/emd_95001_msk_1.map    its MaskCreate-style mask
    OUT/archive/30001/data/          (no map: real EMPIAR entries seldom hold one)
        Particles/particles_001.mrcs particle stacks (float32, normalised, contrast inverted)
        particles.star               RELION 3.1 (optics + particles: poses, origins in A, CTF);
                                     RELION 3.0 for the entries of ``relion30_entries``
                                     (``data_images``, no optics, ``rlnDetectorPixelSize`` /
                                     ``rlnMagnification``, origins in pixels ``rlnOriginX/Y``)
        ground_truth.csv             image_name, is_good, junk_kind, true pose/origin, defocus
        simulation.json              parameters, pixel size, noise level, mask threshold
        gallery.png                  noiseless (top) and noisy (bottom): good, each junk kind

A micrograph entry (by default the last one) ships instead ``Micrographs/mic_NNNN.mrc`` (raw
contrast: particles dark; extract with ``--invert_contrast``), ``Coordinates/mic_NNNN.star``
(RELION ``rlnCoordinateX/Y``: 0-based column/row of the box centre) and ``.box`` (EMAN: lower-left
corner x, y, width, height), ``micrographs_ctf.star`` and ``ground_truth.csv`` per coordinate.

Beside the entries, ``OUT/archive/realism.png`` and ``realism.json`` (where ``../shared``'s real
raw particle stacks are there) compare each particle entry's good particles with real ones:
spectra, contrast and galleries (:func:`write_realism`).

Ids are synthetic and cannot collide with real ones: EMPIAR 30001+, EMD 95001+. The archive is
written into a temporary directory beside ``out`` and renamed into place, so a failure never
leaves half an archive. Equal arguments give byte-identical files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from particleseg_model.access.fixtures import emdb_record
from particleseg_model.access.mirror import Mirror, emdb_header_xml
from particleseg_model.atomic import atomic_write_text
from particleseg_model.em.maps import (
    GENERATED_SHAPES,
    DensityMap,
    generate_map,
    load_map,
    make_mask,
    particle_diameter_px,
    prepare_map,
    write_mrc,
)
from particleseg_model.em.star import format_loop_blocks, write_loop_blocks
from particleseg_model.figures import write_png
from particleseg_model.simulation.simulate import (
    GOOD,
    JUNK_KINDS,
    SimulatedMicrographs,
    SimulatedParticles,
    SimulationConfig,
    normalise_images,
    simulate_micrographs,
    simulate_particles,
)

__all__ = [
    "FIRST_EMD_NUMBER",
    "FIRST_ENTRY_NUMBER",
    "NOMINAL_RESOLUTION_A",
    "ArchiveExistsError",
    "MapSource",
    "default_maps",
    "find_shared_data",
    "write_demo_archive",
    "write_png",
    "write_star",
]

log = logging.getLogger("particleseg.demo_archive")

FIRST_ENTRY_NUMBER = 30001
FIRST_EMD_NUMBER = 95001
# Nominal: below the 3.5 A eligibility cut. The simulated particles carry whatever detail the
# resampled map holds (a real 5.7 A/px map cannot reach it); the label states it is nominal.
NOMINAL_RESOLUTION_A = "3.2"
RELEASE_DATE = "2025-01-{day:02d}"
SHARED_ENV = "PARTICLESEG_SHARED_DATA"
REAL_MAPS = ("emd_1832.map", "emd_5625.map")
PARTICLES_CATEGORY = "picked particles - single frame - processed"
MICROGRAPHS_CATEGORY = "micrographs - single frame"
# mask as in the RELION tutorial: low-pass 15 A, extend 3 px, soft edge 6 px
MASK_LOWPASS_A, MASK_EXTEND_PX, MASK_SOFT_EDGE_PX = 15.0, 3.0, 6.0
# RELION 3.0 files give the pixel size as detector pixel (um) * 1e4 / magnification: with a
# magnification of 10000 the detector pixel is the pixel size in A, exactly as written
RELION30_MAGNIFICATION = 10000.0
RELION30_ENTRIES = (30002,)


class ArchiveExistsError(FileExistsError):
    """The output directory already holds an archive (or anything else)."""


@dataclass(frozen=True)
class MapSource:
    """Where an entry's map comes from: a map file, or a generated shape."""

    label: str
    path: Path | None = None
    shape: str | None = None

    @classmethod
    def parse(cls, value: str | os.PathLike | MapSource) -> MapSource:
        """``MapSource``, a path, or ``"generated:SHAPE"`` (SHAPE in GENERATED_SHAPES)."""
        if isinstance(value, MapSource):
            return value
        text = str(value)
        if text.startswith("generated:"):
            shape = text.split(":", 1)[1]
            if shape not in GENERATED_SHAPES:
                raise ValueError(
                    f"unknown generated map {text!r}; choose from "
                    f"{[f'generated:{s}' for s in GENERATED_SHAPES]}"
                )
            return cls(label=f"generated {shape} pseudo-atomic map", shape=shape)
        path = Path(text)
        stem = path.name.split(".")[0]
        label = f"EMD-{stem[4:]}" if stem.lower().startswith("emd_") else path.name
        return cls(label=label, path=path)

    def load(self, box: int, seed: int) -> DensityMap:
        if self.shape is not None:
            return generate_map(self.shape, box, seed=seed)
        assert self.path is not None
        return prepare_map(load_map(self.path), box)


def find_shared_data() -> Path | None:
    """``../shared/data`` beside the project checkout (or ``$PARTICLESEG_SHARED_DATA``)."""
    env = os.environ.get(SHARED_ENV)
    candidates = [Path(env)] if env else []
    # particleseg_model/simulation/demo_archive.py -> the folder that holds the checkout
    candidates.append(Path(__file__).resolve().parents[3] / "shared" / "data")
    return next((c for c in candidates if c.is_dir()), None)


def default_maps(shared_dir: Path | None) -> list[MapSource]:
    """The demo's maps: EMD-1832 and EMD-5625 from ``shared_dir/maps`` when both are there,
    plus a generated ring; else three generated maps of different shapes."""
    if shared_dir is not None:
        paths = [Path(shared_dir) / "maps" / name for name in REAL_MAPS]
        if all(p.is_file() for p in paths):
            return [MapSource.parse(p) for p in paths] + [MapSource.parse("generated:ring")]
    return [MapSource.parse(f"generated:{shape}") for shape in GENERATED_SHAPES]


# ------------------------------------------------------------------------------ file writers


def write_star(path: Path, blocks: dict[str, pd.DataFrame | dict[str, Any]]) -> Path:
    """Write STAR blocks as RELION 3.1 does, floats with 6 decimals so that equal simulations
    give equal bytes; text with white space is refused (the archive never needs quoting)."""
    return write_loop_blocks(path, blocks, decimals=6, strict_text=True)


# A 5x7 bitmap font for the gallery labels (only the letters the labels use).
_FONT = {
    "A": "01110100011000111111100011000110001",
    "B": "11110100011111010001100011000111110",
    "C": "01110100011000010000100001000101110",
    "D": "11110100011000110001100011000111110",
    "E": "11111100001111010000100001000011111",
    "F": "11111100001111010000100001000010000",
    "G": "01110100011000010111100011000101111",
    "I": "01110001000010000100001000010001110",
    "L": "10000100001000010000100001000011111",
    "M": "10001110111010110001100011000110001",
    "N": "10001110011010110011100011000110001",
    "O": "01110100011000110001100011000101110",
    "P": "11110100011000111110100001000010000",
    "R": "11110100011000111110101001001010001",
    "S": "01111100001000001110000010000111110",
    "T": "11111001000010000100001000010000100",
    "Y": "10001100010101000100001000010000100",
    "-": "00000000000000011111000000000000000",
    " ": "00000000000000000000000000000000000",
    "_": "00000000000000000000000000000011111",
}


def _text(label: str, width: int, height: int = 11) -> np.ndarray:
    """A label strip (white text on black), centred, clipped to ``width``."""
    strip = np.zeros((height, width), dtype=np.uint8)
    glyphs = [_FONT.get(c, _FONT[" "]) for c in label.upper()][: max(1, (width - 2) // 6)]
    x = max(1, (width - 6 * len(glyphs)) // 2)
    for glyph in glyphs:
        bitmap = np.array([int(b) for b in glyph], dtype=np.uint8).reshape(7, 5)
        strip[2:9, x : x + 5] = bitmap * 255
        x += 6
    return strip


def _to_uint8(image: np.ndarray) -> np.ndarray:
    low, high = np.percentile(image, [1, 99])
    scaled = (image - low) / (high - low) if high > low else np.zeros_like(image)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def gallery(columns: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> np.ndarray:
    """A grid: one column per (label, noiseless, noisy) example; label strip on top."""
    box = columns[0][1].shape[-1]
    gap = 2
    width = len(columns) * (box + gap) + gap
    height = 11 + 2 * (box + gap) + gap
    grid = np.full((height, width), 64, dtype=np.uint8)
    for k, (label, clean, noisy) in enumerate(columns):
        x = gap + k * (box + gap)
        grid[0:11, x : x + box] = _text(label, box)
        grid[11 + gap : 11 + gap + box, x : x + box] = _to_uint8(clean)
        grid[11 + 2 * gap + box : 11 + 2 * gap + 2 * box, x : x + box] = _to_uint8(noisy)
    return grid


def _gallery_columns(truth: pd.DataFrame, clean: np.ndarray) -> list[tuple[str, np.ndarray, int]]:
    """(label, noiseless image, row index) of the first good particle and of each junk kind."""
    columns = []
    kinds = truth["junk_kind"].to_numpy()
    for kind in (GOOD, *JUNK_KINDS):
        rows = np.flatnonzero(kinds == kind)
        if len(rows):
            label = "good" if kind == GOOD else kind.replace("_", " ")
            columns.append((label, clean[rows[0]], int(rows[0])))
    return columns


# ------------------------------------------------------------------------------ entries


def _size_text(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def _tree_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _imageset(
    name: str,
    directory: str,
    category: str,
    count: int,
    pixel: float,
    width: int,
    details: str,
    data_format: str,
    micrographs_pattern: str = "",
    picked_pattern: str = "",
    picked_directory: str = "",
) -> dict[str, Any]:
    return {
        "name": name,
        "directory": directory,
        "category": category,
        "header_format": "MRC",
        "data_format": data_format,
        "num_images_or_tilt_series": count,
        "frames_per_image": 1,
        "voxel_type": "32 BIT FLOAT",
        "pixel_width": round(pixel, 6),
        "image_width": str(width),
        "image_height": str(width),
        "details": details,
        "micrographs_file_pattern": micrographs_pattern,
        "picked_particles_file_pattern": picked_pattern,
        "picked_particles_directory": picked_directory,
    }


def _relion30_block(star: pd.DataFrame, optics: dict[str, Any], pixel: float) -> pd.DataFrame:
    """The particle table as RELION 3.0 wrote it: no optics group, the optics quantities on
    every row, the pixel size as ``rlnDetectorPixelSize`` (um) with ``rlnMagnification``,
    origins in pixels."""
    block = star.drop(columns=["rlnOpticsGroup"])
    for axis in "XY":
        position = block.columns.get_loc(f"rlnOrigin{axis}Angst")
        values = block.pop(f"rlnOrigin{axis}Angst").to_numpy() / pixel
        block.insert(position, f"rlnOrigin{axis}", values)  # pyright: ignore[reportArgumentType]
    for label in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"):
        block[label] = float(optics[label])
    block["rlnMagnification"] = RELION30_MAGNIFICATION
    block["rlnDetectorPixelSize"] = pixel * RELION30_MAGNIFICATION / 1e4
    return block


def _write_particles(
    data: Path, sim: SimulatedParticles, per_stack: int, relion30: bool = False
) -> list[str]:
    """Stacks, STAR file and ground truth of a particle entry; returns the stack paths.
    ``relion30``: the STAR file as RELION 3.0 wrote it (see :func:`_relion30_block`)."""
    n = len(sim.truth)
    stacks: list[str] = []
    names: list[str] = []
    for k, start in enumerate(range(0, n, per_stack), start=1):
        rel = f"Particles/particles_{k:03d}.mrcs"
        write_mrc(data / rel, sim.images[start : start + per_stack], sim.pixel_size_a, stack=True)
        stacks.append(rel)
        names += [f"{j + 1:06d}@{rel}" for j in range(min(per_stack, n - start))]
    star = sim.star.copy()
    star["rlnImageName"] = names
    truth = sim.truth.copy()
    truth["image_name"] = names
    if relion30:
        block = _relion30_block(star, sim.optics, sim.pixel_size_a)
        text = format_loop_blocks({"images": block}, decimals=6, strict_text=True)
        # RELION 3.0 wrote no "# version" stamps: a stamp would make the file 3.1
        text = text.replace("\n# version 30001\n", "\n")
        atomic_write_text(data / "particles.star", text)
    else:
        write_star(data / "particles.star", {"optics": sim.optics, "particles": star})
    truth.to_csv(data / "ground_truth.csv", index=False, float_format="%.6f")
    return stacks


def _write_micrographs(data: Path, sim: SimulatedMicrographs) -> None:
    """Micrographs, coordinate files (STAR and EMAN .box), CTF STAR and ground truth."""
    half = sim.box // 2
    for name, image in zip(sim.names, sim.micrographs, strict=True):
        write_mrc(data / name, image, sim.pixel_size_a)
        stem = Path(name).stem
        picks = sim.picks[sim.picks["micrograph_name"] == name]
        write_star(
            data / "Coordinates" / f"{stem}.star",
            {
                "": pd.DataFrame(
                    {
                        "rlnCoordinateX": picks["coordinate_x_px"].astype(float).to_numpy(),
                        "rlnCoordinateY": picks["coordinate_y_px"].astype(float).to_numpy(),
                    }
                )
            },
        )
        lines = [
            f"{x - half}\t{y - half}\t{sim.box}\t{sim.box}"
            for x, y in zip(picks["coordinate_x_px"], picks["coordinate_y_px"], strict=True)
        ]
        (data / "Coordinates" / f"{stem}.box").write_text("\n".join(lines) + "\n")
    write_star(data / "micrographs_ctf.star", {"optics": sim.optics, "micrographs": sim.ctf})
    sim.picks.to_csv(data / "ground_truth.csv", index=False, float_format="%.6f")


def _entry(
    number: int,
    emd_number: int,
    source: MapSource,
    density: DensityMap,
    config: SimulationConfig,
    seed: np.random.SeedSequence,
    root: Path,
    micrographs: bool,
    micrograph_size: int,
    per_stack: int,
    relion30: bool = False,
) -> dict[str, Any]:
    """Simulate and write one entry's files (its map and mask into the mirror's EMDB file
    layout, as EMDB publishes maps); returns its EMPIAR record."""
    data = root / "archive" / str(number) / "data"
    emd = f"EMD-{emd_number}"
    map_rel = f"structures/{emd}/map/emd_{emd_number}.map.gz"
    mask_rel = f"structures/{emd}/masks/emd_{emd_number}_msk_1.map"
    mask, threshold = make_mask(
        density, lowpass_a=MASK_LOWPASS_A, extend_px=MASK_EXTEND_PX, soft_edge_px=MASK_SOFT_EDGE_PX
    )
    diameter = particle_diameter_px(mask)
    pixel, box = density.pixel_size_a, density.box
    staging = root / ".staging"  # the MRC files before they are gzipped into the layout
    write_mrc(staging / f"emd_{emd_number}.map", density.data, pixel)
    write_mrc(staging / "mask.mrc", mask, pixel)
    Mirror(root).put_emdb_map(
        emd,
        staging / f"emd_{emd_number}.map",
        header_xml=emdb_header_xml(
            emd,
            resolution_a=float(NOMINAL_RESOLUTION_A),
            voxel_size_a=pixel,
            box=(box, box, box),
        ),
        masks=[staging / "mask.mrc"],
    )
    shutil.rmtree(staging)
    junk = ", ".join(config.junk_kinds) if config.junk_fraction > 0 else "none"
    common = (
        f"Simulated by particleSeg from {source.label} (pixel {pixel:.4f} A, box {box}); "
        f"ground truth in data/ground_truth.csv; map and mask in EMDB ({emd}: {map_rel}, "
        f"{mask_rel}); junk {config.junk_fraction:.0%} ({junk}); per-pixel SNR {config.snr:g}."
    )
    if micrographs:
        sim_m = simulate_micrographs(
            density, config, seed=seed, diameter_px=diameter, size=micrograph_size, keep_clean=True
        )
        _write_micrographs(data, sim_m)
        assert sim_m.clean_picks is not None
        columns = []
        for label, clean, index in _gallery_columns(sim_m.picks, sim_m.clean_picks):
            row = sim_m.picks.iloc[index]
            m = sim_m.names.index(row.micrograph_name)
            x0, y0 = row.coordinate_x_px - box // 2, row.coordinate_y_px - box // 2
            # the box as extraction cuts it, contrast inverted like the clean one
            columns.append((label, clean, -sim_m.micrographs[m, y0 : y0 + box, x0 : x0 + box]))
        imageset = _imageset(
            f"Micrographs and particle coordinates simulated from {source.label}",
            "data/Micrographs",
            MICROGRAPHS_CATEGORY,
            len(sim_m.names),
            pixel,
            micrograph_size,
            common + " Micrographs in raw contrast (particles dark: extract with "
            "--invert_contrast); CTF per micrograph in data/micrographs_ctf.star; particle "
            "coordinates as RELION STAR (rlnCoordinateX/Y, 0-based box centre) and EMAN .box "
            "(lower-left corner).",
            "MRC",
            micrographs_pattern="data/Micrographs/*.mrc",
            picked_pattern="data/Coordinates/*.star",
            picked_directory="data/Coordinates",
        )
        n_items, sim_noise, sim_signal = len(sim_m.picks), sim_m.noise_sigma, sim_m.signal_sigma
        layout = {
            "kind": "micrographs",
            "micrographs": sim_m.names,
            "micrograph_size_px": micrograph_size,
            "coordinates": [f"Coordinates/{Path(n).stem}.star" for n in sim_m.names],
            "ctf_star": "micrographs_ctf.star",
        }
        title = (
            f"[simulated] {source.label}: {len(sim_m.names)} micrographs with "
            f"{n_items} picked particle coordinates"
        )
    else:
        sim_p = simulate_particles(density, config, seed=seed, diameter_px=diameter)
        stacks = _write_particles(data, sim_p, per_stack, relion30)
        assert sim_p.clean is not None
        columns = [
            (label, clean, sim_p.images[index])
            for label, clean, index in _gallery_columns(sim_p.truth, sim_p.clean)
        ]
        imageset = _imageset(
            f"Particles simulated from {source.label}",
            "data/Particles",
            PARTICLES_CATEGORY,
            len(sim_p.truth),
            pixel,
            box,
            common
            + (
                " Extracted, normalised particles (white on dark) and their RELION 3.0 STAR "
                "file data/particles.star (data_images, no optics: rlnDetectorPixelSize and "
                "rlnMagnification, origins in pixels) with poses and CTF."
                if relion30
                else " Extracted, normalised particles (white on dark) and their RELION 3.1 "
                "STAR file data/particles.star with poses and CTF."
            ),
            "MRCS",
        )
        n_items, sim_noise, sim_signal = len(sim_p.truth), sim_p.noise_sigma, sim_p.signal_sigma
        layout = {
            "kind": "particles",
            "stacks": stacks,
            "star": "particles.star",
            "star_format": "relion-3.0" if relion30 else "relion-3.1",
        }
        title = f"[simulated] {source.label}: {n_items} particles with known poses"
    write_png(
        data / "gallery.png",
        gallery(columns),
        {
            "Title": title,
            "Description": "columns: good particle, then each junk kind; top row noiseless "
            "(CTF applied), bottom row noisy as written",
        },
    )
    info = {
        "empiar_id": f"EMPIAR-{number}",
        "emdb_id": emd,
        "map_source": source.label,
        "map_file": str(source.path.name) if source.path else None,
        "map": map_rel,
        "mask_file": mask_rel,
        "pixel_size_a": pixel,
        "box": box,
        "particle_diameter_px": round(diameter, 2),
        "n_items": n_items,
        "junk_fraction": config.junk_fraction,
        "junk_kinds": list(config.junk_kinds),
        "snr": config.snr,
        "noise_sigma": sim_noise,
        "signal_sigma": sim_signal,
        "voltage_kv": config.voltage_kv,
        "cs_mm": config.cs_mm,
        "amplitude_contrast": config.amplitude_contrast,
        "defocus_range_a": list(config.defocus_range_a),
        "mask": {
            "threshold": threshold,
            "lowpass_a": MASK_LOWPASS_A,
            "extend_px": MASK_EXTEND_PX,
            "soft_edge_px": MASK_SOFT_EDGE_PX,
        },
        "ground_truth": "ground_truth.csv",
        "layout": layout,
        "seed_entropy": str(seed.entropy),
        "seed_spawn_key": list(seed.spawn_key),
    }
    (data / "simulation.json").write_text(json.dumps(info, indent=1) + "\n")
    day = number - FIRST_ENTRY_NUMBER + 1
    return {
        "title": title,
        "status": "REL",
        "release_date": RELEASE_DATE.format(day=min(day, 28)),
        "update_date": RELEASE_DATE.format(day=min(day, 28)),
        "dataset_size": _size_text(_tree_size(data)),
        "experiment_type": "EMDB",
        "cross_references": [{"name": emd}],
        "citation": [],
        "imagesets": [imageset],
    }


def _check_out(out: Path) -> None:
    if out.is_file():
        raise ArchiveExistsError(f"{out}: is a file, not a directory for the archive")
    if out.is_dir():
        held = [name for name in ("empiar", "emdb", "archive") if (out / name).exists()]
        if held:
            raise ArchiveExistsError(
                f"{out}: already holds an archive ({out / held[0]} "
                "exists); remove it or choose another directory"
            )
        if any(out.iterdir()):
            raise ArchiveExistsError(f"{out}: directory is not empty")


# Real raw particle stacks of ../shared/data (name, file, recorded dark: invert), the reference
# of the archive's realism figure
REAL_STACKS = (
    ("real: ASPIRE raw", "particles/aspire_sample.mrcs", False),
    ("real: EMPIAR-10076 raw", "real/cryodrgn_empiar10076/empiar_10076_7.mrc", True),
)


def write_realism(archive: Path, shared_dir: Path | None) -> dict[str, Any] | None:
    """``archive/realism.png`` and ``realism.json``: the good particles of every simulated
    particle entry beside the real raw stacks of :data:`REAL_STACKS` (spectra, contrast,
    galleries at 64 px; :mod:`particleseg_model.simulation.realism`). None, and nothing
    written, without the real stacks (a clone without ``../shared``)."""
    import mrcfile

    from particleseg_model.em.mrc import read_particles
    from particleseg_model.simulation.realism import compare_sets, realism_png, spectrum_distance

    if shared_dir is None:
        return None
    sets: dict[str, np.ndarray] = {}
    for name, rel, invert in REAL_STACKS:
        path = Path(shared_dir) / rel
        if path.is_file():
            with mrcfile.open(path, permissive=True) as f:
                data = np.asarray(f.data, dtype=np.float32)
            stack = data.reshape(-1, *data.shape[-2:])
            sets[name] = normalise_images(-stack if invert else stack)[0]
    if not sets:
        return None
    real = list(sets)
    for info_path in sorted((archive / "archive").glob("*/data/simulation.json")):
        info = json.loads(info_path.read_text())
        if info["layout"]["kind"] != "particles":
            continue
        data = info_path.parent
        truth = pd.read_csv(data / "ground_truth.csv")
        names = truth.loc[truth["is_good"].astype(bool), "image_name"].head(200).tolist()
        stack = read_particles(names, base_dir=data).astype(np.float32)
        sets[f"sim {info['empiar_id']} ({info['map_source']})"] = stack
    if len(sets) == len(real):
        return None
    freq, spectra, contrasts, images = compare_sets(sets)
    figures = {
        name: {
            "n": len(sets[name]),
            "contrast_median": round(float(np.median(contrasts[name])), 3),
            "spectrum_distance_to": {
                r: round(spectrum_distance(spectra[name], spectra[r]), 3) for r in real
            },
        }
        for name in sets
    }
    realism_png(
        archive / "archive" / "realism.png",
        freq,
        spectra,
        contrasts,
        images,
        title="the demo's simulated particles beside real raw ones (normalised, 64 px)",
    )
    atomic_write_text(archive / "archive" / "realism.json", json.dumps(figures, indent=1) + "\n")
    return figures


def write_demo_archive(
    out: str | os.PathLike,
    *,
    maps: Sequence[str | os.PathLike | MapSource] | None = None,
    n_particles: int = 600,
    box: int = 128,
    junk_fraction: float = 0.3,
    seed: int = 0,
    snr: float = 0.1,
    junk_kinds: Sequence[str] = JUNK_KINDS,
    micrograph_entries: int = 1,
    micrograph_size: int = 1024,
    particles_per_stack: int = 1000,
    relion30_entries: Sequence[int] = RELION30_ENTRIES,
    progress: bool = True,
) -> list[str]:
    """Write the simulated demo archive into the mirror directory ``out``; return its EMPIAR ids.

    Args:
        maps: map files (``.mrc``/``.map``) or ``"generated:SHAPE"``; default
            :func:`default_maps` of :func:`find_shared_data`. One entry per map.
        n_particles: particles (or picks, for a micrograph entry) per entry.
        box: particle box in pixels (even); maps are resampled to it (:func:`prepare_map`).
        junk_fraction: share of junk in [0, 1); ``junk_kinds`` picks the kinds.
        seed: the whole archive is a function of the arguments and this seed.
        snr: per-pixel signal-to-noise ratio (see :mod:`particleseg_model.simulation.simulate`).
        micrograph_entries: how many of the last entries ship micrographs + coordinates.
        relion30_entries: the EMPIAR numbers of the particle entries whose STAR file is
            written as RELION 3.0 (as old depositions are); micrograph entries ignore it.
    Raises:
        ArchiveExistsError: ``out`` exists and is not an empty directory.
        MapError: a map is unusable (not cubic, no voxel size, empty, NaN); names the file.
        ValueError: bad numbers (junk fraction outside [0, 1), odd box, ...).
    """
    out = Path(out)
    config = SimulationConfig(
        n_particles=n_particles, junk_fraction=junk_fraction, junk_kinds=tuple(junk_kinds), snr=snr
    )
    if box < 32 or box % 2:
        raise ValueError(f"box {box} must be even and at least 32 pixels")
    if particles_per_stack < 1:
        raise ValueError(f"particles_per_stack must be positive, got {particles_per_stack}")
    if maps is None:
        sources = default_maps(find_shared_data())
    else:
        sources = [MapSource.parse(m) for m in maps]
        if not sources:
            raise ValueError("no maps given to simulate from")
    _check_out(out)
    # load and validate every map before writing anything
    densities = [source.load(box, seed + k) for k, source in enumerate(sources)]

    from particleseg_model.progress import progress as progress_bar

    out.parent.mkdir(parents=True, exist_ok=True)
    # a folder swap (built under a temporary name, then one rename), not a file write
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    ids: list[str] = []
    try:
        mirror = Mirror(tmp)
        seeds = np.random.SeedSequence(seed).spawn(len(sources))
        first_micrograph = len(sources) - max(0, micrograph_entries)
        bar = progress_bar(
            total=len(sources),
            desc="demo archive",
            unit="entry",
            disable=None if progress else True,
        )
        for k, (source, density) in enumerate(zip(sources, densities, strict=True)):
            number, emd_number = FIRST_ENTRY_NUMBER + k, FIRST_EMD_NUMBER + k
            record = _entry(
                number,
                emd_number,
                source,
                density,
                config,
                seeds[k],
                tmp,
                micrographs=k >= first_micrograph,
                micrograph_size=micrograph_size,
                per_stack=particles_per_stack,
                relion30=number in relion30_entries,
            )
            emdb = emdb_record(NOMINAL_RESOLUTION_A)
            emdb["emdb_id"] = f"EMD-{emd_number}"
            emdb["admin"] = {
                "title": {
                    "valueOf_": f"[simulated] particleSeg demo map from "
                    f"{source.label} (nominal resolution)"
                }
            }
            mirror.put_emdb(f"EMD-{emd_number}", emdb)
            mirror.put_entry(f"EMPIAR-{number}", record)
            ids.append(f"EMPIAR-{number}")
            log.info("wrote EMPIAR-%s (%s)", number, record["title"])
            bar.update(1)
        bar.close()
        write_realism(tmp, find_shared_data())
        if out.is_dir():
            out.rmdir()  # empty (checked above); rename cannot replace a directory portably
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ids
