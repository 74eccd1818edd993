"""The corpus build of one partition as plain Python (particleseg_model.corpus.build), without
Dagster: stacks fetched from a loopback archive -> deposited poses -> mask -> labels in Zarr."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from particleseg_model.access.empiar import EmdbClient, EmpiarClient
from particleseg_model.access.server import serve
from particleseg_model.corpus import build
from particleseg_model.corpus.manifests import (
    LabelsManifest,
    MaskManifest,
    RefinedManifest,
    StacksManifest,
)
from particleseg_model.corpus.store import open_corpus
from particleseg_model.simulation.demo_archive import write_demo_archive

N_PARTICLES = 40
RUN_ID = "0123456789abcdef-build"

# The build in a fresh interpreter: the whole code path, function-level imports included,
# must leave dagster unimported. Prints a JSON summary of the results on its last line.
BUILD_SCRIPT = """
import json, sys
from pathlib import Path
from particleseg_model.access.empiar import EmdbClient, EmpiarClient
from particleseg_model.access.server import serve
from particleseg_model.corpus import build

archive, work, run_id = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
lines = []
with serve(archive) as server:
    entry = EmpiarClient(server.empiar_url, server.emdb_url).entry("30001")
    stacks = build.fetch_stacks(
        entry, server.archive_url, work / "downloads", work / "particle_stacks",
        map_resolution_a=lambda: build.best_map_resolution_a(
            entry, emdb=EmdbClient(server.emdb_url)
        ),
        emdb_files_url=server.emdb_files_url, emdb=EmdbClient(server.emdb_url),
        map_cache=work / "emdb", log=lines.append,
    )
refined = build.refine_poses(stacks.manifest, work / "refined_particles", run_id=run_id)
mask = build.make_mask_volume(stacks.manifest, refined.manifest, work / "mask_volume")
labels = build.label_partition(
    stacks.manifest, refined.manifest, mask.manifest, work / "corpus", work / "particle_masks",
    build.LabelOptions(batch=16), run_id=run_id, log=lines.append,
)
print(json.dumps({
    "dagster_imported": "dagster" in sys.modules,
    "log": lines,
    "stacks": stacks.summary(),
    "refined": refined.summary(),
    "poses_passed": refined.poses.passed,
    "resolution": refined.resolution.summary(),
    "mask": mask.summary(),
    "labels": labels.summary(),
    "masks_check": [labels.masks.passed, labels.masks.summary()],
    "rows_check": [labels.rows.passed, labels.rows.summary()],
    "stage_seconds": labels.stage_seconds,
}, default=str))
"""


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("build") / "archive"
    write_demo_archive(
        out,
        maps=["generated:globular"],
        n_particles=N_PARTICLES,
        box=64,
        micrograph_entries=0,
        particles_per_stack=16,
        seed=5,
        snr=2.0,
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def built(archive: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One partition built by BUILD_SCRIPT in a subprocess: (its folder, its summary)."""
    work = tmp_path_factory.mktemp("work")
    done = subprocess.run(
        [sys.executable, "-c", BUILD_SCRIPT, str(archive), str(work), RUN_ID],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return work, json.loads(done.stdout.strip().splitlines()[-1])


def test_one_partition_builds_without_dagster(built: tuple[Path, dict]) -> None:
    work, summary = built
    assert summary["dagster_imported"] is False
    assert summary["log"][0].startswith("fetching what EMPIAR-30001 needs from http://127.0.0.1")
    assert summary["log"][-1].startswith(f"labels: {N_PARTICLES}/{N_PARTICLES} particles (")

    stacks = summary["stacks"]
    assert (stacks["particles"], stacks["box_px"], stacks["source"]) == (
        N_PARTICLES,
        64,
        "particles",
    )
    assert stacks["poses_deposited"] is True and stacks["extraction"] == {}
    refined = summary["refined"]
    # the simulator deposits the true poses (zero error) and a nominal 3.2 A map in EMDB
    assert refined["source"] == "deposited" and refined["resolution_a"] == pytest.approx(3.2)
    assert refined["pose_median_angle_error_deg"] == pytest.approx(0, abs=1e-3)
    assert summary["poses_passed"] is True
    assert summary["resolution"] == {
        "resolution_a": pytest.approx(3.2),
        "from": "EMDB map of the entry",
    }
    assert 0.005 < summary["mask"]["volume_fraction"] < 0.5

    labels = summary["labels"]
    assert labels["particles"] == N_PARTICLES and labels["skipped_bad_rows"] == 0
    fractions = [labels[f"{c}_fraction"] for c in ("background", "signal", "edge")]
    assert sum(fractions) == pytest.approx(1, abs=1e-3)
    low, high = build.SIGNAL_FRACTION_RANGE
    assert low < labels["signal_fraction"] < high and labels["edge_fraction"] > 0
    assert summary["masks_check"][0] is True
    assert summary["masks_check"][1]["particles_written"] == N_PARTICLES
    rows = {"images": N_PARTICLES, "labels": N_PARTICLES, "parquet": N_PARTICLES}
    assert summary["rows_check"] == [True, rows]
    assert set(summary["stage_seconds"]) == {"project", "read images", "labels", "write"}

    corpus = open_corpus(work / "corpus", "30001")
    assert corpus.n_particles == N_PARTICLES and corpus.box == 64
    assert corpus.attrs["pose_source"] == "deposited" and corpus.attrs["dagster_run_id"] == RUN_ID
    label_array = np.asarray(corpus.labels[:])
    assert set(np.unique(label_array)) == {0, 1, 2}
    share = np.bincount(label_array.ravel(), minlength=3) / label_array.size
    assert share.tolist() == pytest.approx(fractions, abs=1e-4)
    assert corpus.table["image_name"].is_unique and corpus.table["is_good"].notna().all()


def test_manifests_keep_their_json(built: tuple[Path, dict]) -> None:
    """The JSON each step writes is a contract (the assets, the demo and the fault tests read
    it): the same keys as before the typed manifests, and a lossless round trip."""
    work, _ = built
    keys = {
        "particle_stacks": [
            "empiar_id", "kind", "particles_star", "base_dir", "n_particles", "box_px",
            "pixel_size_a", "has_poses", "maps", "ground_truth", "extraction",
            "map_resolution_a", "downloaded_bytes", "reference_map", "negatives",
        ],
        "refined_particles": [
            "empiar_id", "source", "particles_star", "base_dir", "refined_map", "n_particles",
            "box_px", "pixel_size_a",
        ],
        "mask_volume": [
            "map", "lowpass_a", "extend_px", "soft_edge_px", "threshold", "box_px",
            "pixel_size_a", "mask",
        ],
        "particle_masks": [
            "corpus_root", "empiar_id", "n_particles", "skipped", "label_fractions",
            "pixel_size_a", "threshold", "edge_px", "source_star", "pose_source", "mask",
            "mask_params", "dagster_run_id", "n_negatives",
        ],
    }  # fmt: skip
    types = {
        "particle_stacks": StacksManifest,
        "refined_particles": RefinedManifest,
        "mask_volume": MaskManifest,
        "particle_masks": LabelsManifest,
    }
    for asset, expected in keys.items():
        folder = work / asset
        raw = json.loads((folder / "manifest.json").read_text())
        assert list(raw) == expected, asset
        manifest = types[asset].read(folder)
        assert manifest.to_json() == raw, asset
        assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    stacks = StacksManifest.read(work / "particle_stacks")
    assert stacks.empiar_id == "EMPIAR-30001" and stacks.map_resolution_a == pytest.approx(3.2)
    assert stacks.ground_truth is not None and stacks.ground_truth.exists()
    # the archive holds no map: the reference comes from EMDB's file layout, once per id
    assert stacks.maps == ()
    reference = stacks.reference
    assert reference is not None and reference.emdb_id == "EMD-95001"
    assert reference.source == "emdb" and reference.resolution_a == pytest.approx(3.2)
    assert reference.url.endswith("/pub/databases/emdb/structures/EMD-95001/map/emd_95001.map.gz")
    assert reference.path == work / "emdb" / "EMD-95001" / "emd_95001.map"
    assert reference.sha256 == hashlib.sha256(reference.path.read_bytes()).hexdigest()
    assert MaskManifest.read(work / "mask_volume").map == str(reference.path)
    labels = LabelsManifest.read(work / "particle_masks")
    assert labels.empiar_id == "30001" and labels.run_id == RUN_ID
    assert labels.mask_params == MaskManifest.read(work / "mask_volume").params()
    with pytest.raises(FileNotFoundError, match="materialize refined_particles for this partition"):
        RefinedManifest.read(work / "nowhere")


def test_bad_rows_are_named_or_skipped(archive: Path, tmp_path: Path) -> None:
    with serve(archive) as server:
        entry = EmpiarClient(server.empiar_url, server.emdb_url).entry("30001")
        stacks = build.fetch_stacks(
            entry,
            server.archive_url,
            tmp_path / "downloads",
            tmp_path / "stacks",
            map_resolution_a=lambda: build.best_map_resolution_a(
                entry, emdb=EmdbClient(server.emdb_url)
            ),
            emdb_files_url=server.emdb_files_url,
        ).manifest
    refined = build.refine_poses(stacks, tmp_path / "refined").manifest
    mask = build.make_mask_volume(stacks, refined, tmp_path / "mask").manifest
    (stacks.base_dir / "Particles" / "particles_002.mrcs").unlink()

    def label(**options) -> build.LabelResult:
        return build.label_partition(
            stacks,
            refined,
            mask,
            tmp_path / "corpus",
            tmp_path / "labels",
            build.LabelOptions(**options),
            warn=warned.append,
        )

    warned: list[str] = []
    with pytest.raises(ValueError) as refused:
        label()
    message = str(refused.value)
    assert "16 particles cannot be read: stack Particles/particles_002.mrcs, rows 17-32" in message
    assert message.endswith("(set skip_bad_rows to drop them)")
    assert not (tmp_path / "labels" / "manifest.json").exists()

    result = label(skip_bad_rows=True)
    assert warned and warned[0].startswith("skipping 16 particles that cannot be read")
    assert result.manifest.skipped == 16 and result.manifest.n_particles == N_PARTICLES - 16
    assert open_corpus(tmp_path / "corpus", "30001").n_particles == N_PARTICLES - 16
    again = label(skip_bad_rows=True, append=True)
    assert again.already_in_corpus == N_PARTICLES - 16 and again.manifest.n_particles == 0


def test_refinement_choice_is_refused_in_one_line(built: tuple[Path, dict], tmp_path) -> None:
    work, _ = built
    stacks = StacksManifest.read(work / "particle_stacks")
    with pytest.raises(ValueError, match="source must be auto, deposited or refine, got 'best'"):
        build.refine_poses(stacks, tmp_path, build.RefineOptions(source="best"))
    posed = dataclasses.replace(stacks, has_poses=False)
    with pytest.raises(ValueError, match=r"particles.star has no poses .*use source 'refine'"):
        build.refine_poses(posed, tmp_path, build.RefineOptions(source="deposited"))
    without_map = dataclasses.replace(stacks, maps=(), reference=None)
    with pytest.raises(FileNotFoundError, match="EMPIAR-30001: no deposited map to start"):
        build.refine_poses(without_map, tmp_path, build.RefineOptions(source="refine"))
    refined = RefinedManifest.read(work / "refined_particles")
    with pytest.raises(FileNotFoundError, match="EMPIAR-30001: no map to make a mask from"):
        build.make_mask_volume(without_map, refined, tmp_path)


def test_check_values() -> None:
    table = pd.DataFrame(
        {
            "rot_deg": [0.0, np.nan, 3.0, 1.0],
            "tilt_deg": [1.0, 2.0, np.inf, 1.0],
            "psi_deg": 0.0,
            "origin_x_a": 0.0,
            "origin_y_a": 0.0,
        }
    )
    check = build.poses_check(table)
    assert (check.passed, check.rows, check.first_rows) == (False, (2, 3), "2-3")
    assert check.summary() == {"particles": 4, "without_pose": 2, "first_rows": "2-3"}
    assert build.poses_check(table.iloc[[0, 3]]).passed
    missing = build.poses_check(table.drop(columns=["origin_x_a", "psi_deg"]))
    assert missing.missing_columns == ("psi_deg", "origin_x_a") and not missing.passed
    assert build.row_ranges([17, 18, 19, 25]) == "17-19, 25"
    assert build.row_ranges(list(range(1, 40, 2))) == "1, 3, 5, 7, 9, 11, 13, 15, ..."
    assert build.masks_check(0.2, 5, 100).passed
    assert not build.masks_check(0.2, 6, 100).passed  # more than 5% without signal
    assert not build.masks_check(0.005, 0, 100).passed and not build.masks_check(0.9, 0, 1).passed
    assert not build.RowsCheck(3, 3, 2).passed and build.RowsCheck(3, 3, 3).passed
    assert build.ResolutionCheck(None, "x").summary()["resolution_a"] != 0


@pytest.mark.parametrize(
    ("config", "options"),
    [
        ("StacksConfig", build.StacksOptions),
        ("RefineConfig", build.RefineOptions),
        ("MaskConfig", build.MaskOptions),
        ("LabelConfig", build.LabelOptions),
    ],
)
def test_launchpad_configs_match_the_library_options(config: str, options: type) -> None:
    """The Dagster launchpad shows exactly the library's options: names, types, defaults."""
    from particleseg_assets.assets import corpus as assets

    config_class = getattr(assets, config)
    fields = dataclasses.fields(options)
    assert list(config_class.model_fields) == [f.name for f in fields]
    for f in fields:
        model_field = config_class.model_fields[f.name]
        assert model_field.default == f.default, f.name
        assert model_field.annotation is type(f.default), f.name
    # and what the launchpad really offers: the op's config schema
    op = {
        "StacksConfig": assets.particle_stacks,
        "RefineConfig": assets.refined_particles,
        "MaskConfig": assets.mask_volume,
        "LabelConfig": assets.particle_masks,
    }[config].op
    schema = op.config_schema.config_type.fields
    assert {name: field.default_value for name, field in schema.items()} == {
        f.name: f.default for f in fields
    }
    # the defaults round-trip: options built from a default config equal the defaults
    assert options(**config_class().model_dump()) == options()
