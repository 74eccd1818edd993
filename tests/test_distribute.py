"""Training under a tf.distribute strategy (``TrainConfig.distribute``).

MirroredStrategy runs on two *logical* CPU devices: TensorFlow splits the CPU only before it
initialises its devices, so the training runs in a fresh interpreter that does it first."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_partition

from particleseg_model.model.train import TrainConfig, train_segmentation

REPO = Path(__file__).resolve().parents[1]

# Two trainings in one interpreter with the CPU split in two: the default (no strategy: one
# device) and MirroredStrategy over both logical CPUs, from the same seed on the same batches.
SCRIPT = r"""
import json, sys
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras
from particleseg_model.model.train import TrainConfig, evaluate_partition, train_segmentation

corpus, out = sys.argv[1], sys.argv[2]
report = {"logical_cpus": len(tf.config.list_logical_devices("CPU"))}
for name in ("default", "mirrored"):
    config = TrainConfig(size=32, base_filters=8, batch_size=16, epochs=3, patience=3,
                         optimizer="adam", learning_rate=3e-3, distribute=name)
    lines = []
    result = train_segmentation(corpus, ["40001"], config, f"{out}/{name}", log=lines.append)
    # the saved model, loaded outside any strategy, segments the test split
    model = keras.models.load_model(result.model_path, compile=False)
    evaluation = evaluate_partition(model, corpus, "40001")
    predicted = evaluation.examples[2]
    report[name] = {"replicas": result.replicas, "strategy": result.strategy,
                    "loss": result.history["loss"], "val_loss": result.history["val_loss"],
                    "epochs": result.epochs_run, "mean_iou": evaluation.mean_iou,
                    "first_line": lines[0], "labels": predicted.astype(int).tolist()}
print("REPORT " + json.dumps(report))
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("distribute") / "corpus"
    # 213 particles: 175 train (the last batch of an epoch 15) and 17 validation particles,
    # odd batches that the mirrored run has to even out between the replicas
    write_partition(root, "40001", 213, seed=5)
    return root


@pytest.mark.slow
def test_mirrored_strategy_trains_on_two_replicas(corpus: Path, tmp_path: Path) -> None:
    import numpy as np

    from particleseg_model.corpus.store import open_corpus

    dataset = open_corpus(corpus, "40001")
    assert len(dataset.split_indices("train")) % 16 % 2 and len(dataset.split_indices("val")) % 2
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(corpus), str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(t for t in done.stdout.splitlines() if t.startswith("REPORT "))
    report = json.loads(line.removeprefix("REPORT "))
    assert report["logical_cpus"] == 2
    default, mirrored = report["default"], report["mirrored"]
    # the model was built inside the strategy's scope: Keras distributes its fit over 2 replicas
    assert (default["replicas"], mirrored["replicas"]) == (1, 2)
    assert mirrored["strategy"] == "mirrored" and "2 replicas (mirrored)" in mirrored["first_line"]
    assert mirrored["epochs"] == default["epochs"] == 3
    # it learnt: the loss fell and the discs are found on the test split
    assert mirrored["loss"][-1] < 0.7 * mirrored["loss"][0]
    assert mirrored["mean_iou"] > 0.35  # all background scores 0.25 (one class of three)
    # the same global batches from the same start: each step's gradient is the mean over the
    # global batch, so the run follows the single-device one (batch-norm statistics are per
    # replica, hence not bit for bit)
    assert np.allclose(mirrored["loss"], default["loss"], rtol=0.15)
    assert abs(mirrored["mean_iou"] - default["mean_iou"]) < 0.15
    agree = np.mean(np.array(mirrored["labels"]) == np.array(default["labels"]))
    assert agree > 0.85


def test_distribute_is_validated(corpus: Path, tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(ValueError, match="distribute must be one of default, mirrored"):
        train_segmentation(corpus, ["40001"], TrainConfig(distribute="horovod"), tmp_path)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs TF_CONFIG"):
        TrainConfig(distribute="multi_worker").check()
    TrainConfig(distribute="mirrored").check()


@pytest.mark.parametrize(
    "tf_config, where",
    [
        (None, "out"),
        ({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 0}}, "out"),
        (
            {"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}},
            "out/worker-1",
        ),
        (
            {
                "cluster": {"chief": ["c:1"], "worker": ["a:1"]},
                "task": {"type": "chief", "index": 0},
            },
            "out",
        ),
        (
            {
                "cluster": {"chief": ["c:1"], "worker": ["a:1"]},
                "task": {"type": "worker", "index": 0},
            },
            "out/worker-0",
        ),
    ],
)
def test_only_the_chief_writes_the_result(monkeypatch, tmp_path: Path, tf_config, where):
    from particleseg_model.model.train import _output_dir

    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", json.dumps(tf_config))
    assert _output_dir(tmp_path / "out") == tmp_path / where


def test_the_asset_passes_the_strategy_on() -> None:
    from particleseg_assets.assets.model import ModelConfig, _train_config

    assert _train_config(ModelConfig()).distribute == "default"
    config = _train_config(ModelConfig(distribute="mirrored", batch_size=64))
    assert (config.distribute, config.batch_size) == ("mirrored", 64)
    with pytest.raises(ValueError, match="distribute must be one of"):
        _train_config(ModelConfig(distribute="Mirrored")).check()
