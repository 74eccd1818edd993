"""Negatives from micrograph regions far from every pick (issue 15, item 3): the centres, the
corpus rows (all background, flagged, split like every particle), the label step, the checks,
training and evaluation, and one micrograph entry through the real ``relion_preprocess``."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.spatial import cKDTree

from particleseg_model.access.empiar import EmdbClient, EmpiarClient
from particleseg_model.access.server import serve
from particleseg_model.corpus import build
from particleseg_model.corpus.manifests import LabelsManifest, RefinedManifest, StacksManifest
from particleseg_model.corpus.negatives import (
    cut_boxes,
    negative_centres,
    negative_chooser,
    negative_rule,
)
from particleseg_model.corpus.store import (
    NEGATIVE_COLUMN,
    CorpusWriter,
    assign_split,
    negative_mask,
    open_corpus,
)
from particleseg_model.em.star import write_loop_blocks
from particleseg_model.simulation.demo_archive import write_demo_archive

N_PARTICLES = 24
N_NEGATIVES = 10
HAS_RELION = shutil.which("relion_preprocess") is not None


def test_centres_keep_a_diameter_from_every_pick_and_the_box_inside():
    rng = np.random.default_rng(0)
    picks = rng.uniform(0, 500, (60, 2))
    centres = negative_centres((400, 500), picks, box=40, diameter_px=30, rng=rng, n_max=1000)
    assert len(centres) > 20
    nearest, _ = cKDTree(picks).query(centres)
    assert nearest.min() >= 30
    assert centres[:, 0].min() >= 20 and centres[:, 0].max() < 480
    assert centres[:, 1].min() >= 20 and centres[:, 1].max() < 380
    assert len(negative_centres((400, 500), picks, box=40, diameter_px=30, rng=rng, n_max=7)) == 7


def test_no_room_gives_no_centres():
    rng = np.random.default_rng(1)
    full = np.stack(np.meshgrid(np.arange(0, 200, 10), np.arange(0, 200, 10)), -1).reshape(-1, 2)
    assert len(negative_centres((200, 200), full, box=32, diameter_px=30, rng=rng, n_max=50)) == 0
    assert negative_centres(
        (20, 20), np.zeros((0, 2)), box=32, diameter_px=10, rng=rng, n_max=5
    ).shape == (0, 2)


def test_cut_boxes_centres_the_box_as_relion():
    image = np.arange(100 * 120, dtype=np.float32).reshape(100, 120)
    boxes = cut_boxes(image, np.array([[60.0, 50.0]]), 10)
    assert boxes.shape == (1, 10, 10)
    assert boxes[0, 5, 5] == image[50, 60]  # centre pixel at box // 2
    with pytest.raises(ValueError, match="outside the micrograph"):
        cut_boxes(image, np.array([[2.0, 50.0]]), 10)


def test_whole_pixel_centres_keep_the_distance_and_come_back_the_same():
    picks = np.random.default_rng(2).uniform(0, 600, (40, 2))
    choose = negative_chooser("30003", box=48, diameter_px=21.5, n_max=15)
    first = choose("Micrographs/mic_0001.mrc", (600, 640), picks)
    assert len(first) == 15
    np.testing.assert_array_equal(first, np.round(first))  # RELION cuts at whole pixels
    assert cKDTree(picks).query(first)[0].min() >= 21.5
    assert first[:, 0].min() >= 24 and first[:, 0].max() <= 640 - 24
    assert first[:, 1].min() >= 24 and first[:, 1].max() <= 600 - 24
    # the same entry and micrograph: the same boxes, whatever else ran before
    np.testing.assert_array_equal(first, choose("Micrographs/mic_0001.mrc", (600, 640), picks))
    other = choose("Micrographs/mic_0002.mrc", (600, 640), picks)
    assert not np.array_equal(first, other)
    rule = negative_rule(48, 21.5, 21.5, 15)
    assert "at least 21.5 px" in rule and "at most 15 per micrograph" in rule


# ------------------------------------------------------------------------------ the corpus


def _disc_labels(n: int, box: int, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:box, :box]
    distance = np.hypot(yy - box // 2, xx - box // 2)
    one = np.where(distance <= radius, 1, np.where(distance <= radius + 5, 2, 0))
    return np.repeat(one[None].astype(np.uint8), n, axis=0)


def _write_partition(
    root: Path, key: str, n_particles: int, n_negatives: int, box: int = 32, *, junk: int = 0
) -> None:
    """A partition of ``n_particles`` disc-labelled particles (the last ``junk`` of them
    ``is_good`` False) and ``n_negatives`` all-background negatives, as label_partition
    writes them (negatives without ``is_good``)."""
    rng = np.random.default_rng(3)
    particles = {
        "image_name": [f"{i + 1:06d}@Particles/mic.mrcs" for i in range(n_particles)],
        "is_good": [i < n_particles - junk for i in range(n_particles)],
        NEGATIVE_COLUMN: False,
    }
    negatives = {
        "image_name": [f"{i + 1:06d}@Negatives/mic.mrcs" for i in range(n_negatives)],
        NEGATIVE_COLUMN: True,
    }
    with CorpusWriter(root, key, box, attrs={"pixel_size_a": 2.0}) as writer:
        writer.append(
            rng.normal(size=(n_particles, box, box)),
            _disc_labels(n_particles, box, 8),
            pd.DataFrame(particles),
        )
        if n_negatives:
            writer.append(
                rng.normal(size=(n_negatives, box, box)),
                np.zeros((n_negatives, box, box), np.uint8),
                pd.DataFrame(negatives),
            )


def test_the_store_tells_negatives_from_particles(tmp_path: Path) -> None:
    _write_partition(tmp_path, "30003", 12, 5)
    ds = open_corpus(tmp_path, "30003")
    assert ds.n_particles == 17 and ds.n_negatives == 5 and ds.attrs["n_negatives"] == 5
    np.testing.assert_array_equal(ds.negative, [False] * 12 + [True] * 5)
    # splits: the same hash as every particle's (EMPIAR id + image name)
    names = ds.table["image_name"].tolist()
    assert ds.table["split"].tolist() == [assign_split("30003", n) for n in names]
    # rows appended without the column are particles; a table without it holds particles only
    with CorpusWriter(tmp_path, "30003", 32, mode="a") as writer:
        writer.append(
            np.ones((2, 32, 32)), np.zeros((2, 32, 32), np.uint8), {"image_name": ["a", "b"]}
        )
    grown = open_corpus(tmp_path, "30003")
    assert grown.n_negatives == 5 and grown.attrs["n_negatives"] == 5
    assert grown.negative.tolist() == [False] * 12 + [True] * 5 + [False] * 2
    assert negative_mask(pd.DataFrame({"image_name": ["x"]})).tolist() == [False]


# ------------------------------------------------------------------------------ label step


@pytest.fixture(scope="module")
def stacks_without_negatives(tmp_path_factory: pytest.TempPathFactory):
    """A particle entry's stacks, deposited poses and mask (the build's first three steps on a
    loopback archive): (work folder, stacks, refined, mask manifests)."""
    out = tmp_path_factory.mktemp("negatives")
    write_demo_archive(
        out / "archive",
        maps=["generated:globular"],
        n_particles=N_PARTICLES,
        box=48,
        micrograph_entries=0,
        seed=11,
        snr=2.0,
        progress=False,
    )
    work = out / "work"
    with serve(out / "archive") as server:
        entry = EmpiarClient(server.empiar_url, server.emdb_url).entry("30001")
        stacks = build.fetch_stacks(
            entry,
            server.archive_url,
            work / "downloads",
            work / "particle_stacks",
            emdb_files_url=server.emdb_files_url,
            emdb=EmdbClient(server.emdb_url),
            map_cache=work / "emdb",
        ).manifest
    refined = build.refine_poses(stacks, work / "refined_particles").manifest
    mask = build.make_mask_volume(stacks, refined, work / "mask_volume").manifest
    return work, stacks, refined, mask


def _with_negatives(stacks: StacksManifest, n: int) -> tuple[StacksManifest, np.ndarray]:
    """``stacks`` with ``n`` negatives (noise boxes in their own stack and STAR file under the
    stacks' base folder, as the extraction writes them) and their images."""
    import mrcfile

    box = stacks.box_px
    images = np.random.default_rng(5).normal(3.0, 2.0, (n, box, box)).astype(np.float32)
    stack = stacks.base_dir / "Negatives" / "mic_0001.mrcs"
    stack.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(stack, overwrite=True) as mrc:
        mrc.set_data(images)
        mrc.voxel_size = stacks.pixel_size_a
    optics = {
        "rlnOpticsGroup": 1,
        "rlnOpticsGroupName": "opticsGroup1",
        "rlnImagePixelSize": stacks.pixel_size_a,
        "rlnImageSize": box,
        "rlnImageDimensionality": 2,
        "rlnVoltage": 300.0,
        "rlnSphericalAberration": 2.7,
        "rlnAmplitudeContrast": 0.1,
    }
    rows = pd.DataFrame(
        {
            "rlnCoordinateX": 100.0 + np.arange(n),
            "rlnCoordinateY": 200.0,
            "rlnImageName": [f"{i + 1:06d}@Negatives/mic_0001.mrcs" for i in range(n)],
            "rlnMicrographName": "Micrographs/mic_0001.mrc",
            "rlnOpticsGroup": 1,
        }
    )
    star = write_loop_blocks(
        stacks.base_dir.parent / "negatives" / "negatives.star",
        {"optics": optics, "particles": rows},
    )
    negatives = {
        "star": str(star),
        "count": n,
        "micrographs": 1,
        "micrographs_with_picks": 1,
        "per_micrograph_max": n,
        "diameter_px": 20.0,
        "min_distance_px": 20.0,
        "rule": negative_rule(box, 20.0, 20.0, n),
    }
    return dataclasses.replace(stacks, negatives=negatives), images


def test_label_partition_adds_negatives_all_background(stacks_without_negatives) -> None:
    work, plain, refined, mask = stacks_without_negatives
    stacks, images = _with_negatives(plain, N_NEGATIVES)
    options = build.LabelOptions(batch=8)
    without = build.label_partition(
        plain, refined, mask, work / "corpus_plain", work / "labels_plain", options
    )
    lines: list[str] = []
    done = build.label_partition(
        stacks, refined, mask, work / "corpus", work / "labels", options, log=lines.append
    )
    ds = open_corpus(work / "corpus", "30001")
    assert ds.n_particles == N_PARTICLES + N_NEGATIVES and ds.n_negatives == N_NEGATIVES
    assert ds.attrs["n_negatives"] == N_NEGATIVES
    assert ds.attrs["negatives_rule"] == stacks.negatives["rule"]
    negative = ds.negative
    # labels all background; images the negatives' own, normalised per box as every particle
    assert not np.asarray(ds.labels[:])[negative].any()
    stored = np.asarray(ds.images[:], dtype=np.float32)[negative]
    expected = (images - images.mean(axis=(1, 2), keepdims=True)) / images.std(
        axis=(1, 2), keepdims=True
    )
    np.testing.assert_allclose(stored, expected, atol=5e-3)
    # the table: flagged, RELION's image names, no ground truth, the same split hash
    table = ds.table
    assert table[NEGATIVE_COLUMN].dtype == bool
    assert table.loc[negative, "image_name"].str.endswith("@Negatives/mic_0001.mrcs").all()
    assert table.loc[~negative, "image_name"].str.contains("Particles").all()
    assert (
        table.loc[negative, "is_good"].isna().all()
        and table.loc[~negative, "is_good"].notna().all()
    )
    assert table.loc[negative, "rot_deg"].isna().all()
    assert (table["micrograph_name"][negative] == "Micrographs/mic_0001.mrc").all()
    assert table["split"].tolist() == [assign_split("30001", n) for n in table["image_name"]]
    # spread between the particle batches (a chunk-wise shuffle mixes them), not all at the end
    rows = np.flatnonzero(negative)
    assert rows[0] < N_PARTICLES // 2 and rows[-1] == len(table) - 1
    # the particles, their labels, shares and checks as without negatives
    plain_ds = open_corpus(work / "corpus_plain", "30001")
    names = table.loc[~negative, "image_name"].to_numpy()
    np.testing.assert_array_equal(names, plain_ds.table["image_name"].to_numpy())
    np.testing.assert_array_equal(np.asarray(ds.labels[:])[~negative], plain_ds.labels[:])
    assert done.manifest.n_particles == without.manifest.n_particles == N_PARTICLES
    assert done.manifest.n_negatives == N_NEGATIVES and without.manifest.n_negatives == 0
    assert done.manifest.label_fractions == pytest.approx(without.manifest.label_fractions)
    assert done.masks == without.masks and done.masks.particles_written == N_PARTICLES
    assert done.rows.passed and done.rows.images == N_PARTICLES + N_NEGATIVES
    summary = done.summary()
    assert summary["particles"] == N_PARTICLES and summary["negatives"] == N_NEGATIVES
    assert f"negatives: {N_NEGATIVES} written, all background" in lines
    assert LabelsManifest.read(work / "labels").n_negatives == N_NEGATIVES
    # an append finds every particle and negative in place: the partition is unchanged
    again = build.label_partition(
        stacks, refined, mask, work / "corpus", work / "labels_again",
        dataclasses.replace(options, append=True),
    )  # fmt: skip
    assert again.manifest.n_particles == 0 and again.manifest.n_negatives == 0
    assert open_corpus(work / "corpus", "30001").n_particles == N_PARTICLES + N_NEGATIVES
    # negatives off: the particles only, no negative column
    off = build.label_partition(
        stacks, refined, mask, work / "corpus_off", work / "labels_off",
        dataclasses.replace(options, negatives=False),
    )  # fmt: skip
    off_ds = open_corpus(work / "corpus_off", "30001")
    assert off.manifest.n_negatives == 0 and off_ds.n_particles == N_PARTICLES
    assert NEGATIVE_COLUMN not in off_ds.table.columns


def test_unreadable_negatives_are_named_like_particles(stacks_without_negatives) -> None:
    work, plain, refined, mask = stacks_without_negatives
    stacks, _ = _with_negatives(plain, 4)
    star = Path(stacks.negatives["star"])
    broken = star.read_text().replace("000004@Negatives", "000009@Negatives")
    bad = star.with_name("broken.star")
    bad.write_text(broken)
    stacks = dataclasses.replace(stacks, negatives={**stacks.negatives, "star": str(bad)})
    with pytest.raises(ValueError, match=r"broken.star: 1 negatives cannot be read: stack "):
        build.label_partition(stacks, refined, mask, work / "c_bad", work / "l_bad")
    done = build.label_partition(
        stacks, refined, mask, work / "c_skip", work / "l_skip",
        build.LabelOptions(skip_bad_rows=True),
    )  # fmt: skip
    assert done.manifest.n_negatives == 3 and done.manifest.skipped == 1


# ------------------------------------------------------------------------------ checks


def test_corpus_complete_counts_particles_not_negatives(tmp_path: Path) -> None:
    """Negatives never make up for missing particles: 90 of 100 announced particles (plus 20
    negatives: 110 rows) is incomplete, and the metadata names both counts."""
    from particleseg_assets.partition_checks import corpus_complete
    from particleseg_assets.resources import StorageResource

    storage = StorageResource(root=str(tmp_path / "data"))
    _write_partition(storage.corpus_root(), "30003", 90, 20)
    storage.catalog_path().parent.mkdir(parents=True)
    pd.DataFrame(
        {"empiar_id": ["EMPIAR-30003"], "partition_key": ["30003"], "particle_images": [100]}
    ).to_parquet(storage.catalog_path(), index=False)
    labels = LabelsManifest(
        str(storage.corpus_root()), "30003", 90, 0, (0.5, 0.3, 0.2), 2.0, 10.0, 11,
        "x.star", "deposited", "mask.mrc", {}, None, n_negatives=20,
    )  # fmt: skip
    check = corpus_complete(storage, "30003", labels)
    assert not check.passed
    meta = {k: v.value for k, v in check.metadata.items()}
    assert meta["particles_in_corpus"] == 90 and meta["negatives_in_corpus"] == 20
    assert meta["zarr_rows"] == meta["parquet_rows"] == 110
    assert meta["share_of_announced"] == 0.9
    _write_partition(storage.corpus_root(), "30003", 98, 20)
    assert corpus_complete(storage, "30003", labels).passed


def test_label_shares_compare_particles_and_report_negatives_apart(tmp_path: Path) -> None:
    from particleseg_assets.partition_checks import label_shares_like_the_others
    from particleseg_assets.resources import StorageResource

    storage = StorageResource(root=str(tmp_path / "data"))

    def manifest(key: str, fractions: tuple[float, float, float], negatives: int) -> LabelsManifest:
        return LabelsManifest(
            "corpus", key, 100, 0, fractions, 2.0, 10.0, 11, "x.star", "deposited",
            "mask.mrc", {}, None, n_negatives=negatives,
        )  # fmt: skip

    manifest("30001", (0.6, 0.25, 0.15), 0).write(storage.path("particle_masks", "30001"))
    mine = manifest("30003", (0.6, 0.24, 0.16), 40)
    check = label_shares_like_the_others(storage, "30003", mine, ["30001", "30003"])
    assert check.passed
    meta = {k: v.value for k, v in check.metadata.items()}
    assert meta["negatives_not_counted"] == 40 and meta["particles"] == 100
    assert meta["signal_share"] == 0.24


# ------------------------------------------------------------------------------ training


@pytest.mark.parametrize("junk", ["background", "drop", "keep"])
def test_junk_modes_leave_negatives_as_negatives(tmp_path: Path, junk: str) -> None:
    """``junk`` acts on the simulation's ``is_good`` only: negatives (no ``is_good``) are fed
    in every mode, with their all-background labels; junk is relabelled or dropped."""
    from particleseg_model.model.loader import CorpusBatches

    _write_partition(tmp_path, "30003", 20, 8, junk=5)
    ds = open_corpus(tmp_path, "30003")
    batches = CorpusBatches(
        [ds],
        split=None,
        batch_size=7,
        size=None,
        shuffle=False,
        good_only=junk == "drop",
        junk_background=junk == "background",
    )
    seen: dict[int, np.ndarray] = {}
    for i in range(len(batches)):
        _, y = batches[i]
        for (_, row), labels in zip(batches.batch_indices(i), y, strict=True):
            seen[row] = labels
    negatives = set(np.flatnonzero(ds.negative).tolist())
    junk_rows = {15, 16, 17, 18, 19}
    assert negatives <= set(seen)
    assert all(not seen[r].any() for r in negatives)
    if junk == "drop":
        assert not junk_rows & set(seen)
    else:
        assert junk_rows <= set(seen)
        assert all(seen[r].any() != (junk == "background") for r in junk_rows)
    assert all(seen[r].any() for r in set(range(15)))


class _ConstantModel:
    """A stand-in network: the same class everywhere (softmax one-hot), for every image."""

    def __init__(self, size: int, cls: int) -> None:
        self.probs = np.zeros((size, size, 3), np.float32)
        self.probs[..., cls] = 1.0
        self.input_shape = (None, size, size, 1)

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        return np.repeat(self.probs[None], len(x), axis=0)


def test_evaluation_scores_particles_and_counts_negatives_apart(tmp_path: Path) -> None:
    from particleseg_model.model.train import evaluate_partition
    from particleseg_model.model.versions import score_row

    _write_partition(tmp_path / "with", "30003", 60, 30)
    _write_partition(tmp_path / "without", "30003", 60, 0)
    empty = _ConstantModel(32, 0)
    full = _ConstantModel(32, 1)
    scored = evaluate_partition(empty, tmp_path / "with", "30003", split="train")
    plain = evaluate_partition(empty, tmp_path / "without", "30003", split="train")
    assert scored.scores == plain.scores and scored.particles == plain.particles
    n_negatives = int(open_corpus(tmp_path / "with", "30003").negative[
        open_corpus(tmp_path / "with", "30003").split_indices("train")
    ].sum())  # fmt: skip
    assert scored.negatives == n_negatives > 0 and plain.negatives == 0
    assert scored.negatives_all_background == 1.0 and plain.negatives_all_background is None
    assert (
        evaluate_partition(full, tmp_path / "with", "30003", split="train").negatives_all_background
        == 0.0
    )
    row = score_row(scored, seen=True)
    assert row["test_negatives"] == n_negatives and row["negatives_all_background"] == 100.0
    assert "test_negatives" not in score_row(plain, seen=True)


def test_calibration_never_sees_negatives(tmp_path: Path, monkeypatch) -> None:
    from particleseg_model.model import calibration

    _write_partition(tmp_path, "30003", 60, 30)
    fed: list[int] = []

    def predict(model, images, **_):
        fed.append(len(images))
        return _disc_labels(len(images), images.shape[-1], 8)

    monkeypatch.setattr(calibration, "predict_labels", predict)
    calibration.mask_calibration(None, tmp_path, ["30003"], split="train")
    ds = open_corpus(tmp_path, "30003")
    train = ds.split_indices("train")
    assert sum(fed) == int((~ds.negative[train]).sum())


# ------------------------------------------------------------------------------ through RELION


@pytest.mark.relion
@pytest.mark.skipif(
    not HAS_RELION, reason="RELION is not installed (relion_preprocess not on PATH)"
)
def test_micrograph_entry_negatives_through_relion(tmp_path: Path) -> None:
    """A simulated micrograph entry (every object on its micrographs is a pick, so a box far
    from every pick is truly empty) through the real ``relion_preprocess``: the negatives are
    far from every pick, cut and normalised exactly as the particles, recorded in the
    manifest, and join the partition all background."""
    from particleseg_model.em.mrc import open_stack, read_particles_table
    from particleseg_model.em.star import read_star, write_star
    from particleseg_model.simulation.simulate import normalise_images

    (entry_id,) = write_demo_archive(
        tmp_path / "archive",
        maps=["generated:globular"],
        n_particles=50,
        box=48,
        micrograph_size=384,
        junk_fraction=0.3,
        seed=3,
        progress=False,
    )
    key = entry_id.split("-")[1]
    work = tmp_path / "work"
    with serve(tmp_path / "archive") as server:
        entry = EmpiarClient(server.empiar_url, server.emdb_url).entry(key)
        kwargs = {
            "emdb_files_url": server.emdb_files_url,
            "emdb": EmdbClient(server.emdb_url),
            "map_cache": work / "emdb",
        }
        with pytest.raises(ValueError, match="negatives_per_micrograph must be 0 .* got -1"):
            build.fetch_stacks(
                entry, server.archive_url, work / "downloads", work / "refused",
                build.StacksOptions(negatives_per_micrograph=-1), **kwargs,
            )  # fmt: skip
        result = build.fetch_stacks(
            entry, server.archive_url, work / "downloads", work / "particle_stacks",
            build.StacksOptions(negatives_per_micrograph=8), **kwargs,
        )  # fmt: skip
    stacks = result.manifest
    data = work / "downloads" / "data"
    picks = pd.read_csv(data / "ground_truth.csv")  # every pick, junk included
    info = stacks.negatives
    assert info is not None and stacks.negatives_star is not None
    negatives = read_star(stacks.negatives_star).particles
    n_mics = picks["micrograph_name"].nunique()
    assert n_mics == 2 and info["micrographs"] == info["micrographs_with_picks"] == n_mics
    assert info["count"] == len(negatives) == 8 * n_mics and stacks.n_particles == len(picks)
    assert info["diameter_px"] == info["min_distance_px"] > 10
    assert "at most 8 per micrograph" in info["rule"]
    assert StacksManifest.read(work / "particle_stacks") == stacks  # the JSON keeps them
    summary = result.summary()
    assert summary["negatives"] == len(negatives) and summary["negatives_from_micrographs"] == 2
    assert summary["particles_and_negatives_png"].exists()

    # far from every pick of their micrograph, the whole box inside
    box, half = stacks.box_px, stacks.box_px // 2
    for name, group in negatives.groupby("micrograph_name"):
        xy = group[["coordinate_x_px", "coordinate_y_px"]].to_numpy()
        theirs = picks[picks["micrograph_name"] == name][["coordinate_x_px", "coordinate_y_px"]]
        assert cKDTree(theirs.to_numpy(float)).query(xy)[0].min() >= info["min_distance_px"]
        micrograph = open_stack(data / str(name))[0]
        assert xy.min() >= half and xy[:, 0].max() <= micrograph.shape[1] - half
        # cut exactly as RELION cuts the particles: the window, inverted, normalised
        windows = -cut_boxes(micrograph, xy, box)
        expected, _, _ = normalise_images(windows, bg_radius_px=stacks.extraction["bg_radius_px"])
        images = read_particles_table(group, base_dir=stacks.base_dir)
        assert np.abs(images - expected).max() < 1e-3

    # the rest of the build with the simulator's poses (junk without one at 0): no refinement
    star = read_star(stacks.particles_star)
    truth = pd.read_csv(stacks.ground_truth).set_index("image_name")
    particles = star.particles.copy()
    for column in build.POSE_COLUMNS:
        particles[column] = particles["image_name"].map(truth[column]).astype(float).fillna(0.0)
    star.particles = particles
    (work / "refined").mkdir()
    posed = write_star(work / "refined" / "particles.star", star)
    refined = RefinedManifest(
        stacks.empiar_id, "deposited", posed, stacks.base_dir, None, len(particles),
        stacks.box_px, stacks.pixel_size_a,
    )  # fmt: skip
    mask = build.make_mask_volume(stacks, refined, work / "mask_volume").manifest
    labels = build.label_partition(stacks, refined, mask, work / "corpus", work / "labels")
    ds = open_corpus(work / "corpus", key)
    assert labels.manifest.n_negatives == ds.n_negatives == len(negatives)
    assert labels.masks.particles_written == len(picks)
    assert not np.asarray(ds.labels[:])[ds.negative].any()
    assert ds.table.loc[ds.negative, "image_name"].str.contains("@Negatives/Micrographs/").all()
