"""Every deposited particle format: RELION 3.0 STAR files completed from their stacks, several
optics groups with their own box and pixel size (em.particles)."""

from __future__ import annotations

import numpy as np
import pytest

from particleseg_model.em.mrc import read_particles_table, write_stack
from particleseg_model.em.particles import (
    ParticleTableError,
    complete_from_stacks,
    particle_groups,
    stack_header,
)
from particleseg_model.em.star import read_star

STAR_30 = """data_

loop_
_rlnImageName #1
_rlnDefocusU #2
_rlnVoltage #3
_rlnMagnification #4
_rlnDetectorPixelSize #5
1@stacks/a.mrcs 10000 300 50000 5
2@stacks/a.mrcs 11000 300 50000 5
1@stacks/b.mrcs 12000 300 50000 5
"""

STAR_31 = """
# version 30001

data_optics

loop_
_rlnOpticsGroup #1
_rlnImagePixelSize #2
_rlnImageSize #3
_rlnVoltage #4
1 1.0 {box} 300

# version 30001

data_particles

loop_
_rlnImageName #1
_rlnOpticsGroup #2
1@a.mrcs 1
{index}@a.mrcs 1
"""


def test_relion30_star_without_box_or_pixel(tmp_path, shared_data):
    """The deposited RELION 3.0 STAR of EMPIAR-10076 (cryoDRGN's test data): the pixel size from
    rlnDetectorPixelSize / rlnMagnification, the box from the stack."""
    folder = shared_data / "real" / "cryodrgn_empiar10076"
    star = read_star(shared_data / "star" / "cryodrgn_empiar_10076_7.star")
    assert star.version == "3.0" and star.particles["image_size_px"].isna().all()
    np.testing.assert_allclose(star.particles["pixel_size_a"], 5 * 1e4 / 38168)
    header = stack_header(folder / "empiar_10076_7.mrc")
    assert (header.nx, header.ny, header.n, header.pixel_size_a) == (320, 320, 7, None)
    table = complete_from_stacks(star.particles, folder, source=star.source)
    assert table["image_size_px"].tolist() == [320] * 7
    np.testing.assert_allclose(
        table["pixel_size_a"], 1.3099979, rtol=1e-6
    )  # kept, not the header's
    images = read_particles_table(table, folder)
    assert images.shape == (7, 320, 320)
    groups = particle_groups(table)
    assert [(g.box_px, round(g.pixel_size_a, 4), len(g)) for g in groups] == [(320, 1.31, 7)]
    print(
        f"EMPIAR-10076 RELION 3.0: 7 particles, box {groups[0].box_px} px, "
        f"{groups[0].pixel_size_a:.4f} A/px"
    )


def test_six_optics_groups_split_by_box_and_pixel(shared_data):
    star = read_star(shared_data / "star" / "cryodrgn_relion31.6opticsgroups.star")
    assert star.particles["optics_group"].nunique() == 6
    groups = particle_groups(star.particles)
    summary = [(g.box_px, g.pixel_size_a, len(g), g.optics_groups) for g in groups]
    assert summary == [(196, 1.25, 84, (1, 3, 4, 6)), (196, 1.24, 55, (2, 5))]
    assert sum(len(g) for g in groups) == len(star.particles)
    print(f"6 optics groups -> {len(groups)} (box, pixel) groups: {summary}")


def test_synthetic_relion30_and_stack_headers(tmp_path):
    (tmp_path / "stacks").mkdir()
    write_stack(tmp_path / "stacks" / "a.mrcs", np.zeros((2, 24, 24), np.float32), 3.0)
    write_stack(tmp_path / "stacks" / "b.mrcs", np.zeros((1, 24, 24), np.float32), 3.0)
    (tmp_path / "p.star").write_text(STAR_30)
    star = read_star(tmp_path / "p.star")
    assert star.particles["pixel_size_a"].tolist() == [1.0] * 3  # 5 um * 1e4 / 50000
    table = complete_from_stacks(star.particles, tmp_path)
    assert table["image_size_px"].tolist() == [24] * 3
    assert table["pixel_size_a"].tolist() == [1.0] * 3  # the STAR's, not the header's 3.0
    # without any pixel size in the STAR, the stack header's
    no_pixel = star.particles.assign(pixel_size_a=np.nan)
    assert complete_from_stacks(no_pixel, tmp_path)["pixel_size_a"].tolist() == [3.0] * 3
    assert star.particles["image_size_px"].isna().all()  # the input is not changed


def test_star_that_disagrees_with_its_stacks(tmp_path):
    write_stack(tmp_path / "a.mrcs", np.zeros((2, 32, 32), np.float32), 1.0)
    (tmp_path / "box.star").write_text(STAR_31.format(box=64, index=2))
    star = read_star(tmp_path / "box.star")
    with pytest.raises(
        ParticleTableError,
        match=r"box\.star: the box of 2 particle\(s\) of stack .*a\.mrcs is 64 px "
        r"\(rlnImageSize\), but the stack's images are 32 px",
    ):
        complete_from_stacks(star.particles, tmp_path, source=star.source)
    (tmp_path / "index.star").write_text(STAR_31.format(box=32, index=5))
    star = read_star(tmp_path / "index.star")
    with pytest.raises(
        ParticleTableError, match=r"index\.star: names image 5 of stack .*a\.mrcs, which holds 2"
    ):
        complete_from_stacks(star.particles, tmp_path, source=star.source)
    with pytest.raises(ParticleTableError, match=r"missing\.mrcs: stack not found"):
        complete_from_stacks(star.particles.assign(stack_path="missing.mrcs"), tmp_path)
    write_stack(tmp_path / "wide.mrcs", np.zeros((2, 32, 40), np.float32), 1.0)
    with pytest.raises(ParticleTableError, match="40 x 32 px images; particles must be square"):
        complete_from_stacks(
            star.particles.assign(stack_path="wide.mrcs", image_index=1, image_size_px=None),
            tmp_path,
        )
