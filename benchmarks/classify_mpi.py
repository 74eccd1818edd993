"""RELION 2D classification on 2 cores: one process with 2 threads against MPI (3 ranks x 1
thread), the same particles, classes and seed, alternating (a, b, a, b) to even out the load.

    nice -n 10 .venv/bin/python benchmarks/classify_mpi.py STAR [--particles 300] [--classes 4]
        [--iterations 3] [--work DIR]

The first ``--particles`` rows of STAR are classified; the class sizes are printed too (the
same seed gives the same classes either way).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from particleseg_model.em.star import read_star, write_star_as_read
from particleseg_model.relion.classify import classify_2d


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("star")
    parser.add_argument("--particles", type=int, default=300)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="classify-mpi-"))
    work.mkdir(parents=True, exist_ok=True)
    star = read_star(args.star)
    keep = np.zeros(len(star.particles), bool)
    keep[: args.particles] = True
    subset = write_star_as_read(Path(args.star).with_name("classify_mpi_subset.star"), star, keep)
    runs = (("2 threads", {"threads": 2}), ("MPI 3 x 1", {"threads": 1, "mpi": 3})) * 2
    for label, options in runs:
        began = time.perf_counter()
        result = classify_2d(
            subset,
            work / label.replace(" ", "_"),
            classes=args.classes,
            iterations=args.iterations,
            overwrite=True,
            progress=False,
            truth=np.zeros(int(keep.sum()), bool),
            **options,
        )
        print(
            f"{label:<10} {time.perf_counter() - began:6.1f} s  classes "
            f"{result.classes['particles'].tolist()}",
            flush=True,
        )
    subset.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
