"""Fetching what an entry needs: over HTTP from the loopback server and from a mirror path."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from particleseg_model.access.dataset import NothingToFetch, fetch_entry_files
from particleseg_model.access.empiar import EmpiarClient
from particleseg_model.access.server import serve
from particleseg_model.em.mrc import read_particles
from particleseg_model.em.star import read_star
from particleseg_model.simulation.demo_archive import write_demo_archive


@pytest.fixture(scope="module")
def small_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim") / "archive"
    write_demo_archive(
        out,
        maps=["generated:globular", "generated:ring"],
        n_particles=30,
        box=48,
        micrograph_size=256,
        particles_per_stack=12,
        progress=False,
    )
    # a stack nobody references: it must never be downloaded
    (out / "archive" / "30001" / "data" / "Particles" / "unused.mrcs").write_bytes(b"x" * 4096)
    # the demo puts maps in EMDB's layout only; some real entries deposit one in Map/ too
    emdb = out / "emdb_files" / "structures" / "EMD-95001"
    deposited = out / "archive" / "30001" / "data" / "Map"
    deposited.mkdir()
    with gzip.open(emdb / "map" / "emd_95001.map.gz") as packed:
        (deposited / "emd_95001.map").write_bytes(packed.read())
    shutil.copyfile(emdb / "masks" / "emd_95001_msk_1.map", deposited / "mask.mrc")
    return out


@pytest.fixture(scope="module")
def served(small_archive: Path):
    with serve(small_archive) as server:
        yield server


def _entry(server, empiar_id: str):
    env = server.env()
    return EmpiarClient(env["PARTICLESEG_EMPIAR_URL"], env["PARTICLESEG_EMDB_URL"]).entry(
        empiar_id
    ), env["PARTICLESEG_ARCHIVE_URL"]


def test_particles_entry_fetches_the_star_and_its_stacks_only(served, tmp_path: Path) -> None:
    entry, archive = _entry(served, "EMPIAR-30001")
    files = fetch_entry_files(entry, archive, tmp_path / "30001", progress=False)
    assert files.kind == "particles"
    assert files.particles_star == tmp_path / "30001" / "data" / "particles.star"
    assert [p.name for p in files.stacks] == [
        "particles_001.mrcs",
        "particles_002.mrcs",
        "particles_003.mrcs",
    ]
    assert not (tmp_path / "30001" / "data" / "Particles" / "unused.mrcs").exists()
    assert set(files.side_files) == {"ground_truth.csv", "simulation.json"}
    assert sorted(p.name for p in files.maps) == ["emd_95001.map", "mask.mrc"]
    assert files.pixel_size_a == pytest.approx(
        read_star(files.particles_star).particles["pixel_size_a"].iloc[0]
    )
    # the particles read back are the archive's, byte for byte
    star = read_star(files.particles_star)
    images = read_particles(
        star.particles["image_name"].tolist()[:5], base_dir=files.particles_star.parent
    )
    assert images.shape == (5, 48, 48) and np.isfinite(images).all()
    assert files.nbytes > 30 * 48 * 48 * 4

    # a second run fetches nothing: every file is already complete
    stamps = {p: p.stat().st_mtime_ns for p in files.stacks}
    again = fetch_entry_files(entry, archive, tmp_path / "30001", progress=False)
    assert {p: p.stat().st_mtime_ns for p in again.stacks} == stamps


def test_micrograph_entry_fetches_micrographs_and_coordinates(served, tmp_path: Path) -> None:
    entry, archive = _entry(served, "EMPIAR-30002")
    files = fetch_entry_files(entry, archive, tmp_path / "30002", progress=False)
    assert files.kind == "micrographs" and files.particles_star is None
    assert len(files.micrographs) >= 1
    assert all(p.suffix == ".mrc" and p.parent.name == "Micrographs" for p in files.micrographs)
    assert [p.stem for p in files.coordinates] == [p.stem for p in files.micrographs]
    assert all(p.suffix == ".star" for p in files.coordinates)
    assert "micrographs_ctf.star" in files.side_files


def test_mirror_path_works_like_the_server(small_archive: Path, served, tmp_path: Path) -> None:
    entry, _ = _entry(served, "EMPIAR-30001")
    files = fetch_entry_files(
        entry, str(small_archive / "archive"), tmp_path / "local", progress=False
    )
    assert [p.name for p in files.stacks] == [
        "particles_001.mrcs",
        "particles_002.mrcs",
        "particles_003.mrcs",
    ]


def test_missing_stack_is_named(small_archive: Path, served, tmp_path: Path) -> None:
    entry, _ = _entry(served, "EMPIAR-30001")
    broken = tmp_path / "broken"
    shutil.copytree(small_archive / "archive" / "30001", broken / "30001")
    (broken / "30001" / "data" / "Particles" / "particles_002.mrcs").unlink()
    with pytest.raises(NothingToFetch, match="particles_002.mrcs"):
        fetch_entry_files(entry, str(broken), tmp_path / "dest", progress=False)


def test_entry_without_particles_or_coordinates(fixture_mirror, tmp_path: Path) -> None:
    from particleseg_model.access.empiar import parse_entry

    record = {
        "title": "t",
        "status": "REL",
        "release_date": "2020-01-01",
        "update_date": "2020-01-01",
        "dataset_size": "1 GB",
        "experiment_type": "EMDB",
        "cross_references": [],
        "imagesets": [
            {"name": "movies", "directory": "data", "category": "micrographs - multiframe"}
        ],
    }
    with pytest.raises(NothingToFetch, match="EMPIAR-19999"):
        fetch_entry_files(
            parse_entry("19999", record), str(tmp_path), tmp_path / "d", progress=False
        )


def test_only_a_404_means_absent_while_listing(served, tmp_path: Path) -> None:
    """A 5xx while listing Map/ or data/ fails with the URL and status (after the retries);
    one 5xx is retried away; a 404 folder is absent."""
    from conftest import FAST_HTTP
    from particleseg_model.access.dataset import ListingError
    from particleseg_model.access.http import HttpClient
    from particleseg_model.access.server import Fault

    entry, archive = _entry(served, "EMPIAR-30001")
    http = HttpClient(archive, **FAST_HTTP)
    served.faults.append(Fault(r"/30001/data/Map/$", status=503, times=-1))
    try:
        with pytest.raises(
            ListingError, match=r"listing http://.*/30001/data/Map/ failed: .*503"
        ) as e:
            fetch_entry_files(entry, archive, tmp_path / "a", http=http, progress=False)
        assert e.value.status == 503 and e.value.url.endswith("/30001/data/Map/")
    finally:
        served.faults.clear()
    served.faults.append(Fault(r"/30001/data/$", status=500, times=-1))
    try:
        with pytest.raises(ListingError, match=r"/30001/data/ failed: .*500"):
            fetch_entry_files(entry, archive, tmp_path / "b", http=http, progress=False)
    finally:
        served.faults.clear()
    served.faults.append(Fault(r"/30001/data/Map/$", status=502, times=1))
    files = fetch_entry_files(entry, archive, tmp_path / "c", http=http, progress=False)
    assert sorted(p.name for p in files.maps) == ["emd_95001.map", "mask.mrc"]
    served.faults.append(Fault(r"/30001/data/Map/$", status=404, times=-1))
    try:
        files = fetch_entry_files(entry, archive, tmp_path / "d", http=http, progress=False)
    finally:
        served.faults.clear()
    assert files.maps == [] and len(files.stacks) == 3


def test_a_stack_that_fails_otherwise_than_404_is_not_skipped(served, tmp_path: Path) -> None:
    from conftest import FAST_HTTP
    from particleseg_model.access.archive import DownloadError
    from particleseg_model.access.http import HttpClient
    from particleseg_model.access.server import Fault

    entry, archive = _entry(served, "EMPIAR-30001")
    http = HttpClient(archive, **FAST_HTTP)
    served.faults.append(Fault(r"particles_002\.mrcs$", status=500, times=-1))
    try:
        with pytest.raises(DownloadError, match=r"particles_002\.mrcs.*500") as e:
            fetch_entry_files(entry, archive, tmp_path / "a", http=http, progress=False)
    finally:
        served.faults.clear()
    assert e.value.status == 500
