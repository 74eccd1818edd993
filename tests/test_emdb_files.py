"""EMDB map files: the EMDB layout in the mirror and the server, streamed gunzip, checks, cache."""

from __future__ import annotations

import gzip
import hashlib
import tempfile
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import requests

from conftest import FAST_HTTP
from particleseg_model.access.emdb_files import (
    EmdbFileError,
    cached_map,
    emdb_file_urls,
    fetch_emdb_map,
    header_url,
    map_cache_path,
    map_url,
    parse_header_xml,
)
from particleseg_model.access.empiar import DEFAULT_EMDB_FILES_URL, emdb_files_url
from particleseg_model.access.http import HttpClient
from particleseg_model.access.mirror import Mirror, emdb_header_xml
from particleseg_model.access.server import Fault, serve


def mrc_bytes(shape=(24, 24, 24), voxel: float | None = 2.5, seed: int = 0) -> bytes:
    """An MRC map as bytes (float32), with ``voxel`` A per voxel (None: no voxel size)."""
    rng = np.random.default_rng(seed)
    data = rng.normal(size=shape).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.mrc"
        with mrcfile.new(path) as mrc:
            mrc.set_data(data)
            mrc.voxel_size = voxel if voxel is not None else 0.0
        return path.read_bytes()


@pytest.fixture
def emdb_server(tmp_path):
    mirror = Mirror(tmp_path / "mirror")
    with serve(mirror.root) as server:
        yield server, mirror


def client(server) -> HttpClient:
    return HttpClient(server.emdb_files_url, **FAST_HTTP)


def no_temporaries(folder) -> bool:
    return not [p for p in folder.rglob("*") if p.name.startswith(".") or p.suffix == ".part"]


def test_urls_follow_emdb_layout(monkeypatch):
    monkeypatch.delenv("PARTICLESEG_EMDB_FILES_URL", raising=False)
    assert emdb_files_url() == DEFAULT_EMDB_FILES_URL
    assert map_url("EMD-1832") == (
        "https://ftp.ebi.ac.uk/pub/databases/emdb/structures/EMD-1832/map/emd_1832.map.gz"
    )
    assert header_url("emd_11111") == (
        "https://ftp.ebi.ac.uk/pub/databases/emdb/structures/EMD-11111/header/emd-11111.xml"
    )
    monkeypatch.setenv("PARTICLESEG_EMDB_FILES_URL", "http://example.org/emdb/")
    assert map_url(5625) == "http://example.org/emdb/structures/EMD-5625/map/emd_5625.map.gz"
    assert map_cache_path("/c", "EMD-5625").as_posix() == "/c/EMD-5625/emd_5625.map"


def test_mirror_gzip_is_deterministic_and_served_with_range(emdb_server):
    server, mirror = emdb_server
    data = mrc_bytes()
    first = mirror.put_emdb_map("EMD-1234", data).read_bytes()
    again = mirror.put_emdb_map(1234, data).read_bytes()
    assert first == again and gzip.decompress(first) == data
    url = map_url("EMD-1234", server.emdb_files_url)
    head = requests.head(url, timeout=5)
    assert head.status_code == 200 and int(head.headers["Content-Length"]) == len(first)
    part = requests.get(url, headers={"Range": "bytes=10-19"}, timeout=5)
    assert part.status_code == 206 and part.content == first[10:20]
    listing = requests.get(server.emdb_files_url + "/structures/EMD-1234/map/", timeout=5)
    assert "emd_1234.map.gz" in listing.text
    # the EMPIAR routes are unchanged
    assert requests.get(server.archive_url + "/10028/", timeout=5).status_code == 404
    assert server.env()["PARTICLESEG_EMDB_FILES_URL"] == server.emdb_files_url


def test_fetch_gunzips_checks_and_caches_once(emdb_server, tmp_path):
    server, mirror = emdb_server
    data = mrc_bytes((32, 32, 32), voxel=1.5)
    xml = emdb_header_xml("EMD-1234", resolution_a=3.2, voxel_size_a=1.5, box=(32, 32, 32))
    mirror.put_emdb_map("EMD-1234", data, header_xml=xml, half_maps=[data, data], masks=[data])
    cache = tmp_path / "cache"
    got = fetch_emdb_map("EMD-1234", cache, base_url=server.emdb_files_url, http=client(server))
    assert got.path == map_cache_path(cache, "EMD-1234") and got.path.read_bytes() == data
    assert (got.box, got.voxel_size_a, got.resolution_a) == (32, 1.5, 3.2)
    assert got.resolution_source == "header" and not got.from_cache
    gz_size = (mirror.emdb_structure_path(1234) / "map" / "emd_1234.map.gz").stat().st_size
    assert got.bytes_downloaded == got.gz_bytes == gz_size and got.map_bytes == len(data)
    assert got.sha256 == hashlib.sha256(data).hexdigest()
    print(f"EMD-1234: {got.bytes_downloaded} bytes downloaded, {got.map_bytes} gunzipped")
    before = len(server.requests)
    again = fetch_emdb_map("EMD-1234", cache, base_url=server.emdb_files_url, resolution_a=3.1)
    assert again.from_cache and again.bytes_downloaded == 0 and again.sha256 == got.sha256
    assert (again.resolution_a, again.resolution_source) == (3.1, "api")
    assert len(server.requests) == before  # no request at all for a cached map
    assert cached_map(cache, "EMD-1234").resolution_a == 3.1
    urls = emdb_file_urls("EMD-1234", server.emdb_files_url, http=client(server))
    assert [u.rsplit("/", 1)[1] for u in urls.half_maps] == [
        "emd_1234_half_map_1.map.gz",
        "emd_1234_half_map_2.map.gz",
    ]
    assert [u.rsplit("/", 1)[1] for u in urls.masks] == ["emd_1234_msk_1.map"]
    assert got.to_json()["path"] == str(got.path)
    # a local mirror (path or file://) reads the same tree without a server
    local = fetch_emdb_map(1234, tmp_path / "local", base_url=mirror.root / "emdb_files")
    assert local.sha256 == got.sha256


def test_no_header_is_absent_only_on_404(emdb_server, tmp_path):
    server, mirror = emdb_server
    mirror.put_emdb_map("EMD-2000", mrc_bytes())
    got = fetch_emdb_map(2000, tmp_path / "c", base_url=server.emdb_files_url, http=client(server))
    assert got.header_path is None and got.resolution_a is None
    mirror.put_emdb_map("EMD-2001", mrc_bytes())
    server.faults.append(Fault(r"/header/", status=503, times=-1))
    with pytest.raises(EmdbFileError, match=r"EMD-2001: .*emd-2001\.xml.*503") as caught:
        fetch_emdb_map(2001, tmp_path / "c", base_url=server.emdb_files_url, http=client(server))
    assert caught.value.status == 503
    assert not map_cache_path(tmp_path / "c", 2001).exists()


def test_missing_map_is_a_clear_404(emdb_server, tmp_path):
    server, _ = emdb_server
    with pytest.raises(EmdbFileError, match=r"^EMD-9999: no map at http.*emd_9999\.map\.gz$") as e:
        fetch_emdb_map(9999, tmp_path / "c", base_url=server.emdb_files_url, http=client(server))
    assert e.value.status == 404 and e.value.emdb_id == "EMD-9999"


def test_retries_and_resumes_a_cut(emdb_server, tmp_path):
    server, mirror = emdb_server
    data = mrc_bytes((48, 48, 48))
    mirror.put_emdb_map("EMD-3000", data)
    server.faults.append(Fault(r"emd_3000\.map\.gz", status=503, times=1))
    server.faults.append(Fault(r"emd_3000\.map\.gz", kind="cut", cut_after_bytes=50_000, times=1))
    got = fetch_emdb_map(3000, tmp_path / "c", base_url=server.emdb_files_url, http=client(server))
    assert got.path.read_bytes() == data
    statuses = [s for m, p, s in server.requests if p.endswith("emd_3000.map.gz")]
    assert statuses == [503, 200, 206]  # retried, then resumed with Range
    assert got.bytes_downloaded == got.gz_bytes


def test_a_cut_that_never_heals_fails_and_caches_nothing(emdb_server, tmp_path):
    server, mirror = emdb_server
    mirror.put_emdb_map("EMD-3001", mrc_bytes((48, 48, 48)))
    server.faults.append(Fault(r"emd_3001\.map\.gz", kind="cut", cut_after_bytes=0, times=-1))
    with pytest.raises(EmdbFileError, match=r"EMD-3001: download of .*emd_3001\.map\.gz failed"):
        fetch_emdb_map(3001, tmp_path / "c", base_url=server.emdb_files_url, http=client(server))
    assert not map_cache_path(tmp_path / "c", 3001).exists()
    assert no_temporaries(tmp_path / "c")


@pytest.mark.parametrize(
    ("name", "payload", "message"),
    [
        ("truncated", lambda d: gzip.compress(d, mtime=0)[:-2000], "truncated: the gzip stream"),
        ("corrupt", lambda d: b"\x1f\x8b\x08\x00" + b"\x00" * 400, "not valid gzip data"),
        ("not gzip", lambda d: d, "not valid gzip data"),
        ("short map", lambda d: gzip.compress(d[:-4096], mtime=0), "size mismatch"),
    ],
)
def test_bad_map_files_are_named_and_never_cached(emdb_server, tmp_path, name, payload, message):
    server, mirror = emdb_server
    target = mirror.emdb_structure_path(4000) / "map" / "emd_4000.map.gz"
    target.parent.mkdir(parents=True)
    target.write_bytes(payload(mrc_bytes((32, 32, 32))))
    cache = tmp_path / "cache"
    with pytest.raises(EmdbFileError, match=rf"EMD-4000: emd_4000\.map\.gz.*{message}"):
        fetch_emdb_map(4000, cache, base_url=server.emdb_files_url, http=client(server))
    assert not map_cache_path(cache, 4000).exists() and no_temporaries(cache)


def test_a_failed_refetch_leaves_the_previous_cache(emdb_server, tmp_path):
    server, mirror = emdb_server
    data = mrc_bytes()
    mirror.put_emdb_map("EMD-4100", data)
    cache = tmp_path / "cache"
    fetch_emdb_map(4100, cache, base_url=server.emdb_files_url, http=client(server))
    map_cache_path(cache, 4100).with_suffix(".json").unlink()  # forget it was complete
    target = mirror.emdb_structure_path(4100) / "map" / "emd_4100.map.gz"
    target.write_bytes(target.read_bytes()[:500])
    with pytest.raises(EmdbFileError, match="truncated"):
        fetch_emdb_map(4100, cache, base_url=server.emdb_files_url, http=client(server))
    assert map_cache_path(cache, 4100).read_bytes() == data


def test_not_cubic_and_no_voxel_size(emdb_server, tmp_path):
    server, mirror = emdb_server
    mirror.put_emdb_map("EMD-5000", mrc_bytes((20, 24, 24)))
    with pytest.raises(EmdbFileError, match=r"EMD-5000: .*not cubic \(24 x 24 x 20 voxels\)"):
        fetch_emdb_map(5000, tmp_path / "c", base_url=server.emdb_files_url, http=client(server))
    mirror.put_emdb_map("EMD-5001", mrc_bytes(voxel=None))
    with pytest.raises(EmdbFileError, match=r"EMD-5001: .*has no voxel size"):
        fetch_emdb_map(5001, tmp_path / "c", base_url=server.emdb_files_url, http=client(server))
    # the header XML's pixel spacing stands in for a header without one
    xml = emdb_header_xml("EMD-5002", voxel_size_a=2.0)
    mirror.put_emdb_map("EMD-5002", mrc_bytes(voxel=None), header_xml=xml)
    got = fetch_emdb_map(5002, tmp_path / "c", base_url=server.emdb_files_url, http=client(server))
    assert got.voxel_size_a == 2.0


def test_header_xml_v3_and_v19():
    v3 = emdb_header_xml("EMD-1", resolution_a=2.9, voxel_size_a=1.06, box=(256, 256, 256))
    parsed = parse_header_xml(v3)
    assert (parsed.resolution_a, parsed.voxel_size_a, parsed.box) == (2.9, 1.06, (256, 256, 256))
    v19 = (
        '<emdEntry accessCode="EMD-5625"><processing><reconstruction>'
        "<resolutionByAuthor>4.5</resolutionByAuthor></reconstruction></processing>"
        "<map><dimensions><numColumns>56</numColumns><numRows>56</numRows>"
        "<numSections>56</numSections></dimensions><pixelSpacing>"
        '<pixelX units="A">4.23</pixelX></pixelSpacing></map></emdEntry>'
    )
    parsed = parse_header_xml(v19)
    assert (parsed.resolution_a, parsed.voxel_size_a, parsed.box) == (4.5, 4.23, (56, 56, 56))
    with pytest.raises(ValueError, match="not XML"):
        parse_header_xml("<emd")


def test_real_emdb_map_through_the_layout(shared_data, tmp_path):
    """EMD-1832 (64^3, 5.7 A/px) as EMDB would serve it."""
    source = shared_data / "maps" / "emd_1832.map"
    mirror = Mirror(tmp_path / "mirror")
    mirror.put_emdb_map("EMD-1832", source)
    with serve(mirror.root) as server:
        got = fetch_emdb_map(1832, tmp_path / "c", base_url=server.emdb_files_url)
    assert (got.box, got.voxel_size_a) == (64, 5.7)
    assert got.path.read_bytes() == source.read_bytes()
    print(f"EMD-1832: {got.gz_bytes} bytes gzipped, {got.map_bytes} gunzipped")
