"""Catalog refresh (full and incremental) and the eligibility rule, against the loopback server."""

from __future__ import annotations

import pandas as pd
import pytest

from conftest import FAST_HTTP
from particleseg_model.access.catalog import (
    UpdateCursor,
    find_updates,
    read_catalog,
    refresh_catalog,
    select_eligible,
    select_not_fetchable,
    write_parquet,
)
from particleseg_model.access.empiar import EmdbClient, EmpiarClient
from particleseg_model.access.fixtures import (
    NOT_FETCHABLE,
    ORIGINAL_IDS_AT_3_5_A,
    REAL_EXTRA_IDS,
    SYNTHETIC_ELIGIBLE,
    emdb_record,
    fixture_records,
)
from particleseg_model.access.server import Fault

ORIGINAL = sorted(
    k for k in fixture_records()["entries"] if k < "EMPIAR-19000" and k not in REAL_EXTRA_IDS
)


def clients(server):
    return (
        EmpiarClient(server.empiar_url, server.emdb_url, **FAST_HTTP),
        EmdbClient(server.emdb_url, **FAST_HTTP),
    )


def test_full_refresh_builds_the_catalog(archive_server):
    refresh = refresh_catalog(*clients(archive_server))
    table = refresh.table
    assert len(ORIGINAL) == 56
    # every fixture entry but the malformed one (19007) has a row
    assert len(table) == len(fixture_records()["entries"]) - 1
    assert "EMPIAR-19007" not in set(table["empiar_id"])
    assert any("EMPIAR-19007" in e and "imagesets" in e for e in refresh.errors)
    row = table.set_index("empiar_id").loc["EMPIAR-10107"]  # six maps, best 3.2 A
    assert row["best_resolution_a"] == pytest.approx(3.2)
    assert len(row["emdb_ids"].split(",")) == 6
    assert row["dataset_size_bytes"] == 138_600_000_000
    errors = table.set_index("empiar_id")["error"]
    assert "does not parse" in errors["EMPIAR-19005"]
    assert "EMD-90006 not found" in errors["EMPIAR-19006"]
    assert errors["EMPIAR-10028"] == ""
    assert refresh.new_ids == sorted(table["empiar_id"]) and refresh.since is None


def test_eligibility_rule_on_the_original_list(archive_server):
    table = refresh_catalog(*clients(archive_server)).table
    strict = set(select_eligible(table)["empiar_id"])
    inclusive = set(select_eligible(table, inclusive=True)["empiar_id"])
    # "better than 3.5 A" drops the three original entries at exactly 3.5 A; inclusive keeps all 56
    assert strict == (set(ORIGINAL) - set(ORIGINAL_IDS_AT_3_5_A)) | set(SYNTHETIC_ELIGIBLE)
    assert inclusive == set(ORIGINAL) | set(SYNTHETIC_ELIGIBLE)
    for excluded in [
        "EMPIAR-10017",
        "EMPIAR-10076",
        "EMPIAR-10934",
        "EMPIAR-19001",
        "EMPIAR-19002",
        "EMPIAR-19004",
        "EMPIAR-19008",
        "EMPIAR-19011",
        "EMPIAR-19012",
        "EMPIAR-19013",
        "EMPIAR-19014",
        "EMPIAR-19015",
    ]:
        assert excluded not in inclusive
    no_particles_needed = set(select_eligible(table, require_particles=False)["empiar_id"])
    assert {"EMPIAR-10934", "EMPIAR-19012"} <= no_particles_needed
    print(f"fixture catalog: {len(strict)} eligible (strict) of {len(table)} rows")


def test_not_fetchable_entries_are_listed_with_the_reason(archive_server):
    """Free text, particle movies and tomography never make an entry eligible; entries that
    pass on resolution without a fetchable particle set are listed with the reason."""
    table = refresh_catalog(*clients(archive_server)).table
    listed = select_not_fetchable(table).set_index("empiar_id")
    assert sorted(listed.index) == sorted(NOT_FETCHABLE)
    reasons = listed["not_fetchable_reason"]
    assert "free text only" in reasons["EMPIAR-19013"]
    assert listed.loc["EMPIAR-19013", "mentions_particles_in_text"]
    assert "particle movies only" in reasons["EMPIAR-19014"]
    assert reasons["EMPIAR-19015"].startswith("tomography (tilt series)")
    assert not listed.loc["EMPIAR-19015", "is_single_particle"]
    assert "picked_particles_file_pattern" in reasons["EMPIAR-10934"]
    rows = table.set_index("empiar_id")
    assert rows.loc["EMPIAR-10028", "not_fetchable_reason"] == ""
    assert rows.loc["EMPIAR-10028", "ships_particles"]  # its real particle folder
    # the old rule (categories starting "picked particles", picked_particles_* on any imageset,
    # free text on micrographs) took these three as well
    old_rule = {"EMPIAR-19013", "EMPIAR-19014", "EMPIAR-19015"}
    assert not old_rule & set(select_eligible(table)["empiar_id"])
    print(
        f"not fetchable but good enough: {len(listed)} "
        + ", ".join(f"{k} ({v[:40]})" for k, v in reasons.items())
    )


def test_every_map_is_kept_with_its_resolution(archive_server):
    import json

    table = refresh_catalog(*clients(archive_server)).table.set_index("empiar_id")
    maps = json.loads(table.loc["EMPIAR-10107", "emdb_resolutions"])
    assert len(maps) == 6 and min(maps.values()) == pytest.approx(3.2)
    assert list(maps) == table.loc["EMPIAR-10107", "emdb_ids"].split(",")
    assert table.loc["EMPIAR-10107", "best_emdb_id"] == min(maps, key=maps.get)
    assert json.loads(table.loc["EMPIAR-19004", "emdb_resolutions"]) == {"EMD-90004": None}


def test_old_catalog_files_read_with_the_new_columns(archive_server, tmp_path):
    table = refresh_catalog(*clients(archive_server)).table
    old = table.drop(
        columns=[
            "is_single_particle",
            "mentions_particles_in_text",
            "not_fetchable_reason",
            "emdb_resolutions",
        ]
    )
    path = write_parquet(old, tmp_path / "old.parquet")
    read = read_catalog(path)
    assert read["is_single_particle"].all() and not read["mentions_particles_in_text"].any()
    assert (read["not_fetchable_reason"] == "").all()
    # judged by their flags until refreshed: EMPIAR-19015's particles are inside tomography
    eligible = set(select_eligible(table)["empiar_id"])
    assert set(select_eligible(read)["empiar_id"]) == eligible | {"EMPIAR-19015"}
    # and the next refresh rebuilds every row under the rule (not incrementally)
    again = refresh_catalog(*clients(archive_server), read)
    assert again.since is None and set(select_eligible(again.table)["empiar_id"]) == eligible


def test_incremental_refresh_fetches_only_what_changed(archive_server):
    empiar, emdb = clients(archive_server)
    first = refresh_catalog(empiar, emdb).table
    newest = first["update_date"].max()
    mirror = archive_server.mirror
    record = dict(fixture_records()["entries"]["EMPIAR-10028"])
    record.update(
        title="A new entry",
        update_date="2026-11-01",
        release_date="2026-11-01",
        cross_references=[{"name": "EMD-77777"}],
    )
    mirror.put_entry("EMPIAR-12345", record)
    mirror.put_emdb("EMD-77777", emdb_record("2.1"))
    archive_server.requests.clear()

    second = refresh_catalog(empiar, emdb, first)
    assert second.since == newest
    assert second.new_ids == ["EMPIAR-12345"]
    assert len(second.table) == len(first) + 1
    row = second.table.set_index("empiar_id").loc["EMPIAR-12345"]
    assert row["best_resolution_a"] == pytest.approx(2.1)
    emdb_paths = [p for _, p, _ in archive_server.requests if "/emdb/api/entry/" in p]
    # the new map, plus the maps of entries updated on the newest date and of rows with errors
    assert any("EMD-77777" in p for p in emdb_paths)
    assert len(emdb_paths) < 15
    # unchanged rows are carried over untouched
    old = first.set_index("empiar_id").loc["EMPIAR-10005"]
    assert (
        second.table.set_index("empiar_id").loc["EMPIAR-10005"]["fetched_at"] == old["fetched_at"]
    )


def test_bad_new_payload_keeps_the_previous_row(archive_server):
    empiar, emdb = clients(archive_server)
    first = refresh_catalog(empiar, emdb).table
    broken = dict(fixture_records()["entries"]["EMPIAR-10005"])
    broken.update(update_date="2026-11-02", imagesets={"not": "a list"})
    archive_server.mirror.put_entry("EMPIAR-10005", broken)
    second = refresh_catalog(empiar, emdb, first)
    assert any(e.startswith("EMPIAR-10005") for e in second.errors)
    row = second.table.set_index("empiar_id").loc["EMPIAR-10005"]
    assert row["best_resolution_a"] == pytest.approx(3.275)
    assert row["update_date"] != "2026-11-02"


def test_emdb_outage_keeps_known_resolutions(archive_server):
    empiar, emdb = clients(archive_server)
    first = refresh_catalog(empiar, emdb).table
    updated = dict(fixture_records()["entries"]["EMPIAR-10028"])
    updated["update_date"] = "2026-11-03"
    archive_server.mirror.put_entry("EMPIAR-10028", updated)
    archive_server.faults.append(Fault("EMD-2660", "status", status=500, times=-1))
    second = refresh_catalog(empiar, emdb, first)
    assert any("EMD-2660" in e for e in second.errors)
    assert second.table.set_index("empiar_id").loc["EMPIAR-10028"]["best_resolution_a"] == 3.2


def test_find_updates_is_idempotent(archive_server):
    empiar, emdb = clients(archive_server)
    changed, cursor = find_updates(empiar, None)
    assert len(changed) == len(archive_server.mirror.entry_ids())
    assert cursor.update_date == "2022-02-07" and cursor.ids == ["EMPIAR-10934"]
    again, same = find_updates(empiar, cursor)
    assert again == [] and same == cursor
    record = dict(fixture_records()["entries"]["EMPIAR-10005"])
    record["update_date"] = "2022-02-07"  # same day as the cursor: still new
    archive_server.mirror.put_entry("EMPIAR-10005", record)
    changed, cursor2 = find_updates(empiar, cursor)
    assert changed == ["EMPIAR-10005"]
    assert cursor2.ids == ["EMPIAR-10005", "EMPIAR-10934"]
    assert UpdateCursor.from_json(cursor2.to_json()) == cursor2


def test_parquet_writes_are_atomic(tmp_path):
    path = tmp_path / "catalog" / "t.parquet"
    write_parquet(pd.DataFrame({"empiar_id": ["EMPIAR-1"], "update_date": ["2020-01-01"]}), path)

    class Unwritable:
        def to_parquet(self, *args, **kwargs):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_parquet(Unwritable(), path)
    assert list(path.parent.iterdir()) == [path]  # no temporary file left, old file intact
    assert read_catalog(path)["empiar_id"].tolist() == ["EMPIAR-1"]
    assert read_catalog(tmp_path / "missing.parquet") is None
