"""Catalog fixtures for the local EMPIAR-compatible mirror: the embedded one and synthetic ones.

``data/empiar_fixture.json`` (built by ``scripts/build_empiar_fixture.py`` from public facts)
holds the 56 entries of the original particleSeg list with their real ids, titles, sizes, EMDB ids
and best resolutions (their imagesets illustrative, except EMPIAR-10028's folders, files and box),
the real EMPIAR-10934 header, EMPIAR-10076 and EMPIAR-10017 shaped by what public material says
of their particles and micrographs (no EMDB link known: never eligible here), and synthetic
entries 19001+ that are not eligible or malformed on purpose. Its ``provenance`` section names,
entry by entry, the real facts and their sources and the synthetic ones.

Under the eligibility rule (EMPIAR's vocabulary, :mod:`particleseg_model.access.catalog`) the
strict count is 53 originals + :data:`SYNTHETIC_ELIGIBLE`; the entries in :data:`NOT_FETCHABLE`
pass on resolution but have no fetchable particle set and are listed with the reason.
"""

from __future__ import annotations

import json
import random
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from particleseg_model.access.mirror import Mirror

# The original list holds 56 entries; three (10081, 10090, 10278) are at exactly 3.5 A, so the
# strict "better than 3.5 A" rule keeps 53 of them. Synthetic eligible ones: 19003, 19009, 19010.
ORIGINAL_IDS_AT_3_5_A = ("EMPIAR-10081", "EMPIAR-10090", "EMPIAR-10278")
SYNTHETIC_ELIGIBLE = ("EMPIAR-19003", "EMPIAR-19009", "EMPIAR-19010")
# Real entries outside the original list (EMPIAR-10934: the real XML; 10017, 10076: partly real).
REAL_EXTRA_IDS = ("EMPIAR-10017", "EMPIAR-10076", "EMPIAR-10934")
# Better than 3.5 A but nothing to fetch: micrographs without declared coordinates (10934, 19012),
# coordinates named only in free text (19013), particle movies only (19014), tomography (19008,
# 19015). The rule before EMPIAR's vocabulary took 19013, 19014 and 19015 as well.
NOT_FETCHABLE = (
    "EMPIAR-10934",
    "EMPIAR-19008",
    "EMPIAR-19012",
    "EMPIAR-19013",
    "EMPIAR-19014",
    "EMPIAR-19015",
)

# The imageset synthetic entries start from (it was EMPIAR-10028's first imageset before that
# entry got its real folders; kept so that synthetic mirrors stay the same)
_SYNTHETIC_TEMPLATE: dict[str, Any] = {
    "name": "Micrographs of Cryo-EM structure of the Plasmodium falciparum 80S ribosome ",
    "directory": "/data/Micrographs",
    "category": "micrographs - multiframe",
    "header_format": "TIFF",
    "data_format": "TIFF",
    "num_images_or_tilt_series": 60,
    "frames_per_image": 40,
    "voxel_type": "UNSIGNED BYTE",
    "pixel_width": 1.06,
    "image_width": "5760",
    "image_height": "4092",
    "details": "Dose-fractionated movies.",
    "micrographs_file_pattern": "data/Micrographs/*.tif",
    "picked_particles_file_pattern": "data/Coordinates/*.star",
    "picked_particles_directory": "data/Coordinates",
}


@cache
def fixture_records() -> dict[str, dict[str, Any]]:
    """``{"entries": {EMPIAR id: record}, "emdb": {EMD id: record}, "provenance": {EMPIAR id:
    {"status", "real_facts", "synthetic_facts"}}}`` of the embedded fixture."""
    text = resources.files("particleseg_model.access").joinpath("data/empiar_fixture.json")
    return json.loads(text.read_text(encoding="utf-8"))


def write_fixture_mirror(root: str | Path) -> Mirror:
    """Write the embedded fixture catalog into a mirror directory (idempotent)."""
    mirror = Mirror(root)
    records = fixture_records()
    for empiar_id, record in records["entries"].items():
        mirror.put_entry(empiar_id, record)
    for emd_id, record in records["emdb"].items():
        mirror.put_emdb(emd_id, record)
    return mirror


def emdb_record(resolution: str | None) -> dict[str, Any]:
    """A minimal EMDB entry as the API returns it, with ``resolution`` as a string."""
    processing: dict[str, Any] = {"final_reconstruction": {}}
    if resolution is not None:
        processing["final_reconstruction"]["resolution"] = {"valueOf_": resolution, "units": "Å"}
    return {
        "structure_determination_list": {
            "structure_determination": [
                {"method": "singleParticle", "image_processing": [processing]}
            ]
        }
    }


def synthetic_entry(number: int, rng: random.Random, update_date: str) -> tuple[dict, dict]:
    """One synthetic entry and its EMDB records: about a third ship particles or coordinates."""
    emd_ids = [f"EMD-{60000 + 3 * number + k}" for k in range(rng.choice((1, 1, 1, 2, 3)))]
    kind = rng.random()
    imageset = dict(_SYNTHETIC_TEMPLATE)
    if kind < 0.2:
        imageset["category"] = "picked particles - single frame - processed"
    elif kind < 0.35:
        imageset.update(
            category="micrographs - multiframe", picked_particles_file_pattern="data/coords/*.star"
        )
    else:
        imageset.update(
            category=rng.choice(
                ["micrographs - multiframe", "tilt series", "micrographs - single frame"]
            ),
            picked_particles_file_pattern="",
            picked_particles_directory="",
        )
    record = {
        "title": f"[synthetic] entry {number}",
        "status": "OBSOLETE" if kind > 0.98 else "REL",
        "release_date": update_date,
        "update_date": update_date,
        "dataset_size": f"{rng.uniform(0.05, 40):.1f} TB",
        "experiment_type": "EMDB",
        "cross_references": [{"name": e} for e in emd_ids],
        "citation": [],
        "imagesets": [imageset],
    }
    maps = {e: emdb_record(f"{rng.uniform(1.8, 6.0):.2f}") for e in emd_ids}
    return record, maps


def write_synthetic_mirror(
    root: str | Path,
    n_entries: int,
    *,
    seed: int = 0,
    first_number: int = 20000,
    first_year: int = 2014,
) -> Mirror:
    """A mirror of ``n_entries`` synthetic entries (ids ``first_number``...), update dates
    spread day by day from ``first_year``, for benchmarks and scale tests."""
    rng = random.Random(seed)
    mirror = Mirror(root)
    for i in range(n_entries):
        day = i // 3
        year, day_of_year = first_year + day // 336, day % 336
        update = f"{year}-{1 + day_of_year // 28:02d}-{1 + day_of_year % 28:02d}"
        record, maps = synthetic_entry(first_number + i, rng, update)
        mirror.put_entry(f"EMPIAR-{first_number + i}", record)
        for emd, emd_record in maps.items():
            mirror.put_emdb(emd, emd_record)
    return mirror
