"""MRC stacks and maps: real particles through their STAR names, truncation, maps, writing."""

from __future__ import annotations

import re
import shutil
import subprocess
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from particleseg_model.em import mrc as mrc_module
from particleseg_model.em.mrc import (
    MrcError,
    clear_cache,
    open_stack,
    read_map,
    read_particles,
    read_particles_table,
    write_map,
    write_stack,
)
from particleseg_model.em.star import read_star, write_star

# STAR file -> (folder, the stack its image names use, the shared file holding that stack,
# stack shape). The shared files were renamed when collected (aspire_/cryodrgn_ prefixes), so
# the tests link the names the STAR files use to them in a temporary project directory.
STACKS = {
    "aspire_rln_proj_65.star": (
        "particles",
        "rln_proj_65.mrcs",
        "aspire_rln_proj_65.mrcs",
        (5, 65, 65),
    ),
    "aspire_rln_proj_65_shifted.star": (
        "particles",
        "rln_proj_65_shifted.mrcs",
        "aspire_rln_proj_65_shifted.mrcs",
        (4, 65, 65),
    ),
    "aspire_sample_particles_relion30.star": (
        "particles",
        "sample.mrcs",
        "aspire_sample.mrcs",
        (17, 200, 200),
    ),
    "aspire_sample_particles_relion31.star": (
        "particles",
        "sample.mrcs",
        "aspire_sample.mrcs",
        (17, 200, 200),
    ),
    "cryodrgn_relion31.star": ("star", "relion31.mrcs", "cryodrgn_relion31.mrcs", (5, 256, 256)),
    "cryodrgn_relion31.v2.star": ("star", "relion31.mrcs", "cryodrgn_relion31.mrcs", (5, 256, 256)),
}


def _raw(path: Path) -> np.ndarray:
    """The whole file through mrcfile, independently of the module under test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cryodrgn_relion31.mrcs has no "MAP " id
        with mrcfile.open(path, permissive=True) as mrc:
            return np.array(mrc.data)


def _project(shared_data: Path, tmp_path: Path, star_name: str) -> tuple[Path, Path]:
    """A project directory where the STAR file's stack name resolves to the shared file."""
    folder, stack_name, shared_name, _ = STACKS[star_name]
    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    link = project / stack_name
    if not link.exists():
        link.symlink_to(shared_data / folder / shared_name)
    return project, shared_data / folder / shared_name


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


# ------------------------------------------------------------------------------ real data


@pytest.mark.parametrize("star_name", sorted(STACKS))
def test_read_real_particles_by_star_names(
    shared_data: Path, tmp_path: Path, star_name: str
) -> None:
    star = read_star(shared_data / STACKS[star_name][0] / star_name)
    project, stack_file = _project(shared_data, tmp_path, star_name)
    images = read_particles_table(star.particles, base_dir=project)
    whole = _raw(stack_file)
    assert whole.shape == STACKS[star_name][3]
    assert images.dtype == np.float32
    assert images.shape == (len(star.particles), *whole.shape[1:])
    for row, index in enumerate(star.particles["image_index"]):
        np.testing.assert_array_equal(images[row], whole[index - 1])
    box = star.particles["image_size_px"].dropna().unique()
    assert set(box) <= {whole.shape[-1]}  # the STAR box (when given) is the stack's
    assert np.isfinite(images).all() and images.std() > 0


def test_particles_keep_the_requested_order(shared_data: Path, tmp_path: Path) -> None:
    project, stack_file = _project(shared_data, tmp_path, "aspire_sample_particles_relion31.star")
    whole = _raw(stack_file)
    names = ["17@sample.mrcs", "000002@sample.mrcs", "17@sample.mrcs", "5@sample.mrcs"]
    images = read_particles(names, base_dir=project, dtype=np.float64)
    assert images.dtype == np.float64
    np.testing.assert_array_equal(images, whole[[16, 1, 16, 4]].astype(np.float64))
    # absolute paths need no base directory
    absolute = read_particles([f"3@{stack_file}"])
    np.testing.assert_array_equal(absolute[0], whole[2])


def test_several_stacks_in_one_call(shared_data: Path, tmp_path: Path) -> None:
    project, proj = _project(shared_data, tmp_path, "aspire_rln_proj_65.star")
    _, shifted = _project(shared_data, tmp_path, "aspire_rln_proj_65_shifted.star")
    names = ["2@rln_proj_65_shifted.mrcs", "5@rln_proj_65.mrcs", "1@rln_proj_65_shifted.mrcs"]
    images = read_particles(names, base_dir=project)
    np.testing.assert_array_equal(images[0], _raw(shifted)[1])
    np.testing.assert_array_equal(images[1], _raw(proj)[4])
    np.testing.assert_array_equal(images[2], _raw(shifted)[0])


def test_stack_is_opened_once(shared_data: Path, tmp_path: Path) -> None:
    project, stack_file = _project(shared_data, tmp_path, "aspire_sample_particles_relion31.star")
    first = open_stack(stack_file)
    assert isinstance(first, np.memmap) and not first.flags.writeable
    assert open_stack(project / "sample.mrcs") is first  # the link resolves to the same file
    read_particles([f"{i}@sample.mrcs" for i in range(1, 18)], base_dir=project)
    info = mrc_module._open_cached.cache_info()
    assert (info.misses, info.currsize) == (1, 1)


def test_real_maps(shared_data: Path) -> None:
    for name, box, pixel in (("emd_1832.map", 64, 5.7), ("emd_5625.map", 56, 4.23)):
        path = shared_data / "maps" / name
        volume, pixel_size = read_map(path)
        assert volume.shape == (box, box, box) and volume.dtype == np.float32
        assert pixel_size == pixel
        np.testing.assert_array_equal(volume, _raw(path))
        # a real particle: density concentrated around the centre of the box
        z, y, x = np.indices(volume.shape) - box // 2
        inner = np.sqrt(x**2 + y**2 + z**2) < box / 4
        assert volume[inner].mean() > volume[~inner].mean()


def test_stack_headers_of_the_real_data(shared_data: Path) -> None:
    """The shared stacks' headers give no usable pixel size: it comes from the STAR files."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.open(
            shared_data / "particles" / "aspire_sample.mrcs", header_only=True
        ) as mrc:
            assert float(mrc.voxel_size.x) == 0.0
    assert open_stack(shared_data / "star" / "cryodrgn_relion31.mrcs").shape == (5, 256, 256)


def test_box_from_the_stack_completes_a_relion30_conversion(
    shared_data: Path, tmp_path: Path
) -> None:
    star = read_star(shared_data / "particles" / "aspire_sample_particles_relion30.star")
    project, _ = _project(shared_data, tmp_path, "aspire_sample_particles_relion30.star")
    stack = open_stack(project / star.particles["stack_path"].iloc[0])
    star.particles["image_size_px"] = stack.shape[-1]
    again = read_star(write_star(tmp_path / "converted.star", star))
    assert again.optics["rlnImageSize"].tolist() == [200, 200]


# ------------------------------------------------------------------------------ errors


def test_truncated_stack(shared_data: Path, tmp_path: Path) -> None:
    source = shared_data / "particles" / "aspire_rln_proj_65.mrcs"
    size = source.stat().st_size  # 1024 + 5 * 65 * 65 * 4 = 85524
    cut = tmp_path / "cut.mrcs"
    shutil.copyfile(source, cut)
    with open(cut, "r+b") as fh:
        fh.truncate(size - 100)
    with pytest.raises(MrcError, match=re.escape(str(cut))) as info:
        open_stack(cut)
    message = str(info.value)
    assert "truncated" in message and str(size) in message and str(size - 100) in message
    with pytest.raises(MrcError, match="truncated"):
        read_particles(["1@cut.mrcs"], base_dir=tmp_path)
    link = tmp_path / "link.mrcs"  # a link is named as given, then its target, each once
    link.symlink_to(cut)
    with pytest.raises(
        MrcError, match=f"^{re.escape(str(link))} \\(a link to {re.escape(str(cut))}\\): trunc"
    ):
        open_stack(link)
    with open(cut, "r+b") as fh:
        fh.truncate(500)
    with pytest.raises(MrcError, match="shorter than the 1024-byte header"):
        open_stack(cut)


def test_truncation_after_caching_is_noticed(shared_data: Path, tmp_path: Path) -> None:
    copy = tmp_path / "p.mrcs"
    shutil.copyfile(shared_data / "particles" / "aspire_rln_proj_65.mrcs", copy)
    assert open_stack(copy).shape == (5, 65, 65)
    with open(copy, "r+b") as fh:
        fh.truncate(copy.stat().st_size - 4)
    with pytest.raises(MrcError, match="truncated"):
        open_stack(copy)


def test_index_beyond_the_stack(shared_data: Path, tmp_path: Path) -> None:
    project, _ = _project(shared_data, tmp_path, "aspire_rln_proj_65.star")
    with pytest.raises(
        MrcError,
        match=r"'6@rln_proj_65.mrcs' is beyond the stack, which "
        r"holds 5 images",
    ) as info:
        read_particles(["1@rln_proj_65.mrcs", "6@rln_proj_65.mrcs"], base_dir=project)
    assert str(project / "rln_proj_65.mrcs") in str(info.value)


def test_bad_names_and_files(tmp_path: Path) -> None:
    with pytest.raises(MrcError, match="image 2: malformed image name 'stack.mrcs'"):
        read_particles(["1@a.mrcs", "stack.mrcs"], base_dir=tmp_path)
    with pytest.raises(MrcError, match=re.escape(str(tmp_path / "missing.mrcs"))):
        read_particles(["1@missing.mrcs"], base_dir=tmp_path)
    garbage = tmp_path / "garbage.mrcs"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    with pytest.raises(MrcError, match=re.escape(str(garbage))):
        open_stack(garbage)
    with pytest.raises(MrcError, match="no image_name column"):
        read_particles_table(pd.DataFrame({"x": [1]}))
    assert read_particles([]).shape == (0, 0, 0)
    assert issubclass(MrcError, ValueError)


def test_stacks_of_different_sizes(tmp_path: Path) -> None:
    write_stack(tmp_path / "a.mrcs", np.zeros((2, 8, 8)), 1.0)
    write_stack(tmp_path / "b.mrcs", np.zeros((2, 8, 10)), 1.0)
    with pytest.raises(MrcError, match=r"b.mrcs: images are 10 x 8 px, but those of .*a.mrcs"):
        read_particles(["1@a.mrcs", "1@b.mrcs"], base_dir=tmp_path)


def test_compressed_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.mrcs"
    with mrcfile.new(path, compression="gzip") as mrc:
        mrc.set_data(np.zeros((2, 4, 4), np.float32))
    with pytest.raises(MrcError, match="compressed"):
        open_stack(path)


# ------------------------------------------------------------------------------ writing


def test_stack_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    images = rng.normal(size=(4, 12, 10))  # float64 in, float32 on disk
    path = write_stack(tmp_path / "s.mrcs", images, 1.25)
    back = read_particles([f"{i}@s.mrcs" for i in (1, 2, 3, 4)], base_dir=tmp_path)
    np.testing.assert_array_equal(back, images.astype(np.float32))
    with mrcfile.open(path) as mrc:  # a valid MRC2014 image stack, read strictly
        assert mrc.is_image_stack() and mrc.header.mode == 2
        assert float(mrc.voxel_size.x) == pytest.approx(1.25)
        assert mrc.header.label[0] == b"particleSeg"
    # the same data give the same bytes (no time stamp)
    again = write_stack(tmp_path / "t.mrcs", images, 1.25)
    assert again.read_bytes() == path.read_bytes()
    # a single image is a stack of one
    write_stack(tmp_path / "one.mrcs", images[0], 1.25)
    assert open_stack(tmp_path / "one.mrcs").shape == (1, 12, 10)


def test_rewritten_stack_is_read_afresh(tmp_path: Path) -> None:
    path = tmp_path / "s.mrcs"
    write_stack(path, np.zeros((2, 6, 6)), 1.0)
    assert float(open_stack(path).max()) == 0.0
    write_stack(path, np.ones((2, 6, 6)), 1.0)  # same size, same second
    assert float(open_stack(path).min()) == 1.0


@pytest.mark.relion
def test_relion_reads_what_we_write(relion_bin: Path, tmp_path: Path) -> None:
    images = np.arange(2 * 8 * 6, dtype=np.float32).reshape(2, 8, 6)
    write_stack(tmp_path / "s.mrcs", images, 1.5)
    write_map(tmp_path / "m.mrc", np.ones((4, 6, 8)), 2.5)
    run = [str(relion_bin / "relion_image_handler"), "--stats", "--i"]
    out = subprocess.run(
        [*run, "2@s.mrcs"], cwd=tmp_path, check=True, capture_output=True, text=True, timeout=60
    ).stdout
    assert "(x,y,z,n)= 6 x 8 x 1 x 1" in out and "avg= 71.5" in out and "angpix = 1.5" in out
    out = subprocess.run(
        [*run, "m.mrc"], cwd=tmp_path, check=True, capture_output=True, text=True, timeout=60
    ).stdout
    assert "(x,y,z,n)= 8 x 6 x 4 x 1" in out and "angpix = 2.5" in out


def test_map_round_trip(tmp_path: Path) -> None:
    volume = np.random.default_rng(4).normal(size=(6, 7, 8)).astype(np.float32)
    path = write_map(tmp_path / "m.mrc", volume, 4.23)
    back, pixel = read_map(path)
    np.testing.assert_array_equal(back, volume)
    assert pixel == 4.23
    with mrcfile.open(path) as mrc:
        assert mrc.is_volume()
        assert (int(mrc.header.nxstart), int(mrc.header.nystart), int(mrc.header.nzstart)) == (
            -4,
            -3,
            -3,
        )


def test_map_axis_order_from_the_header(tmp_path: Path) -> None:
    stored = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    path = tmp_path / "zyx_swapped.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(stored)
        mrc.voxel_size = 2.0
        # columns run along z, rows along y, sections along x: stored[x, y, z]
        mrc.header.mapc, mrc.header.mapr, mrc.header.maps = 3, 2, 1
    volume, pixel = read_map(path)
    np.testing.assert_array_equal(volume, stored.transpose(2, 1, 0))
    assert pixel == 2.0


def test_writes_are_atomic(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "s.mrcs"
    write_stack(path, np.zeros((1, 4, 4)), 1.0)
    before = path.read_bytes()

    def no_rename(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(mrc_module.os, "replace", no_rename)
    with pytest.raises(OSError, match="rename failed"):
        write_stack(path, np.ones((3, 4, 4)), 1.0)
    with pytest.raises(OSError, match="rename failed"):
        write_map(tmp_path / "m.mrc", np.ones((4, 4, 4)), 1.0)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.mrcs"]


@pytest.mark.parametrize(
    ("writer", "data", "pixel", "message"),
    [
        (write_stack, np.zeros((2, 4, 4)), 0.0, "pixel size must be a positive"),
        (write_stack, np.zeros((2, 4, 4)), float("nan"), "pixel size must be a positive"),
        (write_stack, np.zeros((2, 2, 4, 4)), 1.0, "must be \\[n, y, x\\]"),
        (write_map, np.zeros((4, 4)), 1.0, "must be a \\[z, y, x\\] volume"),
        (write_map, np.zeros((0, 4, 4)), 1.0, "must be a \\[z, y, x\\] volume"),
    ],
)
def test_write_refuses_bad_input(tmp_path: Path, writer, data, pixel, message) -> None:
    path = tmp_path / "out.mrc"
    with pytest.raises(MrcError, match=message) as info:
        writer(path, data, pixel)
    assert str(path) in str(info.value)
    assert list(tmp_path.iterdir()) == []
