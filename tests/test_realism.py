"""The realism statistics and the simulator's realism options (issue 15, item 1)."""

from __future__ import annotations

import numpy as np
import pytest

from particleseg_model.em.maps import generate_map, prepare_map
from particleseg_model.simulation.realism import (
    disc_contrast,
    radial_power_spectrum,
    spectrum_distance,
)
from particleseg_model.simulation.simulate import SimulationConfig, simulate_particles


def test_white_noise_has_a_flat_spectrum_and_no_contrast():
    noise = np.random.default_rng(0).standard_normal((200, 32, 32))
    freq, power = radial_power_spectrum(noise)
    assert freq[0] == pytest.approx(1 / 32) and freq[-1] == pytest.approx(0.5)
    assert power.sum() == pytest.approx(1.0)
    assert power.max() / power.min() < 1.3  # flat within sampling noise
    assert np.median(disc_contrast(noise)) < 0.05


def test_a_bright_disc_has_contrast_and_blur_steepens_the_spectrum():
    rng = np.random.default_rng(1)
    y, x = np.mgrid[:32, :32] - 16
    blob = 2.0 * np.exp(-(x**2 + y**2) / (2 * 3.0**2))  # structure inside the disc
    images = rng.standard_normal((50, 32, 32)) + blob
    assert np.median(disc_contrast(images)) > 0.15
    sharp = radial_power_spectrum(rng.standard_normal((100, 32, 32)))[1]
    blurred_images = np.real(
        np.fft.ifft2(
            np.fft.fft2(rng.standard_normal((100, 32, 32)))
            * np.exp(
                -2
                * np.pi**2
                * 4
                * (np.fft.fftfreq(32)[:, None] ** 2 + np.fft.fftfreq(32)[None] ** 2)
            )
        )
    )
    blurred = radial_power_spectrum(blurred_images)[1]
    assert blurred[-1] < 1e-3 * blurred[0]
    assert spectrum_distance(sharp, blurred) > 1.0
    assert spectrum_distance(sharp, sharp) == 0.0


@pytest.fixture(scope="module")
def density():
    return prepare_map(generate_map("globular", 48, n_atoms=1500, seed=3), 32)


def test_default_config_keeps_the_old_simulator(density):
    """The realism options are off by default: the same seed gives the same images."""
    a = simulate_particles(density, SimulationConfig(n_particles=20), seed=5).images
    b = simulate_particles(
        density,
        SimulationConfig(n_particles=20, noise_exponent_range=(0, 0), blur_px_range=(0, 0)),
        seed=5,
    ).images
    np.testing.assert_array_equal(a, b)


def test_coloured_noise_and_blur_take_power_from_high_frequencies(density):
    white = SimulationConfig(n_particles=60, junk_fraction=0.0, snr=0.01)
    coloured = SimulationConfig(
        n_particles=60, junk_fraction=0.0, snr=0.01, noise_exponent_range=(2.0, 2.0)
    )
    blurred = SimulationConfig(n_particles=60, junk_fraction=0.0, snr=0.01, blur_px_range=(2, 2))
    spectra = {
        name: radial_power_spectrum(simulate_particles(density, c, seed=2).images)[1]
        for name, c in (("white", white), ("coloured", coloured), ("blurred", blurred))
    }
    high = slice(12, 16)  # 0.375 .. 0.5 cycles / px
    assert spectra["coloured"][high].sum() < 0.3 * spectra["white"][high].sum()
    assert spectra["blurred"][high].sum() < 0.01 * spectra["white"][high].sum()


def test_snr_range_spreads_per_particle_contrast(density):
    narrow = SimulationConfig(n_particles=200, junk_fraction=0.0, snr=0.3)
    wide = SimulationConfig(n_particles=200, junk_fraction=0.0, snr_range=(0.03, 3.0))
    assert wide.reference_snr == pytest.approx(0.3)
    c_narrow = disc_contrast(simulate_particles(density, narrow, seed=4).images)
    c_wide = disc_contrast(simulate_particles(density, wide, seed=4).images)
    spread = lambda c: np.percentile(c, 90) - np.percentile(c, 10)  # noqa: E731
    assert spread(c_wide) > 3 * spread(c_narrow)


@pytest.mark.parametrize(
    "bad",
    [
        {"snr_range": (0.5, 0.1)},
        {"snr_range": (0.0, 1.0)},
        {"noise_exponent_range": (2.0, 1.0)},
        {"blur_px_range": (-1.0, 1.0)},
        {"bfactor_a2": -5.0},
    ],
)
def test_bad_realism_settings_are_refused(bad):
    with pytest.raises(ValueError, match="bad|must be"):
        SimulationConfig(**bad)


def test_realistic_preset_is_valid_and_overridable():
    config = SimulationConfig.realistic(n_particles=7)
    assert config.n_particles == 7 and config.snr_range is not None
    assert config.noise_exponent_range[1] > 0 and config.blur_px_range[1] > 0


def test_fourier_resize_keeps_the_spectrum_below_the_smaller_nyquist():
    from particleseg_model.simulation.realism import fourier_resize

    rng = np.random.default_rng(3)
    images = rng.normal(size=(50, 96, 96))
    small = fourier_resize(images, 48)
    assert small.shape == (50, 48, 48) and small.dtype == np.float32
    # white noise stays white, and a low-frequency wave keeps its amplitude
    _, power = radial_power_spectrum(small)
    assert power.max() / power.min() < 2.0
    y, x = np.mgrid[:96, :96]
    wave = np.cos(2 * np.pi * 3 * x / 96)[None]
    np.testing.assert_allclose(fourier_resize(wave, 48)[0].std(), wave[0].std(), rtol=1e-3)
    np.testing.assert_allclose(fourier_resize(small, 48), small, atol=1e-6)


def test_compare_sets_and_the_figure(tmp_path):
    from particleseg_model.simulation.realism import compare_sets, realism_png

    rng = np.random.default_rng(4)
    y, x = np.mgrid[:80, :80] - 40
    disc = (np.hypot(x, y) < 15).astype(float)
    sets = {
        "real noise": rng.normal(size=(12, 80, 80)),
        "sim discs": disc[None] * 3 + rng.normal(size=(12, 80, 80)),
    }
    freq, spectra, contrasts, images = compare_sets(sets, size=64)
    assert images["real noise"].shape == (12, 64, 64) and len(freq) == 32
    assert np.median(contrasts["real noise"]) < 0.2 < 1.0 < np.median(contrasts["sim discs"])
    # a disc of 15 px puts power at low frequency
    assert spectra["sim discs"][:3].sum() > 3 * spectra["real noise"][:3].sum()
    png = realism_png(tmp_path / "realism.png", freq, spectra, contrasts, images)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_archive_realism_is_left_out_without_real_stacks(tmp_path):
    from particleseg_model.simulation.demo_archive import write_realism

    assert write_realism(tmp_path, None) is None
    assert write_realism(tmp_path, tmp_path / "no-shared") is None
    assert not list(tmp_path.rglob("realism.*"))
