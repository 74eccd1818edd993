"""Nothing a command reads is ever overwritten: the input STAR file, every stack it names (where
the run finds them: beside the STAR, under --particles-dir, through a link) and the model's
files, whatever --overwrite says; refused before any work, the input byte for byte unchanged."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from edge_inputs import project, threshold_model

from particleseg_model.cleaning.inputs import check_outputs, read_paths
from particleseg_model.cli import EXIT_BAD_INPUT, main
from particleseg_model.em.star import read_star


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return threshold_model(tmp_path_factory.mktemp("protected") / "models")


@pytest.fixture(autouse=True)
def _quiet(monkeypatch) -> None:
    monkeypatch.setenv("PARTICLESEG_PROGRESS", "0")


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def refused(capsys, argv: list[str], *parts: str) -> None:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert code == EXIT_BAD_INPUT and len(lines) == 1, err
    assert "never overwritten, even with --overwrite" in lines[0]
    for part in parts:
        assert part in lines[0], (part, lines[0])
    assert "calibrated score" not in err  # refused before the run


def test_clean_never_writes_over_a_stack_it_reads(models, tmp_path, capsys) -> None:
    star = project(tmp_path / "p", n=8, boxes=(32, 32))
    stack = tmp_path / "p" / "Particles" / "stack_2.mrcs"
    before = digest(tmp_path / "p")
    base = ["clean", str(star), "--models-root", str(models)]
    for extra in ([], ["--overwrite"]):
        refused(
            capsys,
            [*base, "--out", str(stack), *extra],
            f"{stack}: --out is a particle stack of the input",
        )
        refused(
            capsys,
            [*base, "--out", str(tmp_path / "c.star"), "--scores", str(stack), *extra],
            "--scores is a particle stack of the input",
        )
    # the same stack through another spelling of its path, and through a link to it
    odd = tmp_path / "p" / "Particles" / ".." / "Particles" / "stack_1.mrcs"
    refused(capsys, [*base, "--out", str(odd), "--overwrite"], "a particle stack of the input")
    link = tmp_path / "link.mrcs"
    link.symlink_to(stack)
    refused(capsys, [*base, "--out", str(link), "--overwrite"], "a particle stack of the input")
    assert digest(tmp_path / "p") == before
    assert not (tmp_path / "c.star").exists()


def test_stacks_under_particles_dir_and_the_model_files_are_protected(
    models, tmp_path, capsys
) -> None:
    import shutil

    star = project(tmp_path / "p", n=8)
    # the STAR file elsewhere; its stacks found under --particles-dir
    moved = tmp_path / "elsewhere" / "particles.star"
    moved.parent.mkdir()
    shutil.move(star, moved)
    stack = tmp_path / "p" / "Particles" / "stack_1.mrcs"
    base = ["clean", str(moved), "--particles-dir", str(tmp_path / "p")]
    refused(
        capsys,
        [*base, "--models-root", str(models), "--out", str(stack), "--overwrite"],
        "a particle stack of the input",
    )
    model = tmp_path / "model"
    shutil.copytree(models / "v0001", model)
    before = digest(model)
    for name in ("model.keras", "manifest.json"):
        refused(
            capsys,
            [*base, "--model", str(model), "--out", str(model / name), "--overwrite"],
            f"the model's {name}",
        )
    refused(
        capsys,
        [*base, "--model", str(model), "--out", str(moved), "--overwrite"],
        "is the input STAR file",
    )
    assert digest(model) == before
    # and the same run with a free --out works: the stacks were found there
    code = main([*base, "--model", str(model), "--out", str(tmp_path / "c.star")])
    assert code == 0 and len(read_star(tmp_path / "c.star").particles) == 8 - 2


def test_segment_refuses_an_out_that_exists_or_is_read(models, tmp_path, capsys) -> None:
    star = project(tmp_path / "p", n=8)
    stack = tmp_path / "p" / "Particles" / "stack_1.mrcs"
    before = digest(tmp_path / "p")
    code = main(["segment", str(star), "--out", str(stack), "--models-root", str(models)])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and f"{stack} exists: choose another --out" in err
    assert digest(tmp_path / "p") == before


def test_check_outputs_is_the_one_rule(tmp_path) -> None:
    """The library rule both commands use: inputs never, outputs distinct, existing ones only
    with overwrite, their folders must exist."""
    star = project(tmp_path / "p", n=4)
    particles = read_star(star).particles
    reads = read_paths(star, particles, star.parent, tmp_path / "model")
    assert set(reads) == {
        star,
        star.parent / "Particles" / "stack_1.mrcs",
        tmp_path / "model" / "model.keras",
        tmp_path / "model" / "manifest.json",
    }
    with pytest.raises(ValueError, match="the model's model.keras"):
        check_outputs({"--out": tmp_path / "model" / "model.keras"}, reads, overwrite=True)
    out = tmp_path / "c.star"
    with pytest.raises(ValueError, match="--out and --scores need different names"):
        check_outputs({"--out": out, "--scores": tmp_path / "." / "c.star"}, reads)
    out.write_text("mine")
    with pytest.raises(FileExistsError, match="c.star exists: choose another --out"):
        check_outputs({"--out": out}, reads)
    check_outputs({"--out": out}, reads, overwrite=True)
    with pytest.raises(FileNotFoundError, match="no such folder for --out"):
        check_outputs({"--out": tmp_path / "nowhere" / "c.star"}, reads)
    assert out.read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["c.star", "p"]  # the folder probe left nothing
