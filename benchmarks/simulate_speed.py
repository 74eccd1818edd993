"""Simulated particles per second: our in-process simulator against ``relion_project``.

Both make the same particles from the same map, poses and CTF parameters, side by side in one
run (box 128 by default):

- projection only: ``FourierProjector.project`` vs ``relion_project --ang``;
- full particles (projection, CTF, noise): ``simulate_particles`` (which also adds the ice
  texture and normalises like RELION extraction) vs ``relion_project --ang --ctf --add_noise
  --white_noise S``, which also writes its stack to disk (ours keeps it in memory).

Set-up (the 3D FFT of the 2x padded map for ours, reading the map and its FFT for RELION) is
included in every figure, as a user would pay it once per map; ours is also shown without it.
It also checks that both projections agree (correlation of the noiseless images).

    .venv/bin/python benchmarks/simulate_speed.py [--box 128] [--particles 500] [--map FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mrcfile
import numpy as np

from particleseg_model.em.geometry import random_euler
from particleseg_model.em.maps import generate_map, load_map, prepare_map
from particleseg_model.simulation.demo_archive import write_star
from particleseg_model.simulation.simulate import (
    FourierProjector,
    SimulationConfig,
    ctf_2d,
    simulate_particles,
)


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--particles", type=int, default=500)
    parser.add_argument(
        "--map", type=Path, default=None, help="map file (default: a generated pseudo-atomic map)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="best of N timings")
    args = parser.parse_args()
    box, n = args.box, args.particles

    density = (
        prepare_map(load_map(args.map), box) if args.map else generate_map("globular", box, seed=0)
    )
    pixel = density.pixel_size_a
    rng = np.random.default_rng(0)
    rot, tilt, psi = random_euler(rng, n)
    origin = rng.normal(0, 2.0, (n, 2))
    du = rng.uniform(8000, 25000, n)
    dv = du - rng.uniform(0, 800, n)
    dang = rng.uniform(0, 180, n)
    cores = os.cpu_count()
    print(
        f"box {box}, {n} particles, pixel {pixel:.3f} A, {cores} CPU cores, "
        f"map {args.map or 'generated globular'}"
    )

    # --- ours
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        projector, setup = timed(FourierProjector, density.data)
        ours, t_proj = timed(projector.project, rot, tilt, psi, origin[:, 0], origin[:, 1])
        ctf = ctf_2d(box, pixel, du, dv, dang)
        _, t_ctf = timed(projector.project, rot, tilt, psi, origin[:, 0], origin[:, 1], ctf)
        config = SimulationConfig(n_particles=n, junk_fraction=0.0, snr=0.1)
        _, t_full = timed(simulate_particles, density, config, seed=0, keep_clean=False)
        for key, value in (
            ("setup", setup),
            ("proj", t_proj),
            ("proj_ctf", t_ctf),
            ("full", t_full),
        ):
            best[key] = min(best.get(key, np.inf), value)

    # --- relion_project
    relion = shutil.which("relion_project")
    rel: dict[str, float] = {}
    agreement = None
    if relion:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            with mrcfile.new(work / "map.mrc") as mrc:
                mrc.set_data(density.data)
                mrc.voxel_size = pixel
            import pandas as pd

            particles = pd.DataFrame(
                {
                    "rlnImageName": [f"{i + 1}@dummy.mrcs" for i in range(n)],
                    "rlnAngleRot": rot,
                    "rlnAngleTilt": tilt,
                    "rlnAnglePsi": psi,
                    "rlnOriginXAngst": origin[:, 0] * pixel,
                    "rlnOriginYAngst": origin[:, 1] * pixel,
                    "rlnDefocusU": du,
                    "rlnDefocusV": dv,
                    "rlnDefocusAngle": dang,
                    "rlnOpticsGroup": np.ones(n, dtype=np.int64),
                }
            )
            optics = SimulationConfig().optics(pixel, box)
            write_star(work / "poses.star", {"optics": optics, "particles": particles})
            base = [relion, "--i", "map.mrc", "--ang", "poses.star"]
            runs = {
                "proj": base + ["--o", "plain"],
                "full": base + ["--o", "noisy", "--ctf", "--add_noise", "--white_noise", "1.0"],
            }
            for _ in range(args.repeats):
                for key, command in runs.items():
                    _, seconds = timed(
                        subprocess.run, command, cwd=work, check=True, capture_output=True
                    )
                    rel[key] = min(rel.get(key, np.inf), seconds)
            with mrcfile.open(work / "plain.mrcs") as mrc:
                reference = np.asarray(mrc.data, dtype=np.float64)
            corr = [
                np.corrcoef(a.ravel(), b.ravel())[0, 1]
                for a, b in zip(ours, reference, strict=True)
            ]
            agreement = float(np.min(corr))

    def rate(seconds: float) -> str:
        return f"{n / seconds:9.0f} /s ({seconds:6.3f} s)"

    print(f"{'':34s}{'ours':>24s}{'relion_project':>28s}{'ratio':>8s}")
    print(f"{'set-up (3D FFT of padded map)':34s}{best['setup']:21.3f} s")
    rows = [
        ("projection (incl. set-up)", best["setup"] + best["proj"], rel.get("proj")),
        ("projection (after set-up)", best["proj"], None),
        ("projection + CTF (after set-up)", best["proj_ctf"], None),
        ("particles: proj+CTF+noise (full)", best["full"], rel.get("full")),
    ]
    for label, ours_s, rel_s in rows:
        line = f"{label:34s}{rate(ours_s):>24s}"
        if rel_s is not None:
            line += f"{rate(rel_s):>28s}{rel_s / ours_s:7.1f}x"
        print(line)
    if not relion:
        print("relion_project not found: RELION columns skipped")
    if agreement is not None:
        print(f"noiseless projections, ours vs relion_project: min correlation {agreement:.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
