"""STAR files: every real file in ../shared/data read, normalised, written back and compared."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile

from particleseg_model.em import star as star_module
from particleseg_model.em.star import (
    CANONICAL_COLUMNS,
    ParticleStar,
    StarError,
    has_poses,
    read_star,
    split_image_name,
    write_star,
)

# Each real file: (folder, RELION flavour, particle block, particles, optics rows or None,
# pixel size in A (None: the file gives none), box in px (None: not given), poses?).
# Pixel sizes of 3.0 files are rlnDetectorPixelSize (um) * 1e4 / rlnMagnification.
REAL = {
    "aspire_rln_proj_65.star": ("particles", "3.1", "particles", 5, None, None, None, True),
    "aspire_rln_proj_65_shifted.star": ("particles", "3.1", "particles", 4, 1, 1.0, 65, True),
    "aspire_sample_particles_relion30.star": (
        "particles",
        "3.0",
        "model_class_1",
        17,
        None,
        5.0e4 / 37369.207031,
        None,
        True,
    ),
    "aspire_sample_particles_relion31.star": (
        "particles",
        "3.1",
        "particles",
        17,
        2,
        1.4,
        None,
        True,
    ),
    "cryodrgn_FinalRefinement-OriginalParticles-PfCRT.star": (
        "star",
        "3.0",
        "images",
        5,
        None,
        1.035,
        None,
        True,
    ),
    "cryodrgn_empiar_10076_7.star": ("star", "3.0", "", 7, None, 5.0e4 / 38168, None, False),
    "cryodrgn_relion31.6opticsgroups.star": ("star", "3.1", "particles", 139, 6, None, 196, True),
    "cryodrgn_relion31.star": ("star", "3.1", "particles", 5, 1, 2.806, 256, True),
    "cryodrgn_relion31.v2.star": ("star", "3.1", "particles", 5, 1, 2.806, 256, True),
    "cryodrgn_relion5.star": ("star", "5.0", "particles", 17, 1, 0.89, 448, True),
}


def _real(shared_data: Path, name: str) -> Path:
    return shared_data / REAL[name][0] / name


def _canonical_equal(left: pd.DataFrame, right: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(
        left.reset_index(drop=True), right.reset_index(drop=True), check_exact=True
    )


# ------------------------------------------------------------------------------ real files


def test_every_real_star_file_is_checked(shared_data: Path) -> None:
    found = {
        p.name
        for folder in ("star", "particles")
        for p in (shared_data / folder).iterdir()
        if p.name.endswith(".star")
    }
    assert found == set(REAL), "a STAR file was added or removed: describe it in REAL"


@pytest.mark.parametrize("name", sorted(REAL))
def test_read_real_file(shared_data: Path, name: str) -> None:
    _, version, block, n, n_optics, pixel, box, poses = REAL[name]
    star = read_star(_real(shared_data, name))
    table = star.particles
    assert star.version == version
    assert star.particles_block == block
    assert star.source == _real(shared_data, name)
    assert tuple(table.columns) == CANONICAL_COLUMNS
    assert len(table) == n
    assert (star.optics is None) if n_optics is None else len(star.optics) == n_optics
    assert has_poses(table) is poses

    # image names split into a 1-based index and the stack, exactly as written
    raw = star.blocks[block]
    assert table["image_name"].tolist() == raw["rlnImageName"].tolist()
    for name_, index, stack in zip(
        table["image_name"], table["image_index"], table["stack_path"], strict=True
    ):
        assert split_image_name(name_) == (index, stack)
    assert (table["image_index"] >= 1).all()

    if pixel is None and n_optics is None:
        assert table["pixel_size_a"].isna().all()
    elif pixel is not None:
        np.testing.assert_allclose(table["pixel_size_a"], pixel, rtol=1e-12)
    if box is None:
        assert table["image_size_px"].isna().all()
    else:
        assert (table["image_size_px"] == box).all()

    # optics groups are positive integers; every group of the particles has an optics row
    assert table["optics_group"].dtype == np.int64 and (table["optics_group"] >= 1).all()
    if star.optics is not None:
        assert set(table["optics_group"]) <= set(star.optics["rlnOpticsGroup"])


@pytest.mark.parametrize("name", sorted(REAL))
def test_origins_are_angstrom(shared_data: Path, name: str) -> None:
    star = read_star(_real(shared_data, name))
    raw, table = star.blocks[star.particles_block], star.particles
    for axis, col in (("X", "origin_x_a"), ("Y", "origin_y_a")):
        if f"rlnOrigin{axis}Angst" in raw:
            expected = raw[f"rlnOrigin{axis}Angst"].to_numpy(dtype=float)
        elif f"rlnOrigin{axis}" in raw:  # pixels (3.0, and one 3.1 file of ASPIRE's)
            expected = raw[f"rlnOrigin{axis}"].to_numpy(dtype=float) * REAL[name][5]
        else:
            expected = np.full(len(raw), np.nan)
        np.testing.assert_allclose(table[col].to_numpy(), expected, rtol=1e-12, atol=0)


def test_pixel_origins_values(shared_data: Path) -> None:
    pfcrt = read_star(_real(shared_data, "cryodrgn_FinalRefinement-OriginalParticles-PfCRT.star"))
    # first row: rlnOriginX -0.14063 px, rlnOriginY -0.04688 px at 1.035 A/px
    assert pfcrt.particles.loc[0, "origin_x_a"] == pytest.approx(-0.14063 * 1.035, rel=1e-12)
    assert pfcrt.particles.loc[0, "origin_y_a"] == pytest.approx(-0.04688 * 1.035, rel=1e-12)
    shifted = read_star(_real(shared_data, "aspire_rln_proj_65_shifted.star"))
    assert shifted.particles["origin_x_a"].tolist()[:3] == [6.0, 10.0, -8.0]
    assert shifted.particles["origin_y_a"].tolist()[:3] == [10.0, -5.0, 11.0]


def test_optics_groups_join_by_number_not_order(shared_data: Path) -> None:
    """The 6-group file lists groups 1..6 named opticsGroup5, 3, 2, 1, 4, 6: join by number."""
    star = read_star(_real(shared_data, "cryodrgn_relion31.6opticsgroups.star"))
    table = star.particles
    optics = star.optics.set_index("rlnOpticsGroup")
    assert optics.loc[4, "rlnOpticsGroupName"] == "opticsGroup1"
    for group, rows in table.groupby("optics_group"):
        assert (rows["pixel_size_a"] == optics.loc[group, "rlnImagePixelSize"]).all()
        assert (
            rows["spherical_aberration_mm"] == optics.loc[group, "rlnSphericalAberration"]
        ).all()
    assert set(table.loc[table["optics_group"] == 4, "spherical_aberration_mm"]) == {2.6}
    assert set(table.loc[table["optics_group"] == 2, "pixel_size_a"]) == {1.24}
    assert table.loc[0, "optics_group"] == 6 and table.loc[0, "voltage_kv"] == 200.0
    assert table.loc[0, "image_index"] == 3
    assert table.loc[0, "stack_path"] == "Polish/job520/Micrographs/0003_shiny.mrcs"
    assert table["micrograph_name"].iloc[0] == "MotionCorr/job002/Micrographs/0003.mrc"


def test_optics_block_before_or_after_particles(shared_data: Path) -> None:
    before = read_star(_real(shared_data, "cryodrgn_relion31.star"))
    after = read_star(_real(shared_data, "cryodrgn_relion31.v2.star"))
    assert list(before.blocks) == ["optics", "particles"]
    assert list(after.blocks) == ["particles", "optics"]
    _canonical_equal(before.particles, after.particles)
    pd.testing.assert_frame_equal(before.optics, after.optics)
    row = before.particles.iloc[0]
    assert (row["rot_deg"], row["tilt_deg"], row["psi_deg"]) == (-102.30296, 82.318041, 124.706463)
    assert (row["origin_x_a"], row["origin_y_a"]) == (0.019324, -0.64686)
    assert (row["voltage_kv"], row["spherical_aberration_mm"], row["amplitude_contrast"]) == (
        300.0,
        0.01,
        0.1,
    )


def test_relion5_file(shared_data: Path) -> None:
    star = read_star(_real(shared_data, "cryodrgn_relion5.star"))
    table = star.particles
    assert set(table["stack_path"]) == {"toy_images_a.mrcs", "toy_images_b.mrcs"}
    assert table["image_index"].tolist()[:11] == list(range(1, 12))
    assert table.loc[0, "origin_x_a"] == -3.12578 and table.loc[1, "origin_y_a"] == 2.626956
    assert (table["voltage_kv"] == 100.0).all() and (table["pixel_size_a"] == 0.89).all()


def test_text_columns_stay_text(shared_data: Path) -> None:
    """Micrograph names "1", "2", ... and zero-padded image names are not numbers."""
    star = read_star(_real(shared_data, "cryodrgn_empiar_10076_7.star"))
    assert star.particles["micrograph_name"].tolist() == [str(i) for i in range(1, 8)]
    assert star.particles["image_name"].iloc[0] == "1@empiar_10076_7.mrc"
    pfcrt = read_star(_real(shared_data, "cryodrgn_FinalRefinement-OriginalParticles-PfCRT.star"))
    assert pfcrt.blocks["images"]["rlnImageOriginalName"].iloc[0] == (
        "000001@J407/imported/subtracted.mrcs"
    )
    # a missing text column has the same dtype as a present one
    no_micrographs = read_star(_real(shared_data, "aspire_rln_proj_65.star")).particles
    assert no_micrographs["micrograph_name"].isna().all()
    assert no_micrographs["micrograph_name"].dtype == star.particles["micrograph_name"].dtype


def test_relion30_and_31_give_the_same_particles(shared_data: Path) -> None:
    """ASPIRE's sample particles in both formats: the same canonical table, with two flaws of
    the 3.1 file: its row 15 repeats the pose and coordinates of row 14, and its Angstrom origins
    are the 3.0 file's pixel numbers copied unchanged while its pixel size (1.4 A) differs from
    the 3.0 file's (5 um / 37369.2 = 1.338 A)."""
    old = read_star(_real(shared_data, "aspire_sample_particles_relion30.star"))
    new = read_star(_real(shared_data, "aspire_sample_particles_relion31.star"))
    a, b = old.particles, new.particles
    assert (old.version, new.version) == ("3.0", "3.1")
    same = [c for c in CANONICAL_COLUMNS if c not in ("origin_x_a", "origin_y_a", "pixel_size_a")]
    good = np.arange(len(a)) != 14  # row 15 (1-based) of the 3.1 file is a copy of row 14
    _canonical_equal(a.loc[good, same], b.loc[good, same])
    # the flaw itself, so that a corrected file shows up here
    for col in ("rot_deg", "tilt_deg", "psi_deg", "coordinate_x_px"):
        assert b.loc[14, col] == b.loc[13, col] != a.loc[14, col]
    # the groups RELION 3.1 made (by voltage: 300 kV rows 1-8, 200 kV rows 9-17) are those
    # read_star numbers for the 3.0 file
    assert a["optics_group"].tolist() == [1] * 8 + [2] * 9 == b["optics_group"].tolist()
    assert a["voltage_kv"].tolist() == [300.0] * 8 + [200.0] * 9
    # origins: the 3.0 file's pixels times its pixel size; the 3.1 file's numbers are equal
    pixel_30 = 5.0e4 / 37369.207031
    np.testing.assert_allclose(a["origin_x_a"][good], b["origin_x_a"][good] * pixel_30, rtol=1e-12)
    np.testing.assert_allclose(a["origin_y_a"][good], b["origin_y_a"][good] * pixel_30, rtol=1e-12)


# ------------------------------------------------------------------------------ writing


@pytest.mark.parametrize("name", sorted(REAL))
def test_round_trip_keeps_everything(shared_data: Path, tmp_path: Path, name: str) -> None:
    star = read_star(_real(shared_data, name))
    out = write_star(tmp_path / name, star)
    again = read_star(out)
    assert again.version == ("5.0" if star.version == "5.0" else "3.1")
    assert list(again.blocks) == ["optics", "particles"]
    _canonical_equal(star.particles, again.particles)  # every value, exactly

    original = star.blocks[star.particles_block]
    written = again.blocks["particles"]
    converted = {c for c in original if re.fullmatch(r"rlnOrigin[XY]", c)}
    expected_columns = [f"{c}Angst" if c in converted else c for c in original.columns]
    if "rlnOpticsGroup" not in original:
        expected_columns.append("rlnOpticsGroup")
    assert list(written.columns) == expected_columns
    kept = [c for c in original.columns if c not in converted]
    pd.testing.assert_frame_equal(
        original[kept].reset_index(drop=True), written[kept], check_exact=True
    )
    if star.optics is not None:
        pd.testing.assert_frame_equal(star.optics, again.optics, check_exact=True)
    # writing the read-back file again gives the same bytes
    second = write_star(tmp_path / f"again_{name}", again)
    assert second.read_bytes() == out.read_bytes()


def test_relion30_to_31_conversion(shared_data: Path, tmp_path: Path) -> None:
    name = "cryodrgn_FinalRefinement-OriginalParticles-PfCRT.star"
    star = read_star(_real(shared_data, name))
    out = write_star(tmp_path / "converted.star", star)
    text = out.read_text()
    assert text.count("# version 30001") == 2
    # read with starfile, not with our reader
    raw = starfile.read(out, always_dict=True)
    assert list(raw) == ["optics", "particles"]
    optics = raw["optics"]
    assert optics["rlnOpticsGroup"].tolist() == [1]
    assert optics["rlnImagePixelSize"].tolist() == [1.035]
    assert optics["rlnVoltage"].tolist() == [300.0]
    assert optics["rlnSphericalAberration"].tolist() == [0.001]
    assert optics["rlnImageDimensionality"].tolist() == [2]
    assert "rlnAmplitudeContrast" not in optics  # the 3.0 file gives none: not invented
    parts = raw["particles"]
    assert "rlnOriginX" not in parts and "rlnOriginY" not in parts
    columns = list(parts.columns)
    assert columns.index("rlnOriginXAngst") == 16  # where rlnOriginX was
    np.testing.assert_allclose(
        parts["rlnOriginXAngst"], star.blocks["images"]["rlnOriginX"] * 1.035, rtol=1e-15
    )
    assert parts["rlnOpticsGroup"].tolist() == [1] * 5
    assert parts["rlnDefocusU"].tolist() == star.blocks["images"]["rlnDefocusU"].tolist()


def test_relion30_conversion_makes_one_group_per_optics(shared_data: Path, tmp_path: Path) -> None:
    star = read_star(_real(shared_data, "aspire_sample_particles_relion30.star"))
    again = read_star(write_star(tmp_path / "converted.star", star))
    assert again.optics["rlnOpticsGroup"].tolist() == [1, 2]
    assert again.optics["rlnVoltage"].tolist() == [300.0, 200.0]
    assert again.optics["rlnImagePixelSize"].tolist() == [5.0e4 / 37369.207031] * 2
    assert again.blocks["particles"]["rlnOpticsGroup"].tolist() == [1] * 8 + [2] * 9


def test_write_selected_rows_with_new_poses(shared_data: Path, tmp_path: Path) -> None:
    star = read_star(_real(shared_data, "cryodrgn_relion31.6opticsgroups.star"))
    chosen = star.particles.iloc[[10, 3, 7]].copy()
    chosen["rot_deg"] = [1.5, 2.5, 3.5]
    chosen["origin_x_a"] = [0.25, -0.5, 1.0]
    again = read_star(write_star(tmp_path / "subset.star", star, chosen))
    assert again.particles["image_name"].tolist() == chosen["image_name"].tolist()
    assert again.particles["rot_deg"].tolist() == [1.5, 2.5, 3.5]
    assert again.particles["origin_x_a"].tolist() == [0.25, -0.5, 1.0]
    assert again.particles["tilt_deg"].tolist() == chosen["tilt_deg"].tolist()
    pd.testing.assert_frame_equal(again.optics, star.optics)  # all six groups kept


def test_write_refuses_rows_of_another_table(shared_data: Path, tmp_path: Path) -> None:
    star = read_star(_real(shared_data, "cryodrgn_relion31.star"))
    other = star.particles.copy()
    other.index = other.index + 100
    with pytest.raises(StarError, match=re.escape(str(star.source))):
        write_star(tmp_path / "x.star", star, other)
    assert list(tmp_path.iterdir()) == []


def test_write_is_atomic(shared_data: Path, tmp_path: Path, monkeypatch) -> None:
    star = read_star(_real(shared_data, "cryodrgn_relion31.star"))
    target = tmp_path / "particles.star"
    target.write_text("old contents\n")

    def broken_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(star_module.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_star(target, star)
    assert target.read_text() == "old contents\n"
    assert [p.name for p in tmp_path.iterdir()] == ["particles.star"]

    monkeypatch.undo()
    write_star(target, star)
    assert read_star(target).particles["image_name"].tolist() == (
        star.particles["image_name"].tolist()
    )
    assert [p.name for p in tmp_path.iterdir()] == ["particles.star"]


def test_write_into_missing_directory_leaves_nothing(shared_data: Path, tmp_path: Path) -> None:
    star = read_star(_real(shared_data, "cryodrgn_relion31.star"))
    with pytest.raises(FileNotFoundError):
        write_star(tmp_path / "missing" / "p.star", star)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.relion
@pytest.mark.parametrize(
    "name",
    [
        "aspire_sample_particles_relion30.star",
        "cryodrgn_relion31.6opticsgroups.star",
        "cryodrgn_relion5.star",
    ],
)
def test_relion_reads_what_we_write(
    shared_data: Path, relion_bin: Path, tmp_path: Path, name: str
) -> None:
    """RELION's own parser reads the written file to the same particles (it rewrites values
    with about 6 significant digits: -2.063664 comes back as -2.06366)."""
    star = read_star(_real(shared_data, name))
    if star.version == "3.0":
        star.particles["image_size_px"] = 200  # the box of aspire_sample.mrcs
    ours = write_star(tmp_path / "ours.star", star)
    subprocess.run(
        [
            str(relion_bin / "relion_star_handler"),
            "--i",
            str(ours),
            "--o",
            str(tmp_path / "relion.star"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    theirs = read_star(tmp_path / "relion.star")
    assert theirs.version == "3.1" and len(theirs.optics) == len(read_star(ours).optics)
    a, b = read_star(ours).particles, theirs.particles
    for col in CANONICAL_COLUMNS:
        if pd.api.types.is_numeric_dtype(a[col]):
            np.testing.assert_allclose(
                b[col].astype(float), a[col].astype(float), rtol=1e-5, atol=1e-5, err_msg=col
            )
        else:
            assert b[col].tolist() == a[col].tolist(), col


# ------------------------------------------------------------------------------ synthetic

_OPTICS = """
# version 30001

data_optics

loop_
_rlnOpticsGroup #1
_rlnImagePixelSize #2
_rlnImageSize #3
_rlnVoltage #4
1 2.0 64 300.0
"""

_PARTICLES_31 = """
# version 30001

data_particles

loop_
_rlnImageName #1
_rlnAngleRot #2
_rlnAngleTilt #3
_rlnAnglePsi #4
_rlnOriginXAngst #5
_rlnOriginYAngst #6
_rlnOpticsGroup #7
1@stack.mrcs 10.0 20.0 30.0 1.5 -2.0 1
2@stack.mrcs 11.0 21.0 31.0 0.0 4.0 1
"""

_PARTICLES_30 = """
data_

loop_
_rlnImageName #1
_rlnAngleRot #2
_rlnAngleTilt #3
_rlnAnglePsi #4
_rlnOriginX #5
_rlnOriginY #6
_rlnDetectorPixelSize #7
_rlnMagnification #8
_rlnVoltage #9
1@stack.mrcs 10.0 20.0 30.0 0.75 -1.0 5.0 25000 300
2@stack.mrcs 11.0 21.0 31.0 0.0 2.0 5.0 25000 300
"""


def _file(tmp_path: Path, text: str, name: str = "p.star") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_same_particles_in_30_and_31_syntax(tmp_path: Path) -> None:
    new = read_star(_file(tmp_path, _OPTICS + _PARTICLES_31, "new.star"))
    old = read_star(_file(tmp_path, _PARTICLES_30, "old.star"))
    assert (old.version, new.version) == ("3.0", "3.1")
    columns = [
        "image_name",
        "image_index",
        "stack_path",
        "rot_deg",
        "tilt_deg",
        "psi_deg",
        "origin_x_a",
        "origin_y_a",
        "pixel_size_a",
        "optics_group",
        "voltage_kv",
    ]
    _canonical_equal(old.particles[columns], new.particles[columns])
    assert old.particles["origin_x_a"].tolist() == [1.5, 0.0]  # 0.75 px at 2 A/px
    converted = read_star(write_star(tmp_path / "converted.star", old))
    _canonical_equal(converted.particles[columns], new.particles[columns])


@pytest.mark.parametrize(
    ("text", "version"),
    [
        (_OPTICS + _PARTICLES_31, "3.1"),
        (_PARTICLES_31, "3.1"),  # stamp and rlnOpticsGroup, no optics block
        (_PARTICLES_31.replace("# version 30001", ""), "3.1"),  # Angstrom origins say 3.1
        (_PARTICLES_30, "3.0"),
        ("# RELION; version 3.0.6\n" + _PARTICLES_30, "3.0"),
        ("# Created by the starfile Python package (version 0.5.13)\n" + _PARTICLES_30, "3.0"),
        (_OPTICS.replace("30001", "50001") + _PARTICLES_31.replace("30001", "50001"), "5.0"),
        ("# version 40001\n" + _PARTICLES_30, "3.1"),
    ],
)
def test_version_detection(tmp_path: Path, text: str, version: str) -> None:
    assert read_star(_file(tmp_path, text)).version == version


def _invalid_cases() -> list[tuple[str, str, str]]:
    no_names = _PARTICLES_31.replace("_rlnImageName #1", "_rlnMicrographName #1")
    return [
        ("empty", "", "empty file"),
        ("not STAR", "name,x,y\nfoo,1,2\n", "no data blocks"),
        ("unknown stamp", "# version 60001\n" + _PARTICLES_30, "unknown STAR version"),
        ("unknown stamp text", "# version 3.1\n" + _PARTICLES_30, "unknown STAR version"),
        ("no image names", _OPTICS + no_names, "no block has an rlnImageName"),
        (
            "malformed image name",
            _PARTICLES_31.replace("2@stack", "stack"),
            "row 2: malformed rlnImageName",
        ),
        ("index zero", _PARTICLES_31.replace("2@stack", "0@stack"), "malformed rlnImageName"),
        (
            "no optics row",
            _OPTICS + _PARTICLES_31.replace(" 4.0 1\n", " 4.0 2\n"),
            "rlnOpticsGroup 2 .* has no row in data_optics",
        ),
        (
            "pixel origins, no pixel size",
            _PARTICLES_30.replace(" 5.0 25000 300", " 5.0 0 300"),
            "no pixel size",
        ),
        (
            "text in a number column",
            _PARTICLES_31.replace("11.0 21.0", "eleven 21.0"),
            "rlnAngleRot, row 2: not a number",
        ),
        ("truncated last row", _PARTICLES_31.rstrip("\n")[:-6], "truncated file"),
        ("too many values", _PARTICLES_31.replace("4.0 1\n", "4.0 1 9 9\n"), "cannot parse"),
        (
            "two optics groups, no group column",
            _OPTICS
            + "2 1.0 64 200.0\n"
            + _PARTICLES_31.replace("_rlnOpticsGroup #7\n", "").replace(" 1\n", "\n"),
            "ambiguous layout",
        ),
        ("block without values", "data_particles\n", "no loop_ and no values"),
    ]


@pytest.mark.parametrize(
    ("case", "text", "message"), _invalid_cases(), ids=[c[0] for c in _invalid_cases()]
)
def test_bad_files_raise_star_error_naming_the_file(
    tmp_path: Path, case: str, text: str, message: str
) -> None:
    path = _file(tmp_path, text, "bad file.star")
    with pytest.raises(StarError, match=message) as info:
        read_star(path)
    assert str(path) in str(info.value)


def test_a_fixed_file_reads_after_a_failure(tmp_path: Path) -> None:
    """starfile caches lines (linecache); a failed parse must not leave stale lines behind."""
    path = _file(tmp_path, _PARTICLES_31.replace("4.0 1\n", "4.0 1 9 9\n"))
    with pytest.raises(StarError):
        read_star(path)
    path.write_text(_OPTICS + _PARTICLES_31)
    assert read_star(path).particles["rot_deg"].tolist() == [10.0, 11.0]


def test_binary_garbage_and_missing_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.star"
    garbage.write_bytes(bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)))
    with pytest.raises(StarError, match=re.escape(str(garbage))):
        read_star(garbage)
    with pytest.raises(StarError, match="not found"):
        read_star(tmp_path / "nothing.star")
    assert issubclass(StarError, ValueError)


def test_key_value_blocks_survive_a_write(tmp_path: Path) -> None:
    text = 'data_general\n\n_rlnTomoSubTomosAre2DStacks 1\n_rlnTitle "a title"\n\n' + (
        _OPTICS + _PARTICLES_31
    )
    star = read_star(_file(tmp_path, text))
    assert star.blocks["general"].to_dict("records") == [
        {"rlnTomoSubTomosAre2DStacks": 1, "rlnTitle": "a title"}
    ]
    out = write_star(tmp_path / "out.star", star)
    raw = starfile.read(out, always_dict=True)
    assert raw["general"] == {"rlnTomoSubTomosAre2DStacks": 1, "rlnTitle": "a title"}
    assert list(raw) == ["optics", "particles", "general"]


def test_nan_values_round_trip(tmp_path: Path) -> None:
    star = read_star(_file(tmp_path, _OPTICS + _PARTICLES_31))
    star.particles.loc[1, "psi_deg"] = np.nan
    again = read_star(write_star(tmp_path / "out.star", star))
    assert np.isnan(again.particles.loc[1, "psi_deg"])
    assert again.particles.loc[0, "psi_deg"] == 30.0
    assert not has_poses(again.particles)


def test_split_image_name() -> None:
    assert split_image_name("12@stack.mrcs") == (12, "stack.mrcs")
    assert split_image_name("000007@Extract/job1/a b.mrcs") == (7, "Extract/job1/a b.mrcs")
    for bad in ("stack.mrcs", "0@stack.mrcs", "x@stack.mrcs", "3@", "-1@s.mrcs"):
        with pytest.raises(ValueError):
            split_image_name(bad)


def test_has_poses() -> None:
    table = pd.DataFrame(
        {
            "rot_deg": [1.0],
            "tilt_deg": [2.0],
            "psi_deg": [3.0],
            "origin_x_a": [0.0],
            "origin_y_a": [0.0],
        }
    )
    assert has_poses(table)
    assert not has_poses(table.iloc[:0])
    assert not has_poses(table.drop(columns="psi_deg"))
    assert not has_poses(table.assign(origin_y_a=[np.nan]))


def test_particle_star_is_a_plain_dataclass(tmp_path: Path) -> None:
    star = read_star(_file(tmp_path, _OPTICS + _PARTICLES_31))
    assert isinstance(star, ParticleStar)
    assert star.particles_block == "particles" and star.source == tmp_path / "p.star"
    assert os.fspath(star.source).endswith("p.star")
