"""The ``particleseg`` command line, end to end against the loopback server and real files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pandas as pd

from particleseg_model.access.server import Fault
from particleseg_model.cli import main


def test_catalog_command_refreshes_incrementally(server_env, tmp_path, capsys):
    out = tmp_path / "catalog.parquet"
    assert main(["catalog", "--out", str(out)]) == 0
    first = capsys.readouterr()
    assert "73 entries (73 new, 0 updated)" in first.out
    assert "EMPIAR-10028" in first.out and "EMPIAR-10081" not in first.out  # 3.5 A is not < 3.5
    assert "EMPIAR-19007: imagesets is str" in first.err
    assert len(pd.read_parquet(out)) == 73

    assert main(["catalog", "--out", str(out), "--inclusive"]) == 0
    second = capsys.readouterr().out
    assert "(0 new," in second and "EMPIAR-10081" in second


def test_catalog_command_reports_an_outage_in_one_line(server_env, tmp_path, capsys, monkeypatch):
    server_env.faults.append(Fault("/empiar/search/", "status", status=503, times=-1))
    monkeypatch.setenv("PARTICLESEG_HTTP_RETRIES", "1")
    code = main(["catalog", "--out", str(tmp_path / "c.parquet")])
    err = capsys.readouterr().err
    assert code == 3  # EXIT_ENVIRONMENT: the server failed, not the input
    assert err.startswith("particleseg catalog: error: GET ") and "503" in err
    assert not (tmp_path / "c.parquet").exists()


def test_download_command_survives_a_cut(archive_server, tmp_path, capsys):
    payload = os.urandom(200_000)
    source = archive_server.mirror.root / "archive" / "10028" / "data" / "p.mrcs"
    source.parent.mkdir(parents=True)
    source.write_bytes(payload)
    archive_server.faults.append(Fault("p.mrcs", "cut", cut_after_bytes=70_000))
    dest = tmp_path / "p.mrcs"
    assert main(["download", f"{archive_server.archive_url}/10028/data/p.mrcs", str(dest)]) == 0
    assert hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(payload).digest()
    assert ("GET", "/empiar/world_availability/10028/data/p.mrcs", 206) in archive_server.requests

    assert main(["download", f"{archive_server.archive_url}/10028/", str(tmp_path / "tree")]) == 0
    assert (tmp_path / "tree" / "data" / "p.mrcs").read_bytes() == payload
    assert "1 files in" in capsys.readouterr().out


def test_star_info_command(shared_data: Path, capsys):
    star = next(iter(sorted((shared_data / "star").glob("*.star"))))
    assert main(["star-info", str(star), "--rows", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{star}: RELION ") and "particles" in out


def test_star_info_names_a_bad_file(tmp_path, capsys):
    bad = tmp_path / "bad.star"
    bad.write_text("this is not a STAR file\n")
    assert main(["star-info", str(bad)]) == 1
    assert str(bad) in capsys.readouterr().err


def test_demo_archive_command_writes_a_served_archive(tmp_path, capsys):
    out = tmp_path / "archive"
    args = [
        "demo-archive",
        str(out),
        "--maps",
        "generated:globular",
        "generated:elongated",
        "--particles",
        "24",
        "--box",
        "48",
        "--junk-kinds",
        "empty,ice",
        "--seed",
        "3",
        "--micrograph-entries",
        "1",
        "--micrograph-size",
        "256",
        "--no-progress",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "2 simulated entries" in printed and "gallery.png" in printed
    truth = pd.read_csv(out / "archive" / "30001" / "data" / "ground_truth.csv")
    assert len(truth) == 24
    assert set(truth.loc[~truth["is_good"], "junk_kind"]) <= {"empty", "ice"}
    assert (out / "archive" / "30002" / "data" / "Coordinates").is_dir()
    assert (out / "archive" / "30001" / "data" / "gallery.png").read_bytes()[:4] == b"\x89PNG"

    # the same archive again is refused in one line, and nothing is touched
    before = sorted(p.name for p in (out / "archive").iterdir())
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("particleseg demo-archive: error:") and str(out) in err
    assert sorted(p.name for p in (out / "archive").iterdir()) == before


def test_demo_archive_command_rejects_bad_numbers(tmp_path, capsys):
    out = tmp_path / "archive"
    assert main(["demo-archive", str(out), "--junk-fraction", "1.0", "--no-progress"]) == 1
    assert "junk" in capsys.readouterr().err.lower()
    assert main(["demo-archive", str(out), "--junk-kinds", "dust", "--no-progress"]) == 1
    assert "dust" in capsys.readouterr().err
    assert not out.exists()
