"""The model registry: every trained segmentation model as a numbered version on disk.

Layout under the registry root (``$PARTICLESEG_DATA/models`` in the platform)::

    ROOT/v0001/model.keras        the Keras 3 model (architecture + weights)
    ROOT/v0001/manifest.json      what it was trained on and how (see :func:`register_model`)
    ROOT/v0001/*.png, *.csv       training curve, history, anything the trainer staged
    ROOT/LATEST                   the name of the latest version ("v0003")

A version is staged in ``ROOT/.staging-*`` and renamed into place under a lock, then
``LATEST`` is replaced atomically: a training that fails never changes what ``latest`` returns,
and an interrupted one leaves only a staging folder that the next registration removes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

FORMAT = "particleseg-model/1"
MODEL_FILE = "model.keras"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "LATEST"
_VERSION = re.compile(r"v(\d{4,})")


class ModelError(ValueError):
    """A model that cannot be used here; the message names the file and the reason."""


@dataclass(frozen=True)
class ModelVersion:
    """One registered model."""

    version: str
    path: Path
    manifest: dict[str, Any]

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def input_size(self) -> int:
        return int(self.manifest["input_size"])

    @property
    def partitions(self) -> dict[str, int]:
        """Training particles per partition this version saw (its own and its parents')."""
        return dict(self.manifest.get("partitions", {}))


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path}: no manifest: not a registered particleSeg model") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: manifest is not JSON ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise ModelError(f"{path}: format {manifest.get('format')!r}, this code reads {FORMAT!r}")
    return manifest


def list_models(root: str | os.PathLike) -> list[ModelVersion]:
    """Every registered version under ``root``, oldest first."""
    base = Path(root)
    if not base.is_dir():
        return []
    found = sorted((int(m.group(1)), p) for p in base.iterdir()
                   if p.is_dir() and (m := _VERSION.fullmatch(p.name)))
    return [ModelVersion(p.name, p, _read_manifest(p)) for _, p in found]


def get_model(root: str | os.PathLike, version: str) -> ModelVersion:
    """A version by name (``"v0002"`` or ``"2"``)."""
    name = version if version.startswith("v") else f"v{int(version):04d}"
    folder = Path(root) / name
    if not folder.is_dir():
        known = ", ".join(v.version for v in list_models(root)) or "none"
        raise ModelError(f"model {version!r} is not registered under {root} (known: {known})")
    return ModelVersion(name, folder, _read_manifest(folder))


def latest_model(root: str | os.PathLike) -> ModelVersion | None:
    """The version ``LATEST`` names, or None when nothing is registered yet."""
    pointer = Path(root) / LATEST_FILE
    if not pointer.exists():
        return None
    return get_model(root, pointer.read_text().strip())


@contextmanager
def _locked(root: Path, timeout_s: float = 120.0) -> Iterator[None]:
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+b") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another registration holds {root / '.lock'}") from None
                time.sleep(0.05)
        yield


def staging_dir(root: str | os.PathLike) -> Path:
    """A fresh folder to stage a version in (the trainer writes its files there)."""
    base = Path(root)
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=base, prefix=".staging-"))


def register_model(root: str | os.PathLike, staged: str | os.PathLike,
                   manifest: dict[str, Any]) -> ModelVersion:
    """Register the staged folder (holding ``model.keras``) as the next version and make it
    the latest. ``manifest`` should carry ``input_size``, ``channels``, ``arch``,
    ``partitions`` (training particles per partition), ``parent``, ``config``, ``metrics``;
    ``format``, ``version``, ``created`` and ``code_version`` are added here."""
    from particleseg_model.corpus import _code_version

    base, staged = Path(root), Path(staged)
    if not (staged / MODEL_FILE).is_file():
        raise ModelError(f"{staged}: nothing to register ({MODEL_FILE} missing)")
    if "input_size" not in manifest:
        raise ModelError("the manifest needs input_size")
    with _locked(base):
        for leftover in base.glob(".staging-*"):
            if leftover != staged and time.time() - leftover.stat().st_mtime > 24 * 3600:
                shutil.rmtree(leftover, ignore_errors=True)
        numbers = [int(m.group(1)) for p in base.iterdir() if (m := _VERSION.fullmatch(p.name))]
        name = f"v{max(numbers, default=0) + 1:04d}"
        full = {**manifest, "format": FORMAT, "version": name,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "code_version": _code_version()}
        (staged / MANIFEST_FILE).write_text(json.dumps(full, indent=2, default=str))
        os.rename(staged, base / name)
        pointer = base / f".{LATEST_FILE}.{uuid.uuid4().hex}"
        pointer.write_text(name + "\n")
        os.replace(pointer, base / LATEST_FILE)
    return ModelVersion(name, base / name, full)


def resolve_model(model: str | os.PathLike | None = None,
                  models_root: str | os.PathLike | None = None) -> ModelVersion:
    """The version a user asked for: ``model`` (a version folder or its ``model.keras``), or
    the latest under ``models_root`` (default ``$PARTICLESEG_DATA/models``, else
    ``./data/models``); FileNotFoundError when nothing is registered there."""
    if model is None:
        root = Path(models_root or Path(os.environ.get("PARTICLESEG_DATA", "data")) / "models")
        version = latest_model(root)
        if version is None:
            raise FileNotFoundError(f"no model registered under {root}: train one "
                                    "(dagster train_job) or give --model")
        return version
    where = Path(model)
    folder = where if where.is_dir() else where.parent
    return get_model(folder.parent, folder.name)


def load_model(model: str | os.PathLike | ModelVersion, *, expect_size: int | None = None):
    """The Keras model of a registered version, a version folder, or a ``.keras`` file beside
    its manifest; inference only (not compiled). ``expect_size`` refuses a model trained at
    another input size."""
    import keras

    if isinstance(model, ModelVersion):
        folder, path = model.path, model.model_path
    else:
        path = Path(model)
        folder = path if path.is_dir() else path.parent
        path = folder / MODEL_FILE if path.is_dir() else path
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    manifest = _read_manifest(folder)
    size = int(manifest["input_size"])
    if expect_size is not None and size != expect_size:
        raise ModelError(f"{path}: trained at {size}x{size}, expected {expect_size}x{expect_size}")
    try:
        network = keras.models.load_model(path, compile=False)
    except Exception as exc:  # keras raises several types for a file it cannot read
        raise ModelError(f"{path}: Keras cannot load it ({type(exc).__name__}: {exc})") from None
    shape = network.input_shape
    if tuple(shape[1:3]) != (size, size):
        raise ModelError(f"{path}: network input {shape[1:3]} disagrees with its manifest "
                         f"({size}x{size})")
    return network
