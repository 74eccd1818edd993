"""benchmarks/dataset_fetch.py on a tiny mirror: its counts, not its speed."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import dataset_fetch as bench  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("wget") is None, reason="wget is not installed")

TINY = [
    *("--map-box", "32", "--box", "32", "--particles", "12", "--stacks", "2"),
    *("--micrographs", "2", "--px", "96", "--movies", "2", "--frames", "2", "--latency-ms", "0"),
]


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("dataset_fetch")
    args = bench.parser().parse_args(TINY)
    partitions = bench.build_mirror(tmp / "mirror", args)
    with bench.serve(tmp / "mirror") as server:
        traffic = bench.count_traffic(server)
        rows = {
            p.empiar_id: {
                r.label: r
                for r in bench.measure_partition(
                    server, traffic, p, tmp / p.number, via=bench.via_for(p, args.via)
                )
            }
            for p in partitions
        }
        # a repeat in the same work folder starts from nothing again (as run() repeats)
        again = bench.measure_partition(
            server, traffic, partitions[0], tmp / partitions[0].number, via=args.via
        )
    return partitions, rows, again


def test_mirror_is_shaped_like_a_real_entry(measured) -> None:
    partitions, *_ = measured
    particles = partitions[0]
    assert particles.empiar_id == "EMPIAR-10028" and particles.emdb_id == "EMD-2660"
    assert "data/Particles/shiny_2sets.star" in particles.needed
    assert any("/MRC_0601/" in f for f in particles.needed)
    assert any("/MRC_1901/" in f for f in particles.needed)
    assert "map/emd_2660.map.gz" in particles.needed
    assert "header/emd-2660.xml" in particles.needed
    # the archive holds what the corpus does not need (movies): more than what is needed
    needed_archive = sum(v for k, v in particles.needed.items() if k.startswith("data/"))
    assert particles.archive_bytes > needed_archive
    assert {p.kind for p in partitions} == {"particles", "micrographs"}


def test_ours_downloads_less_than_wget(measured) -> None:
    partitions, rows, _ = measured
    for part in partitions:
        ours, wget = rows[part.empiar_id]["ours"], rows[part.empiar_id]["wget -r"]
        assert 0 < ours.total_bytes < wget.total_bytes
        assert 0 < ours.total_requests < wget.total_requests
        # ours: the needed files and the map.gz once, plus HTTP headers and listings
        assert ours.total_bytes >= sum(part.needed.values())
        # wget takes everything under both folders
        assert wget.total_bytes >= part.archive_bytes + part.emdb_bytes
        assert (
            ours.map_gz_bytes
            == wget.map_gz_bytes
            == part.needed[f"map/emd_{part.emdb_id[4:]}.map.gz"]
        )
        assert ours.requests_by_host["api"] == 1 and wget.requests_by_host["api"] == 0
        assert wget.requests_by_host["other"] >= 1  # robots.txt
        ratio = bench.ratios(list(rows[part.empiar_id].values()))
        assert ratio["bytes"] < 1 and ratio["requests"] < 1


def test_cached_run_fetches_no_map_bytes(measured) -> None:
    partitions, rows, _ = measured
    for part in partitions:
        first = rows[part.empiar_id]["ours"]
        cached = rows[part.empiar_id]["ours, map cached"]
        rerun = rows[part.empiar_id]["ours, rerun"]
        assert first.map_gz_bytes > 0 and first.bytes_by_host["emdb_files"] > 0
        assert cached.map_gz_bytes == 0
        assert cached.bytes_by_host["emdb_files"] == 0
        assert cached.requests_by_host["emdb_files"] == 0
        # the entry's files again into a fresh folder: the same archive bytes
        assert cached.bytes_by_host["archive"] == first.bytes_by_host["archive"]
        assert cached.requests_by_host["archive"] > 0
        # the same folder again: listings and HEADs, no file body
        bodies = sum(v for k, v in part.needed.items() if k.startswith("data/"))
        assert rerun.bytes_by_host["archive"] < first.bytes_by_host["archive"] - 0.9 * bodies
        assert rerun.bytes_by_host["emdb_files"] == 0
        assert rerun.files == first.files


def test_a_repeat_counts_the_same(measured) -> None:
    partitions, rows, again = measured
    first = rows[partitions[0].empiar_id]
    for row in again:
        assert row.requests_by_host == first[row.label].requests_by_host
        assert abs(row.total_bytes - first[row.label].total_bytes) < 1024  # Date headers
    assert bench.combine([list(first.values()), again])[0].map_gz_bytes > 0


def test_combine_takes_the_median_time() -> None:
    def row(wall: float) -> bench.Row:
        return bench.Row("ours", {"archive": 10}, {"archive": 2}, wall)

    (combined,) = bench.combine([[row(3.0)], [row(1.0)], [row(2.0)]])
    assert combined.wall_s == 2.0 and combined.wall_s_runs == [3.0, 1.0, 2.0]
    assert combined.total_bytes == 10 and combined.total_requests == 2


def test_host_of() -> None:
    assert bench.host_of("/empiar/world_availability/10028/data/") == "archive"
    assert bench.host_of("/pub/databases/emdb/structures/EMD-2660/map/x") == "emdb_files"
    assert bench.host_of("/emdb/api/entry/EMD-2660") == "api"
    assert bench.host_of("/robots.txt") == "other"


def test_wget_command_cuts_to_the_entry_folder() -> None:
    class Server:
        url = "http://127.0.0.1:1"

    command = bench.wget_command(Server(), "/empiar/world_availability/10028/", Path("/d"))
    assert command[:5] == ["wget", "-r", "-np", "-nH", "--cut-dirs=2"]
    command = bench.wget_command(Server(), "/pub/databases/emdb/structures/EMD-2660/", Path("/d"))
    assert "--cut-dirs=4" in command
