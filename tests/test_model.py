"""Training, the model registry, evaluation and segmenting a STAR file, on tiny corpora."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import BOX, TINY, disc_particles, write_partition, write_star_project

from particleseg_model.corpus.store import CorpusWriter, open_corpus
from particleseg_model.model.predict import predict_labels
from particleseg_model.model.registry import (
    ModelError,
    get_model,
    latest_model,
    list_models,
    load_model,
    register_model,
    staging_dir,
)
from particleseg_model.model.train import (
    TrainConfig,
    evaluate_partition,
    train_segmentation,
    training_curve_png,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("model") / "corpus"
    write_partition(root, "40001", 320, seed=1)
    write_partition(root, "40002", 320, seed=2)
    write_partition(root, "40003", 160, seed=3)
    return root


@pytest.fixture(scope="module")
def trained(corpus: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("trained")
    result = train_segmentation(
        corpus, ["40001", "40002"], TrainConfig(**TINY), out, log=lambda line: None
    )
    return result


def test_training_learns_the_discs(trained, corpus: Path) -> None:
    assert trained.model_path.is_file() and trained.mode == "full"
    assert trained.train_particles == {
        k: len(open_corpus(corpus, k).split_indices("train")) for k in ("40001", "40002")
    }
    losses = trained.history["loss"]
    assert len(losses) == trained.epochs_run >= 3 and losses[-1] < 0.6 * losses[0]
    assert len(trained.history["val_loss"]) == trained.epochs_run
    assert (trained.model_path.parent / "history.csv").read_text().startswith("epoch")
    import keras

    model = keras.models.load_model(trained.model_path, compile=False)
    seen = evaluate_partition(model, corpus, "40001")
    unseen = evaluate_partition(model, corpus, "40003")  # never trained on
    assert seen.particles == len(open_corpus(corpus, "40001").split_indices("test"))
    assert seen.mean_iou > 0.6 and unseen.mean_iou > 0.6
    assert seen.scores["iou_signal"] > 0.75
    images, truth, predicted = seen.examples
    assert images.shape == truth.shape == predicted.shape == (8, BOX, BOX)


def test_prediction_at_another_box_keeps_the_box(trained) -> None:
    import keras

    model = keras.models.load_model(trained.model_path, compile=False)
    images, labels = disc_particles(6, box=48, seed=9)
    predicted = predict_labels(model, images)
    assert predicted.shape == (6, 48, 48) and predicted.dtype == np.uint8
    assert set(np.unique(predicted)) <= {0, 1, 2}
    # the disc is found at the larger box: signal agrees with the truth on most of its pixels
    overlap = ((predicted == 1) & (labels == 1)).sum() / (labels == 1).sum()
    assert overlap > 0.6
    with pytest.raises(ValueError, match="squares"):
        predict_labels(model, np.zeros((2, 32, 40), np.float32))


def test_incremental_training_starts_from_the_parent(
    trained, corpus: Path, tmp_path: Path, monkeypatch
):
    from particleseg_model.model import train as train_module

    # count the training steps Keras actually runs (a callback on every batch), not the config's
    steps_run = []
    make = train_module._EpochLog.make

    def counting(log, n_images_per_epoch):
        callback = make(log, n_images_per_epoch)
        callback.on_train_batch_end = lambda batch, logs=None: steps_run.append(batch)
        return callback

    monkeypatch.setattr(train_module._EpochLog, "make", staticmethod(counting))
    result = train_segmentation(
        corpus,
        ["40001", "40002", "40003"],
        TrainConfig(**{**TINY, "epochs": 2}),
        tmp_path,
        parent=trained.model_path,
        new_ids=["40003"],
        log=lambda line: None,
    )
    assert result.mode == "incremental" and result.new_partitions == ["40003"]
    # started from a trained model: the first epoch's loss is already near the parent's last
    assert result.history["loss"][0] < 2 * trained.history["loss"][-1]
    # steps counted as Keras ran them, against the new partition's train split read from the
    # corpus: every step mixes a batch of new particles (16) with 8 replayed old ones
    n_new = len(open_corpus(corpus, "40003").split_indices("train"))
    assert len(steps_run) == result.epochs_run * -(-n_new // 16)
    assert result.images_seen == len(steps_run) * 24
    with pytest.raises(ValueError, match="input"):
        train_segmentation(
            corpus,
            ["40001", "40003"],
            TrainConfig(**{**TINY, "size": 64}),
            tmp_path / "other",
            parent=trained.model_path,
            new_ids=["40003"],
        )


def test_training_refuses_bad_input(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no corpus partitions"):
        train_segmentation(corpus, [], TrainConfig(**TINY), tmp_path)
    with pytest.raises(FileNotFoundError, match="40009"):
        train_segmentation(corpus, ["40009"], TrainConfig(**TINY), tmp_path)
    with pytest.raises(ValueError, match="optimizer"):
        train_segmentation(corpus, ["40001"], TrainConfig(**{**TINY, "optimizer": "sgd"}), tmp_path)
    with pytest.raises(ValueError, match="unknown split 'nope'"):
        evaluate_partition(None, corpus, "40001", split="nope")


def test_registry_versions_latest_and_refusals(trained, tmp_path: Path) -> None:
    root = tmp_path / "models"
    assert latest_model(root) is None and list_models(root) == []
    first = staging_dir(root)
    (first / "model.keras").write_bytes(trained.model_path.read_bytes())
    v1 = register_model(
        root,
        first,
        {"input_size": 32, "arch": "custom", "partitions": {"40001": 10}, "parent": None},
    )
    second = staging_dir(root)
    (second / "model.keras").write_bytes(trained.model_path.read_bytes())
    v2 = register_model(
        root,
        second,
        {
            "input_size": 32,
            "arch": "custom",
            "partitions": {"40001": 10, "40002": 5},
            "parent": v1.version,
        },
    )
    assert (v1.version, v2.version) == ("v0001", "v0002")
    assert latest_model(root).version == "v0002" and get_model(root, "1").version == "v0001"
    assert [v.version for v in list_models(root)] == ["v0001", "v0002"]
    assert latest_model(root).partitions == {"40001": 10, "40002": 5}
    manifest = json.loads((root / "v0002" / "manifest.json").read_text())
    assert manifest["format"] == "particleseg-model/1" and manifest["parent"] == "v0001"
    model = load_model(latest_model(root), expect_size=32)
    assert model.input_shape[1:3] == (32, 32)

    # a failed training stages nothing registrable: latest stays where it was
    empty = staging_dir(root)
    with pytest.raises(ModelError, match="model.keras missing"):
        register_model(root, empty, {"input_size": 32})
    assert latest_model(root).version == "v0002"
    with pytest.raises(ModelError, match="trained at 32x32, expected 256x256"):
        load_model(v1, expect_size=256)
    with pytest.raises(ModelError, match="not registered"):
        get_model(root, "v0009")
    # a model from another format version, and a manifest that lies about the input size
    manifest_path = root / "v0001" / "manifest.json"
    other = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**other, "format": "particleseg-model/0"}))
    with pytest.raises(ModelError, match="format 'particleseg-model/0'"):
        load_model(root / "v0001")
    manifest_path.write_text(json.dumps({**other, "input_size": 64}))
    with pytest.raises(ModelError, match="disagrees with its manifest"):
        load_model(root / "v0001")
    (root / "v0001" / "model.keras").write_bytes(b"not a model")
    manifest_path.write_text(json.dumps(other))
    with pytest.raises(ModelError, match="model file is corrupt or truncated"):
        load_model(root / "v0001")


def test_mask_calibration_describes_the_good_particles_masks(trained, corpus: Path) -> None:
    import keras

    from particleseg_model.model.calibration import mask_calibration, mask_features
    from particleseg_model.model.metrics import edge_to_signal

    model = keras.models.load_model(trained.model_path, compile=False)
    calibration = mask_calibration(model, corpus, ["40001", "40002"])
    val = sum(len(open_corpus(corpus, k).split_indices("val")) for k in ("40001", "40002"))
    assert calibration["particles"] == val
    # near the features of the true masks (the model learnt them)
    truth = open_corpus(corpus, "40001")
    labels = truth.labels.get_orthogonal_selection((truth.split_indices("val"),))
    true = mask_features(edge_to_signal(labels), (labels == 1).sum(axis=(1, 2)), BOX)
    assert np.allclose(calibration["mean"], true.mean(axis=0), atol=0.25)


def test_training_curve_png(trained, tmp_path: Path) -> None:
    path = training_curve_png(trained.history, tmp_path / "curve.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


# ------------------------------------------------------------------------ segmenting a STAR


@pytest.fixture(scope="module")
def registry(trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("registry") / "models"
    staged = staging_dir(root)
    (staged / "model.keras").write_bytes(trained.model_path.read_bytes())
    register_model(root, staged, {"input_size": 32, "arch": "custom", "partitions": {}})
    return root


def test_segment_command_writes_labels_in_star_order(
    registry: Path, tmp_path: Path, capsys
) -> None:
    from particleseg_model.cleaning.segment import read_labels
    from particleseg_model.cli import main

    star = write_star_project(tmp_path / "project", 40)
    out = tmp_path / "labels.zarr"
    code = main(
        [
            "segment",
            str(star),
            "--out",
            str(out),
            "--models-root",
            str(registry),
            "--batch",
            "16",
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "40 particles segmented with model v0001" in capsys.readouterr().out
    labels, attrs = read_labels(out)
    assert labels.shape == (40, BOX, BOX) and attrs["model_version"] == "v0001"
    assert attrs["resized"] is False and attrs["source_star"] == str(star.resolve())
    # row order: the labels of row i are the model's prediction for image i of the stack
    import mrcfile

    from particleseg_model.model.predict import stack_scale
    from particleseg_model.model.registry import load_model as load

    stack = mrcfile.read(star.parent / "Particles" / "stack.mrcs")
    # segment normalises as the corpus did, with one scale for the stack (all 40 rows here),
    # measured at the model's input size
    scale = stack_scale(stack, size=BOX)
    direct = predict_labels(load(registry / "v0001"), stack[[0, 17, 39]], scale=scale)
    assert np.array_equal(labels[[0, 17, 39]], direct)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]

    # the output is never overwritten, and a 48 px set is resized for the 32 px model
    assert (
        main(
            [
                "segment",
                str(star),
                "--out",
                str(out),
                "--models-root",
                str(registry),
                "--no-progress",
            ]
        )
        == 1
    )
    assert "exists" in capsys.readouterr().err
    big = write_star_project(tmp_path / "big", 8, box=48)
    assert (
        main(
            [
                "segment",
                str(big),
                "--out",
                str(tmp_path / "big.zarr"),
                "--models-root",
                str(registry),
                "--no-progress",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "particles are 48 px, the model takes 32 px" in captured.err
    assert read_labels(tmp_path / "big.zarr")[0].shape == (8, 48, 48)


def test_segment_refuses_non_square_images_and_no_model(
    registry: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    import mrcfile

    from particleseg_model.model import registry as pretrained

    # no registered model and no shipped one (the shipped one is the fallback otherwise)
    monkeypatch.setattr(pretrained, "PRETRAINED_DIR", tmp_path / "no-pretrained")

    from particleseg_model.cli import main

    star = write_star_project(tmp_path / "project", 4)
    with mrcfile.new(star.parent / "Particles" / "stack.mrcs", overwrite=True) as mrc:
        mrc.set_data(np.zeros((4, 32, 40), np.float32))
    assert (
        main(
            [
                "segment",
                str(star),
                "--out",
                str(tmp_path / "x.zarr"),
                "--models-root",
                str(registry),
                "--no-progress",
            ]
        )
        == 1
    )
    assert "40 x 32 pixels, not square" in capsys.readouterr().err
    assert (
        main(
            [
                "segment",
                str(star),
                "--out",
                str(tmp_path / "y.zarr"),
                "--models-root",
                str(tmp_path / "empty"),
                "--no-progress",
            ]
        )
        == 1
    )
    assert "no model registered" in capsys.readouterr().err
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "y.zarr").exists()
    assert os.listdir(tmp_path) == ["project"]


def test_known_junk_is_left_out_of_training_and_scored_apart(tmp_path: Path) -> None:
    from particleseg_model.model.loader import CorpusBatches

    images, labels = disc_particles(200, seed=5)
    good = np.arange(200) % 4 != 0
    images[~good] = np.random.default_rng(0).normal(size=(int((~good).sum()), BOX, BOX))
    with CorpusWriter(tmp_path, "40010", BOX, attrs={"pixel_size_a": 2.0}) as writer:
        writer.append(
            images, labels, {"image_name": [f"{i + 1}@s.mrcs" for i in range(200)], "is_good": good}
        )
    dataset = open_corpus(tmp_path, "40010")
    train_rows = dataset.split_indices("train")
    kept = CorpusBatches([dataset], split="train", good_only=True, size=None)
    assert kept.n_samples == int(good[train_rows].sum()) < len(train_rows)
    assert CorpusBatches([dataset], split="train", size=None).n_samples == len(train_rows)
    # junk kept with background labels: every train particle, junk ones without signal
    background = CorpusBatches(
        [dataset],
        split="train",
        junk_background=True,
        size=None,
        shuffle=False,
        batch_size=len(train_rows),
    )
    _, y = background[0]
    assert len(y) == len(train_rows)
    assert not y[~good[train_rows]].any() and y[good[train_rows]].any(axis=(1, 2)).all()
    with pytest.raises(ValueError, match="junk must be"):
        TrainConfig(junk="ignore").check()

    class Oracle:  # predicts the true labels of the good particles and nothing on noise
        input_shape = (None, BOX, BOX, 1)

        def predict_on_batch(self, x):
            disc = np.asarray(x[..., 0]) > 0.8
            return np.stack([~disc, disc, np.zeros_like(disc)], axis=-1).astype(np.float32)

    evaluation = evaluate_partition(Oracle(), tmp_path, "40010")
    test_rows = dataset.split_indices("test")
    assert evaluation.particles == len(test_rows)
    assert evaluation.good_particles == int(good[test_rows].sum())
    # the junk rows' labels show a disc that is not in the image: only the good-only signal
    # IoU is high
    assert evaluation.scores_good["iou_signal"] > evaluation.scores["iou_signal"] + 0.05
