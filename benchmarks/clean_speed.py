"""Cleaning speed end to end: ``particleseg clean`` on 20,000 particles, model load included,
the new pipeline beside the previous one on the same particles.

The stack: ``--n`` particles of box ``--box`` (simulated by ``SimulationConfig.realistic()``
from a generated map, 2,000 distinct images repeated: the content does not change the work),
one MRCS and a RELION 3.1 STAR. Each run is the same command (``particleseg clean STAR --out
... --drop 0.3 --no-progress``, the shipped pretrained model: no model registered) in a fresh
process, Python and library start-up and the model load included:

- ``reference``: the previous implementation (before issue 15's speed work), reproduced here
  (:func:`reference_patches`) and patched into the library in the child process: the resizes
  as matrix products (``resize_images``: OpenBLAS' threads), the plane removal through the
  background rows' pseudo-inverse (einsum), Keras ``predict_on_batch``, all three class maps
  resized back;
- ``new``: the command as it is (ONNX Runtime when the ``onnx`` extra is installed, its export
  cached by an earlier run; ``new_first_run`` is the run that exported it, with an empty cache);
- ``new_keras``: the command with ``PARTICLESEG_ENGINE=keras`` (what an install without the
  extra runs).

Printed: seconds, particles/s and CPU seconds of each (the child's user + system time: what
the work costs whatever else runs), the ratios to the reference, the load average before and
after each run (two shared cores: absolute times move with the other jobs, ratios much less),
the agreement of the score tables (new vs reference: signal and edge pixels, ETS, centred,
calibrated, kept set), the labels' pixel agreement on ``--label-sample`` particles, and a
per-stage CPU profile of both pipelines on ``--profile-n`` particles (in this process).

    .venv/bin/python benchmarks/clean_speed.py [--n 20000] [--box 128] [--work DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


# ------------------------------------------------------------------ the previous implementation


def reference_patches() -> dict[tuple[Any, str], Any]:
    """The pieces the speed work replaced, as they were, by (module, name) to patch into the
    library: whatever order ``predict`` resizes and normalises in, the reference runs the same
    pipeline with the previous pieces."""
    from particleseg_model.corpus.labels import resize_images
    from particleseg_model.model import inference, predict
    from particleseg_model.model.registry import load_model

    new_class_maps = predict._class_maps

    def _plane_removed(images, bg_radius_px):
        """The plane through the background rows' pseudo-inverse (einsum), the mean after."""
        data = np.asarray(images, dtype=np.float64)
        n, ny, nx = data.shape
        radius = predict.BG_RADIUS_FRACTION * nx if bg_radius_px is None else float(bg_radius_px)
        y, x = np.mgrid[:ny, :nx]
        y = (y - ny // 2).astype(np.float64).ravel()
        x = (x - nx // 2).astype(np.float64).ravel()
        background = (x**2 + y**2) > radius**2
        design = np.stack([x, y, np.ones_like(x)], axis=1)
        flat = data.reshape(n, -1)
        if n and background.sum() >= 3:
            pinv = np.linalg.pinv(design[background])
            coef = np.einsum("ij,kj->ik", flat[:, background], pinv)
            flat = flat - np.einsum("ik,jk->ij", coef, design)
        return flat - flat.mean(axis=1, keepdims=True)

    def _class_maps(model, images, *args, classes=None, **kwargs):
        """Every class map resized back, whichever one is used."""
        maps = new_class_maps(model, images, *args, **kwargs)
        return maps if classes is None else maps[:, classes : classes + 1]

    def predict_batch(model, images):
        return np.asarray(model.predict_on_batch(images), dtype=np.float32)

    def load_engine(version, *, engine=None, log=None):
        return load_model(version)  # the Keras model itself: predict_on_batch

    return {
        # the resizes as matrix products (OpenBLAS' threads), in both directions
        (predict, "resize_images_taps"): resize_images,
        (predict, "_plane_removed"): _plane_removed,
        (predict, "_class_maps"): _class_maps,
        (predict, "predict_batch"): predict_batch,
        (inference, "load_engine"): load_engine,
    }


@contextlib.contextmanager
def reference_installed() -> Iterator[None]:
    """The previous implementation patched into the library, then the new one back."""
    patches = reference_patches()
    saved = {key: getattr(*key) for key in patches}
    for (module, name), function in patches.items():
        setattr(module, name, function)
    try:
        yield
    finally:
        for (module, name), function in saved.items():
            setattr(module, name, function)


def reference_child(argv: list[str]) -> int:
    """``--reference-run``: ``particleseg clean`` with the previous implementation."""
    from particleseg_model.cli import main

    with reference_installed():
        return main(argv)


# ------------------------------------------------------------------------------ the runs


def load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def run_clean(star: Path, out: Path, models_root: Path, mode: str, cache: Path) -> dict:
    """One ``particleseg clean`` in a fresh process: wall and CPU seconds, loads before and
    after."""
    args = [
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
    env = dict(os.environ, PARTICLESEG_ONNX_CACHE=str(cache))
    env.pop("PARTICLESEG_ENGINE", None)
    if mode == "reference":
        command = [sys.executable, str(Path(__file__).resolve()), "--reference-run", *args]
    else:
        command = [str(REPO / ".venv" / "bin" / "particleseg"), *args]
        if mode == "new_keras":
            env["PARTICLESEG_ENGINE"] = "keras"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_before = load()
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"{mode}: particleseg clean failed: {result.stderr.strip()[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"s": seconds, "cpu_s": cpu, "load_before": load_before, "load_after": load()}


def agreement(new_scores: Path, reference_scores: Path) -> dict[str, float]:
    """How far the new score table is from the reference's (same particles, same order)."""
    import pandas as pd

    new, ref = pd.read_parquet(new_scores), pd.read_parquet(reference_scores)
    readable = ref["readable"].to_numpy(bool)
    out: dict[str, float] = {"particles": float(len(ref))}
    for column in ("signal_px", "edge_px"):
        a = new[column].to_numpy(float)[readable]
        b = ref[column].to_numpy(float)[readable]
        out[f"{column}_identical_share"] = float(np.mean(a == b))
        out[f"{column}_max_abs_diff"] = float(np.abs(a - b).max())
    for column in ("ets", "centred", "calibrated"):
        a = new[column].to_numpy(float)[readable]
        b = ref[column].to_numpy(float)[readable]
        both = np.isfinite(a) & np.isfinite(b)
        out[f"{column}_identical_share"] = float(np.mean((a == b) | (np.isnan(a) & np.isnan(b))))
        out[f"{column}_max_abs_diff"] = float(np.abs(a[both] - b[both]).max(initial=0.0))
    keep_new, keep_ref = new["keep"].to_numpy(bool), ref["keep"].to_numpy(bool)
    out["kept_reference"] = float(keep_ref.sum())
    out["kept_set_differences"] = float(np.sum(keep_new != keep_ref))
    return out


def label_agreement(star: Path, n: int, cache: Path) -> dict[str, float]:
    """Pixel agreement of the labels of the first ``n`` particles: new (default engine) vs the
    reference, by the same call as ``clean`` makes (one scale, from the same images)."""
    from particleseg_model.em.mrc import read_particles_table
    from particleseg_model.em.star import read_star
    from particleseg_model.model import inference, predict
    from particleseg_model.model.registry import resolve_model

    os.environ["PARTICLESEG_ONNX_CACHE"] = str(cache)
    version = resolve_model(None, star.parent / "no-models")
    particles = read_star(star).particles
    images = read_particles_table(particles.iloc[:n], base_dir=star.parent)

    def labels() -> tuple[np.ndarray, np.ndarray, str]:
        engine = inference.load_engine(version)
        if hasattr(predict, "model_input"):  # normalised at the model's size
            scale = predict.stack_scale(images, size=version.input_size)
            got = predict.predict_labels_and_centre(
                engine, images, edge_from_signal=True, scale=scale
            )
        else:  # normalised at the particles' box, then resized
            scaled = predict.normalise_for_model(images, scale=predict.stack_scale(images))
            got = predict.predict_labels_and_centre(engine, scaled, edge_from_signal=True)
        return got[0], got[1], getattr(engine, "name", "keras")

    new, new_centre, name = labels()
    with reference_installed():
        ref, ref_centre, _ = labels()
    return {
        "particles": float(n),
        "engine_onnx": 1.0 if name == "onnx" else 0.0,
        "pixel_identical_share": float(np.mean(new == ref)),
        "particles_all_pixels_identical_share": float(np.mean((new == ref).all(axis=(1, 2)))),
        "centred_max_abs_diff": float(np.abs(new_centre - ref_centre).max()),
    }


class StageTimer:
    """CPU and wall seconds summed per stage name: ``with timer("read"): ...``."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}
        self._stage = ""

    def __call__(self, stage: str) -> StageTimer:
        self._stage = stage
        return self

    def __enter__(self) -> None:
        self._t, self._c = time.perf_counter(), time.process_time()

    def __exit__(self, *exc: object) -> None:
        stage = self._stage
        self.wall[stage] = self.wall.get(stage, 0.0) + time.perf_counter() - self._t
        self.cpu[stage] = self.cpu.get(stage, 0.0) + time.process_time() - self._c


def stage_profile(star: Path, n: int, cache: Path) -> dict[str, dict[str, float]]:
    """CPU and wall seconds per stage of both pipelines on the first ``n`` particles, batches
    of 256 as ``clean`` reads them, the network in batches of 64 as ``predict`` calls it."""
    from particleseg_model.em.star import read_star
    from particleseg_model.model import inference
    from particleseg_model.model.registry import load_model, resolve_model

    os.environ["PARTICLESEG_ONNX_CACHE"] = str(cache)
    version = resolve_model(None, star.parent / "no-models")
    particles = read_star(star).particles.iloc[:n]
    new = _profile_pipeline(particles, star.parent, inference.load_engine(version), True)
    with reference_installed():
        reference = _profile_pipeline(particles, star.parent, load_model(version), False)
    return {"new": new, "reference": reference}


def _profile_pipeline(particles, base_dir: Path, engine: Any, new: bool) -> dict[str, float]:
    """One pipeline's stages, with whatever pieces ``predict`` holds now (the reference's
    when they are patched in)."""
    from particleseg_model.corpus.labels import EDGE, SIGNAL, labels_from_projection
    from particleseg_model.em.mrc import read_particles_table
    from particleseg_model.model import predict

    size = int(engine.input_shape[1])
    resize = predict.resize_images_taps  # resize_images while the reference is installed
    at_model_size = hasattr(predict, "model_input")  # the order predict normalises in
    network = f"network ({engine.name})" if new else "network (Keras predict_on_batch)"
    timer = StageTimer()
    for start in range(0, len(particles), 256):
        with timer("read"):
            images = read_particles_table(particles.iloc[start : start + 256], base_dir)
        with timer("finite check"):
            predict.finite_images(images)
        box = images.shape[1]
        disc = predict.central_disc(box)
        for s in range(0, len(images), 64):
            if at_model_size:
                with timer("resize to the model"):
                    small = resize(images[s : s + 64], size)
                with timer("normalise (plane, mean, scale)"):
                    x = predict.normalise_for_model(small, scale=1.0)
            else:
                with timer("normalise (plane, mean, scale)"):
                    big = predict.normalise_for_model(images[s : s + 64], scale=1.0)
                with timer("resize to the model"):
                    x = resize(big, size)
            with timer(network):
                probs = predict.predict_batch(engine, x[..., None])
            with timer("resize maps back to the box"):
                if new:  # the signal map only
                    signal = resize(np.ascontiguousarray(probs[..., 1]), box, "bilinear")
                else:  # all three, as before
                    maps = np.ascontiguousarray(probs.transpose(0, 3, 1, 2))
                    maps = resize(maps.reshape(-1, size, size), box, "bilinear")
                    signal = maps.reshape(len(probs), 3, box, box)[:, 1]
            with timer("centred score"):
                signal[:, disc].mean(axis=1)
            with timer("labels (threshold, 11x11 dilation)"):
                # the new code thresholds the map itself, the previous a uint8 copy of it
                cut = signal if new else (signal > 0.5).view(np.uint8)
                labels = labels_from_projection(cut, threshold=0.5, edge_px=11)
            with timer("counting"):
                np.count_nonzero(labels == SIGNAL, axis=(1, 2))
                np.count_nonzero(labels == EDGE, axis=(1, 2))
    figures = {f"cpu_s {k}": v for k, v in timer.cpu.items()}
    figures.update({f"wall_s {k}": v for k, v in timer.wall.items()})
    return figures


def print_profile(profiles: dict[str, dict[str, float]], n: int) -> None:
    for name, figures in profiles.items():
        cpu = {k.removeprefix("cpu_s "): v for k, v in figures.items() if k.startswith("cpu_s ")}
        total = sum(cpu.values())
        print(f"stage profile, {name} ({n} particles, CPU {1000 * total / n:.2f} ms/particle):")
        for stage, seconds in sorted(cpu.items(), key=lambda kv: -kv[1]):
            share = 100 * seconds / total
            print(f"  {stage:38s} {1000 * seconds / n:6.3f} ms/particle  {share:5.1f}%")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--reference-run"]:
        return reference_child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--work", type=Path, default=REPO / "data" / "bench" / "clean_speed")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "clean_speed.json")
    parser.add_argument("--label-sample", type=int, default=2000)
    parser.add_argument("--profile-n", type=int, default=2048)
    parser.add_argument(
        "--runs", default="reference,new_first_run,new,new_keras", help="which runs, in order"
    )
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    folder = args.work / f"stack_{args.n}_{args.box}"
    folder.mkdir(parents=True, exist_ok=True)
    star = write_stack(folder, args.n, args.box)
    empty = folder / "no-models"  # an empty registry: the shipped model is used
    empty.mkdir(exist_ok=True)
    cache = args.work / "onnx-cache"
    runs: dict[str, dict] = {}
    print(f"{args.n} particles, box {args.box}, {os.cpu_count()} CPUs; load average {load()}")
    for mode in args.runs.split(","):
        if mode == "new_first_run":
            for old in cache.glob("*.onnx"):
                old.unlink()
        out = args.work / f"cleaned_{mode}.star"
        figures = run_clean(star, out, empty, mode.removesuffix("_first_run"), cache)
        label = mode
        while label in runs:  # a run repeated: new, new_2, new_3, ...
            label = f"{mode}_{len([k for k in runs if k.startswith(mode)]) + 1}"
        runs[label] = figures
        print(
            f"{label:14s}: {figures['s']:6.1f} s, {args.n / figures['s']:5.0f} particles/s, "
            f"CPU {figures['cpu_s']:6.1f} s; load {figures['load_before']} -> "
            f"{figures['load_after']}",
            flush=True,
        )
    figures: dict[str, Any] = {"particles": args.n, "box_px": args.box, "cpus": os.cpu_count()}
    for mode, run in runs.items():
        figures[f"{mode}_s"] = round(run["s"], 1)
        figures[f"{mode}_particles_per_s"] = round(args.n / run["s"], 1)
        figures[f"{mode}_cpu_s"] = round(run["cpu_s"], 1)
        figures[f"{mode}_load_before"] = run["load_before"]
        figures[f"{mode}_load_after"] = run["load_after"]
    if "reference" in runs:
        for mode in runs:
            if mode == "reference":
                continue
            ratio = runs["reference"]["s"] / runs[mode]["s"]
            cpu_ratio = runs["reference"]["cpu_s"] / runs[mode]["cpu_s"]
            figures[f"speed_ratio_{mode}_over_reference"] = round(ratio, 2)
            figures[f"cpu_ratio_reference_over_{mode}"] = round(cpu_ratio, 2)
            print(
                f"{mode} is {ratio:.2f} x the reference's speed (wall), uses "
                f"1/{cpu_ratio:.2f} of its CPU"
            )
        if "new" in runs:
            agree = agreement(
                default_scores(args.work / "cleaned_new.star"),
                default_scores(args.work / "cleaned_reference.star"),
            )
            figures["agreement_new_vs_reference"] = agree
            print("score table, new vs reference:", agree)
    if args.label_sample:
        labels = label_agreement(star, min(args.label_sample, args.n), cache)
        figures["labels_new_vs_reference"] = labels
        print("labels, new vs reference:", labels)
    if args.profile_n:
        profile_n = min(args.profile_n, args.n)
        load_before = load()
        profiles = stage_profile(star, profile_n, cache)
        print_profile(profiles, profile_n)
        figures["stage_profile_particles"] = profile_n
        figures["stage_profile_load"] = f"{load_before} -> {load()}"
        figures["stage_profile"] = {
            name: {k: round(v, 3) for k, v in p.items()} for name, p in profiles.items()
        }
    write_results(args.json, "clean_speed", {k: str(v) for k, v in vars(args).items()}, figures)
    return 0


def default_scores(out: Path) -> Path:
    return out.with_name(f"{out.stem}_scores.parquet")


if __name__ == "__main__":
    raise SystemExit(main())
