"""The simulated demo archive: layout, records the catalog accepts, files RELION reads,
ground truth, determinism and refusals."""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
import subprocess
import time
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from particleseg_model.access.catalog import entry_row, select_eligible
from particleseg_model.access.empiar import parse_entry, parse_resolution
from particleseg_model.access.mirror import Mirror
from particleseg_model.em.maps import MapError
from particleseg_model.em.star import read_star
from particleseg_model.simulation.demo_archive import (
    ArchiveExistsError,
    MapSource,
    default_maps,
    write_demo_archive,
)
from particleseg_model.simulation.simulate import normalise_images

BOX = 64
N = 40
SMALL = {
    "maps": ["generated:globular", "generated:ring"],
    "n_particles": N,
    "box": BOX,
    "seed": 1,
    "snr": 4.0,
    "micrograph_size": 256,
    "particles_per_stack": 25,
    "progress": False,
}


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("demo") / "mirror"
    return out, write_demo_archive(out, **SMALL)


def _data(root: Path, number: int) -> Path:
    return root / "archive" / str(number) / "data"


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _catalog_rows(root: Path) -> pd.DataFrame:
    mirror = Mirror(root)
    rows = []
    for empiar_id in mirror.entry_ids():
        entry = parse_entry(empiar_id, mirror.entry(empiar_id)[empiar_id])
        resolutions = {}
        for emd in entry.emdb_ids:
            record = mirror.emdb_entry(emd)
            processing = record["structure_determination_list"]["structure_determination"][0][
                "image_processing"
            ][0]
            resolutions[emd] = parse_resolution(processing["final_reconstruction"]["resolution"])
        rows.append(entry_row(entry, resolutions))
    return pd.DataFrame(rows)


def test_layout_and_eligible_records(archive: tuple[Path, list[str]]) -> None:
    root, ids = archive
    assert ids == ["EMPIAR-30001", "EMPIAR-30002"]
    for number, emd in ((30001, 95001), (30002, 95002)):
        data = _data(root, number)
        assert (root / "empiar" / f"EMPIAR-{number}.json").is_file()
        assert (root / "emdb" / f"EMD-{emd}.json").is_file()
        for name in ("ground_truth.csv", "gallery.png", "simulation.json"):
            assert (data / name).is_file(), name
        # the map only in EMDB's file layout, as real entries have it: none in the archive
        assert not (data / "Map").exists()
        structure = root / "emdb_files" / "structures" / f"EMD-{emd}"
        for name in (
            f"map/emd_{emd}.map.gz",
            f"header/emd-{emd}.xml",
            f"masks/emd_{emd}_msk_1.map",
        ):
            assert (structure / name).is_file(), name
    catalog = _catalog_rows(root)
    eligible = select_eligible(catalog)
    assert list(eligible.empiar_id) == ids  # resolution < 3.5 A and particles or coordinates
    particles, micrographs = catalog.iloc[0], catalog.iloc[1]
    assert particles.ships_particles and not particles.ships_coordinates
    assert micrographs.ships_coordinates and not micrographs.ships_particles
    assert particles.particle_images == N
    record = Mirror(root).entry("EMPIAR-30001")["EMPIAR-30001"]
    imageset = record["imagesets"][0]
    assert imageset["category"] == "picked particles - single frame - processed"
    info = json.loads((_data(root, 30001) / "simulation.json").read_text())
    assert imageset["pixel_width"] == pytest.approx(info["pixel_size_a"], abs=1e-6)
    assert record["cross_references"] == [{"name": "EMD-95001"}]
    assert (
        Mirror(root).entry("EMPIAR-30002")["EMPIAR-30002"]["imagesets"][0]["category"]
        == "micrographs - single frame"
    )
    # no temporary directory left beside the archive
    assert [p.name for p in root.parent.iterdir()] == ["mirror"]


def test_particle_files(archive: tuple[Path, list[str]]) -> None:
    root, _ = archive
    data = _data(root, 30001)
    star = read_star(data / "particles.star")
    table = star.particles
    assert star.version == "3.1" and len(table) == N
    info = json.loads((data / "simulation.json").read_text())
    assert table.pixel_size_a.unique() == pytest.approx([info["pixel_size_a"]])
    assert (table.image_size_px == BOX).all()
    assert (table.voltage_kv == 300).all() and (table.spherical_aberration_mm == 2.7).all()
    assert (table.amplitude_contrast == 0.1).all()
    # 25 particles per stack: two stacks, every image name resolves
    assert sorted(table.stack_path.unique()) == [
        "Particles/particles_001.mrcs",
        "Particles/particles_002.mrcs",
    ]
    for stack, group in table.groupby("stack_path"):
        with mrcfile.open(data / stack) as mrc:
            assert mrc.data.shape[1:] == (BOX, BOX)
            assert group.image_index.max() == mrc.data.shape[0]
            assert mrc.voxel_size.x == pytest.approx(info["pixel_size_a"], abs=1e-4)
    truth = pd.read_csv(data / "ground_truth.csv")
    assert list(truth.image_name) == list(table.image_name)
    assert (~truth.is_good).sum() == round(0.3 * N)
    good = truth.is_good.to_numpy()
    assert np.allclose(truth.rot_deg[good], table.rot_deg[good])
    assert np.allclose(truth.origin_x_a[good], table.origin_x_a[good], atol=1e-5)
    assert table[["rot_deg", "tilt_deg", "psi_deg"]].notna().all().all()  # junk has poses too
    mask_path = root / "emdb_files/structures/EMD-95001/masks/emd_95001_msk_1.map"
    with mrcfile.open(mask_path) as mrc:
        mask = np.asarray(mrc.data)
    assert mask.shape == (BOX,) * 3 and mask.min() == 0.0 and mask.max() == 1.0


def test_relion_projects_the_star_file_onto_the_particles(
    archive: tuple[Path, list[str]], relion_bin: Path, tmp_path: Path
) -> None:
    """relion_project with the archive's map and STAR file (poses, origins, CTF) reproduces
    the good particles; junk does not match its (random) STAR poses."""
    root, _ = archive
    data = _data(root, 30001)
    packed = root / "emdb_files/structures/EMD-95001/map/emd_95001.map.gz"
    with gzip.open(packed) as source:
        (tmp_path / "map.mrc").write_bytes(source.read())
    subprocess.run(
        [
            str(relion_bin / "relion_project"),
            "--i",
            "map.mrc",
            "--o",
            "proj",
            "--ang",
            str(data / "particles.star"),
            "--ctf",
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    with mrcfile.open(tmp_path / "proj.mrcs") as mrc:
        projections = np.asarray(mrc.data, dtype=np.float64)
    table = read_star(data / "particles.star").particles
    images = []
    for stack, index in zip(table.stack_path, table.image_index, strict=True):
        with mrcfile.open(data / stack) as mrc:
            images.append(np.asarray(mrc.data[index - 1], dtype=np.float64))
    truth = pd.read_csv(data / "ground_truth.csv")
    corr = np.array(
        [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(projections, images, strict=True)]
    )
    # SNR 4: a perfect match correlates at about sqrt(4 / 5) = 0.89
    assert corr[truth.is_good].min() > 0.75
    assert np.abs(corr[truth.junk_kind == "empty"]).max() < 0.2


def test_micrograph_files(archive: tuple[Path, list[str]]) -> None:
    root, _ = archive
    data = _data(root, 30002)
    truth = pd.read_csv(data / "ground_truth.csv")
    assert len(truth) == N and set(truth.junk_kind) >= {"none", "empty", "ice"}
    ctf = starfile.read(data / "micrographs_ctf.star", always_dict=True)
    names = list(ctf["micrographs"].rlnMicrographName)
    assert set(truth.micrograph_name) <= set(names)
    assert ctf["optics"].rlnMicrographPixelSize.iloc[0] > 0
    for name in names:
        with mrcfile.open(data / name) as mrc:
            assert mrc.data.shape == (256, 256)
        stem = Path(name).stem
        picks = truth[truth.micrograph_name == name]
        coords = starfile.read(data / "Coordinates" / f"{stem}.star")
        assert np.array_equal(coords.rlnCoordinateX.to_numpy(), picks.coordinate_x_px)
        assert np.array_equal(coords.rlnCoordinateY.to_numpy(), picks.coordinate_y_px)
        boxes = np.loadtxt(data / "Coordinates" / f"{stem}.box", ndmin=2)
        assert np.array_equal(boxes[:, 0], picks.coordinate_x_px - BOX // 2)  # lower-left
        assert np.array_equal(boxes[:, 1], picks.coordinate_y_px - BOX // 2)
        assert (boxes[:, 2:] == BOX).all()


def test_relion_extracts_at_the_coordinates(
    archive: tuple[Path, list[str]], relion_bin: Path, tmp_path: Path
) -> None:
    """relion_preprocess --extract at our coordinates cuts the boxes we mean (0-based centre)."""
    root, _ = archive
    data = _data(root, 30002)
    truth = pd.read_csv(data / "ground_truth.csv")
    name = truth.micrograph_name.iloc[0]
    (tmp_path / "Micrographs").mkdir()
    (tmp_path / name).symlink_to(data / name)
    star = starfile.read(data / "micrographs_ctf.star", always_dict=True)
    star["micrographs"] = star["micrographs"][star["micrographs"].rlnMicrographName == name]
    starfile.write(star, tmp_path / "mics.star")
    (tmp_path / name.replace(".mrc", "_pick.star")).symlink_to(
        data / "Coordinates" / f"{Path(name).stem}.star"
    )
    subprocess.run(
        [
            str(relion_bin / "relion_preprocess"),
            "--i",
            "mics.star",
            "--coord_dir",
            "./",
            "--coord_suffix",
            "_pick.star",
            "--part_star",
            "parts.star",
            "--part_dir",
            "Extract/",
            "--extract",
            "--extract_size",
            str(BOX),
            "--invert_contrast",
            "--norm",
            "--bg_radius",
            str(int(0.375 * BOX)),
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    parts = starfile.read(tmp_path / "parts.star", always_dict=True)["particles"]
    with mrcfile.open(data / name) as mrc:
        micrograph = np.asarray(mrc.data, dtype=np.float64)
    assert len(parts) == (truth.micrograph_name == name).sum()
    for image_name, x, y in zip(
        parts.rlnImageName, parts.rlnCoordinateX, parts.rlnCoordinateY, strict=True
    ):
        index, stack = image_name.split("@")
        with mrcfile.open(tmp_path / stack) as mrc:
            extracted = np.asarray(mrc.data[int(index) - 1] if mrc.data.ndim == 3 else mrc.data)
        x0, y0 = int(round(x)) - BOX // 2, int(round(y)) - BOX // 2
        window = -micrograph[None, y0 : y0 + BOX, x0 : x0 + BOX].astype(np.float32)
        ours, _, _ = normalise_images(window)  # RELION's --norm: background ramp removed
        assert np.corrcoef(ours.ravel(), extracted.ravel())[0, 1] > 0.999


def test_same_seed_same_bytes(archive: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, _ = archive
    again = tmp_path / "again"
    write_demo_archive(again, **SMALL)
    assert _hashes(again) == _hashes(root)
    other = tmp_path / "other"
    write_demo_archive(
        other, **{**SMALL, "seed": 2, "maps": SMALL["maps"][:1], "micrograph_entries": 0}
    )
    stack = "archive/30001/data/Particles/particles_001.mrcs"
    assert _hashes(other)[stack] != _hashes(root)[stack]


def test_gallery_is_a_png(archive: tuple[Path, list[str]]) -> None:
    root, _ = archive
    raw = (_data(root, 30001) / "gallery.png").read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    width, height = struct.unpack(">II", raw[16:24])
    assert width == 7 * (BOX + 2) + 2  # good + 6 junk kinds
    assert height == 11 + 2 * (BOX + 2) + 2  # label strip, noiseless row, noisy row


# ------------------------------------------------------------------------------ refusals


def test_refuses_an_existing_archive(archive: tuple[Path, list[str]]) -> None:
    root, _ = archive
    before = _hashes(root)
    with pytest.raises(ArchiveExistsError, match="already holds an archive") as info:
        write_demo_archive(root, **SMALL)
    assert str(root) in str(info.value)
    assert _hashes(root) == before


def test_relion30_entry_is_deposited_as_old_entries_are(tmp_path: Path) -> None:
    """EMPIAR-30002 (a particle entry) ships a RELION 3.0 STAR file: one data_images table,
    no optics, rlnDetectorPixelSize/rlnMagnification, origins in pixels; the same particles
    and poses as a 3.1 file would give."""
    out = tmp_path / "out"
    small = {**SMALL, "n_particles": 12, "micrograph_entries": 0}
    write_demo_archive(out, **small)
    star_path = _data(out, 30002) / "particles.star"
    text = star_path.read_text()
    assert "data_images" in text and "data_optics" not in text and "# version" not in text
    assert "_rlnOriginX " in text and "_rlnImageSize" not in text
    star = read_star(star_path)
    assert star.version == "3.0" and star.optics is None
    table = star.particles
    info = json.loads((_data(out, 30002) / "simulation.json").read_text())
    assert info["layout"]["star_format"] == "relion-3.0"
    assert table.image_size_px.isna().all()  # 3.0 gives no box: the stacks do
    assert table.pixel_size_a.to_numpy() == pytest.approx(info["pixel_size_a"], abs=1e-6)
    truth = pd.read_csv(_data(out, 30002) / "ground_truth.csv")
    good = truth.is_good.to_numpy()
    assert np.allclose(truth.origin_x_a[good], table.origin_x_a[good], atol=1e-4)
    assert np.allclose(truth.rot_deg[good], table.rot_deg[good])
    assert read_star(_data(out, 30001) / "particles.star").version == "3.1"


def test_refuses_non_empty_dir_and_accepts_empty(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(ArchiveExistsError, match="not empty"):
        write_demo_archive(tmp_path / "full", **SMALL)
    (tmp_path / "empty").mkdir()
    small = {**SMALL, "maps": SMALL["maps"][:1], "n_particles": 10, "micrograph_entries": 0}
    assert write_demo_archive(tmp_path / "empty", **small) == ["EMPIAR-30001"]


@pytest.mark.parametrize("fraction", [1.0, -0.2])
def test_bad_junk_fraction_writes_nothing(tmp_path: Path, fraction: float) -> None:
    with pytest.raises(ValueError, match=r"junk fraction .* outside \[0, 1\)"):
        write_demo_archive(tmp_path / "out", **{**SMALL, "junk_fraction": fraction})
    assert list(tmp_path.iterdir()) == []


def test_bad_map_names_the_file_and_writes_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "maps" / "flat.mrc"
    bad.parent.mkdir()
    with mrcfile.new(bad) as mrc:
        mrc.set_data(np.ones((20, 24, 24), dtype=np.float32))
        mrc.voxel_size = 1.0
    out = tmp_path / "out"
    with pytest.raises(MapError, match="not cubic") as info:
        write_demo_archive(out, **{**SMALL, "maps": ["generated:ring", bad]})
    assert str(bad) in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps"]  # no out, no temp dir


def test_failure_midway_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import particleseg_model.simulation.demo_archive as demo

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(demo, "write_png", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_demo_archive(tmp_path / "out", **SMALL)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ maps


def test_default_maps(shared_data: Path) -> None:
    with_shared = default_maps(shared_data)
    assert [m.label for m in with_shared] == [
        "EMD-1832",
        "EMD-5625",
        "generated ring pseudo-atomic map",
    ]
    without = default_maps(None)
    assert [m.shape for m in without] == ["globular", "elongated", "ring"]
    assert default_maps(shared_data / "nowhere") == without
    with pytest.raises(ValueError, match="unknown generated map"):
        MapSource.parse("generated:cube")


def test_real_map_entry(shared_data: Path, tmp_path: Path) -> None:
    ids = write_demo_archive(
        tmp_path / "real",
        maps=[shared_data / "maps" / "emd_5625.map"],
        n_particles=12,
        box=BOX,
        micrograph_entries=0,
        progress=False,
    )
    record = Mirror(tmp_path / "real").entry(ids[0])[ids[0]]
    assert "EMD-5625" in record["title"]
    pixel = record["imagesets"][0]["pixel_width"]
    resampled = 56 * 4.23 / pixel  # the map's 56 voxels of 4.23 A, Fourier-resampled
    assert resampled == pytest.approx(round(resampled), abs=1e-3)


@pytest.mark.slow
def test_default_demo_archive(tmp_path: Path) -> None:
    """The default demo: 3 entries from different maps, one with micrographs, fast."""
    started = time.perf_counter()
    ids = write_demo_archive(tmp_path / "demo", progress=False)
    seconds = time.perf_counter() - started
    assert ids == ["EMPIAR-30001", "EMPIAR-30002", "EMPIAR-30003"]
    assert seconds < 60
    catalog = _catalog_rows(tmp_path / "demo")
    assert len(select_eligible(catalog)) == 3
    assert catalog.ships_coordinates.sum() == 1 and catalog.ships_particles.sum() == 2
    titles = [Mirror(tmp_path / "demo").entry(i)[i]["title"] for i in ids]
    assert len(set(titles)) == 3


def test_the_demo_finds_shared_data_beside_the_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo's real maps come from ``../shared/data`` beside the checkout, wherever the
    module sits in the package (a move one folder down once made it fall back silently)."""
    from particleseg_model.simulation.demo_archive import SHARED_ENV, find_shared_data

    monkeypatch.delenv(SHARED_ENV, raising=False)
    beside = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not beside.is_dir():
        pytest.skip(f"no shared data beside the checkout ({beside})")
    assert find_shared_data() == beside


def test_realism_compares_each_particle_entry_with_real_raw_particles(
    archive: tuple[Path, list[str]],
) -> None:
    from particleseg_model.simulation.demo_archive import REAL_STACKS, find_shared_data

    shared = find_shared_data()
    if shared is None or not any((shared / rel).is_file() for _, rel, _ in REAL_STACKS):
        pytest.skip("../shared/data's real particle stacks are absent: no realism figure")
    root, _ = archive
    figures = json.loads((root / "archive" / "realism.json").read_text())
    real = [k for k in figures if k.startswith("real")]
    simulated = [k for k in figures if k.startswith("sim EMPIAR-")]
    assert real and len(simulated) == 1  # the particle entry; the micrograph entry has none
    for name in simulated:
        distances = figures[name]["spectrum_distance_to"]
        assert set(distances) == set(real) and all(0 < d < 3 for d in distances.values())
        assert figures[name]["n"] > 0
    assert (root / "archive" / "realism.png").read_bytes()[:4] == b"\x89PNG"
