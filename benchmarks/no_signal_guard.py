"""The cleaning's no-signal guard: "no signal because junk" against "the model does not see these".

``particleseg clean`` keeps every particle when its model finds signal in (almost) none of them
(:data:`particleseg_model.cleaning.clean.OOD_NO_SIGNAL_SHARE`) and warns, but cleans, when most
particles have no signal (:data:`~particleseg_model.cleaning.clean.NO_SIGNAL_WARN_SHARE`). This
script measures the share of particles without predicted signal that the rule has to tell apart,
with :func:`~particleseg_model.cleaning.clean.clean_star` itself (drop 30 %, its default score),
for each model given (``--models-root`` registries; ``--pretrained``: the model shipped in the
package):

- simulated sets the model sees (EMD-1832 at 64 px, ``../shared/data/maps``; a generated map
  without it), ``--particles`` each, at the paper's 24.57 % good and at 10 % and 5 % good (six
  junk kinds): the share without signal, the signal rate of good particles and of each junk
  kind, and whether the dropped particles are junk;
- sets a model cannot see: Gaussian noise of the first set's spread in the same stacks and
  STAR (every particle's image replaced), and the 17 real particles of
  ``../shared/data/particles/aspire_sample.mrcs`` (200 px, RELION 3.1 STAR).

The real EMPIAR-10017 boxes are ``benchmarks/real_particles.py``'s (its "signal (good)" and
"signal (junk)" columns).

    nice -n 10 .venv/bin/python benchmarks/no_signal_guard.py --models-root DIR [--pretrained]
        [--particles 2000] [--work DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from classify_2d import simulate  # noqa: E402

from particleseg_model.simulation.demo_archive import find_shared_data  # noqa: E402

GOOD_SHARES = (0.2457, 0.10, 0.05)


def noise_copy(data: Path, out: Path, seed: int = 0) -> Path:
    """The simulated set's STAR with every stack replaced by Gaussian noise of its spread."""
    import mrcfile

    if not out.exists():
        rng = np.random.default_rng(seed)
        (out / "Particles").mkdir(parents=True)
        for stack in sorted((data / "Particles").glob("*.mrcs")):
            with mrcfile.open(stack, permissive=True) as mrc:
                images = np.asarray(mrc.data, dtype=np.float32)
                voxel = float(mrc.voxel_size.x)
            noise = rng.normal(0, float(images.std()), images.shape).astype(np.float32)
            with mrcfile.new(out / "Particles" / stack.name) as mrc:
                mrc.set_data(noise)
                mrc.voxel_size = voxel
        shutil.copyfile(data / "particles.star", out / "particles.star")
    return out / "particles.star"


def aspire_copy(shared: Path, out: Path) -> Path:
    """The 17 real particles' RELION 3.1 STAR beside a link to their stack: the STAR names it
    ``sample.mrcs``, the shared folder holds it as ``aspire_sample.mrcs``."""
    if not out.exists():
        out.mkdir(parents=True)
        particles = shared / "particles"
        (out / "sample.mrcs").symlink_to((particles / "aspire_sample.mrcs").resolve())
        shutil.copyfile(particles / "aspire_sample_particles_relion31.star", out / "particles.star")
    return out / "particles.star"


def measure(
    name: str, star: Path, models: Path | None, model: str | None, work: Path
) -> dict[str, object]:
    """``clean_star`` (drop 30 %, its default score) of one set with one model: the no-signal
    figures."""
    from particleseg_model.cleaning.clean import clean_star

    lines: list[str] = []
    began = time.perf_counter()
    out = work / f"{name}.star"
    result = clean_star(
        star,
        out,
        model=model,
        models_root=models,
        drop=0.3,
        overwrite=True,
        progress=False,
        log=lines.append,
    )
    scores = pd.read_parquet(result.scores_path)
    record: dict[str, object] = {
        "set": name,
        "particles": result.total,
        "no_signal_share": round(result.no_signal_share, 4),
        "out_of_distribution": result.out_of_distribution,
        "kept": result.kept,
        "dropped": result.dropped,
        "line": next((line for line in lines if "no particle signal" in line), None),
        "seconds": round(time.perf_counter() - began, 1),
    }
    truth_csv = star.parent / "ground_truth.csv"
    if truth_csv.is_file() and "noise" not in name:
        truth = pd.read_csv(truth_csv).set_index("image_name").loc[scores["image_name"]]
        signal = (scores["signal_px"].fillna(0) > 0).to_numpy()
        kind = truth["junk_kind"].fillna("good").where(~truth["is_good"], "good").to_numpy()
        record["good_share"] = round(float(truth["is_good"].mean()), 4)
        record["signal_rate"] = {
            k: round(float(signal[kind == k].mean()), 4) for k in sorted(set(kind))
        }
        dropped = ~scores["keep"].to_numpy(dtype=bool)
        record["dropped_junk_share"] = (
            round(float((~truth["is_good"].to_numpy()[dropped]).mean()), 4)
            if dropped.any()
            else None
        )
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-root", action="append", default=[], help="a registry (repeat)")
    parser.add_argument("--pretrained", action="store_true", help="also the shipped model")
    parser.add_argument("--particles", type=int, default=2000)
    parser.add_argument("--work", default=None)
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="no-signal-"))
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"start {time.strftime('%H:%M:%S', time.gmtime())} UTC; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        flush=True,
    )
    sets: dict[str, Path] = {}
    for i, share in enumerate(GOOD_SHARES):
        data = simulate(
            work, args.particles, 64, seed=31 + i, junk=1 - share, name=f"sim_{share:.4f}"
        )
        sets[f"simulated, {share:.2%} good"] = data / "particles.star"
    first = next(iter(sets.values())).parent
    sets["Gaussian noise"] = noise_copy(first, work / "noise")
    shared = find_shared_data()
    if shared is not None:
        sets["17 real particles (aspire_sample)"] = aspire_copy(shared, work / "aspire")
    models: list[tuple[str, Path | None, str | None]] = [
        (str(root), Path(root), None) for root in args.models_root
    ]
    if args.pretrained:
        from particleseg_model.model.registry import resolve_model

        shipped = resolve_model(None, None)
        models.append((f"shipped {shipped.version}", None, str(shipped.path)))
    records = []
    for label, root, model in models:
        print(f"\nmodel {label}", flush=True)
        for i, (name, star) in enumerate(sets.items()):
            record = measure(f"m{len(records)}_{i}", star, root, model, work)
            record.update({"model": label, "set": name})
            records.append(record)
            rates = record.get("signal_rate", {})
            if record["out_of_distribution"]:
                outcome = "out of distribution: every particle kept"
            else:
                outcome = f"dropped {record['dropped']}"
                if record.get("dropped_junk_share") is not None:
                    outcome += f", {record['dropped_junk_share']:.1%} of them junk"
            print(
                f"  {name:<36} no signal {record['no_signal_share']:>7.1%}  {outcome}  "
                f"({record['seconds']:.0f} s, load {os.getloadavg()[0]:.1f})",
                flush=True,
            )
            if rates:
                print(
                    "      signal found in: " + ", ".join(f"{k} {v:.1%}" for k, v in rates.items()),
                    flush=True,
                )
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2, default=str) + "\n")
        print(f"\n{args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
