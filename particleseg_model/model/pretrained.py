"""The pretrained model shipped in the package (as Topaz ships its detectors in its wheel).

``particleseg_model/pretrained/`` holds one model folder in the registry's version layout:
``model.keras``, ``manifest.json`` (format, ``arch``, ``input_size``, ``edge_from_signal``,
the ``calibration``, ``metrics``, ``provenance`` of every training map and micrograph with its
licence, the recipe's ``config``, ``code_version`` and ``sha256`` of ``model.keras``) and
``LICENSE.md`` (the licences of its inputs). ``particleseg clean`` and ``segment`` use it when
no model is registered (:func:`particleseg_model.model.registry.resolve_model`); training in the
platform can start from it (``parent``).

It is rebuilt by one command, ``make pretrained`` (``scripts/build_pretrained.py``: the diverse
simulated corpus with real negatives, training, the measurements, then :func:`install`).

The model file is checked against the manifest's checksum before use: a missing or altered
file is one clear :class:`~particleseg_model.model.registry.ModelError`, never a silently
different model.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from particleseg_model.atomic import atomic_write_json
from particleseg_model.model.registry import (
    FORMAT,
    MANIFEST_FILE,
    MODEL_FILE,
    ModelError,
    ModelVersion,
    _read_manifest,
)

PRETRAINED_DIR = Path(__file__).resolve().parents[1] / "pretrained"
"""The shipped model's folder inside the installed package."""
VERSION_NAME = "pretrained"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def pretrained_model(folder: str | os.PathLike | None = None) -> ModelVersion:
    """The shipped model as a :class:`ModelVersion` (version ``"pretrained"``), its file
    verified against the manifest's ``sha256``.

    Raises:
        ModelError: the folder, its manifest or ``model.keras`` is missing, or the file's
            checksum differs from the manifest's (the message names the file and says how to
            rebuild it).
    """
    where = Path(folder) if folder is not None else PRETRAINED_DIR
    model_file = where / MODEL_FILE
    if not (where / MANIFEST_FILE).is_file():
        raise ModelError(
            f"{where / MANIFEST_FILE}: the pretrained model is not installed "
            "(rebuild it with `make pretrained`, or give --model)"
        )
    manifest = _read_manifest(where)
    if not model_file.is_file():
        raise ModelError(f"{model_file}: the pretrained model file is missing (`make pretrained`)")
    expected = manifest.get("sha256")
    actual = sha256_file(model_file)
    if expected != actual:
        raise ModelError(
            f"{model_file}: checksum {actual[:12]}... differs from the manifest's "
            f"{str(expected)[:12]}...: the pretrained model was altered or truncated "
            "(reinstall the package or run `make pretrained`)"
        )
    return ModelVersion(VERSION_NAME, where, manifest)


def install(
    keras_file: str | os.PathLike,
    manifest: dict[str, Any],
    *,
    licence_text: str,
    extra_files: dict[str, str | os.PathLike] | None = None,
    folder: str | os.PathLike | None = None,
) -> ModelVersion:
    """Install a trained network as the shipped model, replacing the folder atomically.

    ``manifest`` gets ``format`` and ``sha256`` (of the copied file) added; ``licence_text``
    becomes ``LICENSE.md``; ``extra_files`` (name -> path) are copied beside (figures, the
    training history). Returns the installed model, verified.
    """
    target = Path(folder) if folder is not None else PRETRAINED_DIR
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        shutil.copyfile(keras_file, staged / MODEL_FILE)
        for name, path in (extra_files or {}).items():
            shutil.copyfile(path, staged / name)
        (staged / "LICENSE.md").write_text(licence_text)
        full = {"format": FORMAT, **manifest, "sha256": sha256_file(staged / MODEL_FILE)}
        atomic_write_json(staged / MANIFEST_FILE, full)
        if target.exists():
            old = target.with_name(f".{target.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(target, old)
            os.rename(staged, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staged, target)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return pretrained_model(target)
