"""Loader throughput against the training step's consumption, on the same machine.

Builds (or opens, ``--root``/``--id``) a corpus of simulated box-``--box`` particles, then:

- loader: samples/s of ``loader.CorpusBatches`` at ``--size`` (default 256; resize, flips and
  rot90 on, float16 -> float32, one epoch of the train split, cold chunk cache), read
  directly (1 thread), with 2 threads, and through Keras' ``PyDataset`` machinery with 1 worker,
  2 worker threads and 2 worker processes;
- training: samples/s of ``train_on_batch`` of a standard 4-level U-Net (Keras 3, base
  ``--base`` filters, 3 classes, softmax; RMSprop and sparse categorical cross-entropy as the
  seed) at ``--size``, and of ``fit`` fed by the PyDataset (loader and training sharing the
  cores);
- the ratio loader / training (the loader must be at least 3x faster).

    .venv/bin/python benchmarks/loader_speed.py [--box 128] [--n 2000] [--size 256]
        [--batch 8] [--steps 8] [--base 32] [--root DIR --id ID] [--json PATH]

The figures also go to ``--json`` (default ``docs/results/loader_speed.json``), beside the
table they feed in ``docs/loader.md``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus_build import (  # noqa: E402 - the benchmark next door
    EDGE_PX,
    THRESHOLD,
    Timer,
    load,
    load_density,
    mask_labels,
    simulated_input,
)
from results import REPO, RESULTS_DIR, write_results  # noqa: E402

from particleseg_model.corpus.store import CorpusWriter, open_corpus  # noqa: E402
from particleseg_model.em.maps import make_mask  # noqa: E402
from particleseg_model.model.loader import CorpusBatches, corpus_pydataset  # noqa: E402
from particleseg_model.simulation.simulate import FourierProjector  # noqa: E402

RESULTS = RESULTS_DIR / "loader_speed.json"


def build_corpus(root: Path, key: str, n: int, box: int) -> None:
    density = load_density(box, None)
    mask, _ = make_mask(density)
    projector = FourierProjector(mask)
    attrs = {
        "pixel_size_a": density.pixel_size_a,
        "threshold": THRESHOLD,
        "edge_px": EDGE_PX,
        "source_star": "simulated",
    }
    timer = Timer()
    with CorpusWriter(root, key, box, attrs=attrs) as writer:
        for images, table in simulated_input(density, n, 1000, 1, timer):
            writer.append(images, mask_labels(projector, table, density.pixel_size_a, timer), table)


def build_unet(size: int, base: int = 32, depth: int = 4, n_classes: int = 3):
    """A standard U-Net: ``depth`` levels of two 3x3 conv + BN + ReLU (``base`` filters,
    doubling per level), 2x2 max pooling, transposed-conv up-sampling with skip concatenation,
    1x1 softmax head. Backend-agnostic Keras 3."""
    import keras
    from keras import layers

    def block(x, filters):
        for _ in range(2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
            x = layers.BatchNormalization()(x)
            x = layers.Activation("relu")(x)
        return x

    inputs = keras.Input((size, size, 1))
    x, skips = inputs, []
    for level in range(depth):
        x = block(x, base * 2**level)
        skips.append(x)
        x = layers.MaxPooling2D()(x)
    x = block(x, base * 2**depth)
    for level in reversed(range(depth)):
        x = layers.Conv2DTranspose(base * 2**level, 2, strides=2, padding="same")(x)
        x = layers.Concatenate()([x, skips[level]])
        x = block(x, base * 2**level)
    outputs = layers.Conv2D(n_classes, 1, activation="softmax")(x)
    model = keras.Model(inputs, outputs, name=f"unet{depth}_{base}")
    model.compile(optimizer="rmsprop", loss="sparse_categorical_crossentropy")
    return model


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:8.1f} samples/s"


def time_epoch(fn, batches: CorpusBatches) -> tuple[int, float]:
    batches._init_cache()  # cold: every chunk decoded again
    started = time.perf_counter()
    n = fn(batches)
    return n, time.perf_counter() - started


def direct(batches: CorpusBatches) -> int:
    return sum(len(batches[i][0]) for i in range(len(batches)))


def threads(batches: CorpusBatches, workers: int = 2) -> int:
    with ThreadPoolExecutor(workers) as pool:
        return sum(len(x) for x, _ in pool.map(batches.__getitem__, range(len(batches))))


def through_keras(batches: CorpusBatches, workers: int, processes: bool) -> int:
    """One epoch through Keras' own PyDataset adapter (the enqueuer ``fit`` uses)."""
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

    adapter = PyDatasetAdapter(
        corpus_pydataset(batches, workers=workers, use_multiprocessing=processes)
    )
    adapter.on_epoch_begin()
    n = sum(len(x) for x, _ in adapter.get_numpy_iterator())
    adapter.on_epoch_end()
    return n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--box", type=int, default=128, help="particle box of the corpus")
    parser.add_argument("--n", type=int, default=2000, help="particles in the corpus")
    parser.add_argument("--size", type=int, default=256, help="model input size")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8, help="timed training steps")
    parser.add_argument("--base", type=int, default=32, help="U-Net filters at level 1")
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--id", default="sim-loader")
    parser.add_argument(
        "--json",
        type=Path,
        default=RESULTS,
        help=f"write the figures here as JSON (default {RESULTS.relative_to(REPO)})",
    )
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    print(f"start: {load()}")

    root = args.root or Path(tempfile.mkdtemp(prefix="loader-bench-"))
    if args.root is None:
        started = time.perf_counter()
        build_corpus(root, args.id, args.n, args.box)
        print(
            f"corpus: {args.n} simulated particles at box {args.box} built in "
            f"{time.perf_counter() - started:.1f} s"
        )
    ds = open_corpus(root, args.id)
    batches = CorpusBatches(
        [ds], split="train", batch_size=args.batch, size=args.size, flips=True, rot90=True, seed=0
    )
    print(
        f"loader: {batches.n_samples} train particles of box {ds.box} ({ds.images.dtype}) "
        f"-> {args.size}x{args.size}, batch {args.batch}, flips + rot90, cold cache; "
        f"{load()}"
    )
    import keras  # imported before the timings: its import (seconds) is not the loader's
    from keras.src.trainers.data_adapters import py_dataset_adapter  # noqa: F401

    results = {}
    for name, fn in (
        ("direct, 1 thread", direct),
        ("2 threads", threads),
        ("PyDataset workers=1", lambda b: through_keras(b, 1, False)),
        ("PyDataset workers=2 threads", lambda b: through_keras(b, 2, False)),
        ("PyDataset workers=2 processes", lambda b: through_keras(b, 2, True)),
    ):
        n, seconds = time_epoch(fn, batches)
        results[name] = n / seconds
        print(f"  {name:32s} {rate(n, seconds)} ({n} samples, {seconds:.2f} s)")

    model = build_unet(args.size, args.base)
    ready = [batches[i % len(batches)] for i in range(args.steps)]  # loading not timed here
    for x, y in ready[:2]:  # warm-up: tracing, first allocations
        model.train_on_batch(x, y)
    started = time.perf_counter()
    for x, y in ready:
        model.train_on_batch(x, y)
    train_s = time.perf_counter() - started
    train_rate = args.steps * args.batch / train_s
    print(
        f"training: {model.name} ({model.count_params() / 1e6:.1f} M parameters, Keras "
        f"{keras.__version__}, backend {keras.backend.backend()}) train_on_batch "
        f"{rate(args.steps * args.batch, train_s)} at {args.size}x{args.size} "
        f"({train_s / args.steps:.2f} s a step of {args.batch}); {load()}"
    )
    data = corpus_pydataset(batches, workers=1)
    started = time.perf_counter()
    model.fit(data, epochs=1, steps_per_epoch=args.steps, shuffle=False, verbose=0)
    fit_s = time.perf_counter() - started
    print(
        f"training fed by the PyDataset (fit, workers=1, incl. the start of fit): "
        f"{rate(args.steps * args.batch, fit_s)}"
    )
    loader_rate = results["PyDataset workers=1"]
    print(
        f"ratio loader / training: {loader_rate:.0f} / {train_rate:.1f} = "
        f"{loader_rate / train_rate:.0f}x (PyDataset workers=1; must be >= 3x)"
    )
    print(f"end: {load()}")
    figures = {
        "train_particles": batches.n_samples,
        "box": ds.box,
        "image_dtype": str(ds.images.dtype),
        "loader_samples_per_s": results,
        "train_on_batch_samples_per_s": train_rate,
        "fit_samples_per_s": args.steps * args.batch / fit_s,
        "parameters": model.count_params(),
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "load_after": load(),
    }
    write_results(args.json, "loader_speed", vars(args), figures)
    print(f"results: {args.json}")
    if args.root is None:
        shutil.rmtree(root)
    return 0 if loader_rate >= 3 * train_rate else 1


if __name__ == "__main__":
    sys.exit(main())
