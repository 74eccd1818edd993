"""EMPIAR/EMDB parsing and clients, against the loopback server and a file:// mirror."""

from __future__ import annotations

import pytest

from conftest import FAST_HTTP
from particleseg_model.access.empiar import (
    EmdbClient,
    EmpiarClient,
    EntryError,
    compress_ids,
    date_window_query,
    normalize_emd_id,
    normalize_empiar_id,
    parse_cross_references,
    parse_dataset_size,
    parse_entry,
    parse_imageset,
    parse_resolution,
    partition_key,
    resolution_from_emdb,
)
from particleseg_model.access.fixtures import emdb_record
from particleseg_model.access.http import (
    BadPayloadError,
    NotFoundError,
    RateLimitedError,
    ServerError,
)
from particleseg_model.access.server import Fault


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("26.8 GB", 26_800_000_000),
        ("1.9 TB", 1_900_000_000_000),
        ("512 MB", 512_000_000),
        ("34.0 TB", 34 * 10**12),
        ("2 GiB", 2 * 2**30),
        ("1,024 KB", 1_024_000),
        (None, None),
        ("", None),
        (123, 123),
    ],
)
def test_dataset_size_parses_to_bytes(text, expected):
    assert parse_dataset_size(text) == expected


def test_dataset_size_garbage_is_an_error():
    with pytest.raises(ValueError, match="'huge'"):
        parse_dataset_size("huge")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("3.97", 3.97),
        ("3.5 Å", 3.5),
        ("3.5A", 3.5),
        (" 2.2 ", 2.2),
        (3.1, 3.1),
        (None, None),
        ("", None),
        ({"valueOf_": "2.9", "units": "Å"}, 2.9),
    ],
)
def test_resolution_tolerates_units_and_missing(value, expected):
    assert parse_resolution(value) == expected


@pytest.mark.parametrize("value", ["n/a", "3.5 nm?", "-1", "0"])
def test_resolution_that_does_not_parse_is_an_error(value):
    with pytest.raises(ValueError):
        parse_resolution(value)


def test_cross_references_in_both_shapes():
    assert parse_cross_references(["EMD-1234", "EMD-5678"]) == ("EMD-1234", "EMD-5678")
    assert parse_cross_references(
        [{"name": "EMD-1234"}, {"name": "emd_99"}, {"name": "PDB-1ABC"}, {"name": "EMD-1234"}]
    ) == ("EMD-1234",)
    assert parse_cross_references(None) == ()
    with pytest.raises(ValueError):
        parse_cross_references("EMD-1234")


def test_ids_normalise():
    assert normalize_empiar_id(10028) == "EMPIAR-10028"
    assert normalize_empiar_id("empiar_10028") == "EMPIAR-10028"
    assert partition_key("EMPIAR-10028") == "10028"
    assert normalize_emd_id("emd_1832") == "EMD-1832"
    with pytest.raises(ValueError):
        normalize_empiar_id("10028x")
    assert (
        compress_ids([10060, "EMPIAR-10061", 10062, 10050, 10054, 10063])
        == "10050,10054,10060-10063"
    )
    assert date_window_query("2020-01-01") == "database:EMPIAR AND update_date:[2020-01-01 TO *]"


def test_particles_and_coordinates_are_recognised():
    """EMPIAR's vocabulary only: single-frame picked particles are particles, multiframe ones
    are particle movies; coordinates are declared on micrographs; free text is a flag."""
    particles = parse_imageset(
        {
            "name": "p",
            "directory": "data/p",
            "category": "picked particles - single frame - unprocessed",
        }
    )
    assert particles.is_particles and not particles.has_coordinates
    movies = parse_imageset({"name": "p", "category": "picked particles - multiframe - processed"})
    assert movies.is_particle_movies and not movies.is_particles
    coords = parse_imageset(
        {
            "name": "m",
            "category": "micrographs - multiframe",
            "picked_particles_file_pattern": "data/coords/*.star",
            "image_width": "variable",
            "pixel_width": 1.06,
        }
    )
    assert coords.has_coordinates and coords.image_width_px is None
    assert coords.pixel_width_a == pytest.approx(1.06)
    by_details = parse_imageset(
        {
            "name": "m",
            "category": "micrographs - single frame",
            "details": "Particle coordinates in RELION .star files.",
        }
    )
    assert not by_details.has_coordinates and by_details.mentions_particles_in_text
    plain = parse_imageset(
        {"name": "m", "category": "micrographs - multiframe", "details": "Gain reference included."}
    )
    assert not plain.has_coordinates and not plain.is_particles
    assert not plain.mentions_particles_in_text
    # a picked_particles pattern on something that is not micrographs is not coordinates
    tilts = parse_imageset(
        {"name": "t", "category": "tilt series", "picked_particles_file_pattern": "data/*.mod"}
    )
    assert tilts.is_tomography and not tilts.has_coordinates


def _entry_with(*imagesets: dict):
    record = {"title": "t", "cross_references": [], "imagesets": list(imagesets)}
    return parse_entry("19999", record)


def test_not_fetchable_reasons():
    single = {"name": "p", "category": "picked particles - single frame - processed"}
    mics = {"name": "m", "category": "micrographs - multiframe"}
    text = {**mics, "details": "Coordinates not deposited."}
    assert _entry_with(single).not_fetchable_reason == ""
    assert _entry_with({**mics, "picked_particles_directory": "data/c"}).not_fetchable_reason == ""
    reason = _entry_with(text).not_fetchable_reason
    assert "free text only" in reason and _entry_with(text).mentions_particles_in_text
    movies = {"name": "p", "category": "picked particles - multiframe - unprocessed"}
    assert "particle movies only" in _entry_with(movies).not_fetchable_reason
    tomo = _entry_with(single, {"name": "t", "category": "tilt series"})
    assert not tomo.is_single_particle
    assert tomo.not_fetchable_reason.startswith("tomography (tilt series)")
    subtomo = _entry_with({"name": "s", "category": "Subtomograms"})
    assert "subtomograms" in subtomo.not_fetchable_reason


def test_malformed_entry_names_the_entry():
    with pytest.raises(EntryError, match="EMPIAR-19007.*imagesets"):
        parse_entry("19007", {"title": "x", "imagesets": "not a list"})
    with pytest.raises(EntryError, match="EMPIAR-10001.*title"):
        parse_entry(10001, {"imagesets": []})
    with pytest.raises(EntryError, match="EMPIAR-10002"):
        parse_entry(10002, ["not", "an", "object"])


def test_emdb_resolution_path():
    assert resolution_from_emdb("EMD-1", emdb_record("3.97")) == pytest.approx(3.97)
    assert resolution_from_emdb("EMD-1", emdb_record(None)) is None
    assert resolution_from_emdb("EMD-1", {}) is None
    with pytest.raises(ValueError, match="EMD-1"):
        resolution_from_emdb("EMD-1", emdb_record("n/a"))


def test_client_reads_a_real_shaped_entry(archive_server):
    client = EmpiarClient(archive_server.empiar_url, archive_server.emdb_url, **FAST_HTTP)
    entry = client.entry("10934")  # header from the real EMPIAR-10934 XML
    assert entry.empiar_id == "EMPIAR-10934"
    assert entry.dataset_size_bytes == 1_900_000_000_000
    assert entry.emdb_ids == ("EMD-12602",)
    assert entry.imagesets[0].num_images == 3889
    assert entry.imagesets[0].pixel_width_a == pytest.approx(0.543)
    assert not entry.ships_particles and not entry.ships_coordinates
    assert client.entry(10028).ships_particles or client.entry(10028).ships_coordinates


def test_client_fetches_many_entries_in_one_post(archive_server):
    client = EmpiarClient(archive_server.empiar_url, archive_server.emdb_url, **FAST_HTTP)
    ids = ["10028", "10005", "10049", "99999"]
    records = client.entry_records(ids)
    assert sorted(records) == ["EMPIAR-10005", "EMPIAR-10028", "EMPIAR-10049"]
    posts = [r for r in archive_server.requests if r[0] == "POST"]
    assert len(posts) == 1


def test_search_pages_until_empty(archive_server):
    client = EmpiarClient(archive_server.empiar_url, archive_server.emdb_url, **FAST_HTTP)
    everything = list(client.search(rows=10))
    assert len(everything) == len(archive_server.mirror.entry_ids())
    assert [k for k, _ in everything] == sorted(k for k, _ in everything)
    recent = dict(client.updated(since="2021-01-01"))
    assert recent and all(r["update_date"] >= "2021-01-01" for r in recent.values())
    assert "EMPIAR-10934" in recent  # updated 2022-02-07


def test_missing_entry_and_map_are_typed(archive_server):
    client = EmpiarClient(archive_server.empiar_url, archive_server.emdb_url, **FAST_HTTP)
    with pytest.raises(NotFoundError):
        client.entry("99999")
    emdb = EmdbClient(archive_server.emdb_url, **FAST_HTTP)
    assert emdb.resolution_a("EMD-2660") == pytest.approx(3.2)
    with pytest.raises(NotFoundError):
        emdb.resolution_a("EMD-90006")
    assert sum(1 for r in archive_server.requests if "EMD-90006" in r[1]) == 1  # no retry on 404


def test_client_survives_rate_limits_and_server_errors(archive_server):
    archive_server.faults.append(
        Fault(r"/entry/10028", "status", status=429, times=2, retry_after_s=0)
    )
    archive_server.faults.append(Fault(r"EMD-2660", "status", status=503, times=1))
    client = EmpiarClient(archive_server.empiar_url, archive_server.emdb_url, **FAST_HTTP)
    assert client.entry(10028).empiar_id == "EMPIAR-10028"
    assert EmdbClient(archive_server.emdb_url, **FAST_HTTP).resolution_a("EMD-2660") == 3.2
    statuses = [s for _, p, s in archive_server.requests if "10028" in p]
    assert statuses == [429, 429, 200]


def test_client_gives_up_with_typed_errors(archive_server):
    archive_server.faults.append(Fault(r"/entry/10005", "status", status=500, times=-1))
    archive_server.faults.append(
        Fault(r"/entry/10049", "status", status=429, times=-1, retry_after_s=0)
    )
    archive_server.faults.append(Fault(r"/entry/10059", "garbage", times=-1))
    client = EmpiarClient(archive_server.empiar_url, archive_server.emdb_url, **FAST_HTTP)
    with pytest.raises(ServerError):
        client.entry(10005)
    with pytest.raises(RateLimitedError):
        client.entry(10049)
    with pytest.raises(BadPayloadError):
        client.entry(10059)


def test_file_url_reads_a_local_mirror(fixture_mirror):
    url = fixture_mirror.root.resolve().as_uri()
    client = EmpiarClient(url, url)
    assert client.entry("10028").title.startswith("Cryo-EM structure of the Plasmodium")
    assert len(list(client.search(rows=25))) == len(fixture_mirror.entry_ids())
    assert EmdbClient(url).resolution_a("EMD-2660") == pytest.approx(3.2)
    with pytest.raises(NotFoundError):
        client.entry("99999")
