"""Build the pretrained model shipped in the package (``make pretrained``).

The recipe (every input's provenance and licence goes into the manifest and ``LICENSE.md``):

1. **Maps** of many sizes, shapes and symmetries, each prepared to box 64 with the particle
   spanning 35-70% of the box:

   - EMD-1832 from ``../shared/data/maps`` where present (CC0);
   - real atomic models (PDB entries, CC0) that a PyPI package ships: the test structures of
     ``mdanalysistests`` (its source distribution, downloaded once with ``pip download``),
     alone or as symmetric assemblies (C<n>, D<n>, T, O) built from one chain
     (:mod:`particleseg_model.em.structures`, ``gemmi`` reads them: the ``pretrained`` extra);
   - generated pseudo-atomic maps (globular, elongated, ring) last.

   EMD-5625 (or, without ``../shared``, a generated map of a seed never trained on) is held
   out: the unseen map of the IoU figure.
2. **Particles**: per map, ``--particles`` from ``SimulationConfig.realistic()`` (SNR spread
   over 1.7 decades, coloured noise, blur, B-factor; docs/pretrained.md) with ``--junk-fraction``
   junk of the six kinds; labels by the original rule from the map's MaskCreate-style mask
   projected at the pose in the particle's STAR row (true for good particles; for junk the
   depositor's pose, as a real corpus would label it).
3. **Real backgrounds** (``--real-backgrounds SHARE``, where ``../shared/data/real`` is
   present): that share of each map's particles is composited onto real particle-free boxes
   of EMPIAR-10017's *even* micrographs (ice and carbon at least a particle diameter from
   every expert pick and from every blob-detector peak;
   :mod:`particleseg_model.simulation.composite`), so that the network sees real texture with
   and without a particle. The odd micrographs stay for the benchmark
   (``benchmarks/real_particles.py --exclude-training-micrographs``).
4. **Real negatives** (``--no-real-negatives`` leaves them out): the same real boxes, labelled
   all background, ``--negatives-repeat`` times (default 1; each further copy under another
   symmetry of the square), as a partition of their own; simulated ``empty`` boxes too.
5. **Training**: ``--arch`` (default the true U-Net) at 64 px, ``--junk background`` (the
   default: the simulation's ``is_good`` labels junk all background) or ``--junk keep`` (junk
   labelled by its depositor's pose, as a real corpus has it: the "no particle here" then comes
   from the negatives alone; with ``--negatives-repeat 8`` it cleans real EMPIAR-10017 boxes as
   well but simulated junk far worse, docs/pretrained.md), the edge derived from the signal by
   the label rule.
6. **Measured** and recorded in the manifest: mean IoU on the held-out test split and on the
   unseen map (all particles and good ones), the calibration.

    .venv/bin/python scripts/build_pretrained.py [--particles 700] [--epochs 8] [--base 8]
        [--junk background|keep|drop] [--junk-fraction 0.3] [--real-backgrounds 0.5]
        [--no-real-negatives] [--negatives-repeat 1] [--no-structures]
        [--work data/pretrained-work] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
BOX = 64
FRACTIONS = (0.35, 0.7)  # the particle's diameter over the box, drawn per map
CONTRAST = (0.15, 2.0)  # disc contrast of particles composited on real backgrounds
BLUR_PX = (0.5, 2.0)  # their blur (sigma, px): the real backgrounds are denoised

# (key, shape, atoms, seed, particle fraction of the box)
GENERATED = (
    ("gen-globular-a", "globular", 3000, 11, 0.45),
    ("gen-globular-b", "globular", 6000, 12, 0.65),
    ("gen-elongated-a", "elongated", 4000, 13, 0.55),
    ("gen-elongated-b", "elongated", 2500, 14, 0.4),
    ("gen-ring-a", "ring", 5000, 15, 0.6),
    ("gen-ring-b", "ring", 3000, 16, 0.35),
)
UNSEEN_GENERATED = ("gen-unseen-globular", "globular", 4500, 999, 0.5)

STRUCTURE_PACKAGE = "mdanalysistests==2.11.0"
STRUCTURE_DIR = "mdanalysistests-2.11.0/MDAnalysisTests/data/"
# (file in the sdist, symmetry): whole deposited models first, then assemblies of one chain
STRUCTURES = (
    ("6msm.pdb.bz2", "C1"),  # CFTR, a cryo-EM structure (EMD-9230)
    ("mmcif/3KPR.cif.gz", "C1"),
    ("mmcif/1BD2.cif.gz", "C1"),
    ("mmcif/3PWP.cif.gz", "C1"),
    ("19hc.pdb.gz", "C1"),
    ("4E43.pdb", "C1"),
    ("adk_open.pdb", "C3"),
    ("dssp/2a2lA.pdb.gz", "C2"),
    ("dssp/1pdoA.pdb.gz", "C4"),
    ("dssp/3k7pA.pdb.gz", "C5"),
    ("dssp/3nbkA.pdb.gz", "C6"),
    ("dssp/3e8mA.pdb.gz", "C7"),
    ("dssp/3ieyB.pdb.gz", "C8"),
    ("dssp/1or4A.pdb.gz", "D2"),
    ("dssp/3ejfA.pdb.gz", "D3"),
    ("dssp/3q4oA.pdb.gz", "D4"),
    ("dssp/3gwiA.pdb.gz", "D5"),
    ("dssp/2cayA.pdb.gz", "T"),
    ("dssp/1h4aX.pdb.gz", "O"),
)

LICENCE = """# Licences of the pretrained model's inputs

The network was trained on simulated particles (and real background boxes, see below):

- EMD-1832 (GroEL, EMDB): CC0 (EMDB data are public domain, https://www.ebi.ac.uk/emdb/).
- Generated pseudo-atomic maps (`particleseg_model.em.maps.generate_map`): made by this code.
"""
STRUCTURES_LICENCE = """- Atomic models of the Protein Data Bank (CC0, https://www.wwpdb.org/about/usage-policies),
  as shipped in the test data of MDAnalysisTests 2.11.0 (PyPI `mdanalysistests`, LGPL-2.1+);
  their maps are computed by this code (`particleseg_model.em.structures`).
"""
REAL_LICENCE = """- Background boxes from EMPIAR-10017 micrographs (EMPIAR data CC0) as denoised by
  CryoSegNet (jianlin-cheng/CryoSegNet, MIT licence), regions far from every expert pick.
"""
LICENCE_END = "\nThe model itself is distributed under the project's licence.\n"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def structure_sources(work: Path) -> Path | None:
    """The ``mdanalysistests`` source distribution (downloaded once from PyPI into WORK)."""
    folder = work / "sources"
    found = sorted(folder.glob("mdanalysistests-*.tar.gz"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    command += ["-q", "-d", str(folder), STRUCTURE_PACKAGE]
    log("$ " + " ".join(command))
    if subprocess.run(command, check=False).returncode != 0:
        log(f"cannot download {STRUCTURE_PACKAGE}: no atomic-model maps")
        return None
    found = sorted(folder.glob("mdanalysistests-*.tar.gz"))
    return found[0] if found else None


def structure_maps(
    archive: Path, work: Path, rng: np.random.Generator
) -> list[tuple[str, Any, dict]]:
    """(key, prepared DensityMap, provenance) of every entry of :data:`STRUCTURES`."""
    from particleseg_model.em.maps import prepare_map
    from particleseg_model.em.structures import assemble, read_atoms, structure_map

    folder = work / "structures"
    out = []
    with tarfile.open(archive) as tar:
        for name, symmetry in STRUCTURES:
            target = folder / name
            if not target.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                member = tar.extractfile(STRUCTURE_DIR + name)
                if member is None:
                    raise FileNotFoundError(f"{archive}: no {STRUCTURE_DIR + name}")
                target.write_bytes(member.read())
            atoms = assemble(read_atoms(target), symmetry, rng)
            fraction = float(rng.uniform(*FRACTIONS))
            density = prepare_map(structure_map(atoms, 96), BOX, particle_fraction=fraction)
            stem = Path(name).name.split(".")[0]
            pdb = stem[:4].upper() if stem[0].isdigit() else stem.split("_")[0].upper()
            key = f"pdb-{pdb.lower()}-{symmetry.lower()}"
            provenance = {
                "source": f"PDB {pdb} ({name} in {STRUCTURE_PACKAGE}), {symmetry}",
                "licence": "CC0 (PDB)",
                "atoms": len(atoms),
                "diameter_a": round(2 * atoms.radius_a, 1),
            }
            out.append((key, density, provenance))
    return out


def maps(
    shared: Path | None, work: Path, structures: bool, rng: np.random.Generator
) -> tuple[list[tuple[str, Any, dict]], tuple[str, Any, dict]]:
    """Training maps and the unseen one, each (key, prepared DensityMap, provenance)."""
    from particleseg_model.em.maps import generate_map, load_map, prepare_map

    out = []
    unseen = None
    if shared is not None and (shared / "maps" / "emd_1832.map").is_file():
        emd_1832 = load_map(shared / "maps" / "emd_1832.map")
        density = prepare_map(emd_1832, BOX, particle_fraction=0.55)
        out.append(("emd-1832", density, {"source": "EMDB emd_1832.map", "licence": "CC0"}))
        if (shared / "maps" / "emd_5625.map").is_file():
            density = prepare_map(load_map(shared / "maps" / "emd_5625.map"), BOX)
            unseen = ("emd-5625", density, {"source": "EMDB emd_5625.map", "licence": "CC0"})
    if structures:
        archive = structure_sources(work)
        if archive is not None:
            out.extend(structure_maps(archive, work, rng))
    for key, shape, atoms, seed, fraction in GENERATED:
        density = prepare_map(
            generate_map(shape, 96, n_atoms=atoms, seed=seed), BOX, particle_fraction=fraction
        )
        out.append((key, density, {"source": f"generated:{shape}:{atoms}atoms:seed{seed}"}))
    if unseen is None:
        key, shape, atoms, seed, fraction = UNSEEN_GENERATED
        density = prepare_map(
            generate_map(shape, 96, n_atoms=atoms, seed=seed), BOX, particle_fraction=fraction
        )
        unseen = (key, density, {"source": f"generated:{shape}:{atoms}atoms:seed{seed}"})
    return out, unseen


def real_backgrounds(shared: Path) -> tuple[np.ndarray, list[str]]:
    """Particle-free boxes of the even 10017 micrographs at ``BOX`` px (particles would be
    bright): the benchmark's empty-ice rule, far from every pick and every blob peak, every
    such box rather than the benchmark's 40 a micrograph."""
    import real_particles as rp

    from particleseg_model.corpus.labels import resize_images

    boxes, names = rp.free_boxes_10017(shared / "real")
    return resize_images(boxes, BOX), names  # 54 -> 64 px: the particle spans ~half the box


def disc_noise(clean: np.ndarray, contrast: np.ndarray, blur: np.ndarray) -> np.ndarray:
    """The background level at which each (blurred) clean particle has ``contrast``."""
    from particleseg_model.simulation.composite import blur_images, disc_variance

    return np.sqrt(disc_variance(blur_images(clean, blur)) / contrast)


def write_partition(
    root: Path,
    key: str,
    density: Any,
    n: int,
    seed: int,
    *,
    junk_fraction: float,
    pool: np.ndarray | None,
    real_share: float,
) -> tuple[int, np.ndarray, int]:
    """Simulated particles of one map into partition ``key``; returns (particles written,
    the ``empty`` boxes for the negatives partition, how many sit on real backgrounds)."""
    from particleseg_model.corpus.labels import labels_from_projection
    from particleseg_model.corpus.projection import project_masks
    from particleseg_model.corpus.store import CorpusWriter
    from particleseg_model.em.maps import make_mask
    from particleseg_model.simulation.composite import composite_on_backgrounds
    from particleseg_model.simulation.simulate import (
        SimulationConfig,
        normalise_images,
        simulate_particles,
    )

    config = SimulationConfig.realistic(n_particles=n, junk_fraction=junk_fraction, normalise=False)
    sim = simulate_particles(density, config, seed=seed, keep_clean=True)
    images = sim.images
    rng = np.random.default_rng([seed, 7])
    empty = (sim.truth["junk_kind"] == "empty").to_numpy()
    composited = 0
    if pool is not None and len(pool) and real_share > 0:
        assert sim.clean is not None
        chosen = (rng.random(n) < real_share) & ~empty
        good = sim.truth["is_good"].to_numpy(dtype=bool)
        on_real, junk_on_real = np.flatnonzero(chosen & good), np.flatnonzero(chosen & ~good)
        # good particles as visible as real picks are: disc contrast log-uniform over the
        # range of EMPIAR-10017's picks (median 0.52, 90th percentile 1.5; realism.py)
        contrast = np.exp(rng.uniform(np.log(CONTRAST[0]), np.log(CONTRAST[1]), len(on_real)))
        # the pool is denoised: a particle on it carries the denoiser's blur too
        blur = rng.uniform(*BLUR_PX, len(on_real))
        images[on_real], _ = composite_on_backgrounds(
            sim.clean[on_real], pool, None, rng, contrast=contrast, blur_px=blur
        )
        if len(junk_on_real):  # junk at the level of this map's composited particles
            level = float(np.median(disc_noise(sim.clean[on_real], contrast, blur)))
            images[junk_on_real], _ = composite_on_backgrounds(
                sim.clean[junk_on_real],
                pool,
                level,
                rng,
                blur_px=rng.uniform(*BLUR_PX, len(junk_on_real)),
            )
        composited = len(on_real) + len(junk_on_real)
    images = normalise_images(images)[0]
    mask, _ = make_mask(density)
    keep = np.flatnonzero(~empty)
    star = sim.star.iloc[keep].reset_index(drop=True)
    projected = np.concatenate(
        list(project_masks(mask, star, pixel_size_a=density.pixel_size_a, batch=256))
    )
    labels = labels_from_projection(projected)
    table = sim.truth.iloc[keep][["image_name", "is_good", "junk_kind"]].reset_index(drop=True)
    attrs = {"pixel_size_a": density.pixel_size_a, "threshold": 10.0, "edge_px": 11}
    with CorpusWriter(root, key, BOX, attrs=attrs) as writer:
        writer.append(images[keep], labels, table)
    return len(keep), images[empty], composited


def write_negatives(root: Path, key: str, boxes: np.ndarray, source: str) -> int:
    from particleseg_model.corpus.store import CorpusWriter
    from particleseg_model.simulation.simulate import normalise_images

    images = normalise_images(boxes.astype(np.float32))[0]
    labels = np.zeros(images.shape, np.uint8)
    table = {"image_name": [f"{i + 1:06d}@{source}" for i in range(len(images))]}
    with CorpusWriter(
        root, key, images.shape[-1], attrs={"pixel_size_a": 1.0, "negatives": source}
    ) as w:
        w.append(images, labels, table)
    return len(images)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=700, help="per training map")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--patience", type=int, default=3, help="epochs without a better val loss")
    parser.add_argument("--arch", default="unet")
    parser.add_argument("--base", type=int, default=8)
    parser.add_argument(
        "--per-epoch", type=int, default=6000, help="training particles an epoch (0: all)"
    )
    parser.add_argument(
        "--junk",
        default="background",
        choices=("keep", "background", "drop"),
        help="background (shipped): the simulation's is_good makes junk all background; keep: "
        "junk labelled by its depositor's pose, as a real corpus has it",
    )
    parser.add_argument("--junk-fraction", type=float, default=0.3)
    parser.add_argument(
        "--real-backgrounds",
        type=float,
        default=0.5,
        help="share of the simulated particles composited onto real EMPIAR-10017 boxes",
    )
    parser.add_argument(
        "--real-negatives",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train on the real boxes themselves, labelled all background",
    )
    parser.add_argument(
        "--negatives-repeat",
        type=int,
        choices=range(1, 9),
        default=1,
        help="the real negatives this many times, each copy under another symmetry",
    )
    parser.add_argument("--no-structures", action="store_true", help="no atomic-model maps")
    parser.add_argument("--work", type=Path, default=REPO / "data" / "pretrained-work")
    parser.add_argument("--out", type=Path, default=None, help="default: the package's folder")
    parser.add_argument("--reuse-corpus", action="store_true")
    parser.add_argument("--corpus", type=Path, default=None, help="default: WORK/corpus")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_corpus(
    args: argparse.Namespace, shared: Path | None, corpus: Path
) -> tuple[list[str], tuple[str, Any, dict], int, dict[str, Any]]:
    """Maps, backgrounds and partitions (or, with ``--reuse-corpus``, only their keys):
    (training partition ids, the unseen map, how many training maps, provenance)."""
    rng = np.random.default_rng(args.seed)
    train_maps, unseen = maps(shared, args.work, not args.no_structures, rng)
    provenance: dict[str, Any] = {"maps": {}, "negatives": {}}
    real = shared is not None and (shared / "real" / "cryosegnet_empiar10017").is_dir()
    pool, names = None, []
    if real and (args.real_backgrounds > 0 or args.real_negatives):
        from particleseg_model.simulation.composite import background_pool

        boxes, names = real_backgrounds(shared)
        pool = background_pool(boxes)
        log(f"real backgrounds: {len(pool)} boxes from {len(names)} EMPIAR-10017 micrographs")
        provenance["real_backgrounds"] = {
            "source": "EMPIAR-10017 (CryoSegNet denoised JPEGs, binned 4x), boxes at least one "
            "diameter from every pick and 0.75 diameter from every blob peak, resized 54 -> 64",
            "licence": "MIT (CryoSegNet); EMPIAR CC0",
            "micrographs": names,
            "boxes": len(pool),
            "share_of_particles": args.real_backgrounds,
        }
    if not args.reuse_corpus:
        shutil.rmtree(corpus, ignore_errors=True)
    ids: list[str] = []
    empties = []
    for i, (key, density, source) in enumerate([*train_maps, unseen]):
        seen = key != unseen[0]
        n = args.particles if seen else max(500, args.particles)
        if not args.reuse_corpus:
            written, empty, on_real = write_partition(
                corpus,
                key,
                density,
                n,
                args.seed + i,
                junk_fraction=args.junk_fraction,
                pool=pool if seen else None,  # the unseen map's IoU stays on simulated noise
                real_share=args.real_backgrounds,
            )
            if seen:
                empties.append(empty)
            log(
                f"{key}: {written} particles, {on_real} on real backgrounds "
                f"({source['source']}, {density.pixel_size_a:.2f} A/px)"
            )
        provenance["maps"][key] = {**source, "pixel_size_a": round(density.pixel_size_a, 3)}
        if seen:
            ids.append(key)
    if not args.reuse_corpus and empties:
        n_empty = write_negatives(
            corpus, "neg-simulated", np.concatenate(empties), "simulated-empty"
        )
        log(f"neg-simulated: {n_empty} empty simulated boxes")
    provenance["negatives"]["neg-simulated"] = {"source": "simulated empty boxes"}
    ids.append("neg-simulated")
    if args.real_negatives and pool is not None:
        if not args.reuse_corpus:
            # each further copy under another symmetry of the square: more "no particle here"
            # without more micrographs (the regime without is_good needs a larger share)
            copies = [
                np.rot90(pool, k % 4, axes=(1, 2))[:, :, :: -1 if k >= 4 else 1]
                for k in range(args.negatives_repeat)
            ]
            n_real = write_negatives(
                corpus, "neg-empiar-10017", np.concatenate(copies), "EMPIAR-10017"
            )
            log(f"neg-empiar-10017: {n_real} real boxes far from every pick")
        provenance["negatives"]["neg-empiar-10017"] = {
            "source": provenance["real_backgrounds"]["source"],
            "licence": "MIT (CryoSegNet); EMPIAR CC0",
            "micrographs": names,
        }
        ids.append("neg-empiar-10017")
    elif pool is not None:  # the benchmark leaves out the micrographs the model has seen
        provenance["negatives"]["neg-empiar-10017"] = {"micrographs": names, "boxes": 0}
    return ids, unseen, len(train_maps), provenance


def measure(network: Any, corpus: Path, keys: list[str], unseen: str) -> dict[str, Any]:
    from particleseg_model.model.train import evaluate_partition

    metrics: dict[str, Any] = {}
    for key in [*keys, unseen]:
        evaluation = evaluate_partition(network, corpus, key, edge_from_signal=True)
        s, g = evaluation.scores, evaluation.scores_good or {}
        metrics[key] = {
            "seen": key != unseen,
            "particles": evaluation.particles,
            "mean_iou": round(100 * s["mean_iou"], 2),
            "mean_iou_good": round(100 * g.get("mean_iou", float("nan")), 2),
            "edge_iou_good": round(100 * g.get("iou_edge", float("nan")), 2),
            "signal_iou_good": round(100 * g.get("iou_signal", float("nan")), 2),
        }
        log(f"{key}: {metrics[key]}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    from particleseg_model.model.calibration import mask_calibration
    from particleseg_model.model.pretrained import install
    from particleseg_model.model.train import TrainConfig, train_segmentation, training_curve_png
    from particleseg_model.model.unet import build_unet  # noqa: F401 - fail early without TF
    from particleseg_model.simulation.demo_archive import find_shared_data
    from particleseg_model.version import code_version

    t0 = time.perf_counter()
    shared = find_shared_data()
    corpus = args.corpus or args.work / "corpus"
    ids, unseen, n_maps, provenance = build_corpus(args, shared, corpus)
    config = TrainConfig(
        arch=args.arch,
        size=BOX,
        base_filters=args.base,
        epochs=args.epochs,
        patience=args.patience,
        batch_size=32,
        junk=args.junk,
        optimizer="adam",
        seed=args.seed,
        max_train_particles=args.per_epoch,
    )
    out_dir = args.work / "train"
    shutil.rmtree(out_dir, ignore_errors=True)
    log(f"training {args.arch} base {args.base} on {len(ids)} partitions (junk={args.junk})")
    result = train_segmentation(corpus, ids, config, out_dir, log=log)
    import keras

    network = keras.models.load_model(out_dir / "model.keras", compile=False)
    metrics = measure(network, corpus, ids[:n_maps], unseen[0])
    calibration = mask_calibration(network, corpus, ids[:n_maps], edge_from_signal=True)
    curve = out_dir / "training_curve.png"
    training_curve_png(result.history, curve, title="pretrained model")
    manifest = {
        "arch": args.arch,
        "input_size": BOX,
        "channels": 1,
        "edge_from_signal": True,
        "parent": None,
        "mode": "pretrained",
        "partitions": result.train_particles,
        "holdout": [unseen[0]],
        "config": {
            **vars(config),
            "particles_per_map": args.particles,
            "junk_fraction": args.junk_fraction,
            "real_backgrounds": args.real_backgrounds,
            "real_negatives": args.real_negatives,
            "negatives_repeat": args.negatives_repeat,
            "simulation": "SimulationConfig.realistic()",
        },
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "seconds": round(result.seconds, 1),
        "history": result.history,
        "metrics": metrics,
        "calibration": calibration,
        "provenance": provenance,
        "code_version": code_version(),
        "rebuild": "make pretrained",
    }
    licence = LICENCE
    if any(key.startswith("pdb-") for key in provenance["maps"]):
        licence += STRUCTURES_LICENCE
    if "real_backgrounds" in provenance:
        licence += REAL_LICENCE
    installed = install(
        out_dir / "model.keras",
        json.loads(json.dumps(manifest, default=str)),
        licence_text=licence + LICENCE_END,
        extra_files={"training_curve.png": curve},
        folder=args.out,
    )
    size_mb = (installed.path / "model.keras").stat().st_size / 2**20
    log(f"installed {installed.path} ({size_mb:.1f} MB) in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    raise SystemExit(main())
