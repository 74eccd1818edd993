"""Cleaning speed end to end: ``particleseg clean`` on 20,000 particles, model load included.

The stack: ``--n`` particles of box ``--box`` (simulated by ``SimulationConfig.realistic()``
from a generated map, 2,000 distinct images repeated: the content does not change the work),
one MRCS and a RELION 3.1 STAR. Each model runs the same command (``particleseg clean STAR
--out ... --drop 0.3 --no-progress`` in a fresh process: Python and TensorFlow start-up and
the model load count) side by side:

- ``pretrained``: the model shipped in the package (the default when no model is registered);
- ``reference``: the previous default network (the paper's custom U-Net, input 64, base 16;
  random weights: the speed is the architecture's), registered in a temporary registry.

Printed: seconds and particles/s of each, and the ratio pretrained / reference.

    .venv/bin/python benchmarks/clean_speed.py [--n 20000] [--box 128] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import RESULTS_DIR, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DISTINCT = 2000


def write_stack(work: Path, n: int, box: int) -> Path:
    import mrcfile

    from particleseg_model.em.maps import generate_map, prepare_map
    from particleseg_model.simulation.demo_archive import write_star
    from particleseg_model.simulation.simulate import SimulationConfig, simulate_particles

    star = work / "particles.star"
    if star.is_file():
        return star
    density = prepare_map(generate_map("globular", box, n_atoms=4000, seed=7), box)
    sim = simulate_particles(
        density, SimulationConfig.realistic(n_particles=DISTINCT), seed=3, keep_clean=False
    )
    reps = -(-n // DISTINCT)
    (work / "Particles").mkdir(parents=True, exist_ok=True)
    stack = work / "Particles" / "particles.mrcs"
    with mrcfile.new_mmap(str(stack), shape=(n, box, box), mrc_mode=2, overwrite=True) as mrc:
        for r in range(reps):
            start, stop = r * DISTINCT, min(n, (r + 1) * DISTINCT)
            mrc.data[start:stop] = sim.images[: stop - start]
        mrc.voxel_size = sim.pixel_size_a
    rows = sim.star.iloc[np.arange(n) % DISTINCT].reset_index(drop=True)
    rows["rlnImageName"] = [f"{i + 1:06d}@Particles/particles.mrcs" for i in range(n)]
    write_star(star, {"optics": sim.optics, "particles": rows})
    return star


def reference_registry(work: Path) -> Path:
    from particleseg_model.model.unet import build_unet
    from particleseg_model.model.versions import register_keras

    root = work / "reference-models"
    if (root / "LATEST").is_file():
        return root
    keras_file = work / "custom_64_16.keras"
    build_unet("custom", size=64, base_filters=16).save(keras_file)
    register_keras(root, keras_file, arch="custom")
    return root


def run_clean(star: Path, out: Path, models_root: Path) -> float:
    command = [
        str(REPO / ".venv" / "bin" / "particleseg"),
        "clean",
        str(star),
        "--out",
        str(out),
        "--drop",
        "0.3",
        "--models-root",
        str(models_root),
        "--overwrite",
        "--no-progress",
    ]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"particleseg clean failed: {result.stderr.strip()[-2000:]}")
    print(result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--work", type=Path, default=REPO / "data" / "bench" / "clean_speed")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "clean_speed.json")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    star = write_stack(args.work / f"stack_{args.n}_{args.box}", args.n, args.box)
    empty = args.work / "no-models"  # an empty registry: the shipped model is used
    reference = reference_registry(args.work)
    times = {}
    for name, root in (("pretrained", empty), ("reference", reference)):
        times[name] = run_clean(star, args.work / f"cleaned_{name}.star", root)
        print(f"{name:10s}: {times[name]:.1f} s, {args.n / times[name]:.0f} particles/s")
    ratio = times["reference"] / times["pretrained"]
    print(f"pretrained is {ratio:.2f} x the reference's speed ({args.n} particles, box {args.box})")
    figures = {
        "particles": args.n,
        "box_px": args.box,
        **{f"{k}_s": round(v, 1) for k, v in times.items()},
        **{f"{k}_particles_per_s": round(args.n / v, 1) for k, v in times.items()},
        "speed_ratio_pretrained_over_reference": round(ratio, 2),
        "cpus": os.cpu_count(),
    }
    write_results(args.json, "clean_speed", {k: str(v) for k, v in vars(args).items()}, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
