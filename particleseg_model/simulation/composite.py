"""Simulated particles on real backgrounds: the ice, carbon and noise of real micrographs.

A simulator's noise is a model of the world; a box cut from a real micrograph where no particle
was picked is the world itself (its ice texture, carbon, contamination, detector and, for a
denoised micrograph, the denoiser). :func:`composite_on_backgrounds` adds noise-free simulated
projections (CTF applied, the junk kinds included) onto such boxes, so a network trained on them
sees real texture both with and without a particle, and cannot learn "real texture means
background" (which a corpus of simulated particles beside real negatives teaches it:
docs/pretrained.md). The label of a composited particle is that of its projection, as for any
simulated particle.

Units: ``clean`` in the simulation's units (``SimulatedParticles.clean`` before
normalisation), ``noise_sigma`` in the same units: each background is scaled to spread 1 first,
so a particle's SNR is ``var(clean) / noise_sigma**2``, the simulator's definition.
"""

from __future__ import annotations

import numpy as np
from scipy import fft as sfft

from particleseg_model.em.geometry import half_transform_freqs
from particleseg_model.simulation.simulate import normalise_images

__all__ = ["background_pool", "blur_images", "composite_on_backgrounds", "disc_variance"]


def background_pool(boxes: np.ndarray) -> np.ndarray:
    """Real particle-free boxes ready for :func:`composite_on_backgrounds`.

    Parameters
    ----------
    boxes
        ``(m, S, S)`` boxes cut from micrographs away from every particle, in any units and
        either contrast (the caller inverts them so that particles would be bright).

    Returns
    -------
    numpy.ndarray
        ``(m', S, S)`` float32: each box with its background plane and mean removed (RELION's
        normalisation, :func:`~particleseg_model.simulation.simulate.normalise_images`), then
        mean 0 and spread 1 over the whole box; boxes without contrast or with a non-finite
        pixel are left out (``m' <= m``).
    """
    data = np.asarray(boxes, dtype=np.float32)
    if data.ndim != 3 or data.shape[1] != data.shape[2]:
        raise ValueError(f"background boxes must be (m, S, S) squares, got {data.shape}")
    finite = np.isfinite(data).all(axis=(1, 2))
    data = data[finite]
    if not len(data):
        return data
    normalised = normalise_images(data)[0]
    normalised -= normalised.mean(axis=(1, 2), keepdims=True)
    spread = normalised.std(axis=(1, 2))
    keep = spread > 1e-6
    return (normalised[keep] / spread[keep, None, None]).astype(np.float32)


def blur_images(images: np.ndarray, sigma_px: np.ndarray) -> np.ndarray:
    """Each image under a Gaussian blur of its own sigma (px; 0: unchanged), in Fourier space."""
    box = images.shape[-1]
    fy, fx = half_transform_freqs((box, box))
    gain = np.exp(-2 * np.pi**2 * sigma_px[:, None, None] ** 2 * (fx**2 + fy**2)[None])
    spectrum = sfft.rfft2(images) * gain
    return sfft.irfft2(spectrum, s=(box, box)).astype(np.float32)


def disc_variance(images: np.ndarray) -> np.ndarray:
    """``(n,)`` variance inside the central disc (radius box / 4: the particle's, when the box
    is twice the particle) of each image. Of a noise-free particle to be put on a background of
    spread 1, it is the contrast the composite will have,
    :func:`particleseg_model.simulation.realism.disc_contrast` (``var(disc) / var(background)
    - 1``), which ``benchmarks/realism.py`` measures on real picks."""
    box = images.shape[-1]
    y, x = np.mgrid[:box, :box] - box // 2
    disc = np.hypot(x, y) <= box / 4
    return images[:, disc].var(axis=1)


def composite_on_backgrounds(
    clean: np.ndarray,
    pool: np.ndarray,
    noise_sigma: np.ndarray | float | None,
    rng: np.random.Generator,
    *,
    contrast: np.ndarray | None = None,
    blur_px: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free simulated images on real backgrounds drawn from ``pool``.

    Parameters
    ----------
    clean
        ``(n, S, S)`` noise-free images (projections with their CTF, junk included) in the
        simulation's units.
    pool
        ``(m, S, S)`` backgrounds from :func:`background_pool` (spread 1), at the same box ``S``.
    noise_sigma
        The noise level per image (``(n,)`` or one value), in ``clean``'s units: the chosen
        background is multiplied by it. ``var(clean_i) / noise_sigma_i**2`` is the SNR. None
        with ``contrast``.
    contrast
        Instead of ``noise_sigma``: ``(n,)`` the particle's contrast against its background,
        the disc variance (:func:`disc_variance`) over the background's, which sets each
        background's level. Real backgrounds are not white: a denoised micrograph keeps its
        power at the particle's own scale, where a whole-box SNR says little about what can be
        seen, while the disc contrast of real picks is measured (``benchmarks/realism.py``).
    rng
        Draws the background of each image and one of the 8 symmetries of the square for it
        (so a pool of a few hundred boxes gives thousands of distinct backgrounds).
    blur_px
        Optional ``(n,)`` Gaussian blur (sigma, px) of each clean image before it is added: a
        background cut from a denoised or heavily filtered micrograph carries that filter's
        blur, and a particle on it must too.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        ``(n, S, S)`` float32 images (not normalised: normalise as the corpus does) and the
        ``(n,)`` index into ``pool`` of each image's background.
    """
    data = np.asarray(clean, dtype=np.float32)
    backgrounds = np.asarray(pool, dtype=np.float32)
    if data.ndim != 3 or backgrounds.ndim != 3 or data.shape[1:] != backgrounds.shape[1:]:
        raise ValueError(
            f"clean images {data.shape} and backgrounds {backgrounds.shape} must be (n, S, S) "
            "and (m, S, S) of one box"
        )
    if not len(backgrounds):
        raise ValueError("the background pool is empty")
    n = len(data)
    if blur_px is not None:
        blur = np.asarray(blur_px, dtype=np.float64)
        if blur.shape != (n,) or np.any(blur < 0):
            raise ValueError(f"blur_px must be ({n},) and >= 0, got {blur.shape}")
        if blur.any():
            data = blur_images(data, blur)
    if (noise_sigma is None) == (contrast is None):
        raise ValueError("give exactly one of noise_sigma and contrast")
    if contrast is not None:
        wanted = np.asarray(contrast, dtype=np.float64)
        if wanted.shape != (n,) or not np.all(np.isfinite(wanted) & (wanted > 0)):
            raise ValueError(f"contrast must be ({n},) positive values")
        sigma = np.sqrt(disc_variance(data) / wanted).astype(np.float32)
    else:
        sigma = np.broadcast_to(np.asarray(noise_sigma, dtype=np.float32), (n,))
    if not np.all(np.isfinite(sigma) & (sigma >= 0)):
        raise ValueError("noise levels must be finite and >= 0")
    index = rng.integers(0, len(backgrounds), n)
    turns = rng.integers(0, 4, n)
    mirror = rng.random(n) < 0.5
    out = np.empty_like(data)
    for i in range(n):
        background = np.rot90(backgrounds[index[i]], int(turns[i]))
        if mirror[i]:
            background = background[:, ::-1]
        out[i] = data[i] + sigma[i] * background
    return out, index
