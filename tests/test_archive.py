"""Archive listings and downloads against the loopback server (cuts, resumes, bad servers)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import requests

from conftest import FAST_HTTP
from particleseg_model.access.archive import (
    DownloadError,
    RemoteFile,
    download,
    download_tree,
    list_directory,
    parse_listing,
    parse_size,
)
from particleseg_model.access.http import HttpClient
from particleseg_model.access.server import Fault, serve

PARTICLES = "10028/data/Particles/shiny.mrcs"
FILE_PATH = f"/empiar/world_availability/{PARTICLES}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, bytes]:
    """An EMPIAR-like entry under tmp_path/mirror/archive; relative path -> content."""
    files = {
        "10028/10028.xml": b"<entry/>\n",
        "10028/data/shiny_2sets.star": b"data_\nloop_\n_rlnImageName #1\n1@Particles/shiny.mrcs\n",
        PARTICLES: os.urandom(300_000),
        "10028/data/Particles/other one.mrcs": os.urandom(5000),
        "10028/data/Micrographs/mic_001.mrc": os.urandom(2048),
    }
    for relative, content in files.items():
        path = tmp_path / "mirror" / "archive" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return files


@pytest.fixture
def server(tree, tmp_path: Path):
    with serve(tmp_path / "mirror") as running:
        yield running


@pytest.fixture
def http(server) -> HttpClient:
    return HttpClient(server.archive_url, **FAST_HTTP)


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """Where downloads go (beside, not inside, the served mirror)."""
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def gets(server, path: str = FILE_PATH) -> list[tuple[str, int]]:
    return [(method, status) for method, p, status in server.requests if p == path]


# -- listings -------------------------------------------------------------------------------
def test_parse_size():
    assert parse_size("512") == 512
    assert parse_size("1.2K") == round(1.2 * 1024)
    assert parse_size("3.4M") == round(3.4 * 1024**2)
    assert parse_size("1.0G") == 1024**3
    assert parse_size("254M") == 254 * 1024**2
    assert parse_size("-") is None
    assert parse_size("2016-03-01") is None and parse_size("10:00") is None


def test_list_directory_over_http(server, http, tree):
    entries = list_directory(f"{server.archive_url}/10028/data/Particles", http)  # no slash
    base = f"{server.archive_url}/10028/data/Particles/"
    assert entries == [
        RemoteFile("other one.mrcs", base + "other%20one.mrcs", False, round(4.9 * 1024)),
        RemoteFile("shiny.mrcs", base + "shiny.mrcs", False, 293 * 1024),
    ]
    top = list_directory(f"{server.archive_url}/10028/data/", http)
    assert [(e.name, e.is_dir, e.size_bytes) for e in top] == [
        ("Micrographs", True, None),
        ("Particles", True, None),
        ("shiny_2sets.star", False, len(tree["10028/data/shiny_2sets.star"])),
    ]
    assert top[0].url == f"{server.archive_url}/10028/data/Micrographs/"
    # the listed URLs work as they are
    assert [e.name for e in list_directory(top[1].url, http)] == ["other one.mrcs", "shiny.mrcs"]


def test_listing_failures_other_than_404_name_url_and_status(server, http):
    """Only a 404 means absent; a 5xx is retried (the client's policy), then fails with the
    URL and status; a reply that is not a listing fails too."""
    from particleseg_model.access.http import NotFoundError, ServerError

    with pytest.raises(NotFoundError) as missing:
        list_directory(f"{server.archive_url}/10028/data/Map/", http)
    assert missing.value.status == 404
    server.faults.append(Fault(r"/10028/data/$", status=503, times=1))
    assert len(list_directory(f"{server.archive_url}/10028/data/", http)) == 3  # retried
    server.faults.append(Fault(r"/10028/data/$", status=500, times=-1))
    with pytest.raises(ServerError, match=r"GET http://.*/10028/data/: server error \(500\)") as e:
        list_directory(f"{server.archive_url}/10028/data/", http)
    assert e.value.status == 500 and e.value.url.endswith("/10028/data/")
    attempts = [s for m, p, s in server.requests if p.endswith("/10028/data/")]
    assert attempts == [503, 200] + [500] * (FAST_HTTP["retries"] + 1)
    server.faults.clear()
    server.faults.append(Fault(r"/10028/data/$", kind="garbage", times=-1))
    with pytest.raises(ValueError, match="not a directory listing"):
        list_directory(f"{server.archive_url}/10028/data/", http)
    server.faults.clear()


def test_list_directory_creates_its_own_client(server):
    assert [e.name for e in list_directory(f"{server.archive_url}/10028")] == ["10028.xml", "data"]


EBI_TABLE = """<!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 3.2 Final//EN">
<html>
 <head>
  <title>Index of /empiar/world_availability/10028</title>
 </head>
 <body>
<h1>Index of /empiar/world_availability/10028</h1>
  <table>
   <tr><th valign="top"><img src="/icons/blank.gif" alt="[ICO]"></th>\
<th><a href="?C=N;O=D">Name</a></th><th><a href="?C=M;O=A">Last modified</a></th>\
<th><a href="?C=S;O=A">Size</a></th><th><a href="?C=D;O=A">Description</a></th></tr>
   <tr><th colspan="5"><hr></th></tr>
<tr><td valign="top"><img src="/icons/back.gif" alt="[PARENTDIR]"></td>\
<td><a href="/empiar/world_availability/">Parent Directory</a></td><td>&nbsp;</td>\
<td align="right">  - </td><td>&nbsp;</td></tr>
<tr><td valign="top"><img src="/icons/text.gif" alt="[TXT]"></td>\
<td><a href="10028.xml">10028.xml</a></td><td align="right">2019-05-02 14:21  </td>\
<td align="right">4.1K</td><td>&nbsp;</td></tr>
<tr><td valign="top"><img src="/icons/folder.gif" alt="[DIR]"></td>\
<td><a href="data/">data/</a></td><td align="right">2016-03-01 10:00  </td>\
<td align="right">  - </td><td>&nbsp;</td></tr>
<tr><td valign="top"><img src="/icons/unknown.gif" alt="[   ]"></td>\
<td><a href="big%20map.mrc">big map.mrc</a></td><td align="right">2016-03-01 10:00  </td>\
<td align="right">1.0G</td><td>&nbsp;</td></tr>
   <tr><th colspan="5"><hr></th></tr>
</table>
<address>Apache/2.4.37 Server at ftp.ebi.ac.uk Port 443</address>
</body></html>
"""

PRE_WITH_ICON_LINKS = """<html><body><h1>Index of /x/</h1><pre>
<a href="?C=N;O=D">Name</a>  <a href="?C=M;O=A">Last modified</a>  <a href="?C=S;O=A">Size</a>
<hr><a href="/"><img src="/icons/back.gif" alt="[DIR]"></a> <a href="/">Parent Directory</a>  -
<a href="run.star"><img src="/icons/text.gif" alt="[TXT]"></a> <a href="run.star">run.star</a>\
      01-Mar-2016 10:00  3.4M
<a href="mics/"><img src="/icons/folder.gif" alt="[DIR]"></a> <a href="mics/">mics/</a>\
          01-Mar-2016 10:00    -
<a href="https://elsewhere.org/file">elsewhere</a> <a href="mailto:x@y">mail</a>
<a href="../sibling/">sibling</a> <a href="#top">top</a>
<hr></pre></body></html>
"""


def test_parse_apache_table_layout():
    base = "https://ftp.ebi.ac.uk/empiar/world_availability/10028/"
    assert parse_listing(EBI_TABLE, base) == [
        RemoteFile("10028.xml", base + "10028.xml", False, round(4.1 * 1024)),
        RemoteFile("data", base + "data/", True, None),
        RemoteFile("big map.mrc", base + "big%20map.mrc", False, 1024**3),
    ]


def test_parse_pre_layout_with_linked_icons():
    base = "https://example.org/x/"
    assert parse_listing(PRE_WITH_ICON_LINKS, base) == [
        RemoteFile("run.star", base + "run.star", False, round(3.4 * 1024**2)),
        RemoteFile("mics", base + "mics/", True, None),
    ]


def test_list_local_folder_and_file_url(tree, tmp_path: Path):
    folder = tmp_path / "mirror" / "archive" / "10028" / "data" / "Particles"
    (folder / "unfinished.mrcs.part").write_bytes(b"x")
    (folder / ".hidden").write_bytes(b"x")
    expected = [("other one.mrcs", False, 5000), ("shiny.mrcs", False, 300_000)]
    for where in (folder, str(folder), folder.as_uri()):
        entries = list_directory(where)
        assert [(e.name, e.is_dir, e.size_bytes) for e in entries] == expected
    assert entries[0].url == (folder / "other one.mrcs").as_uri()
    with pytest.raises(FileNotFoundError):
        list_directory(tmp_path / "nowhere")


# -- downloads ------------------------------------------------------------------------------
def test_download_bytes_and_atomic_rename(server, http, tree, out: Path):
    dest = out / "sub" / "shiny.mrcs"
    assert download(f"{server.archive_url}/{PARTICLES}", dest, http=http, chunk_bytes=4096) == dest
    assert sha256(dest.read_bytes()) == sha256(tree[PARTICLES])
    assert os.listdir(dest.parent) == ["shiny.mrcs"]  # no .part left
    assert gets(server) == [("GET", 200)]  # the size comes with the GET: no HEAD


def test_download_into_a_folder_with_its_own_client(server, tree, out: Path):
    path = download(
        f"{server.archive_url}/10028/data/Particles/other%20one.mrcs", out, progress=False
    )
    assert path == out / "other one.mrcs"
    assert path.read_bytes() == tree["10028/data/Particles/other one.mrcs"]


def test_cut_mid_download_resumes_with_range(server, http, tree, out: Path):
    server.faults.append(Fault(r"shiny\.mrcs$", "cut", cut_after_bytes=100_000))
    dest = download(f"{server.archive_url}/{PARTICLES}", out / "shiny.mrcs", http=http)
    assert sha256(dest.read_bytes()) == sha256(tree[PARTICLES])
    assert gets(server) == [("GET", 200), ("GET", 206)]
    assert not (out / "shiny.mrcs.part").exists()


def test_cuts_that_make_progress_never_give_up(server, http, tree, out: Path):
    # every reply is cut after 40 kB: each attempt brings new bytes, so it goes on to the end
    server.faults.append(Fault(r"shiny\.mrcs$", "cut", cut_after_bytes=40_000, times=-1))
    dest = download(f"{server.archive_url}/{PARTICLES}", out / "shiny.mrcs", http=http)
    assert dest.read_bytes() == tree[PARTICLES]
    assert [s for m, s in gets(server) if m == "GET"] == [200] + [206] * 7  # 8 x 40 kB


def test_repeated_cuts_raise_and_keep_only_the_part(server, http, tree, out: Path):
    url = f"{server.archive_url}/{PARTICLES}"
    dest = out / "shiny.mrcs"
    server.faults += [
        Fault(r"shiny\.mrcs$", "cut", cut_after_bytes=1000),
        Fault(r"shiny\.mrcs$", "cut", cut_after_bytes=0, times=-1),
    ]
    with pytest.raises(DownloadError) as error:
        download(url, dest, http=http)
    message = str(error.value)
    assert url in message and str(dest) in message and "gave up after 3 attempts" in message
    assert error.value.url == url and error.value.dest == dest
    assert os.listdir(out) == ["shiny.mrcs.part"]
    assert (out / "shiny.mrcs.part").read_bytes() == tree[PARTICLES][:1000]
    # the first GET (cut at 1000 bytes), then retries=2 -> 3 Range GETs that bring nothing
    assert gets(server) == [("GET", 200)] + [("GET", 206)] * 3

    # the next run resumes from the .part
    server.faults.clear()
    server.requests.clear()
    assert download(url, dest, http=http).read_bytes() == tree[PARTICLES]
    assert gets(server) == [("GET", 206)]
    assert os.listdir(out) == ["shiny.mrcs"]


class RangeIgnoringSession(requests.Session):
    """A client-side stand-in for a server that ignores Range and always sends 200."""

    def request(self, method, url, headers=None, **kwargs):
        headers = {k: v for k, v in (headers or {}).items() if k.lower() != "range"}
        return super().request(method, url, headers=headers, **kwargs)


def test_server_ignoring_range_restarts_from_zero(server, tree, out: Path):
    http = HttpClient(server.archive_url, session=RangeIgnoringSession(), **FAST_HTTP)
    dest = out / "shiny.mrcs"
    part = out / "shiny.mrcs.part"
    part.write_bytes(b"stale bytes that must not survive")
    server.faults.append(Fault(r"shiny\.mrcs$", "cut", cut_after_bytes=50_000))
    assert (
        download(f"{server.archive_url}/{PARTICLES}", dest, http=http).read_bytes()
        == tree[PARTICLES]
    )
    assert gets(server) == [("GET", 200), ("GET", 200)]  # cut, then from 0 again
    assert not part.exists()


def test_complete_file_is_not_downloaded_again(server, http, tree, out: Path):
    dest = out / "shiny.mrcs"
    download(f"{server.archive_url}/{PARTICLES}", dest, http=http)
    server.requests.clear()
    assert download(f"{server.archive_url}/{PARTICLES}", dest, http=http) == dest
    assert gets(server) == [("HEAD", 200)]  # no GET
    # a file of the wrong size is replaced
    dest.write_bytes(b"truncated")
    server.requests.clear()
    assert (
        download(f"{server.archive_url}/{PARTICLES}", dest, http=http).read_bytes()
        == tree[PARTICLES]
    )
    assert gets(server) == [("HEAD", 200), ("GET", 200)]
    # a server that refuses HEAD: the GET decides
    dest.write_bytes(b"truncated again")
    server.requests.clear()
    server.faults.append(Fault(r"shiny\.mrcs$", "status", status=405))
    assert (
        download(f"{server.archive_url}/{PARTICLES}", dest, http=http).read_bytes()
        == tree[PARTICLES]
    )
    assert gets(server) == [("HEAD", 405), ("GET", 200)]
    # a file of the expected size: no request at all
    server.requests.clear()
    assert (
        download(f"{server.archive_url}/{PARTICLES}", dest, http=http, expected_size=300_000)
        == dest
    )
    assert gets(server) == []


def test_complete_part_is_finished_by_a_416(server, http, tree, out: Path):
    url = f"{server.archive_url}/{PARTICLES}"
    (out / "shiny.mrcs.part").write_bytes(tree[PARTICLES])
    assert download(url, out / "shiny.mrcs", http=http).read_bytes() == tree[PARTICLES]
    # the GET asks for the part's last 64 KiB again: they match and nothing follows
    assert gets(server) == [("GET", 206)]
    assert os.listdir(out) == ["shiny.mrcs"]


def test_part_longer_than_the_file_is_thrown_away(server, http, tree, out: Path):
    url = f"{server.archive_url}/{PARTICLES}"
    (out / "shiny.mrcs.part").write_bytes(tree[PARTICLES] + b"junk")
    assert download(url, out / "shiny.mrcs", http=http).read_bytes() == tree[PARTICLES]
    # its last 64 KiB do not match the file's: thrown away, downloaded from zero
    assert gets(server) == [("GET", 206), ("GET", 200)]
    assert os.listdir(out) == ["shiny.mrcs"]


def test_longer_part_and_expected_size(server, http, tree, out: Path):
    url = f"{server.archive_url}/{PARTICLES}"
    (out / "shiny.mrcs.part").write_bytes(tree[PARTICLES] + b"junk")
    dest = download(url, out / "shiny.mrcs", http=http, expected_size=300_000)
    assert dest.read_bytes() == tree[PARTICLES]
    with pytest.raises(DownloadError, match="expected 299999"):
        download(url, out / "wrong.mrcs", http=http, expected_size=299_999)
    assert not (out / "wrong.mrcs").exists()
    assert not (out / "wrong.mrcs.part").exists()


def test_empty_file(server, http, tmp_path: Path, out: Path):
    (tmp_path / "mirror" / "archive" / "10028" / "empty.txt").write_bytes(b"")
    dest = download(f"{server.archive_url}/10028/empty.txt", out / "empty.txt", http=http)
    assert dest.read_bytes() == b"" and os.listdir(out) == ["empty.txt"]


def test_missing_file_and_server_errors(server, http, out: Path):
    with pytest.raises(DownloadError) as error:
        download(f"{server.archive_url}/10028/nothing.mrc", out / "n.mrc", http=http)
    assert error.value.status == 404 and "n.mrc" in str(error.value)
    server.faults.append(Fault(r"shiny\.mrcs$", "status", status=503, times=-1))
    with pytest.raises(DownloadError) as error:
        download(f"{server.archive_url}/{PARTICLES}", out / "s.mrcs", http=http)
    assert error.value.status == 503
    assert gets(server) == [("GET", 503)] * 3  # 1 + retries=2
    assert os.listdir(out) == []
    with pytest.raises(ValueError, match="download_tree"):
        download(f"{server.archive_url}/10028/", out, http=http)
    # nobody listening
    dead = HttpClient("http://127.0.0.1:9", **FAST_HTTP)
    with pytest.raises(DownloadError, match="connection failed"):
        download("http://127.0.0.1:9/x.mrc", out / "x.mrc", http=dead)
    assert os.listdir(out) == []


def test_file_url_copy(tree, tmp_path: Path):
    source = tmp_path / "mirror" / "archive" / PARTICLES
    dest = tmp_path / "copy" / "shiny.mrcs"
    assert download(source.as_uri(), dest) == dest
    assert sha256(dest.read_bytes()) == sha256(tree[PARTICLES])
    assert os.listdir(dest.parent) == ["shiny.mrcs"]
    assert (
        download(str(source), tmp_path / "copy2.mrcs", expected_size=300_000).read_bytes()
        == tree[PARTICLES]
    )
    with pytest.raises(DownloadError, match="expected 12"):
        download(source, tmp_path / "copy3.mrcs", expected_size=12)
    with pytest.raises(DownloadError, match="copy4.mrcs"):
        download(tmp_path / "absent.mrcs", tmp_path / "copy4.mrcs")
    assert not (tmp_path / "copy3.mrcs").exists() and not (tmp_path / "copy4.mrcs").exists()


# -- trees ----------------------------------------------------------------------------------
def test_download_tree_with_include(server, http, tree, tmp_path: Path):
    out = tmp_path / "out"
    paths = download_tree(
        f"{server.archive_url}/10028", out, http=http, include=["*.star", "data/Particles/*.mrcs"]
    )
    relative = sorted(p.relative_to(out).as_posix() for p in paths)
    assert relative == [
        "data/Particles/other one.mrcs",
        "data/Particles/shiny.mrcs",
        "data/shiny_2sets.star",
    ]
    for rel in relative:
        assert (out / rel).read_bytes() == tree[f"10028/{rel}"]
    assert not (out / "10028.xml").exists() and not (out / "data" / "Micrographs").exists()
    # everything, a second time: the three complete files are only HEADed
    server.requests.clear()
    assert len(download_tree(f"{server.archive_url}/10028/", out, http=http)) == 5
    fetched = sorted(p for m, p, s in server.requests if m == "GET" and not p.endswith("/"))
    assert fetched == [
        "/empiar/world_availability/10028/10028.xml",
        "/empiar/world_availability/10028/data/Micrographs/mic_001.mrc",
    ]


def test_download_tree_from_a_local_folder(tree, tmp_path: Path):
    source = tmp_path / "mirror" / "archive" / "10028"
    out = tmp_path / "out"
    paths = download_tree(source.as_uri(), out, include="*.mrc*")
    assert sorted(p.relative_to(out).as_posix() for p in paths) == [
        "data/Micrographs/mic_001.mrc",
        "data/Particles/other one.mrcs",
        "data/Particles/shiny.mrcs",
    ]
    assert all(p.read_bytes() == tree[f"10028/{p.relative_to(out).as_posix()}"] for p in paths)
    assert download_tree(source, tmp_path / "all") and (tmp_path / "all" / "10028.xml").exists()
