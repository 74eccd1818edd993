"""The paper's experiment, simulated: 2D classification before and after cleaning.

The paper (EMPIAR-10406): a first RELION 2D classification put 83,319 of 339,043 particles in
good classes (24.57 %); dropping the 30 % with the lowest ETS and classifying the 237,331 left
with the same parameters put 115,458 there (48.65 %): x1.39 particles in good classes.

Here, end to end through the user's command:

1. a simulated particle entry at the paper's share of good particles (24.57 % good, 75.43 %
   junk of the six kinds: empty, ice, carbon edge, aggregate, off-centre, fragment) from
   EMD-1832 (``../shared/data/maps``; a generated map without it), ``--particles`` at
   ``--box`` px, SNR 0.1, ground truth per particle;
2. a model: ``--models-root`` (its latest version), ``--keras FILE`` (registered into a
   temporary registry), else the model ``particleseg clean`` finds by itself (the registry
   under ``$PARTICLESEG_DATA/models``, or the pretrained model shipped in the package), else,
   with ``--train`` (or when there is none), a small one trained here on a separate simulated
   entry of the same map (other particles, other seed; the corpus built by the platform's
   steps as ``benchmarks/model_quality.py`` does);
3. ``particleseg clean STAR --drop 0.3 --score ets`` as a process of its own (timed, peak
   memory; ``--reuse-scores`` reuses the one in ``--work``), then, for every RELION seed of
   ``--seeds``, :func:`particleseg_model.cleaning.compare.classify_before_after` (what
   ``particleseg clean --classify K`` runs): RELION 2D classifications (``relion_refine``,
   same parameters and seed) of all particles, of the kept ones and of a random drop of the
   same size, into ``--work``/``classify_seed<S>`` (a finished one with the same settings is
   reused, so ``--seeds 0 1`` after ``--seeds 0`` runs seed 1 only);
4. per condition and seed: the good-class share (a class is good when most of its particles
   are truly good; particles in good classes / particles), the good particles recovered in
   good classes, time and RELION's peak memory; the ratio of particles in good classes after
   / before (the paper's x1.39) for our cleaning and for the random drop; the galleries; and
   the spread of each figure over the seeds.

The defaults are the settings measured to make 10,000 particles affordable on 2 shared cores
(docs/classify_2d.md, "Settings, by measurement"): K=8, RELION's ``--fast_subsets`` (the first 5
iterations on 100 particles per class, the next 5 on 300 per class, the next 5 on at most 30 %
of the particles, then all) with 20 iterations (RELION's minimum with fast subsets), in-plane
sampling 20 degrees, offsets 4 px in steps of 2; no E-step resolution limit (25 A was no
faster at 64 px).

    nice -n 15 .venv/bin/python benchmarks/classify_2d.py [--particles 10000] [--box 64]
        [--classes 8] [--iterations 20] [--threads 2] [--score ets] [--drop 0.3]
        [--psi-step 20] [--offset-range 4] [--offset-step 2] [--no-fast-subsets]
        [--highres-limit A] [--seeds 0 1]
        [--models-root DIR | --keras FILE [--corpus DIR] | --train] [--work DIR]
        [--reuse-scores] [--docs]

``--docs`` copies the galleries to ``docs/classify_2d_galleries.png`` (seed 0) and
``docs/classify_2d_galleries_seed<S>.png`` and writes ``docs/results/classify_2d.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results import REPO, RESULTS_DIR, write_results  # noqa: E402

from particleseg_model.simulation.demo_archive import (  # noqa: E402
    find_shared_data,
    write_demo_archive,
)

GOOD_SHARE = 0.2457
PAPER = {"before": 83_319, "after": 115_458, "total_before": 339_043, "total_after": 237_331}


def simulate(work: Path, n: int, box: int, seed: int, junk: float, name: str) -> Path:
    """One simulated particle entry; returns its data folder (particles.star, ground truth)."""
    shared = find_shared_data()
    maps = [str(shared / "maps" / "emd_1832.map")] if shared else ["generated:globular"]
    archive = work / name
    if not archive.exists():
        began = time.perf_counter()
        write_demo_archive(
            archive,
            maps=maps,
            n_particles=n,
            box=box,
            junk_fraction=junk,
            micrograph_entries=0,
            relion30_entries=(),
            seed=seed,
            progress=False,
        )
        print(
            f"simulated {n} particles at {box} px from {Path(maps[0]).name} in "
            f"{time.perf_counter() - began:.0f} s: {archive}",
            flush=True,
        )
    return archive / "archive" / "30001" / "data"


def train_model(work: Path, box: int, n: int, epochs: int) -> Path:
    """A small model trained on a separate simulated entry; returns its registry."""
    from model_quality import build_partition

    from particleseg_model.access.server import serve
    from particleseg_model.model.train import TrainConfig
    from particleseg_model.model.versions import train_and_register

    models = work / "models"
    if models.exists():
        return models
    began = time.perf_counter()
    data = simulate(work, n, box, seed=7, junk=0.3, name="training_archive")
    archive = data.parents[2]
    corpus_data = work / "training_data"
    with serve(archive) as server:
        build_partition(server, "30001", corpus_data)
    outcome = train_and_register(
        corpus_data / "corpus",
        models,
        TrainConfig(size=64, base_filters=16, epochs=epochs),
        partitions=["30001"],
        log=lambda line: print(f"    {line}", flush=True),
    )
    print(
        f"trained {outcome.version.version} ({outcome.metrics}) "
        f"on {n} simulated particles (30% junk, seed 7) in "
        f"{time.perf_counter() - began:.0f} s: {models}",
        flush=True,
    )
    return models


def model_root(args: argparse.Namespace, work: Path) -> Path | None:
    """The registry to clean with (None: let ``particleseg clean`` find its default)."""
    if args.keras:
        from particleseg_model.model.versions import register_keras

        root = work / "models_keras"
        if not root.exists():
            register_keras(root, Path(args.keras), corpus_root=args.corpus)
        return root
    if args.models_root:
        return Path(args.models_root)
    if not args.train:
        from particleseg_model.model.registry import resolve_model

        try:
            version = resolve_model(None, None)
            print(f"model: {version.version} ({version.path})", flush=True)
            return None
        except (FileNotFoundError, ValueError) as exc:
            print(f"no model found ({exc}); training one", flush=True)
    return train_model(work, args.box, args.train_particles, args.epochs)


def run_clean(
    star: Path, work: Path, models: Path | None, args: argparse.Namespace
) -> tuple[float, float]:
    """``particleseg clean`` as a process of its own: (seconds, peak RSS in MiB)."""
    out = work / "cleaned.star"
    command = [
        str(Path(sys.executable).parent / "particleseg"),
        "clean",
        str(star),
        "--out",
        str(out),
        "--drop",
        str(args.drop),
        "--score",
        args.score,
        "--overwrite",
        "--no-progress",
    ]
    if models is not None:
        command += ["--models-root", str(models)]
    print("$ " + " ".join(command), flush=True)
    began = time.perf_counter()
    proc = subprocess.Popen(command)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - began
    if proc.returncode:
        raise SystemExit(f"particleseg clean failed (exit {proc.returncode})")
    return seconds, usage.ru_maxrss / 1024


def same_settings(recorded: dict, settings: dict, seed: int) -> bool:
    """Whether a finished run's recorded settings are ``settings`` with RELION seed ``seed``."""
    return all(recorded.get(k) == v for k, v in settings.items()) and recorded.get("seed") == seed


def stamped_log(prefix: str, *words: str):
    """A log callback printing, with the UTC time and the load average, the lines that hold
    one of ``words`` (RELION's progress lines are many; these say where a run is)."""

    def log(line: str) -> None:
        if any(word in line for word in words):
            print(
                f"[{time.strftime('%H:%M:%S', time.gmtime())} UTC, load "
                f"{os.getloadavg()[0]:.1f}] {prefix}: {line}",
                flush=True,
            )

    return log


def classify_seed(
    star: Path,
    keep: np.ndarray,
    out: Path,
    seed: int,
    settings: dict,
    args: argparse.Namespace,
) -> tuple[dict, float, bool]:
    """One RELION seed's three classifications (before, after, random drop) into ``out``:
    (the summary record, seconds, reused). A finished folder with the same settings, particles
    and keep mask is reused (``--seeds 0 1`` after ``--seeds 0`` runs seed 1 only)."""
    from particleseg_model.cleaning.compare import classify_before_after

    summary = out / "summary.json"
    if summary.is_file():
        record = json.loads(summary.read_text())
        kept = next(c["particles"] for c in record["conditions"] if c["condition"] == "after")
        same = same_settings(record["settings"], settings, seed)
        same = same and record["settings"].get("iterations") == args.iterations
        same = same and kept == int(keep.sum())
        same = same and record["conditions"][0]["classes"] == args.classes
        if same:
            print(f"seed {seed}: reusing {out}", flush=True)
            return record, float(sum(c["seconds"] for c in record["conditions"])), True
    began = time.perf_counter()
    classify_before_after(
        star,
        keep,
        out,
        classes=args.classes,
        iterations=args.iterations,
        threads=args.threads,
        seed=seed,
        settings=settings,
        overwrite=True,
        log=stamped_log(f"seed {seed}", "done", "2D"),
    )
    return json.loads(summary.read_text()), time.perf_counter() - began, False


def classify_extra(
    star: Path,
    keep: np.ndarray,
    out: Path,
    seed: int,
    settings: dict,
    args: argparse.Namespace,
) -> dict:
    """One more subset classified as the three conditions are (same settings and seed) into
    ``out``: its ``classify.json`` summary (a finished one with the same settings, seed and
    particles is reused)."""
    from particleseg_model.em.star import read_star, write_star_as_read
    from particleseg_model.relion.classify import classify_2d

    record_path = out / "classify.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        same = same_settings(record["settings"], settings, seed)
        same = same and record["iterations"] == args.iterations
        same = same and record["particles"] == int(keep.sum()) and record["classes"] == args.classes
        if same:
            print(f"seed {seed}: reusing {out}", flush=True)
            return record
    subset = out.with_name(f"subset_{out.name.rsplit('_seed', 1)[0].removeprefix('extra_')}.star")
    write_star_as_read(subset, read_star(star), keep)
    classify_2d(
        subset,
        out,
        classes=args.classes,
        iterations=args.iterations,
        threads=args.threads,
        seed=seed,
        truth=star.parent / "ground_truth.csv",
        particles_dir=star.parent,
        overwrite=True,
        settings=settings,
        progress=False,
        log=stamped_log(f"seed {seed}, {out.name}", "done"),
    )
    return json.loads(record_path.read_text())


def extra_row(name: str, record: dict) -> dict:
    """A summary table row (as ``classify_before_after``'s) from a ``classify.json``."""
    return {
        "condition": name,
        "particles": record["particles"],
        "classes": record["classes"],
        "largest_class_share": round(record["largest_class_share"], 4),
        "seconds": record["seconds"],
        "relion_peak_rss_mb": record["relion_peak_rss_mb"],
        "good_share_in": round(record["good_particles"] / record["particles"], 4),
        "good_classes": len(record["good_classes"]),
        "particles_in_good_classes": record["particles_in_good_classes"],
        "good_class_share": round(record["good_class_share"], 4),
        "good_in_good_classes": record["good_in_good_classes"],
        "good_recovered": round(record["good_recovered"], 4),
    }


def panel(heading: str, folder: Path) -> tuple[str, np.ndarray, list[str]]:
    """A gallery panel from a classification folder: every class average, largest first."""
    from particleseg_model.em.mrc import read_map
    from particleseg_model.relion.classify import class_labels

    table = pd.read_csv(folder / "classes.csv")
    averages, _ = read_map(folder / "class_averages.mrcs")
    averages = averages.reshape(-1, averages.shape[-2], averages.shape[-1])
    in_good = int(table.loc[table["good"] > table["particles"] / 2, "particles"].sum())
    return (
        f"{heading}: {int(table['particles'].sum())} particles\n{in_good} in good classes",
        averages[table["class"].to_numpy() - 1],
        class_labels(table, with_class=False),
    )


def print_seed(record: dict, seed: int, args: argparse.Namespace) -> None:
    table = pd.DataFrame(record["conditions"]).set_index("condition")
    print(
        f"\nRELION seed {seed}: 2D classification, K={args.classes}, {args.iterations} "
        f"iterations, {record['settings']}"
    )
    print(
        f"  {'condition':<15}{'particles':>10}{'good in':>9}{'good cls':>9}{'in good cls':>12}"
        f"{'share':>8}{'good recovered':>16}{'largest':>9}{'time s':>8}{'RSS MiB':>9}"
    )
    for name, row in table.iterrows():
        print(
            f"  {name:<15}{int(row['particles']):>10}{row['good_share_in']:>9.2%}"
            f"{int(row['good_classes']):>9}{int(row['particles_in_good_classes']):>12}"
            f"{row['good_class_share']:>8.2%}"
            f"{int(row['good_in_good_classes']):>8} ({row['good_recovered']:.1%})"
            f"{row['largest_class_share']:>9.2%}{row['seconds']:>8.0f}"
            f"{row['relion_peak_rss_mb']:>9.0f}"
        )
    counts = table["particles_in_good_classes"].astype(int).to_dict()
    before = counts.pop("before")
    paper_ratio = PAPER["after"] / PAPER["before"]
    print(
        "  particles in good classes: "
        + "; ".join(
            f"{name} {before} -> {count}"
            + (f" (x{count / before:.2f})" if before else " (ratio undefined: none before)")
            for name, count in counts.items()
        )
        + f"; paper x{paper_ratio:.2f} ({PAPER['before']:,} -> {PAPER['after']:,})",
        flush=True,
    )


def spread(records: dict[int, dict]) -> dict[str, dict[str, list]]:
    """Per condition and figure, the values of every seed (seed order)."""
    out: dict[str, dict[str, list]] = {}
    for record in records.values():
        for row in record["conditions"]:
            into = out.setdefault(row["condition"], {})
            for key in ("particles_in_good_classes", "good_class_share", "good_recovered",
                        "largest_class_share", "seconds"):  # fmt: skip
                into.setdefault(key, []).append(row[key])
        for name, ratio in record["ratio_particles_in_good_classes"].items():
            value = None if ratio != ratio else round(ratio, 4)  # NaN: undefined (0 before)
            out.setdefault(name, {}).setdefault("ratio_after_before", []).append(value)
    return out


def main() -> int:  # noqa: C901 - one straight benchmark script
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=10_000)
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--psi-step", type=float, default=20.0, help="degrees (RELION's GUI: 12)")
    parser.add_argument("--offset-range", type=float, default=4.0, help="pixels (GUI: 5)")
    parser.add_argument("--offset-step", type=float, default=2.0, help="pixels")
    parser.add_argument(
        "--fast-subsets",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="RELION's --fast_subsets (subsets of the data in the first 15 iterations)",
    )
    parser.add_argument(
        "--highres-limit",
        type=float,
        default=0.0,
        help="RELION's --strict_highres_exp, Angstrom (0: none; 25 measured no faster)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="RELION seeds")
    parser.add_argument("--drop", type=float, default=0.3)
    parser.add_argument(
        "--extra-drop",
        type=float,
        default=None,
        help="also classify our cleaning at this drop and a random drop of as many (per seed)",
    )
    parser.add_argument("--score", default="ets", choices=["ets", "calibrated", "centred"])
    parser.add_argument("--models-root", default=None)
    parser.add_argument("--keras", default=None)
    parser.add_argument("--corpus", default=None, help="with --keras: its training corpus")
    parser.add_argument("--train", action="store_true", help="train a small model here")
    parser.add_argument("--train-particles", type=int, default=1500)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--work", default=None, help="keep everything here (reused)")
    parser.add_argument(
        "--reuse-scores", action="store_true", help="reuse --work's cleaning (scores) if there"
    )
    parser.add_argument("--docs", action="store_true", help="write docs/ figures and JSON")
    args = parser.parse_args()

    started = time.perf_counter()
    began_utc = time.strftime("%H:%M:%S", time.gmtime())
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="classify-2d-"))
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"start {began_utc} UTC; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        flush=True,
    )
    data = simulate(work, args.particles, args.box, seed=23, junk=1 - GOOD_SHARE, name="archive")
    star = data / "particles.star"
    truth = pd.read_csv(data / "ground_truth.csv")
    good = truth["is_good"].to_numpy(dtype=bool)
    print(
        f"{len(truth)} particles: {good.mean():.2%} good, junk "
        f"{truth.loc[~good, 'junk_kind'].value_counts().to_dict()}",
        flush=True,
    )
    scores_path = work / "cleaned_scores.parquet"
    clean_record = work / "clean.json"
    if args.reuse_scores and scores_path.is_file() and clean_record.is_file():
        seconds, peak_mb = json.loads(clean_record.read_text())["figures"]
        print(f"reusing the cleaning in {work} ({seconds:.0f} s, {peak_mb:.0f} MiB then)")
    else:
        models = model_root(args, work)
        seconds, peak_mb = run_clean(star, work, models, args)
        clean_record.write_text(json.dumps({"figures": [seconds, peak_mb]}))
    scores = pd.read_parquet(scores_path)
    if len(scores) != len(truth):
        raise SystemExit(f"{scores_path} has {len(scores)} rows for {len(truth)} particles")
    keep = scores["keep"].to_numpy(dtype=bool)
    no_signal = float((scores["signal_px"] == 0).mean())
    print(
        f"cleaning: {seconds:.0f} s ({len(keep) / seconds:.0f} particles/s end to end), peak "
        f"RSS {peak_mb:.0f} MiB; kept {int(keep.sum())} of {len(keep)}; no signal in "
        f"{no_signal:.1%}",
        flush=True,
    )
    guard = bool(keep.all() and args.drop > 0)
    if guard:
        # The command kept every particle: its model found signal in (almost) none of them
        # (out of distribution). The experiment still needs a drop: taken from the same score
        # table by the library's rule, and said so.
        from particleseg_model.cleaning.clean import select_particles

        keep = select_particles(scores, score=args.score, drop=args.drop)
        print(
            f"the command kept every particle (out-of-distribution guard: no signal in "
            f"{no_signal:.1%}); dropping the lowest {args.drop:.0%} of the same scores "
            f"(select_particles): {int(keep.sum())} kept",
            flush=True,
        )
    dropped_junk = float((~good[~keep]).mean()) if (~keep).any() else float("nan")
    print(
        f"cleaning ({args.score}, drop {args.drop:.0%}): good share {good.mean():.2%} -> "
        f"{good[keep].mean():.2%}; {dropped_junk:.2%} of the dropped are junk",
        flush=True,
    )
    settings = {
        "psi_step_deg": args.psi_step,
        "offset_range_px": args.offset_range,
        "offset_step_px": args.offset_step,
        "fast_subsets": args.fast_subsets,
        "highres_limit_a": args.highres_limit or None,
    }
    records: dict[int, dict] = {}
    classify_s = 0.0
    for seed in args.seeds:
        folder = work / f"classify_seed{seed}"
        record, took, _ = classify_seed(star, keep, folder, seed, settings, args)
        records[seed] = record
        classify_s += took
        print_seed(record, seed, args)
    extra: dict[int, list[dict]] = {}
    if args.extra_drop is not None:
        from particleseg_model.cleaning.clean import select_particles
        from particleseg_model.cleaning.compare import random_keep
        from particleseg_model.figures import galleries_side_by_side

        pct = round(100 * args.extra_drop)
        keep_x = select_particles(scores, score=args.score, drop=args.extra_drop)
        random_x = random_keep(len(keep_x), int(keep_x.sum()), seed=0)
        print(
            f"\nour cleaning at drop {args.extra_drop:.0%}: {int(keep_x.sum())} kept, good share "
            f"{good[keep_x].mean():.2%}; a random drop of as many: {good[random_x].mean():.2%}",
            flush=True,
        )
        for seed in args.seeds:
            rows = [
                extra_row(f"after_drop{pct}", classify_extra(
                    star, keep_x, work / f"extra_drop{pct}_seed{seed}", seed, settings, args)),
                extra_row(f"random_drop{pct}", classify_extra(
                    star, random_x, work / f"extra_random{pct}_seed{seed}", seed, settings, args)),
            ]  # fmt: skip
            extra[seed] = rows
            galleries_side_by_side(
                work / f"galleries_drop{pct}_seed{seed}.png",
                [
                    panel("before", work / f"classify_seed{seed}" / "before"),
                    panel(f"after our cleaning, drop {pct}%", work / f"extra_drop{pct}_seed{seed}"),
                    panel(f"random drop {pct}%", work / f"extra_random{pct}_seed{seed}"),
                ],
            )
            print_seed(
                {**records[seed], "conditions": [records[seed]["conditions"][0], *rows]},
                seed,
                args,
            )
    figures = spread(records)
    print("\nover the seeds " + ", ".join(map(str, args.seeds)) + ":")
    for name, values in figures.items():
        shown = {k: v for k, v in values.items() if k != "seconds"}
        print(f"  {name:<12} {shown}")
    print(
        f"\ncleaning {seconds:.0f} s (peak RSS {peak_mb:.0f} MiB), the classifications "
        f"{classify_s:.0f} s; benchmark {time.perf_counter() - started:.0f} s, finished "
        f"{time.strftime('%H:%M:%S', time.gmtime())} UTC, load average "
        f"{os.getloadavg()[0]:.1f}",
        flush=True,
    )
    if args.docs:
        docs = REPO / "docs"
        for seed in args.seeds:
            suffix = "" if seed == 0 else f"_seed{seed}"
            shutil.copyfile(
                work / f"classify_seed{seed}" / "galleries.png",
                docs / f"classify_2d_galleries{suffix}.png",
            )
            if args.extra_drop is not None:
                shutil.copyfile(
                    work / f"galleries_drop{round(100 * args.extra_drop)}_seed{seed}.png",
                    docs / f"classify_2d_galleries_drop{round(100 * args.extra_drop)}{suffix}.png",
                )
        paper_ratio = PAPER["after"] / PAPER["before"]
        write_results(
            RESULTS_DIR / "classify_2d.json",
            "classify_2d",
            {
                **vars(args),
                "command": " ".join(["benchmarks/classify_2d.py", *sys.argv[1:]]),
                "started": f"{began_utc} UTC",
            },
            {
                "particles": int(len(truth)),
                "good_share": round(float(good.mean()), 4),
                "good_share_after_cleaning": round(float(good[keep].mean()), 4),
                "dropped_junk_share": round(dropped_junk, 4),
                "no_signal_share": round(no_signal, 4),
                "ood_guard_kept_all": guard,
                "settings": records[args.seeds[0]]["settings"],
                "seeds": {
                    str(seed): {
                        "conditions": record["conditions"],
                        # undefined (no particle in a good class before) as null, not NaN
                        "ratio_after_before": {
                            k: (None if v != v else round(v, 4))
                            for k, v in record["ratio_particles_in_good_classes"].items()
                        },
                    }
                    for seed, record in records.items()
                },
                "spread_over_seeds": figures,
                "extra_drop": (
                    {
                        "drop": args.extra_drop,
                        "good_share_after_cleaning": round(float(good[keep_x].mean()), 4),
                        "good_share_after_random_drop": round(float(good[random_x].mean()), 4),
                        "seeds": {str(seed): rows for seed, rows in extra.items()},
                    }
                    if args.extra_drop is not None
                    else None
                ),
                "paper_ratio": round(paper_ratio, 4),
                "clean_s": round(seconds, 1),
                "clean_peak_rss_mb": round(peak_mb, 1),
                "classify_s": round(classify_s, 1),
                "load_average_1min": os.getloadavg()[0],
            },
        )
        print(f"docs: {docs / 'classify_2d_galleries*.png'}, {RESULTS_DIR / 'classify_2d.json'}")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
