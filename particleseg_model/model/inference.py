"""Inference engines: the network call of prediction, by ONNX Runtime when it is installed, else
by Keras.

Prediction (:mod:`particleseg_model.model.predict`) calls a network on float32
``(n, size, size, channels)`` images and gets its softmax ``(n, size, size, classes)``. Either
engine does that call for any registered model (the paper's custom network, the U-Nets, the
``keras.applications`` encoders, any input size):

- :class:`OnnxEngine` (the ``onnx`` extra: ``pip install 'particleseg[onnx]'``): the Keras model
  exported once to ONNX (``keras.Model.export(format="onnx")``, tf2onnx underneath) and run by
  ONNX Runtime. On the shipped U-Net it takes about 1.5 ms of CPU a particle against Keras'
  2.6 ms (docs/pretrained.md, "Speed"), and a run whose export is cached never imports
  TensorFlow (seconds of start-up). Its softmax differs from Keras' by float rounding only
  (about 1e-6): labels agree on all but a few pixels in a million (measured there).
- :class:`KerasEngine`: ``predict_on_batch`` of the loaded Keras model, as before.

:func:`load_engine` picks one (``engine`` argument, else ``$PARTICLESEG_ENGINE``, else
``auto``: ONNX Runtime when importable and the export succeeds, Keras otherwise, with one
line saying why). Exports are cached under :func:`onnx_cache_dir`, named by the SHA-256 of the
``model.keras`` they come from (a model file never changes under its name in the cache), the
newest :data:`CACHE_KEEP` kept.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from particleseg_model.atomic import atomic_path
from particleseg_model.model.registry import (
    ModelError,
    ModelVersion,
    load_model,
    sha256_file,
)

__all__ = [
    "CACHE_ENV",
    "CACHE_KEEP",
    "ENGINES",
    "ENGINE_ENV",
    "KerasEngine",
    "OnnxEngine",
    "export_onnx",
    "load_engine",
    "onnx_available",
    "onnx_cache_dir",
    "predict_batch",
]

ENGINES = ("auto", "onnx", "keras")
ENGINE_ENV = "PARTICLESEG_ENGINE"
CACHE_ENV = "PARTICLESEG_ONNX_CACHE"
CACHE_KEEP = 32
"""Exports kept in the cache (the most recently used): a few hundred kB to some MB each."""
EXPORT_FORMAT = 1
"""Part of a cached export's name: raised when the export changes (opset, signature), so an
old file is never taken for a new one."""
EXPORT_TOLERANCE = 1e-4
"""Largest difference of softmax allowed between an export and its Keras model on random
images (float rounding gives about 1e-6; measured 1e-7 to 4e-6 on the custom network, the
U-Net, DenseNet121 and ResNet101 encoders)."""

Log = Callable[[str], None]


def onnx_available() -> bool:
    """True when ONNX Runtime and the exporter (tf2onnx) can be imported (the ``onnx`` extra)."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "tf2onnx"))


def onnx_cache_dir() -> Path:
    """Where exports are cached: ``$PARTICLESEG_ONNX_CACHE``, else
    ``$XDG_CACHE_HOME/particleseg/onnx`` (default ``~/.cache/particleseg/onnx``)."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "particleseg" / "onnx"


def _cpu_count() -> int:
    """CPUs this process may run on (its affinity, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class KerasEngine:
    """A Keras model's ``predict_on_batch``, as an engine.

    Parameters
    ----------
    network
        A Keras model ``(b, size, size, channels) -> (b, size, size, classes)`` softmax.
    """

    name = "keras"

    def __init__(self, network: Any) -> None:
        self.network = network
        self.input_shape = tuple(network.input_shape)

    def predict_batch(self, images: np.ndarray) -> np.ndarray:
        """Softmax ``(n, size, size, classes)`` float32 of ``(n, size, size, channels)``."""
        return np.asarray(self.network.predict_on_batch(images), dtype=np.float32)


class OnnxEngine:
    """An exported model run by ONNX Runtime on the CPU.

    Parameters
    ----------
    model
        The ``.onnx`` file, or its bytes (read once, when the session is made).
    threads
        Threads of one network call; None: the CPUs this process may use. The threads sleep
        when they have no work (no spinning): on a busy machine a spinning pool takes the
        cores the rest of the pipeline and other jobs need (measured 2-3x slower at load 8 on
        2 cores).
    """

    name = "onnx"

    def __init__(self, model: str | os.PathLike | bytes, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or _cpu_count()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only: no optimiser chatter on stderr
        source = model if isinstance(model, bytes) else str(model)
        self._session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        first = self._session.get_inputs()[0]
        self._input = first.name
        self._output = self._session.get_outputs()[0].name
        # (None, size, size, channels): a symbolic batch dimension is a string in ONNX Runtime
        self.input_shape = tuple(d if isinstance(d, int) else None for d in first.shape)

    def predict_batch(self, images: np.ndarray) -> np.ndarray:
        """Softmax ``(n, size, size, classes)`` float32 of ``(n, size, size, channels)``."""
        feed = {self._input: np.ascontiguousarray(images, dtype=np.float32)}
        return np.asarray(self._session.run([self._output], feed)[0], dtype=np.float32)


def predict_batch(model: Any, images: np.ndarray) -> np.ndarray:
    """Softmax ``(n, size, size, classes)`` float32 of one batch by ``model``: an engine of this
    module, or a Keras model (its ``predict_on_batch``)."""
    run = getattr(model, "predict_batch", None)
    if run is not None:
        return run(images)
    return np.asarray(model.predict_on_batch(images), dtype=np.float32)


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """tf2onnx logs every step at INFO and Keras' patch of it warns about ``np.object``: none
    of it is the user's business."""
    logger = logging.getLogger("tf2onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_onnx(network: Any, path: str | os.PathLike) -> Path:
    """Write ``network`` (a Keras model) as ONNX to ``path``, with a free batch dimension.

    Parameters
    ----------
    network
        A Keras model with one image input ``(None, size, size, channels)``.
    path
        The ``.onnx`` file to write (replaced).

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    Exception
        Whatever the exporter raises for a model it cannot convert.
    """
    import tensorflow as tf

    shape = tuple(network.input_shape)
    signature = [tf.TensorSpec((None, *shape[1:]), tf.float32, name="image")]
    with _quiet_export():
        network.export(str(path), format="onnx", verbose=False, input_signature=signature)
    return Path(path)


def _checked_export(network: Any, path: Path) -> Path:
    """:func:`export_onnx`, then the export run by ONNX Runtime beside Keras on a few images:
    an export that does not run, or whose softmax differs from Keras' by more than
    :data:`EXPORT_TOLERANCE`, raises (ValueError), so no such file is ever cached (tf2onnx
    writes some graphs it cannot run: an EfficientNet's normalisation constants became inputs
    of the graph)."""
    export_onnx(network, path)
    shape = tuple(network.input_shape)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((2, *shape[1:])).astype(np.float32)
    expected = np.asarray(network.predict_on_batch(images), dtype=np.float32)
    try:
        got = OnnxEngine(path, threads=1).predict_batch(images)
    except Exception as exc:  # ONNX Runtime raises its own types for a graph it cannot run
        raise ValueError(f"the export does not run: {(str(exc).splitlines() or [''])[0]}") from None
    difference = float(np.abs(got - expected).max()) if got.shape == expected.shape else np.inf
    if not difference <= EXPORT_TOLERANCE:
        raise ValueError(
            f"the export's softmax differs from Keras' by {difference:.3g} "
            f"(shapes {got.shape} and {expected.shape})"
        )
    return path


def _prune(folder: Path, keep: int) -> None:
    """Remove all but the ``keep`` most recently used exports (a file in use by another process
    stays readable: its session read it whole)."""
    files = sorted(folder.glob("*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in files[keep:]:
        with contextlib.suppress(OSError):
            old.unlink()


def _cached_export(version: ModelVersion) -> tuple[Path | bytes, Any]:
    """(``version``'s model as ONNX, the Keras model when it had to be loaded for the export,
    else None). The ONNX is the cached file, or its bytes when the cache cannot be written
    (exported into a temporary folder, removed again).

    Raises
    ------
    ModelError
        As :func:`~particleseg_model.model.registry.load_model`.
    Exception
        The exporter's, for a model it cannot convert (``.network`` set to the loaded model).
    """
    model_file = version.model_path
    if not model_file.is_file():
        raise ModelError(f"{model_file}: no such model file")
    name = f"{sha256_file(model_file)}-e{EXPORT_FORMAT}.onnx"
    folder = onnx_cache_dir()
    cached = folder / name
    if cached.is_file():
        with contextlib.suppress(OSError):
            os.utime(cached)  # most recently used: kept by _prune
        return cached, None
    network = load_model(version)  # the registry's checks and messages (corrupt, wrong size)
    try:
        try:
            with atomic_path(cached) as tmp:
                _checked_export(network, tmp)
        except OSError:  # a cache that cannot be written: export for this run only
            scratch = Path(tempfile.mkdtemp(prefix="particleseg-onnx-"))
            try:
                return _checked_export(network, scratch / name).read_bytes(), network
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    except Exception as exc:
        exc.network = network  # type: ignore[attr-defined] - the caller falls back to it
        raise
    _prune(folder, CACHE_KEEP)
    return cached, network


def load_engine(
    version: ModelVersion, *, engine: str | None = None, log: Log | None = None
) -> KerasEngine | OnnxEngine:
    """The engine that runs ``version``'s network.

    Parameters
    ----------
    version
        A registered or the pretrained model
        (:func:`~particleseg_model.model.registry.resolve_model`).
    engine
        ``"auto"`` (ONNX Runtime when the ``onnx`` extra is installed and the model exports,
        else Keras), ``"onnx"`` (refused without the extra) or ``"keras"``; None:
        ``$PARTICLESEG_ENGINE``, else ``"auto"``.
    log
        Gets one line when ``auto`` falls back to Keras for a model that does not export.

    Returns
    -------
    KerasEngine or OnnxEngine
        Its ``input_shape`` is the network's ``(None, size, size, channels)``.

    Raises
    ------
    ModelError
        The model file is missing, corrupt or disagrees with its manifest (as
        :func:`~particleseg_model.model.registry.load_model`); ``engine="onnx"`` without ONNX
        Runtime or for a model that does not export.
    ValueError
        An unknown ``engine``.
    """
    choice = engine or os.environ.get(ENGINE_ENV) or "auto"
    if choice not in ENGINES:
        raise ValueError(f"unknown inference engine {choice!r} (known: {', '.join(ENGINES)})")
    if choice == "keras" or (choice == "auto" and not onnx_available()):
        return KerasEngine(load_model(version))
    if not onnx_available():
        raise ModelError(
            "engine 'onnx' needs ONNX Runtime and tf2onnx: pip install 'particleseg[onnx]'"
        )
    try:
        source, _ = _cached_export(version)
    except ModelError:
        raise
    except Exception as exc:  # tf2onnx raises many types for a graph it cannot convert
        reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
        if choice == "onnx":
            raise ModelError(
                f"model {version.version}: cannot be exported to ONNX ({reason})"
            ) from None
        if log is not None:
            log(f"model {version.version}: ONNX export failed ({reason}); running it with Keras")
        return KerasEngine(exc.network)  # type: ignore[attr-defined] - set by _cached_export
    onnx = OnnxEngine(source)
    size = version.input_size
    if tuple(onnx.input_shape[1:3]) != (size, size):
        raise ModelError(
            f"{version.model_location}: network input {onnx.input_shape[1:3]} disagrees with "
            f"its manifest ({size}x{size})"
        )
    return onnx
