"""Negatives from micrograph regions far from every pick (issue 15, item 3)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from particleseg_model.corpus.negatives import cut_boxes, negative_centres


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
