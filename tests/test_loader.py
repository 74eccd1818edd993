"""Training batches from the corpus: shapes, splits, epoch coverage, resize, augmentation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from particleseg_model.corpus.labels import resize_images, resize_labels
from particleseg_model.corpus.store import open_corpus, write_corpus
from particleseg_model.model.loader import CorpusBatches, corpus_pydataset
from particleseg_model.model.predict import model_input, normalise_for_model

ATTRS = {"pixel_size_a": 2.0, "threshold": 10.0, "edge_px": 11, "source_star": "sim.star"}
REPO = Path(__file__).resolve().parents[1]


def pattern(box: int) -> np.ndarray:
    """An asymmetric label pattern: no flip or rotation maps it onto itself."""
    y = np.zeros((box, box), dtype=np.uint8)
    y[2 : box - 3, 3:6] = 1  # a long bar on the left
    y[box - 6 : box - 3, 3 : box - 4] = 1  # a foot along the bottom: an "L"
    y[2:5, box - 5 : box - 2] = 2  # a mark in the top right corner
    return y


def make_corpus(
    root: Path, key: str, n: int, box: int, seed: int, chunk: int = 8, kind: str = "random"
):
    rng = np.random.default_rng(seed)
    if kind == "pattern":
        labels = np.broadcast_to(pattern(box), (n, box, box)).copy()
        # the image encodes the label (after z-scoring: three levels in the same order)
        images = labels.astype(np.float32) + rng.uniform(0, 1, (n, 1, 1)).astype(np.float32)
    else:
        images = rng.normal(size=(n, box, box)).astype(np.float32)
        labels = rng.integers(0, 3, (n, box, box)).astype(np.uint8)
    table = pd.DataFrame({"image_name": [f"{i}@{key}.mrcs" for i in range(n)]})
    return write_corpus(root, key, images, labels, table, attrs=ATTRS, chunk_particles=chunk)


@pytest.fixture
def two_datasets(tmp_path: Path):
    make_corpus(tmp_path, "10028", 90, 24, seed=0)
    make_corpus(tmp_path, "10406", 61, 32, seed=1, chunk=16)
    return tmp_path


def epoch_samples(batches: CorpusBatches) -> list[tuple[str, int]]:
    return [s for i in range(len(batches)) for s in batches.batch_indices(i)]


def test_shapes_dtypes_and_split_coverage(two_datasets: Path):
    for split in ("train", "val", "test"):
        b = CorpusBatches.from_root(two_datasets, split=split, batch_size=7, size=40)
        expected = {
            (key, int(i))
            for key in ("10028", "10406")
            for i in open_corpus(two_datasets, key).split_indices(split)
        }
        samples = epoch_samples(b)
        assert len(samples) == len(set(samples)) == b.n_samples == len(expected)
        assert set(samples) == expected  # exactly the split, each particle once
        x, y = b[0]
        assert x.shape == (7, 40, 40, 1) and x.dtype == np.float32
        assert y.shape == (7, 40, 40) and y.dtype == np.uint8
        assert set(np.unique(y)) <= {0, 1, 2}
        assert len(b[len(b) - 1][0]) == b.n_samples - 7 * (len(b) - 1)
    assert (
        len(
            CorpusBatches.from_root(two_datasets, split=None, batch_size=7, size=40, drop_last=True)
        )
        == 151 // 7
    )


def test_epochs_reshuffle_deterministically_and_stay_chunk_local(two_datasets: Path):
    b = CorpusBatches.from_root(
        two_datasets, split=None, batch_size=5, size=32, seed=4, buffer_chunks=2
    )
    first = epoch_samples(b)
    b.on_epoch_end()
    second = epoch_samples(b)
    assert sorted(first) == sorted(second) and first != second
    again = CorpusBatches.from_root(
        two_datasets, split=None, batch_size=5, size=32, seed=4, buffer_chunks=2
    )
    assert epoch_samples(again) == first  # same seed and epoch: same order
    chunks = {"10028": 8, "10406": 16}
    for i in range(len(b)):  # a batch reads one window of 2 chunks (two where it straddles)
        assert len({(k, r // chunks[k]) for k, r in b.batch_indices(i)}) <= 4
    ordered = CorpusBatches.from_root(
        two_datasets, split=None, batch_size=5, size=32, shuffle=False
    )
    samples = epoch_samples(ordered)
    assert samples == [("10028", i) for i in range(90)] + [("10406", i) for i in range(61)]


def test_values_match_the_store_without_resize(tmp_path: Path):
    ds = make_corpus(tmp_path, "sim", 30, 24, seed=2)
    b = CorpusBatches([ds], split=None, batch_size=8, size=None, seed=1)
    for i in range(len(b)):
        x, y = b[i]
        rows = [r for _, r in b.batch_indices(i)]
        stored = ds.images.oindex[rows].astype(np.float32)
        # the network's input normalisation (predict.model_input), nothing else
        np.testing.assert_allclose(x[..., 0], normalise_for_model(stored), atol=1e-5)
        np.testing.assert_array_equal(y, ds.labels.oindex[rows])
        np.testing.assert_allclose(x[..., 0].std(axis=(1, 2)), 1, atol=1e-4)
    hot = CorpusBatches([ds], split=None, batch_size=8, size=None, seed=1, one_hot=True)
    x1, y1 = hot[1]
    _, y0 = b[1]
    assert y1.shape == (8, 24, 24, 3) and y1.dtype == np.float32
    np.testing.assert_array_equal(y1.sum(axis=-1), 1)
    np.testing.assert_array_equal(y1.argmax(axis=-1), y0)


def test_a_shrunk_box_reaches_the_network_with_spread_1(tmp_path: Path):
    """Area averaging 48 -> 16 px divides white noise's spread by 3; the network must still
    see spread 1, as prediction's model_input gives it (else a model trained on boxes at its
    size sees no contrast in a user's larger boxes, and the other way round)."""
    ds = make_corpus(tmp_path, "big", 20, 48, seed=5)
    b = CorpusBatches([ds], split=None, batch_size=20, size=16, seed=1, shuffle=False)
    x, _ = b[0]
    np.testing.assert_allclose(x[..., 0].std(axis=(1, 2)), 1, atol=1e-4)
    stored = ds.images.oindex[list(range(20))].astype(np.float32)
    np.testing.assert_allclose(x[..., 0], model_input(stored, 16), atol=1e-4)


def test_augmentation_keeps_image_and_labels_aligned(tmp_path: Path):
    ds = make_corpus(tmp_path, "pat", 64, 20, seed=3, kind="pattern")
    b = CorpusBatches([ds], split=None, batch_size=16, size=None, flips=True, rot90=True, seed=7)
    base = pattern(20)
    variants = {
        (k, f): np.rot90(base, k)[:, ::-1] if f else np.rot90(base, k)
        for k in range(4)
        for f in (False, True)
    }
    stored = normalise_for_model(ds.images[:].astype(np.float32))  # what the network sees
    used = set()
    for i in range(len(b)):
        x, y = b[i]
        rows = [r for _, r in b.batch_indices(i)]
        for img, lab, row in zip(x[..., 0], y, rows, strict=True):
            match = [key for key, v in variants.items() if np.array_equal(v, lab)]
            assert len(match) == 1  # the labels are one symmetry of the stored pattern
            used.add(match[0])
            # the image underwent the same symmetry as its labels
            k, flip = match[0]
            expected = np.rot90(stored[row], k)[:, ::-1] if flip else np.rot90(stored[row], k)
            np.testing.assert_allclose(img, expected, atol=1e-5)
    assert len(used) == 8
    b.set_epoch(0)
    first = b[0][1]
    b.set_epoch(1)
    assert not np.array_equal(b[0][1], first)  # new draws each epoch
    b.set_epoch(0)
    np.testing.assert_array_equal(b[0][1], first)  # but reproducible


@pytest.mark.parametrize("size", [48, 37, 13])
def test_resize_keeps_codes_and_registration(two_datasets: Path, size: int):
    b = CorpusBatches.from_root(two_datasets, split="train", batch_size=9, size=size, seed=2)
    stores = {key: open_corpus(two_datasets, key) for key in ("10028", "10406")}
    for i in range(len(b)):
        x, y = b[i]
        assert x.shape == (len(y), size, size, 1)
        assert set(np.unique(y)) <= {0, 1, 2} and np.isfinite(x).all()
        for j, (key, row) in enumerate(b.batch_indices(i)):
            ds = stores[key]  # nearest for labels, bilinear up / area down for images
            np.testing.assert_array_equal(y[j], resize_labels(ds.labels[row], size))
            resized = resize_images(ds.images[row].astype(np.float32)[None], size)
            np.testing.assert_allclose(x[j, ..., 0], normalise_for_model(resized)[0], atol=1e-4)
    ordered = CorpusBatches.from_root(
        two_datasets, split=None, batch_size=4, size=48, shuffle=False
    )
    # doubling 24 px: every source label pixel becomes a 2x2 block
    np.testing.assert_array_equal(ordered[0][1][:, ::2, ::2], stores["10028"].labels[:4])
    np.testing.assert_array_equal(ordered[0][1][:, 1::2, 1::2], stores["10028"].labels[:4])


def test_bad_requests(two_datasets: Path):
    with pytest.raises(ValueError, match="unknown split"):
        CorpusBatches.from_root(two_datasets, split="training")
    with pytest.raises(ValueError, match="common size"):
        CorpusBatches.from_root(two_datasets, size=None)
    with pytest.raises(ValueError, match="resize mode"):
        CorpusBatches.from_root(two_datasets, image_resize="cubic")
    b = CorpusBatches.from_root(two_datasets, batch_size=50)
    with pytest.raises(IndexError):
        b[len(b)]


def test_pydataset_feeds_keras_fit(two_datasets: Path):
    keras = pytest.importorskip("keras")
    b = CorpusBatches.from_root(
        two_datasets, split="train", batch_size=16, size=16, flips=True, rot90=True
    )
    data = corpus_pydataset(b, workers=2)
    assert isinstance(data, keras.utils.PyDataset) and len(data) == len(b)
    model = keras.Sequential(
        [keras.Input((16, 16, 1)), keras.layers.Conv2D(3, 3, padding="same", activation="softmax")]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    history = model.fit(data, epochs=2, shuffle=False, verbose=0)
    assert len(history.history["loss"]) == 2
    assert b.epoch >= 2  # on_epoch_end moved to new orders (Keras also calls it before fit)


def test_tf_dataset_runs_epochs(two_datasets: Path):
    pytest.importorskip("tensorflow")
    from particleseg_model.model.loader import corpus_tf_dataset

    b = CorpusBatches.from_root(two_datasets, split="val", batch_size=4, size=16, one_hot=True)
    seen = [
        (tuple(x.shape[1:]), tuple(y.shape[1:]), len(x)) for x, y in corpus_tf_dataset(b, epochs=2)
    ]
    assert {s[:2] for s in seen} == {((16, 16, 1), (16, 16, 3))}
    assert sum(s[2] for s in seen) == 2 * b.n_samples and b.epoch == 2


def test_loader_import_does_not_load_tensorflow():
    code = (
        "import sys, particleseg_model.model.loader, particleseg_model.corpus.store; "
        "print(any(m in sys.modules for m in ('keras', 'tensorflow', 'torch', 'jax')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "False", out.stderr
