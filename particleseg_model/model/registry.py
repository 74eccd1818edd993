"""The model registry: every trained segmentation model as a numbered version on disk.

Layout under the registry root (``$PARTICLESEG_DATA/models`` in the platform)::

    ROOT/v0001/model.keras        the Keras 3 model (architecture + weights)
    ROOT/v0001/manifest.json      what it was trained on and how (see :func:`register_model`)
    ROOT/v0001/*.png, *.csv       training curve, history, anything the trainer staged
    ROOT/LATEST                   the name of the latest version ("v0003")

A version is staged in ``ROOT/.staging-*`` and renamed into place under a lock, then
``LATEST`` is replaced atomically: a training that fails never changes what ``latest`` returns,
and an interrupted one leaves only a staging folder that the next registration removes.

Remote roots (fsspec URLs: ``s3://bucket/models``, ``memory://models``; same layout)
    Keras saves and loads local files, so a version is staged in a local folder
    (:func:`staging_dir`: under ``$PARTICLESEG_WORK/model-cache``, default
    ``./data/work/model-cache``) and uploaded file by file to ``ROOT/vNNNN/``, its
    ``manifest.json`` last: a version without a manifest is an upload in progress (or killed)
    and is never listed, so the manifest PUT commits the version and the ``LATEST`` PUT (one
    small object, atomic on object stores) then makes it the latest. An upload starts with a
    ``vNNNN/.started`` stamp (milliseconds since 1970); the number is one above every version
    folder, committed or not, so a killed upload's files are never mixed with a new one's, and
    the next registration deletes manifest-less folders started over 24 h ago. There is no lock
    on an object store: register one model at a time (the platform's ``train`` pool runs one
    training at a time). Reading a version downloads it once into the same cache (keyed by
    the registry URL and the manifest's hash: a version never changes once committed);
    :attr:`ModelVersion.path` is that local copy and :attr:`ModelVersion.location` the URL.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from particleseg_model.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from particleseg_model.storage import is_remote, join, local_path, work_dir

FORMAT = "particleseg-model/1"
MODEL_FILE = "model.keras"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "LATEST"
_VERSION = re.compile(r"v(\d{4,})")
STARTED_FILE = ".started"  # remote uploads: when the upload of a version began (ms since 1970)
STALE_UPLOAD_S = 24 * 3600.0


class ModelError(ValueError):
    """A model that cannot be used here; the message names the file and the reason."""


@dataclass(frozen=True)
class ModelVersion:
    """One registered model."""

    version: str
    path: Path
    """The local folder of the version's files (remote registries: the local cache copy,
    downloaded by :meth:`fetch`, which :attr:`model_path` calls)."""
    manifest: dict[str, Any]
    location: str | None = None
    """The version folder's URL in a remote registry; None for a local one."""

    @property
    def address(self) -> str:
        """Where the version is registered: its URL, or its local folder."""
        return self.location or str(self.path)

    @property
    def model_location(self) -> str:
        """Where the version's ``model.keras`` is registered: a URL or a local path."""
        return f"{self.location}/{MODEL_FILE}" if self.location else str(self.path / MODEL_FILE)

    @property
    def model_path(self) -> Path:
        """The local ``model.keras`` (downloaded first from a remote registry)."""
        return self.fetch() / MODEL_FILE

    def fetch(self) -> Path:
        """The local folder holding the version's files; a remote version is downloaded into
        the cache on first use (to a temporary name, then renamed: a killed download is never
        taken for a copy)."""
        if self.location is None or (self.path / MANIFEST_FILE).is_file():
            return self.path
        import fsspec

        fs, base = fsspec.core.url_to_fs(self.location)
        base = base.rstrip("/")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        part = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=".fetch-"))
        try:
            for source in fs.find(base):
                relative = source[len(base) :].lstrip("/")
                if not relative or relative == STARTED_FILE:
                    continue
                target = part / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(source, str(target))
            try:  # a folder swap: the version is a directory
                os.rename(part, self.path)
            except OSError:  # another process fetched it first: the same immutable files
                if not (self.path / MANIFEST_FILE).is_file():
                    raise
        finally:
            shutil.rmtree(part, ignore_errors=True)
        return self.path

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


# ------------------------------------------------------------------------------ remote roots


def _remote(root: str | os.PathLike) -> tuple[Any, str, str]:
    """(fsspec file system, its path of the root, the root URL) of a remote root."""
    import fsspec

    url = os.fspath(root).rstrip("/")
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/"), url


def cache_dir() -> Path:
    """Where remote versions are downloaded and staged: ``$PARTICLESEG_WORK/model-cache``."""
    return work_dir() / "model-cache"


def _cache_path(url: str, name: str, manifest_bytes: bytes) -> Path:
    registry = hashlib.sha256(url.encode()).hexdigest()[:16]
    content = hashlib.sha256(manifest_bytes).hexdigest()[:12]
    return cache_dir() / registry / f"{name}-{content}"


def _remote_version(root: str | os.PathLike, name: str) -> ModelVersion | None:
    """A committed remote version (None when it has no manifest: not registered)."""
    fs, path, url = _remote(root)
    where = f"{url}/{name}/{MANIFEST_FILE}"
    try:
        data = fs.cat_file(f"{path}/{name}/{MANIFEST_FILE}")
    except FileNotFoundError:
        return None
    try:
        manifest = json.loads(data)
    except json.JSONDecodeError as exc:
        raise ModelError(f"{where}: manifest is not JSON ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise ModelError(f"{where}: format {manifest.get('format')!r}, this code reads {FORMAT!r}")
    return ModelVersion(name, _cache_path(url, name, data), manifest, f"{url}/{name}")


def _remote_folders(root: str | os.PathLike) -> list[tuple[int, str]]:
    """(number, name) of every version folder under a remote root, committed or not."""
    fs, path, _ = _remote(root)
    fs.invalidate_cache(path)  # a listing cache (s3fs keeps one) hides others' writes
    if not fs.exists(path):
        return []
    names = (p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    return sorted((int(m.group(1)), n) for n in names if (m := _VERSION.fullmatch(n)))


def _register_remote(
    root: str | os.PathLike, staged: Path, manifest: dict[str, Any]
) -> ModelVersion:
    fs, path, url = _remote(root)
    now = time.time()
    folders = _remote_folders(root)
    for _, name in folders:  # killed uploads: no manifest, started long ago
        if fs.exists(f"{path}/{name}/{MANIFEST_FILE}"):
            continue
        try:
            started = int(fs.cat_file(f"{path}/{name}/{STARTED_FILE}")) / 1000
        except (FileNotFoundError, ValueError):
            continue  # not ours to judge
        if now - started > STALE_UPLOAD_S:
            fs.rm(f"{path}/{name}", recursive=True)
    name = f"v{max((n for n, _ in folders), default=0) + 1:04d}"
    full = _full_manifest(manifest, name)
    body = json.dumps(full, indent=2, default=str).encode()
    target = f"{path}/{name}"
    fs.pipe_file(f"{target}/{STARTED_FILE}", str(int(now * 1000)).encode())
    files = sorted(p for p in staged.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    for file in files:
        fs.put_file(str(file), f"{target}/{file.relative_to(staged).as_posix()}")
    fs.pipe_file(f"{target}/{MANIFEST_FILE}", body)  # commits the version
    fs.pipe_file(f"{path}/{LATEST_FILE}", (name + "\n").encode())  # makes it the latest
    with contextlib.suppress(Exception):  # committed already; a stamp left over is harmless
        fs.rm_file(f"{target}/{STARTED_FILE}")
    # the staged folder becomes the cached copy (the same bytes as uploaded)
    atomic_write_bytes(staged / MANIFEST_FILE, body)
    cached = _cache_path(url, name, body)
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(staged, cached)
    except OSError:  # another file system or already there: keep the upload, drop the stage
        shutil.rmtree(staged, ignore_errors=True)
    return ModelVersion(name, cached, full, f"{url}/{name}")


def _full_manifest(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    from particleseg_model.version import code_version

    return {
        **manifest,
        "format": FORMAT,
        "version": name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "code_version": code_version(),
    }


# ------------------------------------------------------------------------------ the registry


def list_models(root: str | os.PathLike) -> list[ModelVersion]:
    """Every registered version under ``root``, oldest first."""
    if is_remote(root):
        found = (_remote_version(root, name) for _, name in _remote_folders(root))
        return [v for v in found if v is not None]
    base = local_path(root)
    if not base.is_dir():
        return []
    found = sorted(
        (int(m.group(1)), p)
        for p in base.iterdir()
        if p.is_dir() and (m := _VERSION.fullmatch(p.name))
    )
    return [ModelVersion(p.name, p, _read_manifest(p)) for _, p in found]


def get_model(root: str | os.PathLike, version: str) -> ModelVersion:
    """A version by name (``"v0002"`` or ``"2"``)."""
    text = str(version).strip()
    if not re.fullmatch(r"v?\d+", text):
        known = ", ".join(v.version for v in list_models(root)) or "none"
        raise ModelError(
            f"model {version!r}: not a version name (v0002 or 2) of the registry {root} "
            f"(known: {known})"
        )
    name = f"v{int(text.removeprefix('v')):04d}"
    if is_remote(root):
        found = _remote_version(root, name)
        if found is None:
            known = ", ".join(v.version for v in list_models(root)) or "none"
            raise ModelError(f"model {version!r} is not registered under {root} (known: {known})")
        return found
    folder = local_path(root) / name
    if not folder.is_dir():
        known = ", ".join(v.version for v in list_models(root)) or "none"
        raise ModelError(f"model {version!r} is not registered under {root} (known: {known})")
    return ModelVersion(name, folder, _read_manifest(folder))


def latest_model(root: str | os.PathLike) -> ModelVersion | None:
    """The version ``LATEST`` names, or None when nothing is registered yet."""
    if is_remote(root):
        fs, path, _ = _remote(root)
        try:
            name = fs.cat_file(f"{path}/{LATEST_FILE}").decode().strip()
        except FileNotFoundError:
            return None
        return get_model(root, name)
    pointer = local_path(root) / LATEST_FILE
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    try:
        return get_model(root, name)
    except ModelError as exc:
        known = ", ".join(v.version for v in list_models(root)) or "none"
        raise ModelError(
            f"{pointer}: {LATEST_FILE} names {name!r}, which is not a registered version "
            f"here (known: {known}); write the latest version's name into {LATEST_FILE} "
            f"or give --model"
        ) from exc


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
    """A fresh folder to stage a version in (the trainer writes its files there); local
    for a remote root too (under :func:`cache_dir`)."""
    base = cache_dir() if is_remote(root) else local_path(root)
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=base, prefix=".staging-"))


def register_model(
    root: str | os.PathLike, staged: str | os.PathLike, manifest: dict[str, Any]
) -> ModelVersion:
    """Register the staged folder (holding ``model.keras``) as the next version and make it
    the latest. ``manifest`` should carry ``input_size``, ``channels``, ``arch``,
    ``partitions`` (training particles per partition), ``parent``, ``config``, ``metrics``;
    ``format``, ``version``, ``created`` and ``code_version`` are added here."""
    staged = Path(staged)
    if not (staged / MODEL_FILE).is_file():
        raise ModelError(f"{staged}: nothing to register ({MODEL_FILE} missing)")
    if "input_size" not in manifest:
        raise ModelError("the manifest needs input_size")
    if is_remote(root):
        return _register_remote(root, staged, manifest)
    base = local_path(root)
    with _locked(base):
        for leftover in base.glob(".staging-*"):
            if leftover != staged and time.time() - leftover.stat().st_mtime > 24 * 3600:
                shutil.rmtree(leftover, ignore_errors=True)
        numbers = [int(m.group(1)) for p in base.iterdir() if (m := _VERSION.fullmatch(p.name))]
        name = f"v{max(numbers, default=0) + 1:04d}"
        full = _full_manifest(manifest, name)
        atomic_write_json(staged / MANIFEST_FILE, full)
        os.rename(staged, base / name)  # a folder swap: the version is a directory
        atomic_write_text(base / LATEST_FILE, name + "\n")
    return ModelVersion(name, base / name, full)


PRETRAINED_DIR = Path(__file__).resolve().parents[1] / "pretrained"
"""The shipped model's folder inside the installed package (see
:mod:`particleseg_model.model.pretrained`)."""
PRETRAINED_VERSION = "pretrained"


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
    return ModelVersion(PRETRAINED_VERSION, where, manifest)


def resolve_model(
    model: str | os.PathLike | None = None, models_root: str | os.PathLike | None = None
) -> ModelVersion:
    """The version a user asked for: ``model`` (a version folder or its ``model.keras``; a
    path or a registry URL), or the latest under ``models_root`` (default
    ``$PARTICLESEG_DATA/models``, else ``./data/models``), or, when nothing is registered
    there, the pretrained model shipped in the package (:mod:`particleseg_model.model.pretrained`,
    version ``"pretrained"``, checksum verified); FileNotFoundError when there is neither."""
    if model is None:
        root = models_root or join(os.environ.get("PARTICLESEG_DATA") or "data", "models")
        version = latest_model(root)
        if version is None:
            if (PRETRAINED_DIR / MANIFEST_FILE).is_file() or (PRETRAINED_DIR / MODEL_FILE).exists():
                return pretrained_model()  # the shipped model; altered: a ModelError
            raise FileNotFoundError(
                f"no model registered under {root} and no pretrained model installed: "
                "train one (dagster train_job, make pretrained) or give --model"
            )
        return version
    if is_remote(model):
        url = os.fspath(model).rstrip("/")
        url = url.removesuffix(f"/{MODEL_FILE}")
        parent, name = url.rsplit("/", 1)
        return get_model(parent, name)
    return _model_at(local_path(model))


def _model_at(where: Path) -> ModelVersion:
    """The model at a local path: any folder holding a valid ``manifest.json`` (a registry's
    ``vNNNN``, or a copy of one anywhere, under any name), the ``.keras`` file in such a
    folder, or a registry root (its ``LATEST``)."""
    if not where.exists():
        raise ModelError(
            f"{where}: no such model folder or file (a model is a folder holding "
            f"{MODEL_FILE} and {MANIFEST_FILE}, e.g. data/models/v0001)"
        )
    folder = where if where.is_dir() else where.parent
    if where.is_file() and where.suffix != ".keras":
        raise ModelError(f"{where}: not a model: give its folder or its {MODEL_FILE}")
    if (folder / MANIFEST_FILE).is_file():
        manifest = _read_manifest(folder)
        return ModelVersion(str(manifest.get("version") or folder.name), folder, manifest)
    if where.is_dir() and (where / LATEST_FILE).is_file():
        latest = latest_model(where)
        if latest is not None:
            return latest
    raise ModelError(
        f"{folder}: not a particleSeg model: no {MANIFEST_FILE} there (a model is a folder "
        f"holding {MODEL_FILE} and {MANIFEST_FILE}, e.g. data/models/v0001, or a registry "
        f"with {LATEST_FILE})"
    )


def _check_archive(path: Path) -> None:
    """A ``.keras`` file is a zip archive: one cut short (an interrupted copy or download) or
    overwritten has no complete central directory. Say so, rather than Keras' message."""
    import zipfile

    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ModelError(
            f"{path}: model file is corrupt or truncated ({size:,} bytes, not a complete "
            f".keras archive: {exc}); copy or download it again"
        ) from None
    if broken is not None:
        raise ModelError(
            f"{path}: model file is corrupt ({broken} in the archive fails its checksum); "
            "copy or download it again"
        )


def load_model(model: str | os.PathLike | ModelVersion, *, expect_size: int | None = None):
    """The Keras model of a registered version, a version folder, or a ``.keras`` file beside
    its manifest (a path, or a URL in a remote registry: downloaded once into the cache);
    inference only (not compiled). ``expect_size`` refuses a model trained at another input
    size."""
    import keras

    if not isinstance(model, ModelVersion) and is_remote(model):
        model = resolve_model(model)
    if isinstance(model, ModelVersion):
        folder, path = model.fetch(), model.model_path
    else:
        path = Path(model)
        folder = path if path.is_dir() else path.parent
        path = folder / MODEL_FILE if path.is_dir() else path
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    _check_archive(path)
    manifest = _read_manifest(folder)
    size = int(manifest["input_size"])
    if expect_size is not None and size != expect_size:
        raise ModelError(f"{path}: trained at {size}x{size}, expected {expect_size}x{expect_size}")
    try:
        # typed as returning an optional object; a .keras file is a Model
        network = cast("keras.Model", keras.models.load_model(path, compile=False))
    except Exception as exc:  # keras raises several types for a file it cannot read
        raise ModelError(f"{path}: Keras cannot load it ({type(exc).__name__}: {exc})") from None
    shape = network.input_shape
    if tuple(shape[1:3]) != (size, size):
        raise ModelError(
            f"{path}: network input {shape[1:3]} disagrees with its manifest ({size}x{size})"
        )
    return network
