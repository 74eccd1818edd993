"""Realism: do simulated particles look like real ones, as the model sees them?

Real sets (``../shared/data``, read in place; see ``real/README.md``), every box normalised as
the corpus does and resized to the model's input (64 px):

- ``10017 good`` / ``10017 empty ice`` / ``10017 carbon``: boxes of EMPIAR-10017 as
  ``real_particles.py`` cuts them (CryoSegNet's *denoised* micrographs, binned 4 x 4);
- ``MicrographCleaner clean`` / ``contamination``: the 45 autopicks of its downsampled raw
  micrograph (box 46);
- ``ASPIRE raw``: the 17 raw particles of ``particles/aspire_sample.mrcs`` (200 px);
- ``10076 raw``: the 7 raw particles of EMPIAR-10076 (cryoDRGN's test data, 320 px).

Simulated sets: good particles of EMD-1832 at box 64 from the old simulator (SNR 0.1, white
noise: ``SimulationConfig()``), from the calibrated one (``SimulationConfig.realistic()``) and
composited on real particle-free boxes of EMPIAR-10017's even micrographs as the pretrained
model's corpus is (``simulation.composite``), and, for each real set, the closest single
setting on a grid of noise colour x blur x SNR (the evidence that the realistic ranges cover
it).

Printed and written (``docs/results/realism.json``, ``docs/realism.png``): per set the RMS
distance of its log10 power spectrum from each real set's (decades), the median and 10-90%
range of the disc contrast (an SNR estimate without ground truth), and the figure: spectra,
contrast histograms, galleries of real and simulated boxes side by side.

    .venv/bin/python benchmarks/realism.py [--png docs/realism.png] [--json ...] [--n 600]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import RESULTS_DIR, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIZE = 64  # the default model input


def real_sets(shared: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every real set, normalised, at :data:`SIZE` px (see the module doc)."""
    import mrcfile
    import real_particles as rp

    from particleseg_model.model.predict import model_input
    from particleseg_model.simulation.simulate import normalise_images

    root = shared / "real"
    part, _ = rp.build_10017(root, rng, log=lambda *a: None)
    mc, _ = rp.build_micrographcleaner(root)
    sets: dict[str, np.ndarray] = {}
    for labelled, names in (
        (part, {"good": "10017 good", "empty_ice": "10017 empty ice", "carbon": "10017 carbon"}),
        (mc, {"mc_clean": "MC clean", "mc_contamination": "MC contamination"}),
    ):
        kind = np.array(labelled.kind)
        for key, name in names.items():
            sets[name] = normalise_images(labelled.images(np.flatnonzero(kind == key)))[0]
    aspire = mrcfile.read(str(shared / "particles" / "aspire_sample.mrcs")).astype(np.float32)
    sets["ASPIRE raw"] = normalise_images(aspire)[0]
    # not contrast-inverted (real/README.md): particles dark, as recorded
    ribosome = mrcfile.read(str(root / "cryodrgn_empiar10076" / "empiar_10076_7.mrc"))
    sets["10076 raw"] = normalise_images(-np.asarray(ribosome, dtype=np.float32))[0]
    # as the model sees them: resized, then normalised at its size (predict.model_input)
    return {k: model_input(v, SIZE) for k, v in sets.items()}


def simulated(density: Any, config: Any, n: int, seed: int) -> np.ndarray:
    from particleseg_model.simulation.simulate import simulate_particles

    return simulate_particles(density, config, seed=seed, keep_clean=False).images


def composited(density: Any, shared: Path, n: int, seed: int) -> np.ndarray:
    """Good particles of ``density`` on real EMPIAR-10017 backgrounds, as the pretrained
    model's corpus composites them (``scripts/build_pretrained.py``: the even micrographs'
    particle-free boxes, the disc contrast of real picks, the denoiser's blur)."""
    import real_particles as rp

    from particleseg_model.corpus.labels import resize_images
    from particleseg_model.simulation.composite import background_pool, composite_on_backgrounds
    from particleseg_model.simulation.simulate import (
        SimulationConfig,
        normalise_images,
        simulate_particles,
    )

    config = SimulationConfig.realistic(n_particles=n, junk_fraction=0.0, normalise=False)
    sim = simulate_particles(density, config, seed=seed, keep_clean=True)
    assert sim.clean is not None
    boxes, _ = rp.free_boxes_10017(shared / "real")
    pool = background_pool(resize_images(boxes, SIZE))
    rng = np.random.default_rng(seed)
    contrast = np.exp(rng.uniform(np.log(0.15), np.log(2.0), n))
    images, _ = composite_on_backgrounds(
        sim.clean, pool, None, rng, contrast=contrast, blur_px=rng.uniform(0.5, 2.0, n)
    )
    return normalise_images(images)[0]


def grid_match(
    density: Any, target: np.ndarray, n: int, seed: int
) -> tuple[dict[str, float], float]:
    """The single (noise exponent, blur, SNR) of the grid whose spectrum is closest."""
    from particleseg_model.simulation.realism import radial_power_spectrum, spectrum_distance
    from particleseg_model.simulation.simulate import SimulationConfig

    best: tuple[dict[str, float], float] = ({}, np.inf)
    for exponent in (0.0, 1.0, 2.0, 3.0):
        for blur in (0.0, 1.0, 1.75, 2.5):
            for snr in (0.03, 0.3, 3.0):
                config = SimulationConfig(
                    n_particles=n,
                    junk_fraction=0.0,
                    snr=snr,
                    bfactor_a2=80.0,
                    ice_texture=0.5,
                    noise_exponent_range=(exponent, exponent),
                    blur_px_range=(blur, blur),
                )
                images = simulated(density, config, n, seed)
                d = spectrum_distance(radial_power_spectrum(images)[1], target)
                if d < best[1]:
                    best = ({"noise_exponent": exponent, "blur_px": blur, "snr": snr}, d)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--png", type=Path, default=REPO / "docs" / "realism.png")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "realism.json")
    parser.add_argument("--n", type=int, default=600, help="simulated particles per set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-grid", action="store_true", help="skip the per-set grid match")
    args = parser.parse_args(argv)

    from particleseg_model.em.maps import load_map, prepare_map
    from particleseg_model.simulation.demo_archive import find_shared_data
    from particleseg_model.simulation.realism import (
        disc_contrast,
        radial_power_spectrum,
        realism_png,
        spectrum_distance,
    )
    from particleseg_model.simulation.simulate import SimulationConfig

    shared = find_shared_data()
    if shared is None or not (shared / "real").is_dir():
        print("no real images: ../shared/data/real is missing", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    sets = real_sets(shared, rng)
    density = prepare_map(load_map(shared / "maps" / "emd_1832.map"), SIZE)
    sets["sim old (SNR 0.1, white)"] = simulated(
        density, SimulationConfig(n_particles=args.n, junk_fraction=0.0), args.n, args.seed
    )
    sets["sim realistic"] = simulated(
        density, SimulationConfig.realistic(n_particles=args.n, junk_fraction=0.0), args.n, 1
    )
    sets["sim on real 10017 ice"] = composited(density, shared, args.n, 2)
    spectra, contrast = {}, {}
    freq = np.zeros(0)
    for name, images in sets.items():
        freq, spectra[name] = radial_power_spectrum(images)
        contrast[name] = disc_contrast(images)
    real_names = [k for k in sets if not k.startswith("sim")]
    rows: dict[str, dict[str, Any]] = {}
    print(f"{'set':28s} {'n':>5s} {'contrast median [p10, p90]':>28s}  spectrum distance (decades)")
    for name in sets:
        c = contrast[name]
        rows[name] = {
            "n": len(sets[name]),
            "contrast_median": round(float(np.median(c)), 3),
            "contrast_p10": round(float(np.percentile(c, 10)), 3),
            "contrast_p90": round(float(np.percentile(c, 90)), 3),
            "distance_to": {
                r: round(spectrum_distance(spectra[name], spectra[r]), 3) for r in real_names
            },
        }
    for name in real_names:
        if not args.no_grid:
            match, d = grid_match(density, spectra[name], 200, args.seed)
            rows[name]["closest_setting"] = match
            rows[name]["closest_distance"] = round(d, 3)
    for name, row in rows.items():
        spread = (
            f"{row['contrast_median']:.2f} [{row['contrast_p10']:.2f}, {row['contrast_p90']:.2f}]"
        )
        print(f"{name:28s} {row['n']:5d} {spread:>28s}")
    print("spectrum distance (decades, RMS of log10 power) of each set from each real set:")
    print(f"{'':28s} " + " ".join(f"{r[:12]:>12s}" for r in real_names))
    for name, row in rows.items():
        print(f"{name:28s} " + " ".join(f"{row['distance_to'][r]:12.2f}" for r in real_names))
    if not args.no_grid:
        print("closest single setting of the grid (noise exponent, blur px, SNR) per real set:")
        for name in real_names:
            match, d = rows[name]["closest_setting"], rows[name]["closest_distance"]
            print(f"  {name:26s} {match}  {d:.2f}")
    gallery = {k: v[:8] for k, v in sets.items() if k not in ("MC contamination",)}
    realism_png(args.png, freq, spectra, contrast, gallery)
    write_results(
        args.json,
        "realism",
        {k: str(v) for k, v in vars(args).items()},
        {"sets": rows, "seconds": round(time.perf_counter() - t0, 1)},
    )
    print(f"wrote {args.json}, {args.png} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    raise SystemExit(main())
