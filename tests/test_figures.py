"""Particle/mask grids and inline PNGs."""

from __future__ import annotations

import base64

import numpy as np

from particleseg_model.figures import markdown_image, particles_with_masks, write_png


def test_grid_puts_each_mask_under_its_particle(tmp_path) -> None:
    images = np.random.default_rng(0).normal(size=(3, 8, 8)).astype(np.float32)
    labels = np.zeros((3, 8, 8), dtype=np.uint8)
    labels[1, 2:6, 2:6] = 1
    labels[1, 1, 2:6] = 2
    grid = particles_with_masks(images, labels, columns=2, gap=2)
    assert grid.shape == (2 * 2 * (8 + 2) + 2, 2 * (8 + 2) + 2)
    mask_of_second = grid[2 + 8 + 2 : 2 + 16 + 2, 12:20]  # band 0, column 1, lower row
    assert mask_of_second[3, 3] == 255 and mask_of_second[1, 3] == 128
    assert mask_of_second[0, 0] == 0
    assert particles_with_masks(images).shape == (1 * (8 + 2) + 2, 3 * (8 + 2) + 2)  # one row

    png = write_png(tmp_path / "grid.png", grid)
    md = markdown_image(png, "grid")
    assert md.startswith("![grid](data:image/png;base64,")
    assert base64.b64decode(md.split(",", 1)[1][:-1])[:8] == b"\x89PNG\r\n\x1a\n"
