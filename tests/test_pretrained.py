"""The pretrained model in the package: install, checksum, fallback (issue 15, item 6)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from particleseg_model.model import registry as pretrained_module
from particleseg_model.model.pretrained import install, pretrained_model, sha256_file
from particleseg_model.model.registry import ModelError, resolve_model


@pytest.fixture(scope="module")
def tiny_keras(tmp_path_factory) -> Path:
    from particleseg_model.model.unet import build_unet

    path = tmp_path_factory.mktemp("net") / "net.keras"
    build_unet("unet", size=16, base_filters=2).save(path)
    return path


@pytest.fixture
def installed(tiny_keras, tmp_path) -> Path:
    folder = tmp_path / "pretrained"
    install(
        tiny_keras,
        {"arch": "unet", "input_size": 16, "provenance": {"maps": {"m": {"licence": "CC0"}}}},
        licence_text="# Licences\nCC0\n",
        folder=folder,
    )
    return folder


def test_install_writes_manifest_checksum_and_licence(installed, tiny_keras):
    manifest = json.loads((installed / "manifest.json").read_text())
    assert manifest["sha256"] == sha256_file(installed / "model.keras") == sha256_file(tiny_keras)
    assert manifest["format"] == "particleseg-model/1"
    assert (installed / "LICENSE.md").read_text().startswith("# Licences")
    version = pretrained_model(installed)
    assert version.version == "pretrained" and version.input_size == 16
    assert not list(installed.parent.glob(".pretrained-*"))  # no staging left behind


def test_altered_or_missing_file_is_one_clear_error(installed):
    model = installed / "model.keras"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="checksum .* differs .* altered or truncated"):
        pretrained_model(installed)
    model.unlink()
    with pytest.raises(ModelError, match="model file is missing"):
        pretrained_model(installed)
    with pytest.raises(ModelError, match="not installed"):
        pretrained_model(installed.parent / "nowhere")


def test_empty_registry_falls_back_to_the_pretrained_model(installed, tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained_module, "PRETRAINED_DIR", installed)
    version = resolve_model(None, tmp_path / "empty-registry")
    assert version.version == "pretrained" and version.path == installed
    from particleseg_model.model.predict import predict_labels
    from particleseg_model.model.registry import load_model

    labels = predict_labels(load_model(version), np.zeros((2, 40, 40), np.float32))
    assert labels.shape == (2, 40, 40)


def test_no_registry_and_no_pretrained_model_says_both(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained_module, "PRETRAINED_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="no pretrained model installed"):
        resolve_model(None, tmp_path / "empty-registry")


def test_the_shipped_model_verifies_when_installed():
    if not (pretrained_module.PRETRAINED_DIR / "manifest.json").is_file():
        pytest.skip("no pretrained model in this checkout (make pretrained builds it)")
    version = pretrained_model()
    manifest = version.manifest
    assert manifest["edge_from_signal"] is True and manifest["input_size"] == 64
    assert manifest["provenance"]["maps"] and manifest["calibration"]
    assert (version.path / "LICENSE.md").is_file()
    assert (version.path / "model.keras").stat().st_size < 8 * 2**20


def test_training_mode_pretrained_starts_from_the_shipped_model(installed, tmp_path, monkeypatch):
    from helpers import write_partition

    from particleseg_model.model.versions import plan_training

    monkeypatch.setattr(pretrained_module, "PRETRAINED_DIR", installed)
    corpus = tmp_path / "corpus"
    write_partition(corpus, "40001", 60, seed=1)
    plan = plan_training(corpus, tmp_path / "models", mode="pretrained", arch="unet", size=16)
    assert plan.incremental and plan.parent is not None and plan.parent.version == "pretrained"
    assert plan.new_ids == ("40001",)
    with pytest.raises(ValueError, match="shipped unet network at 16 px"):
        plan_training(corpus, tmp_path / "models", mode="pretrained", arch="custom", size=64)


def test_centre_probability_comes_with_the_labels(tiny_keras):
    import keras

    from particleseg_model.model.predict import (
        central_disc,
        predict_labels,
        predict_labels_and_centre,
    )

    network = keras.models.load_model(tiny_keras, compile=False)
    images = np.random.default_rng(0).standard_normal((5, 24, 24)).astype(np.float32)
    labels, centre = predict_labels_and_centre(network, images, batch=2)
    np.testing.assert_array_equal(labels, predict_labels(network, images, batch=2))
    assert centre.shape == (5,) and ((centre >= 0) & (centre <= 1)).all()
    disc = central_disc(24)
    assert disc[12, 12] and not disc[0, 0] and disc.sum() == pytest.approx(np.pi * 36, rel=0.15)
