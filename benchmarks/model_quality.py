"""Segmentation model: IoU on a held-out split and on an unseen map, speed, incremental training.

1. corpus: a simulated archive (``write_demo_archive``) with one particle entry per map:
   EMD-1832, EMD-5625 (``../shared/data/maps``; generated maps without it) and a generated
   elongated map for training, a generated ring map never trained on (the unseen map);
   ``--particles`` each at box 128, SNR 0.1, 30% junk of six kinds; served on loopback and
   turned into the corpus by the library's build steps (``particleseg_model.corpus.build``,
   what ``dataset_job``'s four assets run), labels from the true (deposited) poses;
2. the default model (custom U-Net, ``--size`` px, ``--base`` filters) trained from scratch on
   the three training entries (early stopping, patience 3): mean IoU (the paper's: one
   confusion matrix over every pixel of the test split, mean of the 3 classes, x100) on the
   held-out test split of each training entry and on the unseen entry;
3. the same network at the particles' native 128x128 (the simulated particles are 128 px:
   a 256x256 model would only see them upsampled), trained and scored the same way: the
   reference the default's IoU is compared with;
4. throughput on this machine: training images/s and inference particles/s (batches of 64
   particles of box 128 in, label masks at box 128 out) for the default, native, and the
   paper's 256x256 base-32 network (speeds only: training it to convergence takes hours on
   2 CPU cores);
5. incremental: train on two entries, add the third incrementally (replay 0.5), against a
   full retrain on all three: time and IoU on old and new entries.

    .venv/bin/python benchmarks/model_quality.py [--particles 800] [--size 64] [--base 16]
        [--epochs 25] [--work DIR] [--skip-native] [--skip-256] [--skip-incremental]
        [--speeds-only]
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

from particleseg_model.simulation.demo_archive import find_shared_data, write_demo_archive

TRAIN_KEYS = ("30001", "30002", "30003")
UNSEEN_KEY = "30004"


def build_partition(server, key: str, data: Path) -> None:
    """One entry from the loopback archive to its labelled partition under ``data/corpus``,
    the steps' folders laid out as the platform's (``data/<asset>/<key>``)."""
    from particleseg_model.access.empiar import EmdbClient, EmpiarClient
    from particleseg_model.corpus import build

    entry = EmpiarClient(server.empiar_url, server.emdb_url).entry(key)
    stacks = build.fetch_stacks(
        entry,
        server.archive_url,
        data / "downloads" / key,
        data / "particle_stacks" / key,
        map_resolution_a=lambda: build.best_map_resolution_a(
            entry, emdb=EmdbClient(server.emdb_url)
        ),
        emdb_files_url=server.emdb_files_url,  # the maps are in the mirror's EMDB layout
        emdb=EmdbClient(server.emdb_url),
        map_cache=data / "emdb",
    ).manifest
    refined = build.refine_poses(stacks, data / "refined_particles" / key).manifest
    mask = build.make_mask_volume(stacks, refined, data / "mask_volume" / key).manifest
    build.label_partition(
        stacks, refined, mask, data / "corpus", data / "particle_masks" / key, key=key
    )


def build_corpus(work: Path, n_particles: int) -> Path:
    """Simulated archive -> corpus through the library's build steps; returns the data root."""
    from particleseg_model.access.server import serve

    data = work / "data"
    if all((data / "corpus" / f"{k}.zarr").exists() for k in (*TRAIN_KEYS, UNSEEN_KEY)):
        print(f"corpus: reusing {data / 'corpus'}")
        return data
    shared = find_shared_data()
    if shared is None:
        raise SystemExit("this benchmark needs ../shared/data/maps (EMD-1832, EMD-5625)")
    maps = [
        str(shared / "maps" / "emd_1832.map"),
        str(shared / "maps" / "emd_5625.map"),
        "generated:elongated",
        "generated:ring",
    ]
    archive = work / "archive"
    if archive.exists():
        shutil.rmtree(archive)
    began = time.perf_counter()
    write_demo_archive(
        archive,
        maps=maps,
        n_particles=n_particles,
        box=128,
        micrograph_entries=0,
        seed=7,
        progress=False,
    )
    print(
        f"simulated {len(maps)} entries x {n_particles} particles in "
        f"{time.perf_counter() - began:.0f} s ({', '.join(Path(m).name for m in maps)})"
    )
    keys = [*TRAIN_KEYS, UNSEEN_KEY]
    with serve(archive) as server:
        for key in keys:
            build_partition(server, key, data)
    print(f"corpus of {len(keys)} entries in {time.perf_counter() - began:.0f} s")
    return data


def evaluate(model, corpus: Path, keys) -> dict:
    from particleseg_model.model.train import evaluate_partition

    return {k: evaluate_partition(model, corpus, k, examples=0) for k in keys}


def show(label: str, evaluations: dict) -> None:
    """Mean IoU x100 over every test particle (the paper's figure) and over the good ones."""
    cells = []
    for k, e in evaluations.items():
        s, g = e.scores, e.scores_good or e.scores
        cells.append(
            f"{k} {100 * s['mean_iou']:.2f} (bg {100 * s['iou_background']:.1f}, "
            f"signal {100 * s['iou_signal']:.1f}, edge {100 * s['iou_edge']:.1f}; "
            f"good particles {100 * g['mean_iou']:.2f})"
        )
    print(f"  {label}:\n    " + "\n    ".join(cells))


def mean_iou(evaluations: dict, good: bool = False) -> float:
    return 100 * float(
        np.mean(
            [
                (e.scores_good if good and e.scores_good else e.scores)["mean_iou"]
                for e in evaluations.values()
            ]
        )
    )


def inference_rate(model, corpus: Path, n: int = 512) -> float:
    from particleseg_model.corpus.store import open_corpus
    from particleseg_model.model.predict import predict_labels

    images = np.asarray(open_corpus(corpus, TRAIN_KEYS[0]).images[:n], dtype=np.float32)
    predict_labels(model, images[:64])  # warm-up (graph tracing)
    began = time.perf_counter()
    predict_labels(model, images, batch=64)
    return len(images) / (time.perf_counter() - began)


def train(corpus: Path, keys, config, out: Path, **kwargs):
    from particleseg_model.model.train import train_segmentation

    result = train_segmentation(
        corpus, list(keys), config, out, log=lambda line: print(f"    {line}"), **kwargs
    )
    import keras

    return result, keras.models.load_model(result.model_path, compile=False)


def training_rate(corpus: Path, size: int, base: int, steps: int = 6, batch: int = 8) -> float:
    """Training images/s of a fresh model at ``size`` over ``steps`` batches (after one)."""
    import keras

    from particleseg_model.corpus.store import open_corpus
    from particleseg_model.model.loader import CorpusBatches
    from particleseg_model.model.unet import build_unet

    model = build_unet("custom", size=size, base_filters=base)
    model.compile(optimizer="rmsprop", loss="sparse_categorical_crossentropy")
    batches = CorpusBatches([open_corpus(corpus, TRAIN_KEYS[0])], batch_size=batch, size=size)
    model.train_on_batch(*batches[0])
    began = time.perf_counter()
    for i in range(1, steps + 1):
        model.train_on_batch(*batches[i])
    del keras
    return steps * batch / (time.perf_counter() - began)


def speeds(corpus: Path, size: int, base: int) -> None:
    """Training images/s and inference particles/s of untrained networks (the speed does not
    depend on the weights): the default, the native 128 px and the paper's 256 px base 32."""
    from particleseg_model.model.unet import build_unet

    print("\n[speeds] box-128 particles in, masks at box 128 out; training batches of 8")
    for label, s, b in (("default", size, base), ("native", 128, base), ("paper", 256, 32)):
        model = build_unet("custom", size=s, base_filters=b)
        n = 128 if s >= 256 else 512
        print(
            f"  {label:<8} {s}x{s} base {b}: training {training_rate(corpus, s, b):.1f} "
            f"images/s, inference {inference_rate(model, corpus, n=n):.1f} particles/s "
            f"({model.count_params():,} parameters)",
            flush=True,
        )


def run_size(corpus: Path, work: Path, label: str, size: int, base: int, epochs: int):
    from particleseg_model.model.train import TrainConfig

    print(
        f"\n[{label}] custom U-Net {size}x{size}, base {base}, from scratch on "
        f"{', '.join(TRAIN_KEYS)}"
    )
    config = TrainConfig(size=size, base_filters=base, epochs=epochs)
    result, model = train(corpus, TRAIN_KEYS, config, work / f"model_{size}_{base}")
    print(
        f"  {result.epochs_run} epochs (best {result.best_epoch}) in {result.seconds:.0f} s, "
        f"{result.images_per_s:.1f} training images/s, {model.count_params():,} parameters"
    )
    held = evaluate(model, corpus, TRAIN_KEYS)
    unseen = evaluate(model, corpus, [UNSEEN_KEY])
    show("held-out test split", held)
    show("unseen map", unseen)
    rate = inference_rate(model, corpus)
    print(
        f"  mean IoU held-out {mean_iou(held):.2f} (good particles {mean_iou(held, True):.2f})"
        f", unseen {mean_iou(unseen):.2f} (good particles {mean_iou(unseen, True):.2f}); "
        f"inference {rate:.0f} particles/s (box 128 in, masks at box 128 out)"
    )
    return config, result, held, unseen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=800)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--base", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--work", default=None, help="keep the corpus here (reused if there)")
    parser.add_argument("--skip-native", action="store_true")
    parser.add_argument("--skip-256", action="store_true")
    parser.add_argument("--skip-incremental", action="store_true")
    parser.add_argument(
        "--speeds-only",
        action="store_true",
        help="only the training and inference speeds (on the corpus in --work)",
    )
    args = parser.parse_args()

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="model-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    data = build_corpus(work, args.particles)
    corpus = data / "corpus"
    print(
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
        f"TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS')}"
    )

    if args.speeds_only:
        speeds(corpus, args.size, args.base)
        return 0
    config, result, held, _ = run_size(corpus, work, "default", args.size, args.base, args.epochs)
    if not args.skip_256:
        from particleseg_model.model.unet import build_unet

        print("\n[paper size] custom U-Net 256x256, base 32 (the paper's network): speeds")
        model256 = build_unet("custom", size=256, base_filters=32)
        print(
            f"  training {training_rate(corpus, 256, 32):.1f} images/s, inference "
            f"{inference_rate(model256, corpus, n=128):.1f} particles/s, "
            f"{model256.count_params():,} parameters"
        )
        model_d = build_unet("custom", size=args.size, base_filters=args.base)
        print(
            f"  default for comparison: training "
            f"{training_rate(corpus, args.size, args.base):.1f} images/s, inference "
            f"{inference_rate(model_d, corpus):.1f} particles/s (untrained, same code path)"
        )

    if not args.skip_incremental:
        old, new = TRAIN_KEYS[:2], TRAIN_KEYS[2]
        print(f"\n[incremental] {', '.join(old)} first, then {new} added")
        base_result, base_model = train(corpus, old, config, work / "model_old")
        before = evaluate(base_model, corpus, TRAIN_KEYS)
        show(f"trained on {', '.join(old)} ({base_result.seconds:.0f} s)", before)
        inc_result, inc_model = train(
            corpus,
            TRAIN_KEYS,
            config,
            work / "model_inc",
            parent=base_result.model_path,
            new_ids=[new],
        )
        after = evaluate(inc_model, corpus, TRAIN_KEYS)
        show(f"incremental (+{new}, {inc_result.seconds:.0f} s)", after)
        show(f"full retrain on all three ({result.seconds:.0f} s)", held)
        print(
            f"  incremental {inc_result.seconds:.0f} s vs full retrain {result.seconds:.0f} s "
            f"({result.seconds / max(inc_result.seconds, 1e-9):.1f}x faster)"
        )
    if not args.skip_native:
        # the particles are 128 px: a 128 model sees every pixel; 256 would only upsample them
        run_size(corpus, work, "native", 128, args.base, args.epochs)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
