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
  says how far a simulated set is from a real one;
- :func:`compare_sets` computes both for named sets of any boxes (Fourier-resized to one size,
  :func:`fourier_resize`), and :func:`realism_png` draws them: spectra, contrast histograms and
  galleries side by side (``benchmarks/realism.py``'s figure, and each simulated entry's
  ``realism.png`` in the demo archive).
"""

from __future__ import annotations

from pathlib import Path

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


def fourier_resize(images: np.ndarray, size: int) -> np.ndarray:
    """``(n, S, S)`` boxes to ``(n, size, size)`` by cropping (or zero-padding) their Fourier
    transforms: the spectrum is kept exactly up to the smaller Nyquist, which is what a
    comparison of spectra needs (float64 in, float32 out)."""
    data = np.asarray(images, dtype=np.float64)
    box = data.shape[-1]
    if box == size:
        return data.astype(np.float32)
    spectrum = np.fft.fftshift(np.fft.fft2(data), axes=(-2, -1))
    out = np.zeros(data.shape[:-2] + (size, size), dtype=complex)
    keep = min(box, size)
    src = slice(box // 2 - keep // 2, box // 2 - keep // 2 + keep)
    dst = slice(size // 2 - keep // 2, size // 2 - keep // 2 + keep)
    out[..., dst, dst] = spectrum[..., src, src]
    resized = np.fft.ifft2(np.fft.ifftshift(out, axes=(-2, -1))).real * (size / box) ** 2
    return resized.astype(np.float32)


def compare_sets(
    sets: dict[str, np.ndarray], size: int = 64
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Spectra and contrasts of named sets, each box resized to ``size``
    (:func:`fourier_resize`) and normalised to mean 0, spread 1.

    Returns
    -------
    (frequency, spectra, contrasts, images)
        The shells' frequencies (cycles per pixel at ``size``), per set its
        :func:`radial_power_spectrum`, its :func:`disc_contrast` per box, and the resized boxes.
    """
    spectra, contrasts, images = {}, {}, {}
    freq = np.zeros(0)
    for name, stack in sets.items():
        boxes = fourier_resize(stack, size)
        boxes = boxes - boxes.mean(axis=(1, 2), keepdims=True)
        boxes = boxes / np.maximum(boxes.std(axis=(1, 2), keepdims=True), 1e-12)
        freq, spectra[name] = radial_power_spectrum(boxes)
        contrasts[name] = disc_contrast(boxes)
        images[name] = boxes
    return freq, spectra, contrasts, images


def realism_png(
    path: str | Path,
    freq: np.ndarray,
    spectra: dict[str, np.ndarray],
    contrasts: dict[str, np.ndarray],
    images: dict[str, np.ndarray],
    *,
    title: str = "real vs simulated particles, as the model sees them (normalised, 64 px)",
) -> Path:
    """The realism figure: spectra (simulated sets, named ``sim...``, dashed), contrast
    histograms, and up to 8 boxes of each set in ``images`` in a row of its own."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from particleseg_model.figures import _save_figure

    names = list(images)
    figure = plt.figure(figsize=(13, 5.2 + 0.9 * len(names)))
    grid = figure.add_gridspec(2 + len(names), 8, height_ratios=[4, 0.4] + [1] * len(names))
    ax = figure.add_subplot(grid[0, :4])
    for name, power in spectra.items():
        ax.semilogy(freq, power, "--" if name.startswith("sim") else "-", label=name)
    ax.set_xlabel("frequency (cycles / px at the 64 px model input)")
    ax.set_ylabel("power (normalised)")
    ax.set_title("radially averaged power spectra")
    ax.legend(fontsize=7, ncol=2)
    ax = figure.add_subplot(grid[0, 4:])
    bins = [float(edge) for edge in np.linspace(0, 3, 31)]
    for name, values in contrasts.items():
        style = "--" if name.startswith("sim") else "-"
        ax.hist(
            np.clip(values, 0, 3), bins=bins, histtype="step", density=True, ls=style, label=name
        )
    ax.set_xlabel("disc contrast: var(disc) / var(background) - 1 (an SNR estimate)")
    ax.set_title("spread of per-particle contrast")
    ax.legend(fontsize=7, ncol=2)
    for row, name in enumerate(names):
        stack = images[name]
        for col in range(min(8, len(stack))):
            axis = figure.add_subplot(grid[2 + row, col])
            axis.imshow(stack[col], cmap="gray")
            axis.set_xticks([])
            axis.set_yticks([])
            if col == 0:
                axis.set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    figure.suptitle(title)
    out = _save_figure(
        figure,
        Path(path),
        {"Title": "particleSeg realism", "Description": "real vs simulated spectra and galleries"},
    )
    plt.close(figure)
    return out
