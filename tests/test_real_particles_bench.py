"""benchmarks/real_particles.py: its box building and baselines on small synthetic arrays, and
the labelled set's counts on the real micrographs when ``../shared/data/real`` is there (no
Topaz, no model)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import real_particles as rp  # noqa: E402 - the benchmark, imported by path


def _disc(size: int = 54, radius: float = 13.5, amplitude: float = 3.0) -> np.ndarray:
    y, x = np.mgrid[:size, :size] - size // 2
    return amplitude * (x**2 + y**2 <= radius**2).astype(np.float32)


def test_baselines_score_a_bright_disc_above_noise() -> None:
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(20, 54, 54)).astype(np.float32)
    y, x = np.mgrid[:54, :54] - 27
    # a particle with texture: a disc that brightens towards its centre
    discs = noise + _disc() * np.exp(-(x**2 + y**2) / (2 * 8.0**2))
    for score in (rp.disc_variance, rp.blob_score):
        assert score(discs).min() > score(noise).max(), score.__name__


def test_blob_prefers_a_centred_disc_to_a_shifted_one() -> None:
    centred = _disc()[None]
    shifted = np.roll(centred, 14, axis=2)  # one radius off centre
    assert rp.blob_score(centred)[0] > rp.blob_score(shifted)[0]


def test_roc_auc() -> None:
    assert rp.roc_auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert rp.roc_auc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 0.0
    assert rp.roc_auc(np.zeros(5), np.zeros(7)) == 0.5  # ties count half
    # -inf (no signal) and NaN rank lowest
    assert rp.roc_auc(np.array([1.0]), np.array([-np.inf, np.nan])) == 1.0
    assert np.isnan(rp.roc_auc(np.array([]), np.array([1.0])))


def test_table_writes_null_where_there_is_no_junk() -> None:
    kind = np.array(["raw_good", "raw_good", "good", "empty_ice"])
    scores = {"centred": np.array([0.9, 0.0, 0.8, 0.1]), "signal_px": np.array([5, 0, 9, 0])}
    rows = rp.table(kind, scores)
    assert rows["raw_good_particles"]["auc_centred"] is None  # JSON null, never NaN
    assert rows["raw_good_particles"]["signal_share_good"] == 0.5
    assert rows["good_vs_empty_ice"]["auc_centred"] == 1.0


def test_cut_boxes_skip_and_pad_at_the_edge() -> None:
    image = np.arange(100 * 120, dtype=np.float32).reshape(100, 120)
    centres = np.array([[60.0, 50.0], [5.0, 50.0], [60.0, 97.0]])  # (x, y)
    boxes, kept = rp.cut_boxes(image, centres, 20)
    assert kept.tolist() == [0]  # the other two overhang: skipped
    assert boxes.shape == (1, 20, 20)
    assert boxes[0, 10, 10] == image[50, 60]  # the centre pixel is (round(y), round(x))
    # a margin skips boxes closer than it to the edge
    _, kept = rp.cut_boxes(image, np.array([[60.0, 15.0]]), 20, margin=10)
    assert kept.tolist() == []
    boxes, kept = rp.cut_boxes(image, centres, 20, edge="pad")
    assert kept.tolist() == [0, 1, 2] and boxes.shape == (3, 20, 20)
    assert boxes[1, 10, 10] == image[50, 5]
    assert boxes[1, 0, 0] == pytest.approx(image.mean())  # beyond the image: its mean
    with pytest.raises(ValueError, match="edge must be"):
        rp.cut_boxes(image, centres, 20, edge="wrap")


def test_disk_centres_separate_touching_disks() -> None:
    y, x = np.mgrid[:200, :300]
    mask = np.zeros((200, 300), bool)
    truth = [(60.0, 100.0), (130.0, 100.0), (230.0, 60.0)]  # (x, y); the first two overlap
    for cx, cy in truth:
        mask |= (x - cx) ** 2 + (y - cy) ** 2 <= 40**2
    found = rp.disk_centres(mask, 40)
    assert len(found) == 3
    for c in truth:
        assert np.min(np.hypot(*(found - c).T)) < 1.0


def test_bin_image_and_blob_peaks() -> None:
    image = np.zeros((8, 10), np.float32)
    image[:4, :2] = 4.0
    binned = rp.bin_image(image, 4)
    assert binned.shape == (2, 2) and binned[0, 0] == 2.0  # 8 of the block's 16 pixels are 4
    canvas = np.zeros((100, 100), np.float32)
    canvas[20:74, 30:84] += _disc()
    peaks = rp.blob_peaks(rp.log_response(canvas, 13.5), 13.5, threshold=0.5)
    assert peaks.tolist() == [[57.0, 47.0]]


def test_the_labelled_set_has_the_expected_counts() -> None:
    root = rp.real_data_dir()
    if root is None:
        pytest.skip("../shared/data/real (EMPIAR-10017 and MicrographCleaner data) is not here")
    labelled, mic = rp.build_micrographcleaner(root)
    counts = labelled.counts()
    assert (counts["mc_clean"], counts["mc_contamination"]) == (33, 12)
    assert {labelled.images(np.arange(45)).shape[1:]} == {(rp.MC_BOX, rp.MC_BOX)}
    assert mic.image.shape == (927, 959)
    picks = rp._read_csv_picks(
        root / "cryosegnet_empiar10017" / "csv_files" / f"{rp.CSV_MICROGRAPH}.csv"
    )
    assert len(picks) == 629
