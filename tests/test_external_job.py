"""particleseg clean as a RELION External job: the job folder, RELION_OUTPUT_NODES.star and the
exit markers, for RELION 3.1 (integer node types) and 4/5 (type labels), and bad calls."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import starfile
from helpers import BOX, TINY, write_partition, write_star_project

from particleseg_model.cleaning.external import (
    EXIT_FAILURE,
    EXIT_SUCCESS,
    OUTPUT_NODES,
    output_nodes_text,
    run_external,
)
from particleseg_model.em.star import read_star
from particleseg_model.model.registry import register_model, staging_dir

BIN = Path(sys.executable).parent
N = 40


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry holding one tiny model (32 px) trained on disc particles; trained once a
    session (test_external_job and test_cryosparc_writeback share it)."""
    from particleseg_model.model.train import TrainConfig, train_segmentation

    base = tmp_path_factory.getbasetemp() / "tiny_clean_model"
    root = base / "models"
    if (root / "v0001" / "model.keras").is_file():
        return root
    write_partition(base / "corpus", "40001", 320, seed=1)
    trained = train_segmentation(
        base / "corpus", ["40001"], TrainConfig(**TINY), base / "trained", log=lambda line: None
    )
    staged = staging_dir(root)
    (staged / "model.keras").write_bytes(trained.model_path.read_bytes())
    register_model(root, staged, {"input_size": BOX, "arch": "custom", "partitions": {}})
    return root


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A RELION project folder with ``particles.star`` and its stack (image names relative
    to the project, as RELION writes them)."""
    write_star_project(tmp_path / "project", N)
    return tmp_path / "project"


def test_a_job_writes_the_cleaned_star_its_node_and_success(models: Path, project: Path) -> None:
    lines: list[str] = []
    code = run_external(
        ["--o", "External/job005/", "--in_parts", "particles.star", "--models_root",
         str(models), "--drop", "0.25", "--j", "2", "--pipeline_control", "External/job005/"],
        out=lines.append,
        err=lambda line: None,
        cwd=project,
    )  # fmt: skip
    job = project / "External" / "job005"
    assert code == 0, lines
    assert (job / EXIT_SUCCESS).is_file() and not (job / EXIT_FAILURE).exists()
    cleaned = read_star(job / "particles_cleaned.star")
    assert len(cleaned.particles) == N - int(0.25 * N)
    assert cleaned.version == read_star(project / "particles.star").version
    # the stacks resolve from the project folder, as RELION reads them
    assert all((project / p).is_file() for p in cleaned.particles["stack_path"].unique())
    nodes = starfile.read(job / OUTPUT_NODES, always_dict=True)["output_nodes"]
    assert list(nodes.columns) == ["rlnPipeLineNodeName", "rlnPipeLineNodeType"]
    assert nodes["rlnPipeLineNodeName"].tolist() == ["External/job005/particles_cleaned.star"]
    assert nodes["rlnPipeLineNodeType"].tolist() == [3]  # RELION 3.1 NODE_PART_DATA
    assert (job / "report" / "report.json").is_file()
    assert "External/job005/particles_cleaned.star" in lines[-1]


def test_relion4_and_5_get_type_labels() -> None:
    for version in ("4", "5"):
        text = output_nodes_text(["External/job007/particles_cleaned.star"], version)
        assert "_rlnPipeLineNodeTypeLabel #2" in text and "_rlnPipeLineNodeType #2" not in text
        assert "External/job007/particles_cleaned.star ParticlesData.star.relion" in text
    text = output_nodes_text(["External/job007/particles_cleaned.star"], "3.1")
    assert "External/job007/particles_cleaned.star 3\n" in text


def test_without_in_parts_one_line_and_the_failure_marker(project: Path) -> None:
    errors: list[str] = []
    code = run_external(["--o", "External/job006/"], err=errors.append, cwd=project)
    job = project / "External" / "job006"
    assert code == 1 and len(errors) == 1 and "--in_parts" in errors[0]
    assert (job / EXIT_FAILURE).is_file() and not (job / EXIT_SUCCESS).exists()
    assert not (job / OUTPUT_NODES).exists()
    proc = subprocess.run(
        [BIN / "particleseg", "relion-external", "--o", "External/job008/"],
        cwd=project,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "particleseg relion-external: error: no --in_parts: give the job an input particles "
        "STAR file (External job, Input tab, 'Input particles'); External/job008/ marked failed"
    )
    assert (project / "External" / "job008" / EXIT_FAILURE).is_file()
    assert sorted(p.name for p in (project / "External" / "job008").iterdir()) == [EXIT_FAILURE]


def test_a_failed_cleaning_marks_failure_and_replaces_an_old_success(
    models: Path, project: Path
) -> None:
    job = project / "External" / "job009"
    job.mkdir(parents=True)
    (job / EXIT_SUCCESS).write_text("")  # from an earlier run of the same job
    errors: list[str] = []
    code = run_external(
        ["--o", "External/job009/", "--in_parts", "missing.star", "--models_root", str(models)],
        err=errors.append,
        cwd=project,
    )
    assert code == 1 and (job / EXIT_FAILURE).is_file() and not (job / EXIT_SUCCESS).exists()
    assert len(errors) == 1 and "missing.star" in errors[0] and "not found" in errors[0]
