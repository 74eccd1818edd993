"""cryoSPARC .cs particle files into the canonical particle table (em.cryosparc)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from particleseg_model.em.cryosparc import (
    CryosparcError,
    euler_to_pose,
    pose_to_euler,
    read_cs,
)
from particleseg_model.em.geometry import euler_matrices, random_euler
from particleseg_model.em.particles import complete_from_stacks
from particleseg_model.em.star import CANONICAL_COLUMNS, read_star


def test_pose_convention_is_pyems():
    """A pose about z by t radians is RELION's in-plane angle rot + psi = t (pyem's expmap
    returns the transpose of the Rodrigues matrix)."""
    rot, tilt, psi = pose_to_euler(np.array([[0.0, 0.0, np.radians(30.0)]]))
    assert tilt[0] == pytest.approx(0.0) and rot[0] + psi[0] == pytest.approx(30.0)
    # a quarter turn about y is RELION's tilt of 90 degrees (both name the same rotation)
    rot, tilt, psi = pose_to_euler(np.array([[0.0, np.pi / 2, 0.0]]))
    np.testing.assert_allclose(
        euler_matrices(rot, tilt, psi)[0], euler_matrices(0, 90, 0)[0], atol=1e-12
    )


def test_pose_round_trip_through_relion_matrices():
    rng = np.random.default_rng(4)
    rot, tilt, psi = random_euler(rng, 500)
    pose = euler_to_pose(rot, tilt, psi)
    back = pose_to_euler(pose)
    np.testing.assert_allclose(euler_matrices(*back), euler_matrices(rot, tilt, psi), atol=1e-9)
    assert np.all((back[1] >= 0) & (back[1] <= 180))
    # the degenerate tilts (0, 180) still give the same matrix
    edge = pose_to_euler(
        euler_to_pose(np.array([10.0, 10.0]), np.array([0.0, 180.0]), np.array([20.0, 20.0]))
    )
    np.testing.assert_allclose(
        euler_matrices(*edge), euler_matrices([10, 10], [0, 180], [20, 20]), atol=1e-9
    )


def _cs(tmp_path, n=4, drop=(), shape=(64, 64)):
    rng = np.random.default_rng(0)
    rot, tilt, psi = random_euler(rng, n)
    dtype = [
        ("uid", "<u8"),
        ("blob/path", "S32"),
        ("blob/idx", "<u4"),
        ("blob/shape", "<u4", (2,)),
        ("blob/psize_A", "<f4"),
        ("ctf/exp_group_id", "<u4"),
        ("ctf/accel_kv", "<f4"),
        ("ctf/cs_mm", "<f4"),
        ("ctf/amp_contrast", "<f4"),
        ("ctf/df1_A", "<f4"),
        ("ctf/df2_A", "<f4"),
        ("ctf/df_angle_rad", "<f4"),
        ("alignments3D/pose", "<f4", (3,)),
        ("alignments3D/shift", "<f4", (2,)),
        ("alignments3D/psize_A", "<f4"),
        ("alignments3D/class", "<u4"),
        ("alignments3D/split", "<u4"),
        ("location/micrograph_path", "S40"),
        ("location/center_x_frac", "<f4"),
        ("location/center_y_frac", "<f4"),
        ("location/micrograph_shape", "<u4", (2,)),
    ]
    dtype = [d for d in dtype if d[0] not in drop]
    a = np.zeros(n, dtype=dtype)
    names = a.dtype.names
    a["blob/path"] = b">J3/imported/stack.mrcs"
    a["blob/idx"] = np.arange(n)
    if "blob/shape" in names:
        a["blob/shape"] = shape
    if "blob/psize_A" in names:
        a["blob/psize_A"] = 1.5
    for name, value in (
        ("ctf/accel_kv", 300),
        ("ctf/cs_mm", 2.7),
        ("ctf/amp_contrast", 0.1),
        ("ctf/df1_A", 12000.5),
        ("ctf/df2_A", 11000.25),
        ("ctf/df_angle_rad", np.radians(40.0)),
    ):
        if name in names:
            a[name] = value
    a["alignments3D/pose"] = euler_to_pose(rot, tilt, psi)
    a["alignments3D/shift"] = [[1.5, -2.0]] * n
    a["alignments3D/psize_A"] = 1.5
    a["alignments3D/split"] = np.arange(n) % 2
    a["location/micrograph_path"] = b"J2/motioncorrected/mic_001.mrc"
    a["location/center_x_frac"] = 0.25
    a["location/center_y_frac"] = 0.5
    a["location/micrograph_shape"] = (4000, 3000)  # (ny, nx)
    path = tmp_path / "particles.cs"
    with open(path, "wb") as handle:
        np.save(handle, a)
    return path, (rot, tilt, psi)


def test_synthetic_cs_fields_and_units(tmp_path):
    path, (rot, tilt, psi) = _cs(tmp_path)
    cs = read_cs(path)
    table = cs.particles
    assert list(table.columns) == list(CANONICAL_COLUMNS)
    assert table["image_name"].tolist()[:2] == [
        "1@J3/imported/stack.mrcs",
        "2@J3/imported/stack.mrcs",
    ]
    assert table["image_index"].tolist() == [1, 2, 3, 4]
    np.testing.assert_allclose(
        euler_matrices(table["rot_deg"], table["tilt_deg"], table["psi_deg"]),
        euler_matrices(rot, tilt, psi),
        atol=1e-5,
    )
    assert table["origin_x_a"].tolist() == [2.25] * 4 and table["origin_y_a"].tolist() == [-3.0] * 4
    assert table["defocus_u_a"].iloc[0] == 12000.5 and table["defocus_angle_deg"].iloc[0] == 40.0
    assert table["image_size_px"].tolist() == [64] * 4 and table["pixel_size_a"].iloc[0] == 1.5
    assert table["optics_group"].tolist() == [1] * 4
    assert table["random_subset"].tolist() == [1, 2, 1, 2] and table["class_number"].iloc[0] == 1
    assert table["micrograph_name"].iloc[0] == "J2/motioncorrected/mic_001.mrc"
    assert (table["coordinate_x_px"].iloc[0], table["coordinate_y_px"].iloc[0]) == (750.0, 2000.0)
    assert cs.raw.dtype.names == np.load(path).dtype.names  # the raw array is kept whole


def test_missing_fields_are_named(tmp_path):
    path, _ = _cs(tmp_path, drop=("ctf/df1_A", "blob/psize_A"))
    with pytest.raises(
        CryosparcError, match=r"particles\.cs: .*missing fields blob/psize_A, ctf/df1_A"
    ):
        read_cs(path)
    table = read_cs(path, require_ctf=False, require_pixel_size=False).particles
    assert table["defocus_u_a"].isna().all() and table["pixel_size_a"].isna().all()
    bad = tmp_path / "bad.cs"
    bad.write_bytes(b"not numpy")
    with pytest.raises(CryosparcError, match=r"bad\.cs: not a cryoSPARC \.cs file"):
        read_cs(bad)
    path2, _ = _cs(tmp_path / "..", shape=(64, 48))
    with pytest.raises(CryosparcError, match="must be square"):
        read_cs(path2)


def test_real_cs_agrees_with_its_star_twin(shared_data):
    folder = shared_data / "real" / "cryodrgn_empiar10076"
    cs = read_cs(folder / "empiar_10076_7.cs").particles
    star = read_star(folder / "empiar_10076_7.star").particles
    assert len(cs) == len(star) == 7
    assert cs["image_name"].tolist() == star["image_name"].tolist()
    assert cs["image_index"].tolist() == star["image_index"].tolist()
    for column in (
        "defocus_u_a",
        "defocus_v_a",
        "defocus_angle_deg",
        "voltage_kv",
        "spherical_aberration_mm",
        "amplitude_contrast",
    ):
        np.testing.assert_allclose(cs[column], star[column], rtol=1e-6, err_msg=column)
    np.testing.assert_allclose(cs["pixel_size_a"], star["pixel_size_a"], rtol=1e-6)
    # the STAR (RELION 3.0) has no box; its stack and the .cs agree on it
    completed = complete_from_stacks(star, folder)
    assert completed["image_size_px"].tolist() == cs["image_size_px"].tolist() == [320] * 7
    assert cs[["rot_deg", "origin_x_a"]].isna().all().all()  # no alignments in this file
    print(
        f"EMPIAR-10076 .cs vs .star: {len(cs)} particles, pixel {cs['pixel_size_a'].iloc[0]:.7f} "
        f"vs {star['pixel_size_a'].iloc[0]:.7f} A, box {int(cs['image_size_px'].iloc[0])} px, "
        f"defocus U {cs['defocus_u_a'].iloc[0]} A"
    )
    assert pd.api.types.is_string_dtype(cs["image_name"])
