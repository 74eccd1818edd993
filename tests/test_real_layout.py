"""A partition shaped as a real EMPIAR entry goes through the corpus pipeline.

The layout is EMPIAR-10076's (bacterial 50S ribosome assembly intermediates), from real facts
(the fixture's provenance: cryoDRGN's ``tests/data/empiar_10076_7.*`` in
``../shared/data/real/cryodrgn_empiar10076`` and the cryodrgn_empiar README): one
``picked particles - single frame - unprocessed`` imageset in ``data``, the particle stack
``data/L17Combine_weight_local.mrc`` (an ``.mrc`` stack whose header holds no pixel size), its
RELION 3.0 STAR file ``data/Parameters.star`` (a bare ``data_`` block, no optics, the pixel
size as ``rlnDetectorPixelSize`` 5 um / ``rlnMagnification`` 38168 = 1.31 A, 300 kV, Cs 2.7 mm,
amplitude contrast 0.07) and no map in the archive: the map is only in EMDB's file layout.

Synthetic, to keep the test small and self-contained: the particle images (simulated from a
generated map, box 128 px instead of the real 320, all good particles), their poses (deposited
as RELION 3.0 does, ``rlnAngle*`` and ``rlnOriginX/Y`` in pixels, so no refinement runs), the
two EMDB links and their resolutions (the fixture knows no link for 10076), and the maps.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from particleseg_model.access.dataset import NothingToFetch
from particleseg_model.access.emdb_files import EmdbFileError
from particleseg_model.access.empiar import Imageset, parse_entry
from particleseg_model.access.fixtures import emdb_record
from particleseg_model.access.mirror import Mirror, emdb_header_xml
from particleseg_model.corpus import build
from particleseg_model.corpus.manifests import StacksManifest
from particleseg_model.corpus.reference import choose_linked_map
from particleseg_model.corpus.store import open_corpus
from particleseg_model.em.maps import DensityMap, generate_map, make_mask, write_mrc
from particleseg_model.em.particles import ParticleTableError
from particleseg_model.em.star import format_loop_blocks, read_star
from particleseg_model.simulation.simulate import SimulationConfig, simulate_particles

REPO = Path(__file__).resolve().parents[1]

# real facts of EMPIAR-10076's deposition
EMPIAR_ID = "EMPIAR-10076"
STAR_NAME = "Parameters.star"
STACK_NAME = "L17Combine_weight_local.mrc"
MAGNIFICATION = 38168.0
DETECTOR_PIXEL_UM = 5.0
PIXEL_A = DETECTOR_PIXEL_UM * 1e4 / MAGNIFICATION  # 1.30999... A, "1.31" in the entry
VOLTAGE_KV, CS_MM, AMPLITUDE_CONTRAST = 300.0, 2.7, 0.07
REAL_LABELS = [  # the columns of the real file, in its order
    "rlnImageName",
    "rlnMicrographName",
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnMagnification",
    "rlnDetectorPixelSize",
]
# synthetic
N_PARTICLES, BOX = 32, 128
MAP_VOXEL_A, MAP_BOX = 2 * PIXEL_A, 64  # EMDB's map at another sampling than the particles
LINKED = {"EMD-98076": "3.1", "EMD-98077": "4.5"}  # the particles come from the best one


def _entry_record(cross_references: list[str], details: str = "") -> dict:
    return {
        "title": "Bacterial 50S ribosome assembly intermediates (L17-depleted) [test layout]",
        "status": "REL",
        "release_date": "2017-05-01",
        "update_date": "2017-05-01",
        "dataset_size": "20.0 MB",
        "experiment_type": "EMDB",
        "cross_references": [{"name": e} for e in cross_references],
        "citation": [],
        "imagesets": [
            {
                "name": "Particles",
                "directory": "data",
                "category": "picked particles - single frame - unprocessed",
                "header_format": "MRC",
                "data_format": "MRC",
                "num_images_or_tilt_series": N_PARTICLES,
                "frames_per_image": 1,
                "voxel_type": "32 BIT FLOAT",
                "pixel_width": 1.31,
                "image_width": str(BOX),
                "image_height": str(BOX),
                "details": details or f"Particle stack {STACK_NAME}; CTF in {STAR_NAME}.",
                "micrographs_file_pattern": "",
                "picked_particles_file_pattern": f"data/{STAR_NAME}",
                "picked_particles_directory": "",
            }
        ],
    }


def _write_stack(path: Path, images: np.ndarray) -> None:
    """An MRC stack as the real one: mode 2, no pixel size in the header (cell 0)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(images.astype(np.float32))
        mrc.header.ispg = 1


def _relion30_star(path: Path, table: pd.DataFrame) -> None:
    """A RELION 3.0 particle STAR: one bare ``data_`` loop, no version stamps."""
    text = format_loop_blocks({"": table}).replace("\n# version 30001\n", "\n")
    path.write_text(text)


def _put_map(mirror: Mirror, emd: str, density: DensityMap, resolution: str, tmp: Path) -> None:
    mrc = tmp / f"{emd}.mrc"
    write_mrc(mrc, density.data, density.pixel_size_a)
    mask, _ = make_mask(density)
    write_mrc(tmp / f"{emd}_mask.mrc", mask, density.pixel_size_a)
    mirror.put_emdb(emd, emdb_record(resolution))
    mirror.put_emdb_map(
        emd,
        mrc,
        header_xml=emdb_header_xml(
            emd, resolution_a=float(resolution), voxel_size_a=density.pixel_size_a, box=(64,) * 3
        ),
        masks=[tmp / f"{emd}_mask.mrc"],
    )


def write_real_layout(root: Path, *, seed: int = 7) -> dict:
    """The EMPIAR-10076-shaped entry in a mirror at ``root``; returns what the test checks."""
    mirror = Mirror(root)
    staging = root.parent / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    # the map the particles were refined against, at EMDB's sampling; a worse, other one
    maps = {
        "EMD-98076": generate_map("globular", MAP_BOX, seed=seed, pixel_size_a=MAP_VOXEL_A),
        "EMD-98077": generate_map("ring", MAP_BOX, seed=seed + 1, pixel_size_a=MAP_VOXEL_A),
    }
    for emd, density in maps.items():
        _put_map(mirror, emd, density, LINKED[emd], staging)
    # the particles at the deposited sampling: the map resampled from 2.62 to 1.31 A
    from particleseg_model.em.maps import fourier_resample, pad_or_crop

    best = maps["EMD-98076"]
    fine = pad_or_crop(fourier_resample(best.data, 2 * MAP_BOX), BOX)
    at_particles = DensityMap(fine.astype(np.float32), PIXEL_A, "EMD-98076")
    config = SimulationConfig(
        n_particles=N_PARTICLES,
        junk_fraction=0.0,
        snr=1.0,
        voltage_kv=VOLTAGE_KV,
        cs_mm=CS_MM,
        amplitude_contrast=AMPLITUDE_CONTRAST,
        defocus_range_a=(14000.0, 16000.0),
    )
    sim = simulate_particles(at_particles, config, seed=seed, stack_name=STACK_NAME)
    data = mirror.archive_path("10076/data")
    _write_stack(data / STACK_NAME, sim.images)
    star = sim.star
    table = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1}@{STACK_NAME}" for i in range(N_PARTICLES)],
            "rlnMicrographName": [str(i + 1) for i in range(N_PARTICLES)],
            "rlnDefocusU": star["rlnDefocusU"].round(1).to_numpy(),
            "rlnDefocusV": star["rlnDefocusV"].round(1).to_numpy(),
            "rlnDefocusAngle": star["rlnDefocusAngle"].round(2).to_numpy(),
            "rlnVoltage": VOLTAGE_KV,
            "rlnSphericalAberration": CS_MM,
            "rlnAmplitudeContrast": AMPLITUDE_CONTRAST,
            "rlnMagnification": MAGNIFICATION,
            "rlnDetectorPixelSize": DETECTOR_PIXEL_UM,
            "rlnAngleRot": star["rlnAngleRot"].to_numpy(),
            "rlnAngleTilt": star["rlnAngleTilt"].to_numpy(),
            "rlnAnglePsi": star["rlnAnglePsi"].to_numpy(),
            "rlnOriginX": star["rlnOriginXAngst"].to_numpy() / PIXEL_A,
            "rlnOriginY": star["rlnOriginYAngst"].to_numpy() / PIXEL_A,
        }
    )
    _relion30_star(data / STAR_NAME, table)
    mirror.put_entry(EMPIAR_ID, _entry_record(list(LINKED)))
    with gzip.open(root / "emdb_files/structures/EMD-98076/map/emd_98076.map.gz") as packed:
        sha = hashlib.sha256(packed.read()).hexdigest()
    return {"sha256": sha}


# ------------------------------------------------------------------------------ the real facts


def test_the_layout_keeps_the_real_facts(shared_data: Path, tmp_path: Path) -> None:
    """The test entry's STAR file has the real file's layout and values (where real)."""
    real = read_star(shared_data / "real/cryodrgn_empiar10076/empiar_10076_7.star")
    assert real.version == "3.0" and real.optics is None and real.particles_block == ""
    assert list(real.blocks[""].columns) == REAL_LABELS
    assert real.particles["pixel_size_a"].iloc[0] == pytest.approx(PIXEL_A)
    assert round(PIXEL_A, 2) == 1.31
    first = real.blocks[""].iloc[0]
    assert (first.rlnVoltage, first.rlnSphericalAberration, first.rlnAmplitudeContrast) == (
        VOLTAGE_KV,
        CS_MM,
        AMPLITUDE_CONTRAST,
    )
    with mrcfile.open(shared_data / "real/cryodrgn_empiar10076/empiar_10076_7.mrc") as mrc:
        assert float(mrc.voxel_size.x) == 0.0  # the real stack's header gives no pixel size
    write_real_layout(tmp_path / "mirror")
    ours = read_star(tmp_path / "mirror/archive/10076/data" / STAR_NAME)
    assert ours.version == "3.0" and ours.particles_block == ""
    assert list(ours.blocks[""].columns)[: len(REAL_LABELS)] == REAL_LABELS
    assert ours.particles["image_size_px"].isna().all()


# ------------------------------------------------------------------------------ map choice


def _entry(links: list[str], details: str = ""):
    return parse_entry(EMPIAR_ID, _entry_record(links, details))


def test_map_choice_rules() -> None:
    asked: list[str] = []
    resolutions = {"EMD-1001": 4.0, "EMD-1002": 3.0, "EMD-1003": 3.0, "EMD-1004": None}

    def resolution_of(emd: str) -> float | None:
        asked.append(emd)
        return resolutions[emd]

    only = choose_linked_map(_entry(["EMD-1001"]), None, resolution_of)
    assert (only.emdb_id, only.chosen, asked) == ("EMD-1001", "the entry's only linked map", [])
    links = ["EMD-1001", "EMD-1002", "EMD-1003", "EMD-1004"]
    best = choose_linked_map(_entry(links), None, resolution_of)
    # the best resolution; a tie goes to the one listed first among the tied
    assert (best.emdb_id, best.chosen) == ("EMD-1002", "best of 4 linked maps")
    assert best.candidates == resolutions
    entry = _entry(links, details="Particles refined against EMD-1001 (consensus).")
    named = choose_linked_map(entry, entry.imagesets[0], resolution_of)
    assert (named.emdb_id, named.chosen) == ("EMD-1001", "named in the imageset's details")
    entry = _entry(links, details="Classes of EMD-1001 and EMD-1003; EMD-9999 is elsewhere.")
    two = choose_linked_map(entry, entry.imagesets[0], resolution_of)
    assert (two.emdb_id, two.chosen) == (
        "EMD-1003",
        "best of 2 maps named in the imageset's details",
    )
    with pytest.raises(NothingToFetch, match=r"EMPIAR-10076: no reference map: .*cross_references"):
        choose_linked_map(_entry([]), None, resolution_of)
    with pytest.raises(NothingToFetch, match=r"among 2 linked maps \(EMD-1004, EMD-1005\)"):
        choose_linked_map(_entry(["EMD-1004", "EMD-1005"]), None, lambda emd: None)
    assert isinstance(_entry([]).imagesets[0], Imageset)


# ------------------------------------------------------------------------------ bad input


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    root = tmp_path / "mirror"
    write_real_layout(root)
    return root


class _Api:
    """The EMDB API's resolutions of the linked maps (no server needed)."""

    def resolution_a(self, emd: str) -> float:
        return float(LINKED[emd])


def _fetch(root: Path, work: Path, entry=None, emdb=None) -> build.StacksResult:
    entry = entry or parse_entry(EMPIAR_ID, Mirror(root).entry(EMPIAR_ID)[EMPIAR_ID])
    return build.fetch_stacks(
        entry,
        str(root / "archive"),
        work / "downloads",
        work / "particle_stacks",
        emdb_files_url=str(root / "emdb_files"),
        emdb=emdb,
        map_cache=work / "emdb",
    )


def test_relion30_entry_completed_and_map_from_emdb(layout: Path, tmp_path: Path) -> None:
    """Without the EMDB API (no resolutions), two links: the choice needs a resolution."""
    with pytest.raises(NothingToFetch, match="none states a resolution"):
        _fetch(layout, tmp_path / "work")
    entry = parse_entry(EMPIAR_ID, _entry_record(["EMD-98076"]))
    result = _fetch(layout, tmp_path / "work", entry)
    stacks = result.manifest
    assert stacks.n_particles == N_PARTICLES and stacks.box_px == BOX
    assert stacks.pixel_size_a == pytest.approx(PIXEL_A)
    # the 3.0 table completed from the stack and written as RELION 3.1 in the stacks folder
    assert stacks.particles_star == tmp_path / "work/particle_stacks/particles.star"
    assert stacks.base_dir == tmp_path / "work/downloads/data"
    written = read_star(stacks.particles_star)
    assert written.version == "3.1" and (written.particles["image_size_px"] == BOX).all()
    assert stacks.has_poses
    reference = stacks.reference
    assert reference is not None and reference.chosen == "the entry's only linked map"
    assert reference.resolution_a == pytest.approx(3.1)  # from the header XML
    assert reference.voxel_size_a == pytest.approx(MAP_VOXEL_A, abs=1e-5)


def test_a_map_deposited_in_the_archive_is_used_and_recorded(layout: Path, tmp_path: Path) -> None:
    """Some entries deposit a map beside the particles: used as it is, recorded as such; of
    several, the best-resolution one named after a linked map; several unnamed: EMDB decides."""
    deposited = layout / "archive/10076/data/Map"
    deposited.mkdir()
    with gzip.open(layout / "emdb_files/structures/EMD-98077/map/emd_98077.map.gz") as packed:
        ring = packed.read()
    (deposited / "emd_98077.map").write_bytes(ring)
    (deposited / "emd_98077_mask.mrc").write_bytes(ring)  # a mask is never the density
    stacks = _fetch(layout, tmp_path / "one").manifest
    reference = stacks.reference
    assert reference is not None
    assert (reference.source, reference.chosen) == ("archive", "deposited in the archive")
    assert reference.emdb_id == "EMD-98077" and reference.path.parent.name == "Map"
    assert reference.sha256 == hashlib.sha256(ring).hexdigest()
    assert stacks.density_map() == reference.path
    assert not (tmp_path / "one" / "emdb").exists()  # nothing fetched from EMDB

    (deposited / "emd_98076.map").write_bytes(ring)  # two named after linked maps
    several = _fetch(layout, tmp_path / "two", emdb=_Api()).manifest.reference
    assert several is not None and several.emdb_id == "EMD-98076"
    assert several.chosen == "deposited in the archive, best of 2 named after linked maps"
    assert several.candidates == {"EMD-98076": 3.1, "EMD-98077": 4.5}
    for name in ("emd_98076.map", "emd_98077.map"):
        (deposited / name).rename(deposited / name.replace("emd_", "map_"))
    unnamed = _fetch(layout, tmp_path / "three", emdb=_Api()).manifest.reference
    assert unnamed is not None  # neither file says which map it is: EMDB's, best of 2
    assert (unnamed.source, unnamed.emdb_id) == ("emdb", "EMD-98076")
    assert unnamed.chosen == "best of 2 linked maps"


def _manifest_bytes(work: Path) -> bytes:
    return (work / "particle_stacks" / "manifest.json").read_bytes()


def _fresh(tmp_path: Path, name: str, manifest: bytes) -> Path:
    """A work folder holding only the previous manifest (fresh downloads and map cache)."""
    work = tmp_path / name
    (work / "particle_stacks").mkdir(parents=True)
    (work / "particle_stacks" / "manifest.json").write_bytes(manifest)
    return work


def test_bad_input_names_the_file_and_keeps_the_manifest(layout: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    entry = parse_entry(EMPIAR_ID, _entry_record(["EMD-98076"]))
    _fetch(layout, work, entry)
    before = _manifest_bytes(work)
    star_file = layout / "archive/10076/data" / STAR_NAME
    real_star = star_file.read_text()
    map_gz = layout / "emdb_files/structures/EMD-98076/map/emd_98076.map.gz"
    packed = map_gz.read_bytes()

    # an EMDB 404: the link names a map EMDB does not have
    missing = parse_entry(EMPIAR_ID, _entry_record(["EMD-98099"]))
    with pytest.raises(EmdbFileError, match=r"EMPIAR-10076: reference map EMD-98099 .*no map at"):
        _fetch(layout, work, missing)
    assert _manifest_bytes(work) == before

    # a truncated .map.gz (a cached map would be reused: a fresh cache)
    map_gz.write_bytes(packed[: len(packed) // 2])
    fresh = _fresh(tmp_path, "truncated", before)
    with pytest.raises(EmdbFileError, match=r"EMPIAR-10076: .*EMD-98076.*emd_98076.map.gz"):
        _fetch(layout, fresh, entry)
    assert _manifest_bytes(fresh) == before
    assert not (fresh / "emdb" / "EMD-98076" / "emd_98076.map").exists()
    map_gz.write_bytes(packed)

    # a STAR whose box disagrees with its stack (3.1 optics: 100 px, the stack: 128 px)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnImagePixelSize": [PIXEL_A],
            "rlnImageSize": [100],
            "rlnVoltage": [VOLTAGE_KV],
        }
    )
    block = read_star(star_file).blocks[""].drop(columns=["rlnMagnification"])
    star_file.write_text(
        format_loop_blocks({"optics": optics, "particles": block.assign(rlnOpticsGroup=1)})
    )
    fresh = _fresh(tmp_path, "box", before)
    with pytest.raises(
        ParticleTableError, match=rf"{STAR_NAME}: the box of 32 particle\(s\).*100 px"
    ):
        _fetch(layout, fresh, entry)
    assert _manifest_bytes(fresh) == before

    # two optics groups at different pixel sizes in one box (sessions of one deposition): one
    # partition, each set labelled at its own pixel size
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1, 2],
            "rlnImagePixelSize": [PIXEL_A, 1.01 * PIXEL_A],
            "rlnImageSize": [BOX, BOX],
            "rlnVoltage": [VOLTAGE_KV, VOLTAGE_KV],
        }
    )
    groups = block.assign(rlnOpticsGroup=[1 + (i % 2) for i in range(N_PARTICLES)])
    star_file.write_text(format_loop_blocks({"optics": optics, "particles": groups}))
    fresh = _fresh(tmp_path, "groups", before)
    said: list[str] = []
    two = build.fetch_stacks(
        entry,
        str(layout / "archive"),
        fresh / "downloads",
        fresh / "particle_stacks",
        emdb_files_url=str(layout / "emdb_files"),
        map_cache=fresh / "emdb",
        log=said.append,
    ).manifest
    assert two.box_px == BOX and two.pixel_size_a == PIXEL_A
    assert any("2 pixel sizes in one box" in line for line in said)
    refined = build.refine_poses(two, fresh / "refined_particles").manifest
    mask = build.make_mask_volume(two, refined, fresh / "mask_volume").manifest
    labels = build.label_partition(two, refined, mask, fresh / "corpus", fresh / "masks")
    corpus = open_corpus(fresh / "corpus", EMPIAR_ID.split("-")[1])
    assert labels.manifest.n_particles == N_PARTICLES == corpus.n_particles
    assert corpus.attrs["pixel_sizes_a"] == pytest.approx([PIXEL_A, 1.01 * PIXEL_A])
    assert sorted(set(corpus.table["pixel_size_a"].round(4))) == pytest.approx(
        [round(PIXEL_A, 4), round(1.01 * PIXEL_A, 4)]
    )
    assert (corpus.labels[:] == 1).any(axis=(1, 2)).all()
    star_file.write_text(real_star)


def test_cryosparc_deposit(shared_data: Path, tmp_path: Path) -> None:
    """EMPIAR-10076's real .cs file and stack (cryoDRGN's 7 particles), deposited without a
    STAR file: converted to a RELION 3.1 STAR in the stacks folder; a .cs without the
    fields needed is refused naming the file."""
    real = shared_data / "real/cryodrgn_empiar10076"
    root = tmp_path / "mirror"
    mirror = Mirror(root)
    data = mirror.archive_path("10076/data")
    data.mkdir(parents=True)
    (data / "empiar_10076_7.cs").write_bytes((real / "empiar_10076_7.cs").read_bytes())
    (data / "empiar_10076_7.mrc").write_bytes((real / "empiar_10076_7.mrc").read_bytes())
    _put_map(
        mirror,
        "EMD-98076",
        generate_map("globular", 64, seed=1, pixel_size_a=2.62),
        "3.1",
        tmp_path,
    )
    entry = parse_entry(EMPIAR_ID, _entry_record(["EMD-98076"]))
    stacks = _fetch(root, tmp_path / "work", entry).manifest
    assert stacks.particles_star == tmp_path / "work/particle_stacks/particles.star"
    written = read_star(stacks.particles_star)
    assert written.version == "3.1" and len(written.particles) == 7
    assert (stacks.n_particles, stacks.box_px) == (7, 320)
    assert stacks.pixel_size_a == pytest.approx(1.31, abs=0.01)
    assert not stacks.has_poses  # the real file has none: refine_poses would run RELION
    assert written.particles["defocus_u_a"].iloc[0] == pytest.approx(15301.1)

    before = _manifest_bytes(tmp_path / "work")
    raw = np.load(real / "empiar_10076_7.cs")
    fields = [n for n in raw.dtype.names if not n.startswith("ctf/")]
    with open(data / "empiar_10076_7.cs", "wb") as out:
        np.save(out, raw[fields])
    fresh = _fresh(tmp_path, "no_ctf", before)
    with pytest.raises(NothingToFetch, match=r"empiar_10076_7.cs: .*missing fields ctf/df1_A"):
        _fetch(root, fresh, entry)
    assert _manifest_bytes(fresh) == before


# ------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_real_layout_through_dataset_job(layout: Path, tmp_path: Path, dagster_home: Path) -> None:
    """The entry, served on loopback (EMPIAR API, archive, EMDB API and files), through
    ``dagster job execute -j dataset_job`` on a real instance to a labelled corpus."""
    from dagster import AssetKey, DagsterInstance

    from particleseg_model.access.server import serve

    expected = {
        "sha256": hashlib.sha256(
            gzip.decompress(
                (layout / "emdb_files/structures/EMD-98076/map/emd_98076.map.gz").read_bytes()
            )
        ).hexdigest()
    }
    data = tmp_path / "data"
    with serve(layout) as server:
        env = {**os.environ, **server.env(), "PARTICLESEG_DATA": str(data), "PYTHONUNBUFFERED": "1"}
        DagsterInstance.get().add_dynamic_partitions("empiar_id", ["10076"])
        done = subprocess.run(
            [
                sys.executable, "-m", "dagster", "job", "execute",
                "-m", "particleseg_assets.definitions", "-j", "dataset_job",
                "--tags", json.dumps({"dagster/partition": "10076"}),
            ],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=500,
        )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]

    corpus = open_corpus(data / "corpus", "10076")
    labels = np.asarray(corpus.labels[:])
    share = np.bincount(labels.ravel(), minlength=3) / labels.size
    with_signal = int((labels == 1).any(axis=(1, 2)).sum())
    print(
        f"\nreal layout: {corpus.n_particles} particles at {corpus.box} px, "
        f"background/signal/edge {share[0]:.3f}/{share[1]:.3f}/{share[2]:.3f}, "
        f"{with_signal} with signal"
    )
    assert corpus.n_particles == N_PARTICLES and corpus.box == BOX
    assert with_signal == N_PARTICLES
    low, high = build.SIGNAL_FRACTION_RANGE
    assert low < share[1] < high and share[2] > 0

    stacks = StacksManifest.read(data / "particle_stacks" / "10076")
    reference = stacks.reference
    assert reference is not None
    print(
        f"reference map {reference.emdb_id} ({reference.chosen}), {reference.resolution_a} A, "
        f"{reference.box_px}^3 at {reference.voxel_size_a} A/voxel, sha256 {reference.sha256}"
    )
    assert reference.emdb_id == "EMD-98076" and reference.chosen == "best of 2 linked maps"
    assert reference.sha256 == expected["sha256"] and reference.resolution_a == pytest.approx(3.1)
    assert reference.candidates == {"EMD-98076": 3.1, "EMD-98077": 4.5}
    assert reference.path == data / "emdb" / "EMD-98076" / "emd_98076.map"
    assert stacks.maps == () and stacks.map_resolution_a == pytest.approx(3.1)
    assert "resampled from voxel size 2.6200 A (64 px) to the particles' 1.3100 A (128 px)" in (
        output
    )

    instance = DagsterInstance.get()
    event = instance.get_latest_materialization_event(AssetKey("particle_stacks"))
    assert event is not None and event.asset_materialization is not None
    shown = event.asset_materialization.metadata
    assert shown["map_emdb_id"].value == "EMD-98076"
    assert shown["map_sha256"].value == expected["sha256"]
    assert shown["map_chosen"].value == "best of 2 linked maps"
    assert shown["particles"].value == N_PARTICLES
    refined = instance.get_latest_materialization_event(AssetKey("refined_particles"))
    assert refined is not None and refined.asset_materialization is not None
    assert refined.asset_materialization.metadata["source"].value == "deposited"


def test_different_boxes_in_one_table_are_refused_by_name() -> None:
    """Particles of two boxes cannot share a partition's Zarr arrays: one line names them."""
    table = pd.DataFrame(
        {
            "image_size_px": [128, 128, 256],
            "pixel_size_a": [1.31, 1.31, 1.31],
            "optics_group": [1, 1, 2],
        }
    )
    with pytest.raises(ParticleTableError) as refused:
        build._one_group(table, Path("run_data.star"))
    message = str(refused.value)
    assert message.startswith("run_data.star: 2 sets of particles with different boxes")
    assert "optics groups 1: 2 particles of 128 px" in message
    assert "optics groups 2: 1 particles of 256 px" in message
    assert build._one_group(table.iloc[:2], Path("x.star")) == (128, 1.31)
