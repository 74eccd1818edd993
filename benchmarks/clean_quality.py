"""Cleaning a particle set: does dropping the lowest scores drop the junk, and how fast is it?

1. a simulated particle entry at the paper's share of good particles (24.57% good, 75.43% junk
   of the six kinds), from EMD-1832 (``../shared/data/maps``; a generated map without it), with
   ground truth per particle; box 128, SNR 0.1;
2. the model: the latest registered one under ``--models-root`` (default
   ``$PARTICLESEG_DATA/models``, what ``make demo`` trained), or ``--keras FILE`` registered
   into a temporary registry; it never saw these particles;
3. ``particleseg_model.cleaning.clean.clean_star`` end to end (read, segment, score, write the
cleaned
   STAR, the score table and the report) once per score, timed;
4. against baselines computed on the same particles: random, the variance of the image in the
   central disc, and a template-matching figure of merit in the manner of ``relion_autopick``
   (normalised cross-correlation with CTF-multiplied projections of the map at 100 random
   orientations, the best over references and shifts of up to 4 px);
5. for every score: ROC AUC for good vs junk, and dropping the lowest 30%: the share of good
   particles before and after and the precision of the dropped set (the fraction that is
   junk; the ideal drops only junk and keeps 24.57 / 70 = 35.1% good).

    .venv/bin/python benchmarks/clean_quality.py [--particles 2000] [--keras FILE
        --corpus DIR | --models-root DIR | --model DIR] [--map FILE] [--references 100]
        [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from particleseg_model.simulation.demo_archive import find_shared_data, write_demo_archive

GOOD_SHARE = 0.2457
DROP = 0.3
PAPER_PARTICLES = 339_043


def auc(score: np.ndarray, good: np.ndarray) -> float:
    """P(a good particle scores above a junk one), ties counted half (Mann-Whitney)."""
    s = np.where(np.isfinite(score), score, -np.inf)
    ranks = pd.Series(s).rank(method="average").to_numpy()
    n_good, n_junk = int(good.sum()), int((~good).sum())
    return float((ranks[good].sum() - n_good * (n_good + 1) / 2) / (n_good * n_junk))


def drop_lowest(score: np.ndarray, fraction: float) -> np.ndarray:
    """Keep mask: the lowest ``floor(fraction * n)`` scores dropped (ties by row)."""
    s = np.where(np.isfinite(score), score, -np.inf)
    order = np.lexsort((np.arange(len(s)), s))
    keep = np.ones(len(s), dtype=bool)
    keep[order[: int(fraction * len(s))]] = False
    return keep


def central_variance(images: np.ndarray) -> np.ndarray:
    box = images.shape[-1]
    yy, xx = np.mgrid[:box, :box] - box // 2
    disc = np.hypot(yy, xx) <= box / 3
    return images[:, disc].var(axis=1)


def template_fom(
    images: np.ndarray,
    table: pd.DataFrame,
    map_path: Path,
    pixel_size_a: float,
    n_refs: int,
    max_shift_px: int = 4,
    batch: int = 64,
) -> np.ndarray:
    """Best normalised cross-correlation of each particle with CTF-multiplied projections of
    the map (relion_autopick's figure of merit, without its micrograph search)."""
    import scipy.fft as sfft

    from particleseg_model.em.maps import load_map
    from particleseg_model.simulation.simulate import FourierProjector, ctf_2d, random_euler

    density = load_map(map_path)
    rng = np.random.default_rng(1)
    rot, tilt, psi = random_euler(rng, n_refs)
    refs = FourierProjector(density.data).project(rot, tilt, psi)
    refs -= refs.mean(axis=(1, 2), keepdims=True)
    ref_ft = np.conj(sfft.rfft2(refs, workers=2))
    box = images.shape[-1]
    shifts = np.r_[0 : max_shift_px + 1, box - max_shift_px : box]
    fom = np.empty(len(images))
    for start in range(0, len(images), batch):
        part = images[start : start + batch].astype(np.float32)
        rows = table.iloc[start : start + batch]
        ctf = ctf_2d(
            box,
            pixel_size_a,
            rows["defocus_u_a"].to_numpy(),
            rows["defocus_v_a"].to_numpy(),
            rows["defocus_angle_deg"].to_numpy(),
        )
        part_ft = sfft.rfft2(part - part.mean(axis=(1, 2), keepdims=True), workers=2)
        # CTF-multiplied references: corr(p, ctf * r) = ifft(P conj(ctf R)), ctf real
        weighted = part_ft * ctf
        ref_norm = np.sqrt((np.abs(ref_ft[None] * ctf[:, None]) ** 2).sum(axis=(2, 3)))
        part_norm = np.sqrt((np.abs(part_ft) ** 2).sum(axis=(1, 2)))
        for i in range(len(part)):
            corr = sfft.irfft2(weighted[i][None] * ref_ft, s=(box, box), workers=2)
            window = corr[:, shifts][:, :, shifts].max(axis=(1, 2)) * box * box
            fom[start + i] = float((window / (ref_norm[i] * part_norm[i])).max())
    return fom


def registry_for(keras_file: Path, work: Path, corpus: Path | None) -> Path:
    """A temporary registry holding ``keras_file`` as v0001, calibrated on the validation
    split of the corpus it was trained on (``register_keras``: as ``train_and_register``)."""
    from particleseg_model.model.versions import register_keras

    root = work / "models"
    if root.exists():
        shutil.rmtree(root)
    register_keras(root, keras_file, corpus_root=corpus)
    return root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=2000)
    parser.add_argument("--keras", default=None, help="a .keras model to use (else the registry)")
    parser.add_argument(
        "--corpus",
        default=None,
        help="with --keras: the corpus it was trained on (for the calibration)",
    )
    parser.add_argument("--models-root", default=None)
    parser.add_argument(
        "--model",
        default=None,
        help="a model version folder, e.g. particleseg_model/pretrained (the shipped model)",
    )
    parser.add_argument(
        "--map",
        default=None,
        help="the map of the particles (default EMD-1832 of ../shared, else a generated one); "
        "EMD-5625 is the one the shipped model never saw",
    )
    parser.add_argument("--references", type=int, default=100)
    parser.add_argument("--work", default=None)
    args = parser.parse_args()

    from particleseg_model.cleaning.clean import clean_star
    from particleseg_model.em.mrc import read_particles_table
    from particleseg_model.em.star import read_star
    from particleseg_model.model.registry import latest_model

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="clean-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    from particleseg_model.model.registry import resolve_model

    if args.model:
        models = Path(args.model)
    elif args.keras:
        models = registry_for(Path(args.keras), work, Path(args.corpus) if args.corpus else None)
    else:
        models = Path(
            args.models_root or Path(os.environ.get("PARTICLESEG_DATA", "data")) / "models"
        )
    version = resolve_model(models) if args.model else latest_model(models)
    if version is None:
        raise SystemExit(f"no model under {models}: run make demo, or give --keras")
    shared = find_shared_data()
    if args.map:
        maps = [args.map]
    else:
        maps = [str(shared / "maps" / "emd_1832.map")] if shared else ["generated:globular"]
    archive = work / "archive"
    if not archive.exists():
        write_demo_archive(
            archive,
            maps=maps,
            n_particles=args.particles,
            box=128,
            junk_fraction=1 - GOOD_SHARE,
            micrograph_entries=0,
            seed=23,
            progress=False,
        )
    data = archive / "archive" / "30001" / "data"
    star_path = data / "particles.star"
    star = read_star(star_path)
    # ground truth in STAR row order
    truth = (
        pd.read_csv(data / "ground_truth.csv")
        .set_index("image_name")
        .loc[star.particles["image_name"]]
        .reset_index()
    )
    good = truth["is_good"].to_numpy(dtype=bool)
    print(
        f"{len(truth)} particles from {Path(maps[0]).name}: {good.mean():.2%} good, junk "
        f"{truth.loc[~good, 'junk_kind'].value_counts().to_dict()}"
    )
    print(
        f"model {version.version} ({version.input_size} px) from {models}; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )

    scores: dict[str, np.ndarray] = {}
    timing: dict[str, float] = {}
    for score in ("centred", "ets", "calibrated"):
        out = work / f"cleaned_{score}.star"
        for stale in (out, work / f"cleaned_{score}_scores.parquet"):
            stale.unlink(missing_ok=True)
        result = clean_star(
            star_path,
            out,
            **({"model": models} if args.model else {"models_root": models}),
            drop=DROP,
            score=score,
            report_dir=work / f"report_{score}",
            progress=False,
        )
        table = pd.read_parquet(result.scores_path)
        scores[score] = table[score].to_numpy(dtype=float)
        timing[score] = result.particles_per_s
        print(
            f"clean_star --score {score}: {result.total} -> {result.kept} particles in "
            f"{result.seconds:.1f} s ({result.particles_per_s:.0f} particles/s end to end); "
            f"report {work / f'report_{score}'}"
        )

    began = time.perf_counter()
    images = read_particles_table(star.particles, base_dir=star_path.parent)
    scores["image variance"] = central_variance(images)
    variance_s = time.perf_counter() - began
    began = time.perf_counter()
    # the map as the archive's EMDB layout holds it: at the particles' box and pixel size
    map_path = next(archive.rglob("map/emd_*.map*"))
    scores["template FOM"] = template_fom(
        images,
        star.particles,
        map_path,
        float(star.particles["pixel_size_a"].iloc[0]),
        args.references,
    )
    fom_s = time.perf_counter() - began
    scores["random"] = np.random.default_rng(0).random(len(good))

    print(
        f"\ndrop the lowest {DROP:.0%} ({int(DROP * len(good))} of {len(good)}); good share "
        f"before {good.mean():.2%}, ideal after {min(1.0, good.mean() / (1 - DROP)):.2%}"
    )
    print(f"  {'score':<16}{'ROC AUC':>9}{'good after':>12}{'dropped junk':>14}")
    for name, value in scores.items():
        keep = drop_lowest(value, DROP)
        print(
            f"  {name:<16}{auc(value, good):>9.3f}{good[keep].mean():>12.2%}"
            f"{(~good[~keep]).mean():>14.2%}"
        )
    rate = timing["ets"]
    print(
        f"\nthroughput: {rate:.0f} particles/s end to end (ets), {timing['calibrated']:.0f} "
        f"(calibrated), {timing['centred']:.0f} (centred); {PAPER_PARTICLES:,} particles "
        f"(EMPIAR-10406) in "
        f"{PAPER_PARTICLES / rate / 60:.0f} min; baselines: image variance "
        f"{len(good) / variance_s:.0f} particles/s, template FOM ({args.references} "
        f"references) {len(good) / fom_s:.0f} particles/s"
    )
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
