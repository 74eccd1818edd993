"""Build the pretrained model shipped in the package (``make pretrained``).

The recipe (every input's provenance and licence goes into the manifest and ``LICENSE.md``):

1. **Maps**: EMD-1832 from ``../shared/data/maps`` where present (CC0) and generated
   pseudo-atomic maps (globular, elongated, ring; several seeds and sizes: the particle spans
   35-70% of the box), each prepared to box 64. EMD-5625 (or, without ``../shared``, a
   generated map of a seed never trained on) is held out: the unseen map of the IoU figure.
2. **Particles**: per map, ``--particles`` from ``SimulationConfig.realistic()`` (SNR spread
   over 1.7 decades, coloured noise, blur, B-factor; docs/realism.md) with 30% junk of the six
   kinds; labels by the original rule from the map's MaskCreate-style mask projected at the
   pose in the particle's STAR row (true for good particles; for junk the depositor's pose, as
   a real corpus would label it). ``empty`` boxes and real negatives go to a partition of
   their own, labelled all background.
3. **Real negatives** (``--real-negatives``, off by default): boxes at least one particle
   diameter from every expert pick of EMPIAR-10017's *even* micrographs. Measured: trained
   with them (and the simulated particles), the model learns the real micrographs' look as
   "background" and predicts no signal on any real particle (docs/pretrained.md).
4. **Training**: ``--arch`` (default the true U-Net, base 8) at 64 px, ``--junk background``
   (the simulation's ``is_good``: junk with an all-background label), the edge derived from
   the signal by the label rule.
5. **Measured** and recorded in the manifest: mean IoU on the held-out test split and on the
   unseen map (all particles and good ones), the calibration.

        [--work data/pretrained-work] [--out DIR] [--junk background] [--real-negatives]
        [--work data/pretrained-work] [--out DIR] [--junk background] [--real-negatives]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
BOX = 64

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

REAL_NEGATIVES_LICENCE = """- Background boxes from EMPIAR-10017 micrographs as denoised by
  CryoSegNet
  (jianlin-cheng/CryoSegNet, MIT licence; EMPIAR data CC0), regions far from every expert pick.
"""
LICENCE = """# Licences of the pretrained model's inputs

The network was trained on simulated particles (and, with --real-negatives, real background boxes):

- EMD-1832 (GroEL, EMDB): CC0 (EMDB data are public domain, https://www.ebi.ac.uk/emdb/).
- Generated pseudo-atomic maps (`particleseg_model.em.maps.generate_map`): made by this code.

The model itself is distributed under the project's licence.
"""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def maps(shared: Path | None) -> tuple[list[tuple[str, Any, dict]], tuple[str, Any, dict]]:
    """Training maps and the unseen one, each (key, prepared DensityMap, provenance)."""
    from particleseg_model.em.maps import generate_map, load_map, prepare_map

    out = []
    unseen = None
    if shared is not None and (shared / "maps" / "emd_1832.map").is_file():
        for key, name, fraction in (("emd-1832", "emd_1832.map", 0.55),):
            density = prepare_map(load_map(shared / "maps" / name), BOX, particle_fraction=fraction)
            out.append((key, density, {"source": f"EMDB {name}", "licence": "CC0"}))
        if (shared / "maps" / "emd_5625.map").is_file():
            density = prepare_map(load_map(shared / "maps" / "emd_5625.map"), BOX)
            unseen = ("emd-5625", density, {"source": "EMDB emd_5625.map", "licence": "CC0"})
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


def write_partition(
    root: Path, key: str, density: Any, n: int, seed: int
) -> tuple[int, np.ndarray]:
    """Simulated particles of one map into partition ``key``; returns (particles written,
    the ``empty`` boxes for the negatives partition)."""
    from particleseg_model.corpus.labels import labels_from_projection
    from particleseg_model.corpus.projection import project_masks
    from particleseg_model.corpus.store import CorpusWriter
    from particleseg_model.em.maps import make_mask
    from particleseg_model.simulation.simulate import SimulationConfig, simulate_particles

    config = SimulationConfig.realistic(n_particles=n, junk_fraction=0.3)
    sim = simulate_particles(density, config, seed=seed, keep_clean=False)
    empty = (sim.truth["junk_kind"] == "empty").to_numpy()
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
        writer.append(sim.images[keep], labels, table)
    return len(keep), sim.images[empty]


def real_negatives(
    shared: Path, rng: np.random.Generator, per_micrograph: int
) -> tuple[np.ndarray, list[str]]:
    """Boxes (54 px, normalised later) far from every expert pick of the even 10017 micrographs."""
    import real_particles as rp

    from particleseg_model.corpus.negatives import cut_boxes, negative_centres

    folder = shared / "real" / "cryosegnet_empiar10017"
    images = sorted((folder / "images").glob("*.jpg"))[::2]
    boxes, names = [], []
    for path in images:
        name = path.stem
        gray, picks = rp.read_10017_micrograph(folder, path)
        image = -gray
        centres = negative_centres(
            image.shape,
            picks,
            box=rp.BOX,
            diameter_px=rp.DIAMETER,
            rng=rng,
            n_max=per_micrograph,
            margin_px=rp.BORDER,
        )
        boxes.append(cut_boxes(image, centres, rp.BOX))
        names.append(name)
    return np.concatenate(boxes), names


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=1500, help="per training map")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--arch", default="unet")
    parser.add_argument("--base", type=int, default=8)
    parser.add_argument(
        "--per-epoch", type=int, default=5000, help="training particles an epoch (0: all)"
    )
    parser.add_argument("--junk", default="background", choices=("keep", "background", "drop"))
    parser.add_argument("--negatives-per-micrograph", type=int, default=150)
    parser.add_argument("--work", type=Path, default=REPO / "data" / "pretrained-work")
    parser.add_argument("--out", type=Path, default=None, help="default: the package's folder")
    parser.add_argument("--reuse-corpus", action="store_true")
    parser.add_argument(
        "--real-negatives",
        action="store_true",
        help="also train on the real EMPIAR-10017 negatives (measured: the model then learns "
        "the real images' look as 'background' and finds no real particle)",
    )
    parser.add_argument("--corpus", type=Path, default=None, help="default: WORK/corpus")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from particleseg_model.model.calibration import mask_calibration
    from particleseg_model.model.pretrained import install
    from particleseg_model.model.train import (
        TrainConfig,
        evaluate_partition,
        train_segmentation,
        training_curve_png,
    )
    from particleseg_model.model.unet import build_unet  # noqa: F401 - fail early without TF
    from particleseg_model.simulation.demo_archive import find_shared_data
    from particleseg_model.version import code_version

    t0 = time.perf_counter()
    shared = find_shared_data()
    corpus = args.corpus or args.work / "corpus"
    train_maps, unseen = maps(shared)
    provenance: dict[str, Any] = {"maps": {}, "negatives": {}}
    ids: list[str] = []
    if not args.reuse_corpus:
        shutil.rmtree(corpus, ignore_errors=True)
    empties = []
    for i, (key, density, source) in enumerate([*train_maps, unseen]):
        n = args.particles if key != unseen[0] else max(500, args.particles // 3)
        if not args.reuse_corpus:
            written, empty = write_partition(corpus, key, density, n, args.seed + i)
            empties.append(empty) if key != unseen[0] else None
            log(f"{key}: {written} particles ({source['source']}, {density.pixel_size_a:.2f} A/px)")
        provenance["maps"][key] = {**source, "pixel_size_a": round(density.pixel_size_a, 3)}
        if key != unseen[0]:
            ids.append(key)
    rng = np.random.default_rng(args.seed)
    if not args.reuse_corpus:
        n_empty = write_negatives(
            corpus, "neg-simulated", np.concatenate(empties), "simulated-empty"
        )
        log(f"neg-simulated: {n_empty} empty simulated boxes")
    provenance["negatives"]["neg-simulated"] = {"source": "simulated empty boxes"}
    ids.append("neg-simulated")
    if (
        args.real_negatives
        and shared is not None
        and (shared / "real" / "cryosegnet_empiar10017").is_dir()
    ):
        if not args.reuse_corpus:
            boxes, names = real_negatives(shared, rng, args.negatives_per_micrograph)
            n_real = write_negatives(corpus, "neg-empiar-10017", boxes, "EMPIAR-10017")
            (corpus / "negatives_micrographs.json").write_text(json.dumps(names))
            log(f"neg-empiar-10017: {n_real} real boxes far from every pick, {len(names)} mics")
        names = json.loads((corpus / "negatives_micrographs.json").read_text())
        provenance["negatives"]["neg-empiar-10017"] = {
            "source": "EMPIAR-10017 (CryoSegNet denoised JPEGs, binned 4x), boxes at least "
            "one diameter from every pick",
            "licence": "MIT (CryoSegNet); EMPIAR CC0",
            "micrographs": names,
        }
        ids.append("neg-empiar-10017")

    config = TrainConfig(
        arch=args.arch,
        size=BOX,
        base_filters=args.base,
        epochs=args.epochs,
        patience=3,
        batch_size=32,
        junk=args.junk,
        optimizer="adam",
        seed=args.seed,
        max_train_particles=args.per_epoch,
    )
    out_dir = args.work / "train"
    shutil.rmtree(out_dir, ignore_errors=True)
    log(f"training {args.arch} base {args.base} on {ids} (junk={args.junk})")
    result = train_segmentation(corpus, ids, config, out_dir, log=log)
    import keras

    network = keras.models.load_model(out_dir / "model.keras", compile=False)
    metrics: dict[str, Any] = {}
    for key in [*ids[: len(train_maps)], unseen[0]]:
        evaluation = evaluate_partition(network, corpus, key, edge_from_signal=True)
        s, g = evaluation.scores, evaluation.scores_good or {}
        metrics[key] = {
            "seen": key != unseen[0],
            "particles": evaluation.particles,
            "mean_iou": round(100 * s["mean_iou"], 2),
            "mean_iou_good": round(100 * g.get("mean_iou", float("nan")), 2),
            "edge_iou_good": round(100 * g.get("iou_edge", float("nan")), 2),
            "signal_iou_good": round(100 * g.get("iou_signal", float("nan")), 2),
        }
        log(f"{key}: {metrics[key]}")
    calibration = mask_calibration(network, corpus, ids[: len(train_maps)], edge_from_signal=True)
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
    installed = install(
        out_dir / "model.keras",
        json.loads(json.dumps(manifest, default=str)),
        licence_text=LICENCE.replace(
            "\n\nThe model itself",
            ("\n" + REAL_NEGATIVES_LICENCE if "neg-empiar-10017" in ids else "")
            + "\nThe model itself",
        ),
        extra_files={"training_curve.png": curve},
        folder=args.out,
    )
    size_mb = (installed.path / "model.keras").stat().st_size / 2**20
    log(f"installed {installed.path} ({size_mb:.1f} MB) in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    raise SystemExit(main())
