"""The mirror directory and the local EMPIAR-compatible server that serves it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from particleseg_model.access.empiar import EmpiarClient
from particleseg_model.access.http import BadPayloadError
from particleseg_model.access.mirror import Mirror, parse_id_list, parse_query
from particleseg_model.access.server import Fault, autoindex_html, serve


def test_id_lists_and_ranges():
    assert parse_id_list("10050, 10054,10060-10062") == [
        "EMPIAR-10050",
        "EMPIAR-10054",
        "EMPIAR-10060",
        "EMPIAR-10061",
        "EMPIAR-10062",
    ]
    assert parse_id_list("EMPIAR-10028") == ["EMPIAR-10028"]
    for bad in ["10062-10060", "abc", "1-2000000"]:
        with pytest.raises(ValueError):
            parse_id_list(bad)


def test_query_language():
    assert parse_query("database:EMPIAR") == []
    assert parse_query("database:EMPIAR AND update_date:[2021-01-01 TO *]") == [
        ("update_date", "2021-01-01", "*")
    ]
    assert parse_query("empiar_id:10028") == [("id", "EMPIAR-10028", "EMPIAR-10028")]
    with pytest.raises(ValueError, match="title:ribosome"):
        parse_query("database:EMPIAR AND title:ribosome")


def test_search_windows_and_pages(fixture_mirror):
    everything = fixture_mirror.entry_ids()
    pages = [fixture_mirror.search("*", rows=20, page=p) for p in range(1, 6)]
    assert [k for page in pages for k in page] == everything
    assert pages[-1] == {}
    released = fixture_mirror.search("release_date:[2017-01-01 TO 2017-12-31]", rows=1000)
    assert released and all(r["release_date"][:4] == "2017" for r in released.values())
    assert "EMPIAR-10028" in released
    timestamps = fixture_mirror.search(
        "update_date:[2022-02-07T00:00:00Z TO 2022-02-07T23:59:59Z]", rows=1000
    )
    assert list(timestamps) == ["EMPIAR-10934"]


def test_mirror_sees_changed_files_and_names_broken_ones(tmp_path):
    mirror = Mirror(tmp_path)
    mirror.put_entry(10001, {"title": "a", "update_date": "2020-01-01"})
    assert mirror.search("*")["EMPIAR-10001"]["title"] == "a"
    mirror.put_entry("EMPIAR-10001", {"title": "b", "update_date": "2020-01-02"})
    assert mirror.search("*")["EMPIAR-10001"]["title"] == "b"
    mirror.put_entry_text(10002, '{"EMPIAR-10002": {"title": ')
    with pytest.raises(ValueError, match="EMPIAR-10002.json"):
        mirror.entry(10002)
    assert list(mirror.search("*")) == ["EMPIAR-10001"]  # the rest still answers
    with pytest.raises(KeyError):
        mirror.entry(10003)
    with pytest.raises(KeyError):
        mirror.archive_path("10001/../../secret")
    assert not list(tmp_path.rglob("*.tmp"))


def test_api_routes(archive_server):
    url = archive_server.url
    one = requests.get(f"{url}/empiar/api/entry/10028", timeout=5)
    assert one.status_code == 200 and list(one.json()) == ["EMPIAR-10028"]
    many = requests.post(f"{url}/empiar/api/entry/10005,10028-10030", timeout=5)
    assert sorted(many.json()) == ["EMPIAR-10005", "EMPIAR-10028"]
    missing = requests.get(f"{url}/empiar/api/entry/99999", timeout=5)
    assert missing.status_code == 404 and missing.json() == {"detail": "Not found."}
    page = requests.get(
        f"{url}/emdb/api/empiar/search/database:EMPIAR", params={"rows": 5, "page": 2}, timeout=5
    ).json()
    assert list(page) == archive_server.mirror.entry_ids()[5:10]
    bad = requests.get(f"{url}/emdb/api/empiar/search/title:x", timeout=5)
    assert bad.status_code == 400 and "title:x" in bad.json()["detail"]
    emdb = requests.get(f"{url}/emdb/api/entry/EMD-2660", timeout=5).json()
    resolution = emdb["structure_determination_list"]["structure_determination"][0][
        "image_processing"
    ][0]["final_reconstruction"]["resolution"]["valueOf_"]
    assert resolution == "3.2"
    assert [(m, s) for m, _, s in archive_server.requests] == [
        ("GET", 200),
        ("POST", 200),
        ("GET", 404),
        ("GET", 200),
        ("GET", 400),
        ("GET", 200),
    ]


def test_malformed_entry_is_served_as_stored(archive_server):
    archive_server.mirror.put_entry_text(10028, '{"EMPIAR-10028": {"title": "cut')
    client = EmpiarClient(archive_server.empiar_url, archive_server.emdb_url, retries=0)
    with pytest.raises(BadPayloadError, match="entry/10028"):
        client.entry(10028)


def make_archive(root: Path) -> bytes:
    payload = os.urandom(300_000)
    folder = root / "archive" / "10028" / "data" / "Particles"
    folder.mkdir(parents=True)
    (folder / "shiny.mrcs").write_bytes(payload)
    (folder / "shiny.star").write_text("data_\n")
    (folder / "half.mrcs.part").write_bytes(b"x")
    return payload


def test_archive_files_ranges_and_listings(tmp_path):
    payload = make_archive(tmp_path)
    with serve(tmp_path) as server:
        base = f"{server.archive_url}/10028/data/Particles"
        head = requests.head(f"{base}/shiny.mrcs", timeout=5)
        assert int(head.headers["Content-Length"]) == len(payload)
        assert head.headers["Accept-Ranges"] == "bytes"
        part = requests.get(f"{base}/shiny.mrcs", headers={"Range": "bytes=1000-"}, timeout=5)
        assert part.status_code == 206 and part.content == payload[1000:]
        assert part.headers["Content-Range"] == f"bytes 1000-{len(payload) - 1}/{len(payload)}"
        tail = requests.get(f"{base}/shiny.mrcs", headers={"Range": "bytes=-10"}, timeout=5)
        assert tail.content == payload[-10:]
        beyond = requests.get(
            f"{base}/shiny.mrcs", headers={"Range": f"bytes={len(payload)}-"}, timeout=5
        )
        assert beyond.status_code == 416
        assert beyond.headers["Content-Range"] == f"bytes */{len(payload)}"
        redirect = requests.get(base, allow_redirects=False, timeout=5)
        assert redirect.status_code == 301 and redirect.headers["Location"].endswith("/")
        listing = requests.get(base, timeout=5).text  # follows the redirect
        assert "Index of /empiar/world_availability/10028/data/Particles" in listing
        assert 'href="shiny.mrcs"' in listing and "293K" in listing
        assert ".part" not in listing
        assert requests.get(f"{base}/half.mrcs.part", timeout=5).status_code == 404
        assert (
            requests.get(
                f"{server.archive_url}/10028/../../empiar/EMPIAR-10028.json", timeout=5
            ).status_code
            == 404
        )


def test_cut_fault_closes_the_connection_mid_body(tmp_path):
    payload = make_archive(tmp_path)
    with serve(tmp_path) as server:
        server.faults.append(Fault("shiny.mrcs", "cut", cut_after_bytes=5000))
        url = f"{server.archive_url}/10028/data/Particles/shiny.mrcs"
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            requests.get(url, timeout=5).content  # noqa: B018 - reading the body is the test
        assert requests.get(url, timeout=5).content == payload  # the fault fired once


def test_autoindex_shape(tmp_path):
    (tmp_path / "a_rather_long_file_name_for_apache.mrcs").write_bytes(b"1" * 2048)
    (tmp_path / "sub").mkdir()
    page = autoindex_html("/empiar/world_availability/1/", tmp_path)
    assert 'href="a_rather_long_file_name_for_apache.mrcs"' in page
    assert "a_rather_long_file_n..&gt;" in page and "2.0K" in page
    assert 'alt="[DIR]"> <a href="sub/">sub/</a>' in page
    assert 'href="/empiar/world_availability/">Parent Directory' in page


def test_serve_archive_command(tmp_path):
    command = [
        sys.executable,
        "-m",
        "particleseg_model.cli",
        "serve-archive",
        str(tmp_path / "mirror"),
        "--port",
        "0",
        "--fixture",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        first = process.stdout.readline()
        assert first.startswith("serving ") and " at http://127.0.0.1:" in first
        exports = dict(
            process.stdout.readline().removeprefix("export ").strip().split("=", 1)
            for _ in range(3)
        )
        reply = requests.get(exports["PARTICLESEG_EMPIAR_URL"] + "/entry/10934", timeout=5)
        assert reply.json()["EMPIAR-10934"]["title"].startswith("Cryo-EM multiframe")
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # a loaded CI machine: do not leave it behind
            process.kill()
            process.wait(timeout=10)
    assert json.loads((tmp_path / "mirror" / "empiar" / "EMPIAR-10934.json").read_text())
