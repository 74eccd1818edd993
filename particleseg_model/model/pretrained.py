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

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from particleseg_model.atomic import atomic_write_json
from particleseg_model.model import registry
from particleseg_model.model.registry import (
    FORMAT,
    MANIFEST_FILE,
    MODEL_FILE,
    ModelVersion,
    pretrained_model,
    sha256_file,
)

__all__ = ["install", "pretrained_model", "sha256_file"]


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
    target = Path(folder) if folder is not None else registry.PRETRAINED_DIR
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
