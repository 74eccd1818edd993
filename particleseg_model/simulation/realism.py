"""How real does a simulated particle look? Statistics that compare image sets.

Every function takes a stack ``(n, S, S)`` of particle boxes *as the model sees them*: after
the corpus normalisation (background to mean 0, std 1) and resized to one common size, so that
sets of different boxes and pixel sizes compare frequency for frequency at the model's input.

- :func:`radial_power_spectrum`: the radially averaged power spectrum, mean over the stack,
  normalised to unit total power (the *shape* of the spectrum: the colour of the noise, the
  CTF envelope, blur from binning or denoising), in cycles per pixel (0 .. 0.5);
- :func:`disc_contrast`: per box, the variance inside the particle's disc over the variance of
  the background ring, minus one: an SNR estimate that needs no ground truth (0 for pure
  noise; the spread of per-particle SNR is its distribution over a stack);
- :func:`spectrum_distance`: RMS difference of two log10 spectra (decades), the number that
  says how far a simulated set is from a real one.
"""

from __future__ import annotations

import numpy as np


def radial_power_spectrum(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectrum of a stack, mean over images, unit total power.

    Args:
        images: ``(n, S, S)`` float boxes (normalised as the corpus does).

    Returns:
        ``(frequency, power)``: one shell per Fourier pixel, ``k / S`` cycles per pixel for
        ``k = 1 .. S // 2`` (DC excluded), and the mean power per shell, scaled so that the
        shells sum to 1.
    """
    data = np.asarray(images, dtype=np.float64)
    if data.ndim != 3 or data.shape[1] != data.shape[2]:
        raise ValueError(f"images must be a stack of square boxes (n, S, S), got {data.shape}")
    size = data.shape[-1]
    centred = data - data.mean(axis=(1, 2), keepdims=True)
    power = (np.abs(np.fft.rfft2(centred)) ** 2).mean(axis=0)
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    # shell k holds the Fourier pixels at radius k +- 0.5 (in units of 1 / S), k = 1 .. S // 2
    shell = np.rint(np.hypot(fx, fy) * size).astype(np.int64)
    n_shells = size // 2
    inside = (shell >= 1) & (shell <= n_shells)
    sums = np.bincount(shell[inside], weights=power[inside], minlength=n_shells + 1)[1:]
    counts = np.bincount(shell[inside], minlength=n_shells + 1)[1:]
    mean = sums / np.maximum(counts, 1)
    total = mean.sum()
    return np.arange(1, n_shells + 1) / size, mean / (total if total > 0 else 1.0)


def disc_contrast(
    images: np.ndarray, disc_fraction: float = 0.25, ring_fraction: float = 0.375
) -> np.ndarray:
    """Per-box SNR estimate: ``var(disc) / var(background) - 1``, clipped at 0.

    The disc has radius ``disc_fraction * S`` (the particle's radius when it spans half the
    box, the corpus' convention); the background is beyond ``ring_fraction * S`` (RELION's
    background radius). Pure noise gives about 0; a particle of SNR ``s`` (signal variance over
    noise variance inside the disc) gives about ``s``.
    """
    data = np.asarray(images, dtype=np.float64)
    size = data.shape[-1]
    y, x = np.mgrid[:size, :size] - size // 2
    r = np.hypot(x, y)
    disc = r <= disc_fraction * size
    ring = r > ring_fraction * size
    background = data[:, ring].var(axis=1)
    inner = data[:, disc].var(axis=1)
    return np.clip(inner / np.where(background > 0, background, 1.0) - 1.0, 0.0, None)


def spectrum_distance(power_a: np.ndarray, power_b: np.ndarray, floor: float = 1e-6) -> float:
    """RMS difference of two normalised spectra in decades (log10), over the common shells."""
    a = np.log10(np.maximum(np.asarray(power_a, dtype=np.float64), floor))
    b = np.log10(np.maximum(np.asarray(power_b, dtype=np.float64), floor))
    return float(np.sqrt(np.mean((a - b) ** 2)))
