"""RELION 2D classification (real relion_refine) of a tiny simulated particle set: the
classified STAR in the input's version, the class table, the gallery, and bad input."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from particleseg_model.cleaning.compare import PAPER_RATIO, random_keep
from particleseg_model.em.mrc import read_map
from particleseg_model.em.star import read_star
from particleseg_model.relion.classify import (
    FAST_SUBSETS_MIN_ITERATIONS,
    ClassifyError,
    classify_2d,
    good_class_figures,
    minimum_particles,
)
from particleseg_model.relion.runner import RelionError

pytestmark = pytest.mark.relion
BIN = Path(sys.executable).parent
N, K = 120, 3


@pytest.fixture(scope="module", autouse=True)
def _relion() -> None:
    if shutil.which("relion_refine") is None:
        pytest.skip("relion_refine is not installed (apt-get install -y relion)")


@pytest.fixture(scope="module")
def entries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two simulated entries of N particles at 32 px (24.6% good, six junk kinds): RELION 3.1
    (30001) and RELION 3.0 (30002); their data folders."""
    from particleseg_model.simulation.demo_archive import write_demo_archive

    out = tmp_path_factory.mktemp("classify") / "archive"
    write_demo_archive(
        out,
        maps=["generated:globular", "generated:globular"],
        n_particles=N,
        box=32,
        junk_fraction=1 - 0.2457,
        micrograph_entries=0,
        relion30_entries=(30002,),
        seed=3,
        progress=False,
    )
    return {v: out / "archive" / key / "data" for v, key in (("3.1", "30001"), ("3.0", "30002"))}


@pytest.fixture(scope="module")
def classified(entries, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("run") / "classes"
    lines: list[str] = []
    result = classify_2d(
        entries["3.1"] / "particles.star",
        out,
        classes=K,
        iterations=2,
        threads=2,
        progress=False,
        log=lines.append,
    )
    return result, out, lines


def png_text(path: Path) -> dict[str, str]:
    from PIL import Image

    with Image.open(path) as image:
        return dict(image.text)  # pyright: ignore[reportAttributeAccessIssue]


def test_every_particle_gets_a_class_and_the_files_agree(classified, entries) -> None:
    result, out, lines = classified
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "particles_classified.star",
            "class_averages.mrcs",
            "classes.csv",
            "class_averages.png",
            "classify.json",
            "relion",
        ]
    )
    star = read_star(out / "particles_classified.star")
    source = read_star(entries["3.1"] / "particles.star")
    assert star.version == "3.1"
    block = star.blocks[star.particles_block]
    classes = block["rlnClassNumber"].to_numpy(dtype=int)
    assert len(classes) == N and set(classes) <= set(range(1, K + 1))
    np.testing.assert_array_equal(classes, result.assignments)
    # every other column and row as read, same order
    assert list(block["rlnImageName"]) == list(source.blocks["particles"]["rlnImageName"])
    np.testing.assert_allclose(
        block["rlnDefocusU"].to_numpy(float), source.blocks["particles"]["rlnDefocusU"]
    )
    table = pd.read_csv(out / "classes.csv")
    assert table["particles"].sum() == N
    assert list(table["particles"]) == sorted(table["particles"], reverse=True)
    assert sorted(table["class"]) == list(range(1, K + 1))
    for row in table.itertuples():
        assert row.particles == int((classes == row[1]).sum())
    # ground truth found beside the STAR: good counts per class add up to the truth
    truth = pd.read_csv(entries["3.1"] / "ground_truth.csv")
    assert table["good"].sum() == int(truth["is_good"].sum())
    averages, _ = read_map(out / "class_averages.mrcs")
    assert averages.reshape(-1, 32, 32).shape[0] == K
    assert png_text(out / "class_averages.png")["Tiles"] == str(K)
    assert any("iteration 2/2 done" in line for line in lines)
    summary = result.summary()
    assert summary["particles"] == N and summary["classes"] == K
    assert summary["good_particles"] == int(truth["is_good"].sum())
    assert summary["relion_peak_rss_mb"] > 1
    assert not list(out.parent.glob(".*run-*")), "the run folder is removed after success"


def test_a_relion30_input_stays_relion30(entries, tmp_path: Path) -> None:
    out = tmp_path / "c30"
    result = classify_2d(
        entries["3.0"] / "particles.star",
        out,
        classes=2,
        iterations=1,
        progress=False,
        settings={"highres_limit_a": 30, "psi_step_deg": 20},
    )
    # the settings reach RELION's command and the record
    limit = result.command.index("--strict_highres_exp")
    assert result.command[limit + 1] == "30" and "--fast_subsets" not in result.command
    assert result.command[result.command.index("--psi_step") + 1] == "20"
    assert (result.settings["fast_subsets"], result.settings["highres_limit_a"]) == (False, 30)
    text = (out / "particles_classified.star").read_text()
    assert "# version" not in text and "rlnClassNumber" in text
    star = read_star(out / "particles_classified.star")
    assert star.version == "3.0" and "data_optics" not in text
    assert len(star.particles) == N and result.classes["particles"].sum() == N


def test_too_few_particles_are_refused_before_relion_with_the_minimum(
    entries, tmp_path: Path
) -> None:
    star = entries["3.1"] / "particles.star"
    k = N // 20 + 1  # needs 20 per class
    with pytest.raises(ValueError, match=f"at least {minimum_particles(k)}"):
        classify_2d(star, tmp_path / "x", classes=k, iterations=1)
    assert list(tmp_path.iterdir()) == []  # no run folder: RELION never started
    proc = subprocess.run(
        [BIN / "particleseg", "classify", star, "--classes", str(k), "--out", tmp_path / "x"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0
    assert f"needs at least {minimum_particles(k)}" in proc.stderr


def test_fast_subsets_with_too_few_iterations_are_refused_before_relion(
    entries, tmp_path: Path
) -> None:
    star = entries["3.1"] / "particles.star"
    with pytest.raises(ValueError) as caught:
        classify_2d(star, tmp_path / "x", classes=2, iterations=5, settings={"fast_subsets": True})
    assert str(caught.value) == (
        f"fast subsets need at least {FAST_SUBSETS_MIN_ITERATIONS} iterations (RELION uses "
        "subsets in the first 15 and refuses fewer), got 5"
    )
    assert FAST_SUBSETS_MIN_ITERATIONS == 20
    assert list(tmp_path.iterdir()) == []  # no run folder: RELION never started


def test_a_cleaning_that_keeps_too_few_for_k_is_refused_before_relion(
    entries, tmp_path: Path
) -> None:
    from particleseg_model.cleaning.compare import classify_before_after

    star = entries["3.1"] / "particles.star"
    keep = np.zeros(N, bool)
    keep[:39] = True
    with pytest.raises(ValueError) as caught:
        classify_before_after(star, keep, tmp_path / "compare", classes=2, iterations=1)
    assert str(caught.value) == (
        f"{star}: the cleaning kept 39 particles, too few for 2 classes (at least 40)"
    )
    assert list(tmp_path.iterdir()) == []  # nothing staged, RELION never started


def test_a_relion_failure_keeps_its_run_folder_and_writes_nothing(entries, tmp_path: Path) -> None:
    # a copy of the entry whose stack is cut short: RELION fails reading the images
    data = tmp_path / "data"
    shutil.copytree(entries["3.1"], data)
    stack = next((data / "Particles").glob("*.mrcs"))
    stack.write_bytes(stack.read_bytes()[: 1024 + 32 * 32 * 4 * 10])
    out = tmp_path / "out"
    with pytest.raises(ClassifyError) as caught:
        classify_2d(data / "particles.star", out, classes=2, iterations=1, progress=False)
    message = str(caught.value)
    # one line: RELION's own error text (what it printed after ERROR), the kept run folder
    cause = caught.value.__cause__
    assert isinstance(cause, RelionError) and cause.returncode == 1
    assert cause.error_text == "zero sum of weights...."  # RELION 3.1's words for these images
    run_dir = caught.value.run_dir
    assert message == (
        f"2D classification of {data / 'particles.star'} failed: relion_refine failed (exit "
        f"status 1): zero sum of weights....; RELION's run folder is kept for inspection: "
        f"{run_dir} (command and output in relion_refine.log); {out} was not written"
    )
    assert run_dir is not None and run_dir.parent == tmp_path
    transcript = (run_dir / "relion_refine.log").read_text().splitlines()
    assert transcript[0].startswith("$ relion_refine --i ") and "--K 2" in transcript[0]
    assert "[err] ERROR!!! zero sum of weights...." in transcript
    assert (run_dir / "input.star").is_file()
    assert not out.exists() and not list(tmp_path.glob(".out.*.tmp"))  # nothing half-written
    proc = subprocess.run(
        [BIN / "particleseg", "classify", data / "particles.star", "-K", "2", "--out", out],
        capture_output=True,
        text=True,
    )
    errors = [x for x in proc.stderr.splitlines() if x.startswith("particleseg classify: error")]
    assert proc.returncode == 1 and len(errors) == 1
    assert (
        "relion_refine failed (exit status 1): zero sum of weights....; RELION's run folder"
        in (errors[0])
    )
    assert "Traceback" not in proc.stderr and not out.exists()


def test_good_class_figures_are_the_papers_counts() -> None:
    table = pd.DataFrame({"class": [1, 2, 3], "particles": [100, 40, 10], "good": [20, 30, 6]})
    figures = good_class_figures(table)
    assert figures["good_classes"] == [2, 3]  # 75% and 60% good; class 1 is 20%
    assert figures["particles_in_good_classes"] == 50
    assert figures["good_in_good_classes"] == 36
    assert figures["good_class_share"] == pytest.approx(50 / 150)
    assert figures["good_recovered"] == pytest.approx(36 / 56)
    assert pytest.approx(1.3857, abs=1e-4) == PAPER_RATIO
    keep = random_keep(100, 70, seed=0)
    assert keep.sum() == 70 and (keep == random_keep(100, 70, seed=0)).all()


@pytest.fixture(scope="module")
def untrained_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry holding an untrained 32 px U-Net: the cleaning's scores are arbitrary, the
    plumbing of the classifications is what is tested."""
    from particleseg_model.model.registry import register_model, staging_dir
    from particleseg_model.model.unet import build_unet

    root = tmp_path_factory.mktemp("untrained") / "models"
    staged = staging_dir(root)
    build_unet("custom", size=32, base_filters=4).save(staged / "model.keras")
    register_model(root, staged, {"input_size": 32, "arch": "custom", "partitions": {}})
    return root


def test_clean_job_classifies_before_after_and_shows_the_galleries(
    entries, untrained_models: Path, tmp_path: Path, dagster_home
) -> None:
    from dagster import DagsterInstance

    from particleseg_assets.definitions import defs
    from particleseg_assets.resources import StorageResource

    data = tmp_path / "data"
    data.mkdir()
    (data / "models").symlink_to(untrained_models, target_is_directory=True)
    star = entries["3.1"] / "particles.star"
    config = {
        "ops": {
            "cleaned_particles": {
                "config": {
                    "star": str(star),
                    "drop": 0.3,
                    "classify": 2,
                    "classify_iterations": 1,
                    "name": "sim",
                }
            }
        }
    }
    result = defs.resolve_job_def("clean_job").execute_in_process(
        run_config=config,
        instance=DagsterInstance.get(),
        resources={"storage": StorageResource(root=str(data))},
    )
    assert result.success
    event = result.asset_materializations_for_node("cleaned_particles")[0]
    md = {k: v.value for k, v in event.metadata.items()}
    assert md["class_averages"].startswith("![2D class averages before, after, random drop]")
    gallery = Path(md["class_averages_png"])
    assert gallery == data / "cleaned" / "sim" / "classify" / "galleries.png"
    assert png_text(gallery)["Tiles"] == "2,2,2"
    summary = pd.read_csv(gallery.parent / "summary.csv")
    assert summary["condition"].tolist() == ["before", "after", "random_drop"]
    kept = md["particles_after"]
    assert summary["particles"].tolist() == [N, kept, kept]
    assert "good_class_ratio_after" in md and "good_class_ratio_random_drop" in md
    for name in ("before", "after", "random_drop"):
        table = pd.read_csv(gallery.parent / name / "classes.csv")
        assert table["particles"].sum() == summary.set_index("condition").loc[name, "particles"]
        assert table["good"].sum() <= table["particles"].sum()
