"""Cleaning a RELION particle set with a tiny trained model: scores, selection, STAR output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import BOX, TINY, disc_particles, write_partition, write_star_project

from particleseg_model.cleaning.clean import (
    clean_star,
    default_scores_path,
    score_particles,
    select_particles,
)
from particleseg_model.em.mrc import MrcError
from particleseg_model.em.star import read_star, write_loop_blocks
from particleseg_model.model.calibration import calibrated_scores
from particleseg_model.model.registry import register_model, staging_dir

PNG = b"\x89PNG\r\n\x1a\n"
N_GOOD, N_JUNK = 60, 6  # N_JUNK each of empty, noise, fragment and aggregate


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry holding one tiny model (32 px) trained on disc particles."""
    from particleseg_model.model.train import TrainConfig, train_segmentation

    base = tmp_path_factory.mktemp("clean")
    write_partition(base / "corpus", "40001", 320, seed=1)
    trained = train_segmentation(
        base / "corpus", ["40001"], TrainConfig(**TINY), base / "trained", log=lambda line: None
    )
    root = base / "models"
    staged = staging_dir(root)
    (staged / "model.keras").write_bytes(trained.model_path.read_bytes())
    register_model(root, staged, {"input_size": BOX, "arch": "custom", "partitions": {}})
    return root


def discs(centres: list[np.ndarray], radius: float, rng: np.random.Generator) -> np.ndarray:
    """Bright discs in noise, normalised, as test_model.disc_particles draws one particle."""
    yy, xx = np.mgrid[:BOX, :BOX]
    inside = np.zeros((BOX, BOX), bool)
    for cy, cx in centres:
        inside |= np.hypot(yy - cy, xx - cx) <= radius
    image = inside * 2.0 + rng.normal(0, 0.5, (BOX, BOX))
    return ((image - image.mean()) / image.std()).astype(np.float32)


def junk_set(seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """(images, kind per row), shuffled. 'good': one particle size (disc radius 6-7.5 px) as
    in a real single-particle set; junk: 'empty' (no contrast, as ice), 'noise' (the model
    finds specks: ETS high), 'fragment' (radius ~2: ETS high), 'aggregate' (three particles
    stuck together: area too large)."""
    rng = np.random.default_rng(seed)

    def centre() -> np.ndarray:
        return BOX / 2 + rng.uniform(-3, 3, 2)

    def aggregate() -> np.ndarray:
        turn = rng.uniform(0, 2 * np.pi) + np.arange(3) * 2 * np.pi / 3
        middle = BOX / 2 + rng.uniform(-2, 2, 2)
        return discs(
            [middle + 6.5 * np.array([np.cos(a), np.sin(a)]) for a in turn], rng.uniform(6, 7), rng
        )

    groups = {
        "good": [discs([centre()], rng.uniform(6, 7.5), rng) for _ in range(N_GOOD)],
        "empty": list(rng.normal(0, 0.05, (N_JUNK, BOX, BOX)).astype(np.float32)),
        "noise": list(rng.normal(size=(N_JUNK, BOX, BOX)).astype(np.float32)),
        "fragment": [discs([centre()], rng.uniform(1.5, 2.5), rng) for _ in range(N_JUNK)],
        "aggregate": [aggregate() for _ in range(N_JUNK)],
    }
    images = np.stack([image for group in groups.values() for image in group])
    kinds = np.array([kind for kind, group in groups.items() for _ in group])
    order = rng.permutation(len(images))
    return images[order], kinds[order]


def write_stack(folder: Path, images: np.ndarray) -> None:
    import mrcfile

    (folder / "Particles").mkdir(parents=True, exist_ok=True)
    with mrcfile.new(folder / "Particles" / "stack.mrcs", overwrite=True) as mrc:
        mrc.set_data(images)
        mrc.voxel_size = 2.0


def write_project(
    folder: Path, images: np.ndarray, version: str = "3.1", names: list[str] | None = None
) -> Path:
    """A RELION project of the images: a 3.1 (two optics groups), 5.0 or 3.0 particle STAR."""
    write_stack(folder, images)
    n = len(images)
    names = names or [f"{i:06d}@Particles/stack.mrcs" for i in range(1, n + 1)]
    rng = np.random.default_rng(3)
    common = {
        "rlnImageName": names,
        "rlnMicrographName": [f"mics/{i // 10:04d}.mrc" for i in range(n)],
        "rlnCoordinateX": rng.uniform(0, 4000, n).round(1),
        "rlnAngleRot": rng.uniform(-180, 180, n).round(3),
        "rlnAnglePsi": rng.uniform(-180, 180, n).round(3),
        "rlnDefocusU": rng.uniform(8000, 20000, n).round(2),
        "rlnClassNumber": rng.integers(1, 4, n),
    }
    star = folder / "particles.star"
    if version == "3.0":
        particles = pd.DataFrame(
            {
                **common,
                "rlnOriginX": rng.integers(-3, 4, n).astype(float),
                "rlnVoltage": 300.0,
                "rlnDetectorPixelSize": 5.0,
                "rlnMagnification": 25000.0,
            }
        )
        lines = ["", "data_images", "", "loop_"]
        lines += [f"_{c} #{k}" for k, c in enumerate(particles.columns, 1)]
        lines += [" ".join(str(v) for v in row) for row in particles.itertuples(index=False)]
        star.write_text("\n".join(lines) + "\n")
        return star
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1, 2],
            "rlnOpticsGroupName": ["og1", "og2"],
            "rlnImagePixelSize": [2.0, 2.0],
            "rlnImageSize": [BOX, BOX],
            "rlnVoltage": [300.0, 200.0],
            "rlnImageDimensionality": [2, 2],
        }
    )
    particles = pd.DataFrame(
        {
            **common,
            "rlnOriginXAngst": rng.uniform(-5, 5, n).round(4),
            "rlnOpticsGroup": 1 + np.arange(n) % 2,
        }
    )
    write_loop_blocks(star, {"optics": optics, "particles": particles})
    if version == "5.0":
        star.write_text(star.read_text().replace("# version 30001", "# version 50001"))
    return star


def auc(scores: np.ndarray, junk: np.ndarray) -> float:
    """ROC-AUC of finding junk by a LOW score: P(junk scores below good), ties half."""
    s = np.where(np.isfinite(scores), scores, -1e300)
    low = (s[junk][:, None] < s[~junk][None, :]).mean()
    tie = (s[junk][:, None] == s[~junk][None, :]).mean()
    return float(low + tie / 2)


@pytest.fixture(scope="module")
def junk_project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    images, kinds = junk_set()
    return write_project(tmp_path_factory.mktemp("junk"), images), kinds


@pytest.fixture(scope="module")
def scored(models: Path, junk_project) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    star, kinds = junk_project
    lines: list[str] = []
    _, scores = score_particles(
        star, models_root=models, batch=16, progress=False, log=lines.append
    )
    return scores, kinds, lines


# ------------------------------------------------------------------------------- the scores


def test_scores_find_the_junk_and_calibrated_beats_ets(scored) -> None:
    scores, kinds, lines = scored
    n = len(kinds)
    assert list(scores.columns[:8]) == [
        "row",
        "image_name",
        "readable",
        "error",
        "signal_px",
        "edge_px",
        "ets",
        "signal_fraction",
    ]
    assert scores["row"].tolist() == list(range(1, n + 1)) and scores["readable"].all()
    assert scores["image_name"].iloc[5] == "000006@Particles/stack.mrcs"
    signal = scores["signal_px"].to_numpy(float)
    assert np.allclose(scores["signal_fraction"], signal / BOX**2)
    assert np.allclose(
        scores["ets"],
        np.divide(scores["edge_px"].to_numpy(float), signal, out=np.zeros(n), where=signal > 0),
    )
    assert not any("resizing" in line for line in lines)  # 32 px particles, 32 px model
    ets, calibrated = scores["ets"].to_numpy(), scores["calibrated"].to_numpy()
    good, junk = kinds == "good", kinds != "good"
    # the paper's rule: the particles without signal (empty) have ETS 0, the lowest
    assert (signal[kinds == "empty"] == 0).all() and (ets[kinds == "empty"] == 0).all()
    assert ets[good].min() > 0.3
    # ...but noise specks and fragments have a HIGHER ETS than good particles: ETS keeps them
    for kind in ("noise", "fragment"):
        assert np.median(ets[kinds == kind]) > 1.5 * np.median(ets[good]), kind
    assert np.isneginf(calibrated[signal == 0]).all()
    # calibrated drops all the kinds of junk: each scores below nearly every good particle
    for kind in ("empty", "noise", "fragment", "aggregate"):
        assert np.median(calibrated[kinds == kind]) < np.percentile(calibrated[good], 5), kind
    auc_ets, auc_cal = auc(ets, junk), auc(calibrated, junk)
    assert auc_cal > 0.97 and auc_cal > auc_ets + 0.2, (auc_ets, auc_cal)
    # dropping the junk share: calibrated drops (nearly) only junk, ets much less so
    share = junk.mean()
    precision = {}
    for score in ("ets", "calibrated"):
        dropped = ~select_particles(scores, score=score, drop=share)
        assert dropped.sum() == int(np.floor(share * n + 1e-9))
        precision[score] = junk[dropped].mean()
    assert precision["calibrated"] >= 0.9 and precision["ets"] <= 0.75, precision
    # the ETS rule still drops what it can see: every particle without signal
    assert (~select_particles(scores, score="ets", drop=share))[kinds == "empty"].all()


def test_calibrated_scores_on_known_features() -> None:
    rng = np.random.default_rng(0)
    area = rng.normal(150, 15, 200).round()
    ets = 4 * np.sqrt(np.pi / area) * rng.normal(1, 0.05, 200)  # a disc's ring / area
    area = np.concatenate([area, [10, 12, 900, 950, 0, 150]])
    ets = np.concatenate([ets, [3.0, 2.8, 0.12, 0.11, 0.0, ets[0]]])
    readable = np.ones(len(area), bool)
    readable[-1] = False
    score = calibrated_scores(ets, area, readable)
    typical = score[:200]
    assert np.all(score[200:204] < np.percentile(typical, 1))  # fragments and aggregates
    assert np.isneginf(score[204]) and np.isnan(score[205])
    # the log-density of a 2D Gaussian: at most -log(2 pi) - log(det C) / 2, mostly near it
    assert np.isfinite(typical).all() and np.median(typical) > np.percentile(typical, 5)
    # with too few particles the plain ETS ranks them
    assert np.allclose(calibrated_scores(np.array([0.5, 0.7]), np.array([9, 8])), [0.5, 0.7])


def test_select_particles_floor_ties_and_refusals() -> None:
    scores = pd.DataFrame(
        {
            "row": range(10),
            "readable": [True] * 9 + [False],
            "ets": [0.5, 0.1, 0.5, 0.5, 0.9, 0.2, 0.5, 0.8, 0.7, np.nan],
        }
    )
    # 9 readable, drop 0.3 -> floor(2.7) = 2 dropped (0.1, 0.2); unreadable always dropped
    keep = select_particles(scores, score="ets", drop=0.3)
    assert np.flatnonzero(~keep).tolist() == [1, 5, 9]
    # ties among the 0.5s: the earlier rows go first
    # floor(4.5) = 4: 0.1, 0.2, then rows 0 and 2
    keep = select_particles(scores, score="ets", drop=0.5)
    assert np.flatnonzero(~keep).tolist() == [0, 1, 2, 5, 9]
    default = select_particles(scores, score="ets")
    assert default.tolist() == select_particles(scores, score="ets", drop=0.3).tolist()
    assert select_particles(scores, score="ets", drop=0.0).sum() == 9
    assert np.flatnonzero(select_particles(scores, score="ets", keep_above=0.7)).tolist() == [4, 7]
    for bad in (1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=f"drop must be a fraction in \\[0, 1\\), got {bad}"):
            select_particles(scores, score="ets", drop=bad)
    with pytest.raises(ValueError, match="not both"):
        select_particles(scores, score="ets", drop=0.3, keep_above=0.5)
    with pytest.raises(ValueError, match="unknown score 'area'"):
        select_particles(scores, score="area")


# ------------------------------------------------------------------------- the cleaned STAR


@pytest.mark.parametrize("version", ["3.1", "3.0", "5.0"])
def test_cleaned_star_keeps_the_version_columns_optics_and_row_order(
    models: Path, tmp_path: Path, version: str
) -> None:
    images, kinds = junk_set(seed=11)
    star = write_project(tmp_path / "project", images[:40], version=version)
    before = read_star(star)
    assert before.version == version
    out = tmp_path / "clean" / "particles_clean.star"
    out.parent.mkdir()
    score = "calibrated" if version == "3.0" else "ets"
    scores_out = tmp_path / "scores.csv" if version == "3.0" else None
    result = clean_star(
        star,
        out,
        models_root=models,
        drop=0.25,
        score=score,
        batch=16,
        scores_out=scores_out,
        progress=False,
    )
    assert (result.total, result.kept, result.dropped, result.skipped) == (40, 30, 10, 0)
    assert result.version == version and result.out == out and result.particles_per_s > 0
    after = read_star(out)
    assert after.version == version and after.particles_block == before.particles_block
    assert list(after.blocks) == list(before.blocks)
    scores = (
        pd.read_csv(result.scores_path) if version == "3.0" else pd.read_parquet(result.scores_path)
    )
    assert result.scores_path == (scores_out or default_scores_path(out))
    assert len(scores) == 40 and scores["keep"].sum() == 30
    assert scores["keep"].tolist() == select_particles(scores, score=score, drop=0.25).tolist()
    kept_rows = np.flatnonzero(scores["keep"].to_numpy())
    original = before.blocks[before.particles_block]
    cleaned = after.blocks[after.particles_block]
    assert list(cleaned.columns) == list(original.columns)
    pd.testing.assert_frame_equal(cleaned, original.iloc[kept_rows].reset_index(drop=True))
    if version == "3.0":
        assert "optics" not in after.blocks and after.optics is None
        assert "rlnOriginX" in cleaned and "# version" not in out.read_text()
    else:
        pd.testing.assert_frame_equal(after.optics, before.optics)
        assert f"# version {'50001' if version == '5.0' else '30001'}" in out.read_text()
    assert result.cut == pytest.approx(scores[score][scores["keep"]].min())
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_clean_command_writes_the_report(
    models: Path, junk_project, tmp_path: Path, capsys
) -> None:
    from particleseg_model.cli import main

    star, _ = junk_project
    out, report = tmp_path / "clean.star", tmp_path / "report"
    code = main(
        [
            "clean",
            str(star),
            "--models-root",
            str(models),
            "--drop",
            "0.3",
            "--score",
            "calibrated",
            "--out",
            str(out),
            "--report",
            str(report),
            "--batch",
            "32",
            "--no-progress",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    n = len(read_star(star).particles)
    kept = n - int(np.floor(0.3 * n + 1e-9))
    assert f"kept {kept}/{n} particles (calibrated score" in captured.out
    assert f"dropped {n - kept}, skipped 0 unreadable" in captured.out
    assert str(out) in captured.out and "particles/s" in captured.out
    assert len(read_star(out).particles) == kept
    for name in ("score_histogram.png", "gallery.png"):
        data = (report / name).read_bytes()
        assert data[:8] == PNG and len(data) > 2000, name
    summary = json.loads((report / "report.json").read_text())
    assert (summary["particles"], summary["kept"], summary["dropped"]) == (n, kept, n - kept)
    assert summary["score"] == "calibrated" and summary["rule"] == {"drop": 0.3}
    assert summary["relion_version"] == "3.1" and summary["skipped_unreadable"] == 0
    assert Path(summary["scores"]) == default_scores_path(out).resolve()
    # gallery: 3 bands (lowest, median, highest) of 6 particles, each above its mask, the
    # 32 px boxes shown twice as large
    png = (report / "gallery.png").read_bytes()
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (2 * (6 * (BOX + 2) + 2), 2 * (3 * 2 * (BOX + 2) + 2))
    # --keep-above and --drop exclude each other; a bad drop is refused, nothing written
    with pytest.raises(SystemExit):
        main(["clean", str(star), "--drop", "0.3", "--keep-above", "1", "--out", "x.star"])
    capsys.readouterr()
    assert (
        main(
            [
                "clean",
                str(star),
                "--models-root",
                str(models),
                "--drop",
                "1.0",
                "--out",
                str(tmp_path / "other.star"),
                "--no-progress",
            ]
        )
        == 1
    )
    assert "drop must be a fraction in [0, 1), got 1.0" in capsys.readouterr().err
    assert not (tmp_path / "other.star").exists()


# --------------------------------------------------------------------------- bad rows, refusals


def test_missing_images_are_skipped_or_stop_the_run(models: Path, tmp_path: Path) -> None:
    images, _ = disc_particles(20, seed=3)
    names = [f"{i}@Particles/stack.mrcs" for i in range(1, 21)]
    names[4] = "25@Particles/stack.mrcs"  # beyond the stack
    names[13] = "1@Particles/gone.mrcs"  # no such stack
    star = write_project(tmp_path / "project", images, names=names)
    lines: list[str] = []
    _, scores = score_particles(star, models_root=models, batch=8, progress=False, log=lines.append)
    assert np.flatnonzero(~scores["readable"].to_numpy()).tolist() == [4, 13]
    assert scores["ets"].isna().sum() == 2 and scores["signal_px"].isna().sum() == 2
    assert "gone.mrcs" in scores["error"].iloc[13] and scores["error"].iloc[0] == ""
    assert any("2 of 20 particles cannot be read" in line for line in lines)

    result = clean_star(star, tmp_path / "clean.star", models_root=models, drop=0.0, progress=False)
    assert (result.kept, result.skipped, result.dropped) == (18, 2, 0)
    assert "25@Particles/stack.mrcs" not in (tmp_path / "clean.star").read_text()

    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(
        MrcError,
        match=r"particles.star: particle row 5 of 20 cannot be read: .*"
        r"image '25@Particles/stack.mrcs' is beyond the stack",
    ):
        clean_star(
            star,
            tmp_path / "stopped.star",
            models_root=models,
            on_bad="stop",
            batch=8,
            progress=False,
            report_dir=tmp_path / "report",
        )
    # the failure left nothing: no STAR, no scores, no temporary files
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_out_is_never_the_input_and_exists_only_when_complete(
    models: Path, tmp_path: Path, monkeypatch
) -> None:
    from particleseg_model.cleaning import clean as clean_module

    images, _ = disc_particles(12, seed=5)
    star = write_project(tmp_path / "project", images)
    original = star.read_bytes()
    same = tmp_path / "project" / ".." / "project" / "particles.star"
    for out in (star, same):
        for overwrite in (False, True):
            with pytest.raises(ValueError, match="is the input STAR file"):
                clean_star(star, out, models_root=models, overwrite=overwrite)
    with pytest.raises(ValueError, match="is the input STAR file"):
        clean_star(star, tmp_path / "c.star", scores_out=star, models_root=models)
    # refused before any work: an unknown model root is not even looked at
    with pytest.raises(ValueError, match="drop must be a fraction"):
        clean_star(star, tmp_path / "c.star", models_root=tmp_path / "none", drop=-0.5)
    assert star.read_bytes() == original

    existing = tmp_path / "existing.star"
    existing.write_text("keep me")
    with pytest.raises(FileExistsError, match="exists"):
        clean_star(star, existing, models_root=models)
    assert existing.read_text() == "keep me"

    # a failure while writing the report leaves no output at all
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(clean_module, "_gallery_png", broken)
    listing = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(RuntimeError, match="disk full"):
        clean_star(
            star, tmp_path / "c.star", models_root=models, report_dir=tmp_path / "r", progress=False
        )
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "r") == listing
    assert list((tmp_path / "r").iterdir()) == []
    monkeypatch.undo()
    result = clean_star(star, existing, models_root=models, overwrite=True, progress=False)
    assert len(read_star(existing).particles) == result.kept == 12 - 3
    assert star.read_bytes() == original


def test_a_model_at_another_size_resizes_and_says_so(models: Path, tmp_path: Path) -> None:
    star = write_star_project(tmp_path / "big", 10, box=48)
    lines: list[str] = []
    result = clean_star(
        star,
        tmp_path / "big_clean.star",
        model=models / "v0001",
        drop=0.2,
        progress=False,
        log=lines.append,
    )
    assert "particles are 48 px, the model takes 32 px: resizing" in "\n".join(lines)
    assert (result.box, result.model_input_size, result.kept) == (48, 32, 8)
    scores = pd.read_parquet(result.scores_path)
    assert np.allclose(scores["signal_fraction"], scores["signal_px"] / 48**2)
    # the discs are found at 48 px too: signal area near the truth's
    _, truth = disc_particles(10, box=48, seed=4)  # what write_star_project wrote
    ratio = scores["signal_px"].to_numpy(float) / (truth == 1).sum(axis=(1, 2))
    assert 0.6 < np.median(ratio) < 1.5, ratio
    assert os.path.exists(tmp_path / "big_clean.star")


# ------------------------------------------------------------------------- the Dagster asset


@pytest.mark.slow
def test_clean_job_records_counts_cut_histogram_and_output(
    models: Path, junk_project, tmp_path: Path, dagster_home
) -> None:
    from dagster import DagsterInstance

    from particleseg_assets.definitions import defs
    from particleseg_assets.resources import StorageResource

    star, kinds = junk_project
    before = star.read_bytes()
    data = tmp_path / "data"
    data.mkdir()
    (data / "models").symlink_to(models, target_is_directory=True)
    job = defs.resolve_job_def("clean_job")
    config = {
        "ops": {
            "cleaned_particles": {
                "config": {
                    "star": str(star),
                    "drop": 0.25,
                    "score": "calibrated",
                    "model_version": "v0001",
                }
            }
        }
    }
    result = job.execute_in_process(
        run_config=config,
        instance=DagsterInstance.get(),
        resources={"storage": StorageResource(root=str(data))},
    )
    assert result.success
    event = result.asset_materializations_for_node("cleaned_particles")[0]
    md = {k: v.value for k, v in event.metadata.items()}
    n = len(kinds)
    assert md["particles_before"] == n and md["particles_after"] == n - int(0.25 * n)
    assert md["model_version"] == "v0001" and md["score"] == "calibrated"
    assert md["relion_version"] == "3.1" and np.isfinite(md["cut"])
    assert md["score_histogram"].startswith("![score histogram with the cut](data:image/png;")
    cleaned = read_star(md["cleaned_star"])
    assert len(cleaned.particles) == md["particles_after"]
    assert Path(md["cleaned_star"]).parent == data / "cleaned" / "particles"
    scores = pd.read_parquet(md["scores"])
    assert len(scores) == n and int(scores["keep"].sum()) == md["particles_after"]
    assert star.read_bytes() == before  # the user's STAR is untouched

    # a bad drop fraction fails the run and leaves the good outputs as they were
    mtime = Path(md["cleaned_star"]).stat().st_mtime_ns
    bad = {"ops": {"cleaned_particles": {"config": {"star": str(star), "drop": 1.0}}}}
    failed = job.execute_in_process(
        run_config=bad,
        instance=DagsterInstance.get(),
        resources={"storage": StorageResource(root=str(data))},
        raise_on_error=False,
    )
    assert not failed.success
    assert Path(md["cleaned_star"]).stat().st_mtime_ns == mtime


def test_a_reference_calibration_scores_a_set_that_is_mostly_junk() -> None:
    from particleseg_model.model.calibration import fit_calibration, mask_features

    rng = np.random.default_rng(2)
    box = 128
    n_good, n_junk = 250, 750  # the paper's EMPIAR-10406 test: 75% junk
    ets = np.r_[rng.normal(0.5, 0.03, n_good), rng.normal(0.3, 0.06, n_junk)].clip(0.05)
    area = np.r_[rng.normal(0.2, 0.01, n_good), rng.normal(0.25, 0.06, n_junk)].clip(0.01)
    signal = (area * box * box).round()
    good = np.r_[np.ones(n_good, bool), np.zeros(n_junk, bool)]
    own = calibrated_scores(ets, signal)  # fitted on the set: its typical particle is junk
    assert auc(own, ~good) < 0.7  # about chance: junk is what is typical here
    training = fit_calibration(
        mask_features(
            rng.normal(0.5, 0.03, 400).clip(0.05),
            (rng.normal(0.2, 0.01, 400) * box * box).round(),
            box,
        )
    )
    assert training["particles"] == 400 and len(training["cov"]) == 2
    referenced = calibrated_scores(ets, signal, box=box, reference=training)
    assert auc(referenced, ~good) > 0.95  # junk scores low: found
    with pytest.raises(ValueError, match="needs the particles' box"):
        calibrated_scores(ets, signal, reference=training)
    with pytest.raises(ValueError, match="needs"):
        fit_calibration(np.zeros((2, 2)))


# ------------------------------------------- inference as training saw it, out of distribution


class _FixedModel:
    """A stand-in network whose softmax is given: ``predict_on_batch`` returns ``probs`` for
    every image (``input_shape`` as a Keras model's)."""

    def __init__(self, probs: np.ndarray) -> None:
        self.probs = probs.astype(np.float32)
        self.input_shape = (None, probs.shape[0], probs.shape[1], 1)

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        return np.repeat(self.probs[None], len(x), axis=0)


def test_edge_from_signal_is_the_label_rules_5_px_band() -> None:
    from particleseg_model.corpus.labels import labels_from_projection
    from particleseg_model.model.predict import predict_labels

    size = 48
    yy, xx = np.mgrid[:size, :size]
    distance = np.hypot(yy - 23.5, xx - 24.0)
    disc = distance <= 9
    # signal 0.6 inside the disc; outside, edge wins the argmax in a thin 2 px ring only
    probs = np.zeros((size, size, 3))
    probs[..., 0] = np.where(disc, 0.2, 0.7)
    probs[..., 2] = np.where(disc, 0.2, 0.3)
    ring = ~disc & (distance <= 11)
    probs[ring, 0], probs[ring, 2] = 0.3, 0.7
    probs[..., 1] = 1 - probs[..., 0] - probs[..., 2]
    model = _FixedModel(probs)
    image = np.zeros((2, size, size), np.float32)

    argmax = predict_labels(model, image)
    assert np.array_equal(argmax[0] == 2, ring)  # default: the model's own edge, unchanged
    derived = predict_labels(model, image, edge_from_signal=True)
    expected = labels_from_projection(disc.astype(np.uint8), threshold=0.5, edge_px=11)
    assert np.array_equal(derived[0], expected) and np.array_equal(derived[1], expected)
    assert np.array_equal(derived[0] == 1, disc)
    # the band: every pixel within Chebyshev distance 5 of the signal, outside it
    inside = np.argwhere(disc)
    chebyshev = np.abs(np.stack([yy, xx], -1)[:, :, None, :] - inside[None, None]).max(-1).min(-1)
    assert np.array_equal(derived[0] == 2, (chebyshev >= 1) & (chebyshev <= 5))
    # at a box other than the model's the signal comes back at the box, the band is still 5 px
    big = predict_labels(model, np.zeros((1, 96, 96), np.float32), edge_from_signal=True)[0]
    assert np.array_equal(big, labels_from_projection((big == 1).astype(np.uint8), 0.5, 11))


def test_normalise_for_model_is_the_corpus_normalisation_in_any_units() -> None:
    from particleseg_model.model.predict import finite_images, normalise_for_model, stack_scale
    from particleseg_model.simulation.simulate import normalise_images

    rng = np.random.default_rng(2)
    ramp = np.linspace(-2, 2, BOX, dtype=np.float32)
    images = rng.normal(size=(6, BOX, BOX)).astype(np.float32) + ramp[None, None, :]
    # the corpus: RELION's background-disc normalisation, then the store's whole-box one
    relion, _, _ = normalise_images(images)
    corpus = (relion - relion.mean(axis=(1, 2), keepdims=True)) / relion.std(
        axis=(1, 2), keepdims=True
    )
    ours = normalise_for_model(images)
    np.testing.assert_allclose(ours, corpus, atol=1e-5)
    odd_units = (images * 0.0015 + 12).astype(np.float32)
    np.testing.assert_allclose(normalise_for_model(odd_units), ours, atol=2e-3)
    np.testing.assert_allclose(normalise_for_model(ours), ours, atol=1e-5)
    # one scale for the stack: the stack's unit goes, a box without contrast stays without
    scale = stack_scale(odd_units)
    assert scale is not None and abs(scale / 0.0015 / stack_scale(images) - 1) < 1e-3
    np.testing.assert_allclose(
        normalise_for_model(odd_units, scale=scale),
        normalise_for_model(images, scale=stack_scale(images)),
        atol=2e-3,
    )
    flat = np.concatenate([ours, 0.05 * ours[:1]])
    kept = normalise_for_model(flat, scale=stack_scale(flat))
    assert 0.04 < kept[-1].std() < 0.06 and 0.9 < kept[0].std() < 1.1
    assert stack_scale(np.full((2, BOX, BOX), np.nan)) is None
    images[3, 5, 7] = np.nan
    assert finite_images(images).tolist() == [True, True, True, False, True, True]


def test_a_stack_in_arbitrary_units_scores_as_the_normalised_one(
    models: Path, tmp_path: Path
) -> None:
    images, _ = disc_particles(24, seed=5)
    normalised = write_project(tmp_path / "normalised", images)
    odd = write_project(tmp_path / "odd", (images * 0.0015 + 12).astype(np.float32))
    _, expected = score_particles(normalised, models_root=models, progress=False)
    lines: list[str] = []
    _, scores = score_particles(odd, models_root=models, progress=False, log=lines.append)
    assert any(line.startswith("particle images are in other units") for line in lines)
    assert expected["signal_px"].min() > 0  # the model finds the discs
    # float32 rounding of 12 + 0.0015 x moves a pixel at most, never a particle's score
    np.testing.assert_allclose(
        scores["signal_px"].to_numpy(float), expected["signal_px"].to_numpy(float), atol=1
    )
    np.testing.assert_allclose(scores["ets"], expected["ets"], rtol=0.05)


def test_nan_pixels_make_a_particle_unreadable_and_counted(models: Path, tmp_path: Path) -> None:
    images, _ = disc_particles(20, seed=6)
    images[3, 10, 10] = np.nan
    images[11, :2] = np.inf
    star = write_project(tmp_path / "project", images)
    lines: list[str] = []
    _, scores = score_particles(star, models_root=models, batch=8, progress=False, log=lines.append)
    assert np.flatnonzero(~scores["readable"].to_numpy()).tolist() == [3, 11]
    assert scores["ets"].isna().sum() == 2 and scores["signal_px"].isna().sum() == 2
    assert scores["error"].iloc[3].endswith("1 non-finite pixels (NaN or inf)")
    assert "64 non-finite pixels" in scores["error"].iloc[11]
    assert any("2 of 20 particles cannot be read" in line for line in lines)
    result = clean_star(star, tmp_path / "clean.star", models_root=models, drop=0.0, progress=False)
    assert (result.kept, result.skipped) == (18, 2)
    with pytest.raises(MrcError, match=r"particle row 4 of 20 .*non-finite pixels"):
        score_particles(star, models_root=models, on_bad="stop", progress=False)


@pytest.fixture(scope="module")
def blind_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry holding a model that predicts background everywhere (a 1x1 convolution with
    zero kernel and the background's bias far above the others)."""
    import keras

    inputs = keras.Input((BOX, BOX, 1))
    outputs = keras.layers.Conv2D(
        3,
        1,
        activation="softmax",
        kernel_initializer="zeros",
        bias_initializer=keras.initializers.Constant([5.0, 0.0, 0.0]),
    )(inputs)
    root = tmp_path_factory.mktemp("blind") / "models"
    staged = staging_dir(root)
    keras.Model(inputs, outputs).save(staged / "model.keras")
    register_model(root, staged, {"input_size": BOX, "arch": "custom", "partitions": {}})
    return root


def test_no_signal_anywhere_is_out_of_distribution_and_keeps_every_particle(
    blind_models: Path, tmp_path: Path, capsys
) -> None:
    from particleseg_model.cli import main

    images, _ = disc_particles(30, seed=8)
    images[7, 0, 0] = np.nan
    star = write_project(tmp_path / "project", images)
    lines: list[str] = []
    result = clean_star(
        star,
        tmp_path / "clean.star",
        models_root=blind_models,
        report_dir=tmp_path / "report",
        progress=False,
        log=lines.append,
    )
    expected = (
        "model v0001 found no particle signal in 29 of 29 particles (100.0%): these images are "
        "unlike its training data (out of distribution); the ranking is not meaningful: every "
        "readable particle is kept (none dropped by centred)"
    )
    assert lines.count(expected) == 1
    assert (result.kept, result.dropped, result.skipped) == (29, 0, 1)
    assert result.out_of_distribution and result.no_signal_share == 1.0
    assert np.isnan(result.cut)
    assert len(read_star(tmp_path / "clean.star").particles) == 29
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["out_of_distribution"] is True and report["no_signal_share"] == 1.0
    assert report["no_signal"] == 29 and report["kept"] == 29
    assert result.summary()["out_of_distribution"] is True

    # the CLI: the line once on stderr, the summary line says it
    code = main(
        [
            "clean",
            str(star),
            "--models-root",
            str(blind_models),
            "--out",
            str(tmp_path / "cli.star"),
            "--no-progress",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0
    assert captured.err.count("found no particle signal in 29 of 29 particles (100.0%)") == 1
    assert "out of distribution: no signal in 100.0% of the readable particles, none dropped" in (
        captured.out
    )

    # score_particles says it once too; segment says it and records it
    lines.clear()
    score_particles(star, models_root=blind_models, progress=False, log=lines.append)
    assert sum("out of distribution" in line for line in lines) == 1
    from particleseg_model.cleaning.segment import read_labels, segment_star

    lines.clear()
    segmented = segment_star(
        star, tmp_path / "labels.zarr", models_root=blind_models, progress=False, log=lines.append
    )
    assert segmented.out_of_distribution and segmented.unreadable == 1
    assert sum("the masks are not meaningful" in line for line in lines) == 1
    assert any("1 of 30 particles have NaN or infinite pixels" in line for line in lines)
    labels, attrs = read_labels(tmp_path / "labels.zarr")
    assert attrs["out_of_distribution"] is True and attrs["no_signal_share"] == 1.0
    assert attrs["unreadable"] == 1 and not labels.any()


def test_a_model_that_finds_the_particles_is_not_out_of_distribution(
    models: Path, tmp_path: Path
) -> None:
    from particleseg_model.cleaning.clean import (
        NO_SIGNAL_WARN_SHARE,
        OOD_NO_SIGNAL_SHARE,
        is_mostly_without_signal,
        is_out_of_distribution,
    )

    assert (OOD_NO_SIGNAL_SHARE, NO_SIGNAL_WARN_SHARE) == (0.9, 0.5)
    # out of distribution only when signal is found in fewer than 1 in 10
    assert not is_out_of_distribution(90, 100) and is_out_of_distribution(91, 100)
    assert not is_out_of_distribution(0, 0) and not is_out_of_distribution(70, 100)
    # between the two: a warning, not a guard
    assert not is_mostly_without_signal(50, 100) and is_mostly_without_signal(51, 100)
    assert is_mostly_without_signal(90, 100) and not is_mostly_without_signal(91, 100)
    assert not is_mostly_without_signal(0, 0)
    images, _ = disc_particles(20, seed=9)
    star = write_project(tmp_path / "project", images)
    lines: list[str] = []
    result = clean_star(
        star, tmp_path / "clean.star", models_root=models, progress=False, log=lines.append
    )
    assert not result.out_of_distribution and result.dropped == 6
    assert "out_of_distribution" not in result.summary()
    assert not any("out of distribution" in line for line in lines)


@pytest.fixture(scope="module")
def smoothing_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry holding a fixed model: signal where the 5x5 mean of the normalised image is
    above 1 (a bright disc; unit noise averages to a spread of 0.2, so never), the edge derived
    from the signal (``edge_from_signal``)."""
    import keras

    inputs = keras.Input((BOX, BOX, 1))
    layer = keras.layers.Conv2D(3, 5, padding="same", activation="softmax")
    network = keras.Model(inputs, layer(inputs))
    kernel = np.zeros((5, 5, 1, 3), np.float32)
    kernel[..., 0, 1] = 40.0 / 25  # signal: 40 x (5x5 mean - 1) against background's 0
    layer.set_weights([kernel, np.array([0.0, -40.0, -40.0], np.float32)])
    root = tmp_path_factory.mktemp("smoothing") / "models"
    staged = staging_dir(root)
    network.save(staged / "model.keras")
    register_model(
        root,
        staged,
        {"input_size": BOX, "arch": "custom", "partitions": {}, "edge_from_signal": True},
    )
    return root


def test_a_set_mostly_without_signal_is_cleaned_with_one_line(
    smoothing_models: Path, tmp_path: Path, capsys
) -> None:
    """The paper's case: most particles are junk without signal (here 40 boxes of noise beside
    20 particles, 67 % without signal): one line says so, and the cleaning still drops the
    lowest 30 %: boxes of noise, which have no signal."""
    from particleseg_model.cli import main

    rng = np.random.default_rng(12)
    good, _ = disc_particles(20, seed=12)
    noise = rng.normal(0, 1, (40, BOX, BOX)).astype(np.float32)
    order = rng.permutation(60)
    images = np.concatenate([good, noise])[order]
    is_noise = order >= 20
    star = write_project(tmp_path / "project", images)
    lines: list[str] = []
    result = clean_star(
        star,
        tmp_path / "clean.star",
        models_root=smoothing_models,
        report_dir=tmp_path / "report",
        progress=False,
        log=lines.append,
    )
    scores = pd.read_parquet(default_scores_path(tmp_path / "clean.star"))
    assert ((scores["signal_px"] == 0).to_numpy() == is_noise).all()
    assert result.no_signal == 40 and not result.out_of_distribution
    assert (result.kept, result.dropped) == (42, 18)
    assert is_noise[~scores["keep"].to_numpy()].all()  # every dropped particle is noise
    expected = (
        "model v0001 found no particle signal in 40 of 60 particles (66.7%): most of the set is "
        "junk to it, or the images are partly unlike its training data (check the gallery); the "
        "cleaning goes on (18 dropped by centred; every particle is kept only when signal is found "
        "in fewer than 10%)"
    )
    assert lines.count(expected) == 1
    assert not any("out of distribution" in line for line in lines)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["out_of_distribution"] is False and report["no_signal_share"] == 0.6667
    assert (report["no_signal"], report["kept"], report["dropped"]) == (40, 42, 18)
    assert "out_of_distribution" not in result.summary()

    # the CLI: the line once on stderr, the summary line without the out-of-distribution note
    code = main(
        ["clean", str(star), "--models-root", str(smoothing_models), "--out",
         str(tmp_path / "cli.star"), "--no-progress"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0
    assert captured.err.count("found no particle signal in 40 of 60 particles (66.7%)") == 1
    assert "kept 42/60 particles" in captured.out and "out of distribution" not in captured.out

    # 55 of 60 without signal (91.7%: signal in fewer than 1 in 10): out of distribution,
    # every particle kept
    few = np.concatenate([good[:5], rng.normal(0, 1, (55, BOX, BOX)).astype(np.float32)])
    star = write_project(tmp_path / "few", few)
    lines.clear()
    result = clean_star(
        star, tmp_path / "few.star", models_root=smoothing_models, progress=False,
        log=lines.append,
    )  # fmt: skip
    assert result.out_of_distribution and (result.kept, result.dropped) == (60, 0)
    assert sum("(91.7%): these images are unlike its training data" in x for x in lines) == 1


def test_a_batch_with_no_readable_image_is_skipped_whole(models: Path, tmp_path: Path) -> None:
    images, _ = disc_particles(12, seed=10)
    images[:4] = np.nan  # the whole first batch
    names = [f"{i}@Particles/stack.mrcs" for i in range(1, 13)]
    names[4:8] = ["1@Particles/gone.mrcs"] * 4  # the whole second batch, no such stack
    star = write_project(tmp_path / "project", images, names=names)
    _, scores = score_particles(star, models_root=models, batch=4, progress=False)
    assert np.flatnonzero(~scores["readable"].to_numpy()).tolist() == list(range(8))
    assert scores["signal_px"].notna().sum() == 4
